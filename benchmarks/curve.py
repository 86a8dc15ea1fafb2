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

from common import RESULTS, ROOT, header, write

# key: (label, cut, pwp, sgd); cut "hp" is HierarchicalPrune's plan from the contribution analysis; pwp None = not distilled
METHODS: dict[str, tuple[str, str, bool | None, str | None]] = {
    "hp": ("HierarchicalPrune (HPP + PWP + SGDistill)", "hp", True, "continuous"),
    "hp-no-pwp": ("HP without PWP", "hp", False, "continuous"),
    "hp-no-sgd": ("HP without SGDistill", "hp", True, "off"),
    "hp-binary-sgd": ("HP with the reference's binary SGDistill", "hp", True, "binary"),
    "last-n-kd": ("last-N removal + plain KD", "last", False, "off"),
    "even-kd": ("evenly spaced removal + plain KD", "even", False, "off"),
    "magnitude-kd": ("magnitude block ranking + plain KD", "magnitude", False, "off"),
    "no-distill": ("HP's cut, no distillation", "hp", None, None),
}
DISTILLED = [m for m, v in METHODS.items() if v[2] is not None]


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


def rows_dir(family: str) -> Path:
    return RESULTS / f"curve-{family}" / "rows"


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


def load_rows(family: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(rows_dir(family).glob("*.json"))]


def best_lrs(rows: list[dict], sweep_fraction: float, steps: int) -> dict[str, float]:
    """Each distilled method's learning rate with the highest overall score at the sweep fraction (ties: the lower);
    a method refused at every rate there (a refusal does not depend on the rate) keeps the lowest rate it was tried at."""
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r["fraction"] != sweep_fraction or r["lr"] is None or r["steps"] != steps:
            continue
        score = r["eval"]["overall"] if r["status"] == "ok" else -1.0
        if r["method"] not in best or (score, -r["lr"]) > (best[r["method"]][0], -best[r["method"]][1]):
            best[r["method"]] = (score, r["lr"])
    return {m: lr for m, (_, lr) in best.items()}


# --------------------------------------------------------------------------------------------- table and plot
def report(family: str, fractions: list[float], sweep_fraction: float, steps: int, lrs: list[float], command: str) -> None:
    from hpedge.compress.pwp import resolve_pwp
    from hpedge.compress.settings import DistillSettings
    from hpedge.zoo.evaluate import paired_difference, paired_ratio
    from hpedge.models import adapters
    from hpedge.models.loading import load_pipeline

    teacher_file = rows_dir(family).parent / "teacher.json"
    if not teacher_file.exists():
        raise SystemExit(f"{teacher_file} is missing: run the curve first")
    teacher = json.loads(teacher_file.read_text())["eval"]
    num_blocks = len(adapters.blocks(load_pipeline(f"zoo:digits-{family}").transformer))
    rows = [r for r in load_rows(family) if r.get("steps") == steps or r["lr"] is None]
    best = best_lrs(rows, sweep_fraction, steps)
    chosen = {f: [r for r in rows if r["fraction"] == f and (r["lr"] is None or best.get(r["method"]) == r["lr"])]
              for f in fractions}
    for rs in chosen.values():
        for r in rs:
            if r["status"] == "ok":
                r["paired"] = paired_ratio(teacher, r["eval"])
    n = teacher["samples"]
    text = header(f"Compression curve on zoo:digits-{family}: methods x share of blocks removed ({n} prompts)")
    dates = sorted(r["date"] for r in rows)
    jobs = "/".join(str(j) for j in sorted({r.get("jobs", 1) for r in rows})) or "1"
    text += (f"Rows were run one per process ({jobs} at a time, the cores split between them) "
             f"and kept in [curve-{family}/rows/](curve-{family}/rows/) with their own command, machine and date "
             f"({dates[0] if dates else '-'} to {dates[-1] if dates else '-'}); this file is written from them. "
             f"Every distilled row: {steps} steps, batch 16, seed 0, at its method's best learning rate of "
             f"{', '.join(f'{x:g}' for x in lrs)} at {sweep_fraction:.0%} removed (sweep below). HP's cut is `hpedge compress`'s "
             f"plan from one contribution analysis (protect-early {rows[0]['protect_early'] if rows else '-'}); baselines "
             "distil with plain output + feature KD (no PWP, no SGDistill). Teacher: overall "
             f"{teacher['overall']:.3f}, Frechet {teacher['frechet_distance']:.1f}.\n\n")
    text += f"![score vs kept parameters](curve-{family}.png)\n\n"
    for f in fractions:
        rs = sorted(chosen[f], key=lambda r: -(r["eval"]["overall"] if r["status"] == "ok" else -1))
        text += (f"## {f:.0%} of the blocks removed\n\n| method | removed blocks | kept params | lr | overall | vs teacher | "
                 "paired 95 % interval | Frechet | PWP froze | distill time |\n|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rs:
            label = METHODS[r["method"]][0]
            if r["status"] != "ok":
                text += f"| {label} | {r['cut']} | - | {format(r['lr'], 'g')} | refused | - | - | - | - | - |\n"
                continue
            ci = r["paired"]["ci95"]
            text += (f"| {label} | {r['cut']} | {r['kept_ratio']:.1%} | {'-' if r['lr'] is None else format(r['lr'], 'g')} | "
                     f"{r['eval']['overall']:.3f} | {r['paired']['ratio']:.1%} | {ci[0]:.1%}-{ci[1]:.1%} | "
                     f"{r['eval']['frechet_distance']:.1f} | {r['frozen_blocks_pwp'] or '-'} | {r['distill_seconds']:.0f} s |\n")
        missing = [METHODS[m][0] for m in METHODS if not any(r["method"] == m for r in rs)]
        if missing:
            text += f"\nNot run yet at {f:.0%}: {', '.join(missing)}.\n"
        text += "\n" + leader_line([r for r in rs if r["status"] == "ok"], teacher, paired_difference) + "\n\n"
        hp_cut = next((r["cut"] for r in rs if METHODS[r["method"]][1] == "hp"), None)
        if hp_cut is not None:
            on, why = resolve_pwp(hp_cut, num_blocks, DistillSettings())
            text += (f"`hpedge compress`'s default at this cut: {why}; that is the row "
                     f"\"{METHODS['hp' if on else 'hp-no-pwp'][0]}\".\n\n")
        for r in rs:
            if r["status"] != "ok":
                text += f"- {METHODS[r['method']][0]}: refused by `hpedge compress`: {r['why']}\n"
    text += sweep_table(rows, sweep_fraction, steps, lrs, best)
    write(f"curve-{family}.md", text)
    plot({f: chosen[f] for f in fractions}, RESULTS / f"curve-{family}.png", f"zoo:digits-{family}: share of the teacher's score")


def leader_line(rows: list[dict], teacher: dict, paired_difference) -> str:
    """Which method leads, by how much over the runner-up, and whether the paired interval of the lead excludes 0."""
    if len(rows) < 2:
        return "Leader: too few rows to compare."
    a, b = sorted(rows, key=lambda r: -r["eval"]["overall"])[:2]
    d = paired_difference(teacher, a["eval"], b["eval"])
    verdict = "outside the paired interval" if d["outside"] else "within the paired interval (not separated)"
    hp = next((r for r in rows if r["method"] == "hp"), None)
    tail = ""
    if hp is not None and hp is not a:
        dh = paired_difference(teacher, a["eval"], hp["eval"])
        tail = (f" HP trails it by {dh['difference']:.1%} of the teacher ({dh['ci95'][0]:.1%} to {dh['ci95'][1]:.1%}, "
                f"{'outside' if dh['outside'] else 'within'} the interval).")
    return (f"**Leader: {METHODS[a['method']][0]}**, {d['difference']:.1%} of the teacher ahead of "
            f"{METHODS[b['method']][0]} (paired 95 % interval {d['ci95'][0]:.1%} to {d['ci95'][1]:.1%}: {verdict}).{tail}")


def sweep_table(rows: list[dict], sweep_fraction: float, steps: int, lrs: list[float], best: dict[str, float]) -> str:
    cell = {(r["method"], r["lr"]): r for r in rows if r["fraction"] == sweep_fraction and r["lr"] is not None}
    text = (f"## Learning-rate sweep at {sweep_fraction:.0%} removed (overall score; **bold** = used above)\n\n| method | "
            + " | ".join(f"lr {x:g}" for x in lrs) + " |\n|---|" + "---|" * len(lrs) + "\n")
    for m in DISTILLED:
        vals = []
        for x in lrs:
            r = cell.get((m, x))
            v = "-" if r is None else ("refused" if r["status"] != "ok" else f"{r['eval']['overall']:.3f}")
            vals.append(f"**{v}**" if best.get(m) == x else v)
        text += f"| {METHODS[m][0]} | " + " | ".join(vals) + " |\n"
    return text + "\n"


def plot(by_fraction: dict[float, list[dict]], path: Path, title: str) -> None:
    """Score (share of the teacher) vs kept parameters, one line per method, the paired 95 % interval as a band."""
    from PIL import Image, ImageDraw

    from hpedge.io import atomic_file

    colors = ["#d62728", "#ff7f0e", "#bcbd22", "#e377c2", "#1f77b4", "#2ca02c", "#9467bd", "#7f7f7f"]
    pts: dict[str, list[tuple[float, float, float, float]]] = {}
    for rs in by_fraction.values():
        for r in rs:
            if r["status"] == "ok":
                pts.setdefault(r["method"], []).append((r["kept_ratio"], r["paired"]["ratio"], *r["paired"]["ci95"]))
    W, H, L, R, T, B = 900, 560, 70, 300, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img, "RGBA")
    allx = [p[0] for v in pts.values() for p in v] or [0.5, 1.0]
    ally = [y for v in pts.values() for p in v for y in p[1:]] or [0.5, 1.0]
    x0, x1 = min(allx) - 0.02, max(allx) + 0.02
    y0, y1 = min(0.9, min(ally) - 0.02), max(1.02, max(ally) + 0.01)
    sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    sy = lambda y: H - B - (y - y0) / (y1 - y0) * (H - T - B)  # noqa: E731
    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(6):
        y = y0 + k * (y1 - y0) / 5
        d.line([L - 4, sy(y), L, sy(y)], fill="black")
        d.text((L - 44, sy(y) - 5), f"{y:.0%}", fill="black")
        x = x0 + k * (x1 - x0) / 5
        d.line([sx(x), H - B, sx(x), H - B + 4], fill="black")
        d.text((sx(x) - 12, H - B + 8), f"{x:.0%}", fill="black")
    d.line([L, sy(1.0), W - R, sy(1.0)], fill="#999999")
    d.text((L, 12), title, fill="black")
    d.text(((L + W - R) // 2 - 60, H - 24), "kept transformer parameters", fill="black")
    for i, m in enumerate(m for m in METHODS if m in pts):
        c = colors[i % len(colors)]
        p = sorted(pts[m])
        rgb = tuple(int(c[j:j + 2], 16) for j in (1, 3, 5))
        if len(p) > 1:
            d.polygon([(sx(x), sy(hi)) for x, _, _, hi in p] + [(sx(x), sy(lo)) for x, _, lo, _ in reversed(p)], fill=(*rgb, 40))
            d.line([(sx(x), sy(y)) for x, y, _, _ in p], fill=c, width=2)
        for x, y, lo, hi in p:
            d.line([sx(x), sy(lo), sx(x), sy(hi)], fill=(*rgb, 120))
            d.ellipse([sx(x) - 3, sy(y) - 3, sx(x) + 3, sy(y) + 3], fill=c)
        d.line([W - R + 12, T + 10 + 18 * i, W - R + 32, T + 10 + 18 * i], fill=c, width=3)
        d.text((W - R + 38, T + 4 + 18 * i), METHODS[m][0], fill="black")
    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")
