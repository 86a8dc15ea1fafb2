"""``python benchmarks/run.py quant-method``: AWQ-clip (hpedge's streamed pass, the default), ModelOpt's own
awq_clip and RTN side by side in one run, to decide ``hpedge export``'s default ``--method``.

Each model is exported twice with the same target, calibration prompts and settings, ``--method`` alone differing
(engines skipped: the INT4 weights are what differ; ``--fp32-reference`` so the package also carries the exact
graphs). From each package's ``parity.json``: the INT4 transformer (the TensorRT input, and int4_cpu) against
PyTorch on held-out inputs (cosine, PSNR) and the end-to-end images of the package against stock diffusers' fp32
pipeline (same prompts, noise, steps). For digits models, the digits score on the 500 evaluation prompts of each
package's int4_cpu variant and of its fp32 graphs (the same runtime, prompts and seeds), with paired bootstrap 95 %
intervals: each INT4 method as a share of the fp32 score, AWQ's lead over RTN, and hpedge's AWQ-clip against
ModelOpt's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import header, write, write_json
from latency import _midsize_pipeline

METHODS = ("awq_clip", "awq_clip_modelopt", "rtn")
INT4_CHECKS = {"int4": "transformer int4 ", "int4_cpu": "transformer int4_cpu ", "e2e": "end-to-end images"}


def _checks(package: Path) -> dict[str, dict[str, float]]:
    parity = json.loads((package / "parity.json").read_text())
    out = {}
    for key, prefix in INT4_CHECKS.items():
        c = next((c for c in parity["checks"] if c["name"].startswith(prefix)), None)
        if c is not None:
            out[key] = c["metrics"]
    return out


def _digits_result(package: Path, variant: str, name: str) -> dict[str, Any]:
    """The digits evaluation of one package variant (``hpedge.zoo.evaluate``'s prompts, steps, guidance, judge)."""
    from dataclasses import asdict

    import numpy as np

    from hpedge.runtime import Package
    from hpedge.zoo.digits import eval_prompts
    from hpedge.zoo.evaluate import JUDGE_WEIGHTS, EvalSettings, score
    from hpedge.zoo.judge import Judge

    s = EvalSettings()
    prompts = eval_prompts(s.per_category, seed=s.prompt_seed)
    pkg = Package(package, variant=variant, device="cpu")
    canv = []
    for i in range(0, len(prompts), s.batch_size):
        batch = [p.text for p in prompts[i : i + s.batch_size]]
        img = pkg.generate(batch, seed=s.seed * 100_000 + i, steps=s.steps, guidance=s.guidance)
        canv.append(img if img.ndim == 3 else img[..., 0])
    return asdict(score(np.concatenate(canv).astype(np.float32), prompts, name, s, Judge(str(JUDGE_WEIGHTS))))


def quant_method(args: argparse.Namespace) -> None:
    from hpedge.export.export import ExportOptions, export
    from hpedge.models.loading import resolve
    from hpedge.models.sampling import zoo_marker
    from hpedge.zoo.evaluate import paired_difference, paired_ratio

    tmp = Path(tempfile.mkdtemp(prefix="hpedge-quant-"))
    models = [(m, m) for m in args.models]
    if args.midsize:
        models.append(("mid-size SD3 (random weights, d=512, 12 blocks)", str(_midsize_pipeline(tmp))))
    rows: list[dict[str, Any]] = []
    try:
        for label, model in models:
            digits = zoo_marker(resolve(model).path).get("evaluator") == "digits"
            row: dict[str, Any] = {"model": label, "methods": {}}
            for method in args.methods:
                out = tmp / f"{len(rows)}-{method}"
                t = time.time()
                m = export(model, out, ExportOptions(target=args.target, engine="skip", method=method, fp32_reference=True,
                                                     overwrite=True))
                r = {"export_seconds": round(time.time() - t, 1), "int4_bytes": m["components"]["transformer"]["bytes"]["int4"],
                     "checks": _checks(out)}
                if digits:
                    r["digits"] = _digits_result(out, "int4_cpu", f"{label} {method} int4_cpu")
                    if "fp32_digits" not in row:
                        row["fp32_digits"] = _digits_result(out, "fp32", f"{label} fp32 graphs")
                row["methods"][method] = r
                print(f"{label} {method}: {json.dumps(r['checks'])} ({r['export_seconds']} s)", flush=True)
            if digits:
                ref = row["fp32_digits"]
                for method in args.methods:
                    row["methods"][method]["vs_fp32"] = paired_ratio(ref, row["methods"][method]["digits"])
                ms = row["methods"]
                if "awq_clip" in ms and "rtn" in ms:
                    row["awq_lead_over_rtn"] = paired_difference(ref, ms["awq_clip"]["digits"], ms["rtn"]["digits"])
                if "awq_clip" in ms and "awq_clip_modelopt" in ms:
                    row["awq_lead_over_modelopt"] = paired_difference(ref, ms["awq_clip"]["digits"],
                                                                      ms["awq_clip_modelopt"]["digits"])
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _report(rows, args)


def _report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    text = header("INT4 method: AWQ-clip (hpedge, streamed), ModelOpt's awq_clip and RTN, side by side")
    text += (f"Target {args.target}, engines skipped, every other export setting the default. Transformer checks: "
             "the package's INT4 graph (TensorRT input, fp16 compute) and int4_cpu against PyTorch on held-out inputs; "
             "end-to-end: the package's images (int4_cpu) against stock diffusers (fp32). Digits: 500 prompts, 16 steps, "
             "int4_cpu vs the package's own fp32 graphs, paired bootstrap 95 % intervals.\n\n")
    text += ("| model | method | int4 cosine | int4 PSNR dB | int4_cpu cosine | end-to-end min / mean PSNR dB | digits score "
             "(share of fp32, 95 % interval) | INT4 bytes | export s |\n|---|---|---|---|---|---|---|---|---|\n")
    for row in rows:
        for method, r in row["methods"].items():
            c = r["checks"]
            e2e = c.get("e2e", {})
            dg = (f"{r['digits']['overall']:.3f} ({r['vs_fp32']['ratio'] * 100:.1f} %, {r['vs_fp32']['ci95'][0] * 100:.1f}-"
                  f"{r['vs_fp32']['ci95'][1] * 100:.1f} %)" if "digits" in r else "")
            text += (f"| {row['model']} | {method} | {c['int4']['min_cosine']:.5f} | {c['int4']['min_psnr_db']:.2f} | "
                     f"{c['int4_cpu']['min_cosine']:.5f} | {e2e.get('min_psnr_db', float('nan')):.2f} / "
                     f"{e2e.get('mean_psnr_db', float('nan')):.2f} | {dg} | {r['int4_bytes'] / 1e6:.2f} MB | "
                     f"{r['export_seconds']:.0f} |\n")
        if "awq_lead_over_rtn" in row:
            d = row["awq_lead_over_rtn"]
            text += (f"| {row['model']} | fp32 graphs: {row['fp32_digits']['overall']:.3f}; AWQ's lead over RTN "
                     f"{d['difference'] * 100:+.1f} % of fp32 ({d['ci95'][0] * 100:+.1f} to {d['ci95'][1] * 100:+.1f} %)")
            if "awq_lead_over_modelopt" in row:
                d = row["awq_lead_over_modelopt"]
                text += (f"; hpedge's AWQ-clip over ModelOpt's {d['difference'] * 100:+.1f} % "
                         f"({d['ci95'][0] * 100:+.1f} to {d['ci95'][1] * 100:+.1f} %)")
            text += " | | | | | | | |\n"
    write(f"{args.name}.md", text)
    write_json(f"{args.name}.json", {"rows": rows})


def add_parser(sub: Any) -> None:
    p = sub.add_parser("quant-method")
    p.add_argument("models", nargs="*", default=[], help="pipeline folders or zoo names")
    p.add_argument("--midsize", action="store_true", help="also the mid-size random-weight SD3 pipeline")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="INT4 methods compared")
    p.add_argument("--target", default="rtx4090")
    p.add_argument("--name", default="quant-method")
