"""TensorRT for RTX adapter: the only module that imports ``tensorrt_rtx``.

Engines are compiled ahead of time here, on any host (no GPU needed), for the compute capabilities the
profile lists, and finished just in time on the user's RTX GPU. Running one needs an RTX GPU of a listed
capability; the just-in-time kernels are kept in a runtime cache file between runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpedge.backends.trt import EngineRunner, build_serialized
from hpedge.backends.trt_api import Availability, BuildSettings, gpu_compute_capability
from hpedge.errors import HpedgeError
from hpedge.io import atomic_file

NAME = "tensorrt_rtx"
PACKAGE = "tensorrt-rtx-cu12==1.7.1.116"
# The GPUs TensorRT-RTX compiles for and runs on: NVIDIA's support matrix for TensorRT-RTX 1.7 (Turing, Ampere
# GeForce, Ada, Blackwell). The library's ComputeCapability enum also has SM80 (A100, a datacenter GPU the matrix
# does not list); Hopper sm_90 and Jetson sm_87 are in neither.
RUNS_ON = ("7.5", "8.6", "8.9", "12.0", "12.1")
NOT_IN_SUPPORT_MATRIX = ("8.0",)


def _import() -> Any:
    import tensorrt_rtx

    return tensorrt_rtx


def version() -> str:
    return str(_import().__version__)


def build_availability(compute_capabilities: tuple[str, ...]) -> Availability:
    """TensorRT-RTX builds on any host once installed."""
    try:
        mod = _import()
    except ImportError as e:
        return Availability(False, f"TensorRT-RTX is not installed here (pip install {PACKAGE}; import failed: {e})")
    for cc in compute_capabilities:
        if not hasattr(mod.ComputeCapability, _sm(cc)):
            return Availability(False, f"TensorRT-RTX {mod.__version__} cannot target sm_{cc.replace('.', '')}", mod.__version__)
    return Availability(True, f"TensorRT-RTX {mod.__version__} (ahead-of-time build, no GPU needed)", mod.__version__)


def run_availability(compute_capabilities: tuple[str, ...]) -> Availability:
    """Whether an engine built for ``compute_capabilities`` can run here."""
    av = build_availability(compute_capabilities)
    if not av.ok:
        return av
    cc = gpu_compute_capability()
    if cc is None:
        return Availability(False, "no RTX GPU (no NVIDIA GPU found)", av.version)
    if cc not in RUNS_ON:
        return Availability(False, f"no RTX GPU (this GPU is sm_{cc.replace('.', '')}; TensorRT-RTX runs on "
                            f"{', '.join('sm_' + c.replace('.', '') for c in RUNS_ON)})", av.version, cc)
    if cc not in compute_capabilities:
        return Availability(False, f"the engine is built for {', '.join(compute_capabilities)}, this GPU is {cc}", av.version, cc)
    return Availability(True, f"TensorRT-RTX {av.version} on sm_{cc.replace('.', '')}", av.version, cc)


def _sm(cc: str) -> str:
    return "SM" + cc.replace(".", "")


def build(onnx_path: Path, settings: BuildSettings) -> bytes:
    mod = _import()

    def configure(config: Any) -> None:
        config.num_compute_capabilities = len(settings.compute_capabilities)
        for i, cc in enumerate(settings.compute_capabilities):
            config.set_compute_capability(getattr(mod.ComputeCapability, _sm(cc)), i)

    return build_serialized(mod, onnx_path, settings, configure)


def runner(engine_path: Path, runtime_cache: Path | None = None) -> "RtxRunner":
    return RtxRunner(engine_path, runtime_cache)


class RtxRunner(EngineRunner):
    """An engine with its just-in-time runtime cache: loaded from ``runtime_cache`` if present, saved by ``save_cache``."""

    def __init__(self, engine_path: Path, runtime_cache: Path | None) -> None:
        mod = _import()
        self.cache_path = runtime_cache
        self._cache: Any = None

        def make_context(engine: Any) -> Any:
            config = engine.create_runtime_config()
            if runtime_cache is not None:
                self._cache = config.create_runtime_cache()
                if runtime_cache.is_file():
                    self._cache.deserialize(runtime_cache.read_bytes())
                config.set_runtime_cache(self._cache)
            context = engine.create_execution_context(config)
            if context is None:
                raise HpedgeError(f"TensorRT-RTX could not create an execution context for {engine_path}")
            return context

        super().__init__(mod, engine_path.read_bytes(), make_context)

    def save_cache(self) -> None:
        if self._cache is None or self.cache_path is None:
            return

        with atomic_file(self.cache_path) as tmp:
            tmp.write_bytes(bytes(memoryview(self._cache.serialize())))
