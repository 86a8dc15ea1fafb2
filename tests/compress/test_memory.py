"""The distillation memory estimate (hpedge.compress.memory; checked against measured peaks by
benchmarks/distill_memory.py)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from hpedge.cli import app
from hpedge.compress.memory import estimate
from hpedge.models.architectures import build_on_meta

CUT = [25, 26, 27, 28, 29, 31, 32, 33, 34, 35]  # the reference's SD3.5 Large cut


def test_plan_distill_prints_the_per_gpu_estimate_for_a_real_architecture(tmp_path) -> None:
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(app, ["plan", "sd3.5-large", "--remove-blocks", "25-29,31-35", "--distill", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "distillation, per GPU" in r.output and "gradient-checkpointing" in r.output
    m = json.loads(out.read_text())["distill_memory"]
    assert m["batch_per_gpu"] == 16 and m["height"] == 1024 and m["text_tokens"] == 77 + 256
    # the teacher in bf16: 8.1 B parameters + the positional table
    teacher = next(v for k, v in m["rows"].items() if k.startswith("teacher (frozen"))
    assert 16.0e9 < teacher < 16.6e9
    assert m["total_checkpointed"] < m["total"]
    r = CliRunner().invoke(app, ["plan", "sd3.5-large", "--remove-blocks", "25-29,31-35", "--distill", "--batch-size", "6",
                                 "--processes", "4"])
    assert r.exit_code == 2 and "multiple of --processes" in r.output


def test_pwp_checkpointing_and_resolution_move_the_estimate_as_they_should() -> None:
    kw = dict(batch_per_gpu=1, height=512, width=512, text_tokens=333, mixed_precision="bf16")
    with_pwp = estimate(build_on_meta("sd3.5-medium"), [10, 11], **kw)
    without = estimate(build_on_meta("sd3.5-medium"), [10, 11], pwp=False, **kw)
    # PWP freezes blocks 0-9: fewer gradients and AdamW moments, fewer saved activations
    assert with_pwp.rows["AdamW moments (fp32, trainable)"] < 0.7 * without.rows["AdamW moments (fp32, trainable)"]
    assert with_pwp.activations < without.activations
    assert without.activations_checkpointed < 0.6 * without.activations
    # attention is counted as memory-efficient kernels keep it: linear in the tokens, not quadratic
    big = estimate(build_on_meta("sd3.5-medium"), [10, 11], **{**kw, "height": 1024, "width": 1024})
    tokens = (1024 // 16) ** 2 + 333, (512 // 16) ** 2 + 333
    assert big.activations < 1.2 * with_pwp.activations * tokens[0] / tokens[1]
