"""`hpedge compress` through CliRunner at the tiny fixtures' settings, and the check of a refused command."""
from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from hpedge.cli import app
from hpedge.compress.pipeline import work_dir

runner = CliRunner()


def compress(src: Path, out: Path, *args: str) -> object:
    return runner.invoke(app, ["compress", str(src), "-o", str(out), "--resolution", "64", "--pool-size", "4",
                               "--batch-size", "2", "--eval-per-category", "0", "--grid-samples", "0", *args])


def assert_refused(r: object, out: Path, message: str) -> None:
    """One ``error:`` line holding ``message``, exit 2, no traceback, neither OUT nor the work folder written."""
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]  # type: ignore[attr-defined]
    assert r.exit_code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in r.output, r.output  # type: ignore[attr-defined]
    assert not out.exists() and not work_dir(out).exists()
