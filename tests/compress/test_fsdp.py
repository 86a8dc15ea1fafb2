"""Distillation under FSDP2 with PWP-frozen blocks and SGDistill's per-block learning rates, on two CPU processes:
the same losses and student as one process, and a sharded checkpoint that --resume continues
(how FSDP is reached on CPU: tests/compress/fsdp_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.compress.fsdp_common import run

NAME = "sd3.5-medium"
ROOT = Path(__file__).resolve().parents[2]


def _fsdp(src: Path, work: Path, out: Path, steps: int, *extra: str) -> tuple[dict, dict]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "True", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "compress" / "fsdp_worker.py"), str(src), str(work), str(out), str(steps), *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    with safe_open(str(out), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["state"])


def test_fsdp2_with_per_block_learning_rates_equals_one_process_and_resumes(real_pipelines, tmp_path) -> None:
    src = real_pipelines[NAME]
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip(f"torch {torch.__version__} has no FSDP2 (fully_shard)")
    one, one_state = run(str(src), tmp_path / "one", 4)
    weights, state = _fsdp(src, tmp_path / "fsdp", tmp_path / "fsdp.safetensors", 4)
    assert len(one_state.losses) == len(state["losses"]) == 1
    assert state["losses"][0] == pytest.approx(one_state.losses[0], rel=1e-4)
    ref = one.state_dict()
    assert ref.keys() == weights.keys()
    for k in ref:
        assert torch.allclose(ref[k], weights[k], atol=1e-4), k
    # a sharded checkpoint (step 2 of a 2-step run) that a 4-step --resume continues to the same student
    _fsdp(src, tmp_path / "cut", tmp_path / "cut2.safetensors", 2)
    resumed, rstate = _fsdp(src, tmp_path / "cut", tmp_path / "cut4.safetensors", 4, "--resume")
    assert rstate["resumed_from"] == 2
    for k in ref:
        assert torch.allclose(weights[k], resumed[k], atol=1e-5), k
