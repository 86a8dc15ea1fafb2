"""Attention computed a block of queries at a time, in the ONNX graph (exact: each query's softmax is its own).

The VAE decoder's mid-block attends over every latent pixel: at 1024 px (128 x 128 latents) its score matrix is
16384 x 16384, 1.07 GB in float32, and ONNX Runtime holds the scores and their softmax at once (2.2 GB measured for
one decode on the CPU, more than the rest of a small package's run together; 3.2 GB of scores at 1344 px).
:func:`chunk_attention` rewrites each ``MatMul(Q, K^T) -> Softmax(axis=-1) -> MatMul(., V)`` into ``chunks``
such chains over consecutive blocks of Q's rows (``Split`` with ``num_outputs``, opset 18), joined by ``Concat``;
the scores are then held for one block at a time. Plain ONNX operators: TensorRT and ONNX Runtime run it as they
run the unsplit graph.
"""
from __future__ import annotations

import math
from typing import Any

from hpedge.errors import HpedgeError

#: query blocks at most: 16 keeps a 1344 px decode's float32 scores at 0.2 GB per block
MAX_CHUNKS = 16


def chunks_for(min_tokens: int, max_tokens: int, max_chunks: int = MAX_CHUNKS) -> int:
    """The number of query blocks for attention over ``min_tokens`` .. ``max_tokens`` positions: ``max_chunks``,
    fewer where the shortest sequence would leave a block empty (ONNX ``Split`` with ``num_outputs`` makes blocks
    of ceil(n / chunks) rows, the last one smaller), and 1 (no split) when even the longest is short."""
    if min_tokens < 1 or max_tokens < min_tokens:
        raise HpedgeError(f"attention over {min_tokens}..{max_tokens} positions: not a range")
    n = min(max_chunks, max(1, math.ceil(max_tokens / 1024)))  # 1024 queries or fewer: not worth a split
    while n > 1 and math.ceil(min_tokens / n) * (n - 1) >= min_tokens:
        n -= 1
    return n


def _axis(node: Any, default: int) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return default


def chunk_attention(model: Any, chunks: int) -> int:
    """Rewrite, in place, every ``MatMul -> Softmax(axis=-1) -> MatMul`` chain of ``model`` (an ``onnx.ModelProto``,
    opset >= 18) whose score and softmax tensors feed nothing else into ``chunks`` chains over blocks of the query
    rows; returns how many chains were rewritten."""
    from onnx import helper

    if chunks < 2:
        return 0
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 18:
        raise HpedgeError(f"splitting attention needs ONNX opset 18 or newer (Split's num_outputs); the graph has {opset}")
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    replace: dict[int, list[Any]] = {}  # id of the final MatMul -> the nodes that take its place
    gone: set[int] = set()
    for sm in graph.node:
        if sm.op_type != "Softmax" or _axis(sm, -1) != -1:
            continue
        qk = producer.get(sm.input[0])
        after = users.get(sm.output[0], [])
        if qk is None or qk.op_type != "MatMul" or len(after) != 1 or after[0].op_type != "MatMul":
            continue
        av = after[0]
        if av.input[0] != sm.output[0] or len(users.get(qk.output[0], [])) != 1 or {qk.output[0], sm.output[0]} & outputs:
            continue
        stem = (sm.name or sm.output[0]) + "/chunk"
        q, k, v = qk.input[0], qk.input[1], av.input[1]
        parts = [f"{stem}{i}/q" for i in range(chunks)]
        nodes = [helper.make_node("Split", [q], parts, name=f"{stem}/split", axis=-2, num_outputs=chunks)]
        done = []
        for i, part in enumerate(parts):
            s, p, o = f"{stem}{i}/scores", f"{stem}{i}/softmax", f"{stem}{i}/out"
            nodes += [helper.make_node("MatMul", [part, k], [s], name=f"{stem}{i}/qk"),
                      helper.make_node("Softmax", [s], [p], name=f"{stem}{i}/softmax", axis=-1),
                      helper.make_node("MatMul", [p, v], [o], name=f"{stem}{i}/av")]
            done.append(o)
        nodes.append(helper.make_node("Concat", done, [av.output[0]], name=f"{stem}/concat", axis=-2))
        replace[id(av)] = nodes
        gone |= {id(qk), id(sm)}
    if not replace:
        return 0
    stale = {o for n in graph.node if id(n) in gone for o in n.output}
    kept = []
    for n in graph.node:
        if id(n) in gone:
            continue
        kept.extend(replace.get(id(n), [n]))  # the chain's inputs all exist before its last node: still sorted
    del graph.node[:]
    graph.node.extend(kept)
    infos = [vi for vi in graph.value_info if vi.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return len(replace)
