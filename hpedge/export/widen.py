"""The fp16 transformer graph computed in float32, sharing the fp16 graph's weight file.

An export checks its graph against PyTorch element-wise in float32 before anything is quantized. Exporting a
second, float32 graph for that held 4 bytes per parameter in the exporter and again in ONNX Runtime; the view
written here is the fp16 graph itself with every 16-bit type widened to float32: its fp16 initializers stay
where they are on disk (same external data file) and each feeds a ``Cast`` to float32, every ``Cast`` to fp16 casts
to float32 instead, and 16-bit constants become float32 constants of the same values. Run without constant folding
(:func:`hpedge.backends.ort.session`, ``low_memory``), ONNX Runtime holds the 16-bit weights and widens one
weight at a time; the graph computes what a float32 model with the same (16-bit) weights computes, so the
PyTorch reference is that model (:func:`hpedge.models.precision.fp32_compute`) and the tolerance stays float32's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpedge.errors import HpedgeError

SUFFIX = "::stored"


def _narrow_types() -> tuple[int, ...]:
    from onnx import TensorProto

    return (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _widen_tensor(t: Any) -> Any:
    """A float32 TensorProto with the values (and name) of a 16-bit one."""
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)


def _widen_nodes(nodes: Any) -> int:
    """Widen the 16-bit types in ``nodes`` in place (subgraphs too); returns how many nodes changed."""
    from onnx import AttributeProto, TensorProto

    narrow = _narrow_types()
    changed = 0
    for node in nodes:
        for a in node.attribute:
            hit = False
            if a.name in ("to", "dtype") and a.type == AttributeProto.INT and a.i in narrow:
                a.i = TensorProto.FLOAT
                hit = True
            elif a.type == AttributeProto.TENSOR and a.t.data_type in narrow:
                a.t.CopyFrom(_widen_tensor(a.t))
                hit = True
            elif a.type == AttributeProto.GRAPH:
                hit = widen_graph(a.g) > 0
            elif a.type == AttributeProto.GRAPHS:
                hit = sum(widen_graph(g) for g in a.graphs) > 0
            changed += hit
    return changed


def widen_graph(g: Any) -> int:
    """Widen graph ``g`` in place: 16-bit initializers are kept (renamed) and cast to float32 where they were;
    returns the number of changed nodes and initializers."""
    from onnx import AttributeProto, TensorProto, helper

    narrow = _narrow_types()
    kept = []
    for node in g.node:  # a 16-bit Constant (its tensor may be in the external data file) becomes an initializer
        a = node.attribute[0] if node.op_type == "Constant" else None
        if a is not None and a.type == AttributeProto.TENSOR and a.t.data_type in narrow:
            t = g.initializer.add()
            t.CopyFrom(a.t)
            t.name = node.output[0]
        else:
            kept.append(node)
    del g.node[:]
    g.node.extend(kept)
    casts = []
    for init in g.initializer:
        if init.data_type in narrow:
            name = init.name
            init.name = name + SUFFIX
            casts.append(helper.make_node("Cast", [init.name], [name], to=TensorProto.FLOAT, name=name + "::widen"))
    changed = _widen_nodes(g.node) + len(casts)
    for node in reversed(casts):
        g.node.insert(0, node)
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type in narrow:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
            changed += 1
    del g.value_info[:]  # intermediate types are no longer what they said; ONNX Runtime infers them
    return changed


def fp32_view(src: Path, name: str = "fp32_view.onnx", folder: Path | None = None) -> Path:
    """Write the float32 view of the fp16 graph ``src`` beside it, or in ``folder`` (its external data, if any, is
    shared, not copied: a view written elsewhere is run with ``src``'s folder as its data folder,
    :func:`hpedge.backends.ort.session`); returns the view's path. Raises if the graph has nothing 16-bit."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    changed = widen_graph(model.graph)
    for f in model.functions:
        changed += _widen_nodes(f.node)
    if not changed:
        raise HpedgeError(f"internal: {src} has no 16-bit type to widen")
    dst = (folder or src.parent) / name
    onnx.save(model, str(dst))  # external data entries keep naming the fp16 graph's file (beside ``src``)
    return dst
