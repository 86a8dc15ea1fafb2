import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hpedge.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_info_prints_real_scale_numbers() -> None:
    r = run("info", "sd3.5-large")
    assert r.exit_code == 0 and "8.057 B" in r.output and "16.11 GB" in r.output


def test_plan_reference_cut() -> None:
    r = run("plan", "sd3.5-large", "--remove-blocks", "25-29,31-35")
    assert r.exit_code == 0, r.output
    assert "73.6% kept" in r.output and "3.06 GB" in r.output and "-81.0% vs bf16" in r.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (("info", "/no/such/folder"), "not found"),
        (("info", "zoo:nope"), "unknown zoo model"),
        (("eval", "sd3.5-large"), "architecture name without weights"),
        (("plan", "sd3.5-large", "--remove-blocks", "50"), "importance"),
        (("plan", "sd3.5-large", "--remove-blocks", "36-38"), "out of range"),
        (("plan", "sd3.5-large", "--remove-blocks", "37,"), "context_pre_only"),
        (("plan", "sd3.5-large", "--keep-ratio", "0.5", "--remove-blocks", "3"), "exactly one budget"),
        (("plan", "sd3.5-large", "--target", "rtx9999"), "unknown target"),
        (("export", "zoo:digits-sd3", "--target", "nope", "-o", "/tmp/x"), "unknown target"),
    ],
)
def test_user_errors_are_one_line(args, needle) -> None:
    assert needle in one_line_error(run(*args))


def test_folder_that_is_not_a_pipeline(tmp_path: Path) -> None:
    assert "not a diffusers pipeline" in one_line_error(run("info", str(tmp_path)))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert "unsupported pipeline class" in one_line_error(run("info", str(tmp_path)))


def test_targets_lists_profiles() -> None:
    r = run("targets")
    assert r.exit_code == 0
    for name in ("rtx4090", "rtx3060", "jetson-orin-nano-8gb", "jetson-agx-orin-64gb"):
        assert name in r.output


def test_progress_in_a_log_is_one_line_per_stage_and_every_tenth(capsys) -> None:
    from hpedge import console

    with console.progress("compress") as cb:  # stderr is captured here: not a terminal
        cb("loading", 0, 1)
        for k in range(1, 201):
            cb(f"distilling: loss {1 / k:.4f}", k, 200)
        cb("writing", 0, 1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].endswith("compress: started") and lines[-1].endswith("compress: done")
    assert all(ln.startswith("[0:00:") for ln in lines)
    distil = [ln for ln in lines if "distilling" in ln]
    assert 10 <= len(distil) <= 12 and distil[-1].endswith("200/200 (100%)")
    assert [ln.split("] ", 1)[1] for ln in lines if "loading" in ln or "writing" in ln] == ["loading", "writing"]


def test_bad_compress_input_is_refused_before_any_long_step(tmp_path: Path) -> None:
    """Each refused in one line, before the teacher is loaded or analysed, and nothing written."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_text("not an image")
    (data / "a.txt").write_text("a 3")
    out = tmp_path / "out"
    base = ("compress", "zoo:digits-sd3", "-o", str(out), "--remove-blocks", "3")
    for extra, needle in (
        (("--data", str(data)), "is not a readable image"),
        (("--data", str(tmp_path / "none")), "is not a folder"),
        (("--prompts", str(tmp_path / "none.txt")), "not found"),
        (("--importance", str(data / "a.txt")), "not valid JSON"),
        (("--steps", "-1"), "--steps must be at least 0"),
        (("--batch-size", "0"), "--batch-size must be at least 1"),
        (("--lr", "0"), "--lr must be positive"),
    ):
        assert needle in one_line_error(run(*base, *extra)), extra
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_generate_refuses_zero_steps_and_sizes(tmp_path: Path) -> None:
    for extra, needle in ((("--steps", "0"), "--steps must be at least 1"), (("--height", "0"), "--height must be at least 1")):
        assert needle in one_line_error(run("generate", "zoo:digits-sd3", "a 3", "-o", str(tmp_path / "x.png"), *extra))
    assert not (tmp_path / "x.png").exists()


def test_bad_analyze_and_export_numbers_are_refused_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "imp.json"
    for extra, needle in ((("--num-prompts", "0"), "--num-prompts must be at least 1"),
                          (("--resolution", "0"), "--resolution must be at least 1"),
                          (("--prompts", str(tmp_path / "none.txt")), "not found")):
        assert needle in one_line_error(run("analyze", "zoo:digits-sd3", "-o", str(out), *extra)), extra
    pkg = tmp_path / "pkg"
    for extra, needle in ((("--calibration-prompts", "0"), "--calibration-prompts must be at least 1"),
                          (("--steps", "0"), "--steps must be at least 1")):
        assert needle in one_line_error(run("export", "zoo:digits-sd3", "--target", "rtx4090", "-o", str(pkg), *extra)), extra
    assert not out.exists() and not pkg.exists() and not list(tmp_path.glob(".pkg*"))
