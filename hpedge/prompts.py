"""Prompts for calibration, analysis and distillation: a file of the user's, or the project's calibration set,
unless the pipeline's evaluator (the digits zoo, :mod:`hpedge.zoo.evaluator`) brings its own grammar."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpedge.errors import HpedgeError

PROMPTS_FILE = Path(__file__).resolve().parent / "data" / "calibration_prompts.txt"


def read_prompts(path: str | Path | None) -> list[str]:
    """Prompts from a text file, one per line (blank lines and lines starting with # skipped)."""
    p = Path(path) if path else PROMPTS_FILE
    if not p.is_file():
        raise HpedgeError(f"prompt file {p} not found")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise HpedgeError(f"prompt file {p} holds no prompts")
    return prompts


def calibration(evaluator: Any, n: int, seed: int, prompts_file: str | None = None) -> tuple[list[str], list[Any] | None]:
    """``n`` calibration prompts: the evaluator's own (with the objects it judges them by) for a pipeline that has
    one, else ``prompts_file`` or the project's calibration set (the first n, a seeded rotation of the list when
    ``seed`` differs)."""
    if evaluator is not None and prompts_file is None:
        return evaluator.calibration_prompts(n, seed)  # type: ignore[no-any-return]
    pool = read_prompts(prompts_file)
    start = (seed * 37) % len(pool)
    return [pool[(start + i) % len(pool)] for i in range(n)], None


def training_prompts(evaluator: Any, n: int, seed: int, prompts_file: str | None = None) -> list[str]:
    """The distillation's prompt pool: the evaluator's training grammar where there is one, else :func:`calibration`'s."""
    if evaluator is not None and prompts_file is None:
        return evaluator.training_prompts(n, seed)  # type: ignore[no-any-return]
    return calibration(None, n, seed, prompts_file)[0]
