"""The engine experiments' model: a stack of square MatMuls at a transformer's width, as hpedge's graphs compute
(float32 input and output, fp16 inside), with dense fp16 weights or FP8 (E4M3) Q/DQ in TensorRT's explicit form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

E4M3_MAX = 448.0


def write_stack(width: int, weights: list[Any], path: Path, fp8_amax: list[float] | None = None) -> Path:
    """x [batch, tokens, width] float32 -> Cast fp16 -> (MatMul W_i, Relu) per weight [in, out] -> Cast float32.

    ``fp8_amax``: each layer's calibration input max |x|: its input through a per-tensor QuantizeLinear /
    DequantizeLinear pair to FLOAT8E4M3FN (scale max |x| / 448), its weight stored FLOAT8E4M3FN per output channel
    behind a DequantizeLinear. Otherwise the weights are stored fp16. MatMuls are named ``layer{i}``."""
    import ml_dtypes
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from hpedge.export.onnx_io import save_onnx

    nodes = [helper.make_node("Cast", ["x"], ["h0"], to=TensorProto.FLOAT16)]
    inits = []
    for i, w in enumerate(weights):
        a = f"h{i}"
        if fp8_amax is not None:
            w = np.asarray(w, np.float32)
            xs = np.array(fp8_amax[i] / E4M3_MAX, np.float16)
            inits += [numpy_helper.from_array(xs, f"xs{i}"),
                      helper.make_tensor(f"xz{i}", TensorProto.FLOAT8E4M3FN, [], [0.0])]
            nodes += [helper.make_node("QuantizeLinear", [a, f"xs{i}", f"xz{i}"], [f"q{i}"]),
                      helper.make_node("DequantizeLinear", [f"q{i}", f"xs{i}"], [f"a{i}"])]
            a = f"a{i}"
            ws = (np.abs(w).max(axis=0) / E4M3_MAX).astype(np.float16)  # per output channel
            wq = (w / ws.astype(np.float32)).clip(-E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
            inits += [helper.make_tensor(f"wq{i}", TensorProto.FLOAT8E4M3FN, list(w.shape), wq.view(np.uint8).tobytes(),
                                         raw=True), numpy_helper.from_array(ws, f"ws{i}")]
            nodes.append(helper.make_node("DequantizeLinear", [f"wq{i}", f"ws{i}"], [f"w{i}"], axis=1))
        else:
            inits.append(numpy_helper.from_array(np.asarray(w).astype(np.float16), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [a, f"w{i}"], [f"m{i}"], name=f"layer{i}"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("Cast", [f"h{len(weights)}"], ["y"], to=TensorProto.FLOAT))
    g = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", width])], inits)
    save_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), path)
    onnx.checker.check_model(str(path))
    return path
