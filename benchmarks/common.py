"""Shared helpers of the benchmark modules: the results-file header (command, machine, date) and writing it."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def header(title: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return (f"# {title}\n\n- command: `{threads}{' '.join(['python', *sys.argv])}`\n- machine: {cpu}, {os.cpu_count()} cores, "
            f"{platform.system()} {platform.machine()}\n- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n")


def write(name: str, text: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(text)
    print(text)
