"""Precisions as data: each profile's order, the one-line refusals, the bytes the planner counts."""
from __future__ import annotations

import json

import pytest

from hpedge.backends.engines import precision_refusal
from hpedge.errors import HpedgeError
from hpedge.models import adapters
from hpedge.models.loading import resolve
from hpedge.models.meta import meta_transformer
from hpedge.targets import precisions
from hpedge.targets.footprint import estimate
from hpedge.targets.profiles import PROFILE_DIR, load_profile


@pytest.mark.parametrize("name,order", [("rtx3060", ("int4", "int8")), ("rtx3090", ("int4", "int8")),
                                        ("rtx4070", ("fp8", "int4", "int8")), ("rtx4090", ("fp8", "int4", "int8")),
                                        ("rtx5090", ("nvfp4", "fp8", "int4", "int8")),
                                        ("jetson-orin-nano-8gb", ("int4", "int8"))])
def test_each_profile_names_its_precisions_best_first(name: str, order: tuple[str, ...]) -> None:
    p = load_profile(name)
    assert p.transformer_precisions == order
    assert precisions.candidates("auto", p)[0] == list(order)


@pytest.mark.parametrize("target,precision", [("rtx3060", "fp8"), ("rtx3090", "nvfp4"), ("rtx4090", "nvfp4"),
                                              ("jetson-agx-orin-64gb", "fp8")])
def test_a_precision_the_gpu_does_not_run_is_refused_in_one_line(target: str, precision: str) -> None:
    with pytest.raises(HpedgeError, match=f"cannot run {precision}: its GPU runs") as e:
        precisions.candidates(precision, load_profile(target))
    assert "\n" not in str(e.value)
    with pytest.raises(HpedgeError, match="--precision must be one of"):
        precisions.candidates("fp16", load_profile(target))


def test_tensorrt_rtx_refusals_follow_the_measured_compute_capabilities() -> None:
    assert "sm_86" in precision_refusal("tensorrt_rtx", ("8.6",), {"fp8"})
    assert "sm_89" in precision_refusal("tensorrt_rtx", ("8.9",), {"nvfp4"})
    assert precision_refusal("tensorrt_rtx", ("8.9",), {"fp8", "int4"}) is None
    assert precision_refusal("tensorrt_rtx", ("12.0",), {"nvfp4", "fp8"}) is None
    assert "sm_86" in precision_refusal("tensorrt_rtx", ("8.6", "8.9"), {"fp8"})  # a portable engine: every GPU


def test_a_profile_order_outside_its_precisions_is_refused(tmp_path) -> None:
    d = json.loads((PROFILE_DIR / "rtx3060.json").read_text())
    for bad in (["fp8", "int4"], ["int8"], ["int4", "int4"]):
        d["transformer_precisions"] = bad
        (tmp_path / "p.json").write_text(json.dumps(d))
        with pytest.raises(HpedgeError, match="transformer_precisions"):
            load_profile(str(tmp_path / "p.json"))
    del d["transformer_precisions"]  # a manifest of an earlier hpedge: INT4 only
    (tmp_path / "p.json").write_text(json.dumps(d))
    assert load_profile(str(tmp_path / "p.json")).transformer_precisions == ("int4",)


def test_layer_bytes_per_precision() -> None:
    k, n = 256, 64  # in, out
    assert precisions.get("int4").layer_bytes(n, k) == n * k // 2 + n * (k // 128) * 2
    assert precisions.get("int8").layer_bytes(n, k) == n * k + n * 2
    assert precisions.get("fp8").layer_bytes(n, k) == n * k + n * 2
    assert precisions.get("nvfp4").layer_bytes(n, k) == n * k // 2 + n * (k // 16)


def test_transformer_bytes_on_the_real_sd35_large_configuration() -> None:
    tr = meta_transformer(resolve("sd3.5-large", allow_architecture=True))
    b = {p: precisions.transformer_bytes(tr, p) for p in precisions.PRECISIONS}
    assert b["int4"] == adapters.int4_bytes(tr)  # the formula a test checks against the exported INT4 file
    assert b["int4"] < b["nvfp4"] < b["int8"] < b["fp8"] < 2 * adapters.numel(tr)
    assert 7.9e9 < b["fp8"] < 8.3e9  # 8.1 B parameters, a byte each, embedders and output layers in 16 bits


def test_the_footprint_counts_the_chosen_precision() -> None:
    ref = resolve("sd3.5-large", allow_architecture=True)
    fps = {p: estimate(ref, load_profile("rtx5090"), precision=p) for p in ("int4", "fp8", "nvfp4")}
    assert fps["fp8"].precisions["transformer"] == "fp8"
    assert fps["int4"].weights["transformer"] < fps["nvfp4"].weights["transformer"] < fps["fp8"].weights["transformer"]
    assert fps["fp8"].activations == fps["int4"].activations  # counted in fp16 at every precision

