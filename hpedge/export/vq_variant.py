"""The package's ``vq`` transformer variant: the exported graph with its codebook layers as codebook lookups.

A pipeline ``hpedge compress --vq`` wrote stores its transformer's dequantized weights (stock-loadable) and, beside
them, the codes, codebooks and scales (:mod:`hpedge.models.codebooks`). The export's graph (``--compute``'s type) is
exported from the dequantized weights as any other; this variant is that graph with each codebook layer's constant
weight replaced by the lookup that computes it (:func:`hpedge.export.vq_graph.rewrite`): the file holds one byte
per code (8-bit codes: M bytes per group of g weights) instead of 2 bytes per weight.

Its implementation reference (:func:`reference_transformer`) is PyTorch with the graph's own weights: the codebook
layers' float32 weights (the lookups compute in float32 and cast to the graph's type, which the graph's float32
view widens back), every other parameter rounded to the graph's type; computed in float32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hpedge.errors import HpedgeError
from hpedge.export.onnx_io import save_onnx
from hpedge.export.vq_graph import rewrite
from hpedge.models import codebooks

VARIANT = "vq"


def source_file(folder: Path | None) -> Path | None:
    """The codebook file of pipeline folder ``folder``, if it has one."""
    f = folder / codebooks.FILE if folder is not None else None
    return f if f is not None and f.exists() else None


def write_graph(src: Path, dst: Path, vq_file: Path) -> dict[str, Any]:
    """``dst``: graph ``src`` with the codebook layers of ``vq_file`` as lookups (its other weights copied from
    ``src``'s files range by range, never held as a whole). Returns the manifest's summary of it."""
    import onnx

    spec, tensors = codebooks.read(vq_file)
    layers = codebooks.layers_of(tensors)
    model = onnx.load(str(src), load_external_data=False)
    done = rewrite(model, layers, base_dir=src.parent)
    save_onnx(model, dst, base_dir=src.parent)
    return {"layers": len(done), "codebooks": spec["codebooks"], "bits": spec["bits"], "group": spec["group"],
            "code_bytes_per_code": 1 if spec["bits"] <= 8 else 2,
            "lookup": "Cast(codes) + offsets -> Gather(codebooks) -> ReduceSum -> Reshape -> Mul(scales) -> Cast -> MatMul"}


def reference_transformer(transformer: Any, vq_file: Path, graph_dtype: str) -> int:
    """``transformer`` (float32, read from the pipeline folder: its codebook layers hold their float32 dequantized
    weights) given the vq graph's own weights, in place: every parameter but the codebook layers' weights rounded
    to ``graph_dtype`` ("fp16" or "fp32") and kept float32. Returns how many codebook layers it has."""
    import torch

    _, tensors = codebooks.read(vq_file)
    names = {f"{n}.weight" for n in codebooks.layers_of(tensors)}
    missing = names - {n for n, _ in transformer.named_parameters()}
    if missing:
        raise HpedgeError(f"{vq_file}: {len(missing)} codebook layer(s) are not in the transformer "
                          f"(first: {sorted(missing)[0]})")
    if next(transformer.parameters()).dtype != torch.float32:
        raise HpedgeError("internal: the vq reference needs the float32 transformer hpedge compress writes")
    if graph_dtype == "fp16":
        with torch.no_grad():
            for n, t in list(transformer.named_parameters()) + list(transformer.named_buffers()):
                if n not in names and t.is_floating_point():
                    t.copy_(t.half().float())
    return len(names)
