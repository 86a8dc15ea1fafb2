"""``python benchmarks/run.py vq-engine``: does TensorRT-RTX keep codebook weights compact in an engine?

A stack of ``--layers`` square MatMuls at a real transformer width (``--width``; 3072 is FLUX.1's), fp16 compute,
float32 input and output as hpedge's graphs, written three ways: dense fp16 weights, INT4 (hpedge's RTN, block 128,
DequantizeLinear: what the package's engines are built from) and codebook lookups (:mod:`hpedge.export.vq_graph`,
the package's ``vq`` variant) at each ``--formats``. The codes and codebooks are random (what the builder does with
the lookup does not depend on their values). Each graph's transformer-like engine is built for ``--target``'s
GPUs with the same shapes; the table gives ONNX and engine bytes, the engine over the dense engine and over its own
ONNX file, and the build time. An engine that folds the lookups holds dense fp16 weights: its bytes stay near the
dense engine's however small the codes are. Measured with TensorRT-RTX 1.7.1 (2026-12-05): the lookups are kept but
the codes' Cast is folded into int32 constants, so the engine holds 4 bytes per code, 4.0x the graph's codes, and at
every format is larger than the INT4 engine (which hpedge's packages therefore build from).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import header, write, write_json
from stack import write_stack


def vq_engine(args: argparse.Namespace) -> None:
    import numpy as np
    import onnx
    import torch

    from hpedge.backends import engines as eng
    from hpedge.backends.trt_api import BuildSettings
    from hpedge.compress.vq import VQSpec
    from hpedge.export.onnx_io import save_onnx, size_of
    from hpedge.export.quantize import quantize_int4
    from hpedge.export.vq_graph import rewrite
    from hpedge.models.codebooks import code_dtype, dequantize
    from hpedge.runtime.format import sha256
    from hpedge.targets.profiles import load_profile

    prof = load_profile(args.target)
    adapter = eng.library(prof.engine.library)
    tmp = Path(tempfile.mkdtemp(prefix="hpedge-vq-engine-"))
    shapes = {"x": ((1, 64, args.width), (2, args.tokens, args.width), (2, args.tokens, args.width))}
    settings = BuildSettings(shapes, prof.engine.compute_capabilities, prof.builder_optimization_level,
                             int(prof.workspace_gb * 2**30))
    rows: list[dict[str, Any]] = []

    def build(name: str, onnx_path: Path, **extra: Any) -> None:
        t = time.time()
        facts = eng.build_cached(adapter, onnx_path, sha256(onnx_path), tmp / "engines" / f"{name}.plan", settings)
        rows.append({"graph": name, "onnx_bytes": size_of(onnx_path), "engine_bytes": facts["engine_bytes"],
                     "build_seconds": round(time.time() - t, 1), "cache": facts["cache"], **extra})
        print(f"{name}: onnx {size_of(onnx_path) / 1e6:.1f} MB, engine {facts['engine_bytes'] / 1e6:.1f} MB "
              f"({rows[-1]['build_seconds']} s)", flush=True)

    try:
        gen = torch.Generator().manual_seed(0)
        w = [(torch.randn(args.width, args.width, generator=gen) / args.width**0.5).half().numpy()
             for _ in range(args.layers)]
        dense = tmp / "dense" / "model.onnx"
        write_stack(args.width, w, dense)
        build("dense fp16", dense, bits_per_weight=16.0)
        int4 = tmp / "int4" / "model.onnx"
        quantize_int4(dense, int4, [], "rtn", 128)
        build("INT4 (RTN, block 128)", int4, bits_per_weight=4 + 16 / 128)
        for fmt in args.formats:
            spec = VQSpec.parse(fmt)
            layers, weights = {}, []
            for i in range(args.layers):
                codes = torch.randint(0, 2**spec.bits, (args.width, args.width // spec.group, spec.codebooks),
                                      generator=gen).to(code_dtype(spec.bits))
                books = torch.randn(spec.codebooks, 2**spec.bits, spec.group, generator=gen) * 0.3
                scales = torch.rand(args.width, 1, generator=gen) / args.width**0.5 + 0.01
                layers[f"layer{i}"] = (codes, books, scales)
                # the graph holds [in, out]: the dequantized [out, in] weight transposed, as the exporter writes it
                weights.append(np.ascontiguousarray(dequantize(codes, books, scales).numpy().astype(np.float16).T))
            src = tmp / f"dense-{fmt}" / "model.onnx"
            write_stack(args.width, weights, src)
            model = onnx.load(str(src))
            rewrite(model, layers)
            out = tmp / f"vq-{fmt}" / "model.onnx"
            save_onnx(model, out)
            shutil.rmtree(src.parent)
            build(f"VQ {fmt} (codebook lookups)", out,
                  bits_per_weight=spec.codebooks * spec.bits / spec.group)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dense_engine = rows[0]["engine_bytes"]
    for r in rows:
        r["engine_vs_dense_engine"] = r["engine_bytes"] / dense_engine
        r["engine_vs_onnx"] = r["engine_bytes"] / r["onnx_bytes"]
    params = args.layers * args.width**2
    text = header("TensorRT-RTX engines from codebook-lookup graphs vs dense and INT4")
    text += (f"{args.layers} MatMul layers of {args.width} x {args.width} ({params / 1e6:.1f} M weights, fp16 compute, "
             f"dense fp16 weights {2 * params / 1e6:.1f} MB), one optimization profile x [1-2, 64-{args.tokens}, "
             f"{args.width}], built for {prof.name} ({prof.engine.library} {adapter.version()}, sm_"
             f"{', sm_'.join(c.replace('.', '') for c in prof.engine.compute_capabilities)}) on this host (no GPU).\n\n")
    text += ("| graph | bits per weight (codes) | ONNX MB | engine MB | engine / dense engine | engine / its ONNX | build s |\n"
             "|---|---|---|---|---|---|---|\n")
    for r in rows:
        text += (f"| {r['graph']} | {r['bits_per_weight']:.2f} | {r['onnx_bytes'] / 1e6:.1f} | {r['engine_bytes'] / 1e6:.1f} | "
                 f"{r['engine_vs_dense_engine']:.2f} | {r['engine_vs_onnx']:.2f} | {r['build_seconds']} |\n")
    write(f"{args.name}.md", text)
    write_json(f"{args.name}.json", {"width": args.width, "layers": args.layers, "target": prof.name, "rows": rows})


def add_parser(sub: Any) -> None:
    p = sub.add_parser("vq-engine")
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--formats", nargs="+", default=["2bit", "3bit", "4bit"])
    p.add_argument("--target", default="rtx4090")
    p.add_argument("--name", default="vq-engine")
