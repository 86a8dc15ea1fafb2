"""The package's device memory on a target: peak tracking, components as shipped, residency, the planner's table."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hpedge.cli import app
from hpedge.errors import HpedgeError
from hpedge.targets.footprint import _peak, choose_t5, estimate
from hpedge.targets.profiles import load_profile
from hpedge.models.loading import resolve

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "sd35-large-turbo-contribution-hpsv2.json"
runner = CliRunner()


def test_peak_counts_the_tensors_alive_at_once() -> None:
    import torch

    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to("meta")

    def run():
        x = torch.empty(2, 8, device="meta")
        return m(x)

    # x (2x8) + the first Linear's output (2x16) + ReLU's output (2x16), float32; the weights are not counted
    assert _peak(m, run) == 4 * (16 + 32 + 32)


@pytest.fixture(scope="module")
def large():
    return resolve("sd3.5-large", allow_architecture=True)


def test_sd35_large_components_as_shipped(large) -> None:
    fp = estimate(large, load_profile("rtx3060"), t5="int4")
    assert fp.residency == "resident" and fp.resolution == 768 and fp.prompts == 1
    assert fp.precisions == {"transformer": "int4", "clip": "fp16", "t5": "int4", "vae_decoder": "fp16"}
    gb = {k: round(v / 1e9, 2) for k, v in fp.weights.items()}
    # CLIP-L + CLIP-G: 0.82 B parameters in fp16; T5-XXL's 4.76 B in INT4 (its 32128 x 4096 table in fp16)
    assert gb["clip"] == 1.64 and 2.5 < gb["t5"] < 2.8 and gb["vae_decoder"] == 0.10
    assert fp.need() == sum(fp.weights.values()) + max(fp.activations.values())
    assert 0 < fp.activations["transformer"] < fp.activations["vae_decoder"]  # VAE decode at 768 px peaks higher
    bigger = estimate(large, load_profile("rtx4090"), t5="int4")  # opt 1024 px: 4096 image tokens instead of 2304
    assert bigger.activations["transformer"] > 1.5 * fp.activations["transformer"]
    eight = estimate(large, load_profile("rtx3060"), t5="int8")
    assert 1.6 < eight.weights["t5"] / fp.weights["t5"] < 2.0
    assert estimate(large, load_profile("rtx3060")).precisions["t5"] == "int4"  # auto: INT8 does not fit a 12 GB card whole
    assert estimate(large, load_profile("rtx5090")).precisions["t5"] == "int8"


def test_sequential_residency_on_shared_memory_boards(large) -> None:
    fp = estimate(large, load_profile("jetson-orin-nano-8gb"), t5="int4")
    assert fp.residency == "sequential"  # auto on a shared-memory profile
    assert fp.need() == max(fp.phase_bytes(p) for p in ("text", "transformer", "vae_decoder")) < \
        estimate(large, load_profile("jetson-orin-nano-8gb"), "resident", t5="int4").need()
    dropped = estimate(large, load_profile("jetson-orin-nano-8gb"), drop_t5=True)
    assert "t5" not in dropped.weights and dropped.phase_bytes("text") < fp.phase_bytes("text")
    with pytest.raises(HpedgeError, match="SD3 pipelines only"):
        estimate(resolve("flux.1-dev", allow_architecture=True), load_profile("rtx4090"), drop_t5=True)
    with pytest.raises(HpedgeError, match="--residency must be"):
        estimate(large, load_profile("rtx4090"), "streaming")


def test_plan_prints_the_package_table_and_fits_rtx3060() -> None:
    r = runner.invoke(app, ["plan", "sd3.5-large", "--target", "rtx3060", "--importance", str(REFERENCE)])
    assert r.exit_code == 0, r.output
    assert "package on rtx3060 (resident, 768 px" in r.output and "activations: vae_decoder" in r.output
    for row in ("transformer", "clip", "t5", "vae_decoder", "needed", "available"):
        assert row in r.output
    # the engine precision --precision auto takes on the kept blocks, each precision's footprint beside it
    text = " ".join(r.output.split())
    assert "engine precision" in text and "int4 (auto)" in text and "--precision auto: rtx3060 runs int4, int8" in text
    assert "int8 would not fit rtx3060" in text  # blocks were removed until INT4 fits; INT8's byte per weight does not


def test_plan_json_records_the_footprint(tmp_path) -> None:
    out = tmp_path / "plan.json"
    r = runner.invoke(app, ["plan", "sd3.5-large", "--target", "jetson-orin-nano-8gb", "--drop-t5", "--importance",
                            str(REFERENCE), "--json", str(out)])
    assert r.exit_code == 0, r.output
    p = json.loads(out.read_text())
    fp = p["package_memory"]
    assert fp["fits"] and fp["drop_t5"] and fp["residency"] == "sequential" and fp["need"] <= fp["capacity"]
    assert p["budget"] == {"target": "jetson-orin-nano-8gb", "residency": "auto", "drop_t5": True, "t5": "auto"}


def test_export_refuses_a_package_that_cannot_fit_before_any_work(tmp_path) -> None:
    from hpedge.targets.profiles import PROFILE_DIR

    prof = json.loads((PROFILE_DIR / "rtx4090.json").read_text())
    prof.update(name="tiny-card", memory_gb=3.001, reserve_gb=3.0)  # 1 MB for the whole package
    path = tmp_path / "tiny-card.json"
    path.write_text(json.dumps(prof))
    r = runner.invoke(app, ["export", "zoo:digits-sd3", "--target", str(path), "-o", str(tmp_path / "pkg")])
    assert r.exit_code != 0 and "does not fit tiny-card" in r.output and "compress it first" in r.output
    assert not (tmp_path / "pkg").exists() and not list(tmp_path.glob(".pkg*"))


def test_t5_auto_is_one_rule_for_export_and_compress() -> None:
    inf = float("inf")
    asked: list[str] = []

    def costs(c8: float, c4: float):
        def cost(p: str) -> float:
            asked.append(p)
            return {"int8": c8, "int4": c4}[p]
        return cost

    assert choose_t5(costs(0, 0))[0] == "int8" and asked == ["int8"]  # fits with INT8: INT4 never sized
    assert choose_t5(costs(inf, 0))[0] == "int4"  # export: INT8 does not fit
    assert choose_t5(costs(inf, inf))[0] == "int4"  # neither fits: the smaller one is refused later, with numbers
    assert choose_t5(costs(3, 3))[0] == "int8"  # compress: INT4 would not save a block
    assert choose_t5(costs(4, 3)) == ("int4", "T5 INT4: INT8 would cost 1 more transformer block(s)")
