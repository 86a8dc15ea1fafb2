"""The transformer's precisions a package ships, as data, and the one place a target's precision is chosen.

Every package carries the INT4 transformer (``int4``, TensorRT's input where INT4 is chosen, and the source of the
``int4_cpu`` variant ONNX Runtime's CPU provider runs). Where a target's GPU computes faster in another format, the
package also carries that format's graph, and its engines are built from it:

- ``int8``: INT8 weight-only (per output channel), fp16 compute;
- ``fp8``: FP8 E4M3 weights (per output channel) and activations (one scale per layer input, calibrated on the
  captured denoising inputs): the GEMMs run on FP8 tensor cores (Ada sm_89, Blackwell sm_120);
- ``nvfp4``: FP4 E2M1 weights and activations in blocks of 16 along the inner dimension, each block scaled by an FP8
  E4M3 factor under one float32 factor per tensor (activations' block scales made on the GPU as they arrive, under
  a calibrated per-layer factor): Blackwell's FP4 tensor cores (sm_120).

Only linear layers with constant weights are quantized; attention (its score and value products) stays in fp16, and
so do the layers named in ``keep_16bit`` (the embedders and the output layers: ModelOpt's diffusers recipe leaves
them unquantized too). A profile names the precisions its GPU runs (``precisions``) and the order ``--precision
auto`` tries them in (``transformer_precisions``): the first that fits the device and passes its quality gate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hpedge.errors import HpedgeError

# PyTorch module names (SD3 and FLUX transformers) left in 16 bits by the 8- and 4-bit float formats
KEEP_16BIT = (r"^(pos_embed|x_embedder|context_embedder|time_text_embed|norm_out|proj_out)\b",)


@dataclass(frozen=True)
class Precision:
    name: str
    title: str  # what the package's graph holds, for people
    weight_bits: int  # bits per quantized weight
    block: int  # weights per scale along the inner dimension; 0: one scale per output channel
    scale_bytes: int  # bytes per scale
    activations: str  # what the quantized layers' GEMMs read: fp16 | fp8 | fp4
    ort_cpu: bool  # ONNX Runtime's CPU provider runs the graph (so parity runs it here)
    keep_16bit: tuple[str, ...] = ()  # module-name patterns of linear layers left in 16 bits
    min_inner: int = 1  # a layer whose inner dimension is not a multiple of this stays in 16 bits (with ``block``: it)

    def layer_bytes(self, out_features: int, in_features: int) -> int:
        """A quantized linear layer's weight bytes as the graph stores them."""
        n = out_features * in_features
        scales = out_features * (in_features // self.block if self.block else 1)
        return n * self.weight_bits // 8 + scales * self.scale_bytes

    def kept_16bit(self, module_name: str) -> bool:
        return any(re.search(p, module_name) for p in self.keep_16bit)


PRECISIONS = {
    "int4": Precision("int4", "INT4 weights (block 128, fp16 scales), fp16 compute", 4, 128, 2, "fp16", True),
    "int8": Precision("int8", "INT8 weights (per output channel), fp16 compute", 8, 0, 2, "fp16", True),
    "fp8": Precision("fp8", "FP8 E4M3 weights (per output channel) and activations (per tensor), fp16 elsewhere",
                     8, 0, 2, "fp8", True, KEEP_16BIT, 16),
    "nvfp4": Precision("nvfp4", "NVFP4: FP4 E2M1 weights and activations in blocks of 16 with FP8 E4M3 scales, "
                       "fp16 elsewhere", 4, 16, 1, "fp4", False, KEEP_16BIT),
}
CHOICES = ("auto", *PRECISIONS)


def get(name: str) -> Precision:
    if name not in PRECISIONS:
        raise HpedgeError(f"--precision must be one of {', '.join(CHOICES)}, got {name!r}")
    return PRECISIONS[name]


def candidates(requested: str, profile: Any) -> tuple[list[str], str]:
    """The precisions to try for ``profile`` in order, and why: ``auto`` gives the profile's own order; a named one
    is refused in one line where the profile's GPU does not run it."""
    if requested == "auto":
        order = list(profile.transformer_precisions)
        return order, (f"--precision auto: {profile.name} runs {', '.join(order)} (best first); the first that fits "
                       "and passes its quality gate is used")
    p = get(requested)
    if p.name not in profile.transformer_precisions:
        raise HpedgeError(f"target {profile.name} ({profile.display_name}, sm_{profile.sm}) cannot run {p.name}: its "
                          f"GPU runs {', '.join(profile.transformer_precisions)}")
    return [p.name], f"--precision {p.name}"


def transformer_bytes(module: Any, precision: str) -> int:
    """The transformer's bytes at ``precision``: quantized linear layers as :meth:`Precision.layer_bytes`, linear layers
    it keeps in 16 bits (a pattern, or an inner dimension that is not a multiple of its block) and everything else at
    2 bytes per parameter."""
    import torch.nn as nn

    p = get(precision)
    total, seen = 0, set()
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and not p.kept_16bit(name) and not m.in_features % (p.block or p.min_inner):
            total += p.layer_bytes(m.out_features, m.in_features)
            seen.add(id(m.weight))
    return total + 2 * sum(q.numel() for q in {id(q): q for q in module.parameters()}.values() if id(q) not in seen)
