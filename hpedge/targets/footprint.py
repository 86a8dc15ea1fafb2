"""Device memory of a package on a target, component by component (``hpedge plan --target``, ``export --target``).

What is counted is what the package ships, at the precision it ships it in:

- ``transformer``: the engine's weights at its precision (:func:`hpedge.targets.precisions.transformer_bytes`: INT4 with
  fp16 scales per block of 128 by default, INT8 / FP8 per output channel, NVFP4 with an FP8 scale per 16; 16 bits for
  the rest). Activations are counted in fp16 at every precision: FP8 / FP4 halve or quarter only the GEMMs' inputs;
- ``t5``: T5's INT4 weights, the same format, or INT8 weight-only (``--t5 int8``: a byte per weight and an fp16
  scale per output channel); absent with ``--drop-t5`` (SD3 then feeds zeros, as diffusers does without
  ``text_encoder_3``);
- ``clip``: the CLIP encoders in fp16;
- ``vae_decoder``: the VAE decoder in fp16 (the encoder is not shipped).

Activations are not guessed from a formula: each phase (text encoding, one denoising step, VAE decoding) runs
on the meta device (shapes only, no memory, no arithmetic) in fp16 at the profile's opt resolution and batch
(twice the batch for the SD3 transformer: classifier-free guidance), and the peak of the bytes alive at once
is taken, weights excluded. Attention is counted as a fused kernel holds it (its output; the score matrix
lives in tiles), which is how TensorRT runs it.

Residency says which weights are in memory together: ``resident`` keeps every component loaded (fastest;
discrete cards), ``sequential`` loads each phase's components for that phase alone and frees them after it
(text encoders freed after encoding; shared-memory Jetsons, where host and GPU memory are one, so nothing
can be offloaded). ``auto`` picks ``sequential`` on shared-memory profiles, ``resident`` elsewhere. The
profile's ``reserve_gb`` (runtime, CUDA context, the OS on a Jetson) is kept free on top.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from hpedge.errors import HpedgeError
from hpedge.models import adapters
from hpedge.models.denoise import Conditioning, predict
from hpedge.models.families import family as family_facts
from hpedge.models.meta import meta_components, meta_transformer, text_tokens
from hpedge.models.sampling import defaults_of_ref, zoo_marker
from hpedge.targets import precisions
from hpedge.targets.profiles import Profile
from hpedge.targets.shapes import batch_range, resolution_range

RESIDENCIES = ("auto", "resident", "sequential")
PHASES = {"text": ("clip", "t5"), "transformer": ("transformer",), "vae_decoder": ("vae_decoder",)}


@dataclass
class Footprint:
    target: str
    residency: str  # resident | sequential
    resolution: int
    prompts: int  # images generated together (the profile's opt batch)
    drop_t5: bool
    capacity: int  # bytes for weights and activations: the profile's memory less its reserve
    weights: dict[str, int] = field(default_factory=dict)  # component -> bytes as shipped
    activations: dict[str, int] = field(default_factory=dict)  # phase -> peak bytes alive (weights excluded)
    precisions: dict[str, str] = field(default_factory=dict)

    def phase_bytes(self, phase: str, transformer: int | None = None) -> int:
        w = {**self.weights, **({"transformer": transformer} if transformer is not None else {})}
        return sum(w.get(c, 0) for c in PHASES[phase]) + self.activations.get(phase, 0)

    def need(self, transformer: int | None = None) -> int:
        """Peak bytes; ``transformer``: the transformer's INT4 bytes instead of the stored ones (the planner's search)."""
        w = {**self.weights, **({"transformer": transformer} if transformer is not None else {})}
        if self.residency == "resident":
            return sum(w.values()) + max(self.activations.values(), default=0)
        return max(self.phase_bytes(p, transformer) for p in PHASES)

    def fits(self, transformer: int | None = None) -> bool:
        return self.need(transformer) <= self.capacity

    def with_transformer(self, transformer: int) -> "Footprint":
        return Footprint(**{**asdict(self), "weights": {**self.weights, "transformer": transformer}})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "need": self.need(), "fits": self.fits()}

    def rows(self) -> list[tuple[str, str, int]]:
        """(what, precision, bytes) for a table."""
        out = [(c, self.precisions.get(c, ""), b) for c, b in self.weights.items()]
        out += [(f"activations: {p}", "fp16", b) for p, b in self.activations.items()]
        return out


def refuse_unless_fits(fp: Footprint) -> None:
    """One line, before any work, for a package that cannot fit its target."""
    if fp.fits():
        return
    parts = ", ".join(f"{c} {b / 1e9:.2f}" for c, b in fp.weights.items())
    acts = ", ".join(f"{c} {b / 1e9:.2f}" for c, b in fp.activations.items())
    raise HpedgeError(f"this package does not fit {fp.target} ({fp.residency}, {fp.resolution} px): it needs "
                      f"{fp.need() / 1e9:.2f} GB (weights GB: {parts}; activations GB: {acts}), "
                      f"{(fp.need() - fp.capacity) / 1e9:.2f} GB more than the {fp.capacity / 1e9:.2f} GB available; "
                      f"compress it first (`hpedge compress --target {fp.target}`), or see `hpedge plan --target`")


def residency_for(profile: Any, residency: str) -> str:
    if residency not in RESIDENCIES:
        raise HpedgeError(f"--residency must be one of {', '.join(RESIDENCIES)}, got {residency!r}")
    if residency == "auto":
        return "sequential" if profile.shared_memory else "resident"
    return residency


T5_PRECISIONS = ("auto", "int4", "int8")


def choose_t5(cost: Callable[[str], float]) -> tuple[str, str]:
    """``--t5 auto``, the one rule for export and compress alike: T5 in INT8 (weight-only, closer to PyTorch)
    unless it costs more than INT4, else INT4 (half its bytes). ``cost(precision)`` is what that precision
    costs the package: transformer blocks removed to fit (compress) or 0 / inf for fits / does not (export).
    Returns the precision and why."""
    c8 = cost("int8")
    if c8 == 0:
        return "int8", "T5 INT8: the package fits with it"
    c4 = cost("int4")
    if math.isfinite(c8) and c8 <= c4:
        return "int8", "T5 INT8: INT4 would not save a transformer block"
    return "int4", ("T5 INT4: with INT8 the package does not fit" if not math.isfinite(c8)
                    else f"T5 INT4: INT8 would cost {c8 - c4:g} more transformer block(s)")


def estimate(ref: Any, profile: Profile, residency: str = "auto", drop_t5: bool = False,
             remove: list[int] | None = None, max_sequence_length: int | None = None, t5: str = "auto",
             precision: str = "int4") -> Footprint:
    """The package's device memory on ``profile`` for a resolved model (an architecture name or a pipeline
    folder), from configs alone: every module is built on the meta device, no weight is read.

    ``t5``: ``int8``, ``int4`` or ``auto`` (:func:`choose_t5`: int8 where the package fits with it); ``precision``: the
    transformer's, as its engine holds it (:mod:`hpedge.targets.precisions`)."""
    if t5 not in T5_PRECISIONS:
        raise HpedgeError(f"--t5 must be one of {', '.join(T5_PRECISIONS)}, got {t5!r}")
    if t5 == "auto":
        if drop_t5:
            return estimate(ref, profile, residency, drop_t5, remove, max_sequence_length, "int8", precision)
        fps: dict[str, Footprint] = {}
        transformer_precision = precision

        def cost(precision: str) -> float:
            fps[precision] = estimate(ref, profile, residency, drop_t5, remove, max_sequence_length, precision,
                                      transformer_precision)
            return 0 if fps[precision].fits() else math.inf

        chosen, _ = choose_t5(cost)
        return fps[chosen]
    import torch
    from diffusers.utils import logging as diffusers_logging

    prof = profile
    family = ref.family
    if drop_t5 and not family_facts(family).t5_optional:
        raise HpedgeError("--drop-t5 applies to SD3 pipelines only: FLUX.1 takes its prompt embeddings from T5")
    mode = residency_for(prof, residency)
    comps = meta_components(ref)
    tr = meta_transformer(ref)
    if remove:
        tr, _ = adapters.prune(tr, set(remove))
    msl = max_sequence_length or _default_msl(ref)
    side = _resolution(ref, tr, comps["vae"], prof)
    prompts, cfg = batch_range(prof, family)
    fp = Footprint(prof.name, mode, side, prompts[1], drop_t5, int((prof.memory_gb - prof.reserve_gb) * 1e9))
    fp.weights["transformer"] = precisions.transformer_bytes(tr, precision)
    fp.precisions["transformer"] = precision
    clips = [m for k, m in comps.items() if k.startswith("clip")]
    fp.weights["clip"] = sum(2 * _params(m) for m in clips)
    fp.precisions["clip"] = "fp16"
    if not drop_t5:
        fp.weights["t5"] = adapters.int4_bytes(comps["t5"]) if t5 == "int4" else _int8_bytes(comps["t5"])
        fp.precisions["t5"] = t5
    vae = comps["vae"]
    fp.weights["vae_decoder"] = 2 * (_params(vae.decoder) + _params(getattr(vae, "post_quant_conv", None)))
    fp.precisions["vae_decoder"] = "fp16"

    half = torch.float16
    b = cfg[1]
    quiet = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its warning about casting modules with to() concerns weights; none here
    with torch.no_grad():  # CLIP runs at its full length (77 tokens for the real encoders)
        text = [_peak(m.to(half), lambda m=m: m(torch.zeros(b, int(m.config.max_position_embeddings),
                                                            dtype=torch.long, device="meta"),
                                                   output_hidden_states=True)) for m in clips]
        if not drop_t5:
            t5_model = comps["t5"].to(half)
            text.append(_peak(t5_model, lambda: t5_model(torch.zeros(b, msl, dtype=torch.long, device="meta"))))
        fp.activations["text"] = max(text)
        fp.activations["transformer"] = _transformer_peak(tr.to(half), family, b, side, msl,
                                                           2 ** (len(vae.config.block_out_channels) - 1))
        lat = side // (2 ** (len(vae.config.block_out_channels) - 1))
        c = int(vae.config.latent_channels)
        fp.activations["vae_decoder"] = _peak(vae.to(half), lambda: vae.decode(
            torch.empty(prompts[1], c, lat, lat, dtype=half, device="meta"), return_dict=False))
    diffusers_logging.set_verbosity(quiet)
    return fp


@dataclass
class PrecisionChoice:
    """The engine precisions to try on a target, best first, of those that fit (``order``), each one's footprint
    (``footprints``, every candidate's) and why (``why``, said in the output and recorded in the manifest)."""
    order: list[str]
    footprints: dict[str, Footprint]
    why: str

    def rows(self) -> list[tuple[str, float, float, bool]]:
        """(precision, transformer GB, needed GB, fits) per candidate."""
        return [(p, fp.weights["transformer"] / 1e9, fp.need() / 1e9, fp.fits()) for p, fp in self.footprints.items()]


def choose_precision(ref: Any, profile: Profile, requested: str = "auto", residency: str = "auto", drop_t5: bool = False,
                     remove: list[int] | None = None, t5: str = "auto") -> PrecisionChoice:
    """``--precision`` resolved on ``profile`` (:func:`hpedge.targets.precisions.candidates`: refused in one line where
    the GPU does not run it), less the precisions whose package would not fit; an empty ``order``: none fits."""
    order, why = precisions.candidates(requested, profile)
    fps = {p: estimate(ref, profile, residency, drop_t5, remove, t5=t5, precision=p) for p in order}
    fitting = [p for p in order if fps[p].fits()]
    if fitting and fitting != order:
        why += f"; {', '.join(p for p in order if p not in fitting)} would not fit {profile.name}"
    return PrecisionChoice(fitting, fps, why)


def _resolution(ref: Any, tr: Any, vae: Any, prof: Any) -> int:
    """The opt resolution the package's engines are built for (the export's rule)."""
    vs = 2 ** (len(vae.config.block_out_channels) - 1)
    return resolution_range(ref.family, dict(tr.config), vs, prof, zoo_marker(ref.path))[1]


def _int8_bytes(module: Any) -> int:
    """INT8 weight-only: linear weights one byte each plus an fp16 scale per output channel, 16 bits elsewhere."""
    import torch.nn as nn

    linear = {id(m.weight): m.weight for m in module.modules() if isinstance(m, nn.Linear)}
    rest = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values() if id(p) not in linear)
    return sum(w.numel() + 2 * w.shape[0] for w in linear.values()) + 2 * rest


def _params(m: Any) -> int:
    if m is None:
        return 0
    seen, n = set(), 0
    for p in m.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _default_msl(ref: Any) -> int:
    d = defaults_of_ref(ref)
    if d is None:
        raise HpedgeError(f"{ref.path}: no transformer/config.json; cannot size the package")
    return int(d.max_sequence_length)


class _Live:
    """Bytes of the tensors alive at once (by storage), counted while ops run on the meta device."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.refs: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def track(self, t: Any) -> None:
        s = t.untyped_storage()
        key = s._cdata
        if key in self.exclude:
            return
        if key not in self.refs:
            self.refs[key] = 0
            self.live += int(s.nbytes())
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(t, self._drop, key, int(s.nbytes()))

    def _drop(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= nbytes


def _peak(module: Any, run: Any) -> int:
    """Peak bytes alive while ``run()`` calls ``module`` on the meta device (its weights and buffers excluded)."""
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    exclude = {p.untyped_storage()._cdata for p in [*module.parameters(), *module.buffers()]}
    live = _Live(exclude)

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "meta":
                    live.track(t)
            return out

    def sdpa(*args: Any, **kwargs: Any) -> Any:  # a fused kernel: its output only
        q = args[0] if args else kwargs["query"]
        v = args[2] if len(args) > 2 else kwargs["value"]
        return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa
    try:
        with Mode():
            out = run()
        del out
    finally:
        F.scaled_dot_product_attention = original
    return live.peak


def _transformer_peak(tr: Any, family: str, batch: int, side: int, msl: int, vae_scale: int) -> int:
    import torch

    cfg = tr.config
    half = torch.float16
    lat = side // vae_scale
    c = int(cfg["in_channels"]) // family_facts(family).latent_packing
    n = text_tokens(family, msl)

    def run() -> Any:
        x = torch.empty(batch, c, lat, lat, device="meta", dtype=half)
        cond = Conditioning(torch.empty(batch, n, int(cfg["joint_attention_dim"]), device="meta", dtype=half),
                            torch.empty(batch, int(cfg["pooled_projection_dim"]), device="meta", dtype=half),
                            torch.empty(n, 3, device="meta", dtype=half) if family_facts(family).position_ids else None,
                            3.5 if cfg.get("guidance_embeds") else None)
        return predict(tr, x, torch.empty(batch, device="meta", dtype=half), cond)

    return _peak(tr, run)
