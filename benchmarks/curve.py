"""Benchmark: the compression curve (``python benchmarks/run.py curve --family sd3``).

HierarchicalPrune, its ablations and the baselines at 25, 40 and 50 % of the transformer blocks removed, every
distilled row with the same budget (steps, batch, seed) at its method's best learning rate from a sweep at the sweep
fraction, scored on the 500-prompt benchmark against the teacher with paired bootstrap intervals.

Each row runs in its own process (``--jobs`` at a time, the cores split between them) and leaves its result in
``benchmarks/results/curve-FAMILY/rows/ROW.json`` with its command, machine and date; rows already there are not run
again, so a curve can be built up over several runs (``--max-minutes`` starts no row after that long). The table
(``curve-FAMILY.md``) and the plot (``curve-FAMILY.png``) are written from whatever rows exist, naming the missing ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT
from curve_report import DISTILLED, METHODS, best_lrs, load_rows, report, rows_dir

def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("curve", help="the compression curve: methods x 25/40/50 % of blocks removed")
    c.add_argument("--family", choices=["sd3", "flux"], required=True)
    c.add_argument("--fractions", type=float, nargs="+", default=[0.4, 0.5, 0.25],
                   help="shares of the blocks removed, in the order their rows run (the table sorts them)")
    c.add_argument("--steps", type=int, default=600, help="distillation steps of every distilled row")
    c.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3], help="the learning-rate sweep")
    c.add_argument("--sweep-fraction", type=float, default=0.4, help="where each method's learning rate is chosen")
    c.add_argument("--protect-early", type=float, default=0.25,
                   help="HPP's protected share of early blocks (0.5, hpedge's default, leaves 5 of digits-sd3's 12 "
                        "blocks removable: too few for 50 %%)")
    c.add_argument("--per-category", type=int, default=100, help="prompts per category (100 = the 500-prompt benchmark)")
    c.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    c.add_argument("--jobs", type=int, default=1, help="rows run at a time, the cores split between them")
    c.add_argument("--max-minutes", type=float, default=None, help="start no row after this long; the table says what is missing")
    c.add_argument("--report-only", action="store_true", help="write the table and plot from the rows there, run nothing")
    r = sub.add_parser("curve-row", help=argparse.SUPPRESS)
    r.add_argument("spec", type=Path)


def row_name(method: str, fraction: float, lr: float | None, steps: int) -> str:
    return f"{method}-{round(100 * fraction)}pct" + ("" if lr is None else f"-lr{lr:g}-{steps}steps")


def cuts(transformer, family: str, fraction: float, importance, protect_early: float) -> dict[str, list[int]]:
    """The removed blocks of each cut kind at ``fraction`` of the blocks (the ablation's baselines, HPP's plan)."""
    import numpy as np

    from hpedge.compress.plan import Budget, make_plan
    from hpedge.models import adapters

    refs = adapters.blocks(transformer)
    n = len(refs)
    k = max(1, round(fraction * n))
    cands = [i for i in range(n) if not (family == "sd3" and i == n - 1)]  # SD3's final block is context_pre_only
    norms = {r.index: float(sum(p.detach().abs().mean() for p in r.module.parameters())) for r in refs}
    even = sorted({int(round(x)) for x in np.linspace(1, n - 2, k)})
    return {"hp": make_plan(transformer, Budget(remove_fraction=fraction), importance, protect_early).remove,
            "last": cands[-k:], "even": even, "magnitude": sorted(sorted(cands, key=norms.get)[:k])}


def _machine() -> str:
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores"


# --------------------------------------------------------------------------------------------- one row (own process)
def curve_row(args: argparse.Namespace) -> None:
    """Distil (or only prune) one row and evaluate it; its JSON is written atomically beside the others."""
    from dataclasses import asdict

    import torch

    from hpedge.compress.distill import DistillSettings
    from hpedge.compress.pipeline import CompressOptions, compress
    from hpedge.compress.plan import Budget
    from hpedge.errors import HpedgeError
    from hpedge.zoo.evaluate import EvalSettings, evaluate
    from hpedge.io import atomic_file
    from hpedge.models import adapters
    from hpedge.models.loading import load_pipeline

    spec = json.loads(args.spec.read_text())
    torch.set_num_threads(spec["threads"])
    model = f"zoo:digits-{spec['family']}"
    _, _, pwp, sgd = METHODS[spec["method"]]
    es = EvalSettings(per_category=spec["per_category"])
    t = time.time()
    row = {**spec, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine(),
           "command": f"python benchmarks/run.py curve-row SPEC (from `{spec['command']}`)"}
    with tempfile.TemporaryDirectory(prefix="hpedge-curve-") as tmp:
        if pwp is None:  # pruned, not distilled
            pipe = load_pipeline(model)
            pipe.transformer, _ = adapters.prune(pipe.transformer, set(spec["cut"]))
            row.update(status="ok", distill_seconds=0.0, frozen_blocks_pwp=[], update_weights={})
            student = pipe
        else:
            out = Path(tmp) / "student"
            ds = DistillSettings(steps=spec["steps"], lr=spec["lr"], pwp=pwp, sgd=sgd, seed=0)
            budget = Budget(remove_blocks=",".join(map(str, spec["cut"])) + ",")
            try:
                rep = compress(model, out, CompressOptions(budget, spec["importance"] if sgd != "off" else None,
                                                           spec["protect_early"], ds, eval_per_category=0, grid_samples=0))
            except HpedgeError as e:  # e.g. PWP refusing a cut that would freeze every kept block
                row.update(status="refused", why=str(e))
                rep = None
            if rep is not None:
                row.update(status="ok", distill_seconds=rep["distill_seconds"], frozen_blocks_pwp=rep["frozen_blocks_pwp"],
                           update_weights=rep["update_weights"], final_loss=rep["losses"][-1] if rep["losses"] else None)
                student = load_pipeline(str(out))
        if row["status"] == "ok":
            row["kept_ratio"] = _kept_ratio(student.transformer, spec["params_before"])
            row["eval"] = asdict(evaluate(student, row["name"], es)[0])
    row["wall_seconds"] = round(time.time() - t, 1)
    dst = rows_dir(spec["family"]) / f"{spec['name']}.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(dst) as f:
        f.write_text(json.dumps(row, indent=1))


def _kept_ratio(transformer, before: int) -> float:
    return sum(p.numel() for p in transformer.parameters()) / before


# --------------------------------------------------------------------------------------------- the curve
def curve(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from hpedge.compress.analyze import AnalysisSettings, analyze
    from hpedge.compress.importance import load as load_importance
    from hpedge.zoo.evaluate import EvalSettings, evaluate
    from hpedge.io import atomic_file
    from hpedge.models.loading import load_pipeline, resolve

    model = f"zoo:digits-{args.family}"
    rd = rows_dir(args.family)
    rd.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", *sys.argv])
    t0 = time.time()
    if not args.report_only:
        pipe = load_pipeline(model)
        teacher_file, imp_file = rd.parent / "teacher.json", rd.parent / "importance.json"
        es = EvalSettings(per_category=args.per_category)
        if not teacher_file.exists():
            with atomic_file(teacher_file) as f:
                f.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine(),
                                         "command": command, "eval": asdict(evaluate(pipe, model, es)[0])}, indent=1))
        if not imp_file.exists():  # the contribution analysis hpedge compress runs, once for every HP row
            analyze(pipe, resolve(model).path, imp_file, AnalysisSettings())
        imp = load_importance(str(imp_file), family_hint=args.family)
        before = sum(p.numel() for p in pipe.transformer.parameters())
        plans = {f: cuts(pipe.transformer, args.family, f, imp, args.protect_early) for f in args.fractions}
        base = {"family": args.family, "steps": args.steps, "per_category": args.per_category, "importance": str(imp_file),
                "protect_early": args.protect_early, "params_before": before, "command": command,
                "threads": max(1, (os.cpu_count() or 1) // args.jobs), "jobs": args.jobs}

        def spec(method: str, f: float, lr: float | None) -> dict:
            return {**base, "method": method, "fraction": f, "lr": lr, "cut": plans[f][METHODS[method][1]],
                    "name": row_name(method, f, lr, args.steps)}

        distilled = [m for m in args.methods if m in DISTILLED]
        first = [spec(m, args.sweep_fraction, lr) for m in distilled for lr in args.lrs]
        first += [spec("no-distill", f, None) for f in args.fractions if "no-distill" in args.methods]
        _run_rows(first, args, t0)
        best = best_lrs(load_rows(args.family), args.sweep_fraction, args.steps)
        later = [spec(m, f, best[m]) for f in args.fractions if f != args.sweep_fraction for m in distilled if m in best]
        _run_rows(later, args, t0)
    report(args.family, sorted(args.fractions), args.sweep_fraction, args.steps, args.lrs, command)


def _run_rows(specs: list[dict], args: argparse.Namespace, t0: float) -> None:
    """Run the rows not yet on disk, ``args.jobs`` processes at a time."""
    todo = [s for s in specs if not (rows_dir(s["family"]) / f"{s['name']}.json").exists()]
    running: list[tuple[subprocess.Popen, Path, dict]] = []
    while todo or running:
        while todo and len(running) < args.jobs and (args.max_minutes is None or time.time() - t0 < 60 * args.max_minutes):
            s = todo.pop(0)
            f = Path(tempfile.mkstemp(suffix=".json")[1])
            f.write_text(json.dumps(s))
            env = {**os.environ, "OMP_NUM_THREADS": str(s["threads"])}
            print(f"curve: starting {s['name']} (cut {s['cut']})", flush=True)
            running.append((subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "run.py"), "curve-row", str(f)], env=env), f, s))
        if not running:
            print(f"curve: --max-minutes {args.max_minutes} reached; {len(todo)} row(s) not started", flush=True)
            return
        time.sleep(2)
        for p, f, s in list(running):
            if p.poll() is not None:
                running.remove((p, f, s))
                f.unlink()
                print(f"curve: {s['name']} {'done' if p.returncode == 0 else f'FAILED (exit {p.returncode})'}", flush=True)
