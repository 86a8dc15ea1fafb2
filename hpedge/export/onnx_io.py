"""ONNX files on disk: the one writer of external data, streamed reads of initializers, Cast clean-up, sizes.

Weights above 256 MB go to one external data file next to the graph (:func:`save_onnx`), copied
range by range from the files they came from: no write loads a whole model's weights.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from hpedge.errors import HpedgeError

PROTOBUF_LIMIT = 1_800_000_000  # protobuf's 2 GB limit, less room for the graph
# Weights above this go to PATH.data, streamed: writing (and reading) them inline holds them two to three times
# over (tensors, the serialized message, the file's bytes), 1.1 GB of anonymous memory for a 0.34 GB file
EXTERNAL_DATA_THRESHOLD = 256_000_000


def tensor_bytes(proto: Any) -> int:
    """Bytes of a model's tensors held in the proto (initializers and Constant attributes, external ones
    excluded). ``ByteSize()`` cannot say: protobuf refuses to size a message above 2 GB."""
    def size(t: Any) -> int:
        if t.data_location == 1:  # EXTERNAL
            return 0
        return len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data)) + 8 * (len(t.int64_data) + len(t.double_data))

    total = sum(size(t) for t in proto.graph.initializer)
    for n in proto.graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                total += size(a.t)
            total += sum(size(t) for t in a.tensors)
    return total


def external_files(path: Path) -> set[Path]:
    """The external data files an ONNX file refers to (read from the graph alone)."""
    import onnx

    light = onnx.load(str(path), load_external_data=False)
    tensors = list(light.graph.initializer) + [a.t for n in light.graph.node for a in n.attribute if a.HasField("t")]
    return {Path(path).parent / e.value for t in tensors for e in t.external_data if e.key == "location"}


def rewrite_onnx(path: Path) -> None:
    """Re-save an ONNX file written by another tool (ModelOpt) through :func:`save_onnx`, so that its weights
    sit where hpedge puts them (one ``PATH.data`` above the 2 GB limit, inline below) and no second copy of
    them is left beside it. The weights are streamed, never loaded as a whole."""
    import onnx

    path = Path(path)
    ours = path.with_name(path.name + ".data")
    others = external_files(path)
    if not others or others == {ours}:
        return
    light = onnx.load(str(path), load_external_data=False)
    save_onnx(light, path, base_dir=path.parent)
    for f in others - {ours}:
        f.unlink(missing_ok=True)


def _tensors(proto: Any) -> list[Any]:
    """Every tensor a model holds: initializers and node attributes (Constant values)."""
    out = list(proto.graph.initializer)
    for n in proto.graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                out.append(a.t)
            out.extend(a.tensors)
    return out


def _external(t: Any) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def save_onnx(proto: Any, path: Path, base_dir: Path | None = None, stream: bool = False) -> bool:
    """Write ``proto`` to ``path``: weights in one ``PATH.data`` file next to it above
    :data:`EXTERNAL_DATA_THRESHOLD` (256 MB; protobuf's own limit is 2 GB), inline otherwise. The one place hpedge writes
    ONNX files; returns whether external data was used.

    ``proto`` may refer to external data relative to ``base_dir`` (a model loaded with
    ``load_external_data=False``): those tensors are copied into ``PATH.data`` 64 MB at a time, never loaded
    as a whole model, so a graph above 2 GB is written holding only its graph in memory (``PATH.data`` may
    itself be the source: the new file is written beside it first). ``stream``: such a model is streamed into
    ``PATH.data`` whatever its size (inlining it holds its weights twice, as tensors and serialized: for the
    intermediate exports, which are read again from disk and never shipped inline).
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    tensors = _tensors(proto)
    external = [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]
    if external and base_dir is None:
        raise ValueError("save_onnx: the model refers to external data; pass base_dir")
    ext_bytes = sum(int(_external(t).get("length", 0)) for t in external)
    if tensor_bytes(proto) + ext_bytes <= EXTERNAL_DATA_THRESHOLD and not (stream and external):
        if external:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(proto, str(base_dir))
        onnx.save_model(proto, str(path))
        data.unlink(missing_ok=True)  # a stale file of an earlier, larger save
        return False
    partial = data.with_name(data.name + ".partial")
    with open(partial, "wb") as out:
        for t in tensors:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = _external(t)
                src = Path(base_dir) / info["location"]  # type: ignore[arg-type]
                offset = int(info.get("offset", 0))
                length = int(info["length"]) if "length" in info else src.stat().st_size - offset
                pos = _align(out)
                _copy_range(src, offset, length, out, t.name)
            else:
                raw = _raw_bytes(t)
                if len(raw) < 1024:
                    continue
                pos = _align(out)
                out.write(raw)
                length = len(raw)
            _point_to(t, data.name, pos, length)
    partial.replace(data)
    onnx.save_model(proto, str(path))
    return True


class Spill:
    """New tensors written to disk as they are made, for a pass that builds a graph's weights one at a time:
    :meth:`add` appends a tensor's bytes to the file ``folder/name`` and returns a header (the same tensor with
    its data external), so that the graph in memory holds no weights; :func:`save_onnx` with ``base_dir=folder``
    then streams them into the final file (put the spill file beside the external data a graph already refers
    to: one ``base_dir`` serves both). Use as a context manager (the file is removed on exit)."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.path = self.folder / name
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed by __exit__

    def add(self, proto: Any) -> Any:
        """``proto`` (a TensorProto with its data inline) -> a new header whose data is in the spill file. A new
        message, not ``proto`` cleared: protobuf's arena keeps a cleared field's bytes until the message itself
        goes, so headers made by clearing held every spilled weight (2.4 GB at 2.24 B parameters)."""
        import onnx

        raw = _raw_bytes(proto)
        pos = _align(self._f)
        self._f.write(raw)
        del raw
        header = onnx.TensorProto(name=proto.name, data_type=proto.data_type, dims=list(proto.dims))
        _point_to(header, self.name, pos, self._f.tell() - pos)
        return header

    def flush(self) -> None:
        self._f.flush()

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)


def weight_key(w: np.ndarray) -> str:
    """A weight's identity: its type, shape and bytes (a quantized weight keyed as the quantizer read it, [K, N], and
    traced back to its PyTorch layer by :mod:`hpedge.export.dequantized`)."""
    h = hashlib.sha1(f"{w.dtype.str}{tuple(w.shape)}".encode())
    h.update(np.ascontiguousarray(w).data)
    return h.hexdigest()


def read_array(tensor: Any, base_dir: str | Path = "") -> Any:
    """The values of one initializer as a numpy array, its external data read from ``base_dir``. Unlike
    ``onnx.numpy_helper.to_array`` this leaves ``tensor`` as it was (to_array stores the bytes it reads in the
    proto, so reading every weight of a graph loaded without its weights would end holding all of them)."""
    import onnx
    from onnx import numpy_helper

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    t = onnx.TensorProto()
    t.CopyFrom(tensor)  # a header: the data is in the file
    return numpy_helper.to_array(t, base_dir=str(base_dir))


def _copy_range(src: Path, offset: int, length: int, out: Any, name: str) -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, 64 << 20))
            if not chunk:
                raise HpedgeError(f"{src} ends before tensor {name!r} does (truncated external data)")
            out.write(chunk)
            left -= len(chunk)


def _align(f: Any, to: int = 4096) -> int:
    """Pad ``f`` to a multiple of ``to`` (ONNX Runtime can map aligned external tensors); returns the offset."""
    pad = -f.tell() % to
    if pad:
        f.write(b"\0" * pad)
    return int(f.tell())


def _point_to(t: Any, location: str, offset: int, length: int) -> None:
    """Make ``t`` a header whose data are ``length`` bytes at ``offset`` of the file ``location``."""
    import onnx

    for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(f)
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = onnx.TensorProto.EXTERNAL


def _raw_bytes(t: Any) -> bytes:
    from onnx import numpy_helper

    if t.HasField("raw_data"):
        return bytes(t.raw_data)
    # through from_array, which packs 4-bit types two to a byte as ONNX stores them (tobytes() would not)
    return bytes(numpy_helper.from_array(numpy_helper.to_array(t)).raw_data)


def drop_noop_casts(proto: Any, light: Any) -> int:
    """Remove ``Cast`` nodes whose input already has the target type (e.g. diffusers' ``.to(x.dtype)`` in
    AdaLayerNormContinuous, traced in an fp16 graph as an fp16 -> fp16 Cast). ModelOpt's INT4 pass
    rewrites such a Cast into an fp32 one and ONNX Runtime then rejects the graph. Types come from shape
    inference on ``light`` (the same graph without weights, so models above 2 GB work too)."""
    return drop_casts(proto, value_types(light), lambda src, to: src == to)


def value_types(light: Any) -> dict[str, int]:
    """Element type of every value of a graph (shape inference on ``light``: a graph without its weights works)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(light)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input,
                                                             *inferred.graph.output)}
    types.update({t.name: t.data_type for t in light.graph.initializer})
    return types


def drop_casts(proto: Any, types: dict[str, int], noop: Any) -> int:
    """Remove the ``Cast`` nodes for which ``noop(input type, to)`` holds (consumers read the input instead);
    returns how many."""
    graph_outputs = {o.name for o in proto.graph.output}
    rename: dict[str, str] = {}
    keep = []
    for n in proto.graph.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
        to = next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None
        if to is not None and noop(types.get(n.input[0]), to) and n.output[0] not in graph_outputs:
            rename[n.output[0]] = n.input[0]
            continue
        keep.append(n)
    if rename:
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
    return len(rename)


def onnx_files(path: Path) -> list[Path]:
    """The ONNX file and its external data file, if any."""
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data)
    return files


def size_of(path: Path) -> int:
    return sum(os.path.getsize(f) for f in onnx_files(path))


def initializer_bytes(path: Path) -> int:
    """Bytes of an ONNX file's weights (initializers and Constant tensors, external data included) as stored."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def size(t: Any) -> int:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            return int(next((e.value for e in t.external_data if e.key == "length"), 0))
        return len(t.raw_data) if t.raw_data else t.ByteSize()

    total = sum(size(t) for t in model.graph.initializer)
    for n in model.graph.node:
        if n.op_type == "Constant":
            total += sum(size(a.t) for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)
    return total
