"""A CPU-friendly INT4 graph: ModelOpt's DequantizeLinear + MatMul pairs become ONNX Runtime's
``com.microsoft.MatMulNBits`` with the very same 4-bit weights and scales.

ONNX Runtime's CPU provider does not fuse blocked DequantizeLinear + MatMul, so that graph runs slower
than fp32; MatMulNBits is its 4-bit GEMM kernel. The conversion is exact: ModelOpt's weights are
signed int4 with zero point 0 (w * s); MatMulNBits stores unsigned nibbles with an implicit zero
point of 8 ((w + 8 - 8) * s). Only ONNX is needed here; the result is checked for parity like the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pack(w: np.ndarray, block: int) -> np.ndarray:
    """int4 weight [K, N] -> uint8 [N, K/block, block/2], low nibble first."""
    k, n = w.shape
    u = (w.astype(np.int16) + 8).astype(np.uint8).T.reshape(n, k // block, block)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def convert(int4_path: Path, out_path: Path, accuracy_level: int = 4) -> int:
    """Write the MatMulNBits version of ``int4_path``; returns the number of converted MatMuls.

    ``accuracy_level`` 4 lets ONNX Runtime compute with int8 activations (VNNI/AMX kernels); 0 keeps
    fp32 compute. Either way the package's parity check judges the result.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(int4_path), load_external_data=True)
    inits = {i.name: i for i in model.graph.initializer}
    dq_by_out: dict[str, Any] = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and len(node.input) >= 2:
            at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            zp_ok = len(node.input) < 3 or not node.input[2]
            if at.get("axis", 1) == 0 and at.get("block_size", 0) > 0 and zp_ok and len(inits[node.input[0]].dims) == 2:
                dq_by_out[node.output[0]] = (node, int(at["block_size"]))
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers[i] = consumers.get(i, 0) + 1
    new_nodes, converted, drop = [], 0, set()
    new_inits = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in dq_by_out and consumers.get(node.input[1]) == 1:
            dq, block = dq_by_out[node.input[1]]
            w = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int8)
            scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)  # [K/block, N]
            k, n = w.shape
            bname, sname = dq.input[0] + "_nbits", dq.input[1] + "_nbits"
            new_inits.append(numpy_helper.from_array(_pack(w, block), bname))
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(scale.T).reshape(-1), sname))
            new_nodes.append(helper.make_node("MatMulNBits", [node.input[0], bname, sname], list(node.output),
                                              name=node.name + "_nbits", domain="com.microsoft", K=k, N=n, bits=4,
                                              block_size=block, accuracy_level=accuracy_level))
            drop.add(dq.output[0])
            converted += 1
            continue
        new_nodes.append(node)
    new_nodes = [nd for nd in new_nodes if not (nd.op_type == "DequantizeLinear" and nd.output[0] in drop)]
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(new_inits)
    used = {i for nd in model.graph.node for i in nd.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    big = model.ByteSize() > 2_000_000_000
    onnx.save_model(model, str(out_path), save_as_external_data=big, location=out_path.name + ".data")
    return converted
