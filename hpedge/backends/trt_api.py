"""What both TensorRT libraries share: their common network-building and running API.

TensorRT and TensorRT for RTX expose the same Builder, OnnxParser, IBuilderConfig and Runtime; the code here
takes the library module (``mod``) from its adapter (:mod:`hpedge.backends.trt`,
:mod:`hpedge.backends.trt_rtx`) and never imports one itself. Device memory for running an engine comes from
CuPy (no torch). The registry over both adapters, and the engine cache, is :mod:`hpedge.backends.engines`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hpedge.errors import HpedgeError

if TYPE_CHECKING:  # the type checker holds the shared calls against standard TensorRT's stubs (tensorrt-stubs)
    import tensorrt as trt

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
    builder: trt.Builder = mod.Builder(logger)
    flags = 1 << int(mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings.strongly_typed else 0
    network: trt.INetworkDefinition = builder.create_network(flags)
    parser: trt.OnnxParser = mod.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise HpedgeError(f"{mod.__name__} could not parse {onnx_path}: {errors[:300]}")
    config: trt.IBuilderConfig = builder.create_builder_config()
    config.set_memory_pool_limit(mod.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))
    config.builder_optimization_level = int(settings.optimization_level)
    profile: trt.IOptimizationProfile = builder.create_optimization_profile()
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


# -- running (needs a GPU the library supports; device memory from CuPy) -----------------------------------
class EngineRunner:
    """One deserialized engine and an execution context; ``run`` takes and returns numpy arrays."""

    def __init__(self, mod: Any, engine_bytes: bytes, make_context: Callable[[Any], Any] | None = None) -> None:
        try:
            import cupy
        except ImportError as e:
            raise HpedgeError(f"running a TensorRT engine needs CuPy for device memory (pip install cupy-cuda12x): {e}") from None
        self.mod, self.cp = mod, cupy
        self.runtime: trt.Runtime = mod.Runtime(_logger(mod))
        engine: trt.ICudaEngine | None = self.runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise HpedgeError(f"{mod.__name__} could not load the engine (built for another GPU or library version?)")
        self.engine: trt.ICudaEngine = engine
        self.context: trt.IExecutionContext = (make_context(self.engine) if make_context
                                               else self.engine.create_execution_context())
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
            dims = self.context.get_tensor_shape(name)
            shape = tuple(dims[i] for i in range(len(dims)))
            o = cp.empty(shape, dtype=mod.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_tensor_address(name, o.data.ptr)
            outs.append(o)
        stream = cp.cuda.Stream(non_blocking=True)
        if not self.context.execute_async_v3(stream.ptr):
            raise HpedgeError(f"{mod.__name__} execution failed")
        stream.synchronize()
        return [cp.asnumpy(o).astype(np.float32) if o.dtype.kind == "f" else cp.asnumpy(o) for o in outs]
