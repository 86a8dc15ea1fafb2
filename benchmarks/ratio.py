"""Benchmark: ratio (run through ``python benchmarks/run.py ratio``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import header, write, write_json
from quality import SCORES_HEAD, scores_row


# --------------------------------------------------------------------------------------------- ratio
# A retrain reproduces a committed model when each of its scores is within these of the committed one's (500 prompts:
# one overall score has about 0.015 of binomial noise, each 100-prompt category about 0.05).
RETRAIN_TOLERANCE = {"overall": 0.02, "category": 0.10, "frechet_distance": 10.0}


def tolerance_rows(committed: dict, retrained: dict) -> list[dict]:
    """Each score of a retrained model against the committed model's, with the stated tolerance and a verdict."""
    pairs = [("overall", committed["overall"], retrained["overall"], RETRAIN_TOLERANCE["overall"])]
    pairs += [(c, v, retrained["categories"][c], RETRAIN_TOLERANCE["category"]) for c, v in committed["categories"].items()]
    pairs.append(("frechet_distance", committed["frechet_distance"], retrained["frechet_distance"], RETRAIN_TOLERANCE["frechet_distance"]))
    # scores are rounded to 3 decimals, so compare the rounded difference (0.71 - 0.81 is not -0.1 in floats)
    return [{"score": n, "committed": a, "retrained": b, "difference": round(b - a, 3), "tolerance": tol,
             "within": abs(round(b - a, 3)) <= tol} for n, a, b, tol in pairs]


def phrasing_split(result: dict) -> dict[str, dict[str, list[int]]]:
    """Correct / total per category, apart for the seen and the held-out phrasings (from the per-prompt verdicts)."""
    from hpedge.zoo.digits import eval_prompts

    st = result["settings"]
    prompts = eval_prompts(st["per_category"], seed=st["prompt_seed"])
    if len(prompts) != len(result["correct"]):
        raise SystemExit(f"{result['model']}: {len(result['correct'])} verdicts for {len(prompts)} prompts")
    out: dict[str, dict[str, list[int]]] = {}
    for p, ok in zip(prompts, result["correct"]):
        cell = out.setdefault(p.category, {"seen": [0, 0], "heldout": [0, 0]})["heldout" if p.heldout else "seen"]
        cell[0] += ok
        cell[1] += 1
    return out


def ratio(args: argparse.Namespace) -> None:
    """Teacher and student evaluated side by side (same prompts, same seeds), ratio with a paired interval."""
    from dataclasses import asdict

    from hpedge.zoo.evaluate import EvalSettings, evaluate, paired_ratio
    from hpedge.models.loading import load_pipeline

    if args.tolerance and args.per_category != 100:  # fewer prompts score with more noise than the tolerance allows for
        raise SystemExit(f"--tolerance is stated for the 500-prompt benchmark (--per-category 100), not {args.per_category}")
    es = EvalSettings(per_category=args.per_category)
    res = {}
    for role, m in (("teacher", args.teacher), ("student", args.student)):
        t = time.time()
        res[role] = asdict(evaluate(load_pipeline(m), m, es)[0])
        print(f"{role} {m}: {res[role]['overall']:.3f} ({time.time() - t:.0f} s)", flush=True)
    pr = paired_ratio(res["teacher"], res["student"])
    name = args.name or Path(args.student).name
    text = header(f"Student vs teacher, {es.per_category * 5} prompts, guidance {es.guidance:g}, {es.steps} steps") + SCORES_HEAD
    for role in ("teacher", "student"):
        text += scores_row(f"{role}: {res[role]['model']}", res[role])
    text += (f"\nstudent / teacher = **{pr['ratio']:.1%}**, paired bootstrap 95 % interval {pr['ci95'][0]:.1%}-{pr['ci95'][1]:.1%} "
             f"({pr['n_boot']} resamples of the {pr['samples']} prompts); prompts only the teacher got right: "
             f"{pr['teacher_only_correct']}, only the student: {pr['student_only_correct']}.\n")
    split = {role: phrasing_split(res[role]) for role in ("teacher", "student")}
    text += "\nCorrect per category, seen / held-out phrasings (teacher -> student):\n\n| category | seen | held-out |\n|---|---|---|\n"
    text += "".join(f"| {c} | " + " | ".join(f"{t[k][0]}/{t[k][1]} -> {split['student'][c][k][0]}/{split['student'][c][k][1]}"
                                           for k in ("seen", "heldout")) + " |\n" for c, t in split["teacher"].items())
    out = {**res, "paired": pr, "phrasings": split}
    if args.tolerance:  # the student is a retrain of the teacher: is each score within the stated tolerance?
        rows = tolerance_rows(res["teacher"], res["student"])
        within = all(r["within"] for r in rows)
        text += ("\nRetrain against the committed model, tolerance `RETRAIN_TOLERANCE` in benchmarks/run.py: "
                 f"**{'within' if within else 'OUTSIDE'}**.\n\n| score | committed | retrained | difference | tolerance | within |\n"
                 "|---|---|---|---|---|---|\n")
        text += "".join(f"| {r['score']} | {r['committed']:.3f} | {r['retrained']:.3f} | {r['difference']:+.3f} | "
                        f"+-{r['tolerance']:g} | {'yes' if r['within'] else '**no**'} |\n" for r in rows)
        out["tolerance"] = {"within": within, "rows": rows}
        outside = ", ".join(f"{r['score']} {r['difference']:+.3f}" for r in rows if not r["within"])
        print(f"retrain OUTSIDE the stated tolerance: {outside}" if outside else "retrain within the stated tolerance", flush=True)
    write(f"ratio-{name}.md", text)
    write_json(f"ratio-{name}.json", out)


def weight_distance(a: Path, b: Path) -> list[dict]:
    """Per trained component of two pipeline folders: relative L2 distance ||b - a|| / ||a|| over all its tensors
    (computed in float64 from the stored safetensors), and how many tensors are bit-identical."""
    import numpy as np
    from safetensors.numpy import load_file

    rows = []
    for comp in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        files_a, files_b = sorted((a / comp).glob("*.safetensors")), sorted((b / comp).glob("*.safetensors"))
        if not files_a and not files_b:
            continue
        if [f.name for f in files_a] != [f.name for f in files_b]:
            raise SystemExit(f"{comp}: {a} and {b} do not hold the same weight files")
        ta = {k: v for f in files_a for k, v in load_file(f).items()}
        tb = {k: v for f in files_b for k, v in load_file(f).items()}
        if ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape for k in ta):
            raise SystemExit(f"{comp}: {a} and {b} are not the same architecture (tensor names or shapes differ)")
        diff = sum(float(((tb[k].astype(np.float64) - ta[k].astype(np.float64)) ** 2).sum()) for k in ta)
        norm = sum(float((ta[k].astype(np.float64) ** 2).sum()) for k in ta)
        rows.append({"component": comp, "tensors": len(ta), "identical": sum(np.array_equal(ta[k], tb[k]) for k in ta),
                     "relative_l2": (diff / norm) ** 0.5 if norm else float(diff > 0)})
    return rows


def weights(args: argparse.Namespace) -> None:
    """How far apart two pipelines of one architecture are in weight space (e.g. a retrain and the committed model)."""
    from hpedge.models.loading import resolve

    a, b = resolve(args.a).path, resolve(args.b).path
    rows = weight_distance(a, b)
    text = header(f"Weight distance, {args.a} -> {args.b}") + (
        "Relative L2 distance ||B - A|| / ||A|| over all tensors of each component (the stored weights, in float64).\n\n"
        "| component | tensors | bit-identical | relative L2 |\n|---|---|---|---|\n")
    text += "".join(f"| {r['component']} | {r['tensors']} | {r['identical']} | {r['relative_l2']:.4f} |\n" for r in rows)
    write(f"weights-{args.name}.md", text)
