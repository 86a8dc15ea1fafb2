"""The package's engine precision when it is not INT4: its transformer graph (``transformer/{int8,fp8,nvfp4}/
model.onnx``), the graph ONNX Runtime runs for it here, and PyTorch computing what it computes.

The export always ships the INT4 graph and its ``int4_cpu`` variant (ONNX Runtime's CPU provider). Where the target's
chosen precision (:func:`hpedge.targets.precisions.candidates`) is another, that graph is quantized from the same
fp16 export on the same captured calibration inputs, and the engines are built from it.

- :func:`write_graph`: ``int8`` by :func:`hpedge.export.quantize.quantize_int8_weights`, ``fp8`` / ``nvfp4`` by
  :func:`hpedge.export.float_quant.quantize_float`, leaving in 16 bits the layers the precision names
  (:func:`keep_16bit`, traced by weight bytes: the dynamo exporter's node names say nothing of the layers);
- :func:`runnable`: the graph ONNX Runtime runs for a variant (NVFP4: :func:`hpedge.export.float_quant.
  nvfp4_emulation`; the others as they ship);
- :func:`torch_reference`: the PyTorch transformer given the graph's own weights (:mod:`hpedge.export.dequantized`)
  and, for FP8 / NVFP4, its activation quantization (same scales, read from the graph): the references of the
  variant's implementation gates, with the activations quantized (loose: a value rounding the other way compounds
  through the blocks) and without (the graph's activation quantizers bypassed too: float32-exact, INT4's 60 dB).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hpedge.errors import HpedgeError
from hpedge.export.dequantized import dequantize, load_dequantized, reload_weights
from hpedge.export.float_quant import (
    activation_scales,
    fp4_dynamic,
    fp8_static,
    nvfp4_emulation,
    quantize_float,
    weights_only,
)
from hpedge.export.onnx_io import weight_key
from hpedge.export.quantize import QuantReport, quantize_int8_weights
from hpedge.targets import precisions

VARIANTS = ("int8", "fp8", "nvfp4")  # the engine precisions with a graph of their own


def keep_16bit(transformer: Any, names: list[str]) -> dict[str, str]:
    """Weight key (the [K, N] weight as the graph stores it) -> layer name, for the linear layers any of the
    precisions ``names`` leaves in 16 bits. ``transformer``: in the graph's weight type."""
    import torch

    pats = [precisions.get(n) for n in names if n in VARIANTS]
    out = {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and any(p.kept_16bit(name) for p in pats):
            out[weight_key(m.weight.detach().cpu().t().contiguous().numpy())] = name
    return out


def write_graph(precision: str, src: Path, dst: Path, calibration: list[dict[str, np.ndarray]], keep: dict[str, str],
                activations_from: Path | None, say: Callable[[str], None]) -> QuantReport:
    if precision == "int8":
        return quantize_int8_weights(src, dst)
    if precision in ("fp8", "nvfp4"):
        return quantize_float(precision, src, dst, calibration, keep, activations_from, say)
    raise HpedgeError(f"internal: no graph of its own for precision {precision!r}")


def choose(candidates: list[str], auto: bool, src: Path, folder: Path, calibration: list[dict[str, np.ndarray]],
           keep: dict[str, str], activations_from: Path | None, judge: Callable[[str, Path], Any],
           say: Callable[[str], None]) -> tuple[str, QuantReport | None, list[dict[str, Any]]]:
    """The engine precision: ``candidates`` in order, each but INT4 (whose graph the export always writes) quantized
    from ``src`` into ``folder/<precision>/model.onnx``. Asked for by name, it is taken (its gates decide in parity,
    as INT4's do); with ``auto``, one whose graph ``judge`` (its quality gate) fails is removed and the next tried.
    Returns the precision, its quantization report (None for INT4) and what was tried."""
    tried: list[dict[str, Any]] = []
    for p in candidates:
        if p == "int4":
            break
        dst = folder / p / "model.onnx"
        say(f"{p} variant: {precisions.get(p).title}")
        rep = write_graph(p, src, dst, calibration, keep, activations_from, say)
        if not auto:
            return p, rep, tried
        c = judge(p, dst)
        tried.append({"precision": p, "passed": c.passed, **c.metrics})
        if c.passed:
            return p, rep, tried
        say(f"{p} fails its quality gate ({', '.join(f'{k} {v:.4g}' for k, v in c.metrics.items())}); next")
        shutil.rmtree(dst.parent)
    return "int4", None, tried


def runnable(variant: str, path: Path, folder: Path, activations: bool = True) -> Path:
    """The graph ONNX Runtime runs for ``variant`` (``path``; NVFP4's emulation written into ``folder``);
    ``activations=False``: with its activation quantizers bypassed (:func:`hpedge.export.float_quant.weights_only`)."""
    if variant == "nvfp4":
        emulated = folder / "nvfp4_emulated" / "model.onnx"
        path = emulated if emulated.exists() else nvfp4_emulation(path, emulated)
    if activations or variant not in ("fp8", "nvfp4"):
        return path
    return weights_only(path, folder / f"{variant}_weights_only" / "model.onnx")


def ran_as(variant: str) -> str:
    """How parity runs ``variant`` here, for its checks' names."""
    if variant == "nvfp4":
        return ("ONNX Runtime, as emulated: FP4 weights decoded from the graph, TensorRT's FP4 dynamic quantization "
                "as standard operators; the engine itself runs on Blackwell only")
    return "ONNX Runtime"


class Reference:
    """What :func:`torch_reference` yields: the layers given the graph's weights, and whether their inputs are
    quantized as the graph's (``activations``, on by default; off: the weights alone)."""

    def __init__(self, done: Any) -> None:
        self.done = done
        self.activations = True


@contextlib.contextmanager
def torch_reference(transformer: Any, graph: Path, report: QuantReport, precision: str) -> Iterator[Reference]:
    """``transformer`` (in the graph's weight type) with the graph's own quantized weights and, for FP8 / NVFP4, each
    quantized layer's input quantized as the graph does (forward pre-hooks, float32) while the yielded
    :class:`Reference`'s ``activations`` is on."""
    done = load_dequantized(transformer, graph, report.sources)
    if precision == "fp8":
        # the graph's float32 view (the gate) multiplies FP8 values by their scales in float32, unrounded; one fp16
        # rounding of the weights flips activation roundings downstream (measured: 38.6 dB instead of the gate's 40)
        for m, _ in done.layers:
            m.float()
        reload_weights(done.layers, graph, lambda q, s, axis, block: dequantize(q, s.astype(np.float32), axis, block))
    if done.unmatched:
        raise HpedgeError(f"internal: {len(done.unmatched)} of the {precision} graph's {done.quantized} quantized weights "
                          f"match no Linear layer of the transformer (first: {done.unmatched[0]}); export aborted")
    ref = Reference(done)
    scales = activation_scales(graph) if precision in ("fp8", "nvfp4") else {}
    handles = []
    for m, data in done.layers:
        if data in scales:
            kind, s = scales[data]
            fake = fp8_static if kind == "fp8" else fp4_dynamic

            def hook(_m: Any, args: tuple[Any, ...], fake: Any = fake, s: float = s) -> Any:
                return (fake(args[0], s).to(args[0].dtype), *args[1:]) if ref.activations else None

            handles.append(m.register_forward_pre_hook(hook))
    if precision in ("fp8", "nvfp4") and len(handles) != len(done.layers):
        raise HpedgeError(f"internal: {len(done.layers) - len(handles)} quantized layers of the {precision} graph have no "
                          "activation quantizer")
    try:
        yield ref
    finally:
        for h in handles:
            h.remove()
