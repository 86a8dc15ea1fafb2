"""Standard TensorRT adapter: the only module that imports ``tensorrt``, and the engine building and running code
that TensorRT-RTX shares (both libraries expose the same Builder, OnnxParser, IBuilderConfig and Runtime; that code
takes the library module ``mod`` from its adapter; device memory for running an engine comes from CuPy).

Standard TensorRT builds an engine on a GPU of the target's architecture (and of the TensorRT version the
device runs): for Jetson boards that is the board itself (``hpedge build PACKAGE`` there). Its Linux
libraries cannot be installed on hpedge's CI hosts; there :func:`build_availability` says why. Written
against the TensorRT 10 Python API (checked with mypy against ``tensorrt-stubs``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hpedge.backends.trt_api import Availability, BuildSettings, gpu_compute_capability
from hpedge.errors import HpedgeError

if TYPE_CHECKING:  # the stubs give the type checker the real API: the shared calls below are checked against it
    import tensorrt as trt

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
    if settings.sparse_weights:
        config.set_flag(mod.BuilderFlag.SPARSE_WEIGHTS)
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
