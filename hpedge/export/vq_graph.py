"""Codebook weights in an ONNX graph: a MatMul's constant weight replaced by its vector-quantized form.

For a layer of :mod:`hpedge.compress.vq` (codes [out, in/g, M], codebooks [M, 2**B, g], scales [out, 1]) the graph
keeps the codes as integers and computes the weight in float32 before the MatMul, as OpenVINO's NNCF writes codebook
weights::

    Cast(codes -> int32) + offsets -> Gather(codebooks [M * 2**B, g]) -> ReduceSum over M -> Reshape [out, in]
    -> Mul(scales) -> Transpose [in, out] -> Cast(graph type) -> MatMul   (a Gemm with transB: no Transpose)

The layer is found by its dense weight: the exported graph's initializer [in, out] whose bytes equal the transposed
dequantized weight cast to the graph's type (:func:`hpedge.export.onnx_io.weight_key`), so the rewrite does not
depend on the exporter's node names. A codebook layer whose weight is not found is an error, not a skip.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hpedge.errors import HpedgeError
from hpedge.export.onnx_io import read_array, weight_key


def layer_keys(layers: dict[str, tuple[Any, Any, Any]], dtype: Any) -> dict[str, tuple[str, bool]]:
    """The key of each layer's dense weight as a graph may store it, ``dtype`` ([in, out] for a MatMul, or [out, in]
    for a Gemm with transB), computed as :func:`hpedge.models.codebooks.dequantize` computes it (float32), then cast
    -> (layer name, whether the graph's weight is transposed, [in, out])."""
    from hpedge.models.codebooks import dequantize

    out = {}
    for name, (codes, books, scales) in layers.items():
        w = dequantize(codes, books.float(), scales.float()).detach().cpu().numpy().astype(dtype)
        out[weight_key(np.ascontiguousarray(w.T))] = (name, True)
        out[weight_key(np.ascontiguousarray(w))] = (name, False)
    return out


def rewrite(model: Any, layers: dict[str, tuple[Any, Any, Any]], base_dir: str | Path = "") -> dict[str, str]:
    """Replace, in ``model`` (an ``onnx.ModelProto``, changed in place), the constant weight of every MatMul that is a
    codebook layer of ``layers`` (name -> (codes, codebooks, scales), torch tensors). Returns layer -> MatMul node."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    matmuls = [n for n in model.graph.node if len(n.input) >= 2 and n.input[1] in inits and (
        n.op_type == "MatMul" or (n.op_type == "Gemm" and _attr(n, "transB") == 1 and _attr(n, "transA") == 0))]
    keys: dict[str, dict[str, tuple[str, bool]]] = {}
    done: dict[str, str] = {}
    new_nodes: list[Any] = []
    drop: set[str] = set()
    for node in matmuls:
        t = inits[node.input[1]]
        w = read_array(t, base_dir)
        if w.ndim != 2 or w.dtype.kind != "f":
            continue
        k = keys.setdefault(w.dtype.str, layer_keys(layers, w.dtype))
        name, transposed = k.get(weight_key(np.ascontiguousarray(w)), (None, False))
        if name is None or name in done or transposed != (node.op_type == "MatMul"):
            continue
        codes, books, scales = layers[name]
        out_f, groups, m = codes.shape
        size, g = books.shape[1], books.shape[2]
        p = f"vq::{name}"
        offsets = (np.arange(m, dtype=np.int32) * size).reshape(1, 1, m)
        model.graph.initializer.extend([
            numpy_helper.from_array(codes.cpu().numpy(), f"{p}.codes"),
            numpy_helper.from_array(offsets, f"{p}.offsets"),
            numpy_helper.from_array(books.detach().float().cpu().numpy().reshape(m * size, g), f"{p}.codebooks"),
            numpy_helper.from_array(scales.detach().float().cpu().numpy(), f"{p}.scales"),
            numpy_helper.from_array(np.array([out_f, groups * g], dtype=np.int64), f"{p}.shape"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), f"{p}.axes"),
        ])
        wt = node.input[1]
        new_nodes += [
            helper.make_node("Cast", [f"{p}.codes"], [f"{p}/idx32"], to=onnx.TensorProto.INT32, name=f"{p}/cast_codes"),
            helper.make_node("Add", [f"{p}/idx32", f"{p}.offsets"], [f"{p}/idx"], name=f"{p}/offset"),
            helper.make_node("Gather", [f"{p}.codebooks", f"{p}/idx"], [f"{p}/words"], axis=0, name=f"{p}/gather"),
            helper.make_node("ReduceSum", [f"{p}/words", f"{p}.axes"], [f"{p}/groups"], keepdims=0, name=f"{p}/sum"),
            helper.make_node("Reshape", [f"{p}/groups", f"{p}.shape"], [f"{p}/rows"], name=f"{p}/reshape"),
            helper.make_node("Mul", [f"{p}/rows", f"{p}.scales"], [f"{p}/w"], name=f"{p}/scale"),
        ]
        if transposed:
            new_nodes.append(helper.make_node("Transpose", [f"{p}/w"], [f"{p}/wt"], perm=[1, 0], name=f"{p}/transpose"))
        new_nodes.append(helper.make_node("Cast", [f"{p}/wt" if transposed else f"{p}/w"], [wt], to=t.data_type,
                                          name=f"{p}/cast_weight"))
        drop.add(wt)
        done[name] = node.name
    missing = sorted(set(layers) - set(done))
    if missing:
        raise HpedgeError(f"{len(missing)} codebook layer(s) have no MatMul weight in the graph with their dequantized "
                          f"values (first: {missing[0]}); was the graph exported from this pipeline?")
    kept = [t for t in model.graph.initializer if t.name not in drop]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = new_nodes + list(model.graph.node)  # constants' subgraphs first: the graph stays topologically sorted
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return done


def _attr(node: Any, name: str) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), 0)
