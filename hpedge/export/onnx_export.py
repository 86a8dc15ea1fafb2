"""ONNX export of a pipeline's parts: the transformer (dynamic shapes), the text encoding and the VAE decoder.

Each part is wrapped in a small module with positional tensor inputs so the graph has stable names.
The text wrapper reproduces the pipeline's own ``encode_prompt`` arithmetic (SD3: penultimate CLIP
states of both encoders, concatenated, zero-padded to the T5 width and joined with the T5 states;
FLUX: CLIP pooled output and T5 states) and is verified against it. The VAE wrapper takes the
transformer's normalised latents and returns images in [0, 1].

SD3 uses the TorchScript exporter (fast; what ModelOpt's diffusers example uses) up to protobuf's 2 GB and
the dynamo exporter above it (:func:`auto_exporter`). FLUX uses the dynamo exporter, because the TorchScript
one bakes its rotary-embedding shapes into the graph. Weights above 2 GB go to one external data file
(:func:`save_onnx`), streamed from the exporter's own files: no export loads a whole model's weights.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpedge.errors import HpedgeError
from hpedge.models.denoise import family_of

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf's 2 GB limit, less room for the graph
OPSET = 20


@dataclass
class IOSpec:
    """Input names with min/opt/max shapes (-> dynamic axes and TensorRT optimization profiles)."""

    inputs: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)

    def sample(self, which: str = "opt", seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        k = {"min": 0, "opt": 1, "max": 2}[which]
        out = {}
        for name, shapes in self.inputs.items():
            shape = shapes[k]
            if self.dtypes.get(name) == "int64":
                out[name] = rng.integers(0, 10, size=shape).astype(np.int64)
            elif name == "timestep":
                out[name] = rng.uniform(0.05, 0.95, size=shape).astype(np.float32)
            elif name in ("img_ids", "txt_ids"):
                out[name] = np.zeros(shape, np.float32)
            elif name == "guidance":
                out[name] = rng.uniform(1.0, 5.0, size=shape).astype(np.float32)
            else:
                out[name] = rng.standard_normal(shape).astype(np.float32)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in self.inputs.items()},
                "outputs": self.outputs, "dtypes": self.dtypes}


COMPUTE_DTYPES = ("fp32", "fp16")


def _transformer_wrapper(transformer: Any) -> Any:
    """Positional float32 inputs and output whatever the transformer's own dtype: an fp16 transformer
    gets Casts at the graph's edges, so every variant of a package has the same float32 interface."""
    import torch

    family = family_of(transformer)
    dt = next(transformer.parameters()).dtype

    class SD3(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = transformer

        def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):  # type: ignore[no-untyped-def]
            return self.m(hidden_states=hidden_states.to(dt), encoder_hidden_states=encoder_hidden_states.to(dt),
                          pooled_projections=pooled_projections.to(dt), timestep=timestep,
                          return_dict=False)[0].float()

    class Flux(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = transformer

        def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids):  # type: ignore[no-untyped-def]
            return self.m(hidden_states=hidden_states.to(dt), encoder_hidden_states=encoder_hidden_states.to(dt),
                          pooled_projections=pooled_projections.to(dt), timestep=timestep, img_ids=img_ids,
                          txt_ids=txt_ids, return_dict=False)[0].float()

    class FluxGuided(torch.nn.Module):  # FLUX.1-dev: the distilled guidance scale is an input
        def __init__(self) -> None:
            super().__init__()
            self.m = transformer

        def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,  # type: ignore[no-untyped-def]
                    guidance):
            return self.m(hidden_states=hidden_states.to(dt), encoder_hidden_states=encoder_hidden_states.to(dt),
                          pooled_projections=pooled_projections.to(dt), timestep=timestep, img_ids=img_ids,
                          txt_ids=txt_ids, guidance=guidance, return_dict=False)[0].float()

    if family == "sd3":
        return SD3().eval()
    return (FluxGuided() if transformer.config.get("guidance_embeds") else Flux()).eval()


def input_names(transformer: Any) -> list[str]:
    """The transformer graph's inputs, in order."""
    base = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
    if family_of(transformer) == "sd3":
        return base
    return base + ["img_ids", "txt_ids"] + (["guidance"] if transformer.config.get("guidance_embeds") else [])


def text_seq_len(pipe: Any, max_sequence_length: int) -> int:
    """Length of the transformer's text sequence for this pipeline."""
    if family_of(pipe) == "sd3":
        return int(pipe.tokenizer_max_length) + max_sequence_length
    return max_sequence_length


def transformer_spec(pipe: Any, res: tuple[int, int, int], batch: tuple[int, int, int], max_sequence_length: int) -> IOSpec:
    """Shapes for resolutions ``res`` (pixels, min/opt/max) and batch sizes ``batch``."""
    cfg = pipe.transformer.config
    vs = pipe.vae_scale_factor
    seq = text_seq_len(pipe, max_sequence_length)
    joint = cfg.joint_attention_dim
    pooled = cfg.pooled_projection_dim
    lat = [r // vs for r in res]
    if family_of(pipe) == "sd3":
        c = cfg.in_channels
        ins = {
            "hidden_states": tuple((b, c, h, h) for b, h in zip(batch, lat)),
            "encoder_hidden_states": tuple((b, seq, joint) for b in batch),
            "pooled_projections": tuple((b, pooled) for b in batch),
            "timestep": tuple((b,) for b in batch),
        }
        axes = {"hidden_states": {0: "batch", 2: "height", 3: "width"}, "encoder_hidden_states": {0: "batch", 1: "text_seq"},
                "pooled_projections": {0: "batch"}, "timestep": {0: "batch"}, "out": {0: "batch", 2: "height", 3: "width"}}
    else:
        c4 = cfg.in_channels
        n = [(h // 2) * (h // 2) for h in lat]
        ins = {
            "hidden_states": tuple((b, k, c4) for b, k in zip(batch, n)),
            "encoder_hidden_states": tuple((b, seq, joint) for b in batch),
            "pooled_projections": tuple((b, pooled) for b in batch),
            "timestep": tuple((b,) for b in batch),
            "img_ids": tuple((k, 3) for k in n),
            "txt_ids": tuple((seq, 3) for _ in batch),
        }
        axes = {"hidden_states": {0: "batch", 1: "img_seq"}, "encoder_hidden_states": {0: "batch", 1: "text_seq"},
                "pooled_projections": {0: "batch"}, "timestep": {0: "batch"}, "img_ids": {0: "img_seq"},
                "txt_ids": {0: "text_seq"}, "out": {0: "batch", 1: "img_seq"}}
        if cfg.get("guidance_embeds"):
            ins["guidance"] = tuple((b,) for b in batch)
            axes["guidance"] = {0: "batch"}
    return IOSpec(inputs=ins, outputs=["out"], dynamic_axes=axes)  # type: ignore[arg-type]


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
    """Write ``proto`` to ``path``: weights in one ``PATH.data`` file next to it when the model would pass
    protobuf's 2 GB limit (with room for the graph itself), inline otherwise. The one place hpedge writes
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
                for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    t.ClearField(f)
                length = len(raw)
            del t.external_data[:]
            for k, v in (("location", data.name), ("offset", str(pos)), ("length", str(length))):
                e = t.external_data.add()
                e.key, e.value = k, v
            t.data_location = onnx.TensorProto.EXTERNAL
    partial.replace(data)
    onnx.save_model(proto, str(path))
    return True


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


def _raw_bytes(t: Any) -> bytes:
    from onnx import numpy_helper

    if t.HasField("raw_data"):
        return bytes(t.raw_data)
    return bytes(numpy_helper.to_array(t).tobytes())


def _export(module: Any, args: tuple[Any, ...], path: Path, names: list[str], outputs: list[str],
            dynamic_axes: dict[str, dict[int, str]], exporter: str, dynamic_shapes: Any = None) -> None:
    """torch.onnx.export into a scratch folder, no-op Casts dropped, then :func:`save_onnx` to ``path``: the
    weights are streamed from the exporter's external data (where it wrote any), never loaded as a whole."""
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.stem + ".raw")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    tmp = scratch / "model.onnx"
    try:
        with torch.no_grad():
            if exporter == "dynamo":
                torch.onnx.export(module, args, str(tmp), dynamo=True, input_names=names, output_names=outputs,
                                  dynamic_shapes=dynamic_shapes, opset_version=OPSET, external_data=True, verbose=False)
            else:
                torch.onnx.export(module, args, str(tmp), dynamo=False, input_names=names, output_names=outputs,
                                  dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True)
        light = onnx.load(str(tmp), load_external_data=False)
        drop_noop_casts(light, light)
        save_onnx(light, path, base_dir=scratch, stream=True)  # the dynamo exporter's weights: never all in memory
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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


def auto_exporter(transformer: Any) -> str:
    """SD3: the TorchScript exporter (fast) while the weights fit in one protobuf, dynamo above (TorchScript builds
    the whole model as one message and fails to serialize it past 2 GB); FLUX: dynamo (TorchScript bakes its
    rotary-embedding shapes into the graph)."""
    weights = sum(p.numel() * p.element_size() for p in transformer.parameters())
    return "legacy" if family_of(transformer) == "sd3" and weights <= EXTERNAL_DATA_THRESHOLD else "dynamo"


def export_transformer(transformer: Any, spec: IOSpec, path: Path, exporter: str = "auto", dtype: str = "fp32") -> str:
    """Export ``transformer`` to ``path``; ``dtype`` is the precision the graph computes in.

    ``fp16`` exports an fp16 copy (the caller's model is not changed; one already in fp16 is exported
    without a copy, which is how an export keeps one copy of a large model): weights and activations fp16,
    with the casts diffusers itself does (e.g. RMSNorm's variance in fp32), and float32 graph inputs
    and output. That is the graph a strongly typed TensorRT engine should be built from: TensorRT then
    runs fp16 kernels because the graph says so, not because of a builder flag.
    """
    import torch

    if dtype not in COMPUTE_DTYPES:
        raise HpedgeError(f"unknown compute dtype {dtype!r} for the transformer export (choose from {', '.join(COMPUTE_DTYPES)})")
    if dtype == "fp16":
        transformer = half_copy(transformer)
    family = family_of(transformer)
    if exporter == "auto":
        exporter = auto_exporter(transformer)
    wrapper = _transformer_wrapper(transformer)
    # torch.export specialises dimensions of size 1, so the dynamo exporter traces the largest shapes
    sample = spec.sample("max" if exporter == "dynamo" else "opt")
    if exporter == "dynamo":  # a batch of 1 would be specialised too: trace with at least 2
        sample = {k: (np.concatenate([v, v]) if spec.dynamic_axes.get(k, {}).get(0) == "batch" and v.shape[0] == 1 else v)
                  for k, v in sample.items()}
    names = list(spec.inputs)
    args = tuple(torch.from_numpy(sample[n]) for n in names)
    dynamic_shapes = None
    if exporter == "dynamo":
        from torch.export import Dim

        (bmin, _, bmax) = (spec.inputs["timestep"][i][0] for i in range(3))
        b = Dim("batch", min=max(1, bmin), max=max(2, bmax))
        if family == "sd3":
            hmin, hmax = spec.inputs["hidden_states"][0][2], spec.inputs["hidden_states"][2][2]
            # (a range of one value is widened by one: torch.export wants min < max; the engine's profile stays exact)
            lo, hi = max(1, hmin // 2), max(2, hmax // 2)
            h, w = Dim("h", min=lo, max=max(lo + 1, hi)), Dim("w", min=lo, max=max(lo + 1, hi))
            dynamic_shapes = ({0: b, 2: 2 * h, 3: 2 * w}, {0: b}, {0: b}, {0: b})
        else:
            nmin, nmax = spec.inputs["hidden_states"][0][1], spec.inputs["hidden_states"][2][1]
            n = Dim("img_seq", min=max(1, nmin), max=max(max(1, nmin) + 1, nmax))
            dynamic_shapes = ({0: b, 1: n}, {0: b}, {0: b}, {0: b}, {0: n}, None)
            if "guidance" in spec.inputs:
                dynamic_shapes = (*dynamic_shapes, {0: b})
    if exporter not in ("legacy", "dynamo"):
        raise HpedgeError(f"unknown exporter {exporter!r} (auto, legacy, dynamo)")
    undo: Any = None  # export-only changes to the position embedding, undone afterwards
    if family == "flux":  # diffusers computes FLUX's rotary tables in float64; ORT CPU has no float64 Cos/Sin
        original_rope = transformer.pos_embed
        transformer.pos_embed = _Float32Rope(original_rope.theta, original_rope.axes_dim)

        def undo() -> None:
            transformer.pos_embed = original_rope

    else:
        undo = _factor_position_table(transformer.pos_embed)
    try:
        _export(wrapper, args, path, names, spec.outputs, spec.dynamic_axes, exporter, dynamic_shapes)
    except Exception as e:  # exporter failures are user-facing: say which part and why, in one line
        raise HpedgeError(f"ONNX export of the transformer failed ({exporter} exporter): {str(e).splitlines()[0][:200]}") from None
    finally:
        if undo is not None:
            undo()
    return exporter


def separable_factors(table: Any) -> tuple[Any, Any] | None:
    """``(rows, cols)`` with ``table[i, j] == rows[i] + cols[j]`` exactly, or None if ``table`` (G, G, D) is not so.

    SD3's 2-D sin-cos table concatenates an embedding of the column with one of the row, so every
    channel depends on one axis only: two (G, D) tables hold it exactly (the other axis' channels are 0,
    and x + 0 == x in floating point).
    """
    import torch

    by_col = (table == table[:1]).all(dim=(0, 1))  # channel constant along rows -> depends on the column only
    by_row = (table == table[:, :1]).all(dim=(0, 1))
    if not bool((by_col | by_row).all()):
        return None
    rows = torch.where(by_col, torch.zeros_like(table[:, 0]), table[:, 0])
    cols = torch.where(by_col, table[0], torch.zeros_like(table[0]))
    if not torch.equal(rows[:, None] + cols[None], table):
        return None
    return rows, cols


def _factor_position_table(patch_embed: Any) -> Any:
    """Export SD3's (max, max, D) position table as two (max, D) factors; returns an undo function or None.

    At SD3.5 Large scale the table is 192 x 192 x 2432 values (179 MB in fp16), while the crop that a
    step uses is rebuilt from the factors with one broadcast add, bit for bit the same numbers.
    """
    import torch

    size = getattr(patch_embed, "pos_embed_max_size", None)
    table = getattr(patch_embed, "pos_embed", None)
    if not size or table is None:
        return None
    factors = separable_factors(table.reshape(size, size, -1))
    if factors is None:  # not a sin-cos table (a user's own); export it as it is
        return None
    rows, cols = factors
    patch = patch_embed.patch_size

    def cropped_pos_embed(height: int, width: int) -> Any:  # same crop arithmetic as diffusers' PatchEmbed
        h, w = height // patch, width // patch
        top, left = (size - h) // 2, (size - w) // 2
        grid = rows[top : top + h][:, None] + cols[left : left + w][None]
        return grid.reshape(1, -1, grid.shape[-1])

    patch_embed.cropped_pos_embed = cropped_pos_embed
    patch_embed.pos_embed = torch.zeros(1, dtype=table.dtype)  # unused while exporting; keeps the file free of it

    def undo() -> None:
        del patch_embed.cropped_pos_embed
        patch_embed.pos_embed = table

    return undo


def _Float32Rope(theta: int, axes_dim: list[int]) -> Any:  # noqa: N802 - builds a module lazily (torch import)
    import torch
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    class Float32Rope(torch.nn.Module):
        """FLUX's rotary position tables computed in float32 (what TensorRT and ORT run)."""

        def __init__(self, theta: int, axes_dim: list[int]) -> None:
            super().__init__()
            self.theta, self.axes_dim = theta, axes_dim

        def forward(self, ids):  # type: ignore[no-untyped-def]
            pos = ids.float()
            outs = [get_1d_rotary_pos_embed(self.axes_dim[i], pos[:, i], theta=self.theta, repeat_interleave_real=True,
                                            use_real=True, freqs_dtype=torch.float32) for i in range(ids.shape[-1])]
            return torch.cat([c for c, _ in outs], dim=-1), torch.cat([s for _, s in outs], dim=-1)

    return Float32Rope(theta, axes_dim)


def half_copy(module: Any) -> Any:
    """An fp16 copy of ``module`` made tensor by tensor: the caller's model is unchanged and the copy costs half
    its fp32 bytes (a deep copy cast afterwards would hold a second fp32 copy first)."""
    import copy

    import torch

    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to(torch.float16) if p.is_floating_point() else p.detach(),
                                         requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = b.to(torch.float16) if b.is_floating_point() else b.clone()
    return copy.deepcopy(module, memo)


class TextEncoders:
    """The text encoders as the package ships them: ``clip`` (the CLIP encoders, one graph) and ``t5`` (one
    graph), combined by the runtime exactly as the pipeline's ``encode_prompt`` combines them.

    SD3: ``clip(clip_ids, clip2_ids) -> clip_embeds`` (the penultimate hidden states of CLIP-L and CLIP-G side
    by side) and ``pooled``; ``t5(t5_ids) -> t5_embeds``; prompt embeddings = [clip_embeds padded to T5's width,
    t5_embeds] along the sequence. FLUX.1: ``clip(clip_ids) -> pooled``; prompt embeddings = ``t5_embeds``.
    Without T5 (SD3 only) its part is zeros of (max_sequence_length, joint_attention_dim), as in diffusers.
    The combination: :func:`hpedge.runtime.combine_text`.
    """

    INPUTS = {"sd3": {"clip": ["clip_ids", "clip2_ids"], "t5": ["t5_ids"]},
              "flux": {"clip": ["clip_ids"], "t5": ["t5_ids"]}}
    OUTPUTS = {"sd3": {"clip": ["clip_embeds", "pooled"], "t5": ["t5_embeds"]},
               "flux": {"clip": ["pooled"], "t5": ["t5_embeds"]}}

    @staticmethod
    def module(pipe: Any, which: str, half: bool) -> Any:
        import torch

        family = family_of(pipe)

        def copy(m: Any) -> Any:
            if not half:
                return m
            m = half_copy(m)
            # the legacy exporter's SDPA symbolic computes in fp32 and leaks fp32 into an fp16 graph (ONNX Runtime
            # then rejects its LayerNormalization): export fp16 CLIPs with their eager attention (same arithmetic)
            if hasattr(m, "set_attn_implementation") and type(m).__name__.startswith("CLIP"):
                m.set_attn_implementation("eager")
            return m

        class SD3Clip(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.l, self.g = copy(pipe.text_encoder), copy(pipe.text_encoder_2)

            def forward(self, clip_ids, clip2_ids):  # type: ignore[no-untyped-def]
                a = self.l(clip_ids, output_hidden_states=True)
                b = self.g(clip2_ids, output_hidden_states=True)
                clip = torch.cat([a.hidden_states[-2], b.hidden_states[-2]], dim=-1)
                return clip.float(), torch.cat([a.text_embeds, b.text_embeds], dim=-1).float()

        class FluxClip(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.clip = copy(pipe.text_encoder)

            def forward(self, clip_ids):  # type: ignore[no-untyped-def]
                return self.clip(clip_ids).pooler_output.float()

        class T5(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.t5 = copy(pipe.text_encoder_3 if family == "sd3" else pipe.text_encoder_2)

            def forward(self, t5_ids):  # type: ignore[no-untyped-def]
                return self.t5(t5_ids)[0].float()

        if which == "t5":
            return T5().eval()
        return (SD3Clip if family == "sd3" else FluxClip)().eval()


def text_inputs(pipe: Any, max_sequence_length: int) -> dict[str, tuple[str, int]]:
    """Input name -> (tokenizer attribute, length)."""
    clip_len = int(pipe.tokenizer_max_length)
    if family_of(pipe) == "sd3":
        clips = {"clip_ids": ("tokenizer", clip_len), "clip2_ids": ("tokenizer_2", clip_len)}
        return clips if pipe.text_encoder_3 is None else {**clips, "t5_ids": ("tokenizer_3", max_sequence_length)}
    return {"clip_ids": ("tokenizer", clip_len), "t5_ids": ("tokenizer_2", max_sequence_length)}


def tokenize(pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, np.ndarray]:
    out = {}
    for name, (attr, length) in text_inputs(pipe, max_sequence_length).items():
        tok = getattr(pipe, attr)
        out[name] = np.asarray(tok(prompts, padding="max_length", max_length=length, truncation=True,
                                   return_tensors="np").input_ids, dtype=np.int64)
    return out


def export_text_encoder(pipe: Any, which: str, path: Path, max_sequence_length: int, dtype: str = "fp32") -> dict[str, Any]:
    """Export text encoder graph ``which`` (``clip`` | ``t5``) computing in ``dtype`` (fp32 | fp16; inputs int64,
    outputs float32) and check it against the pipeline's own encoders; returns its manifest entry."""
    import torch

    family = family_of(pipe)
    if dtype not in COMPUTE_DTYPES:
        raise HpedgeError(f"unknown compute dtype {dtype!r} for the text encoders (choose from {', '.join(COMPUTE_DTYPES)})")
    module = TextEncoders.module(pipe, which, dtype == "fp16")
    names, outputs = TextEncoders.INPUTS[family][which], TextEncoders.OUTPUTS[family][which]
    ids = tokenize(pipe, ["a 1", "two 3s"], max_sequence_length)
    args = tuple(torch.from_numpy(ids[n]) for n in names)
    axes = {n: {0: "batch"} for n in [*names, *outputs]}
    _export(module, args, path, names, outputs, axes, "legacy")
    return {"inputs": names, "outputs": outputs, "compute": dtype}


def export_vae_decoder(pipe: Any, path: Path, latent_hw: int, dtype: str = "fp32") -> None:
    import torch

    if dtype not in COMPUTE_DTYPES:
        raise HpedgeError(f"unknown compute dtype {dtype!r} for the VAE decoder (choose from {', '.join(COMPUTE_DTYPES)})")
    half = dtype == "fp16"
    vae = half_copy(pipe.vae) if half else pipe.vae

    class Decoder(torch.nn.Module):  # float32 in and out; computes in the VAE's dtype
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latents):  # type: ignore[no-untyped-def]
            z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
            img = self.vae.decode(z, return_dict=False)[0]
            return (img / 2 + 0.5).clamp(0, 1).float()

    c = vae.config.latent_channels
    args = (torch.randn(1, c, latent_hw, latent_hw),)
    axes = {"latents": {0: "batch", 2: "height", 3: "width"}, "image": {0: "batch", 2: "img_height", 3: "img_width"}}
    _export(Decoder().eval(), args, path, ["latents"], ["image"], axes, "legacy")


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
