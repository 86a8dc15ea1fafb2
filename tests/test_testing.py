"""The real-configuration fixtures keep everything but width and depth, and are loud enough for an oracle
test to fail on them: a change of prompt, shift, guidance or T5 length must move stock diffusers' image
below 30 dB PSNR (plain random initialisation moved it to 39-53 dB only)."""

import numpy as np
import pytest
import torch

from hpedge.models.architectures import architecture
from hpedge.testing import NAMES, TINY_FLUX, TINY_SD3, tiny_pipeline, tiny_transformer_config

LONG = " ".join(["a photo of a small red cube on the left of a big blue sphere, highly detailed"] * 4)
WIDTH_DEPTH = set(TINY_SD3) | set(TINY_FLUX) | {"joint_attention_dim", "pooled_projection_dim", "axes_dims_rope",
                                                 "dual_attention_layers"}


def psnr(a, b) -> float:
    return float(10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-20)))


@pytest.mark.parametrize("name", NAMES)
def test_fixture_keeps_every_property_but_width_and_depth(name) -> None:
    a = architecture(name)
    pipe = tiny_pipeline(name)
    cfg = dict(pipe.transformer.config)
    for k, v in a["transformer"].items():
        if k not in WIDTH_DEPTH:
            assert cfg[k] == (tuple(v) if isinstance(v, list) else v), k
    assert tiny_transformer_config(name)["num_layers"] < a["transformer"]["num_layers"]
    sched = dict(pipe.scheduler.config)
    assert all(sched[k] == v for k, v in a["scheduler"].items() if not k.startswith("_"))
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.out_channels == 3 and pipe.vae_scale_factor == 8
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (a["vae"]["scaling_factor"], a["vae"]["shift_factor"])
    for key, spec in a["tokenizers"].items():
        assert getattr(pipe, key).model_max_length == spec["model_max_length"]
    if name == "sd3.5-medium":
        assert list(cfg["dual_attention_layers"]) == [0, 1]  # 13 of 24 -> 2 of 4, from the first block on
        assert pipe.transformer.transformer_blocks[0].attn2 is not None
    if a["family"] == "sd3":
        assert pipe.transformer.transformer_blocks[-1].context_pre_only
    assert cfg.get("guidance_embeds", False) == (name == "flux.1-dev")


@pytest.mark.parametrize("name", NAMES)
def test_prompt_shift_guidance_and_t5_length_each_move_the_image_below_30_db(name) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_pipeline(name)
    a = architecture(name)

    def run(prompt="a red cube on the left of a blue sphere", guidance=4.0, msl=256):
        kw = dict(num_inference_steps=8, height=64, width=64, output_type="np", max_sequence_length=msl,
                  generator=torch.Generator().manual_seed(0), guidance_scale=guidance)
        return pipe(prompt, **kw).images[0]

    base = run()
    assert psnr(base, run("two dogs playing in the snow")) < 30
    if a["defaults"]["guidance_kind"] != "none":
        assert psnr(base, run(guidance=1.0)) < 30
    cfg = dict(pipe.scheduler.config)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        {**cfg, "use_dynamic_shifting": False, "shift": 1.0} if cfg.get("use_dynamic_shifting") or cfg["shift"] != 1.0
        else {**cfg, "shift": 3.0})
    assert psnr(base, run()) < 30
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    assert psnr(run(LONG), run(LONG, msl=16)) < 30
