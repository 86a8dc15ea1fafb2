"""torch -> ONNX: the transformer with dynamic shapes (the text encoding and the VAE decoder are
:mod:`hpedge.export.encoders`; files on disk, :mod:`hpedge.export.onnx_io`).

Each part is wrapped in a small module with positional tensor inputs so the graph has stable names.

SD3 uses the TorchScript exporter (fast; what ModelOpt's diffusers example uses) up to protobuf's 2 GB and
the dynamo exporter above it (:func:`auto_exporter`). FLUX uses the dynamo exporter, because the TorchScript
one bakes its rotary-embedding shapes into the graph. Weights above 256 MB go to one external data file
(:func:`hpedge.export.onnx_io.save_onnx`), streamed from the exporter's own files: no export loads a whole model's weights.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpedge.errors import HpedgeError
from hpedge.export.onnx_io import PROTOBUF_LIMIT, drop_noop_casts, save_onnx
from hpedge.models.denoise import family_of
from hpedge.models.precision import compute_dtype

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
    dt = compute_dtype(transformer)  # float32 for a 16-bit transformer run through fp32_compute

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


def _export(module: Any, args: tuple[Any, ...], path: Path, names: list[str], outputs: list[str],
            dynamic_axes: dict[str, dict[int, str]], exporter: str, dynamic_shapes: Any = None,
            edit: Callable[[Any], None] | None = None) -> None:
    """torch.onnx.export into a scratch folder, no-op Casts dropped, ``edit`` applied to the graph (a
    ``ModelProto`` without its weights' bytes), then :func:`save_onnx` to ``path``: the weights are streamed from
    the exporter's external data (where it wrote any), never loaded as a whole."""
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
        for node in light.graph.node:  # the dynamo exporter's per-node stack traces: half of a small FLUX graph's bytes
            del node.metadata_props[:]
            node.doc_string = ""
        drop_noop_casts(light, light)
        if edit is not None:
            edit(light)
        save_onnx(light, path, base_dir=scratch, stream=True)  # the dynamo exporter's weights: never all in memory
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if exporter == "dynamo":
            _forget_rewritten_graph()


def _forget_rewritten_graph() -> None:
    """Drop what onnxscript's pattern matchers keep of the last graph they rewrote.

    The dynamo exporter optimizes its graph with onnxscript's rewrite rules, module-level objects whose
    ``SimplePatternMatcher`` keeps the last graph it matched (``_graph``, ``_match``, ``_current_node``; onnxscript
    0.7.2): that graph's initializers wrap the exported module's parameters, so the model's whole weights stayed
    alive after the export (1.28 GB measured on a 0.64 B-parameter fp16 transformer), whatever the caller freed."""
    import gc

    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript: nothing known to clear
        return
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for attr in ("_graph", "_match", "_current_node", "_tracer"):
                if hasattr(obj, attr):
                    setattr(obj, attr, None)


def auto_exporter(transformer: Any) -> str:
    """SD3: the TorchScript exporter (fast) while the weights fit in one protobuf, dynamo above (TorchScript builds
    the whole model as one message and fails to serialize it past 2 GB; judged on float32 bytes, so a model gets
    the same exporter for each of its graphs); FLUX: dynamo (TorchScript bakes its
    rotary-embedding shapes into the graph)."""
    weights = 4 * sum(p.numel() for p in transformer.parameters())
    return "legacy" if family_of(transformer) == "sd3" and weights <= PROTOBUF_LIMIT else "dynamo"


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
