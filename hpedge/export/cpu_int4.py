"""The CPU variant of the INT4 transformer (``int4_cpu``): the same 4-bit weights and scales as
ModelOpt's DequantizeLinear + MatMul graph, in a form ONNX Runtime's CPU provider runs fast.

ONNX Runtime's CPU provider does not fuse blocked DequantizeLinear + MatMul, so that graph runs slower
than fp32 (it dequantizes every weight on every call). Two kernels are offered; only ONNX is needed
here and the package's parity gate judges either result:

``int8`` (default)
    Each weight stays INT4 in the file. A small constant subgraph (Cast int4 -> float, times the block
    scales, per-output-channel absmax / 127, Round, Clip, Cast int8) turns it into an int8 weight with
    one scale per output channel; ONNX Runtime's constant folding evaluates it once when the session is
    created, so at run time the MatMul is ``com.microsoft.DynamicQuantizeMatMul``: activations quantized
    per tensor to uint8 on the fly, an int8 GEMM (VNNI / AMX kernels). Disk and download size are those
    of INT4; resident weights are int8 (half of INT4's compression in RAM). The requantization adds an
    error of at most absmax/254 per weight, about 1/18 of INT4's own block step.
``nbits``
    ``com.microsoft.MatMulNBits`` with the very same nibbles, exact: ModelOpt's weights are signed int4
    with zero point 0 (w * s); MatMulNBits stores unsigned nibbles with an implicit zero point of 8.
    Weights stay 4-bit in RAM, but on x86 ONNX Runtime's 4-bit GEMM is barely faster than fp32 for the
    hundreds of tokens of a diffusion step (measured in benchmarks/results/latency.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

KERNELS = ("int8", "nbits")


def _pack(w: np.ndarray, block: int) -> np.ndarray:
    """int4 weight [K, N] -> uint8 [N, K/block, block/2], low nibble first."""
    k, n = w.shape
    u = (w.astype(np.int16) + 8).astype(np.uint8).T.reshape(n, k // block, block)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _int4_dq_nodes(model: Any) -> dict[str, tuple[Any, int]]:
    """DequantizeLinear nodes of constant, blocked (axis 0), zero-point-free 2-D INT4 weights, by output."""
    from onnx import TensorProto, helper

    inits = {i.name: i for i in model.graph.initializer}
    found: dict[str, tuple[Any, int]] = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or len(node.input) < 2:
            continue
        at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        zp_ok = len(node.input) < 3 or not node.input[2]
        w = inits[node.input[0]]
        if (at.get("axis", 1) == 0 and at.get("block_size", 0) > 0 and zp_ok and len(w.dims) == 2
                and w.data_type == TensorProto.INT4 and node.input[1] in inits):
            found[node.output[0]] = (node, int(at["block_size"]))
    return found


def convert(int4_path: Path, out_path: Path, kernel: str = "int8", accuracy_level: int = 4) -> int:
    """Write the CPU variant of ``int4_path`` with ``kernel``; returns the number of converted MatMuls.

    ``accuracy_level`` applies to ``nbits`` only (4: int8 activations, 0: fp32 compute).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if kernel not in KERNELS:
        raise ValueError(f"unknown CPU INT4 kernel {kernel!r} (choose from {', '.join(KERNELS)})")
    model = onnx.load(str(int4_path), load_external_data=True)
    inits = {i.name: i for i in model.graph.initializer}
    dq_by_out = _int4_dq_nodes(model)
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers[i] = consumers.get(i, 0) + 1
    new_nodes: list[Any] = []
    new_inits: list[Any] = []
    drop: set[str] = set()
    converted = 0
    if kernel == "int8":
        new_inits += [numpy_helper.from_array(np.array([0], np.int64), "hpedge_axis0"),
                      numpy_helper.from_array(np.array(1e-12, np.float32), "hpedge_eps"),
                      numpy_helper.from_array(np.array(127.0, np.float32), "hpedge_127"),
                      numpy_helper.from_array(np.array(-127.0, np.float32), "hpedge_minus127")]
    for node in model.graph.node:
        if not (node.op_type == "MatMul" and node.input[1] in dq_by_out and consumers.get(node.input[1]) == 1):
            new_nodes.append(node)
            continue
        dq, block = dq_by_out[node.input[1]]
        wname, sname = dq.input[0], dq.input[1]
        k, n = (int(d) for d in inits[wname].dims)
        if kernel == "nbits":
            w = numpy_helper.to_array(inits[wname]).astype(np.int8)
            scale = numpy_helper.to_array(inits[sname]).astype(np.float32)  # [K/block, N]
            bname, sname2 = wname + "_nbits", sname + "_nbits"
            new_inits.append(numpy_helper.from_array(_pack(w, block), bname))
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(scale.T).reshape(-1), sname2))
            new_nodes.append(helper.make_node("MatMulNBits", [node.input[0], bname, sname2], list(node.output),
                                              name=node.name + "_nbits", domain="com.microsoft", K=k, N=n, bits=4,
                                              block_size=block, accuracy_level=accuracy_level))
        else:
            p = (node.name or wname) + "_w8"
            new_inits += [numpy_helper.from_array(np.array([k // block, block, n], np.int64), p + "_blocks"),
                          numpy_helper.from_array(np.array([k // block, 1, n], np.int64), p + "_scales"),
                          numpy_helper.from_array(np.array([k, n], np.int64), p + "_kn"),
                          numpy_helper.from_array(np.zeros(n, np.int8), p + "_zero")]
            new_nodes += [  # constant subgraph, folded once at session creation
                helper.make_node("Cast", [wname], [p + "_i4f"], to=TensorProto.FLOAT),
                helper.make_node("Reshape", [p + "_i4f", p + "_blocks"], [p + "_i4f3"]),
                helper.make_node("Reshape", [sname, p + "_scales"], [p + "_s3"]),
                helper.make_node("Mul", [p + "_i4f3", p + "_s3"], [p + "_wf3"]),
                helper.make_node("Reshape", [p + "_wf3", p + "_kn"], [p + "_wf"]),
                helper.make_node("Abs", [p + "_wf"], [p + "_abs"]),
                helper.make_node("ReduceMax", [p + "_abs", "hpedge_axis0"], [p + "_amax"], keepdims=0),
                helper.make_node("Max", [p + "_amax", "hpedge_eps"], [p + "_amax_eps"]),
                helper.make_node("Div", [p + "_amax_eps", "hpedge_127"], [p + "_scale"]),
                helper.make_node("Div", [p + "_wf", p + "_scale"], [p + "_q"]),
                helper.make_node("Round", [p + "_q"], [p + "_qr"]),
                helper.make_node("Clip", [p + "_qr", "hpedge_minus127", "hpedge_127"], [p + "_qc"]),
                helper.make_node("Cast", [p + "_qc"], [p + "_int8"], to=TensorProto.INT8),
                helper.make_node("DynamicQuantizeMatMul", [node.input[0], p + "_int8", p + "_scale", p + "_zero"],
                                 list(node.output), name=(node.name or wname) + "_int8", domain="com.microsoft"),
            ]
        drop.add(dq.output[0])
        converted += 1
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
