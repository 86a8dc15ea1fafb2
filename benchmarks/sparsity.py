"""``python benchmarks/run.py sparsity --family sd3``: the weight-sparsity study of arXiv 2411.15113 on a digits model.

One run, one teacher (``zoo:digits-FAMILY``), side by side: the text encoders alone, the transformer alone and both
pruned at each sparsity of the sweep, by magnitude (the study's method) and by Wanda, without distillation (each
row is :func:`hpedge.compress.sparsity.apply` on a copy of the teacher, as ``hpedge compress --steps 0`` writes it),
plus the study's best configuration (text 47.5 %, transformer 35 %) and 2:4 on the transformer. Then the distilled
rows (``hpedge compress --sparsity ... --steps STEPS``, masks held; ``--work DIR`` keeps their pipelines): the
study's configuration, 2:4 at 50 % on the transformer, and the study's configuration on top of HierarchicalPrune's
25 % block removal. Each row: the digits score of ``hpedge eval``'s
prompts as a share of the teacher's with its paired bootstrap 95 % interval, and the images' PSNR against the
teacher's (same prompts and seeds). Then the study's two claims, answered for this model: magnitude vs Wanda (paired
difference per point, interval), and where quality collapses (per component and method: the last sparsity keeping
95 % of the teacher's score, the first below 50 %). Rows are kept in ``results/sparsity-FAMILY/`` as they finish
(a rerun skips done rows); the table, JSON and PNG plot are written at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, header, image_psnr, write, write_json

COMPONENTS = {"text": "text=F", "transformer": "transformer=F", "both": "text=F,transformer=F"}
PAPER = "text=0.475,transformer=0.35"
METHODS = ("magnitude", "wanda")
SEMI = "transformer=0.5"  # 2:4 on the transformer
# distilled rows (``hpedge compress`` with ``--steps``): name -> (sparsity, pattern, blocks removed, the undistilled
# row it is paired with); magnitude, as the study's configuration
DISTILLED = {
    "paper+kd": (PAPER, "unstructured", None, ("paper", "magnitude", None)),
    "2:4+kd": (SEMI, "2:4", None, ("2:4", "magnitude", 0.5)),
    "hp25+paper+kd": (PAPER, "unstructured", 0.25, None),
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("sparsity")
    p.add_argument("--family", choices=["sd3", "flux"], required=True)
    p.add_argument("--fractions", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--components", nargs="+", default=list(COMPONENTS), choices=list(COMPONENTS))
    p.add_argument("--per-category", type=int, default=40, help="eval prompts per category (5 categories)")
    p.add_argument("--distilled", nargs="*", default=list(DISTILLED), choices=list(DISTILLED),
                   help="rows distilled by `hpedge compress` (needs --work)")
    p.add_argument("--steps", type=int, default=600, help="distillation steps of the distilled rows")
    p.add_argument("--lr", type=float, default=1e-3, help="distillation learning rate (the zoo students' 1e-3)")
    p.add_argument("--work", type=Path, help="folder for the distilled rows' pipelines")


def _row(teacher_pipe: Any, spec_text: str, method: str, pattern: str, prompts: list[str], gen: Any, settings: Any,
         teacher: Any, teacher_canv: np.ndarray) -> dict[str, Any]:
    from hpedge.compress.sparsity import SparsitySpec, apply
    from hpedge.models import adapters
    from hpedge.zoo.evaluate import evaluate, paired_ratio

    t0 = time.time()
    spec = SparsitySpec.parse(spec_text, pattern, method)
    spec.check()
    student, _ = adapters.prune(teacher_pipe.transformer, [])
    text, _, rep = apply(teacher_pipe, student, spec, prompts, gen)
    pipe = type(teacher_pipe)(**{**teacher_pipe.components, **text, "transformer": student})
    pipe.set_progress_bar_config(disable=True)
    res, canv, _ = evaluate(pipe, spec_text, settings)
    psnr = image_psnr(teacher_canv, canv)
    return {"spec": spec_text, "method": method, "pattern": pattern, "distilled": False, "achieved": {k: c["achieved"] for k, c in rep["components"].items()},
            "result": res.__dict__, "paired": paired_ratio(teacher, res), "psnr_min": min(psnr),
            "psnr_mean": float(np.mean(psnr)), "seconds": round(time.time() - t0, 1)}


def _distilled_row(model: str, family: str, name: str, out: Path, steps: int, lr: float, settings: Any, teacher: Any,
                   teacher_canv: np.ndarray) -> dict[str, Any]:
    """``hpedge compress MODEL -o OUT --sparsity SPEC [--remove-fraction 0.25] --steps STEPS --lr LR`` (no evaluation
    in the command), then the same evaluation as the undistilled rows. FLUX with blocks removed runs ``--no-pwp`` (PWP
    would freeze every kept block of digits-flux's cut, which hpedge refuses)."""
    from hpedge.compress.pipeline import CompressOptions, compress
    from hpedge.compress.plan import Budget
    from hpedge.compress.settings import DistillSettings
    from hpedge.compress.sparsity import SparsitySpec
    from hpedge.models.loading import load_pipeline, resolve
    from hpedge.zoo.evaluate import evaluate, paired_ratio

    spec_text, pattern, blocks, _ = DISTILLED[name]
    t0 = time.time()
    pwp = False if family == "flux" and blocks else None
    opts = CompressOptions(Budget(remove_fraction=blocks), distill=DistillSettings(steps=steps, lr=lr, pwp=pwp),
                           eval_per_category=0, grid_samples=0, overwrite=True,
                           sparsity=SparsitySpec.parse(spec_text, pattern, "magnitude"))
    report = compress(model, out, opts)
    pipe = load_pipeline(resolve(str(out)))
    pipe.set_progress_bar_config(disable=True)
    res, canv, _ = evaluate(pipe, name, settings)
    psnr = image_psnr(teacher_canv, canv)
    sp = report["sparsity"]
    return {"component": name, "fraction": None, "spec": spec_text, "method": "magnitude", "pattern": pattern,
            "distilled": True, "steps": steps, "lr": lr, "removed_blocks": report["removed_blocks"],
            "pwp": report["pwp"]["used"], "achieved": {k: c["achieved"] for k, c in sp["components"].items()},
            "zeros_held": sp["transformer_zeros_held"], "distill_seconds": report["distill_seconds"],
            "result": res.__dict__, "paired": paired_ratio(teacher, res), "psnr_min": min(psnr),
            "psnr_mean": float(np.mean(psnr)), "seconds": round(time.time() - t0, 1)}


def sparsity(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from hpedge.models.loading import load_pipeline, resolve
    from hpedge.models.sampling import defaults
    from hpedge.prompts import calibration
    from hpedge.zoo.evaluate import EvalSettings, evaluate, paired_difference
    from hpedge.zoo.evaluator import evaluator_for

    model = f"zoo:digits-{args.family}"
    ref = resolve(model)
    teacher_pipe = load_pipeline(ref)
    teacher_pipe.set_progress_bar_config(disable=True)
    gen = defaults(teacher_pipe, ref.path)
    prompts, _ = calibration(evaluator_for(ref.path), 8, seed=5)
    settings = EvalSettings(per_category=args.per_category)
    rows_dir = RESULTS / f"sparsity-{args.family}"
    rows_dir.mkdir(parents=True, exist_ok=True)
    t_file = rows_dir / "teacher.json"
    teacher_res, teacher_canv, _ = evaluate(teacher_pipe, model, settings)
    t_file.write_text(json.dumps(asdict(teacher_res)))
    teacher = asdict(teacher_res)
    fractions = [float(f) for f in args.fractions.split(",")]
    jobs = [(c, COMPONENTS[c].replace("F", str(f)), m, f, "unstructured") for c in args.components for m in args.methods
            for f in fractions]
    jobs += [("paper", PAPER, m, None, "unstructured") for m in args.methods]
    jobs += [("2:4", SEMI, m, 0.5, "2:4") for m in args.methods]
    rows = []
    for comp, spec_text, method, f, pattern in jobs:
        path = rows_dir / f"{comp.replace(':', '-')}-{method}-{f if comp != 'paper' else 'paper'}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
            continue
        row = {"component": comp, "fraction": f, **_row(teacher_pipe, spec_text, method, pattern, prompts, gen, settings,
                                                          teacher, teacher_canv)}
        path.write_text(json.dumps(row))
        rows.append(row)
        print(f"{comp} {method} {spec_text}: {row['paired']['ratio']:.3f} ({row['paired']['ci95'][0]:.3f}-"
              f"{row['paired']['ci95'][1]:.3f}), PSNR min {row['psnr_min']:.1f} dB, {row['seconds']} s", flush=True)
    if args.distilled and args.work is None:
        raise SystemExit("the distilled rows write pipelines: give --work DIR (or --distilled with no names)")
    for name in args.distilled:
        path = rows_dir / f"{name.replace(':', '-')}-{args.steps}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
            continue
        row = _distilled_row(model, args.family, name, args.work / f"{args.family}-{name.replace(':', '-')}", args.steps,
                             args.lr, settings, teacher, teacher_canv)
        path.write_text(json.dumps(row))
        rows.append(row)
        print(f"{name}: {row['paired']['ratio']:.3f} ({row['paired']['ci95'][0]:.3f}-{row['paired']['ci95'][1]:.3f}), "
              f"PSNR min {row['psnr_min']:.1f} dB, {row['seconds']} s", flush=True)
    _report(args, model, teacher, rows, paired_difference)


def _report(args: argparse.Namespace, model: str, teacher: dict[str, Any], rows: list[dict[str, Any]], paired_difference: Any
            ) -> None:
    by = {(r["component"], r["method"], r["fraction"]): r for r in rows}
    fractions = sorted({r["fraction"] for r in rows if r["fraction"] is not None})
    md = header(f"Weight sparsity of {model} (arXiv 2411.15113's study)")
    md += (f"Teacher score {teacher['overall']:.3f} on {teacher['samples']} prompts ({args.per_category} per category). Each "
           "cell: the pruned model's score as a share of the teacher's (paired bootstrap 95 % interval) / the images' "
           "minimum PSNR against the teacher's (dB). Pruned: the Linear layers of the transformer's blocks and of the text "
           "encoders' layers, each layer to the same share (magnitude: the smallest |W| of the layer; Wanda: the smallest "
           "|W| x input-column norm within each output row, calibrated on 8 prompts, block by block).\n\n")
    comps = [c for c in COMPONENTS if any(r["component"] == c for r in rows)]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    md += "## The sweep (no distillation)\n\n"
    md += "| sparsity | " + " | ".join(f"{c}, {m}" for c in comps for m in methods) + " |\n|---|" + "---|" * (len(comps) * len(methods)) + "\n"
    for f in fractions:
        cells = []
        for c in comps:
            for m in methods:
                r = by.get((c, m, f))
                cells.append("-" if r is None else f"{r['paired']['ratio']:.1%} ({r['paired']['ci95'][0]:.1%}-"
                             f"{r['paired']['ci95'][1]:.1%}) / {r['psnr_min']:.1f}")
        md += f"| {f:.0%} | " + " | ".join(cells) + " |\n"
    md += ("\n## The study's configuration, 2:4 and distillation\n\nThe study's configuration: text encoders 47.5 %, "
           "transformer 35 %. 2:4: two of every four weights along each output row of the transformer's layers (50 %). "
           "Distilled: `hpedge compress` with the sparsity, masks held, magnitude")
    kd = [r for r in rows if r.get("distilled")]
    if kd:
        md += f", {kd[0]['steps']} steps at lr {kd[0]['lr']:g}"
    md += (". The last column: the distilled row's paired difference to the same sparsity undistilled.\n\n"
           "| configuration | method | distilled | share of the teacher (95 % interval) | PSNR min / mean (dB) | "
           "distilled - undistilled |\n|---|---|---|---|---|---|\n")
    extra = [by[k] for k in (("paper", m, None) for m in methods) if k in by]
    extra += [by[k] for k in (("2:4", m, 0.5) for m in methods) if k in by]
    for r in extra + kd:
        p = r["paired"]
        diff = "-"
        pair = DISTILLED[r["component"]][3] if r.get("distilled") else None
        if pair and pair in by:
            d = paired_difference(teacher, r["result"], by[pair]["result"])
            diff = f"{d['difference']:+.1%} ({d['ci95'][0]:+.1%} to {d['ci95'][1]:+.1%})"
        label = {"paper": "text 47.5 % + transformer 35 %", "2:4": "transformer 2:4", "paper+kd": "text 47.5 % + transformer 35 %",
                 "2:4+kd": "transformer 2:4", "hp25+paper+kd": f"25 % of blocks removed {r.get('removed_blocks')} + text 47.5 % + "
                 "transformer 35 %"}[r["component"]]
        md += (f"| {label} | {r['method']} | {'yes' if r.get('distilled') else 'no'} | {p['ratio']:.1%} ({p['ci95'][0]:.1%}-"
               f"{p['ci95'][1]:.1%}) | {r['psnr_min']:.1f} / {r['psnr_mean']:.1f} | {diff} |\n")
    claims: dict[str, Any] = {"magnitude_vs_wanda": [], "collapse": {}}
    if set(METHODS) <= set(methods):
        md += "\n## Magnitude vs Wanda (paired difference of the shares of the teacher, 95 % interval)\n\n"
        md += "| component | sparsity | magnitude - Wanda | interval | leader |\n|---|---|---|---|---|\n"
        for c in comps:
            for f in fractions:
                a, b = by.get((c, "magnitude", f)), by.get((c, "wanda", f))
                if a and b:
                    d = paired_difference(teacher, a["result"], b["result"])
                    lead = ("magnitude" if d["ci95"][0] > 0 else "Wanda" if d["ci95"][1] < 0 else "tie (interval spans 0)")
                    claims["magnitude_vs_wanda"].append({"component": c, "fraction": f, **d, "leader": lead})
                    md += f"| {c} | {f:.0%} | {d['difference']:+.1%} | {d['ci95'][0]:+.1%} to {d['ci95'][1]:+.1%} | {lead} |\n"
    md += ("\n## Where quality collapses\n\n| component | method | last sparsity at >= 95 % (share, interval) | first sparsity "
           "below 50 % (share, interval) | sudden (<= 10 points apart) |\n|---|---|---|---|---|\n")
    for c in comps:
        for m in methods:
            pts = [(f, by[(c, m, f)]["paired"]["ratio"]) for f in fractions if (c, m, f) in by]
            keep = max((f for f, r in pts if r >= 0.95), default=None)
            fall = min((f for f, r in pts if r < 0.5), default=None)
            sudden = keep is not None and fall is not None and fall - keep <= 0.1 + 1e-9
            claims["collapse"][f"{c}/{m}"] = {"last_95": keep, "first_below_50": fall, "sudden": sudden}
            md += (f"| {c} | {m} | {_point(by, c, m, keep)} | {_point(by, c, m, fall)} | "
                   f"{'yes' if sudden else 'no' if fall is not None else '- (no collapse in the sweep)'} |\n")
    png = RESULTS / f"sparsity-{args.family}.png"
    _plot(rows, comps, methods, png, f"{model}: share of the teacher's score vs sparsity")
    md += f"\n![share of the teacher's score vs sparsity]({png.name})\n"
    write(f"sparsity-{args.family}.md", md)
    write_json(f"sparsity-{args.family}.json", {"teacher": {k: teacher[k] for k in ("overall", "samples")}, "rows": [
        {k: v for k, v in r.items() if k != "result"} | {"overall": r["result"]["overall"]} for r in rows], "claims": claims})


def _point(by: dict[Any, dict[str, Any]], c: str, m: str, f: float | None) -> str:
    if f is None:
        return "-"
    p = by[(c, m, f)]["paired"]
    return f"{f:.0%} ({p['ratio']:.1%}, {p['ci95'][0]:.1%}-{p['ci95'][1]:.1%})"


def _plot(rows: list[dict[str, Any]], comps: list[str], methods: list[str], path: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    from hpedge.io import atomic_file

    colors = {"text": "#1f77b4", "transformer": "#d62728", "both": "#2ca02c"}
    W, H, L, R, T, B = 900, 560, 70, 260, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img, "RGBA")
    sx = lambda x: L + x / 0.9 * (W - L - R)
    sy = lambda y: H - B - y / 1.1 * (H - T - B)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(10):
        d.text((sx(k / 10) - 10, H - B + 8), f"{k / 10:.0%}", fill="black")
    for k in range(12):
        d.text((L - 44, sy(k / 10) - 5), f"{k / 10:.0%}", fill="black")
    d.line([L, sy(1.0), W - R, sy(1.0)], fill="#999999")
    d.text((L, 12), title, fill="black")
    d.text(((L + W - R) // 2 - 60, H - 24), "sparsity of the pruned layers", fill="black")
    i = 0
    for c in comps:
        for m in methods:
            pts = sorted((r["fraction"], r["paired"]["ratio"], *r["paired"]["ci95"]) for r in rows
                         if r["component"] == c and r["method"] == m and r["fraction"] is not None)
            if not pts:
                continue
            col = colors[c]
            rgb = tuple(int(col[j:j + 2], 16) for j in (1, 3, 5))
            width = 3 if m == "magnitude" else 1
            d.line([(sx(x), sy(y)) for x, y, _, _ in pts], fill=col, width=width)
            for x, y, lo, hi in pts:
                d.line([sx(x), sy(lo), sx(x), sy(hi)], fill=(*rgb, 120))
                d.ellipse([sx(x) - 3, sy(y) - 3, sx(x) + 3, sy(y) + 3], fill=col)
            d.line([W - R + 12, T + 10 + 18 * i, W - R + 32, T + 10 + 18 * i], fill=col, width=width)
            d.text((W - R + 38, T + 4 + 18 * i), f"{c}, {m}", fill="black")
            i += 1
    for r in rows:  # 2:4 on the transformer: squares at 50 % (filled: pruned only; open: distilled)
        if r["component"] not in ("2:4", "2:4+kd") or r["method"] not in methods:
            continue
        x, y = sx(0.5) + (6 if r["method"] == "wanda" else 0), sy(r["paired"]["ratio"])
        kd = r["component"] == "2:4+kd"
        d.rectangle([x - 5, y - 5, x + 5, y + 5], outline=colors["transformer"], fill=None if kd else colors["transformer"])
    for j, (label, kd) in enumerate((("transformer 2:4", False), ("transformer 2:4, distilled", True))):
        y = T + 10 + 18 * (i + j)
        d.rectangle([W - R + 17, y - 5, W - R + 27, y + 5], outline=colors["transformer"],
                    fill=None if kd else colors["transformer"])
        d.text((W - R + 38, y - 6), label, fill="black")
    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")
