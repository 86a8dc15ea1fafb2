"""Benchmark: quality, blocks, ablation (run through ``python benchmarks/run.py quality``)."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import header, write


# --------------------------------------------------------------------------------------------- quality
SCORES_HEAD = ("| model | overall | single | position | two_digits | counting | size | held-out phrasings | Frechet |\n"
               "|---|---|---|---|---|---|---|---|---|\n")


def scores_row(label: str, r: dict) -> str:
    """One row of SCORES_HEAD from an ``EvalResult`` as a dict."""
    c = r["categories"]
    return (f"| {label} | {r['overall']:.3f} | {c['single']:.2f} | {c['position']:.2f} | {c['two_digits']:.2f} | "
            f"{c['counting']:.2f} | {c['size']:.2f} | {r['heldout_phrasings']:.2f} | {r['frechet_distance']:.1f} |\n")


def quality(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from hpedge.zoo.evaluate import EvalSettings, evaluate
    from hpedge.models.loading import load_pipeline

    text = header("GenEval-style scores (500 prompts, guidance 1, 16 steps)") + SCORES_HEAD
    models = args.models or ["zoo:digits-sd3", "zoo:digits-flux"]
    for m in models:
        text += scores_row(m, asdict(evaluate(load_pipeline(m), m, EvalSettings(per_category=100))[0]))
    write(args.out or "quality.md", text)


# --------------------------------------------------------------------------------------------- blocks
def blocks(args: argparse.Namespace) -> None:
    """Remove each single block without retraining and evaluate: does every block matter?"""
    from hpedge.compress.analyze import ablated
    from hpedge.zoo.evaluate import EvalSettings, evaluate
    from hpedge.models import adapters
    from hpedge.models.loading import load_pipeline

    model = f"zoo:digits-{args.family}"
    pipe = load_pipeline(model)
    s = EvalSettings(per_category=args.per_category)
    base = evaluate(pipe, model, s)[0]
    text = header(f"Single-block removal without retraining: {model} ({5 * args.per_category} prompts, guidance 1)")
    text += f"Intact model: overall {base.overall:.3f}, Frechet {base.frechet_distance:.1f}.\n\n"
    text += "| removed block | kind | overall | change | Frechet | change | measurably worse |\n|---|---|---|---|---|---|---|\n"
    worse = 0
    refs = adapters.blocks(pipe.transformer)
    for r in refs:
        with ablated(pipe.transformer, r.index):
            res = evaluate(pipe, model, s)[0]
        hit = res.overall < base.overall - 0.02 or res.frechet_distance > base.frechet_distance * 1.1
        worse += hit
        text += (f"| {r.index} | {r.kind} | {res.overall:.3f} | {res.overall - base.overall:+.3f} | "
                 f"{res.frechet_distance:.1f} | {res.frechet_distance - base.frechet_distance:+.1f} | {'yes' if hit else 'no'} |\n")
    text += (f"\n{worse} of {len(refs)} blocks are measurably harmful to remove (score -0.02 or more, or Frechet "
             "distance +10 % or more).\n")
    write(f"blocks-{args.family}.md", text)


# --------------------------------------------------------------------------------------------- ablation
def ablation(args: argparse.Namespace) -> None:
    import numpy as np

    from dataclasses import asdict

    from hpedge.compress.distill import DistillSettings
    from hpedge.compress.pipeline import CompressOptions, compress, work_dir
    from hpedge.compress.plan import Budget
    from hpedge.errors import HpedgeError
    from hpedge.zoo.evaluate import EvalSettings, evaluate, paired_ratio
    from hpedge.models import adapters
    from hpedge.models.loading import load_pipeline

    model = f"zoo:digits-{args.family}"
    tmp = Path(tempfile.mkdtemp(prefix="hpedge-ablation-"))
    pipe = load_pipeline(model)
    n = len(adapters.blocks(pipe.transformer))
    k = max(1, round(0.25 * n))
    # HP run first: its analysis is reused by every variant that needs an importance table
    runs: list[tuple[str, dict]] = []
    refused: list[tuple[str, object, str]] = []  # (label, removed blocks, the refusal)

    es = EvalSettings(per_category=args.per_category)
    teacher = asdict(evaluate(pipe, model, es)[0])  # once: every variant starts from the same teacher

    def run(label: str, budget: Budget, importance: str | None, pwp: bool, sgd: str) -> dict | None:
        ds = DistillSettings(steps=args.steps, lr=args.lr, pwp=pwp, sgd=sgd, seed=0)
        out = tmp / label.replace(" ", "_").replace("/", "-")
        t = time.time()
        try:
            rep = compress(model, out, CompressOptions(budget, importance, 0.5, ds, eval_per_category=0))
        except HpedgeError as e:  # e.g. PWP refusing a cut that would freeze every kept block: a row that says so
            print(f"{label}: refused: {e}", flush=True)
            plan = work_dir(out) / "plan.json"
            refused.append((label, json.loads(plan.read_text())["remove"] if plan.exists() else budget.remove_blocks, str(e)))
            return None
        student = asdict(evaluate(load_pipeline(str(out)), str(out), es)[0])
        paired = paired_ratio(teacher, student)
        rep["scores"] = {"teacher": teacher, "student": student, "student_over_teacher": paired["ratio"], "paired": paired}
        rep["wall"] = time.time() - t
        runs.append((label, rep))
        print(f"{label}: {student['overall']:.3f} ({rep['scores']['student_over_teacher']:.1%} of the teacher)", flush=True)
        return rep

    hp_label = "HierarchicalPrune (HPP + PWP + SGDistill)"
    hp_out = tmp / hp_label.replace(" ", "_").replace("/", "-")
    imp_path = tmp / "importance.json"
    hp = run(hp_label, Budget(remove_fraction=0.25), None, True, "continuous")
    if hp is not None:
        shutil.copy(hp_out / "hpedge_importance.json", imp_path)
        removed = hp["removed_blocks"]
    else:  # refused after its analysis and plan (kept in its work folder): the variants still use them
        shutil.copy(work_dir(hp_out) / "importance.json", imp_path)
        removed = json.loads((work_dir(hp_out) / "plan.json").read_text())["remove"]
    cut = ",".join(map(str, removed)) + ","
    run("HP without PWP", Budget(remove_blocks=cut), str(imp_path), False, "continuous")
    run("HP without SGDistill", Budget(remove_blocks=cut), str(imp_path), True, "off")
    run("HP with the reference's binary SGDistill", Budget(remove_blocks=cut), str(imp_path), True, "binary")
    last = [i for i in range(n) if not (args.family == "sd3" and i == n - 1)][-k:]
    run("naive last-N removal", Budget(remove_blocks=",".join(map(str, last)) + ","), None, False, "off")
    even = sorted({int(round(x)) for x in np.linspace(1, n - 2, k)})
    run("evenly spaced removal", Budget(remove_blocks=",".join(map(str, even)) + ","), None, False, "off")
    norms = {r.index: float(sum(p.detach().abs().mean() for p in r.module.parameters())) for r in adapters.blocks(pipe.transformer)}
    cands = [i for i in range(n) if not (args.family == "sd3" and i == n - 1)]
    mag = sorted(sorted(cands, key=norms.get)[:k])
    run("magnitude-based block ranking", Budget(remove_blocks=",".join(map(str, mag)) + ","), None, False, "off")
    text = header(f"HierarchicalPrune vs baselines on {model} ({k} of {n} blocks removed, {args.steps} distillation steps at lr {args.lr:g} each)")
    text += (f"Teacher: overall {teacher['overall']:.3f}, Frechet {teacher['frechet_distance']:.1f} "
             f"({args.per_category * 5} prompts per evaluation). Baselines use plain output+feature KD (no PWP, no SGDistill).\n\n")
    text += ("| method | removed blocks | kept params | overall | vs teacher | paired 95 % interval | two_digits | Frechet | distill time |\n"
             "|---|---|---|---|---|---|---|---|---|\n")
    for label, rep in runs:
        s = rep["scores"]["student"]
        ci = rep["scores"]["paired"]["ci95"]
        text += (f"| {label} | {rep['removed_blocks']} | {rep['params']['kept_ratio']:.1%} | {s['overall']:.3f} | "
                 f"{rep['scores']['student_over_teacher']:.1%} | {ci[0]:.1%}-{ci[1]:.1%} | {s['categories']['two_digits']:.2f} | "
                 f"{s['frechet_distance']:.1f} | "
                 f"{rep['distill_seconds']:.0f} s |\n")
    for label, cut_of_row, _ in refused:
        text += f"| {label} | {cut_of_row} | - | refused | - | - | - | - | - |\n"
    if refused:
        text += "\n" + "".join(f"- {label}: refused by `hpedge compress`: {why}\n" for label, _, why in refused)
    write(f"ablation-{args.family}.md", text)
