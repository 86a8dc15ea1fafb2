"""Shared helpers of the benchmark modules: every results file, Markdown or JSON, is written here with its command,
machine, date and commit (:func:`provenance`)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def provenance() -> dict[str, str]:
    """The command (with OMP_NUM_THREADS when set), the machine, the date and the commit (``+dirty`` with local changes)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return {"command": f"{threads}{' '.join(['python', *sys.argv])}",
            "machine": f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _commit()}


def _commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def header(title: str) -> str:
    p = provenance()
    return (f"# {title}\n\n- command: `{p['command']}`\n- machine: {p['machine']}\n- date: {p['date']}\n"
            f"- commit: {p['commit']}\n\n")


def write(name: str, text: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(text)
    print(text)


def write_json(name: str, data: dict[str, Any]) -> None:
    """``data`` as ``results/NAME`` with its provenance (command, machine, date, commit) under ``"provenance"``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps({"provenance": provenance(), **data}, indent=2))


def image_psnr(a: Any, b: Any) -> list[float]:
    """PSNR (dB, peak 1) of each image pair of two [N, ...] arrays in [0, 1]; 200 for identical images."""
    import numpy as np

    out = []
    for x, y in zip(np.asarray(a, np.float64), np.asarray(b, np.float64)):
        mse = float(((x - y) ** 2).mean())
        out.append(200.0 if mse == 0 else float(10 * np.log10(1.0 / mse)))
    return out
