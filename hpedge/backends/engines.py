"""TensorRT engines behind one interface: build, cache, run.

Two engine libraries share this interface, each imported by one adapter module only:

- :mod:`hpedge.backends.trt_rtx` -- TensorRT for RTX (``tensorrt_rtx``). Builds ahead of time on any host,
  with or without a GPU, for the compute capabilities a profile lists (several = a portable engine);
  the engine is finished just in time on the user's RTX card, which keeps a runtime cache of the kernels
  it compiled. Runs only on RTX GPUs (sm_75/86/89/120/121), not on Hopper or Jetson.
- :mod:`hpedge.backends.trt` -- standard TensorRT (``tensorrt``). Builds where the library and a GPU of
  the target's architecture are: Jetson boards build on the board (``hpedge build``).

Both libraries expose the same network-building API (Builder, OnnxParser, IBuilderConfig, Runtime), so the
build and run code below takes the library module from its adapter and never imports one itself. Device
memory for running an engine comes from CuPy (no torch).

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
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from hpedge.errors import HpedgeError

Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str
    version: str = ""
    compute_capability: str = ""  # the local GPU's, when one was looked at


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides an engine besides the ONNX file and the library (part of the cache key)."""

    shapes: Shapes  # input name -> (min, opt, max): one optimization profile
    compute_capabilities: tuple[str, ...]
    optimization_level: int
    workspace_bytes: int
    strongly_typed: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shapes"] = {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in self.shapes.items()}
        d["compute_capabilities"] = list(self.compute_capabilities)
        return d


def library(name: str) -> Any:
    """The adapter module of engine library ``name`` ("tensorrt_rtx" or "tensorrt")."""
    if name == "tensorrt_rtx":
        from hpedge.backends import trt_rtx

        return trt_rtx
    if name == "tensorrt":
        from hpedge.backends import trt

        return trt
    raise HpedgeError(f"unknown engine library {name!r} (tensorrt_rtx, tensorrt)")


def precision_refusal(library_name: str, compute_capabilities: tuple[str, ...], precisions: set[str]) -> str | None:
    """Why ``library_name`` cannot build these precisions for these GPUs, or None.

    TensorRT-RTX refuses INT4 (and BF16) for Turing: "Cannot compile for target(s) sm75, because the model
    contains HW-specific datatypes" (measured with tensorrt-rtx 1.7 on this project's CPU hosts).
    """
    if library_name == "tensorrt_rtx" and "7.5" in compute_capabilities:
        bad = sorted(precisions & {"int4", "bf16"})
        if bad:
            return (f"TensorRT-RTX cannot compile {'/'.join(bad)} for Turing (sm_75); remove 7.5 from the profile's "
                    "engine.compute_capabilities, or export with --engine skip (the package still runs its "
                    "int4_cpu variant on ONNX Runtime)")
    return None


def gpu_compute_capability() -> str | None:
    """The first NVIDIA GPU's compute capability via NVML, or None when there is no GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
        return f"{major}.{minor}"
    except Exception:
        return None


# -- building (shared by both adapters; ``mod`` is the library module) ------------------------------------
def _logger(mod: Any) -> Any:
    """A logger that keeps the library's error messages, so a failed build can say why in one line."""

    class Collecting(mod.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            mod.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (mod.ILogger.Severity.INTERNAL_ERROR, mod.ILogger.Severity.ERROR):
                self.errors.append(msg)

    return Collecting()


def build_serialized(mod: Any, onnx_path: Path, settings: BuildSettings,
                     configure: Callable[[Any], None] | None = None) -> bytes:
    """Parse ``onnx_path`` and build one serialized engine with one optimization profile."""
    logger = _logger(mod)
    builder = mod.Builder(logger)
    flags = 1 << int(mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings.strongly_typed else 0
    network = builder.create_network(flags)
    parser = mod.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise HpedgeError(f"{mod.__name__} could not parse {onnx_path}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(mod.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))
    config.builder_optimization_level = int(settings.optimization_level)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in settings.shapes:
            raise HpedgeError(f"no shape range for engine input {name!r} of {onnx_path}")
        lo, opt, hi = settings.shapes[name]
        profile.set_shape(name, mod.Dims(list(lo)), mod.Dims(list(opt)), mod.Dims(list(hi)))
    config.add_optimization_profile(profile)
    if configure is not None:
        configure(config)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        why = next((e for e in logger.errors if "Cannot compile" in e), logger.errors[-1] if logger.errors else "no message")
        raise HpedgeError(f"{mod.__name__} failed to build an engine for {onnx_path}: {why.strip()[:300]}")
    return bytes(memoryview(serialized))


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
             "strongly_typed": settings.strongly_typed, "shapes": settings.to_dict()["shapes"],
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


# -- running (needs a GPU the library supports; device memory from CuPy) -----------------------------------
class EngineRunner:
    """One deserialized engine and an execution context; ``run`` takes and returns numpy arrays."""

    def __init__(self, mod: Any, engine_bytes: bytes, make_context: Callable[[Any], Any] | None = None) -> None:
        try:
            import cupy
        except ImportError as e:
            raise HpedgeError(f"running a TensorRT engine needs CuPy for device memory (pip install cupy-cuda12x): {e}") from None
        self.mod, self.cp = mod, cupy
        self.runtime = mod.Runtime(_logger(mod))
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise HpedgeError(f"{mod.__name__} could not load the engine (built for another GPU or library version?)")
        self.context = make_context(self.engine) if make_context else self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mod.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == mod.TensorIOMode.OUTPUT]

    def save_cache(self) -> None:
        """Keep what the library compiled at run time (TensorRT-RTX's runtime cache); nothing to keep here."""

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        cp, mod = self.cp, self.mod
        keep = []
        for name in self.inputs:
            if name not in feeds:
                raise HpedgeError(f"engine input {name!r} was not given")
            dt = mod.nptype(self.engine.get_tensor_dtype(name))
            d = cp.asarray(np.ascontiguousarray(feeds[name], dtype=dt))
            keep.append(d)
            self.context.set_input_shape(name, tuple(d.shape))
            self.context.set_tensor_address(name, d.data.ptr)
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            o = cp.empty(shape, dtype=mod.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_tensor_address(name, o.data.ptr)
            outs.append(o)
        stream = cp.cuda.Stream(non_blocking=True)
        if not self.context.execute_async_v3(stream.ptr):
            raise HpedgeError(f"{mod.__name__} execution failed")
        stream.synchronize()
        return [cp.asnumpy(o).astype(np.float32) if o.dtype.kind == "f" else cp.asnumpy(o) for o in outs]
