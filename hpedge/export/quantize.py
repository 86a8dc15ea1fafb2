"""INT4 weight-only quantization, streamed by hpedge (``awq_clip``, the default, and ``rtn``), or ModelOpt's own
AWQ pass (``awq_clip_modelopt``; this is the only module that imports ``modelopt``).

Before ModelOpt runs, ``Gemm`` nodes with constant weights are rewritten as ``MatMul`` (+ ``Add``) with
the weight stored [K, N], so every linear layer is a candidate. A MatMul is excluded (and listed with
the reason) when its weight's inner dimension K is not a multiple of the block size (ONNX Runtime
rejects such blocked DequantizeLinear scales), or when it matches a user/profile pattern. After
quantization a per-layer report gives each weight's relative reconstruction error.

``rtn`` is computed here, one weight at a time, with ModelOpt's ``rtn_dq`` formula and layout (block scale
= max |w| / 7 in the weight's type, ties to even, INT4 ``NAME_i4`` + ``NAME_scale`` behind a blocked
``DequantizeLinear``; a test checks both give the same nibbles and scales): ModelOpt imports the whole graph
into GraphSurgeon twice and holds its weights several times over (13.5x the fp16 bytes measured at 0.64 B
parameters), while this pass holds the graph, one weight, and the 4-bit result. ``awq_clip`` is ModelOpt's AWQ-clip
search done the same streamed way (:func:`clip_search` on activation rows from :func:`sample_activations`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpedge.backends import ort
from hpedge.errors import HpedgeError
from hpedge.export.activations import probe, rows_of
from hpedge.export.onnx_io import Spill, read_array, rewrite_onnx, save_onnx, weight_key

# hpedge's method -> the ModelOpt calibration method it is (hpedge streams awq_clip and rtn itself; awq_clip_modelopt
# runs ModelOpt's own pass, kept to compare against)
METHODS = {"awq_clip": "awq_clip", "rtn": "rtn_dq", "awq_clip_modelopt": "awq_clip"}
CLIP_MIN = 1e-5  # ModelOpt's smallest block scale
MODELOPT_VERSION_PIN = "0.47.0"


@dataclass
class QuantReport:
    method: str
    block_size: int
    quantized: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # node -> reason
    layer_error: dict[str, float] = field(default_factory=dict)  # weight -> relative error
    seconds: float = 0.0
    modelopt_version: str = ""
    implementation: str = "modelopt"
    # quantized weight -> its bytes' key as read (hpedge.export.onnx_io.weight_key); hpedge's own passes only
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "sources"}


def gemm_to_matmul(model: Any, base_dir: str = "", lazy: dict[str, tuple[Any, bool]] | None = None) -> int:
    """Rewrite Gemm(A, W, b) with constant W as MatMul(A, W[K, N]) + Add(b), in place. Returns the count.
    ``base_dir``: where the model's external data lies, if it was loaded without it (each Gemm weight is then
    read on its own). With ``lazy`` no weight is read: each new ``W_kn`` initializer is a placeholder (dims and
    type, no data) and ``lazy[W_kn] = (W's TensorProto, transposed)`` says how to read it later."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, n = [], 0
    for node in model.graph.node:
        if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in inits:
            at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if at.get("transA", 0) == 0 and at.get("alpha", 1.0) == 1.0 and at.get("beta", 1.0) == 1.0:
                wname = node.input[1] + "_kn"
                if lazy is not None:
                    src, trans = inits[node.input[1]], bool(at.get("transB", 0))
                    ph = TensorProto(name=wname, data_type=src.data_type)
                    ph.dims.extend(list(src.dims)[::-1] if trans else list(src.dims))
                    model.graph.initializer.append(ph)
                    lazy[wname] = (src, trans)
                else:
                    w = read_array(inits[node.input[1]], base_dir)
                    if at.get("transB", 0):
                        w = w.T
                    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), wname))
                mm_out = node.output[0] + "_mm" if len(node.input) > 2 else node.output[0]
                nodes.append(helper.make_node("MatMul", [node.input[0], wname], [mm_out], name=node.name + "_matmul"))
                if len(node.input) > 2:
                    nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
                n += 1
                continue
        nodes.append(node)
    _replace_nodes(model, nodes)
    return n


def _replace_nodes(model: Any, nodes: list[Any]) -> None:
    """The graph's nodes become ``nodes``; initializers no node reads any more are dropped."""
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for node in model.graph.node for i in node.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def plan_exclusions(model: Any, block_size: int, patterns: list[str]) -> tuple[list[str], dict[str, str]]:
    inits = {i.name: i for i in model.graph.initializer}
    quantizable, excluded = [], {}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [inits[x] for x in node.input if x in inits]
        if not weights or len(weights[0].dims) != 2:
            continue
        k = weights[0].dims[0]
        hit = next((p for p in patterns if re.search(p, node.name)), None)
        if hit:
            excluded[node.name] = f"matches protected pattern {hit!r}"
        elif k % block_size:
            excluded[node.name] = f"inner dimension {k} is not a multiple of the block size {block_size}"
        else:
            quantizable.append(node.name)
    return quantizable, excluded


class _Reader:
    """A calibration data reader over captured feeds (ModelOpt / ONNX Runtime protocol)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def get_first(self) -> dict[str, np.ndarray]:
        return self.feeds[0]

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self):  # type: ignore[no-untyped-def]  # awq_clip iterates, rtn calls get_next
        return iter(self.feeds)


def quantize_int4(onnx_path: Path, out_path: Path, calibration: list[dict[str, np.ndarray]], method: str = "awq_clip",
                  block_size: int = 128, protect: list[str] | None = None, activations_from: Path | None = None,
                  progress: Callable[[str], None] | None = None) -> QuantReport:
    """INT4 weight-only quantization of ``onnx_path`` (an fp32 or fp16 export); each DequantizeLinear scale is in
    its weight's type, so an fp16 graph gets fp16 scales. ``activations_from``: the graph hpedge's AWQ-clip runs
    the calibration feeds through (default ``onnx_path``; the export passes the fp16 graph's float32 view, which
    ONNX Runtime runs with less memory than the fp16 graph on its CPU provider). ``progress`` is told each step
    of hpedge's streamed passes."""
    import onnx

    if method not in METHODS:
        raise HpedgeError(f"unknown INT4 method {method!r}; use one of {', '.join(METHODS)}")
    if method == "rtn":
        return quantize_int4_streamed(onnx_path, out_path, block_size, protect, progress=progress)
    if method == "awq_clip":
        return quantize_int4_streamed(onnx_path, out_path, block_size, protect, calibration, activations_from, progress)
    try:
        import modelopt
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        raise HpedgeError(f"ModelOpt is not installed ({e}); install hpedge[export]") from None
    t0 = time.time()
    # the graph without its weights (above 2 GB they stay in the external data file, streamed to the prepared copy)
    model = onnx.load(str(onnx_path), load_external_data=False)
    gemm_to_matmul(model, str(Path(onnx_path).parent))
    quantizable, excluded = plan_exclusions(model, block_size, protect or [])
    if not quantizable:
        raise HpedgeError(f"no linear layer of this model can be INT4 block-quantized (block size {block_size})")
    prepared = out_path.with_name(out_path.stem + ".prepared.onnx")

    big = save_onnx(model, prepared, base_dir=Path(onnx_path).parent)
    old_tqdm = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        quantize(
            str(prepared), quantize_mode="int4", calibration_method=METHODS[method], calibration_data_reader=_Reader(calibration),
            calibration_eps=ort.calibration_providers(), nodes_to_exclude=[f"^{re.escape(n)}$" for n in excluded] or None,
            output_path=str(out_path), block_size=block_size, high_precision_dtype="fp32",
            use_external_data_format=big, log_level="ERROR",
        )
        # ``model``'s weights may now live in the prepared file's external data (saving moved them there):
        # compared before that file is removed, one tensor at a time
        rewrite_onnx(out_path)  # ModelOpt's own external data file, if it wrote one, becomes PATH.data
        errors = layer_errors(model, onnx.load(str(out_path), load_external_data=True), base_dir=str(prepared.parent))
    except HpedgeError:
        raise
    except Exception as e:
        raise HpedgeError(f"ModelOpt INT4 quantization failed: {str(e).splitlines()[0][:200]}") from None
    finally:
        if old_tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old_tqdm
        for f in prepared.parent.glob(prepared.name + "*"):
            f.unlink()
    report = QuantReport(method=method, block_size=block_size, quantized=quantizable, excluded=excluded,
                         seconds=round(time.time() - t0, 1), modelopt_version=getattr(modelopt, "__version__", "?"))
    report.layer_error = errors
    return report


def int4_bytes(q: np.ndarray) -> bytes:
    """Signed int4 values (int8 array in [-8, 7]) packed as ONNX stores INT4: two per byte, low nibble first."""
    u = (q.reshape(-1) & 0x0F).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return (u[0::2] | (u[1::2] << 4)).tobytes()


def rtn_int4(w: np.ndarray, block_size: int, clip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """INT4 round-to-nearest of a weight [K, N] (K a multiple of ``block_size``), as ModelOpt's ``rtn_dq``:
    scale [K/block, N] = max |w| of the block / 7 in ``w``'s own type (at least CLIP_MIN), values
    rint(w / scale) clipped to [-8, 7]. Returns (int8 values [K, N], scale).

    ``clip`` [K/block, N] (AWQ-clip's ratios, :func:`clip_search`): each block's range is max |w| x its ratio,
    computed in float32, stored in ``w``'s type, and the values rounded with the stored scale."""
    k, n = w.shape
    amax = np.abs(w.reshape(k // block_size, block_size, n)).max(axis=1)
    if clip is None:
        scale = np.clip(amax * 1.0 / 7, CLIP_MIN, None)
        q = np.rint(w / np.repeat(scale, block_size, axis=0)).clip(-8, 7).astype(np.int8)
        return q, scale
    scale = np.clip(amax.astype(np.float32) * clip.astype(np.float32) / 7, CLIP_MIN, None).astype(w.dtype)
    q = np.rint(w.astype(np.float32) / np.repeat(scale.astype(np.float32), block_size, axis=0)).clip(-8, 7)
    return q.astype(np.int8), scale


CLIP_RATIOS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10)) + (1.0,)  # AWQ-clip's grid (ModelOpt's default)
CLIP_TOKENS = 64  # activation rows a clip search compares outputs on (ModelOpt's default)


def clip_search(x: np.ndarray, w: np.ndarray, block_size: int, ratios: tuple[float, ...] = CLIP_RATIOS) -> np.ndarray:
    """AWQ-clip's search (the method of ModelOpt's ``awq_clip``): for every block of weight ``w`` [K, N] and
    output channel, the clip ratio of the grid whose INT4 weights give the block's share of the output closest
    (mean squared error over the activation rows ``x`` [T, K]) to the unquantized weights'. Returns the ratios
    [K/block, N]; float32 arithmetic throughout."""
    k, n = w.shape
    nb = k // block_size
    xb = np.ascontiguousarray(x.astype(np.float32).reshape(-1, nb, block_size).transpose(1, 0, 2))  # nb, T, bs
    wb = w.astype(np.float32).reshape(nb, block_size, n)
    ref = np.matmul(xb, wb)  # nb, T, N: each block's share of the output
    amax = np.abs(wb).max(axis=1)  # nb, N
    best = np.full((nb, n), np.inf, np.float32)
    ratio = np.ones((nb, n), np.float32)
    for r in ratios:
        scale = np.clip(amax * np.float32(r) / 7, CLIP_MIN, None)[:, None, :]
        dq = np.rint(wb / scale).clip(-8, 7) * scale
        loss = np.square(ref - np.matmul(xb, dq)).mean(axis=1)  # nb, N
        better = loss < best
        best = np.where(better, loss, best)
        ratio = np.where(better, np.float32(r), ratio)
    return ratio


def sample_activations(onnx_path: Path, inputs: dict[str, int], feeds: list[dict[str, np.ndarray]],
                       tokens: int = CLIP_TOKENS) -> dict[str, np.ndarray]:
    """Rows of the activations ``inputs`` (tensor name -> its width K) of graph ``onnx_path`` over the calibration
    ``feeds``: each batch row contributes about ``tokens / rows`` rows, evenly strided over its sequence, selected
    inside the graph (:func:`hpedge.export.activations.probe`: a run returns a few rows per activation, not whole
    activations); the rows of all feeds are then strided down to about ``tokens``, as ModelOpt's clip search does.
    Returns float32 arrays [rows, K]."""
    from onnx import TensorProto, helper, numpy_helper

    n_rows = sum(len(rows_of(f)) for f in feeds)
    per_feed = max(1, -(-tokens // max(1, n_rows)))

    def const(name: str, v: list[int]) -> Any:
        return numpy_helper.from_array(np.asarray(v, np.int64), name)

    def prepare(g: Any) -> None:
        g.initializer.extend([const("awq::zero", [0]), const("awq::end", [np.iinfo(np.int64).max]),
                              const("awq::one", [1]), const("awq::rows", [per_feed])])

    def chain(g: Any, name: str, p: str) -> tuple[list[Any], str]:
        g.initializer.append(const(p + "shape", [-1, inputs[name]]))
        return [helper.make_node("Reshape", [name, p + "shape"], [p + "rows"]),
                helper.make_node("Shape", [p + "rows"], [p + "m"], end=1),
                helper.make_node("Div", [p + "m", "awq::rows"], [p + "d"]),
                helper.make_node("Max", [p + "d", "awq::one"], [p + "step"]),
                helper.make_node("Slice", [p + "rows", "awq::zero", "awq::end", "awq::zero", p + "step"], [p + "some"]),
                helper.make_node("Cast", [p + "some"], [p + "out"], to=TensorProto.FLOAT)], p + "out"

    out = {}
    for n, parts in probe(Path(onnx_path), list(inputs), feeds, chain, prepare).items():
        x = np.concatenate(parts)
        out[n] = x[0:: max(1, x.shape[0] // tokens)]
    return out


def _relative_error(w: np.ndarray, q: np.ndarray, scale: np.ndarray, block_size: int) -> float:
    """||w - q * scale|| / ||w||, one block row at a time (no full-size float32 temporaries)."""
    num = den = 0.0
    for b in range(scale.shape[0]):
        wb = w[b * block_size:(b + 1) * block_size].astype(np.float32)
        d = wb - q[b * block_size:(b + 1) * block_size].astype(np.float32) * scale[b].astype(np.float32)
        num += float(np.square(d).sum())
        den += float(np.square(wb).sum())
    return float(np.sqrt(num) / (np.sqrt(den) + 1e-12))


def quantize_int4_streamed(onnx_path: Path, out_path: Path, block_size: int = 128, protect: list[str] | None = None,
                           calibration: list[dict[str, np.ndarray]] | None = None,
                           activations_from: Path | None = None, progress: Callable[[str], None] | None = None) -> QuantReport:
    """INT4 of ``onnx_path`` (fp32 or fp16, any size), streamed: the graph is read without its weights, each
    quantizable weight is read, quantized and dropped in turn, every other tensor is copied from the source's
    external data by :func:`save_onnx`; the INT4 weights are written to disk as they are made (:class:`Spill`).
    Holds the graph and one weight at a time.

    Round-to-nearest; with ``calibration`` feeds, AWQ-clip: each block's range is clipped by the ratio
    :func:`clip_search` picks on the activation rows :func:`sample_activations` takes from the feeds (run through
    ``activations_from``, a graph with the same tensor names, when given)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    t0 = time.time()
    src_dir = Path(onnx_path).parent
    model = onnx.load(str(onnx_path), load_external_data=False)
    weights = _LazyWeights(model, src_dir)  # Gemm weights read (and transposed) only when quantized

    quantizable, excluded = plan_exclusions(model, block_size, protect or [])
    if not quantizable:
        raise HpedgeError(f"no linear layer of this model can be INT4 block-quantized (block size {block_size})")
    todo = set(quantizable)
    inits = {i.name: i for i in model.graph.initializer}
    acts: dict[str, np.ndarray] = {}
    say = progress or (lambda _s: None)
    if calibration is not None:
        say(f"INT4: activation rows of {len(todo)} layers from {len(calibration)} calibration inputs (ONNX Runtime)")
        widths = {n.input[0]: int(inits[n.input[1]].dims[0]) for n in model.graph.node if n.name in todo}
        acts = sample_activations(Path(activations_from or onnx_path), widths, calibration)
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for i in node.input:
            readers[i] = readers.get(i, 0) + 1
    nodes, new, errors = [], [], {}
    sources: dict[str, str] = {}
    say(f"INT4: {len(todo)} weights, one at a time" + (" (clip search)" if acts else ""))
    with Spill(src_dir, Path(out_path).parent.name + ".spill") as spill:  # INT4 weights go to disk as they are made
        for node in model.graph.node:
            if node.name not in todo:
                nodes.append(node)
                continue
            wname = node.input[1]
            init = inits[wname]
            if init.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
                raise HpedgeError(f"{onnx_path}: weight {wname!r} of {node.name} is not float (type {init.data_type})")
            base = wname if readers[wname] == 1 else f"{wname}_{node.name}"  # a shared weight: one copy per reader
            w = weights.read(wname)
            clip = clip_search(acts[node.input[0]], w, block_size) if acts else None
            q, scale = rtn_int4(w, block_size, clip)
            errors[wname] = _relative_error(w, q, scale, block_size)
            sources[base] = weight_key(w)
            new.append(spill.add(helper.make_tensor(base + "_i4", TensorProto.INT4, list(q.shape), int4_bytes(q), raw=True)))
            new.append(numpy_helper.from_array(scale.astype(w.dtype), base + "_scale"))
            nodes.append(helper.make_node("DequantizeLinear", [base + "_i4", base + "_scale"], [base + "_DequantizeLinear_Output"],
                                          name=base + "_DequantizeLinear", axis=0, block_size=block_size))
            node.input[1] = base + "_DequantizeLinear_Output"
            nodes.append(node)
            del w, q
        weights.fill_unread()  # converted Gemms left unquantized (excluded) get their data
        model.graph.initializer.extend(new)
        _replace_nodes(model, nodes)
        for op in model.opset_import:  # blocked DequantizeLinear is opset 21 (20 -> 21 only adds 4-bit types)
            if op.domain in ("", "ai.onnx") and op.version < 21:
                op.version = 21
        model.ir_version = max(model.ir_version, 10)
        del model.graph.value_info[:]
        spill.flush()
        save_onnx(model, Path(out_path), base_dir=src_dir)
    how = "AWQ-clip search as ModelOpt's awq_clip" if acts else "ModelOpt's rtn_dq formula"
    report = QuantReport(method="awq_clip" if acts else "rtn", block_size=block_size, quantized=quantizable,
                         excluded=excluded, seconds=round(time.time() - t0, 1), implementation=f"hpedge (streamed; {how})")
    report.layer_error, report.sources = errors, sources
    return report


def quantize_int8_weights(onnx_path: Path, out_path: Path) -> QuantReport:
    """INT8 weight-only quantization: every linear layer's constant weight [K, N] becomes int8 with one scale per
    output channel (symmetric, max-abs) behind a ``DequantizeLinear`` (axis 1), in the weight's own type; the
    rest of the graph is unchanged. ModelOpt's ONNX INT8 mode quantizes activations too, so this pass is
    hpedge's own (numpy); TensorRT and ONNX Runtime run the DequantizeLinear -> MatMul pattern as weight-only.
    Streamed as the INT4 pass is: the graph without its weights, one weight at a time, int8 weights spilled to
    disk as they are made."""
    import onnx
    from onnx import helper, numpy_helper

    t0 = time.time()
    src_dir = Path(onnx_path).parent
    model = onnx.load(str(onnx_path), load_external_data=False)
    weights = _LazyWeights(model, src_dir)
    inits = {i.name: i for i in model.graph.initializer}
    quantized: list[str] = []
    errors: dict[str, float] = {}
    sources: dict[str, str] = {}
    nodes, new, done = [], [], set()
    with Spill(src_dir, Path(out_path).parent.name + ".int8.spill") as spill:
        for node in model.graph.node:
            w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
            if w is None or len(w.dims) != 2 or w.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                nodes.append(node)
                continue
            qname, sname, dq = w.name + "_i8", w.name + "_scale", w.name + "_dq"
            if w.name not in done:  # a weight read by several MatMuls is quantized once
                arr = weights.read(w.name)
                a32 = arr.astype(np.float32)
                scale = np.maximum(np.abs(a32).max(axis=0), 1e-12) / 127.0
                q = np.clip(np.round(a32 / scale), -127, 127).astype(np.int8)
                errors[w.name] = float(np.linalg.norm(q * scale - a32) / (np.linalg.norm(a32) + 1e-12))
                sources[w.name] = weight_key(arr)
                new.append(spill.add(numpy_helper.from_array(q, qname)))
                new.append(numpy_helper.from_array(scale.astype(arr.dtype), sname))
                nodes.append(helper.make_node("DequantizeLinear", [qname, sname], [dq], name=node.name + "_dequantize", axis=1))
                done.add(w.name)
                del arr, a32, q
            node.input[1] = dq
            nodes.append(node)
            quantized.append(node.name)
        if not quantized:
            raise HpedgeError(f"{onnx_path}: no linear layer to quantize")
        weights.fill_unread()
        model.graph.initializer.extend(new)
        _replace_nodes(model, nodes)
        spill.flush()
        save_onnx(model, out_path, base_dir=src_dir)
    report = QuantReport(method="int8_weight_only", block_size=0, quantized=quantized, seconds=round(time.time() - t0, 1))
    report.layer_error, report.sources = errors, sources
    return report


class _LazyWeights:
    """A graph loaded without its weights, Gemms rewritten as MatMul (:func:`gemm_to_matmul`, lazily): each weight
    is read from ``src_dir`` when asked for (a converted Gemm weight transposed then)."""

    def __init__(self, model: Any, src_dir: Path) -> None:
        self.model, self.src_dir = model, src_dir
        self.lazy: dict[str, tuple[Any, bool]] = {}
        gemm_to_matmul(model, str(src_dir), self.lazy)
        self.inits = {i.name: i for i in model.graph.initializer}

    def read(self, name: str) -> np.ndarray:
        if name not in self.lazy:
            return read_array(self.inits[name], self.src_dir)
        src, trans = self.lazy.pop(name)
        w = read_array(src, self.src_dir)
        return np.ascontiguousarray(w.T) if trans else w

    def fill_unread(self) -> None:
        """Converted Gemm weights nothing read (left unquantized) get their data."""
        from onnx import numpy_helper

        for i, init in enumerate(self.model.graph.initializer):
            if init.name in self.lazy:
                self.model.graph.initializer[i].CopyFrom(numpy_helper.from_array(self.read(init.name), init.name))


def layer_errors(fp32_model: Any, int4_model: Any, base_dir: str = "") -> dict[str, float]:
    """Relative Frobenius error of every dequantized weight against the original (per layer); ``base_dir``
    is where ``fp32_model``'s external data lies, if it has any."""
    from onnx import helper, numpy_helper

    orig = {i.name: i for i in fp32_model.graph.initializer}
    q = {i.name: i for i in int4_model.graph.initializer}
    out = {}
    for node in int4_model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in q or len(node.input) < 2:
            continue
        wname = node.input[0][: -len("_i4")] if node.input[0].endswith("_i4") else None
        if wname is None or wname not in orig:
            continue
        at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w_q = numpy_helper.to_array(q[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(q[node.input[1]]).astype(np.float32)
        block = int(at.get("block_size", 0)) or w_q.shape[0]
        zp = numpy_helper.to_array(q[node.input[2]]).astype(np.float32) if len(node.input) > 2 and node.input[2] in q else 0.0
        deq = (w_q - (np.repeat(zp, block, axis=0)[: w_q.shape[0]] if not np.isscalar(zp) else zp)) * np.repeat(scale, block, axis=0)[: w_q.shape[0]]
        w = read_array(orig[wname], base_dir).astype(np.float32)
        if w.shape == deq.shape:
            out[wname] = float(np.linalg.norm(w - deq) / (np.linalg.norm(w) + 1e-12))
    return out


def store_floats_fp16(path: Path, keep_dq_scales: bool = True, min_elements: int = 256) -> int:
    """:func:`floats_to_fp16` on an ONNX file, in place; returns the number of tensors stored as fp16."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # weights above 2 GB are read one at a time
    n = floats_to_fp16(model, keep_dq_scales, min_elements, base_dir=Path(path).parent)
    if n:  # nothing to change: the file stays as it is
        save_onnx(model, Path(path), base_dir=Path(path).parent)
    return n


def floats_to_fp16(model: Any, keep_dq_scales: bool = True, min_elements: int = 256, base_dir: str | Path = "") -> int:
    """Store the float32 weights that stay unquantized (position tables, norms, biases, and unless
    ``keep_dq_scales`` the DequantizeLinear scales) as fp16 followed by a ``Cast`` to fp32.

    Compute stays fp32 (ONNX Runtime folds the Cast once at session start; TensorRT folds constant
    casts), while the file holds what the planner's size formula assumes: 4-bit weights, 16-bit rest.
    DequantizeLinear scales are kept fp32 by default because TensorRT wants them as plain constants.
    Tensors outside the fp16 range or with fewer than ``min_elements`` values are left as they are.
    Returns the number of tensors stored as fp16.
    """
    from onnx import TensorProto, helper, numpy_helper

    skip = {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 1} if keep_dq_scales else set()
    graph_inputs = {i.name for i in model.graph.input}
    casts = []
    for init in model.graph.initializer:
        if (init.data_type != TensorProto.FLOAT or int(np.prod(init.dims or [1])) < min_elements
                or init.name in skip or init.name in graph_inputs):
            continue
        arr = read_array(init, base_dir)
        if not np.all(np.isfinite(arr)) or float(np.abs(arr).max()) >= 65504.0:
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), name + "_fp16"))
        casts.append(helper.make_node("Cast", [name + "_fp16"], [name], to=TensorProto.FLOAT, name=name + "_to_fp32"))
    for i, node in enumerate(casts):
        model.graph.node.insert(i, node)
    return len(casts)
