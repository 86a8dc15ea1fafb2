"""The CPU variant of the INT4 transformer (``int4_cpu``): made from the same 4-bit weights and scales as
the INT4 DequantizeLinear + MatMul graph (ModelOpt's AWQ or hpedge's RTN, one layout), in a form ONNX Runtime's CPU provider runs fast.

ONNX Runtime's CPU provider does not fuse blocked DequantizeLinear + MatMul, so that graph runs slower
than fp32 (it dequantizes every weight on every call). Two kernels are offered; only ONNX is needed
here and the package's parity gate judges either result:

``int8`` (default)
    Each weight's INT4 values and block scales become int8 values with one scale per output channel
    (:func:`int8_weight`), stored as such: the MatMul is ``com.microsoft.DynamicQuantizeMatMul``, activations
    quantized per tensor to uint8 on the fly, an int8 GEMM (VNNI / AMX kernels). The file holds 1 byte per
    weight (twice INT4's), and ONNX Runtime opens it at about that size: the earlier layout kept INT4 in the file
    behind a constant Cast + QuantizeLinear subgraph that ONNX Runtime folded at session start, holding an fp32
    copy of every weight while it did (3.2x the transformer's fp16 bytes measured at 2.24 B parameters,
    benchmarks/results/size-sd3.5-medium-2.24B.md). A bias Add right after a MatMul becomes the
    kernel's bias input, and MatMuls that read the same activations (a block's Q, K and V projections) share one
    ``DynamicQuantizeLinear`` and run as ``com.microsoft.MatMulIntegerToFloat``, as ONNX Runtime's own
    ``quantize_dynamic`` lays them out (on the pruned digits-flux step, 73 separate bias Adds and 83 activation
    quantizations were what made its graph faster than this one). The int8 weights use 7 bits, |w| <= 64 with one step = the channel's largest block scale / 8
    (the int4 values of that block map exactly; other blocks round by at most half a step): on x86 CPUs
    with AVX2 but without VNNI, ONNX Runtime's uint8 x int8 GEMM adds pairs of products in 16 bits
    (``vpmaddubsw``), which saturates above 32767; 2 * 255 * 64 = 32640 cannot. With the full range
    (|w| <= 127) the product was wrong on such a CPU (AMD EPYC, AVX2 only: cosine 0.9957 against the
    INT4 graph on the unit test's layer, 0.99994 with 7 bits); this is ONNX Runtime's documented
    ``reduce_range`` advice for non-VNNI CPUs, applied to the weights.
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

from hpedge.export.onnx_io import Spill, drop_casts, read_array, save_onnx, value_types
from hpedge.export.quantize import floats_to_fp16

KERNELS = ("int8", "nbits")


def _pack(w: np.ndarray, block: int) -> np.ndarray:
    """int4 weight [K, N] -> uint8 [N, K/block, block/2], low nibble first."""
    k, n = w.shape
    u = (w.astype(np.int16) + 8).astype(np.uint8).T.reshape(n, k // block, block)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def int8_weight(q: np.ndarray, scale: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """INT4 values ``q`` [K, N] (in [-8, 7]) with block scales ``scale`` [K/block, N] -> int8 values [K, N] with one
    scale per output channel, S = (the channel's largest block scale) / 8: w8 = rint(q / (S / s_block)) in float32,
    within half a step of q * s_block / S (the earlier layout's blocked ``QuantizeLinear`` computed the same up to
    a tie's rounding: +-1 in a few values). |w8| <= 64."""
    k, n = q.shape
    s_chan = np.maximum(scale.max(axis=0) / np.float32(8.0), np.float32(1e-12)).astype(np.float32)
    step = (s_chan / np.maximum(scale, np.float32(1e-30))).astype(np.float32)  # [K/block, N]
    w8 = np.empty((k, n), np.int8)
    for b in range(k // block):  # one block row at a time: no [K, N] float32 temporary
        rows = slice(b * block, (b + 1) * block)
        w8[rows] = np.clip(np.rint(q[rows].astype(np.float32) / step[b]), -64, 64).astype(np.int8)
    return w8, s_chan


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


def to_fp32_compute(model: Any, light: Any | None = None, base_dir: str | Path = "", min_elements: int = 256) -> int:
    """Turn an fp16-compute graph into the same graph computing in fp32, in place; returns the tensors upcast.

    Every fp16 initializer and Constant (weights, DequantizeLinear scales) computes in fp32 with the same values,
    every ``Cast`` between float types disappears (fp32 -> fp32 Casts trip ONNX Runtime's graph optimizer);
    stale type annotations of intermediate values are dropped (ONNX Runtime infers them again). ``light`` is the
    same graph without its weights, for type inference above 2 GB (default: ``model`` itself); tensors with external
    data are read from ``base_dir``. The INT4 weights are untouched: the CPU variant keeps the very nibbles and
    scales of the TensorRT input, now computed in fp32.

    Tables of at least ``min_elements`` values (2-D or more) that no DequantizeLinear reads (position tables,
    layers left unquantized) stay fp16 where they are (in memory or in the external data file) behind a
    ``Cast`` to fp32, the layout :func:`floats_to_fp16` gives the file anyway: upcasting them in memory held an
    fp32 copy of each (SD3.5's 384 x 384 position table: 0.9 GB, and 2.4 GB of temporaries at 2.24 B parameters).
    """
    from onnx import AttributeProto, TensorProto, helper, numpy_helper

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    if not any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        return 0  # already fp32 compute
    drop_casts(model, value_types(light if light is not None else model), lambda src, to: src in floats and to in floats)
    dq_inputs = {i for n in model.graph.node if n.op_type == "DequantizeLinear" for i in n.input[1:]}
    graph_inputs = {i.name for i in model.graph.input}

    def up(t: Any) -> bool:
        if t.data_type != TensorProto.FLOAT16:
            return False
        t.CopyFrom(numpy_helper.from_array(read_array(t, base_dir).astype(np.float32), t.name))
        return True

    casts, n = [], 0
    for t in model.graph.initializer:
        if (t.data_type == TensorProto.FLOAT16 and len(t.dims) >= 2 and int(np.prod(t.dims)) >= min_elements
                and t.name not in dq_inputs and t.name not in graph_inputs):
            name = t.name
            t.name = name + "_fp16"  # the data stays where it is (inline or external)
            casts.append(helper.make_node("Cast", [t.name], [name], to=TensorProto.FLOAT, name=name + "_to_fp32"))
            n += 1
        else:
            n += up(t)
    for node in model.graph.node:
        for a in node.attribute:
            if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
                raise ValueError(f"{node.op_type} node {node.name!r} has a subgraph; fp16 -> fp32 conversion does not "
                                 "handle control flow")
            if a.HasField("t"):
                n += up(a.t)
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.FLOAT
    for i, node in enumerate(casts):
        model.graph.node.insert(i, node)
    for v in (*model.graph.input, *model.graph.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            raise ValueError(f"graph input/output {v.name!r} is fp16; hpedge graphs take and give float32")
    del model.graph.value_info[:]
    return n


def _bias_adds(nodes: list[Any], outputs: set[str], matmuls: dict[int, int], inits: dict[str, Any]) -> dict[int, tuple[int, str]]:
    """For each MatMul (``matmuls``: its index in ``nodes`` -> its N) whose only reader is an ``Add`` of a constant
    float32 [N] vector (a Linear's bias): that Add's index and the bias's name, to fold the Add into the int8
    kernel's bias input."""
    readers: dict[str, list[int]] = {}
    for j, nd in enumerate(nodes):
        for i in nd.input:
            readers.setdefault(i, []).append(j)
    found: dict[int, tuple[int, str]] = {}
    for k, n in matmuls.items():
        y = nodes[k].output[0]
        r = readers.get(y, [])
        if y in outputs or len(r) != 1 or nodes[r[0]].op_type != "Add" or len(nodes[r[0]].input) != 2:
            continue
        add = nodes[r[0]]
        bias = add.input[1] if add.input[0] == y else add.input[0]
        b = inits.get(bias)
        if b is not None and b.data_type == 1 and list(b.dims) == [n]:
            found[k] = (r[0], bias)
    return found


def convert(int4_path: Path, out_path: Path, kernel: str = "int8", accuracy_level: int = 4) -> int:
    """Write the CPU variant of ``int4_path`` with ``kernel``; returns the number of converted MatMuls.

    ``int4_path`` computes in fp32 or fp16 (ModelOpt's quantization of the fp16 TensorRT input: it is turned
    into fp32 compute first, :func:`to_fp32_compute`, so that both variants share their 4-bit weights and
    scales). The remaining float32 weights are stored fp16 (with a Cast to fp32) as in the INT4 file.
    ``accuracy_level`` applies to ``nbits`` only (4: int8 activations, 0: fp32 compute).
    """
    import onnx

    if kernel not in KERNELS:
        raise ValueError(f"unknown CPU INT4 kernel {kernel!r} (choose from {', '.join(KERNELS)})")
    src_dir = Path(int4_path).parent
    model = onnx.load(str(int4_path), load_external_data=False)  # weights above 2 GB stay on disk until read
    to_fp32_compute(model, base_dir=src_dir)
    with Spill(src_dir, Path(out_path).parent.name + ".spill") as spill:  # new weights go to disk as they are made
        converted = _rewrite(model, src_dir, spill, kernel, accuracy_level)
        floats_to_fp16(model, keep_dq_scales=False, base_dir=src_dir)
        spill.flush()
        save_onnx(model, out_path, base_dir=src_dir)
    return converted


# Over 80 lines on purpose: one streamed pass over the graph's nodes, rewriting each INT4 MatMul as it goes.
def _rewrite(model: Any, src_dir: Path, spill: Spill, kernel: str, accuracy_level: int) -> int:
    """:func:`convert`'s pass over ``model``, in place; new weights are written to ``spill``."""
    from onnx import helper, numpy_helper

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
    nodes = list(model.graph.node)
    convertible = {k: int(inits[dq_by_out[nd.input[1]][0].input[0]].dims[1]) for k, nd in enumerate(nodes)
                   if nd.op_type == "MatMul" and nd.input[1] in dq_by_out and consumers.get(nd.input[1]) == 1}
    biases = _bias_adds(nodes, {o.name for o in model.graph.output}, convertible, inits) if kernel == "int8" else {}
    fused_adds = {a for a, _ in biases.values()}
    readers: dict[str, int] = {}
    for k in convertible:
        readers[nodes[k].input[0]] = readers.get(nodes[k].input[0], 0) + 1
    quantized_inputs: set[str] = set()  # activations whose shared DynamicQuantizeLinear is already emitted
    for j, node in enumerate(nodes):
        if j in fused_adds:
            continue
        if j not in convertible:
            new_nodes.append(node)
            continue
        dq, block = dq_by_out[node.input[1]]
        wname, sname = dq.input[0], dq.input[1]
        k, n = (int(d) for d in inits[wname].dims)
        if kernel == "nbits":
            w = read_array(inits[wname], src_dir).astype(np.int8)
            scale = read_array(inits[sname], src_dir).astype(np.float32)  # [K/block, N]
            bname, sname2 = wname + "_nbits", sname + "_nbits"
            new_inits.append(spill.add(numpy_helper.from_array(_pack(w, block), bname)))
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(scale.T).reshape(-1), sname2))
            new_nodes.append(helper.make_node("MatMulNBits", [node.input[0], bname, sname2], list(node.output),
                                              name=node.name + "_nbits", domain="com.microsoft", K=k, N=n, bits=4,
                                              block_size=block, accuracy_level=accuracy_level))
        else:
            # int8 weight = round(q * s_block / S_channel) with S_channel = (max over blocks of s) / 8, so
            # |q * s / S| <= 64 (7 bits, exact for the channel's largest-scale block): see the module's
            # docstring for why not the full int8 range. Computed here one weight at a time and stored: ONNX
            # Runtime opens the file at about its size (no constant folding at session start).
            p = (node.name or wname) + "_w8"
            w8, s_chan = int8_weight(read_array(inits[wname], src_dir), read_array(inits[sname], src_dir).astype(np.float32),
                                     block)
            new_inits += [spill.add(numpy_helper.from_array(w8, p + "_int8")), numpy_helper.from_array(s_chan, p + "_scale"),
                          numpy_helper.from_array(np.zeros(n, np.int8), p + "_zero")]
            del w8
            a, bias = biases.get(j, (-1, ""))
            out = nodes[a].output[0] if a >= 0 else node.output[0]
            x = node.input[0]
            if readers[x] == 1:
                new_nodes.append(helper.make_node(
                    "DynamicQuantizeMatMul", [x, p + "_int8", p + "_scale", p + "_zero"] + ([bias] if bias else []),
                    [out], name=(node.name or wname) + "_int8", domain="com.microsoft"))
            else:  # activations quantized once for every MatMul that reads them
                xq = x + "_hpedge_u8"
                if x not in quantized_inputs:
                    quantized_inputs.add(x)
                    new_nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [xq, xq + "_scale", xq + "_zero"],
                                                      name=xq))
                new_nodes.append(helper.make_node(
                    "MatMulIntegerToFloat",
                    [xq, p + "_int8", xq + "_scale", p + "_scale", xq + "_zero", p + "_zero"] + ([bias] if bias else []),
                    [out], name=(node.name or wname) + "_int8", domain="com.microsoft"))
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
    return converted
