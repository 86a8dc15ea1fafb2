"""Engines: the engine stage of ``hpedge export``, and ``hpedge build`` (a package's pending engines, on a device).

One engine per packaged component (text encoding, the transformer at the package's engine precision, VAE decoder), one optimization
profile each, from the device profile's resolution and batch ranges. Which library builds them and for
which GPUs is the profile's ``engine`` section: TensorRT-RTX profiles are built here on any host;
standard TensorRT profiles (Jetson) are planned here and built on the device.

Everything needed to build later is written into the manifest's ``engines`` section (the ONNX file and the
input shapes of each component), so ``hpedge build`` needs nothing but the package.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hpedge.backends import engines as eng
from hpedge.backends.trt_api import BuildSettings, Shapes
from hpedge.errors import HpedgeError
from hpedge.export import verify
from hpedge.export.onnx_io import initializer_bytes
from hpedge.io import check_parent
from hpedge.runtime.format import finalize_manifest, load_reference, sha256
from hpedge.runtime.package import Package
from hpedge.targets.profiles import Profile, profile_from_dict
from hpedge.targets.shapes import batch_range

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


def _with_batch(shapes: tuple[tuple[int, ...], ...], batch: tuple[int, int, int]) -> list[list[int]]:
    return [[bb, *s[1:]] for s, bb in zip(shapes, batch)]


def component_plan(family: str, transformer_io: dict[str, Any], batch_axes: dict[str, bool],
                   text_lengths: dict[str, int], latent_channels: int, latent_range: tuple[int, int, int],
                   profile: Profile, text_encoders: dict[str, Any], transformer_onnx: str = "transformer/int4/model.onnx"
                   ) -> dict[str, Any]:
    """Each component's ONNX file and engine input shapes ({name: {min, opt, max}}).

    ``transformer_io``: the transformer's ONNX input shapes (as in the manifest); ``batch_axes``: which of
    its inputs carry the batch in dimension 0; ``text_encoders``: the manifest's text encoders (one engine each,
    ``text_clip`` and ``text_t5``); ``transformer_onnx``: the graph of the package's engine precision.
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
        "transformer": {"onnx": transformer_onnx, "shapes": tr,
                        "batch_inputs": sorted(k for k, v in batch_axes.items() if v)},
        "vae_decoder": {"onnx": "vae_decoder/model.onnx", "shapes": vae},
    }


def _shapes(d: dict[str, Any]) -> Shapes:
    return {k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in d.items()}


PLAN_KEYS = ("onnx", "shapes", "batch_inputs")


def planned(components: dict[str, Any]) -> dict[str, Any]:
    """The plan part of each component (what a build needs), without earlier build facts."""
    return {k: {kk: v[kk] for kk in PLAN_KEYS if kk in v} for k, v in components.items()}


def build_all(root: Path, components: dict[str, Any], profile: Profile, progress: Any = None,
              into: Path | None = None) -> dict[str, Any]:
    """Build every component's engine (ONNX files under ``root``) into ``into/engines`` (``root/engines`` by
    default); returns the components with their build facts.

    ``profile``: the export's, or the one the package's manifest stores (``hpedge build``).
    """

    spec = profile.engine
    adapter = eng.library(spec.library)
    out = {}
    for name in (n for n in COMPONENTS if n in components):  # a package without T5 has no text_t5 engine
        c = components[name]
        if progress:
            progress(f"building the {name} engine ({spec.library}, "
                     f"{', '.join('sm_' + x.replace('.', '') for x in spec.compute_capabilities)})")
        onnx = root / c["onnx"]
        settings = BuildSettings(_shapes(c["shapes"]), spec.compute_capabilities, profile.builder_optimization_level,
                                 int(profile.workspace_gb * 2**30), sparse_weights=bool(c.get("sparse_weights")))
        facts = eng.build_cached(adapter, onnx, sha256(onnx), (into or root) / "engines" / f"{name}.plan", settings)
        out[name] = {**c, **facts, "file": f"engines/{facts['file']}", "onnx_weight_bytes": initializer_bytes(onnx)}
    return out


def runtime_cache_note(library: str) -> str | None:
    if library != "tensorrt_rtx":
        return None
    return ("TensorRT-RTX finishes each engine just in time on the GPU that runs it; hpedge.runtime keeps the "
            "compiled kernels there in <cache>/runtime/<cache_key>.rtxcache, <cache> being $HPEDGE_CACHE_DIR, else "
            "$XDG_CACHE_HOME/hpedge, else ~/.cache/hpedge")


def sparse_components(sparsity: dict[str, Any] | None, family: str) -> set[str]:
    """The engine components whose weights are 2:4 sparse (``hpedge compress --sparsity-pattern 2:4``; the manifest's
    ``source.sparsity``): built with the builder's sparse-weights flag. Unstructured zeros change no engine."""
    if not sparsity or sparsity["pattern"] != "2:4":
        return set()
    t5 = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    out = set()
    for attr in sparsity["components"]:
        out.add("transformer" if attr == "transformer" else "text_t5" if attr == t5 else "text_clip")
    return out


def plan_engines(family: str, transformer_io: dict[str, Any], batch_axes: dict[str, bool], text_lengths: dict[str, int],
                 latent_channels: int, latent_range: tuple[int, int, int], profile: Profile, mode: str, reason: str,
                 text: dict[str, Any], sparse: set[str] | None = None, transformer_onnx: str = "transformer/int4/model.onnx"
                 ) -> dict[str, Any]:
    """The manifest's ``engines`` section before any build: library, GPUs, and each component's ONNX and shapes
    (``sparse``: components built with sparse weights, :func:`sparse_components`)."""
    comps = component_plan(family, transformer_io, batch_axes, text_lengths, latent_channels, latent_range, profile,
                           text["encoders"], transformer_onnx)
    for name in sparse or ():
        if name in comps:
            comps[name]["sparse_weights"] = True
    section: dict[str, Any] = {
        "status": "skipped" if mode == "skip" else "pending", "reason": reason, "library": profile.engine.library,
        "compute_capabilities": list(profile.engine.compute_capabilities), "portable": profile.engine.portable,
        "components": comps,
    }
    note = runtime_cache_note(profile.engine.library)
    if note:
        section["runtime_cache"] = note
    return section


def build(package: Path) -> dict[str, Any]:
    """``hpedge build PACKAGE``: build the package's pending engines on this machine (a Jetson board for
    standard TensorRT; any host for TensorRT-RTX). They join the package only if the transformer engine
    matches the PyTorch reference stored at export time, where this machine can run it; until then they are
    built and checked in a folder beside the package, so a failed build leaves the package as it was."""
    pkg = Package(package, variant="int4", device="cpu")
    section = pkg.manifest.get("engines")
    if not section:
        raise HpedgeError(f"{package} has no engines section (written by an older hpedge); export it again")
    profile = profile_from_dict(pkg.manifest["target"], f"{package}/manifest.json target")
    av = eng.library(section["library"]).build_availability(tuple(section["compute_capabilities"]))
    if not av.ok:
        raise HpedgeError(f"cannot build the {section['library']} engines here: {av.reason}")
    check_parent(package)
    staging = Path(tempfile.mkdtemp(prefix=f".{package.name}.build-", dir=package.resolve().parent))
    try:
        built = build_all(package, planned(section["components"]), profile, into=staging)
        new = {**section, "status": "built", "reason": av.reason, "components": built}
        feeds, ref, _ = load_reference(package, pkg.manifest)
        new["parity"] = verify.engine_summary(verify.engine_checks(staging, new, feeds, ref, profile.parity, ("transformer",)))
        if new["parity"].get("run") and not new["parity"]["passed"]:
            raise HpedgeError(f"the engines built but the transformer engine failed parity, not added to the package: "
                              f"{new['parity']}", HpedgeError.CHECK_FAILED)
        (package / "engines").mkdir(exist_ok=True)
        for c in built.values():
            os.replace(staging / c["file"], package / c["file"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = {k: v for k, v in pkg.manifest.items() if k not in ("files", "manifest_sha256")}
    manifest["engines"] = new
    return finalize_manifest(package, manifest)
