"""Weight sparsity of the text encoders and the transformer (Ramesh & Zhao, arXiv 2411.15113): magnitude pruning,
the study's method, or Wanda (|W| x the L2 norm of each input column of the layer's calibration activations, compared
within each output row), unstructured (a share of each layer, or one threshold over the whole component) or N:M
(N zeros in every M consecutive input weights of a row; 2:4 runs on sparse tensor cores).

What is pruned: the ``torch.nn.Linear`` layers inside the transformer's blocks and inside the text encoders' layers
(attention and MLP), as the study's code prunes its encoders' layers; embedders, projections, norms and the final
layer stay dense (:data:`PRUNED`). Blocks are removed first (HierarchicalPrune), weights after. A mask holds what
stays (True); distillation keeps every pruned weight at exactly zero (:func:`keep_masked`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hpedge.errors import HpedgeError
from hpedge.models.families import family as family_facts
from hpedge.models.sampling import Defaults, recording_transformer_calls, replay_transformer_calls, sample

METHODS = ("magnitude", "wanda")
SCOPES = ("layer", "global")
# where the pruned Linear layers live, per module class name prefix: the transformer's blocks, CLIP's encoder
# layers, T5's encoder blocks
PRUNED = {"SD3Transformer2DModel": ("transformer_blocks.",),
          "FluxTransformer2DModel": ("transformer_blocks.", "single_transformer_blocks."),
          # transformers 5 names CLIP's modules without the text_model prefix (earlier releases: text_model.encoder...)
          "CLIPTextModel": ("text_model.encoder.layers.", "encoder.layers."),
          "CLIPTextModelWithProjection": ("text_model.encoder.layers.", "encoder.layers."),
          "T5EncoderModel": ("encoder.block.",)}
TEXT_ATTRS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class SparsitySpec:
    """``--sparsity transformer=0.35,text=0.475`` and its options, as typed (:func:`parse`), checked by :meth:`check`
    and resolved per pipeline attribute by :meth:`resolve`."""
    fractions: dict[str, float]
    pattern: str = "unstructured"  # unstructured | N:M
    method: str = "magnitude"
    scope: str = "layer"  # unstructured only: a share of each layer, or one threshold per component

    @staticmethod
    def parse(text: str, pattern: str = "unstructured", method: str = "magnitude", scope: str = "layer") -> SparsitySpec:
        out: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, value = part.partition("=")
            try:
                if not eq:
                    raise ValueError
                out[name.strip()] = float(value)
            except ValueError:
                raise HpedgeError(f"--sparsity {text!r}: each part is COMPONENT=FRACTION (e.g. transformer=0.35,text=0.475), "
                                  f"got {part!r}") from None
            if list(out).count(name.strip()) > 1:
                raise HpedgeError(f"--sparsity names {name.strip()!r} twice")
        if not out:
            raise HpedgeError("--sparsity names no component (e.g. transformer=0.35,text=0.475)")
        return SparsitySpec(out, pattern, method, scope)

    @property
    def n_m(self) -> tuple[int, int] | None:
        if self.pattern == "unstructured":
            return None
        n, _, m = self.pattern.partition(":")
        return int(n), int(m)

    def check(self) -> None:
        """Every value in range and every choice known (one line, before any long step)."""
        for name, f in self.fractions.items():
            if not 0 <= f < 1:
                raise HpedgeError(f"--sparsity {name}={f}: a fraction must be in [0, 1)")
        if self.method not in METHODS:
            raise HpedgeError(f"--sparsity-method must be {' or '.join(METHODS)}, got {self.method!r}")
        if self.scope not in SCOPES:
            raise HpedgeError(f"--sparsity-scope must be {' or '.join(SCOPES)}, got {self.scope!r}")
        if self.pattern != "unstructured":
            n, _, m = self.pattern.partition(":")
            if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
                raise HpedgeError(f"--sparsity-pattern must be unstructured or N:M (e.g. 2:4), got {self.pattern!r}")
            share = int(n) / int(m)
            bad = {k: f for k, f in self.fractions.items() if f and abs(f - share) > 1e-6}
            if bad:
                raise HpedgeError(f"--sparsity-pattern {self.pattern} zeroes exactly {share:g} of each pruned layer; "
                                  f"got {', '.join(f'{k}={f}' for k, f in bad.items())}")
            if self.scope != "layer":
                raise HpedgeError("--sparsity-scope global is for unstructured sparsity (N:M is set within each row)")
        if self.method == "wanda" and self.scope == "global":
            raise HpedgeError("--sparsity-method wanda compares weights within each output row: use --sparsity-scope layer")

    def resolve(self, pipe: Any) -> dict[str, float]:
        """Pipeline attribute -> fraction: ``transformer``, ``text`` (every text encoder), ``clip`` (the CLIP encoders),
        ``t5`` and the attribute names themselves (``text_encoder``, ``text_encoder_2``, ``text_encoder_3``); a more
        specific name overrides a broader one. Unknown names and encoders the pipeline lacks are errors."""
        t5 = family_facts(_family(pipe)).t5_attribute
        present = [a for a in TEXT_ATTRS if getattr(pipe, a, None) is not None]
        groups = {"transformer": ["transformer"], "text": present, "clip": [a for a in present if a != t5],
                  "t5": [t5] if t5 in present else [], **{a: [a] if a in present else [] for a in TEXT_ATTRS}}
        out: dict[str, float] = {}
        for rank in (("text",), ("clip", "t5"), ("transformer", *TEXT_ATTRS)):  # broad to specific
            for name in rank:
                if name in self.fractions:
                    if not groups[name]:
                        raise HpedgeError(f"--sparsity {name}: this pipeline has no {name} encoder")
                    out.update({a: self.fractions[name] for a in groups[name]})
        unknown = sorted(set(self.fractions) - set(groups))
        if unknown:
            raise HpedgeError(f"--sparsity: unknown component {unknown[0]!r} (use transformer, text, clip, t5, "
                              f"{', '.join(TEXT_ATTRS)})")
        return {a: f for a, f in out.items() if f > 0}

    def to_dict(self) -> dict[str, Any]:
        return {"requested": dict(self.fractions), "pattern": self.pattern, "method": self.method, "scope": self.scope}


def pruned_layers(module: Any) -> dict[str, Any]:
    """Qualified name -> ``torch.nn.Linear`` of the layers sparsity applies to in ``module`` (see :data:`PRUNED`)."""
    import torch

    prefixes = PRUNED.get(type(module).__name__)
    if prefixes is None:
        raise HpedgeError(f"weight sparsity does not know where {type(module).__name__}'s layers are")
    found = {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefixes)}
    if not found:
        raise HpedgeError(f"internal: no Linear layer of {type(module).__name__} under {', '.join(prefixes)}")
    return found


def check_pattern(layers: dict[str, Any], n_m: tuple[int, int] | None, what: str) -> None:
    """N:M needs every pruned layer's input width to be a multiple of M."""
    if n_m is None:
        return
    bad = [(n, m.in_features) for n, m in layers.items() if m.in_features % n_m[1]]
    if bad:
        raise HpedgeError(f"--sparsity-pattern {n_m[0]}:{n_m[1]}: {what} layer {bad[0][0]} has {bad[0][1]} inputs, "
                          f"not a multiple of {n_m[1]}")


def _scores(layer: Any, norms: Any | None) -> Any:
    w = layer.weight.detach().float().abs()
    return w if norms is None else w * norms.to(w.device)[None, :]


def layer_mask(scores: Any, fraction: float, n_m: tuple[int, int] | None, per_row: bool) -> Any:
    """True where a weight stays: the ``fraction`` of lowest ``scores`` zeroed over the whole layer, or within each
    output row (``per_row``: Wanda's comparison group), or ``n_m[0]`` of every ``n_m[1]`` consecutive inputs of a row.
    Exactly that many (ties broken by position)."""
    import torch

    out_f, in_f = scores.shape
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_m is not None:
        n, m = n_m
        groups = scores.reshape(out_f, in_f // m, m)
        idx = torch.topk(groups, n, dim=-1, largest=False, sorted=False).indices
        keep.view(out_f, in_f // m, m).scatter_(-1, idx, False)
        return keep
    if per_row:
        k = round(in_f * fraction)
        if k:
            keep.scatter_(1, torch.topk(scores, k, dim=1, largest=False, sorted=False).indices, False)
        return keep
    k = round(scores.numel() * fraction)
    if k:
        keep.view(-1)[torch.topk(scores.reshape(-1), k, largest=False, sorted=False).indices] = False
    return keep


def _global_threshold(layers: dict[str, Any], fraction: float) -> float:
    """The magnitude at or below which ``fraction`` of all the layers' weights lie (bisection over counts: no copy
    of the component's weights is made)."""
    total = sum(m.weight.numel() for m in layers.values())
    want = fraction * total
    lo, hi = 0.0, max(float(m.weight.detach().abs().max()) for m in layers.values())
    for _ in range(60):
        mid = (lo + hi) / 2
        below = sum(int((m.weight.detach().abs() <= mid).sum()) for m in layers.values())
        lo, hi = (mid, hi) if below < want else (lo, mid)
    return hi


def by_block(layers: dict[str, Any]) -> list[dict[str, Any]]:
    """The layers by block (transformer) or encoder layer, in order."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in layers.items():
        prefix = next(p for ps in PRUNED.values() for p in ps if name.startswith(p))
        out.setdefault(prefix + name[len(prefix):].split(".")[0], {})[name] = m
    return list(out.values())


@dataclass
class Masks:
    """One component's masks (True = kept) and what they zeroed."""
    masks: dict[str, Any] = field(default_factory=dict)  # layer name -> bool mask of its weight

    def per_layer(self) -> dict[str, float]:
        return {n: round(1 - float(m.float().mean()), 6) for n, m in self.masks.items()}

    def achieved(self) -> float:
        zeros = sum(int((~m).sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        return zeros / total if total else 0.0


def sparsify(module: Any, fraction: float, spec: SparsitySpec, calibrate: Callable[[], None] | None = None) -> Masks:
    """Zero ``fraction`` of ``module``'s pruned layers' weights (in place) by ``spec``; returns the masks.

    Wanda needs ``calibrate`` (a run of ``module`` over calibration inputs): block by block (or encoder layer by
    layer), each block's input norms are taken with the blocks before it already pruned, then its layers are pruned,
    as Wanda's and the study's code prune layer after layer."""
    import torch

    layers = pruned_layers(module)
    check_pattern(layers, spec.n_m, type(module).__name__)
    out = Masks()
    if spec.method == "wanda" and calibrate is None:
        raise HpedgeError("internal: Wanda needs calibration runs")
    thresh = _global_threshold(layers, fraction) if spec.scope == "global" else None
    with torch.no_grad():
        for group in by_block(layers):
            norms: dict[str, Any] = {}
            if spec.method == "wanda":
                rec = InputNorms(group)
                try:
                    calibrate()  # type: ignore[misc]
                finally:
                    rec.close()
                norms = rec.norms()
            for name, layer in group.items():
                if thresh is not None:
                    keep = layer.weight.detach().abs() > thresh
                else:
                    keep = layer_mask(_scores(layer, norms.get(name)), fraction, spec.n_m, per_row=spec.method == "wanda")
                layer.weight.mul_(keep.to(layer.weight.dtype))
                out.masks[name] = keep.cpu()
    return out


class InputNorms:
    """Forward pre-hooks on ``layers`` summing each input column's squares over every row they see (Wanda's
    activation statistic); :meth:`norms` gives the L2 norm per input column."""

    def __init__(self, layers: dict[str, Any]) -> None:
        self.sums: dict[str, Any] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str) -> Any:
        def fn(_m: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            s = (x * x).sum(dim=0).cpu()
            self.sums[name] = s if name not in self.sums else self.sums[name] + s
        return fn

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def norms(self) -> dict[str, Any]:
        return {n: s.sqrt() for n, s in self.sums.items()}


def keep_masked(module: Any, masks: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(parameter, mask) pairs of ``module``'s pruned weights, for the distiller: their gradients are masked before
    each optimiser step and the weights masked after it, so a pruned weight stays exactly zero (AdamW without weight
    decay then never moves it)."""
    layers = dict(module.named_modules())
    return [(layers[n].weight, m.to(layers[n].weight.device)) for n, m in masks.items()]


CALIBRATION_CALLS = 32  # transformer calls (denoising steps x prompts) Wanda's statistics are taken over
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


def text_calibration(encoder: Any, tokenizer: Any, prompts: list[str], length: int) -> Callable[[], None]:
    """A run of ``encoder`` over the calibration prompts' token ids (padded as the pipeline pads them)."""
    import torch

    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids

    def run() -> None:
        with torch.no_grad():
            encoder(ids.to(encoder.device))

    return run


def transformer_calibration(pipe: Any, student: Any, prompts: list[str], gen: Defaults) -> Callable[[], None]:
    """A run of ``student`` over transformer inputs captured from the (dense) pipeline's own sampling of the
    calibration prompts at ``gen`` (at most :data:`CALIBRATION_CALLS` calls, evenly spread over the steps)."""
    with recording_transformer_calls(pipe) as calls:
        sample(pipe, prompts, gen, seeds=list(range(len(prompts))), batch_size=len(prompts))
    calls = calls[:: max(1, -(-len(calls) // CALIBRATION_CALLS))]
    return lambda: replay_transformer_calls(student, calls)


def apply(teacher_pipe: Any, student: Any, spec: SparsitySpec, prompts: list[str], gen: Defaults
          ) -> tuple[dict[str, Any], Masks | None, dict[str, Any]]:
    """Weight sparsity on a compressed pipeline: each text encoder named in ``spec`` copied from the teacher and
    pruned, the (block-pruned) ``student`` transformer pruned in place. Returns (the pruned text encoders by
    attribute, the transformer's masks or None, the report's ``sparsity`` section)."""
    import copy

    fractions = spec.resolve(teacher_pipe)
    text: dict[str, Any] = {}
    report: dict[str, Any] = {**spec.to_dict(), "components": {}}
    for attr, f in fractions.items():  # every component's layers checked before any is pruned
        check_pattern(pruned_layers(student if attr == "transformer" else getattr(teacher_pipe, attr)), spec.n_m, attr)
    for attr, f in fractions.items():
        if attr == "transformer":
            continue
        enc = copy.deepcopy(getattr(teacher_pipe, attr))
        tok = getattr(teacher_pipe, TOKENIZERS[attr])
        length = gen.max_sequence_length if attr == family_facts(_family(teacher_pipe)).t5_attribute else tok.model_max_length
        masks = sparsify(enc, f, spec, text_calibration(enc, tok, prompts, length) if spec.method == "wanda" else None)
        text[attr] = enc
        report["components"][attr] = _entry(f, masks)
    tmasks = None
    if "transformer" in fractions:
        run = transformer_calibration(teacher_pipe, student, prompts, gen) if spec.method == "wanda" else None
        tmasks = sparsify(student, fractions["transformer"], spec, run)
        report["components"]["transformer"] = _entry(fractions["transformer"], tmasks)
    return text, tmasks, report


def _family(pipe: Any) -> str:
    return "flux" if type(pipe.transformer).__name__.startswith("Flux") else "sd3"


def _entry(fraction: float, masks: Masks) -> dict[str, Any]:
    return {"requested": fraction, "achieved": round(masks.achieved(), 6), "layers": masks.per_layer()}


def size_note(pattern: str, components: dict[str, float]) -> str:
    """What weight sparsity does to a package's bytes (``hpedge plan``): unstructured zeros shrink nothing that is
    stored; 2:4 changes only how TensorRT-RTX may run the engines."""
    what = ", ".join(f"{k} {v:.1%}" for k, v in components.items())
    if pattern == "unstructured":
        return (f"weight sparsity ({what}, unstructured): the package is as large as a dense one (the INT4 and int8 "
                "weights store every zero, as do the engines); no bytes are counted for it")
    return (f"weight sparsity ({what}, {pattern}): the package files stay as large as a dense one (INT4 stores every "
            "zero); TensorRT-RTX engines are built with the sparse-weights flag, so the builder may pick sparse "
            "tensor-core kernels (Ampere and newer) for layers whose weights qualify; engine bytes and speed on an "
            "RTX GPU are not measured here")
