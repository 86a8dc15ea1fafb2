"""PyTorch running a package's own quantized weights: the reference of the component-level implementation gate.

While quantizing, each quantized weight is keyed by its bytes as the quantizer read them
(:func:`hpedge.export.onnx_io.weight_key`: the [K, N] weight of the graph's MatMul in the graph's type). Here each
``torch.nn.Linear`` of the PyTorch model is keyed the same way (its weight transposed, in the graph's type) and,
where a quantized weight has its key, takes that weight's values read back from the packaged graph (``q x scale`` as
its ``DequantizeLinear`` computes them; for ``int4_cpu``'s int8 kernel, its re-quantized int8 weight, with its
per-tensor uint8 activations emulated). The graph and this model then hold the same weights: what still differs
between their outputs is the graph's implementation (exporter, kernels, conversion), not quantization, which the
quantization-quality gate judges against the original model. One weight is read at a time.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpedge.export.cpu_int4 import int8_weight
from hpedge.export.onnx_io import read_array, weight_key


@dataclass
class Dequantized:
    """What :func:`load_dequantized` did: Linear layers given the graph's weights, of the graph's quantized ones."""
    matched: int
    quantized: int
    unmatched: list[str]  # quantized weights of the graph no Linear of the model has
    layers: list[tuple[Any, str]] = field(default_factory=list, repr=False)  # (Linear, its graph weight) given a weight

    def to_dict(self) -> dict[str, Any]:
        return {"layers_matched": self.matched, "quantized": self.quantized, "unmatched": self.unmatched[:10]}


def _dequantize_nodes(model: Any) -> dict[str, tuple[Any, Any, int, int, Any]]:
    """Quantized weight (the DequantizeLinear's data input) -> (its initializer, scale initializer, axis, block, the
    scale's own factor initializer or None). NVFP4's block scales are FP8 values dequantized by a factor first: the
    scale input is then that DequantizeLinear's output, read as (scale initializer, factor initializer)."""
    from onnx import helper

    inits = {i.name: i for i in model.graph.initializer}
    made = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or len(node.input) < 2:
            continue
        if len(node.input) > 2 and node.input[2]:
            continue  # zero points: not written by hpedge's quantizers
        at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        scale, factor = inits.get(node.input[1]), None
        if scale is None:
            two = made.get(node.input[1])
            if two is None or two.op_type != "DequantizeLinear" or not all(i in inits for i in two.input[:2]):
                continue
            scale, factor = inits[two.input[0]], inits[two.input[1]]
        out[node.input[0]] = (inits[node.input[0]], scale, int(at.get("axis", 1)), int(at.get("block_size", 0)), factor)
    return out


def _read(entry: tuple[Any, Any, int, int, Any], base_dir: Path) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(values, scales, axis, block) of one :func:`_dequantize_nodes` entry; a two-level scale is computed as its
    DequantizeLinear computes it (float32 product rounded to the factor's type)."""
    data, scale, axis, block, factor = entry
    s = read_array(scale, base_dir)
    if factor is not None:
        f = read_array(factor, base_dir)
        s = (s.astype(np.float32) * f.astype(np.float32)).astype(f.dtype)
    return read_array(data, base_dir), s, axis, block


def read_dequantized(model: Any, base_dir: Path) -> dict[str, np.ndarray]:
    """Each two-level (NVFP4) quantized weight of ``model`` -> its values as its two DequantizeLinear compute them."""
    return {d: dequantize(*_read(e, base_dir)) for d, e in _dequantize_nodes(model).items() if e[4] is not None}


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int, block: int) -> np.ndarray:
    """``DequantizeLinear`` of a 2-D weight: blocked along ``axis`` 0 (INT4, [K/block, N] scales) or per channel along
    ``axis`` 1 (INT8 and FP8, [N] scales); the product in float32 rounded once to the scale's type, as the operator's
    output. FP8 and FP4 values come as ml_dtypes arrays (exact in float32)."""
    s = scale.astype(np.float32)
    if block:
        s = np.repeat(s, block, axis=0)[: q.shape[0]]
    elif s.ndim == 1:
        s = s[None, :] if axis in (1, -1) else s[:, None]
    return (q.astype(np.float32) * s).astype(scale.dtype)


def int8_kernel_weight(q: np.ndarray, scale: np.ndarray, axis: int, block: int) -> np.ndarray:
    """The weight ``int4_cpu``'s int8 kernel multiplies by: the INT4 values and block scales re-quantized to int8
    per output channel (:func:`hpedge.export.cpu_int4.int8_weight`, the conversion itself), in float32."""
    w8, s_chan = int8_weight(q.astype(np.int8), scale.astype(np.float32), block)
    return w8.astype(np.float32) * s_chan[None, :]


@contextmanager
def dynamic_uint8_inputs(layers: list[Any]) -> Iterator[None]:
    """Each of ``layers`` sees its input as ONNX's ``DynamicQuantizeLinear`` leaves it (the int8 kernel's activation
    quantization): one uint8 scale and zero point for the whole tensor, over a range that includes 0, values
    rounded half to even and saturated, then mapped back to float."""
    import torch

    def fake(_m: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        lo = torch.clamp(x.min(), max=0.0)
        hi = torch.clamp(x.max(), min=0.0)
        scale = (hi - lo) / 255.0
        if float(scale) == 0.0:
            return args
        zp = torch.clamp(torch.round(-lo / scale), 0, 255)
        xq = torch.clamp(torch.round(x / scale) + zp, 0, 255)
        return ((xq - zp) * scale, *args[1:])

    handles = [m.register_forward_pre_hook(fake) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def load_dequantized(module: Any, onnx_path: Path, sources: dict[str, str],
                     weight: Callable[[np.ndarray, np.ndarray, int, int], np.ndarray] | None = None) -> Dequantized:
    """Every ``torch.nn.Linear`` of ``module`` whose weight is one the quantizer keyed in ``sources`` (the graph's
    quantized weight name -> :func:`weight_key`) gets that weight's dequantized values from graph ``onnx_path``, in
    place. ``module`` must hold the weights the quantized graph was made from, in its type (an fp16 graph: the model
    cast to fp16). ``weight``: how a quantized weight's values and scales become the layer's weight (default
    :func:`dequantize`, as the graph's ``DequantizeLinear``; :func:`int8_kernel_weight` for ``int4_cpu``)."""
    import onnx
    import torch

    model = onnx.load(str(onnx_path), load_external_data=False)
    nodes = _dequantize_nodes(model)
    base_dir = Path(onnx_path).parent
    by_key: dict[str, list[str]] = {}  # one weight read by several MatMuls was quantized once per reader
    for data in nodes:
        key = sources.get(data.rsplit("_", 1)[0])
        if key is not None:
            by_key.setdefault(key, []).append(data)
    found: set[str] = set()
    layers = []
    make = weight or dequantize
    with torch.no_grad():
        for m in module.modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            w = m.weight.detach()
            datas = by_key.get(weight_key(w.cpu().t().contiguous().numpy()), [])
            deqs = [make(*_read(nodes[d], base_dir)) for d in datas]
            if not deqs:
                continue
            m.weight.copy_(torch.from_numpy(np.ascontiguousarray(deqs[0].T)).to(w.dtype))
            layers.append((m, datas[0]))
            # a weight quantized differently per reader has no one PyTorch equivalent: those stay unmatched
            found.update(d for d, x in zip(datas, deqs) if np.array_equal(x, deqs[0]))
    quantized = [d for d in nodes if d.rsplit("_", 1)[0] in sources]
    return Dequantized(len(found), len(quantized), sorted(set(quantized) - found), layers)


def reload_weights(layers: list[tuple[Any, str]], onnx_path: Path,
                   weight: Callable[[np.ndarray, np.ndarray, int, int], np.ndarray]) -> None:
    """The layers :func:`load_dequantized` placed get their graph weight again, made by ``weight`` (e.g.
    :func:`int8_kernel_weight`): no second read of the model, no second tracing."""
    import onnx
    import torch

    nodes = _dequantize_nodes(onnx.load(str(onnx_path), load_external_data=False))
    base_dir = Path(onnx_path).parent
    with torch.no_grad():
        for m, data in layers:
            w = weight(*_read(nodes[data], base_dir))
            m.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)).to(m.weight.dtype))
