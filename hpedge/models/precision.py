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
def fp32_compute(module: Any) -> Iterator[Any]:
    """Run ``module`` in float32 while its weights stay stored in 16 bits (a no-op for a float32 module).

    Each submodule with 16-bit parameters or buffers of its own gets a forward pre-hook that swaps them for
    float32 copies and a forward hook that swaps the stored tensors back; the stored tensors are never written
    (memory-mapped checkpoint pages stay clean). Inputs must be float32 (:func:`compute_dtype` says so)."""
    import torch

    low = (torch.float16, torch.bfloat16)
    handles: list[Any] = []
    saved: dict[int, list[tuple[dict[str, Any], str, Any]]] = {}

    def up(m: Any, _args: Any) -> None:
        stash = []
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is not None and t.dtype in low:
                    stash.append((table, name, t))
                    wide = t.detach().float()
                    table[name] = torch.nn.Parameter(wide, requires_grad=False) if name in m._parameters else wide
        saved.setdefault(id(m), []).append(stash)

    def down(m: Any, _args: Any, _out: Any) -> None:
        for table, name, t in saved[id(m)].pop():
            table[name] = t

    for m in module.modules():
        own = list(m._parameters.values()) + list(m._buffers.values())
        if any(t is not None and t.dtype in low for t in own):
            handles.append(m.register_forward_pre_hook(up))
            handles.append(m.register_forward_hook(down, always_call=True))
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
        setattr(module, _ACTIVE, False)
