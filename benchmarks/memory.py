"""Benchmark: memory (run through ``python benchmarks/run.py memory``)."""

from __future__ import annotations

import argparse

from common import header, write


# --------------------------------------------------------------------------------------------- memory
PAPER = {"sd3.5-large": "15.8 GB -> 3.2 GB (-80.4 %)", "flux.1-schnell": "-77.5 % .. -80.4 % (with INT4)"}


REAL_SCALE_CUTS = [("sd3.5-large", "25-29,31-35", "reference HierarchicalPrune cut"),
                   ("sd3.5-large-turbo", "25-29,31-35", "reference cut (same architecture)"),
                   ("sd3.5-medium", "15-20,", "6 later blocks (25 %)"),
                   ("flux.1-schnell", "13-18,45-55", "6 double + 11 single later blocks"),
                   ("flux.1-dev", "13-18,45-55", "6 double + 11 single later blocks")]


def memory(_args: argparse.Namespace) -> None:
    from hpedge.compress.plan import Budget, make_plan
    from hpedge.models.adapters import describe
    from hpedge.models.architectures import build_on_meta

    rows = REAL_SCALE_CUTS
    text = header("Real-scale transformer memory (meta-device build, planner arithmetic)")
    text += ("INT4 = linear weights with input dim divisible by 128 in 4 bits + one fp16 scale per 128; everything "
             "else bf16. Same formula as the digits export (see latency.md for measured file sizes).\n\n")
    text += "| model | removed blocks | params | kept | bf16 | pruned bf16 | pruned INT4 | vs bf16 | paper |\n|---|---|---|---|---|---|---|---|---|\n"
    for name, cut, what in rows:
        m = build_on_meta(name)
        d = describe(m)
        p = make_plan(m, Budget(remove_blocks=cut))
        text += (f"| {name} | {cut} ({what}) | {d['params'] / 1e9:.3f} B | {p.kept_ratio:.1%} | {p.bytes_bf16_before / 1e9:.2f} GB | "
                 f"{p.bytes_bf16_after / 1e9:.2f} GB | {p.bytes_int4_after / 1e9:.2f} GB | "
                 f"{p.bytes_int4_after / p.bytes_bf16_before - 1:+.1%} | {PAPER.get(name, '')} |\n")
    write("memory.md", text)
