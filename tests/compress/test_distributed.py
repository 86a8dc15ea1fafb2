"""``hpedge compress`` on two processes (two MULTI_CPU ranks over gloo, started by torchrun as the launch lines in
examples/accelerate/README.md do): the work is split, OUT is written once, the result equals a single-process run
with the same global batch, and a run whose rank was killed continues with --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hpedge.cli import app
from hpedge.compress.distill import latest_checkpoint
from hpedge.compress.pipeline import REPORT, work_dir

from tests.conftest import REAL_SIZE

NAME = "sd3.5-medium"  # dual-attention blocks, CLIP + T5, CFG: the richest of the five configurations
STEPS = 24
# losses are means over the ranks; the global batch and its draws are the same, so they differ only by float
# rounding (the ranks reduce in a different order and use 1 thread each): measured 4e-7 relative
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4  # measured 7e-6 after 10 steps (weights of magnitude ~1)


def _args(src: Path, out: Path, *extra: str) -> list[str]:
    return ["compress", str(src), "-o", str(out), "--remove-blocks", "2-2", "--steps", str(STEPS), "--batch-size", "4",
            "--pool-size", "8", "--resolution", str(REAL_SIZE), "--eval-per-category", "0", "--grid-samples", "0",
            "--checkpoint-every", "4", "--analysis-prompts", "2", "--analysis-steps", "2", *extra]


def _torchrun(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "ACCELERATE_USE_CPU": "True", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hpedge.cli", *args]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _finish(p: subprocess.Popen, log: Path, timeout: float = 600) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"torchrun did not finish in {timeout} s:\n{log.read_text()[-3000:]}") from None


def _rank_pid(launcher: int, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "hpedge.cli" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _weights(out: Path) -> dict[str, torch.Tensor]:
    files = sorted((out / "transformer").glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def _same_result(a: Path, b: Path) -> None:
    ra, rb = (json.loads((p / REPORT).read_text()) for p in (a, b))
    assert ra["kept_blocks"] == rb["kept_blocks"] and ra["removed_blocks"] == rb["removed_blocks"]
    assert [row[0] for row in ra["losses"]] == [row[0] for row in rb["losses"]]
    for la, lb in zip(ra["losses"], rb["losses"]):
        assert lb[1:] == pytest.approx(la[1:], rel=LOSS_RTOL), (la, lb)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=WEIGHT_ATOL), k


@pytest.fixture(scope="module")
def single_process(real_pipelines, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    r = CliRunner().invoke(app, _args(real_pipelines[NAME], out))
    assert r.exit_code == 0, r.output
    return out


def test_two_processes_split_the_work_write_out_once_and_equal_one_process(real_pipelines, single_process, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    rc = _finish(_torchrun(_args(real_pipelines[NAME], out), log), log)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    report = json.loads((out / REPORT).read_text())
    assert report["processes"] == {"count": 2, "distributed_type": "multi_cpu", "batch_per_process": 2}
    assert text.count(f"wrote {out}") == 1  # only the main process reports (and writes: a second writer would fail)
    assert not work_dir(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["log", "out"]
    # the analysis was split (each rank scored half the ablations) and merged into the same table
    imp_a, imp_b = (json.loads((p / "hpedge_importance.json").read_text()) for p in (single_process, out))
    assert [(e["block"], e["component"]) for e in imp_a["entries"]] == [(e["block"], e["component"]) for e in imp_b["entries"]]
    for ea, eb in zip(imp_a["entries"], imp_b["entries"]):
        assert eb["harm"] == pytest.approx(ea["harm"], rel=1e-4)
    _same_result(single_process, out)


def test_a_killed_rank_leaves_a_state_that_resume_continues(real_pipelines, single_process, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    src = real_pipelines[NAME]
    p = _torchrun(_args(src, out), log)
    ckdir = work_dir(out) / "checkpoints"
    deadline = time.monotonic() + 300
    while latest_checkpoint(ckdir) is None and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = _rank_pid(p.pid, 1)
    assert victim is not None and p.poll() is None, log.read_text()[-3000:]
    os.kill(victim, signal.SIGKILL)
    rc = _finish(p, log)
    assert rc != 0 and not out.exists(), "the run finished before its rank was killed"
    stopped_at = int(latest_checkpoint(ckdir).name.split("-")[1])
    assert 0 < stopped_at < STEPS
    # checkpoints appear whole or not at all: the kill may leave a .step-*.tmp, never a step-* without its state
    assert all((c / "state.json").exists() for c in ckdir.glob("step-*"))

    rc = _finish(_torchrun(_args(src, out, "--resume"), log), log)
    assert rc == 0, log.read_text()[-3000:]
    report = json.loads((out / REPORT).read_text())
    assert report["resumed_from_step"] >= stopped_at
    _same_result(single_process, out)  # as if never interrupted
