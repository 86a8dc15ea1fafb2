"""Standard TensorRT adapter: the only module that imports ``tensorrt``.

Standard TensorRT builds an engine on a GPU of the target's architecture (and of the TensorRT version the
device runs): for Jetson boards that is the board itself (``hpedge build PACKAGE`` there). Its Linux
libraries cannot be installed on hpedge's CI hosts; there :func:`build_availability` says why. Written
against the TensorRT 10 Python API (checked with mypy against ``tensorrt-stubs``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpedge.backends.trt_api import Availability, BuildSettings, EngineRunner, build_serialized, gpu_compute_capability

if TYPE_CHECKING:  # the stubs give the type checker the real API
    import tensorrt as trt  # noqa: F401

NAME = "tensorrt"


def _import() -> Any:
    import tensorrt

    if not hasattr(tensorrt, "Builder"):  # e.g. only the type stubs are on the path
        raise ImportError("the tensorrt module has no Builder (only type stubs installed?)")
    return tensorrt


def version() -> str:
    return str(_import().__version__)


def run_availability(compute_capabilities: tuple[str, ...]) -> Availability:
    try:
        mod = _import()
    except ImportError as e:
        return Availability(False, f"TensorRT is not installed here (import tensorrt failed: {e})")
    cc = gpu_compute_capability()
    if cc is None:
        return Availability(False, "no NVIDIA GPU is visible (neither NVML nor the CUDA runtime found one)", mod.__version__)
    if cc not in compute_capabilities:
        return Availability(False, f"this GPU is sm_{cc.replace('.', '')}, the target needs "
                            f"sm_{compute_capabilities[0].replace('.', '')}; engines are not portable across GPU "
                            "architectures", mod.__version__, cc)
    return Availability(True, f"TensorRT {mod.__version__} on sm_{cc.replace('.', '')}", mod.__version__, cc)


def build_availability(compute_capabilities: tuple[str, ...]) -> Availability:
    """Standard TensorRT builds only where it could also run the engine."""
    return run_availability(compute_capabilities)


def build(onnx_path: Path, settings: BuildSettings) -> bytes:
    return build_serialized(_import(), onnx_path, settings)


def runner(engine_path: Path, runtime_cache: Path | None = None) -> EngineRunner:
    return EngineRunner(_import(), engine_path.read_bytes())
