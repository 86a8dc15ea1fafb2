"""``python benchmarks/run.py gates``: the parity gates' margins on the five real-configuration fixtures.

Each fixture (tiny random weights, real configuration: :mod:`hpedge.testing`) is exported for rtx4090 at 64-128 px
with each INT4 method (engines skipped: they are built, not run, here). From each package's ``parity.json``, side by
side: the quantization-quality gates (INT4 transformer against the original PyTorch model; images against the
original pipeline's) and the implementation gates (each quantized graph against PyTorch running its own weights:
int4 through its float32 view, the shipped fp16 graph's distance beside it; int4_cpu with its int8 kernel's
activation quantization emulated; T5; the runtime's images against stock diffusers driving the same graphs). Then
each bug of :data:`hpedge.testing.INT4_GRAPH_BUGS` is put into the first method's INT4 graph (and the int4_cpu
converted from it) and both gates are run on the stored held-out inputs: a bug the loose gate passes and the tight
one fails is what the split is for.
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

from hpedge.backends import polygraphy_runner as pgy
from hpedge.export.cpu_int4 import convert
from hpedge.export.export import ExportOptions, export
from hpedge.export.quantize import rows_of
from hpedge.export.verify import dequantized_check, transformer_check
from hpedge.runtime.format import load_reference
from hpedge.targets.profiles import PROFILE_DIR, profile_from_dict
from hpedge.testing import INT4_GRAPH_BUGS, mutated_int4_graph, save_tiny_pipeline

FIXTURES = ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "flux.1-schnell", "flux.1-dev")
SIZE = 64


def _profile(root: Path) -> Path:
    p = json.loads((PROFILE_DIR / "rtx4090.json").read_text())
    p.update(name="test-rtx4090", resolution={"min": SIZE, "opt": SIZE, "max": 2 * SIZE}, batch={"min": 1, "opt": 1, "max": 2})
    path = root / "test-rtx4090.json"
    path.write_text(json.dumps(p))
    return path


def _metric(parity: dict[str, Any], prefix: str, key: str = "min_psnr_db") -> float | None:
    c = next((c for c in parity["checks"] if c["name"].startswith(prefix)), None)
    return None if c is None else c["metrics"].get(key)


def _row(parity: dict[str, Any]) -> dict[str, float | None]:
    return {"int4_quality": _metric(parity, "transformer int4 ("), "int4_cpu_quality": _metric(parity, "transformer int4_cpu ("),
            "e2e_quality": _metric(parity, "end-to-end images"),
            "int4_impl": _metric(parity, "implementation: transformer int4 "),
            "int4_shipped_fp16": _metric(parity, "implementation: transformer int4 ", "shipped_graph_min_psnr_db"),
            "int4_cpu_impl": _metric(parity, "implementation: transformer int4_cpu "),
            "t5_impl": _metric(parity, "implementation: T5"),
            "e2e_impl": _metric(parity, "implementation: package runtime")}


def _bugs(package: Path, work: Path) -> dict[str, dict[str, list[float]]]:
    """Each INT4-graph bug: [tight, loose] PSNR per variant on the package's stored held-out inputs."""
    manifest = json.loads((package / "manifest.json").read_text())
    lim = profile_from_dict(manifest["target"], "manifest target").parity
    kernel = manifest["int4"]["cpu_kernel"]
    feeds, ref, extra = load_reference(package, manifest)
    want = {v: [extra[f"{key}/{i}"] for i in range(len(feeds))]
            for v, key in (("int4", "dequantized"), ("int4_cpu", "dequantized_cpu"))}
    out: dict[str, dict[str, list[float]]] = {}
    for bug in INT4_GRAPH_BUGS:
        paths = {"int4": mutated_int4_graph(package, bug, work / "int4" / "model.onnx"),
                 "int4_cpu": work / "int4_cpu" / "model.onnx"}
        convert(paths["int4"], paths["int4_cpu"], kernel)
        out[bug] = {}
        for v, path in paths.items():
            results = pgy.run_onnxrt(path, feeds, v, split=rows_of)
            tight = dequantized_check(v, path, feeds, results, want[v], lim, kernel)
            loose = transformer_check("", v, results, ref, "out", lim)
            out[bug][v] = [round(tight.metrics["min_psnr_db"], 1), round(loose.metrics["min_psnr_db"], 1)]
        shutil.rmtree(paths["int4"].parent.parent)
    return out


def add_parser(sub: Any) -> None:
    p = sub.add_parser("gates")
    p.add_argument("--methods", nargs="+", default=["awq_clip", "rtn"], help="INT4 methods (the first gets the bugs)")
    p.add_argument("--fixtures", nargs="+", default=list(FIXTURES), choices=FIXTURES)


def gates(args: argparse.Namespace) -> None:
    methods, fixtures = list(args.methods), list(args.fixtures)
    rows: dict[str, dict[str, Any]] = {}
    bugs: dict[str, Any] = {}
    limits: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="hpedge-gates-") as d:
        root = Path(d)
        profile = _profile(root)
        lim = profile_from_dict(json.loads(profile.read_text()), str(profile)).parity
        limits = {"int4_quality": lim.int4_min_psnr_db, "e2e_quality": lim.e2e_min_psnr_db,
                  "graph_impl": lim.impl_graph_min_psnr_db, "int4_cpu_impl": lim.impl_int4_cpu_min_psnr_db,
                  "e2e_impl": lim.impl_min_psnr_db}
        for name in fixtures:
            src = save_tiny_pipeline(name, root / name)
            for method in methods:
                out = root / f"{name}-{method}"
                t0 = time.time()
                export(str(src), out, ExportOptions(target=str(profile), method=method, calibration_prompts=2,
                                                    e2e_samples=2, engine="skip"))
                rows[f"{name} {method}"] = {**_row(json.loads((out / "parity.json").read_text())),
                                            "seconds": round(time.time() - t0)}
                if method == methods[0]:
                    bugs[name] = _bugs(out, root / "bugs")
                shutil.rmtree(out)
            shutil.rmtree(src)
    write_json("gates.json", {"limits": limits, "packages": rows, "int4_graph_bugs": bugs})
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    md = header("Parity gates: quantization quality and implementation, five real-configuration fixtures")
    md += (f"Limits (rtx4090): INT4 quality {limits['int4_quality']} dB, end-to-end quality {limits['e2e_quality']} dB; "
           f"implementation: quantized graphs {limits['graph_impl']} dB, int4_cpu {limits['int4_cpu_impl']} dB, "
           f"runtime images {limits['e2e_impl']} dB. PSNR in dB, minimum over the held-out inputs.\n\n")
    md += ("| package | int4 vs original | int4_cpu vs original | images vs original | int4 (float32 view) vs own weights "
           "| shipped fp16 int4 vs own weights (not gated) | int4_cpu vs own weights + activations | T5 vs own weights "
           "| runtime images vs driven |\n|---|---|---|---|---|---|---|---|---|\n")
    for k, r in rows.items():
        md += (f"| {k} | {fmt(r['int4_quality'])} | {fmt(r['int4_cpu_quality'])} | {fmt(r['e2e_quality'])} | "
               f"{fmt(r['int4_impl'])} | {fmt(r['int4_shipped_fp16'])} | {fmt(r['int4_cpu_impl'])} | {fmt(r['t5_impl'])} | "
               f"{fmt(r['e2e_impl'])} |\n")
    md += (f"\nBugs put into the {methods[0]} package's INT4 graph (first quantized weight), int4_cpu converted from it: "
           "implementation gate / quality gate PSNR (dB); the implementation gate fails every one.\n\n"
           "| fixture | " + " | ".join(f"{b}: int4 | {b}: int4_cpu" for b in INT4_GRAPH_BUGS) + " |\n|---|"
           + "---|---|" * len(INT4_GRAPH_BUGS) + "\n")
    for name, r in bugs.items():
        md += f"| {name} | " + " | ".join(f"{r[b][v][0]} / {r[b][v][1]}" for b in INT4_GRAPH_BUGS
                                           for v in ("int4", "int4_cpu")) + " |\n"
    write("gates.md", md)
