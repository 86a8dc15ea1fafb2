"""What both TensorRT adapters share without touching either library: availability, build settings (the engine
cache's key), and the local GPU's compute capability. The code that drives a library's Builder and Runtime is in
:mod:`hpedge.backends.trt` (TensorRT-RTX exposes the same API and reuses it); the registry over both adapters,
and the engine cache, is :mod:`hpedge.backends.engines`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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
    sparse_weights: bool = False  # BuilderFlag.SPARSE_WEIGHTS: 2:4 weights may run on sparse tensor cores

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shapes"] = {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in self.shapes.items()}
        d["compute_capabilities"] = list(self.compute_capabilities)
        return d


CUDART_NAMES = ("libcudart.so", "libcudart.so.12", "libcudart.so.11.0")  # JetPack 6 ships CUDA 12; JetPack 5, 11
CUDA_ATTR_CC_MAJOR, CUDA_ATTR_CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / Minor


def gpu_compute_capability() -> str | None:
    """The first NVIDIA GPU's compute capability, or None when there is no GPU: from NVML on discrete GPUs, else
    from the CUDA runtime (Jetson boards have no NVML; their JetPack ships libcudart)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
        return f"{major}.{minor}"
    except Exception:
        return _cudart_compute_capability()


def _cudart_compute_capability() -> str | None:
    import ctypes

    for name in CUDART_NAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        major, minor = ctypes.c_int(), ctypes.c_int()
        if (lib.cudaDeviceGetAttribute(ctypes.byref(major), CUDA_ATTR_CC_MAJOR, 0) == 0
                and lib.cudaDeviceGetAttribute(ctypes.byref(minor), CUDA_ATTR_CC_MINOR, 0) == 0):
            return f"{major.value}.{minor.value}"
        return None  # the runtime is there but sees no GPU
    return None
