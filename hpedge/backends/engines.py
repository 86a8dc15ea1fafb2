"""TensorRT engines behind one interface: build, cache, run.

Two engine libraries share this interface, each imported by one adapter module only:

- :mod:`hpedge.backends.trt_rtx` -- TensorRT for RTX (``tensorrt_rtx``). Builds ahead of time on any host,
  with or without a GPU, for the compute capabilities a profile lists (several = a portable engine);
  the engine is finished just in time on the user's RTX card, which keeps a runtime cache of the kernels
  it compiled. Runs only on RTX GPUs (sm_75/86/89/120/121), not on Hopper or Jetson.
- :mod:`hpedge.backends.trt` -- standard TensorRT (``tensorrt``). Builds where the library and a GPU of
  the target's architecture are: Jetson boards build on the board (``hpedge build``).

Both libraries expose the same network-building API; the code that drives it, for either library, is
:mod:`hpedge.backends.trt`. This module is the registry over the two adapters and the engine cache.

Built engines are kept in a user-level cache (``$HPEDGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/hpedge``, else
``~/.cache/hpedge``) under a key of the ONNX file's sha256, the build settings, the library and its version
and the compute capabilities; a build with a key already there copies the cached engine instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from hpedge.backends import trt, trt_rtx
from hpedge.backends.trt import EngineRunner
from hpedge.backends.trt_api import Availability, BuildSettings
from hpedge.errors import HpedgeError


def library(name: str) -> Any:
    """The adapter module of engine library ``name`` ("tensorrt_rtx" or "tensorrt")."""
    if name == "tensorrt_rtx":
        return trt_rtx
    if name == "tensorrt":
        return trt
    raise HpedgeError(f"unknown engine library {name!r} (tensorrt_rtx, tensorrt)")


# TensorRT-RTX 1.7: the oldest compute capability each hardware-specific type compiles for (measured on this
# project's CPU hosts: "Cannot compile for target(s) sm89, because the model contains HW-specific datatypes: fp4_e2m1";
# sm86 likewise for fp8_e4m3)
RTX_MIN_CC = {"fp8": 8.9, "nvfp4": 12.0}


def precision_refusal(library_name: str, compute_capabilities: tuple[str, ...], precisions: set[str]) -> str | None:
    """Why ``library_name`` cannot build these precisions for these GPUs, or None.

    TensorRT-RTX refuses INT4 (and BF16) for Turing: "Cannot compile for target(s) sm75, because the model
    contains HW-specific datatypes" (measured with tensorrt-rtx 1.7 on this project's CPU hosts); FP8 below Ada
    (sm_89) and NVFP4 below Blackwell (sm_120) likewise.
    """
    if library_name != "tensorrt_rtx":
        return None
    if "7.5" in compute_capabilities:
        bad = sorted(precisions & {"int4", "bf16"})
        if bad:
            return (f"TensorRT-RTX cannot compile {'/'.join(bad)} for Turing (sm_75); remove 7.5 from the profile's "
                    "engine.compute_capabilities, or export with --engine skip (the package still runs its "
                    "int4_cpu variant on ONNX Runtime)")
    for precision, least in RTX_MIN_CC.items():
        old = [c for c in compute_capabilities if float(c) < least]
        if precision in precisions and old:
            return (f"TensorRT-RTX cannot compile {precision} for sm_{old[0].replace('.', '')} (it needs sm_"
                    f"{str(least).replace('.', '')} or newer); remove {old[0]} from the profile's "
                    "engine.compute_capabilities or choose another --precision")
    return None


# -- the user-level engine cache ---------------------------------------------------------------------------
def cache_dir() -> Path:
    if os.environ.get("HPEDGE_CACHE_DIR"):
        return Path(os.environ["HPEDGE_CACHE_DIR"])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "hpedge"


def cache_key(onnx_sha256: str, settings: dict[str, Any], library_name: str, version: str,
              compute_capabilities: tuple[str, ...] | list[str]) -> str:
    blob = json.dumps({"onnx": onnx_sha256, "settings": settings, "library": library_name, "version": version,
                       "cc": sorted(compute_capabilities)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def build_cached(adapter: Any, onnx_path: Path, onnx_sha256: str, dest: Path, settings: BuildSettings) -> dict[str, Any]:
    """Build (or take from the cache) the engine of ``onnx_path`` into ``dest``; returns the build facts.

    ``dest``'s name gets the cache key: ``{dest.stem}-{key}.plan``.
    """
    version = adapter.version()
    key = cache_key(onnx_sha256, settings.to_dict(), adapter.NAME, version, settings.compute_capabilities)
    cached = cache_dir() / "engines" / f"{key}.plan"
    cached_facts = cached.with_suffix(".json")
    target = dest.with_name(f"{dest.stem}-{key}.plan")
    target.parent.mkdir(parents=True, exist_ok=True)
    if cached.is_file() and cached_facts.is_file():
        facts = json.loads(cached_facts.read_text())
        shutil.copyfile(cached, target)
        return {**facts, "file": target.name, "cache": "hit"}
    t0 = time.perf_counter()
    blob = adapter.build(onnx_path, settings)
    seconds = time.perf_counter() - t0
    target.write_bytes(blob)
    facts = {"library": adapter.NAME, "version": version, "compute_capabilities": list(settings.compute_capabilities),
             "build_seconds": round(seconds, 2), "engine_bytes": len(blob), "cache_key": key,
             "optimization_level": settings.optimization_level, "workspace_bytes": settings.workspace_bytes,
             "strongly_typed": settings.strongly_typed, "sparse_weights": settings.sparse_weights,
             "shapes": settings.to_dict()["shapes"],
             "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _store(cached, blob, facts)
    return {**facts, "file": target.name, "cache": "miss"}


def _store(cached: Path, blob: bytes, facts: dict[str, Any]) -> None:
    """Put an engine into the cache atomically; a cache that cannot be written is only a missed speed-up."""
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        for path, data in ((cached, blob), (cached.with_suffix(".json"), json.dumps(facts, indent=1).encode())):
            fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
    except OSError:
        pass


def runtime_cache_path(cache_key_: str) -> Path:
    """Where the TensorRT-RTX runtime keeps the kernels it compiled just in time for an engine."""
    return cache_dir() / "runtime" / f"{cache_key_}.rtxcache"


def can_run(section: dict[str, Any]) -> Availability:
    """Whether this machine can run the engines of a manifest's ``engines`` section."""
    return library(section["library"]).run_availability(tuple(section["compute_capabilities"]))


def open_runner(root: Path, section: dict[str, Any], component: str) -> "EngineRunner":
    """A runner for one packaged engine (TensorRT-RTX: with its just-in-time runtime cache)."""
    c = section["components"][component]
    cache = runtime_cache_path(c["cache_key"]) if section["library"] == "tensorrt_rtx" else None
    return library(section["library"]).runner(root / c["file"], cache)  # type: ignore[no-any-return]
