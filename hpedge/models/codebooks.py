"""The stored form of vector-quantized weights (``hpedge compress --vq``), read by compress, export and check alike.

``vq/transformer.safetensors``: per layer ``NAME.codes`` (bit-packed, B bits per code: :func:`pack`),
``NAME.codebooks`` [M, 2**B, g] and ``NAME.scales`` [out, 1]; its metadata holds the format, the spec and each
layer's code shape. A weight is :func:`dequantize` of the three.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpedge.errors import HpedgeError

FILE = "vq/transformer.safetensors"
FORMAT = "hpedge-vq/1"


def code_dtype(bits: int) -> Any:
    import torch

    return torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32


def dequantize(codes: Any, codebooks: Any, scales: Any) -> Any:
    """The weight [out, in]: ``scales[o] * sum_m codebooks[m][codes[o, j, m]]`` for each group ``j``.

    codes [out, in/g, M] (integers), codebooks [M, 2**B, g], scales [out, 1]."""
    import torch

    out, ngroups, m = codes.shape
    idx = codes.long()
    parts = [codebooks[k][idx[..., k]] for k in range(m)]  # each [out, in/g, g]
    w = torch.stack(parts, 0).sum(0) if m > 1 else parts[0]
    return w.reshape(out, ngroups * codebooks.shape[-1]) * scales


def pack(codes: Any, bits: int) -> Any:
    """Codes (non-negative integers < 2**bits) as a flat uint8 bit stream, ``bits`` bits each, least significant
    first (the file's form: M x B / g bits per weight exactly)."""
    import torch

    flat = codes.reshape(-1).long()
    stream = ((flat[:, None] >> torch.arange(bits)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)])
    return (stream.reshape(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def unpack(data: Any, bits: int, shape: tuple[int, ...]) -> Any:
    """:func:`pack`'s inverse: codes of ``shape`` in the in-memory integer type of ``bits``."""
    import torch

    n = 1
    for s in shape:
        n *= s
    stream = ((data.long()[:, None] >> torch.arange(8)) & 1).reshape(-1)[: n * bits]
    codes = (stream.reshape(n, bits) << torch.arange(bits)).sum(1)
    return codes.reshape(shape).to(code_dtype(bits))


def read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The spec and tensors of a saved VQ file, codes unpacked (a clear error for anything else)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors_ = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except (OSError, ValueError) as e:
        raise HpedgeError(f"cannot read the vector-quantized weights {path}: {str(e).splitlines()[0][:160]}") from None
    if meta.get("format") != FORMAT:
        raise HpedgeError(f"{path} is not an hpedge VQ file (format {meta.get('format')!r}, expected {FORMAT})")
    spec = json.loads(meta["spec"])
    for name, shape in json.loads(meta["code_shapes"]).items():
        tensors_[f"{name}.codes"] = unpack(tensors_[f"{name}.codes"], spec["bits"], tuple(shape))
    return spec, tensors_


def layers_of(tensors: dict[str, Any]) -> dict[str, tuple[Any, Any, Any]]:
    """Layer name -> (codes, codebooks, scales) of :func:`read`'s tensors."""
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return {n: (tensors[f"{n}.codes"], tensors[f"{n}.codebooks"], tensors[f"{n}.scales"]) for n in names}


