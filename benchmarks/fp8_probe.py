"""``python benchmarks/run.py fp8-probe``: can hpedge's toolchain carry FP8 (E4M3) transformer graphs?

A stack of ``--layers`` square MatMuls at ``--width`` (fp16 compute, float32 input and output, as hpedge's graphs)
written with FP8 Q/DQ the way TensorRT's explicit quantization expects: each activation through a per-tensor
QuantizeLinear / DequantizeLinear pair to FLOAT8E4M3FN (scale = the calibration input's max |x| / 448), each weight
stored FLOAT8E4M3FN per output channel behind a DequantizeLinear. Measured, side by side with the dense fp16 and the
INT4 (RTN, block 128) graphs: ONNX Runtime on the CPU runs it and matches a numpy reference of the same fake
quantization; TensorRT-RTX builds an engine for each ``--targets`` profile (or refuses, said), with its bytes.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import header, write, write_json
from stack import E4M3_MAX, write_stack


def _e4m3(x: np.ndarray) -> np.ndarray:
    """Round to FLOAT8E4M3FN (saturating) and back to float32, as QuantizeLinear then DequantizeLinear do."""
    import ml_dtypes

    return np.clip(x, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _graphs(width: int, weights: list[np.ndarray], x_amax: list[float], folder: Path) -> dict[str, Path]:
    """dense fp16 and FP8 Q/DQ graphs of the stack; returns their paths."""
    return {"dense": write_stack(width, weights, folder / "dense" / "model.onnx"),
            "fp8": write_stack(width, weights, folder / "fp8" / "model.onnx", x_amax)}


def _reference(x: np.ndarray, weights: list[np.ndarray], x_amax: list[float]) -> np.ndarray:
    """numpy: the FP8 graph's computation (fp16 activations and scales, E4M3 values), in float32."""
    h = x.astype(np.float16).astype(np.float32)
    for i, w in enumerate(weights):
        xs = np.float32(np.float16(x_amax[i] / E4M3_MAX))
        a = _e4m3(h / xs) * xs
        ws = (np.abs(w).max(axis=0) / E4M3_MAX).astype(np.float16).astype(np.float32)
        wd = _e4m3(w / ws) * ws
        h = np.maximum(a @ wd, 0).astype(np.float16).astype(np.float32)
    return h


def fp8_probe(args: argparse.Namespace) -> None:
    import torch

    from hpedge.backends import engines as eng
    from hpedge.backends import ort
    from hpedge.backends.trt_api import BuildSettings
    from hpedge.export.onnx_io import size_of
    from hpedge.export.quantize import quantize_int4
    from hpedge.runtime.format import sha256
    from hpedge.targets.profiles import load_profile

    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(args.width, args.width, generator=gen) / args.width**0.5).numpy() for _ in range(args.layers)]
    x = torch.randn(1, args.tokens, args.width, generator=gen).numpy()
    amax, h = [], x.astype(np.float32)
    for w in weights:  # calibration: each layer's input max |x| on this input
        amax.append(float(np.abs(h).max()))
        h = np.maximum(h @ w, 0)
    tmp = Path(tempfile.mkdtemp(prefix="hpedge-fp8-"))
    rows: list[dict[str, Any]] = []
    try:
        paths = _graphs(args.width, weights, amax, tmp)
        quantize_int4(paths["dense"], tmp / "int4" / "model.onnx", [], "rtn", 128)
        paths["int4"] = tmp / "int4" / "model.onnx"
        ref = _reference(x, weights, amax)
        exact = x.astype(np.float32)
        for w in weights:
            exact = np.maximum(exact @ w, 0)
        for kind, path in paths.items():
            row: dict[str, Any] = {"graph": kind, "onnx_bytes": size_of(path)}
            try:
                y = ort.run(ort.session(path, "cpu"), {"x": x})[0]
                row["ort_cpu"] = "ran"
                row["vs_fp32_cosine"] = float((y.ravel() @ exact.ravel()) / (np.linalg.norm(y) * np.linalg.norm(exact)))
                if kind == "fp8":
                    row["vs_numpy_fake_quant_max_abs"] = float(np.abs(y - ref).max())
                    row["numpy_fake_quant_max_abs"] = float(np.abs(ref).max())
            except Exception as e:  # noqa: BLE001 - what ONNX Runtime says is the result
                row["ort_cpu"] = f"failed: {str(e).splitlines()[0][:160]}"
            for target in args.targets:
                prof = load_profile(target)
                shapes = {"x": ((1, 16, args.width), (1, args.tokens, args.width), (2, args.tokens, args.width))}
                s = BuildSettings(shapes, prof.engine.compute_capabilities, prof.builder_optimization_level,
                                  int(prof.workspace_gb * 2**30))
                t = time.time()
                try:
                    facts = eng.build_cached(eng.library(prof.engine.library), path, sha256(path),
                                             tmp / "engines" / f"{kind}-{target}.plan", s)
                    row[target] = {"engine_bytes": facts["engine_bytes"], "seconds": round(time.time() - t, 1)}
                except Exception as e:  # noqa: BLE001 - a refusal is a result
                    msg = str(e).splitlines()[0].replace(str(path), f"the {kind} graph")
                    row[target] = {"refused": msg.split("Error Code 1: ")[-1][:160]}
            rows.append(row)
            print(row, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = header("FP8 (E4M3) Q/DQ transformer-like graphs: ONNX Runtime CPU and TensorRT-RTX builds")
    text += (f"{args.layers} MatMul layers of {args.width} x {args.width}, fp16 compute, one input of {args.tokens} "
             "tokens; FP8: per-tensor activation scales from that input's max |x| / 448, per-output-channel weight "
             "scales. ORT: CPU provider; cosine against the float32 computation; FP8 also against a numpy reference of "
             "the same fake quantization. Engines: built on this host (no GPU), not run.\n\n")
    text += "| graph | ONNX bytes | ONNX Runtime CPU | cosine vs fp32 | vs numpy fake-quant (max abs) | " + " | ".join(
        args.targets) + " |\n|" + "---|" * (5 + len(args.targets)) + "\n"
    for r in rows:
        eng_cells = [f"{r[t]['engine_bytes'] / 1e6:.2f} MB" if "engine_bytes" in r[t] else f"refused: {r[t]['refused']}"
                     for t in args.targets]
        fq = (f"{r['vs_numpy_fake_quant_max_abs']:.2e} (of {r['numpy_fake_quant_max_abs']:.2f})"
              if "vs_numpy_fake_quant_max_abs" in r else "-")
        text += (f"| {r['graph']} | {r['onnx_bytes']} | {r['ort_cpu']} | {r.get('vs_fp32_cosine', float('nan')):.5f} | "
                 f"{fq} | " + " | ".join(eng_cells) + " |\n")
    write(f"{args.name}.md", text)
    write_json(f"{args.name}.json", {"rows": rows, "width": args.width, "layers": args.layers})


def add_parser(sub: Any) -> None:
    p = sub.add_parser("fp8-probe")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--targets", nargs="+", default=["rtx3060", "rtx4090", "rtx5090"])
    p.add_argument("--name", default="fp8-probe")
