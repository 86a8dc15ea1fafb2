"""The engine stage of ``hpedge export`` (and of ``hpedge build`` on a device).

One engine per packaged component (text encoding, INT4 transformer, VAE decoder), one optimization
profile each, from the device profile's resolution and batch ranges. Which library builds them and for
which GPUs is the profile's ``engine`` section: TensorRT-RTX profiles are built here on any host;
standard TensorRT profiles (Jetson) are planned here and built on the device.

Everything needed to build later is written into the manifest's ``engines`` section (the ONNX file and the
input shapes of each component), so ``hpedge build`` needs nothing but the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpedge.backends import engines as eng
from hpedge.errors import HpedgeError
from hpedge.targets import Profile

COMPONENTS = ("text_clip", "text_t5", "transformer", "vae_decoder")


def plan(mode: str, profile: Profile, precisions: set[str]) -> tuple[bool, str]:
    """(build now?, reason) for ``--engine auto|require|skip``; raises where ``require`` cannot be met."""
    if mode not in ("auto", "require", "skip"):
        raise HpedgeError(f"--engine must be auto, require or skip, got {mode!r}")
    if mode == "skip":
        return False, "engine build skipped (--engine skip)"
    spec = profile.engine
    refusal = eng.precision_refusal(spec.library, spec.compute_capabilities, precisions)
    if refusal:
        raise HpedgeError(f"target {profile.name}: {refusal}")
    if profile.build_on == "device":
        reason = (f"engines for {profile.name} are built on the device itself (its JetPack TensorRT): "
                  "copy the package there and run `hpedge build PACKAGE`")
        if mode == "require":
            raise HpedgeError(f"--engine require: {reason}")
        return False, reason
    av = eng.library(spec.library).build_availability(spec.compute_capabilities)
    if not av.ok:
        if mode == "require":
            raise HpedgeError(f"--engine require: cannot build the {spec.library} engines here: {av.reason}")
        return False, f"{av.reason}; build them later with `hpedge build PACKAGE`"
    return True, av.reason


def batch_range(profile: Profile, family: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(batch of prompts, batch of the transformer and text engines).

    SD3 pipelines sample with classifier-free guidance: the negative and the positive prompt run as one
    batch of twice the prompts, so their engines cover twice the profile's batch (opt and max); FLUX.1 has
    no CFG (FLUX.1-dev's guidance is an input of the transformer).
    """
    b = (profile.batch.min, profile.batch.opt, profile.batch.max)
    if family == "sd3":
        return b, (b[0], 2 * b[1], 2 * b[2])
    return b, b


def _with_batch(shapes: tuple[tuple[int, ...], ...], batch: tuple[int, int, int]) -> list[list[int]]:
    return [[bb, *s[1:]] for s, bb in zip(shapes, batch)]


def component_plan(family: str, transformer_io: dict[str, Any], batch_axes: dict[str, bool],
                   text_lengths: dict[str, int], latent_channels: int, latent_range: tuple[int, int, int],
                   profile: Profile, text_encoders: dict[str, Any]) -> dict[str, Any]:
    """Each component's ONNX file and engine input shapes ({name: {min, opt, max}}).

    ``transformer_io``: the transformer's ONNX input shapes (as in the manifest); ``batch_axes``: which of
    its inputs carry the batch in dimension 0; ``text_encoders``: the manifest's text encoders (one engine each,
    ``text_clip`` and ``text_t5``).
    """
    prompts, cfg = batch_range(profile, family)
    tr = {}
    for name, v in transformer_io.items():
        s = (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"]))
        rows = _with_batch(s, cfg) if batch_axes.get(name) else [list(x) for x in s]
        tr[name] = dict(zip(("min", "opt", "max"), rows))
    text = {name: {k: [b, length] for k, b in zip(("min", "opt", "max"), cfg)} for name, length in text_lengths.items()}
    vae = {"latents": {k: [b, latent_channels, h, h] for k, b, h in zip(("min", "opt", "max"), prompts, latent_range)}}
    return {
        **{f"text_{name}": {"onnx": e["file"], "shapes": {k: text[k] for k in e["inputs"]}}
           for name, e in text_encoders.items()},
        "transformer": {"onnx": "transformer/int4/model.onnx", "shapes": tr,
                        "batch_inputs": sorted(k for k, v in batch_axes.items() if v)},
        "vae_decoder": {"onnx": "vae_decoder/model.onnx", "shapes": vae},
    }


def _shapes(d: dict[str, Any]) -> eng.Shapes:
    return {k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in d.items()}


PLAN_KEYS = ("onnx", "shapes", "batch_inputs")


def planned(components: dict[str, Any]) -> dict[str, Any]:
    """The plan part of each component (what a build needs), without earlier build facts."""
    return {k: {kk: v[kk] for kk in PLAN_KEYS if kk in v} for k, v in components.items()}


def build_all(root: Path, components: dict[str, Any], target: dict[str, Any],
              progress: Any = None) -> dict[str, Any]:
    """Build every component's engine into ``root/engines``; returns the components with their build facts.

    ``target`` is the profile as the manifest stores it (``Profile.to_dict()``).
    """
    from hpedge.export.onnx_export import initializer_bytes
    from hpedge.runtime import sha256

    spec = target["engine"]
    adapter = eng.library(spec["library"])
    out = {}
    for name in COMPONENTS:
        c = components[name]
        if progress:
            progress(f"building the {name} engine ({spec['library']}, "
                     f"{', '.join('sm_' + x.replace('.', '') for x in spec['compute_capabilities'])})")
        onnx = root / c["onnx"]
        settings = eng.BuildSettings(_shapes(c["shapes"]), tuple(spec["compute_capabilities"]),
                                     int(target["builder_optimization_level"]), int(target["workspace_gb"] * 2**30))
        facts = eng.build_cached(adapter, onnx, sha256(onnx), root / "engines" / f"{name}.plan", settings)
        out[name] = {**c, **facts, "file": f"engines/{facts['file']}", "onnx_weight_bytes": initializer_bytes(onnx)}
    return out


def runtime_cache_note(library: str) -> str | None:
    if library != "tensorrt_rtx":
        return None
    return ("TensorRT-RTX finishes each engine just in time on the GPU that runs it; hpedge.runtime keeps the "
            "compiled kernels there in <cache>/runtime/<cache_key>.rtxcache, <cache> being $HPEDGE_CACHE_DIR, else "
            "$XDG_CACHE_HOME/hpedge, else ~/.cache/hpedge")


def within_batch(component: dict[str, Any], feeds: list[dict[str, Any]], ref: list[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Transformer feeds (and their references) cut to the engine's largest batch."""
    names = list(component["shapes"])
    cap = min(component["shapes"][k]["max"][0] for k in component["batch_inputs"])
    cut = [{k: (f[k][:cap] if k in component["batch_inputs"] else f[k]) for k in names} for f in feeds]
    return cut, [r[:cap] for r in ref]
