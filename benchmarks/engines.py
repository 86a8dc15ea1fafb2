"""TensorRT-RTX engine bytes vs the INT4 ONNX's weight bytes, and what the rest of an engine is.

    python benchmarks/run.py engines [--cases midsize digits-sd3 digits-flux wide]

Each case is exported for rtx4090 (RTN INT4, the weight bytes do not depend on the INT4 method) and its three
engines are built for sm_89 with an empty engine cache, so build times are real builds. For every engine the
file is split into what it is made of: runs of printable text of at least 8 bytes (TensorRT-RTX AOT engines
carry the CUDA C++ source of their generated kernels, compiled just in time on the user's GPU) and the rest
(weights, kernel metadata); the zlib-compressed size is given as well.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path

from common import header, write, write_json
from latency import _midsize_pipeline, random_sd3_pipeline

CASES = ("midsize", "digits-sd3", "digits-flux", "wide")


def _wide_pipeline(tmp: Path) -> Path:
    """SD3.5 Medium's width (1536, 24 heads of 64) with 4 blocks and random weights: real-width matrices."""
    return random_sd3_pipeline(tmp, "wide-sd3", 4, 24)


def anatomy(engine: Path) -> dict[str, int]:
    blob = engine.read_bytes()
    text = sum(len(s) for s in re.findall(rb"[ -~\t\n]{8,}", blob))
    kernels = blob.count(b"__global__")
    return {"bytes": len(blob), "text_bytes": text, "other_bytes": len(blob) - text, "zlib_bytes": len(zlib.compress(blob, 6)),
            "global_kernels_in_source": kernels}


def engines(args: argparse.Namespace) -> None:

    from hpedge.export.export import ExportOptions, export
    from hpedge.models.loading import ZOO_DIR

    tmp = Path(tempfile.mkdtemp(prefix="hpedge-bench-engines-"))
    os.environ["HPEDGE_CACHE_DIR"] = str(tmp / "cache")  # every build is a real build
    text = header("TensorRT-RTX engines: engine bytes vs INT4 ONNX weight bytes (rtx4090 profile, sm_89)")
    text += (__doc__.split("\n\n", 2)[2] + "\n" +
             "| model | component | ONNX weight bytes | engine bytes | engine / weights | kernel source text in the engine | "
             "engine without the text | without text / weights | zlib of the engine | build |\n"
             "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for case in args.cases:
        if case == "midsize":
            src, label = str(_midsize_pipeline(tmp)), "mid-size SD3 (random, d=512, 12 blocks)"
        elif case == "wide":
            src, label = str(_wide_pipeline(tmp)), "wide SD3 (random, d=1536 as SD3.5 Medium, 4 blocks)"
        else:
            if not (ZOO_DIR / case).exists():
                continue
            src, label = f"zoo:{case}", case
        out = tmp / f"pkg-{case}"
        m = export(src, out, ExportOptions(target="rtx4090", method="rtn", calibration_prompts=2, e2e_samples=1,
                                           engine="require", allow_parity_failure=True))
        for name, c in m["engines"]["components"].items():
            a = anatomy(out / c["file"])
            w = c["onnx_weight_bytes"]
            rows.append({"model": label, "component": name, "onnx_weight_bytes": w, "build_seconds": c["build_seconds"], **a})
            text += (f"| {label} | {name} | {w / 1e6:.2f} MB | {a['bytes'] / 1e6:.2f} MB | {a['bytes'] / w:.2f}x | "
                     f"{a['text_bytes'] / 1e6:.2f} MB ({a['text_bytes'] / a['bytes']:.0%}) | {a['other_bytes'] / 1e6:.2f} MB | "
                     f"{a['other_bytes'] / w:.2f}x | {a['zlib_bytes'] / 1e6:.2f} MB | {c['build_seconds']:.1f} s |\n")
        shutil.rmtree(out, ignore_errors=True)
    write("engines.md", text)
    write_json("engines.json", {"rows": rows})
    shutil.rmtree(tmp, ignore_errors=True)


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("engines", help="TensorRT-RTX engine bytes vs INT4 ONNX weight bytes")
    e.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
