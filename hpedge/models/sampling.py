"""Sampling defaults and one family-agnostic sampling call, shared by analysis, distillation's sample
pool, ``hpedge generate``, evaluation and the export's end-to-end parity.

Stock diffusers is the reference implementation: ``sample`` calls the pipeline's own ``__call__`` with
the arguments its family takes (SD3: CFG over [negative, positive]; FLUX.1-dev: the guidance scale as a
transformer input; FLUX.1-schnell: no guidance), so the sampling schedule (shift, dynamic shifting) is
the one in the pipeline's scheduler config. Defaults come from the zoo marker for a zoo model, else
from the architecture record the transformer's structure matches (``hpedge/models/configs``), else from
the pipeline class's own call defaults.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hpedge.errors import HpedgeError
from hpedge.models.architectures import ARCHITECTURES, architecture, match
from hpedge.models.denoise import family_of, pack, unpack
from hpedge.models.families import family as family_facts

GUIDANCE_KINDS = ("cfg", "true_cfg", "distilled", "none")
SUPPORTED_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


@dataclass(frozen=True)
class Defaults:
    height: int
    width: int
    steps: int
    guidance: float
    guidance_kind: str  # cfg (SD3), true_cfg (a negative-prompt batch, FLUX zoo), distilled (FLUX.1-dev), none
    max_sequence_length: int
    architecture: str | None  # the matched architecture record, None for a zoo model or an unknown one
    source: str  # where the defaults come from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def zoo_marker(path: Path | None) -> dict[str, Any]:
    if path is not None and (Path(path) / "hpedge_zoo.json").exists():
        return json.loads((Path(path) / "hpedge_zoo.json").read_text())  # type: ignore[no-any-return]
    return {}


def check_pipeline(pipe: Any) -> None:
    """One clear line for a pipeline hpedge cannot sample correctly."""
    sched = type(pipe.scheduler).__name__
    if sched not in SUPPORTED_SCHEDULERS:
        raise HpedgeError(f"unsupported scheduler {sched}: hpedge samples with {', '.join(SUPPORTED_SCHEDULERS)} "
                          "(the scheduler SD3.5 and FLUX.1 ship)")
    cfg = pipe.scheduler.config
    for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "stochastic_sampling"):
        if cfg.get(flag):
            raise HpedgeError(f"the scheduler config sets {flag}; the hpedge runtime implements the plain flow-matching "
                              "Euler schedule (shift, dynamic shifting, shift_terminal) only")
    tr = pipe.transformer.config
    vae = pipe.vae.config
    expected = tr.in_channels // family_facts(family_of(pipe)).latent_packing
    if vae.latent_channels != expected:
        raise HpedgeError(f"the VAE has {vae.latent_channels} latent channels but the transformer expects {expected}")


def defaults(pipe: Any, path: Path | None = None) -> Defaults:
    """Sampling defaults of ``pipe`` (loaded from ``path`` if given)."""
    return _defaults(family_of(pipe), dict(pipe.transformer.config), path, pipe.vae_scale_factor, type(pipe))


def defaults_of(family: str, transformer_config: dict[str, Any], path: Path | None, vae_scale_factor: int = 8
                ) -> Defaults:
    """Sampling defaults from configs alone (``hpedge info``: no weights loaded)."""
    if family == "sd3":
        from diffusers import StableDiffusion3Pipeline as cls
    else:
        from diffusers import FluxPipeline as cls
    return _defaults(family, transformer_config, path, vae_scale_factor, cls)


def _defaults(family: str, tr: dict[str, Any], path: Path | None, vae_scale_factor: int, cls: Any) -> Defaults:

    marker = zoo_marker(path)
    if marker:
        r = int(marker["resolution"])
        return Defaults(r, r, int(marker["steps"]), float(marker["guidance"]), marker["guidance_kind"],
                        int(marker["max_sequence_length"]), None, "hpedge_zoo.json")
    name = match(family, tr, str(path or ""))
    res = int(tr.get("sample_size", 128)) * vae_scale_factor if family == "sd3" else 1024
    if name is not None:
        d = architecture(name)["defaults"]
        return Defaults(d["height"], d["width"], d["steps"], d["guidance"], d["guidance_kind"],
                        d["max_sequence_length"], name, f"architecture {name}")
    sig = inspect.signature(cls.__call__).parameters

    def default(k: str, fallback: Any) -> Any:
        v = sig[k].default if k in sig else fallback
        return fallback if v is None or v is inspect.Parameter.empty else v

    kind = "cfg" if family == "sd3" else ("distilled" if tr.get("guidance_embeds") else "none")
    return Defaults(res, res, int(default("num_inference_steps", 28)), float(default("guidance_scale", 3.5)), kind,
                    int(default("max_sequence_length", 256)), None, f"{cls.__name__} call defaults")


def defaults_of_ref(ref: Any) -> Defaults | None:
    """Sampling defaults of a resolved model from configs alone (None where a folder's transformer config
    cannot be read)."""
    import json

    if ref.architecture is not None:
        return defaults_of(ref.family, ARCHITECTURES[ref.architecture][1], None)
    cfg = ref.path / "transformer" / "config.json"
    vae = ref.path / "vae" / "config.json"
    if not cfg.exists():
        return None
    blocks = len(json.loads(vae.read_text()).get("block_out_channels", [0] * 4)) if vae.exists() else 4
    return defaults_of(ref.family, json.loads(cfg.read_text()), ref.path, 2 ** (blocks - 1))


def with_overrides(d: Defaults, height: int | None = None, width: int | None = None, steps: int | None = None,
                   guidance: float | None = None, max_sequence_length: int | None = None) -> Defaults:
    kw = {k: v for k, v in dict(height=height, width=width, steps=steps, guidance=guidance,
                                 max_sequence_length=max_sequence_length).items() if v is not None}
    for k in ("height", "width", "steps", "max_sequence_length"):
        if k in kw and kw[k] < 1:
            raise HpedgeError(f"--{k.replace('_', '-')} must be at least 1, got {kw[k]}")
    if guidance is not None and guidance < 0:
        raise HpedgeError(f"--guidance must not be negative, got {guidance}")
    return replace(d, **kw)


def check_size(pipe: Any, height: int, width: int) -> None:
    m = pipe.vae_scale_factor * 2
    if height % m or width % m or height <= 0 or width <= 0:
        raise HpedgeError(f"height and width must be positive multiples of {m} for this pipeline (got {height}x{width})")


def call_kwargs(pipe: Any, d: Defaults, negative_prompt: str | list[str] | None, n: int) -> dict[str, Any]:
    """Keyword arguments of the stock pipeline call for defaults ``d`` (guidance by family)."""
    kw: dict[str, Any] = dict(num_inference_steps=d.steps, height=d.height, width=d.width,
                              max_sequence_length=d.max_sequence_length)
    neg = [negative_prompt] * n if isinstance(negative_prompt, str) else negative_prompt
    if d.guidance_kind == "cfg":
        kw["guidance_scale"] = d.guidance
        if neg is not None:
            kw["negative_prompt"] = neg
            if family_of(pipe) == "sd3":
                kw["negative_prompt_2"] = kw["negative_prompt_3"] = neg
    elif d.guidance_kind == "true_cfg":
        kw["true_cfg_scale"] = d.guidance
        if d.guidance > 1:
            kw["negative_prompt"] = neg if neg is not None else [""] * n
    elif d.guidance_kind == "distilled":
        kw["guidance_scale"] = d.guidance
        if neg is not None:
            raise HpedgeError("this FLUX pipeline is guidance-distilled (the scale is a model input): it takes no "
                              "negative prompt")
    else:
        if neg is not None:
            raise HpedgeError("this pipeline samples without guidance: it takes no negative prompt")
    return kw


def prompt_embeddings(pipe: Any, prompts: list[str], d: Defaults, negative_prompt: str | list[str] | None = None,
                      device: Any = None) -> dict[str, Any]:
    """What the stock pipeline call for ``prompts`` at defaults ``d`` computes with its text encoders (its own
    ``encode_prompt``, with the arguments that call passes: negative prompts for CFG, ``max_sequence_length``), as
    the call's ``*prompt_embeds`` keyword arguments (CPU tensors). :func:`sample` with ``embeds=`` these then
    runs without the text encoders and gives the same images: an export encodes its prompts, exports the
    encoders and frees them before the transformer is loaded. ``device``: where the encoders run."""
    import torch

    n = len(prompts)
    kw = call_kwargs(pipe, d, negative_prompt, n)
    with torch.no_grad():
        if family_of(pipe) == "sd3":
            cfg = d.guidance_kind == "cfg" and d.guidance > 1
            pe, npe, pooled, npooled = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, negative_prompt=kw.get("negative_prompt"),
                negative_prompt_2=kw.get("negative_prompt_2"), negative_prompt_3=kw.get("negative_prompt_3"),
                do_classifier_free_guidance=cfg, device=device, max_sequence_length=d.max_sequence_length)
            out = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
            if cfg:
                out.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npooled)
        else:
            pe, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                               max_sequence_length=d.max_sequence_length)
            out = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
            if "negative_prompt" in kw:  # true CFG: the pipeline encodes the negative prompts the same way
                npe, npooled, _ = pipe.encode_prompt(prompt=kw["negative_prompt"], prompt_2=None, device=device,
                                                     max_sequence_length=d.max_sequence_length)
                out.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npooled)
    return {k: v.cpu() for k, v in out.items()}


@contextmanager
def _text_encoders_set_aside(pipe: Any, aside: bool) -> Iterator[None]:
    """The pipeline without its text encoders while a call with precomputed embeddings runs: they may be gone
    (an export frees them to the meta device, which diffusers would then report as the pipeline's device)."""
    kept = {a: getattr(pipe, a) for a in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if aside and getattr(pipe, a, None) is not None}
    for a in kept:
        setattr(pipe, a, None)
    try:
        yield
    finally:
        for a, m in kept.items():
            setattr(pipe, a, m)


@contextmanager
def recording_transformer_calls(pipe: Any, every: int = 1) -> Iterator[list[dict[str, Any]]]:
    """Within the block, every ``every``-th call of ``pipe.transformer`` appends its keyword arguments (tensors detached
    and on the CPU, in their own dtype) to the yielded list: the transformer inputs of a real sampling run, for
    calibration (AWQ, Wanda, vector quantization) and parity."""
    import torch

    calls: list[dict[str, Any]] = []
    counter = {"n": 0}

    def hook(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        if counter["n"] % every == 0:
            calls.append({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        counter["n"] += 1

    h = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        h.remove()


def replay_transformer_calls(module: Any, calls: list[dict[str, Any]]) -> None:
    """Run ``module`` (a transformer of the same family, e.g. a pruned student) on recorded calls, without gradients
    (its forward hooks see each call's activations)."""
    import torch

    dev = next(module.parameters()).device
    with torch.no_grad():
        for kw in calls:
            module(**{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})


def sample(pipe: Any, prompts: list[str], d: Defaults, seeds: list[int] | None = None, latents: Any = None,
           negative_prompt: str | list[str] | None = None, output: str = "np", batch_size: int | None = None,
           embeds: dict[str, Any] | None = None) -> Any:
    """Images (N, H, W, C) in [0, 1] as float32 numpy (``output="np"``), or the final latents
    (N, C, h, w) in the VAE's normalised space as a float32 torch tensor (``output="latent"``).

    Sample i starts from ``latents[i]`` (unpacked, (C, h, w)) or from the pipeline's own noise drawn with
    ``torch.Generator().manual_seed(seeds[i])``; the call runs on the pipeline's device and dtype. ``embeds``:
    :func:`prompt_embeddings` of these ``prompts`` (and ``negative_prompt``), passed to the call in their place.
    """
    import numpy as np
    import torch

    check_pipeline(pipe)
    check_size(pipe, d.height, d.width)
    if seeds is None and latents is None:
        seeds = list(range(len(prompts)))
    bs = batch_size or len(prompts)
    flux = family_of(pipe) == "flux"
    out = []
    for i in range(0, len(prompts), bs):
        chunk = prompts[i : i + bs]
        kw = call_kwargs(pipe, d, negative_prompt if not isinstance(negative_prompt, list)
                         else negative_prompt[i : i + bs], len(chunk))
        if latents is not None:
            lat = latents[i : i + bs].to(pipe.transformer.device, pipe.transformer.dtype)
            kw["latents"] = pack(lat) if flux else lat
        else:
            kw["generator"] = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + bs]]  # type: ignore[index]
        kw["output_type"] = "latent" if output == "latent" else "np"
        if embeds is not None:  # the call's own encode_prompt outputs, computed earlier
            for k in ("negative_prompt", "negative_prompt_2", "negative_prompt_3"):
                kw.pop(k, None)
            kw.update({k: v[i : i + bs].to(pipe.transformer.device) for k, v in embeds.items()})
        with torch.no_grad(), _text_encoders_set_aside(pipe, embeds is not None):
            res = pipe(None if embeds is not None else chunk, **kw).images
        if output == "latent":
            if flux:
                res = unpack(res, d.height // pipe.vae_scale_factor, d.width // pipe.vae_scale_factor)
            out.append(res.float().cpu())
        else:
            out.append(np.asarray(res, dtype=np.float32))
    return torch.cat(out) if output == "latent" else np.concatenate(out)


def initial_latents(pipe: Any, d: Defaults, seeds: list[int]) -> Any:
    """Unpacked float32 starting noise (N, C, h, w), one seeded CPU generator per sample."""
    import torch

    c = pipe.vae.config.latent_channels
    h, w = d.height // pipe.vae_scale_factor, d.width // pipe.vae_scale_factor
    return torch.stack([torch.randn((c, h, w), generator=torch.Generator().manual_seed(int(s))) for s in seeds])
