"""``python benchmarks/run.py precision --family sd3|flux|midsize --work DIR``: every engine precision of a package side
by side, from one model, in one run (``hpedge export --precision``, issue "the best precision for each device").

The model: the digits student of ``--family`` (``hpedge compress zoo:digits-FAMILY --remove-fraction 0.25``, as the
vq benchmark makes it) or the mid-size random-weight SD3 (d=512, 12 blocks). For each precision (int4, int8, fp8,
nvfp4) the model is exported for a target whose GPU runs it (rtx4090; nvfp4: rtx5090), engines built with TensorRT-RTX.
Per precision: the transformer graph's bytes (the engine's input), the transformer engine's bytes for every profile
that runs it (rtx3060, rtx4090, rtx5090: the same graph built for each), the transformer against PyTorch on held-out
inputs and the end-to-end images against stock diffusers' fp32 pipeline (the package's parity.json), and where the
model is a digits student, the digits score of the package's variant (500 prompts, 16 steps) as a share of the
package's own fp32 graphs (same runtime, prompts and seeds; paired bootstrap 95 % interval). NVFP4 runs here only as
emulated (:func:`hpedge.export.float_quant.nvfp4_emulation`). ONNX Runtime CPU step time where the graph runs
(labelled: CPU time says nothing of GPU speed: FP8 / FP4 GEMMs run on tensor cores there, on the CPU as emulation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from common import RESULTS, header, write, write_json

PRECISIONS = ("int4", "int8", "fp8", "nvfp4")
TARGETS = {"int4": "rtx4090", "int8": "rtx4090", "fp8": "rtx4090", "nvfp4": "rtx5090"}
PROFILES = ("rtx3060", "rtx4090", "rtx5090")


def _model(args: argparse.Namespace) -> Path:
    from latency import random_sd3_pipeline
    from vq import _student

    if args.family == "midsize":
        out = args.work / "midsize-sd3"
        return out if (out / "model_index.json").exists() else random_sd3_pipeline(args.work, "midsize-sd3", 12, 8)
    return _student(args)


def _scored(pkg: Path, variant: str, name: str, stand_in: dict[str, Path] | None = None) -> dict[str, Any]:
    """The digits evaluation of one package variant (hpedge.zoo.evaluate's prompts, steps, guidance, judge)."""
    from dataclasses import asdict

    import numpy as np

    from hpedge.runtime.package import Package
    from hpedge.zoo.digits import eval_prompts
    from hpedge.zoo.evaluate import JUDGE_WEIGHTS, EvalSettings, score
    from hpedge.zoo.judge import Judge

    s = EvalSettings()
    prompts = eval_prompts(s.per_category, seed=s.prompt_seed)
    p = Package(pkg, variant=variant, device="cpu", stand_in=stand_in)
    canv = []
    for i in range(0, len(prompts), s.batch_size):
        img = p.generate([q.text for q in prompts[i : i + s.batch_size]], seed=s.seed * 100_000 + i, steps=s.steps,
                         guidance=s.guidance)
        canv.append(img if img.ndim == 3 else img[..., 0])
    return asdict(score(np.concatenate(canv).astype(np.float32), prompts, name, s, Judge(str(JUDGE_WEIGHTS))))


def _engines(pkg: Path, m: dict[str, Any], precision: str) -> dict[str, Any]:
    """The transformer graph of ``precision`` built for each profile whose GPU runs it (TensorRT-RTX, this host)."""
    from hpedge.export import build as engine_build
    from hpedge.targets.profiles import load_profile

    comp = engine_build.planned(m["engines"]["components"])["transformer"]
    out: dict[str, Any] = {}
    for t in PROFILES:
        prof = load_profile(t)
        if precision not in prof.transformer_precisions:
            out[t] = {"runs": False}
            continue
        facts = engine_build.build_all(pkg, {"transformer": comp}, prof, into=pkg / ".bench")["transformer"]
        out[t] = {"engine_bytes": facts["engine_bytes"], "build_seconds": facts["build_seconds"]}
    return out


def _checks(pkg: Path, precision: str) -> dict[str, Any]:
    checks = json.loads((pkg / "parity.json").read_text())["checks"]
    variant = "int4" if precision == "int4" else precision
    pick = {"quality": f"transformer {variant} (", "implementation": f"implementation: transformer {variant} vs",
            "weights": f"implementation: transformer {variant} weights",
            "e2e": f"end-to-end images: package ({'int4_cpu' if precision == 'int4' else precision})"}
    return {k: {"passed": c["passed"], **c["metrics"]} for k, prefix in pick.items()
            for c in checks if c["name"].startswith(prefix)}


def precision(args: argparse.Namespace) -> None:
    from latency import time_onnx

    from hpedge.export.export import ExportOptions, export
    from hpedge.export.precision_variant import runnable
    from hpedge.export.quantize import rows_of
    from hpedge.runtime.format import load_reference
    from hpedge.zoo.evaluate import paired_ratio

    args.work.mkdir(parents=True, exist_ok=True)
    model = _model(args)
    digits = args.family != "midsize"
    rows_dir = RESULTS / f"precision-{args.family}"
    rows_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {}
    for p in args.precisions:
        path = rows_dir / f"{p}.json"
        if path.exists():
            rows[p] = json.loads(path.read_text())
            continue
        pkg = args.work / f"{args.family}-pkg-{p}"
        t0 = time.time()
        m = export(str(model), pkg, ExportOptions(target=TARGETS[p], precision=p, engine="require", overwrite=True,
                                                  fp32_reference=digits and p == "int4", allow_parity_failure=True))
        row: dict[str, Any] = {"precision": p, "target": TARGETS[p], "export_seconds": round(time.time() - t0, 1),
                               "parity_passed": m["parity"]["passed"], "title": m["precision"]["title"],
                               "graph_bytes": m["components"]["transformer"]["bytes"][p],
                               "int4_cpu_bytes": m["components"]["transformer"]["bytes"]["int4_cpu"],
                               "checks": _checks(pkg, p), "engines": _engines(pkg, m, p),
                               "quantization": m["precision"].get("quantization", m["int4"])}
        feeds, _, _ = load_reference(pkg, m)
        cpu_variant = {"int4": "int4_cpu"}.get(p, p)
        if p == "nvfp4":
            row["ort_cpu"] = "not run: ONNX Runtime has no FP4 kernels (the emulation's time would say nothing)"
        else:
            row["ort_cpu"] = time_onnx(pkg / m["components"]["transformer"]["variants"][cpu_variant],
                                       rows_of(feeds[0])[0], reps=5)
            row["ort_cpu"]["variant"] = cpu_variant
        if digits:
            stand_in = {"nvfp4": runnable("nvfp4", pkg / m["precision"]["file"], args.work / f"{args.family}-emulated")
                        } if p == "nvfp4" else None
            row["digits"] = _scored(pkg, cpu_variant, f"{args.family} {cpu_variant}", stand_in)
            if p == "int4":
                row["fp32_digits"] = _scored(pkg, "fp32", f"{args.family} fp32 graphs")
        path.write_text(json.dumps(row))
        rows[p] = row
        print(f"{p}: {json.dumps(row['checks'])} ({row['export_seconds']} s)", flush=True)
    if digits and "int4" in rows:
        ref = rows["int4"]["fp32_digits"]
        for r in rows.values():
            r["vs_fp32"] = paired_ratio(ref, r["digits"])
    _report(args, rows)


def _report(args: argparse.Namespace, rows: dict[str, Any]) -> None:
    name = f"precision-{args.family}"
    what = (f"the digits-{args.family} student (25 % of blocks removed)" if args.family != "midsize"
            else "the mid-size random-weight SD3 (d=512, 12 blocks)")
    text = header(f"Engine precisions side by side on {what}")
    text += ("`hpedge export --precision P` (rtx4090; nvfp4: rtx5090), engines built here with TensorRT-RTX 1.7 (not run: "
             "no RTX GPU). Transformer: the precision's graph vs PyTorch fp32 on held-out inputs (quality gate; "
             "implementation: vs PyTorch with the same quantization, activations quantized / weights alone); end-to-end: "
             "the package's images vs stock diffusers' fp32 pipeline (min / mean PSNR). NVFP4 runs here as emulated (FP4 "
             "weights decoded from the graph, TensorRT's FP4 dynamic quantization as standard operators). ONNX Runtime "
             "CPU step: one batch row, median of 5, fresh process; on the CPU, FP8 is an emulation (Q/DQ around fp32 "
             "GEMMs) and INT4 runs as int4_cpu's int8 kernel: these times say nothing of GPU speed.\n\n")
    text += ("| precision | graph MB | engine MB rtx3060 / 4090 / 5090 | quality cos / PSNR dB | implementation dB "
             "(activations / weights) | end-to-end min / mean dB | digits score (share of fp32, 95 %) | ORT CPU step ms "
             "| parity |\n|---|---|---|---|---|---|---|---|---|\n")
    for p, r in rows.items():
        c = r["checks"]
        eng = " / ".join(f"{e['engine_bytes'] / 1e6:.1f}" if "engine_bytes" in e else "-" for e in r["engines"].values())
        q = c.get("quality", {})
        impl = c.get("implementation", {}).get("min_psnr_db")
        w = c.get("weights", {}).get("min_psnr_db")
        e2e = c.get("e2e", {})
        dg = "-"
        if "vs_fp32" in r:
            v = r["vs_fp32"]
            dg = (f"{r['digits']['overall']:.3f} ({v['ratio'] * 100:.1f} %, {v['ci95'][0] * 100:.1f}-"
                  f"{v['ci95'][1] * 100:.1f})")
        ort = r["ort_cpu"]
        step = f"{ort['median_ms']:.1f} ({ort['variant']})" if isinstance(ort, dict) else "-"
        text += (f"| {p} | {r['graph_bytes'] / 1e6:.2f} | {eng} | {q.get('min_cosine', float('nan')):.4f} / "
                 f"{q.get('min_psnr_db', float('nan')):.1f} | {'-' if impl is None else round(impl, 1)} / "
                 f"{'-' if w is None else round(w, 1)} | {e2e.get('min_psnr_db', float('nan')):.1f} / "
                 f"{e2e.get('mean_psnr_db', float('nan')):.1f} | {dg} | {step} | "
                 f"{'passed' if r['parity_passed'] else 'FAILED'} |\n")
    if "int4" in rows and "fp32_digits" in rows["int4"]:
        text += f"\nfp32 graphs of the same package: digits score {rows['int4']['fp32_digits']['overall']:.3f}.\n"
    write(f"{name}.md", text)
    write_json(f"{name}.json", {"family": args.family, "rows": rows})


def add_parser(sub: Any) -> None:
    p = sub.add_parser("precision")
    p.add_argument("--family", choices=["sd3", "flux", "midsize"], required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
