"""A transformer held in 16 bits and computed in float32.

Published SD3.5 and FLUX.1 checkpoints store their transformers in bfloat16. Upcasting the whole model to
float32 holds 4 bytes per parameter (twice the checkpoint); :func:`fp32_compute` instead upcasts one
submodule's own weights for the duration of its forward and puts the 16-bit tensors back right after. Every
value is then computed exactly as in a float32 model loaded from the same checkpoint (a 16-bit value is exact in
float32), while the process holds the 16-bit weights plus one submodule's float32 copy at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_ACTIVE = "_hpedge_fp32_compute"


def compute_dtype(module: Any) -> Any:
    """The dtype ``module`` computes in: float32 inside :func:`fp32_compute`, else its weights' dtype."""
    import torch

    return torch.float32 if getattr(module, _ACTIVE, False) else next(module.parameters()).dtype


@contextlib.contextmanager
def fp32_compute(module: Any, units: list[Any] | None = None, resident: list[Any] | None = None) -> Iterator[Any]:
    """Run ``module`` in float32 while its weights stay stored in 16 bits (a no-op for a float32 module).

    Each submodule with 16-bit parameters or buffers of its own gets a forward pre-hook that swaps them for
    float32 copies and a forward hook that swaps the stored tensors back; the stored tensors are never written
    (memory-mapped checkpoint pages stay clean). Inputs must be float32 (:func:`compute_dtype` says so).

    ``units``: submodules whose whole subtree is swapped for their forward (code that reads a child's weight dtype
    before calling it, as T5's feed-forward does, then sees float32); ``resident``: submodules swapped for the whole
    context (a transformers model reports the dtype of its first parameter, and diffusers casts T5's output to it)."""
    import torch

    low = (torch.float16, torch.bfloat16)
    handles: list[Any] = []
    saved: dict[int, list[tuple[dict[str, Any], str, Any]]] = {}
    units, resident = list(units or []), list(resident or [])

    def widen(ms: list[Any]) -> list[tuple[dict[str, Any], str, Any]]:
        stash = []
        for m in ms:
            for table in (m._parameters, m._buffers):
                for name, t in table.items():
                    if t is not None and t.dtype in low:
                        stash.append((table, name, t))
                        wide = t.detach().float()
                        table[name] = torch.nn.Parameter(wide, requires_grad=False) if name in m._parameters else wide
        return stash

    def up(m: Any, _args: Any) -> None:
        saved.setdefault(id(m), []).append(widen(list(m.modules()) if id(m) in unit_ids else [m]))

    def down(m: Any, _args: Any, _out: Any) -> None:
        for table, name, t in saved[id(m)].pop():
            table[name] = t

    unit_ids = {id(u) for u in units}
    inside = {id(d) for u in units for d in u.modules() if d is not u}
    for m in module.modules():
        if id(m) in inside:
            continue
        own = [t for d in (m.modules() if id(m) in unit_ids else [m]) for t in (*d._parameters.values(), *d._buffers.values())]
        if any(t is not None and t.dtype in low for t in own):
            handles.append(m.register_forward_pre_hook(up))
            handles.append(m.register_forward_hook(down, always_call=True))
    kept = widen(resident)
    setattr(module, _ACTIVE, True)
    try:
        yield module
    finally:
        for h in handles:
            h.remove()
        for m in module.modules():  # a forward interrupted between its hooks: put the stored tensors back
            for stash in saved.pop(id(m), []):
                for table, name, t in stash:
                    table[name] = t
        for table, name, t in kept:
            table[name] = t
        setattr(module, _ACTIVE, False)


@contextlib.contextmanager
def t5_fp32_compute(t5: Any) -> Iterator[Any]:
    """A transformers T5 encoder stored in 16 bits computed as its float32 model computes, and reporting float32
    as its dtype (the pipelines cast T5's output to it): one block's float32 copy at a time, the shared embedding
    for the whole context (it is the first parameter, whose dtype transformers reports). A float32 T5: no-op."""
    import torch

    blocks = list(t5.encoder.block)
    with fp32_compute(t5, units=blocks, resident=[t5.shared]):
        if next(t5.parameters()).dtype in (torch.float16, torch.bfloat16) or t5.dtype != torch.float32:
            raise RuntimeError(f"internal: {type(t5).__name__} does not report float32 inside t5_fp32_compute")
        yield t5
