"""FP8 (E4M3) and NVFP4 graphs of the exported transformer, streamed as hpedge's INT4 pass is, in TensorRT's
explicit-quantization form (:mod:`hpedge.targets.precisions` says what each holds).

Every ``MatMul`` with a constant 2-D weight [K, N] is quantized, except the layers the export keeps in 16 bits
(``keep``: the weights' keys, :func:`hpedge.export.onnx_io.weight_key`, of the PyTorch layers the precision's
``keep_16bit`` patterns name) and weights whose K is not a multiple of 16 (NVFP4's block; TensorRT's FP8 GEMMs too). Attention's products have no
constant weight: they stay in the graph's type.

- FP8: the weight stored FLOAT8E4M3FN, one scale per output channel (max |w| / 448), behind a ``DequantizeLinear``;
  the layer's input through ``QuantizeLinear`` / ``DequantizeLinear`` to FLOAT8E4M3FN with one scale per tensor,
  max |x| over the calibration inputs / 448 (ModelOpt's default max calibration). ONNX Runtime's CPU provider runs it.
- NVFP4: the weight stored FLOAT4E2M1 in blocks of 16 along K, each block's scale an FP8 E4M3 value under one factor
  per tensor (max |w| / (6 x 448)): ``DequantizeLinear`` of the scales, then of the weight; the input through
  TensorRT's ``trt::TRT_FP4DynamicQuantize`` (block scales made on the GPU as activations arrive, under the calibrated
  factor max |x| / (6 x 448)) and two ``DequantizeLinear``. ONNX Runtime has neither the FP4 ``DequantizeLinear`` nor
  TensorRT's operator: :func:`nvfp4_emulation` writes the graph ONNX Runtime runs in its place (weights decoded from
  the graph's own bytes, the dynamic quantization as standard operators), which parity checks.

The scales are in the graph's type (fp16 by default). Each quantized weight is keyed as read (``QuantReport.sources``)
so that :mod:`hpedge.export.dequantized` can give PyTorch the same weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hpedge.errors import HpedgeError
from hpedge.export.activations import activation_amax
from hpedge.export.dequantized import read_dequantized
from hpedge.export.onnx_io import Spill, read_array, save_onnx, weight_key
from hpedge.export.quantize import QuantReport, _LazyWeights, _replace_nodes

E4M3_MAX = 448.0
E2M1_MAX = 6.0
NVFP4_BLOCK = 16
METHODS = {"fp8": "fp8_max", "nvfp4": "nvfp4_max"}
EMULATED = "::emulated::"  # in the names of the nodes that emulate TensorRT's FP4 dynamic quantization


def e4m3(x: np.ndarray) -> np.ndarray:
    """FLOAT8E4M3FN values of ``x`` (saturated to +-448, rounded to nearest even), as an ml_dtypes array."""
    import ml_dtypes

    return np.clip(x.astype(np.float32), -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)


def e2m1(x: np.ndarray) -> np.ndarray:
    """FLOAT4E2M1 values of ``x`` (saturated to +-6, rounded to nearest even), as an ml_dtypes array."""
    import ml_dtypes

    return np.clip(x.astype(np.float32), -E2M1_MAX, E2M1_MAX).astype(ml_dtypes.float4_e2m1fn)


def fp4_bytes(q: np.ndarray) -> bytes:
    """FLOAT4E2M1 values packed as ONNX stores them: two per byte, the first in the low nibble."""
    u = q.reshape(-1).view(np.uint8) & 0x0F
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()


def fp8_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] -> (FLOAT8E4M3FN [K, N], scales [N] in ``w``'s type)."""
    scale = (np.maximum(np.abs(w.astype(np.float32)).max(axis=0), 1e-12) / E4M3_MAX).astype(w.dtype)
    return e4m3(w.astype(np.float32) / scale.astype(np.float32)), scale


def nvfp4_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[K, N] -> (FLOAT4E2M1 [K, N], FP8 E4M3 block scales [K / 16, N], the tensor's factor (a scalar in ``w``'s
    type)). The block scales are made against the stored factor, so its rounding costs nothing."""
    w32 = w.astype(np.float32)
    k, n = w32.shape
    g = np.asarray(max(float(np.abs(w32).max()), 1e-12) / (E2M1_MAX * E4M3_MAX), w.dtype)
    if float(g) == 0.0:
        raise HpedgeError("internal: an NVFP4 weight's factor rounds to zero in the graph's type")
    blocks = np.abs(w32.reshape(k // NVFP4_BLOCK, NVFP4_BLOCK, n)).max(axis=1)
    s8 = e4m3(blocks / E2M1_MAX / np.float32(g))
    # the block scale as the graph computes it: DequantizeLinear(s8, g) in the factor's type
    sd = (s8.astype(np.float32) * np.float32(g)).astype(w.dtype).astype(np.float32)
    full = np.repeat(sd, NVFP4_BLOCK, axis=0)
    q = e2m1(np.divide(w32, full, out=np.zeros_like(w32), where=full > 0))
    return q, s8, g


def _initializer(name: str, values: np.ndarray, onnx_type: int) -> Any:
    from onnx import TensorProto, helper

    raw = fp4_bytes(values) if onnx_type == TensorProto.FLOAT4E2M1 else values.view(np.uint8).tobytes()
    return helper.make_tensor(name, onnx_type, list(values.shape), raw, raw=True)


def quantize_float(precision: str, onnx_path: Path, out_path: Path, calibration: list[dict[str, np.ndarray]],
                   keep: dict[str, str] | None = None, activations_from: Path | None = None,
                   progress: Callable[[str], None] | None = None) -> QuantReport:
    """The ``precision`` ("fp8" or "nvfp4") graph of ``onnx_path`` (fp16 or fp32), calibrated on ``calibration``
    (captured transformer inputs; run through ``activations_from`` when given, a graph with the same tensor names).
    ``keep``: weight key -> the PyTorch layer's name, for layers left in 16 bits. Holds the graph and one weight."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if precision not in METHODS:
        raise HpedgeError(f"internal: no float quantizer for {precision!r}")
    t0 = time.time()
    say = progress or (lambda _s: None)
    src_dir = Path(onnx_path).parent
    model = onnx.load(str(onnx_path), load_external_data=False)
    weights = _LazyWeights(model, src_dir)
    inits = {i.name: i for i in model.graph.initializer}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    layers = [n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits
              and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].data_type in floats]
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for i in node.input:
            readers[i] = readers.get(i, 0) + 1
    excluded: dict[str, str] = {}
    todo = []
    for n in layers:
        k = int(inits[n.input[1]].dims[0])
        if k % NVFP4_BLOCK:  # NVFP4's block; FP8 tensor-core GEMMs take K in multiples of 16 too
            excluded[n.name] = f"inner dimension {k} is not a multiple of {NVFP4_BLOCK}"
        else:
            todo.append(n)
    if not todo:
        raise HpedgeError(f"no linear layer of this model can be quantized to {precision}")
    say(f"{precision.upper()}: activation ranges of {len({n.input[0] for n in todo})} layer inputs from "
        f"{len(calibration)} calibration inputs (ONNX Runtime)")
    amax = activation_amax(Path(activations_from or onnx_path), sorted({n.input[0] for n in todo}), calibration)
    new, nodes, errors, sources, quantized, done_inputs = [_e4m3_zero()], [], {}, {}, [], {}
    say(f"{precision.upper()}: {len(todo)} weights, one at a time")
    by_name = {n.name for n in todo}
    with Spill(src_dir, Path(out_path).parent.name + f".{precision}.spill") as spill:
        for node in model.graph.node:
            if node.name not in by_name:
                nodes.append(node)
                continue
            wname = node.input[1]
            converted = wname in weights.lazy  # a Gemm weight, transposed when read
            w = weights.read(wname)
            key, x = weight_key(w), node.input[0]
            a = float(amax[x])
            why = (f"kept in 16 bits ({keep[key]})" if keep and key in keep else
                   None if np.isfinite(a) and a > 0 else f"its input's max |x| was {a} on the calibration inputs")
            if why:
                excluded[node.name] = why
                if converted:  # its data was read (transposed) and is no longer the source's
                    inits[wname].CopyFrom(numpy_helper.from_array(w, wname))
                nodes.append(node)
                continue
            base = wname if readers[wname] == 1 else f"{wname}_{node.name}"
            if x not in done_inputs:  # one activation quantizer per tensor, shared by its readers
                done_inputs[x] = _activation_nodes(precision, x, a, w.dtype, len(done_inputs), new, nodes)
            w32 = w.astype(np.float32)
            if precision == "fp8":
                q, scale = fp8_weight(w)
                new.append(spill.add(_initializer(base + "_f8", q, TensorProto.FLOAT8E4M3FN)))
                new.append(numpy_helper.from_array(scale, base + "_scale"))
                nodes.append(helper.make_node("DequantizeLinear", [base + "_f8", base + "_scale"], [base + "_dq"],
                                              name=base + "_DequantizeLinear", axis=1))
                back = q.astype(np.float32) * scale.astype(np.float32)[None, :]
            else:
                q, s8, g = nvfp4_weight(w)
                new.append(spill.add(_initializer(base + "_f4", q, TensorProto.FLOAT4E2M1)))
                new.append(_initializer(base + "_block_scale", s8, TensorProto.FLOAT8E4M3FN))
                new.append(numpy_helper.from_array(g, base + "_scale"))
                nodes += [helper.make_node("DequantizeLinear", [base + "_block_scale", base + "_scale"], [base + "_bs"],
                                           name=base + "_DequantizeLinear_scale"),
                          helper.make_node("DequantizeLinear", [base + "_f4", base + "_bs"], [base + "_dq"],
                                           name=base + "_DequantizeLinear", axis=0, block_size=NVFP4_BLOCK)]
                sd = (s8.astype(np.float32) * np.float32(g)).astype(w.dtype).astype(np.float32)
                back = q.astype(np.float32) * np.repeat(sd, NVFP4_BLOCK, axis=0)
            errors[wname] = float(np.linalg.norm(back - w32) / (np.linalg.norm(w32) + 1e-12))
            sources[base] = key
            node.input[0], node.input[1] = done_inputs[x], base + "_dq"
            nodes.append(node)
            quantized.append(node.name)
            del w, w32, q, back
        weights.fill_unread()
        model.graph.initializer.extend(new)
        _replace_nodes(model, nodes)
        opset = 23 if precision == "nvfp4" else 21  # FLOAT4E2M1 is opset 23; blocked DequantizeLinear 21
        for op in model.opset_import:
            if op.domain in ("", "ai.onnx") and op.version < opset:
                op.version = opset
        if precision == "nvfp4":
            model.opset_import.append(helper.make_opsetid("trt", 1))
        model.ir_version = max(model.ir_version, 11 if precision == "nvfp4" else 10)
        del model.graph.value_info[:]
        spill.flush()
        save_onnx(model, Path(out_path), base_dir=src_dir)
    report = QuantReport(method=METHODS[precision], block_size=NVFP4_BLOCK if precision == "nvfp4" else 0,
                         quantized=quantized, excluded=excluded, seconds=round(time.time() - t0, 1),
                         implementation="hpedge (streamed; max calibration)")
    report.layer_error, report.sources = errors, sources
    return report


def _e4m3_zero() -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor("fq::zero_e4m3", TensorProto.FLOAT8E4M3FN, [], [0.0])


def _activation_nodes(precision: str, x: str, amax: float, dtype: Any, i: int, new: list[Any], nodes: list[Any]) -> str:
    """The quantizer of activation ``x`` (appended to ``nodes`` and ``new``); returns the tensor its readers take."""
    from onnx import TensorProto, helper, numpy_helper

    p = f"fq::{i}::"
    if precision == "fp8":
        new.append(numpy_helper.from_array(np.asarray(amax / E4M3_MAX, dtype), p + "scale"))
        nodes += [helper.make_node("QuantizeLinear", [x, p + "scale", "fq::zero_e4m3"], [p + "q"], name=p + "QuantizeLinear"),
                  helper.make_node("DequantizeLinear", [p + "q", p + "scale"], [p + "x"], name=p + "DequantizeLinear")]
        return p + "x"
    new.append(numpy_helper.from_array(np.asarray(amax / (E2M1_MAX * E4M3_MAX), dtype), p + "scale"))
    nodes += [helper.make_node("TRT_FP4DynamicQuantize", [x, p + "scale"], [p + "q", p + "block_scale"], domain="trt",
                               name=p + "TRT_FP4DynamicQuantize", axis=-1, block_size=NVFP4_BLOCK,
                               scale_type=TensorProto.FLOAT8E4M3FN),
              helper.make_node("DequantizeLinear", [p + "block_scale", p + "scale"], [p + "bs"], name=p + "DequantizeLinear_scale"),
              helper.make_node("DequantizeLinear", [p + "q", p + "bs"], [p + "x"], name=p + "DequantizeLinear",
                               axis=-1, block_size=NVFP4_BLOCK)]
    return p + "x"


def fp4_dynamic(x: Any, scale: float) -> Any:
    """PyTorch: ``x`` as TensorRT's FP4 dynamic quantization leaves it (blocks of 16 along the last axis: block scale
    max |x| / 6 / ``scale`` rounded to FP8 E4M3, values / (block scale x ``scale``) rounded to E2M1), in float32."""
    import torch

    shape = x.shape
    xb = x.float().reshape(-1, NVFP4_BLOCK)
    s = (xb.abs().amax(dim=1, keepdim=True) / E2M1_MAX / scale).clamp(max=E4M3_MAX)
    s = s.to(torch.float8_e4m3fn).float() * scale
    v = torch.where(s > 0, xb / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(xb))
    a = v.abs().clamp(max=E2M1_MAX)
    r = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return (torch.sign(v) * r * s).reshape(shape)


def fp8_static(x: Any, scale: float) -> Any:
    """PyTorch: ``x`` through QuantizeLinear / DequantizeLinear to FLOAT8E4M3FN with ``scale``, in float32."""
    import torch

    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def activation_scales(path: Path) -> dict[str, tuple[str, float]]:
    """Each quantized weight (its DequantizeLinear's data input) of an FP8 / NVFP4 graph -> (how its layer's input
    is quantized: "fp8" | "fp4", the scale). Read from the graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    made = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in made:
            continue
        wdq, xdq = made[node.input[1]], made.get(node.input[0])
        if wdq.op_type != "DequantizeLinear" or xdq is None or xdq.op_type != "DequantizeLinear":
            continue
        q = made.get(xdq.input[0])
        if q is None:
            continue
        kind = "fp8" if q.op_type == "QuantizeLinear" else "fp4" if q.op_type == "TRT_FP4DynamicQuantize" else None
        if kind:
            out[wdq.input[0]] = (kind, float(read_array(inits[q.input[1]], path.parent)))
    return out


def weights_only(path: Path, dst: Path) -> Path:
    """Graph ``path`` (FP8, or NVFP4's emulation) with its activation quantizers bypassed: each quantized layer reads
    its input as it comes. Against PyTorch with the same weights and no activation quantization it is exact up to
    float32 rounding, so its gate is as tight as INT4's: the weights' values, packing and scales judged alone (with
    the activations quantized too, one value rounding the other way compounds through the blocks)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    made = {o: n for n in g.node for o in n.output}
    bypass: dict[str, str] = {}
    drop: set[int] = set()
    for node in g.node:
        q = made.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":  # FP8: x -> QuantizeLinear -> DequantizeLinear
            bypass[node.output[0]] = q.input[0]
            drop |= {id(node), id(q)}
        elif node.op_type == "CastLike" and node.input[0].endswith(EMULATED + "back"):  # NVFP4's emulation's end
            bypass[node.output[0]] = node.input[1]
            drop.add(id(node))
        elif any(EMULATED in o for o in node.output):
            drop.add(id(node))
    nodes = [n for n in g.node if id(n) not in drop]
    for n in nodes:
        for i, x in enumerate(n.input):
            n.input[i] = bypass.get(x, x)
    _replace_nodes(model, nodes)
    save_onnx(model, dst, base_dir=path.parent, stream=True)
    return dst


def nvfp4_emulation(path: Path, dst: Path) -> Path:
    """The NVFP4 graph ``path`` as ONNX Runtime's CPU provider runs it: each FP4 weight decoded from the graph's own
    bytes and scales (the values its two DequantizeLinear give, stored in the graph's type); each
    ``TRT_FP4DynamicQuantize`` with its two DequantizeLinear written as standard operators computing in float32
    (block max, the FP8 block scale through QuantizeLinear, E2M1 rounding as three Round ranges: exact, Round ties to
    even). ``dst`` gets the graph and its weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    made = {o: n for n in g.node for o in n.output}
    decoded = read_dequantized(model, path.parent)  # FP4 weight -> its values
    dynamic = {n.output[0]: n for n in g.node if n.op_type == "TRT_FP4DynamicQuantize"}
    skip, drop, new_inits, nodes = set(), set(), [], []
    for node in g.node:  # what the emulation replaces: the weights' DequantizeLinear pairs, the dynamic quantizers'
        if node.op_type == "DequantizeLinear" and node.input[0] in decoded:
            new_inits.append(numpy_helper.from_array(decoded[node.input[0]], node.output[0]))
            pair = made[node.input[1]]
            skip |= {node.output[0], pair.output[0]}  # nodes known by their output (names may be empty)
            drop |= {node.input[0], *pair.input}
        elif node.op_type == "DequantizeLinear" and node.input[0] in made and made[node.input[0]].output[0] in dynamic:
            skip.add(node.output[0])
    shared = {"fq::e::zero": 0.0, "fq::e::one": 1.0, "fq::e::two": 2.0, "fq::e::four": 4.0, "fq::e::six": E2M1_MAX}
    new_inits += [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in shared.items()]
    new_inits += [numpy_helper.from_array(np.asarray([-1, NVFP4_BLOCK], np.int64), "fq::e::blocks"),
                  numpy_helper.from_array(np.asarray([1], np.int64), "fq::e::axis"), _e4m3_zero()]
    for node in g.node:
        if node.output[0] in dynamic:
            nodes += _emulated_fp4(node, g)
        elif node.output[0] not in skip:
            nodes.append(node)
    keep = [i for i in g.initializer if i.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    _replace_nodes(model, nodes)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = 21
    for op in [o for o in model.opset_import if o.domain == "trt"]:
        model.opset_import.remove(op)
    model.ir_version = 10
    del g.value_info[:]
    save_onnx(model, dst, base_dir=path.parent, stream=True)
    return dst


def _emulated_fp4(node: Any, g: Any) -> list[Any]:
    """Standard operators computing what ``node`` (TRT_FP4DynamicQuantize) and its two DequantizeLinear give
    (:func:`fp4_dynamic` in ONNX)."""
    from onnx import TensorProto, helper

    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    want = {"axis": -1, "block_size": NVFP4_BLOCK, "scale_type": TensorProto.FLOAT8E4M3FN}
    if {k: at.get(k) for k in want} != want:
        raise HpedgeError(f"cannot emulate {node.name or node.output[0]}: TRT_FP4DynamicQuantize with {at}, the emulation "
                          f"is of {want}")
    x, scale = node.input[0], node.input[1]
    out = next(n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] == node.output[0])
    p, h = node.output[0] + EMULATED, helper.make_node
    return [
        h("Cast", [x], [p + "x"], to=TensorProto.FLOAT),
        h("Cast", [scale], [p + "g"], to=TensorProto.FLOAT),
        h("Shape", [x], [p + "shape"]),
        h("Reshape", [p + "x", "fq::e::blocks"], [p + "b"]),
        h("Abs", [p + "b"], [p + "abs"]),
        h("ReduceMax", [p + "abs", "fq::e::axis"], [p + "amax"], keepdims=1),
        h("Div", [p + "amax", "fq::e::six"], [p + "s0"]),
        h("Div", [p + "s0", p + "g"], [p + "s1"]),
        h("QuantizeLinear", [p + "s1", "fq::e::one", "fq::zero_e4m3"], [p + "s8"]),  # saturating, nearest even
        h("DequantizeLinear", [p + "s8", "fq::e::one"], [p + "s2"]),
        h("Mul", [p + "s2", p + "g"], [p + "s"]),
        h("Greater", [p + "s", "fq::e::zero"], [p + "pos"]),
        h("Where", [p + "pos", p + "s", "fq::e::one"], [p + "safe"]),
        h("Div", [p + "b", p + "safe"], [p + "v0"]),
        h("Where", [p + "pos", p + "v0", "fq::e::zero"], [p + "v"]),
        h("Abs", [p + "v"], [p + "a0"]),
        h("Min", [p + "a0", "fq::e::six"], [p + "a"]),
        h("Mul", [p + "a", "fq::e::two"], [p + "a2"]),
        h("Round", [p + "a2"], [p + "r2"]),
        h("Div", [p + "r2", "fq::e::two"], [p + "lo"]),  # below 2: steps of 0.5
        h("Round", [p + "a"], [p + "mid"]),  # 2 to 4: steps of 1
        h("Div", [p + "a", "fq::e::two"], [p + "a4"]),
        h("Round", [p + "a4"], [p + "r4"]),
        h("Mul", [p + "r4", "fq::e::two"], [p + "hi"]),  # 4 to 6: steps of 2
        h("Less", [p + "a", "fq::e::four"], [p + "lt4"]),
        h("Where", [p + "lt4", p + "mid", p + "hi"], [p + "m1"]),
        h("Less", [p + "a", "fq::e::two"], [p + "lt2"]),
        h("Where", [p + "lt2", p + "lo", p + "m1"], [p + "r"]),
        h("Sign", [p + "v"], [p + "sign"]),
        h("Mul", [p + "sign", p + "r"], [p + "q"]),
        h("Mul", [p + "q", p + "s"], [p + "d"]),
        h("Reshape", [p + "d", p + "shape"], [p + "back"]),
        h("CastLike", [p + "back", x], [out]),
    ]
