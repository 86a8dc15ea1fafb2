"""``python benchmarks/run.py fit``: which device profiles hold a real pipeline, and in which configuration.

For every built-in profile, ``hpedge plan ARCH --target PROFILE --importance TABLE`` (the planner, from configs
alone: no weights) in each supported configuration: residency auto (resident on discrete cards, sequential on
shared-memory Jetsons) and sequential, with T5 (``--t5 auto``: INT8 where it costs no block, else INT4) and
without (``--drop-t5``, SD3 only). A row says how many blocks the planner removes to fit, the kept parameters,
T5's precision and the package's peak against what the profile leaves free. Computed, not measured: the
activations come from meta-device runs (hpedge.targets.footprint).
"""

from __future__ import annotations

import argparse
from typing import Any

from common import ROOT, header, write

REFERENCE = ROOT / "tests" / "data" / "sd35-large-turbo-contribution-hpsv2.json"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("fit", help="which profiles hold a real pipeline (planner, configs only)")
    p.add_argument("--arch", default="sd3.5-large")
    p.add_argument("--importance", default=str(REFERENCE), help="importance table (default: the reference SD3.5 Large Turbo one)")


def configurations(family: str) -> list[tuple[str, str, bool]]:
    rows = [("auto", "auto", False), ("sequential", "auto", False)]
    return rows + ([("auto", "auto", True)] if family == "sd3" else [])


def fit(args: argparse.Namespace) -> None:
    from hpedge.compress.pipeline import plan_for
    from hpedge.compress.plan import Budget
    from hpedge.errors import HpedgeError
    from hpedge.models.loading import resolve
    from hpedge.targets.footprint import choose_precision
    from hpedge.targets.profiles import all_profiles

    ref = resolve(args.arch, allow_architecture=True)
    family = ref.family
    lines = ["| profile | residency | T5 | blocks removed | kept parameters | needed GB (INT4) | engine precision "
             "(`--precision auto`): needed GB | available GB |", "|---|---|---|---|---|---|---|---|"]
    fits: dict[str, list[str]] = {}
    for prof in all_profiles():
        for residency, t5, drop in configurations(family):
            what = ("sequential" if residency == "sequential" else f"auto ({'sequential' if prof.shared_memory else 'resident'})")
            try:
                p = plan_for(args.arch, Budget(target=prof.name, residency=residency, drop_t5=drop, t5=t5),
                             args.importance, 0.5)
            except HpedgeError as e:
                short = str(e).split(": the package needs ", 1)[-1].split(";")[0]
                lines.append(f"| {prof.name} | {what} | {'dropped' if drop else 'auto'} | does not fit: {short} | | | | "
                             f"{(prof.memory_gb - prof.reserve_gb):.2f} |")
                continue
            fp = p.package_memory
            t5_col = "dropped" if drop else fp["precisions"]["t5"].upper()
            # the blocks are removed until INT4 fits; then the best precision the GPU runs that fits as well
            choice = choose_precision(ref, prof, "auto", residency, drop, p.remove, fp["precisions"].get("t5", "auto"))
            best = choice.order[0]
            lines.append(f"| {prof.name} | {what} | {t5_col} | {len(p.remove)} | {p.kept_ratio:.1%} | "
                         f"{fp['need'] / 1e9:.2f} | {best}: {choice.footprints[best].need() / 1e9:.2f} | "
                         f"{fp['capacity'] / 1e9:.2f} |")
            fits.setdefault(prof.name, []).append(f"{what}, T5 {t5_col}")
    n = len(all_profiles())
    text = header(f"Which profiles hold {args.arch}: the package as it ships, per configuration") + (
        f"Importance table: `{args.importance.replace(str(ROOT) + '/', '')}`; protected early blocks: the first half. "
        "The package: transformer INT4 (kept blocks; the engine precision `--precision auto` takes on those blocks "
        "and its footprint beside), T5 INT8 or INT4 (`--t5 auto`) or dropped, CLIPs and the VAE "
        "decoder fp16; activations of each phase at the profile's opt resolution and batch (CFG doubles the SD3 "
        "transformer's batch), from meta-device runs; `needed` <= memory less the profile's reserve. Computed from "
        "configs (no weights), not measured on the devices.\n\n" + "\n".join(lines) +
        f"\n\n{len(fits)} of {n} profiles hold {args.arch} in at least one configuration"
        + (f"; none for {', '.join(sorted({p.name for p in all_profiles()} - set(fits)))}" if len(fits) < n else "") + ".\n")
    write(f"fit-{args.arch}.md", text)
