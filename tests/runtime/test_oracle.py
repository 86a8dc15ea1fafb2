"""Stock diffusers is the reference: ``hpedge.runtime`` on a package must give diffusers' image.

For every real-configuration fixture (the compressed student, exported with ``--fp32-reference``), the
same initial latents, prompts, steps and guidance through ``StableDiffusion3Pipeline`` / ``FluxPipeline``
and through the package: PSNR >= 60 dB for the fp32 variant at the model's default guidance and at
guidance 1; the INT4 variants within the profile's end-to-end threshold. The fixtures are built so that
this can fail (tests/models/test_fixtures.py: prompt, shift, guidance and T5 length each move the image
below 30 dB); on the zoo a wrong shift costs ~80 dB.
"""

import logging

import numpy as np
import pytest
import torch

from hpedge.models.loading import load_pipeline
from hpedge.models.sampling import defaults, sample, with_overrides
from hpedge.runtime import Package
from tests.conftest import REAL

PROMPTS = ["a red cube on the left of a blue sphere", "two dogs playing in the snow"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-20)))


def _compare(c: dict, variant: str, guidance: float | None) -> list[float]:
    pipe = load_pipeline(str(c["out"]))
    pkg = Package(c["package"], variant=variant, device="cpu")
    h, w = pkg.size()
    d = defaults(pipe, c["out"])  # the model's own scheduler, shift and guidance; 4 of its steps (the comparison
    d = with_overrides(d, height=h, width=w, guidance=guidance, steps=min(d.steps, 4))  # is per step: 4 show it)
    lat = pkg.initial_latents(len(PROMPTS), seed=3)
    ref = sample(pipe, PROMPTS, d, latents=torch.from_numpy(lat))
    got = pkg.generate(PROMPTS, steps=d.steps, guidance=d.guidance, latents=lat)
    return [psnr(r, g) for r, g in zip(ref, got)]


@pytest.mark.parametrize("name", REAL)
def test_fp32_package_equals_stock_diffusers_at_default_guidance_and_at_1(real_chain, name) -> None:
    c = real_chain(name)
    for guidance in (None, 1.0):
        values = _compare(c, "fp32", guidance)
        assert min(values) >= 60.0, (name, guidance, values)


@pytest.mark.parametrize("name", REAL)
def test_int4_packages_within_the_profiles_end_to_end_threshold(real_chain, name) -> None:
    import json

    c = real_chain(name)
    limit = json.loads((c["package"] / "manifest.json").read_text())["target"]["parity"]["e2e_min_psnr_db"]
    for variant in ("int4", "int4_cpu"):
        values = _compare(c, variant, None)
        assert min(values) >= limit, (name, variant, values)


def test_a_prompt_longer_than_the_t5_limit_is_truncated_with_a_warning(real_chain, caplog) -> None:
    c = real_chain("flux.1-schnell")
    pkg = Package(c["package"], variant="int4_cpu", device="cpu")
    long = " ".join(["a red cube on the left of a blue sphere"] * 40)  # > 256 T5 tokens
    with caplog.at_level(logging.WARNING, logger="hpedge.runtime"):
        ids = pkg.tokenize([long])
    assert ids["t5_ids"].shape == (1, 256)
    assert any("truncated" in r.message and "t5_ids" in r.message for r in caplog.records)


def test_sizes_outside_the_package_and_negative_prompts_without_cfg_are_refused(real_chain) -> None:
    from hpedge.errors import HpedgeError

    pkg = Package(real_chain("flux.1-dev")["package"], variant="int4_cpu", device="cpu")
    with pytest.raises(HpedgeError, match="outside what this package covers"):
        pkg.generate(["a cat"], steps=1, height=1024, width=1024)
    with pytest.raises(HpedgeError, match="no negative prompt"):
        pkg.generate(["a cat"], steps=1, negative_prompt="blurry")
    # a non-square size within the range runs
    assert pkg.generate(["a cat"], steps=1, height=64, width=128).shape == (1, 64, 128, 3)
