"""hpedge benchmarks: every number is measured side by side in one run and written with its command.

    python benchmarks/run.py memory            # real-scale memory table (planner) vs the paper
    python benchmarks/run.py latency           # ORT CPU step latency / peak memory, e2e latency
    python benchmarks/run.py quality           # eval of the zoo models and their compressed students
    python benchmarks/run.py ablation --family sd3 --steps 600 --lr 1e-3
                                               # HierarchicalPrune vs baselines and ablations
    python benchmarks/run.py ratio zoo:digits-sd3 out/digits-sd3-hp
                                               # student/teacher eval ratio, 500 prompts, paired interval
    python benchmarks/run.py weights zoo:digits-sd3 DIR/digits-sd3 --name NAME
                                               # relative weight distance per component (a retrain vs the committed)
    python benchmarks/run.py binding           # does the text conditioning say which digit is on which side?
    python benchmarks/run.py runtime-env PKG --python VENV/bin/python
                                               # two-digit prompts from a package in a runtime-only env
    python benchmarks/run.py text-paths        # FLUX: eval with the pooled vector or the T5 sequence emptied
    python benchmarks/run.py engines           # TensorRT-RTX engine bytes vs INT4 ONNX weight bytes (benchmarks/engines.py)
    python benchmarks/run.py gpu               # real-scale SD3.5-Large step in PyTorch on a CUDA GPU (bf16, pruned, INT4)
    python benchmarks/run.py retrain --family sd3 --work DIR [--device cuda]
                                               # replay the zoo model's recorded training commands

Results go to benchmarks/results/*.md (machine, date and the exact command at the top of each file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark modules beside this file

import engines as engines_benchmark  # noqa: E402
from common import RESULTS, ROOT, header, write  # noqa: E402,F401


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


# --------------------------------------------------------------------------------------------- latency
CHILD = r"""
import json, resource, statistics, sys, time
import numpy as np
sys.path.insert(0, {root!r})
from hpedge.backends import ort
sess = ort.session({path!r}, "cpu")
feeds = {{k: np.load({npz!r})[k] for k in np.load({npz!r}).files}}
ort.run(sess, feeds); ort.run(sess, feeds)
ts = []
for _ in range({reps}):
    t = time.perf_counter(); ort.run(sess, feeds); ts.append(time.perf_counter() - t)
status = {{l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(("VmHWM", "VmRSS"))}}
print(json.dumps({{"median_ms": 1000 * statistics.median(ts), "peak_rss_mb": status["VmHWM"] / 1024,  # this process only
                  "rss_mb": status["VmRSS"] / 1024}}))
"""


def time_onnx(path: Path, feeds: dict, reps: int = 7) -> dict:
    """Median step latency and peak RSS of one ONNX file, in a fresh process (so memory is its own)."""
    import numpy as np

    npz = Path(tempfile.mkstemp(suffix=".npz")[1])
    np.savez(npz, **feeds)
    code = CHILD.format(root=str(ROOT), path=str(path), npz=str(npz), reps=reps)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    npz.unlink()
    return json.loads(r.stdout.strip().splitlines()[-1])


def _midsize_pipeline(tmp: Path) -> Path:
    """A random-weight SD3 pipeline whose transformer is big enough that matrix multiplies dominate."""
    import torch
    from diffusers import SD3Transformer2DModel

    from hpedge.zoo.build import new_pipeline, new_vae
    from hpedge.zoo.train import write_marker

    torch.manual_seed(0)
    pipe = new_pipeline("sd3", new_vae())
    pipe.transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=12,
                                             attention_head_dim=64, num_attention_heads=8, joint_attention_dim=128,
                                             caption_projection_dim=512, pooled_projection_dim=128, pos_embed_max_size=32,
                                             qk_norm="rms_norm")
    folder = tmp / "midsize-sd3"
    pipe.save_pretrained(folder)
    write_marker(folder)
    (folder / "hpedge_zoo.json").write_text(json.dumps({"max_sequence_length": 16, "resolution": 64}))
    return folder


def latency(args: argparse.Namespace) -> None:
    import numpy as np

    from hpedge.export.cpu_int4 import convert as convert_cpu
    from hpedge.export.onnx_export import size_of
    from hpedge.export.pipeline import ExportOptions, export
    from hpedge.models import adapters
    from hpedge.models.loading import load_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="hpedge-bench-"))
    text = header("Transformer step latency and peak memory on ONNX Runtime CPU; end-to-end image latency")
    text += ("Each ONNX variant runs in its own process: 2 warm-up steps, then the median of 7 steps; peak memory is "
             "that process's VmHWM, session creation included (ru_maxrss would include the parent's peak, which Linux carries across exec); "
             "steady RSS = VmRSS after the timed steps. 'original' = unpruned model exported fp32; 'pruned' = 25 % of blocks removed "
             "(later blocks). INT4 = ModelOpt weights (file bytes); int4_cpu = the same INT4 weights, expanded by ONNX Runtime's "
             "constant folding to per-channel int8 when the session starts and run by its int8 GEMM (DynamicQuantizeMatMul); "
             "MatMulNBits = the same nibbles on ORT's 4-bit kernel. The TensorRT input (int4) computes in fp16 (what a strongly typed "
             "engine runs on the GPU); ORT's CPU provider has few fp16 kernels and wraps most of its nodes in casts, so its CPU "
             "latency here says nothing about TensorRT and is not a target. Its bytes are what the package ships for the GPU.\n\n")
    cases = []
    mid = _midsize_pipeline(tmp)
    cases.append(("mid-size SD3 (random weights, d=512, 12 blocks, 64 px)", mid, "6,7,8", "rtn"))
    for fam in args.families:
        src = ROOT / "hpedge" / "zoo" / "models" / f"digits-{fam}"
        cut = "8,9,10" if fam == "sd3" else "3,9,10"
        if src.exists():
            cases.append((f"digits-{fam}", src, cut, "awq_clip"))
    text += "| model | variant | transformer bytes | step median | peak RSS | steady RSS | latency vs original fp32 |\n|---|---|---|---|---|---|---|\n"
    for label, folder, cut, method in cases:
        pipe = load_pipeline(str(folder))
        pruned_t, _ = adapters.prune(pipe.transformer, set(int(x) for x in cut.split(",")))
        pruned_dir = tmp / f"{folder.name}-pruned"
        pruned = type(pipe)(**{**pipe.components, "transformer": pruned_t})
        pruned.save_pretrained(pruned_dir)
        shutil.copy(folder / "hpedge_zoo.json", pruned_dir / "hpedge_zoo.json")
        opts = dict(target="rtx4090", method=method, calibration_prompts=2, e2e_samples=1, allow_parity_failure=True,
                    fp32_reference=True)  # the fp32 rows time the fp32 export
        p_orig = tmp / f"{folder.name}-pkg-orig"
        p_pruned = tmp / f"{folder.name}-pkg-pruned"
        m0 = export(str(folder), p_orig, ExportOptions(**opts))
        m1 = export(str(pruned_dir), p_pruned, ExportOptions(**opts))
        spec = m0["components"]["transformer"]["io"]["inputs"]
        rng = np.random.default_rng(0)
        feeds = {}
        for k, v in spec.items():
            shape = [1] + v["opt"][1:] if k not in ("img_ids", "txt_ids") else v["opt"]
            feeds[k] = (rng.uniform(0.1, 0.9, size=shape) * (1000 if k == "timestep" and m0["generation"]["timestep_scale"] > 1 else 1)).astype(np.float32) if k == "timestep" else (np.zeros(shape, np.float32) if k.endswith("_ids") else rng.standard_normal(shape).astype(np.float32))
        base = None
        # what --cpu-kernel nbits would package: converted from the fp32-compute INT4 graph of --compute fp32
        p_nbits = tmp / f"{folder.name}-pkg-pruned-fp32"
        m2 = export(str(pruned_dir), p_nbits, ExportOptions(**opts, compute="fp32"))
        nbits = tmp / f"{folder.name}-nbits" / "model.onnx"
        convert_cpu(p_nbits / m2["components"]["transformer"]["variants"]["int4"], nbits, "nbits")
        # (row label, short label, ONNX file, bytes)
        variants = [("original fp32", "original fp32", p_orig / m0["components"]["transformer"]["variants"]["fp32"],
                     m0["components"]["transformer"]["bytes"]["fp32"])]
        variants += [(name, short, p_pruned / m1["components"]["transformer"]["variants"][var], m1["components"]["transformer"]["bytes"][var])
                     for name, short, var in (("pruned fp32", "pruned fp32", "fp32"),
                                              ("pruned INT4 (DequantizeLinear, fp16 compute: the TensorRT input)", "int4 (TensorRT input)", "int4"),
                                              ("pruned INT4, int4_cpu: int8 GEMM after load (CPU package)", "int4_cpu", "int4_cpu"))]
        variants.append(("pruned INT4 (DequantizeLinear, fp32 compute: --compute fp32)", "int4 --compute fp32",
                         p_nbits / m2["components"]["transformer"]["variants"]["int4"], m2["components"]["transformer"]["bytes"]["int4"]))
        variants.append(("pruned INT4, MatMulNBits (--cpu-kernel nbits)", "nbits", nbits, size_of(nbits)))
        for name, _, path, nbytes in variants:
            r = time_onnx(path, feeds)
            base = base or r["median_ms"]
            text += (f"| {label} | {name} | {nbytes / 1e6:.1f} MB | {r['median_ms']:.1f} ms | {r['peak_rss_mb']:.0f} MB | "
                     f"{r['rss_mb']:.0f} MB | {r['median_ms'] / base:.2f}x |\n")
        parity = m1["parity"]
        text += f"| {label} | parity of the pruned package | | | | | {'passed' if parity['passed'] else 'FAILED'} |\n"
        bf16 = 2 * sum(v.numel() for v in pipe.transformer.state_dict().values())  # the original's safetensors in bf16
        text += (f"| {label} | bytes vs the original transformer in bf16 ({bf16 / 1e6:.1f} MB, its state dict): "
                 + ", ".join(f"{short} {nbytes / bf16:.4f}x" for _, short, _, nbytes in variants[1:])
                 + " | | | | | |\n")
        if folder.name.startswith("digits"):
            e2e = _e2e(pipe, p_pruned, pruned_dir)
            text += (f"| {label} | end-to-end image, 16 steps, batch 1: diffusers pipeline (original, torch fp32) "
                     f"{e2e['pipeline_ms']:.0f} ms vs package (pruned int4_cpu, ORT) {e2e['package_ms']:.0f} ms | | | | | "
                     f"{e2e['package_ms'] / e2e['pipeline_ms']:.2f}x |\n")
    write("latency.md", text)
    shutil.rmtree(tmp, ignore_errors=True)


def _e2e(pipe, pkg_dir: Path, _pruned_dir: Path) -> dict:
    from hpedge.evaluation.evaluate import generate
    from hpedge.runtime import Package

    pkg = Package(pkg_dir, variant="int4_cpu", device="cpu")
    prompt = ["a 3 on the left and a 7 on the right"]
    generate(pipe, prompt, [0], 16, 1.0)
    pkg.generate(prompt, seed=0, steps=16)
    t = time.perf_counter()
    for i in range(3):
        generate(pipe, prompt, [i], 16, 1.0)
    a = (time.perf_counter() - t) / 3
    t = time.perf_counter()
    for i in range(3):
        pkg.generate(prompt, seed=i, steps=16)
    b = (time.perf_counter() - t) / 3
    return {"pipeline_ms": 1000 * a, "package_ms": 1000 * b}


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

    from hpedge.evaluation.evaluate import EvalSettings, evaluate
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
    from hpedge.evaluation.evaluate import EvalSettings, evaluate
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
    from hpedge.evaluation.evaluate import EvalSettings, evaluate, paired_ratio
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

    from hpedge.evaluation.evaluate import EvalSettings, evaluate, paired_ratio
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
    (RESULTS / f"ratio-{name}.json").write_text(json.dumps(out, indent=2))


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


# --------------------------------------------------------------------------------------------- binding
BINDING_PROMPTS = {"a": "a 3 on the left and a 7 on the right", "swap": "a 7 on the left and a 3 on the right",
                   "change": "a 3 on the left and a 3 on the right"}


def binding(_args: argparse.Namespace) -> None:
    """How far the text conditioning moves when two digits swap sides vs when one digit changes."""
    import torch

    from hpedge.models.denoise import MAX_SEQUENCE_LENGTH
    from hpedge.models.loading import load_pipeline

    def rel(u, v) -> float:
        return float((u - v).norm() / u.norm())

    text = header("Text conditioning: relative change (|e(x) - e(a)| / |e(a)|) when the digits swap sides or one changes")
    text += "".join(f"- {k}: \"{v}\"\n" for k, v in BINDING_PROMPTS.items())
    text += ("\nLast column: the T5 encoder's output for the same word at two places in prompt a (\"on\", tokens 2 and 8), "
             "relative difference; near 0 means the encoder does not mix context into its tokens, and FLUX, whose text tokens "
             "all share one position (txt_ids = 0), then sees the prompt as a bag of words.\n")
    text += ("\n| model | sequence: swap | sequence: change | pooled: swap | pooled: change | T5: \"on\" at 2 vs 8 |\n"
             "|---|---|---|---|---|---|\n")
    for fam in ("sd3", "flux"):
        pipe = load_pipeline(f"zoo:digits-{fam}")
        emb = {}
        with torch.no_grad():
            for k, x in BINDING_PROMPTS.items():
                if fam == "sd3":  # (prompt_embeds, negative, pooled, negative pooled)
                    e = pipe.encode_prompt(x, x, x, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH)
                    emb[k] = (e[0], e[2])
                else:  # (prompt_embeds = T5 sequence, pooled = CLIP, text_ids)
                    e = pipe.encode_prompt(x, prompt_2=x, max_sequence_length=MAX_SEQUENCE_LENGTH)
                    emb[k] = (e[0], e[1])
            t5, tok = (pipe.text_encoder_3, pipe.tokenizer_3) if fam == "sd3" else (pipe.text_encoder_2, pipe.tokenizer_2)
            ids = tok(BINDING_PROMPTS["a"], padding="max_length", max_length=MAX_SEQUENCE_LENGTH, return_tensors="pt").input_ids
            words = tok.convert_ids_to_tokens(ids[0].tolist())
            on = [i for i, w in enumerate(words) if w.lstrip("\u2581") == "on"]
            seq = t5(ids)[0][0].float()
        a = emb["a"]
        text += (f"| zoo:digits-{fam} | {rel(a[0], emb['swap'][0]):.3f} | {rel(a[0], emb['change'][0]):.3f} | "
                 f"{rel(a[1], emb['swap'][1]):.3f} | {rel(a[1], emb['change'][1]):.3f} | {rel(seq[on[0]], seq[on[1]]):.4f} |\n")
    write("binding.md", text)


def text_paths(args: argparse.Namespace) -> None:
    """Which text path carries what in a FLUX pipeline: the eval benchmark sampled with the pooled CLIP vector,
    or the T5 sequence, replaced by the empty prompt's (at inference only)."""
    from dataclasses import asdict

    import torch

    from hpedge.evaluation.evaluate import EvalSettings, evaluate
    from hpedge.models.denoise import MAX_SEQUENCE_LENGTH, family_of
    from hpedge.models.loading import load_pipeline

    es = EvalSettings(per_category=args.per_category)
    text = header(f"FLUX text paths: eval ({es.per_category * 5} prompts, guidance {es.guidance:g}) with one conditioning path "
                  "replaced by the empty prompt's")
    text += ("'empty pooled': the pooled CLIP vector of every prompt replaced by the empty prompt's, so the prompt reaches the "
             "model only through the T5 sequence; 'empty sequence': the T5 sequence replaced instead, so only the pooled vector "
             "carries it. Chance for `single` is about 0.1.\n\n" + SCORES_HEAD)
    out = {}
    for m in args.models:
        pipe = load_pipeline(m)
        if family_of(pipe) != "flux":
            raise SystemExit(f"{m}: text-paths probes FLUX pipelines (pooled CLIP vector + T5 sequence)")
        encode_prompt = pipe.encode_prompt
        with torch.no_grad():
            empty_seq, empty_pooled, _ = encode_prompt("", prompt_2="", max_sequence_length=MAX_SEQUENCE_LENGTH)
        for mode in ("normal", "empty pooled", "empty sequence"):
            def patched(prompt, prompt_2=None, _mode=mode, _enc=encode_prompt, _seq=empty_seq, _pooled=empty_pooled, **kw):
                seq, pooled, ids = _enc(prompt, prompt_2=prompt_2, **kw)
                if _mode == "empty pooled":
                    pooled = _pooled.expand_as(pooled).clone()
                elif _mode == "empty sequence":
                    seq = _seq.expand_as(seq).clone()
                return seq, pooled, ids

            pipe.encode_prompt = patched
            r = asdict(evaluate(pipe, f"{m} ({mode})", es)[0])
            out[r["model"]] = r
            text += scores_row(r["model"], r)
            print(r["model"], r["overall"], flush=True)
    write("text-paths.md", text)
    (RESULTS / "text-paths.json").write_text(json.dumps(out, indent=2))


# --------------------------------------------------------------------------------------------- runtime-env
RUNTIME_CHILD = """
import sys, json, numpy as np
from hpedge.runtime import Package
prompts = json.loads(sys.argv[2])
pkg = Package(sys.argv[1], variant=sys.argv[4], device="cpu")
canv = np.concatenate([pkg.generate([p], seed=i, steps=16) for i, p in enumerate(prompts)])
np.save(sys.argv[3], canv)
loaded = [m for m in ("torch", "diffusers", "transformers", "modelopt") if m in sys.modules]
print(json.dumps({"loaded": loaded, "variant": pkg.variant}))
"""


def runtime_env(args: argparse.Namespace) -> None:
    """Two-digit prompts generated by a package in an environment that has only the runtime installed,
    judged by the evaluator here: the fraction the evaluator scores correct."""
    import numpy as np

    from hpedge.evaluation.evaluate import JUDGE_WEIGHTS
    from hpedge.evaluation.image import save_grid
    from hpedge.evaluation.judge import Judge
    from hpedge.zoo.digits import eval_prompts

    py = args.python
    probe = subprocess.run([py, "-c", "import importlib.util as u; print([m for m in ('torch', 'diffusers', 'modelopt', 'onnx') "
                                      "if u.find_spec(m)])"], capture_output=True, text=True, check=True)
    prompts = [p for p in eval_prompts(args.n, seed=1234) if p.category == "two_digits"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "canvases.npy"
        r = subprocess.run([py, "-c", RUNTIME_CHILD, str(args.package), json.dumps([p.text for p in prompts]), str(out), args.variant],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr[-2000:])
        child = json.loads(r.stdout.strip().splitlines()[-1])
        canv = np.load(out)
        cli = Path(py).with_name("hpedge")  # the CLI of that environment, on the first prompt
        c = subprocess.run([str(cli), "generate", str(args.package), prompts[0].text, "-o", str(Path(tmp) / "cli.png")],
                           capture_output=True, text=True)
        cli_ok = c.returncode == 0 and (Path(tmp) / "cli.png").read_bytes()[:4] == b"\x89PNG"
    verdicts = Judge(str(JUDGE_WEIGHTS)).judge(canv, prompts)
    ok = [v.correct for v in verdicts]
    text = header("Two-digit prompts generated in a runtime-only environment, judged by the evaluator")
    text += (f"- package: `{args.package}` (variant {child['variant']}), 16 steps, seeds 0..{len(prompts) - 1}, the "
             f"{len(prompts)} two_digits prompts of the eval set (prompt seed 1234)\n"
             f"- environment: `{py}`; installed there of torch/diffusers/modelopt/onnx: {probe.stdout.strip()}; "
             f"loaded during generation of torch/diffusers/transformers/modelopt: {child['loaded']}\n"
             f"- `{cli.name} generate PKG \"{prompts[0].text}\" -o img.png` in that environment: "
             f"{'wrote a PNG' if cli_ok else 'FAILED: ' + (c.stderr.strip().splitlines() or ['?'])[-1]}\n\n")
    text += f"**{sum(ok)} of {len(ok)} correct ({np.mean(ok):.0%}).**\n\n| prompt | seed | verdict |\n|---|---|---|\n"
    for i, (p, v) in enumerate(zip(prompts, verdicts)):
        text += f"| {p.text} | {i} | {'correct' if v.correct else v.reason} |\n"
    save_grid(list(canv), [f"{p.text} ({'ok' if o else 'wrong'})" for p, o in zip(prompts, ok)], RESULTS / "runtime-env-two-digits.png", cols=5)
    write("runtime-env.md", text)


# --------------------------------------------------------------------------------------------- gpu
def _int4_weight_only(model, group: int = 128) -> tuple[int, float]:
    """Replace every nn.Linear whose input dim is a multiple of ``group`` by a weight-only INT4 module
    (symmetric round-to-nearest, one bf16 scale per ``group`` inputs, two nibbles per byte; the same
    layers and the same byte formula as the planner's INT4 column). Returns the number replaced and the
    relative error of the quantized weights, |W - W_q| / |W| over all of them."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Int4Linear(nn.Module):
        def __init__(self, lin: nn.Linear):
            super().__init__()
            out_f, in_f = lin.weight.shape
            w = lin.weight.detach().float().view(out_f, in_f // group, group)
            scale = (w.abs().amax(-1, keepdim=True) / 7).clamp(min=1e-12)
            q = (torch.clamp(torch.round(w / scale), -8, 7) + 8).to(torch.uint8).view(out_f, in_f)
            self.register_buffer("packed", q[:, 0::2] | (q[:, 1::2] << 4))
            self.squared_error = float(((q.view_as(w).float() - 8) * scale - w).square().sum())
            self.squared_norm = float(w.square().sum())
            self.register_buffer("scale", scale.squeeze(-1).to(torch.bfloat16))
            self.bias = lin.bias
            self.shape = (out_f, in_f)

        def forward(self, x):  # dequantize to bf16, then the ordinary GEMM (PyTorch has no fused INT4 GEMM for large M)
            out_f, in_f = self.shape
            q = torch.stack((self.packed & 15, self.packed >> 4), -1).view(out_f, in_f // group, group)
            w = ((q.to(torch.bfloat16) - 8) * self.scale[..., None]).view(out_f, in_f)
            return F.linear(x, w, self.bias)

    done = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % group == 0:
                done.append(Int4Linear(child))
                setattr(parent, name, done[-1])
    norm = sum(m.squared_norm for m in done)
    return len(done), (sum(m.squared_error for m in done) / norm) ** 0.5 if norm else 0.0


def gpu(args: argparse.Namespace) -> None:
    """Real-scale SD3 transformer step on a CUDA GPU in PyTorch, random weights: bf16 original vs pruned vs
    pruned with INT4 weight-only linears. Step latency (CUDA events, median) and peak allocated memory."""
    import statistics

    import torch

    from hpedge.compress.plan import Budget, make_plan, parse_blocks
    from hpedge.models import adapters
    from hpedge.models.architectures import ARCHITECTURES, build_on_meta

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/run.py gpu needs a CUDA GPU (torch.cuda.is_available() is False here)")
    family, _ = ARCHITECTURES[args.arch]
    if family != "sd3":
        raise SystemExit(f"benchmarks/run.py gpu times SD3-family architectures only; {args.arch} is {family}")
    cut = args.cut or {n: c for n, c, _ in REAL_SCALE_CUTS}[args.arch]
    dev = torch.device("cuda")
    torch.manual_seed(0)

    model = build_on_meta(args.arch)
    plan = make_plan(model, Budget(remove_blocks=cut))
    real_buffers = {n: b.clone() for n, b in model.named_buffers() if not b.is_meta}  # e.g. the sin-cos position table
    model = model.to(torch.bfloat16).to_empty(device=dev)  # (in place: no other reference may keep it alive)
    with torch.no_grad():
        for n, p in model.named_parameters():  # random weights, scaled so activations stay finite through every block
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif "norm" in n and n.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        for n, b in model.named_buffers():
            b.copy_(real_buffers[n]) if n in real_buffers else b.normal_(0.0, 0.02)
    model.eval()
    c = model.config
    side = args.resolution // 8  # VAE latent
    b = args.batch
    inputs = {"hidden_states": torch.randn(b, c.in_channels, side, side, device=dev, dtype=torch.bfloat16),
              "encoder_hidden_states": torch.randn(b, args.text_tokens, c.joint_attention_dim, device=dev, dtype=torch.bfloat16),
              "pooled_projections": torch.randn(b, c.pooled_projection_dim, device=dev, dtype=torch.bfloat16),
              "timestep": torch.full((b,), 500.0, device=dev)}

    def weight_bytes(m) -> int:  # parameters and the INT4 buffers; not the sin-cos position table (a constant)
        return sum(t.numel() * t.element_size() for n, t in (*m.named_parameters(), *m.named_buffers()) if not n.endswith(".pos_embed"))

    table = sum(t.numel() * t.element_size() for n, t in model.named_buffers() if n.endswith(".pos_embed"))

    def run(m) -> dict:
        with torch.inference_mode():
            for _ in range(3):
                m(**inputs, return_dict=False)
            torch.cuda.synchronize()
            if torch.cuda.memory_allocated() > weight_bytes(m) + table + 2**30:  # inputs are a few MB
                raise SystemExit("more than this model is allocated on the GPU (another reference keeps an earlier "
                                 "model alive): the peak column would be wrong")
            torch.cuda.reset_peak_memory_stats()
            ts = []
            for _ in range(args.reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                out = m(**inputs, return_dict=False)[0]
                e.record()
                torch.cuda.synchronize()
                ts.append(s.elapsed_time(e))
        if not torch.isfinite(out).all():
            raise SystemExit("non-finite transformer output: the random initialisation is off, no numbers written")
        return {"ms": statistics.median(ts), "spread": (min(ts), max(ts)), "weights": weight_bytes(m),
                "peak": torch.cuda.max_memory_allocated(), "out": out.float()}

    rows = [("original bf16", run(model))]
    pruned, _ = adapters.prune(model, parse_blocks(cut))
    del model
    torch.cuda.empty_cache()
    rows.append(("pruned bf16", run(pruned)))
    n_int4, w_err = _int4_weight_only(pruned)
    torch.cuda.empty_cache()
    rows.append(("pruned, INT4 weight-only", run(pruned)))
    ref = rows[1][1]["out"]
    err = float((rows[2][1]["out"] - ref).norm() / ref.norm())

    name = torch.cuda.get_device_name(dev)
    text = header(f"Real-scale {args.arch} transformer step on {name}, PyTorch, random weights")
    text += (f"- GPU: **{name}** ({torch.cuda.get_device_properties(dev).total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}\n"
             f"- one transformer step at {args.resolution}x{args.resolution} (latent {side}x{side}, {(side // 2) ** 2} image tokens), "
             f"{args.text_tokens} text tokens, batch {b} (a classifier-free-guidance pair); 3 warm-up steps, then the median "
             f"(min-max) of {args.reps} steps timed with CUDA events; peak = torch.cuda.max_memory_allocated during the timed steps "
             "(weights + activations)\n"
             f"- pruned: blocks {cut} removed ({plan.kept_ratio:.1%} of the parameters kept), as `hpedge compress` would cut it; "
             f"random weights (N(0, 1/fan_in)), so the numbers are speed and memory only, not quality\n"
             f"- INT4 weight-only: the {n_int4} linear layers whose input dim is a multiple of 128 hold 4-bit weights (symmetric "
             "round-to-nearest, one bf16 scale per 128 inputs; the planner's INT4 layers) and are dequantized to bf16 for the ordinary "
             "GEMM at every call. PyTorch has no fused INT4 GEMM for this many tokens, so this row shows the memory a weight-only "
             "INT4 transformer needs, not the speed of an INT4 engine (that is TensorRT's job; no TensorRT here). Weight relative "
             f"error {w_err:.3f}; transformer output vs the pruned bf16 output on the same inputs {err:.3f} (random weights, "
             "whose errors compound through the blocks unlike trained ones: a sanity check, not quality; the digits packages' "
             "parity in latency.md is the quality check).\n"
             f"- weights = parameters (and the INT4 weights and scales); the sin-cos position table ({table / 1e9:.2f} GB, a "
             "constant buffer) is in the peak but not in the weights column, as in the planner\n"
             f"- planner (`python benchmarks/run.py memory`): original bf16 {plan.bytes_bf16_before / 1e9:.2f} GB, pruned bf16 "
             f"{plan.bytes_bf16_after / 1e9:.2f} GB, pruned INT4 {plan.bytes_int4_after / 1e9:.2f} GB\n\n")
    text += "| variant | weights on the GPU | peak memory (step) | step latency | latency vs original | peak vs original |\n|---|---|---|---|---|---|\n"
    base = rows[0][1]
    for label, r in rows:
        text += (f"| {label} | {r['weights'] / 1e9:.2f} GB | {r['peak'] / 1e9:.2f} GB | {r['ms']:.1f} ms ({r['spread'][0]:.1f}-"
                 f"{r['spread'][1]:.1f}) | {r['ms'] / base['ms']:.2f}x | {r['peak'] / base['peak']:.2f}x |\n")
    write(args.results_name or f"gpu-{args.arch}.md", text)


# --------------------------------------------------------------------------------------------- retrain
ZOO = ROOT / "hpedge" / "zoo" / "models"  # the committed models and their train_record.json
# each family's pre-trained text encoders: (record key of their stage, the folder it writes); a pipeline stage names
# them (or one of them: the sd3 recipe takes text-sd3/text_encoder_3) with --t5-from or --text-from
PRETRAINED_TEXT = {"flux": ("flux-t5", "t5-flux"), "sd3": ("sd3-text", "text-sd3")}


def retrain(args: argparse.Namespace) -> None:
    """Replay the recorded training commands of a zoo model (train_record.json) into a work folder, starting
    from the committed VAE and pre-trained text encoders; score the result against the committed model with
    `run.py ratio`."""
    import shlex

    zoo = ZOO
    record = json.loads((zoo / "train_record.json").read_text())
    fam = args.family
    stage, folder = PRETRAINED_TEXT[fam]
    # A pre-trained, frozen text encoder is, like the VAE, an input taken from the committed files unless
    # --retrain-text: its stage is bit-reproducible on one kind of CPU only (benchmarks/results/experiment-t5-float64.md)
    if stage not in record:
        raise SystemExit(f"{zoo / 'train_record.json'}: no {stage} stage, so digits-{fam}'s pre-trained text encoders "
                         "cannot be replayed or copied")
    text = "retrained" if args.retrain_text else "committed"
    pretrain = [record[stage]["command"]] if text == "retrained" else []
    commands = [*pretrain, record[fam]["command"], *(r["command"] for r in record.get(f"{fam}-continued", []))]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    progress = work / f"retrain-{fam}.json"  # stages already replayed into this folder (a replay can be resumed)
    done = json.loads(progress.read_text()) if progress.exists() else {"stages": [], "text": text}
    was = done.get("text", done.get("t5"))  # "t5": the key of progress files written before sd3-text existed
    if was != text and done["stages"]:
        raise SystemExit(f"{work}: a replay with the {was} text encoders is under way there; resume it the same way "
                         f"({'with' if was == 'retrained' else 'without'} --retrain-text) or use another --work")
    if [x["recorded"] for x in done["stages"]] != commands[:len(done["stages"])]:
        raise SystemExit(f"{work}: the stages replayed there are not the recorded ones now in train_record.json (the "
                         "committed model changed); use another --work")
    if not (work / "vae").exists():
        shutil.copytree(zoo / "vae", work / "vae")
    if text == "committed" and not (work / folder).exists():
        shutil.copytree(zoo / folder, work / folder)
    log = done["stages"]
    t_start = time.time()
    for cmd in commands[len(log):]:
        if args.max_seconds and time.time() - t_start > args.max_seconds:
            print(f"stopping after {len(log)} of {len(commands)} stages (--max-seconds); run again to resume", flush=True)
            return
        argv = shlex.split(cmd)[3:]  # drop "python -m hpedge.zoo.train"
        if "--device" in argv:  # the recorded device (cuda for the GPU stages) gives way to this replay's --device
            i = argv.index("--device")
            del argv[i:i + 2]
        if "--init-from" in argv:
            argv[argv.index("--init-from") + 1] = str(work / f"digits-{fam}")
        for flag in ("--t5-from", "--text-from"):  # the recorded pre-trained encoders -> their copy (or replay) in work
            if flag in argv:
                parts = Path(argv[argv.index(flag) + 1]).parts
                if folder not in parts:
                    raise SystemExit(f"{cmd}: {flag} names no {folder} folder, the {stage} stage's output")
                argv[argv.index(flag) + 1] = str(work.joinpath(*parts[parts.index(folder):]))
        argv += ["--out", str(work), "--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
        t = time.time()
        print("$ python -m hpedge.zoo.train " + " ".join(argv), flush=True)
        subprocess.run([sys.executable, "-m", "hpedge.zoo.train", *argv], check=True, cwd=ROOT)
        log.append({"recorded": cmd, "replayed": " ".join(argv), "seconds": round(time.time() - t, 1), "device": args.device})
        progress.write_text(json.dumps({"stages": log, "text": text}, indent=2) + "\n")
    print(f"retrained digits-{fam} in {sum(x['seconds'] for x in log):.0f} s -> {work / f'digits-{fam}'}; score it with: "
          f"python benchmarks/run.py ratio zoo:digits-{fam} {work / f'digits-{fam}'} --name retrain-digits-{fam} --tolerance")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("memory")
    lat = sub.add_parser("latency")
    lat.add_argument("--families", nargs="*", default=["sd3", "flux"], help="digits models to include")
    q = sub.add_parser("quality")
    q.add_argument("models", nargs="*")
    q.add_argument("--out")
    b = sub.add_parser("blocks")
    b.add_argument("--family", choices=["sd3", "flux"], default="sd3")
    b.add_argument("--per-category", type=int, default=40)
    a = sub.add_parser("ablation")
    a.add_argument("--family", choices=["sd3", "flux"], default="sd3")
    a.add_argument("--steps", type=int, default=600)
    a.add_argument("--lr", type=float, default=3e-4, help="distillation learning rate, the same for every row")
    a.add_argument("--per-category", type=int, default=60)
    sub.add_parser("binding")
    tp = sub.add_parser("text-paths")
    tp.add_argument("models", nargs="*", default=["zoo:digits-flux"], help="FLUX pipeline folders or zoo names")
    tp.add_argument("--per-category", type=int, default=100)
    r = sub.add_parser("ratio")
    r.add_argument("teacher", help="pipeline folder or zoo:NAME")
    r.add_argument("student", help="pipeline folder")
    r.add_argument("--per-category", type=int, default=100, help="prompts per category (100 = the 500-prompt benchmark)")
    r.add_argument("--name", help="results file stem (default: the student folder's name)")
    r.add_argument("--tolerance", action="store_true",
                   help="the student is a retrain of the teacher: check each score against RETRAIN_TOLERANCE")
    w = sub.add_parser("weights")
    w.add_argument("a", help="pipeline folder or zoo:NAME (the reference)")
    w.add_argument("b", help="pipeline folder or zoo:NAME of the same architecture")
    w.add_argument("--name", required=True, help="results file stem: weights-NAME.md")
    e = sub.add_parser("runtime-env")
    e.add_argument("package", type=Path)
    e.add_argument("--python", required=True, help="python of an environment with only the runtime installed")
    e.add_argument("--n", type=int, default=20, help="two_digits prompts (the eval set's first N)")
    e.add_argument("--variant", default="int4_cpu")
    g = sub.add_parser("gpu")
    g.add_argument("--arch", default="sd3.5-large", help="an SD3-family architecture name (see hpedge info)")
    g.add_argument("--cut", help="blocks to remove (default: the memory table's cut for --arch)")
    g.add_argument("--resolution", type=int, default=1024)
    g.add_argument("--text-tokens", type=int, default=333, help="77 CLIP + 256 T5 tokens, as the SD3 pipeline")
    g.add_argument("--batch", type=int, default=2)
    g.add_argument("--reps", type=int, default=10)
    g.add_argument("--results-name", help="results file name (default gpu-ARCH.md)")
    engines_benchmark.add_parser(sub)
    t = sub.add_parser("retrain")
    t.add_argument("--family", choices=["sd3", "flux"], required=True)
    t.add_argument("--work", type=Path, required=True, help="folder for the retrained pipeline")
    t.add_argument("--retrain-text", "--retrain-t5", dest="retrain_text", action="store_true",
                   help="replay the text-encoder pre-training stage too (flux-t5, sd3-text; default: start from the "
                        "committed pre-trained encoders, as from the committed VAE; that stage's result depends on the "
                        "CPU kind)")
    t.add_argument("--device", default="cpu", help="torch device of the training stages (cuda on a GPU machine)")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--max-seconds", type=float, default=None, help="start no further stage after this long (resume later)")
    args = ap.parse_args()
    {"gpu": gpu, "retrain": retrain, "text-paths": text_paths, "memory": memory, "latency": latency, "quality": quality, "blocks": blocks, "ablation": ablation,
     "runtime-env": runtime_env, "ratio": ratio, "weights": weights, "binding": binding,
     "engines": engines_benchmark.engines}[args.cmd](args)


if __name__ == "__main__":
    main()
