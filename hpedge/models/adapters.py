"""Blocks, sub-components, parameter accounting and physical block removal for SD3 and FLUX.

Blocks are numbered globally: SD3 ``transformer_blocks`` 0..N-1; FLUX double-stream
``transformer_blocks`` 0..L-1, then ``single_transformer_blocks`` L..L+S-1.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from hpedge.errors import HpedgeError
from hpedge.models.denoise import family_of

INT4_BLOCK = 128


@dataclass(frozen=True)
class BlockRef:
    index: int  # global index
    kind: str  # "joint" (SD3), "double" or "single" (FLUX)
    local: int  # index inside its ModuleList
    module: Any = field(compare=False, repr=False)


# Sub-components per block kind: name -> attribute path inside the block. Names follow the reference
# (w_norm1 = the image stream's AdaLN modulation linear, w_norm1_context = the context stream's).
SD3_COMPONENTS = {
    "attn": "attn",
    "attn2": "attn2",
    "ff": "ff",
    "ff_context": "ff_context",
    "w_norm1": "norm1.linear",
    "w_norm1_context": "norm1_context.linear",
}
FLUX_DOUBLE_COMPONENTS = {
    "attn": "attn",
    "ff": "ff",
    "ff_context": "ff_context",
    "w_norm1": "norm1.linear",
    "w_norm1_context": "norm1_context.linear",
}
FLUX_SINGLE_COMPONENTS = {
    "attn": "attn",
    "w_norm": "norm.linear",
    "proj_mlp_out": "proj_mlp",
}


def _get(module: Any, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def blocks(transformer: Any) -> list[BlockRef]:
    if family_of(transformer) == "sd3":
        return [BlockRef(i, "joint", i, b) for i, b in enumerate(transformer.transformer_blocks)]
    double = [BlockRef(i, "double", i, b) for i, b in enumerate(transformer.transformer_blocks)]
    n = len(double)
    single = [BlockRef(n + i, "single", i, b) for i, b in enumerate(transformer.single_transformer_blocks)]
    return double + single


def components(block: BlockRef) -> dict[str, Any]:
    """The sub-components present in ``block`` (e.g. the final SD3 block has no ff_context)."""
    table = {"joint": SD3_COMPONENTS, "double": FLUX_DOUBLE_COMPONENTS, "single": FLUX_SINGLE_COMPONENTS}[block.kind]
    out = {name: _get(block.module, path) for name, path in table.items()}
    if block.kind == "single":
        out["proj_mlp_out"] = [block.module.proj_mlp]  # proj_out is shared with attention
    return {k: v for k, v in out.items() if v is not None}


def numel(module: Any) -> int:
    if isinstance(module, list):
        return sum(numel(m) for m in module)
    return sum(p.numel() for p in module.parameters())


def int4_bytes(module: Any, block_size: int = INT4_BLOCK, other_bytes: int = 2, scale_bytes: int = 2) -> int:
    """Bytes with INT4 linear weights (one ``scale_bytes`` scale per block) and ``other_bytes`` for the rest.

    Defaults describe a TensorRT deployment (fp16 scales, 16 bits elsewhere), which is what the
    package's TensorRT-input INT4 file (``--compute fp16``) stores; a test checks this formula against
    that file's weights.

    Linear weights whose input dimension is not a multiple of ``block_size`` stay in 16 bits; this is
    the same rule the ONNX INT4 export applies, so estimates and exported sizes agree.
    """
    import torch.nn as nn

    total = 0
    seen: set[int] = set()
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.in_features % block_size == 0:
            w = m.weight
            total += w.numel() // 2 + (w.numel() // block_size) * scale_bytes
            seen.add(id(w))
    for p in module.parameters():
        if id(p) not in seen:
            total += p.numel() * other_bytes
    return total


def validate_removal(transformer: Any, remove: set[int]) -> None:
    refs = blocks(transformer)
    n = len(refs)
    bad = sorted(i for i in remove if i < 0 or i >= n)
    if bad:
        raise HpedgeError(f"block index {bad[0]} is out of range: this transformer has blocks 0..{n - 1}")
    if family_of(transformer) == "sd3":
        if n - 1 in remove:
            raise HpedgeError(
                f"the final SD3 block ({n - 1}) is context_pre_only and cannot be removed; choose other blocks"
            )
        if len(remove) >= n - 1:
            raise HpedgeError("at least one block besides the final SD3 block must be kept")
    else:
        doubles = sum(1 for r in refs if r.kind == "double")
        if all(i in remove for i in range(doubles)) or all(i in remove for i in range(doubles, n)):
            raise HpedgeError("FLUX needs at least one double-stream and one single-stream block")


def prune(transformer: Any, remove: set[int] | list[int]) -> tuple[Any, list[int]]:
    """A copy of ``transformer`` with blocks ``remove`` physically deleted and its config rewritten.

    Returns (pruned transformer, kept original indices). ``save_pretrained`` of the result loads with
    stock ``from_pretrained``.
    """
    import torch.nn as nn

    remove = set(remove)
    validate_removal(transformer, remove)
    # The removed blocks are not copied (an empty module stands in for them until the lists are rebuilt): the
    # copy never holds more than the student, wherever the teacher lives.
    # Buffers (SD3's positional embedding table: 0.9 GB in fp32 for SD3.5 Medium) are constants: shared, not
    # copied (``.to()`` of either model gives it its own again).
    memo: dict[int, Any] = {id(r.module): nn.Module() for r in blocks(transformer) if r.index in remove}
    memo.update({id(b): b for b in transformer.buffers()})
    model = copy.deepcopy(transformer, memo)
    refs = blocks(model)
    kept = [r.index for r in refs if r.index not in remove]
    if family_of(model) == "sd3":
        model.transformer_blocks = nn.ModuleList([r.module for r in refs if r.index not in remove])
        dual = set(model.config.get("dual_attention_layers", ()) or ())
        new_dual = tuple(new for new, old in enumerate(kept) if old in dual)
        model.register_to_config(num_layers=len(kept), dual_attention_layers=new_dual)
    else:
        model.transformer_blocks = nn.ModuleList([r.module for r in refs if r.kind == "double" and r.index not in remove])
        model.single_transformer_blocks = nn.ModuleList(
            [r.module for r in refs if r.kind == "single" and r.index not in remove]
        )
        model.register_to_config(
            num_layers=len(model.transformer_blocks), num_single_layers=len(model.single_transformer_blocks)
        )
    return model, kept


def describe(transformer: Any) -> dict[str, Any]:
    """Blocks, components and parameter/byte counts (works on the meta device)."""
    refs = blocks(transformer)
    total = numel(transformer)
    rows = []
    for r in refs:
        comps = components(r)
        rows.append(
            {
                "index": r.index,
                "kind": r.kind,
                "params": numel(r.module),
                "components": {k: numel(v) for k, v in comps.items()},
            }
        )
    return {
        "family": family_of(transformer),
        "class": type(transformer).__name__,
        "params": total,
        "block_params": sum(r["params"] for r in rows),
        "bytes": {"fp32": total * 4, "bf16": total * 2, "int4": int4_bytes(transformer)},
        "blocks": rows,
    }
