"""TensorRT engine build: the only module that imports ``tensorrt``.

Written against the TensorRT 10 Python API (checked with mypy against ``tensorrt-stubs``). TensorRT
cannot be installed on hpedge's CI machines; there, :func:`availability` says why and the export
writes a package whose engine is built later on the device (``hpedge build PACKAGE``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpedge.errors import HpedgeError

if TYPE_CHECKING:  # the stubs give the type checker the real API
    import tensorrt as trt


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str
    version: str = ""
    compute_capability: str = ""


def _import_trt() -> Any:
    import tensorrt

    if not hasattr(tensorrt, "Builder"):  # e.g. only the type stubs are on the path
        raise ImportError("the tensorrt module has no Builder (only type stubs installed?)")
    return tensorrt


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


def availability(required_cc: str | None = None) -> Availability:
    try:
        trt_mod = _import_trt()
    except ImportError as e:
        return Availability(False, f"TensorRT is not installed here (import tensorrt failed: {e})")
    cc = gpu_compute_capability()
    if cc is None:
        return Availability(False, "no NVIDIA GPU is visible (NVML found none)", trt_mod.__version__)
    if required_cc and cc != required_cc:
        return Availability(False, f"this GPU is sm_{cc.replace('.', '')}, the target needs sm_{required_cc.replace('.', '')}; "
                            "engines are not portable across GPU architectures", trt_mod.__version__, cc)
    return Availability(True, "ok", trt_mod.__version__, cc)


def cache_key(onnx_sha256: str, settings: dict[str, Any], trt_version: str, compute_capability: str) -> str:
    blob = json.dumps({"onnx": onnx_sha256, "settings": settings, "trt": trt_version, "cc": compute_capability},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def build_engine(onnx_path: Path, engine_path: Path, shapes: dict[str, tuple[tuple[int, ...], ...]],
                 optimization_level: int, workspace_bytes: int, timing_cache: Path | None = None,
                 strongly_typed: bool = True) -> dict[str, Any]:
    """Parse ``onnx_path`` and build a serialized engine with one optimization profile.

    ``shapes`` maps input name -> (min, opt, max) shapes. Returns build facts for the manifest.
    """
    trt_mod = _import_trt()
    logger = trt_mod.Logger(trt_mod.Logger.WARNING)
    builder = trt_mod.Builder(logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt_mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt_mod.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise HpedgeError(f"TensorRT could not parse {onnx_path.name}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt_mod.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    config.builder_optimization_level = int(optimization_level)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise HpedgeError(f"no shape range for engine input {name!r}")
        lo, opt, hi = shapes[name]
        profile.set_shape(name, trt_mod.Dims(list(lo)), trt_mod.Dims(list(opt)), trt_mod.Dims(list(hi)))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise HpedgeError(f"TensorRT failed to build an engine for {onnx_path.name} (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(memoryview(serialized)))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return {"file": engine_path.name, "tensorrt": trt_mod.__version__, "strongly_typed": strongly_typed,
            "optimization_level": optimization_level, "workspace_bytes": workspace_bytes}


def load_engine(engine_path: Path) -> "trt.ICudaEngine":
    trt_mod = _import_trt()
    runtime = trt_mod.Runtime(trt_mod.Logger(trt_mod.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise HpedgeError(f"TensorRT could not load {engine_path} (built for another GPU or TensorRT version?)")
    return engine


def run_engine(engine: "trt.ICudaEngine", feeds: dict[str, Any]) -> dict[str, Any]:
    """Run one inference; inputs and outputs are torch CUDA tensors (torch provides the device memory)."""
    import torch

    trt_mod = _import_trt()
    context = engine.create_execution_context()
    outputs: dict[str, Any] = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt_mod.TensorIOMode.INPUT:
            t = feeds[name].contiguous()
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt_mod.TensorIOMode.OUTPUT:
            dims = context.get_tensor_shape(name)
            shape = tuple(dims[j] for j in range(len(dims)))
            out = torch.empty(shape, dtype=torch.float32, device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise HpedgeError("TensorRT execution failed")
    stream.synchronize()
    return outputs
