"""What a graph's activations look like on the calibration inputs, measured inside the graph: rows of them (hpedge's
AWQ-clip search, :func:`hpedge.export.quantize.sample_activations`) or their largest magnitude (the FP8 / NVFP4
activation scales, :func:`activation_amax`).

Each measured tensor gets a small chain of nodes whose output is added to the graph's outputs, placed just before
the tensor's first reader (ONNX Runtime follows the node order; chains appended at the end kept every activation of a
run alive until then); one ONNX Runtime session without constant folding over a graph-only copy that shares the
source's weight file runs the feeds one batch row at a time (attention scores grow with batch x tokens^2)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hpedge.backends import ort

# (the measured tensor, the chain's name prefix) -> (its nodes, its output); may add initializers to the graph
Chain = Callable[[Any, str, str], tuple[list[Any], str]]


def rows_of(feed: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """A batched transformer input as one input per batch row; inputs without the batch axis (FLUX's 2-D position
    ids) are shared by every row."""
    n = feed["hidden_states"].shape[0] if "hidden_states" in feed else 1
    batched = {k for k, v in feed.items() if v.ndim > 0 and v.shape[0] == n and not k.endswith("_ids")}
    if n == 1 or not batched:
        return [feed]
    return [{k: np.ascontiguousarray(v[i : i + 1]) if k in batched else v for k, v in feed.items()} for i in range(n)]


def probe(onnx_path: Path, names: list[str], feeds: list[dict[str, np.ndarray]], chain: Chain,
          prepare: Callable[[Any], None] | None = None) -> dict[str, list[np.ndarray]]:
    """Each of ``names`` measured by ``chain`` on every batch row of ``feeds``: name -> one array per row.
    ``prepare(graph)`` adds what the chains share (initializers) first."""
    import onnx

    rows = [row for f in feeds for row in rows_of(f)]
    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    if prepare is not None:
        prepare(g)
    chains, outs = {}, {}
    for i, name in enumerate(sorted(names)):
        nodes, out = chain(g, name, f"probe::{i}::")
        chains[name] = nodes
        g.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
        outs[name] = out
    order = []
    for node in g.node:
        for x in node.input:
            if x in chains:
                order.extend(chains.pop(x))
        order.append(node)
    del g.node[:]
    g.node.extend(order)
    view = Path(onnx_path).with_name("activation_probe.onnx")
    onnx.save(model, str(view))  # graph only: the weights stay in the source's external data file
    del model
    got: dict[str, list[np.ndarray]] = {n: [] for n in outs}
    try:
        sess = ort.session(view, "auto", low_memory=True)  # CUDA where ONNX Runtime has it and a GPU is present
        inputs = [i.name for i in sess.get_inputs()]
        ordered = list(outs)
        for feed in rows:
            for n, a in zip(ordered, sess.run([outs[n] for n in ordered], {k: feed[k] for k in inputs})):
                got[n].append(a)
        del sess
        ort.return_freed_memory()
    finally:
        view.unlink(missing_ok=True)
    return got


def activation_amax(onnx_path: Path, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """max |x| of each activation ``names`` of graph ``onnx_path`` over the calibration ``feeds``."""
    from onnx import TensorProto, helper

    def chain(_g: Any, name: str, p: str) -> tuple[list[Any], str]:
        return [helper.make_node("Cast", [name], [p + "f"], to=TensorProto.FLOAT),
                helper.make_node("Abs", [p + "f"], [p + "abs"]),
                helper.make_node("ReduceMax", [p + "abs"], [p + "out"], keepdims=0)], p + "out"

    got = probe(onnx_path, names, feeds, chain)
    return {n: float(max(np.max(a) for a in parts)) for n, parts in got.items()}
