"""ONNX Runtime adapter: the only module that imports ``onnxruntime``. Importable without torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hpedge.errors import HpedgeError


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def session(path: str | Path, device: str = "auto", threads: int | None = None, low_memory: bool = False,
            arena: bool = True, data_dir: str | Path | None = None) -> Any:
    """An InferenceSession on CUDA when asked for (or 'auto' and present), else CPU.

    ``data_dir``: the folder the graph's external data files are in, when it is not the graph's own (a graph-only
    view of a packaged graph, written elsewhere: ONNX Runtime refuses external data reached through links).

    ``arena=False``: no CPU memory arena nor memory pattern, so a run's intermediates go back when it ends (the
    arena keeps a run's peak for the next run: right for a transformer's many steps, not for a VAE decoder whose
    one run at 1024 px needs 2.2 GB of attention scores on the CPU provider).

    ``low_memory``: no pre-packed weight copies (``session.disable_prepacking``): the weights of a file with
    page-aligned external data then stay memory-mapped (file-backed pages the kernel can drop) instead of being
    copied into the process, for the few runs of a parity check (measured on a 1.08 GB fp32 transformer: 1.25
    -> 0.18 GB anonymous memory, a run 20 % slower); and no memory arena, so that what a run allocates is given
    back when it ends (the INT4 DequantizeLinear graph at 0.64 B parameters: 1.44 GB held after a run with the
    arena, 0.19 GB without); and no constant folding, so that a weight stored narrow (INT4 behind
    DequantizeLinear, fp16 behind a Cast to float32: :mod:`hpedge.export.widen`) is widened when a run needs it,
    one at a time, instead of every weight at once when the session starts (and no layout optimizations)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise HpedgeError(f"onnxruntime is not installed ({e})") from None
    avail = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in avail:
        raise HpedgeError("CUDA was requested but ONNX Runtime has no CUDAExecutionProvider here")
    use_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in avail and _cuda_device_present())
    providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not arena:
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
    if low_memory:
        opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.enable_cpu_mem_arena = False
        # no memory pattern: it plans one block for every intermediate of a run, widened weights included (AWQ-clip's
        # sampling run at 2.24 B parameters: 3.73 -> 2.53 GB anonymous)
        opts.enable_mem_pattern = False
        # without constant folding, ORT 1.24's layout optimizations (level ALL) abort the process on some graphs
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    model: Any = str(path)
    if data_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_dir))
        model = Path(path).read_bytes()
    try:
        # QDQ propagation moves an FP8 activation's Q/DQ pair past its other readers (Reshape, Slice) and leaves a
        # float8 tensor where a float is expected: "invalid model" on every FP8 transformer graph (ORT 1.24); the
        # INT4 / INT8 graphs have no QuantizeLinear for it to move
        disabled = ["QDQPropagationTransformer"] + (["ConstantFolding"] if low_memory else [])
        if _has_float8_quantize(path, model):
            # FP8 graphs (ORT 1.24, measured on a two-layer graph against the same arithmetic in numpy): the QDQ
            # selector fuses a float32 FP8 Q/DQ -> MatMul into MatMulIntegerToFloat, which takes no float8 input, and
            # with it disabled the extended level's fusions compute wrong values (1.47 max abs of 3.3; 3.6e-7 at the
            # basic level)
            disabled.append("QDQSelectorActionTransformer")
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        sess = ort.InferenceSession(model, sess_options=opts, providers=providers, disabled_optimizers=disabled)
    except Exception as e:
        raise HpedgeError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:200]}") from None
    return_freed_memory()
    return sess


def _has_float8_quantize(path: str | Path, model: Any) -> bool:
    """Whether the graph quantizes to FLOAT8E4M3FN (hpedge's FP8 graphs); read without its weights."""
    import onnx

    g = onnx.load_model_from_string(model) if isinstance(model, bytes) else onnx.load(str(path), load_external_data=False)
    inits = {i.name: i.data_type for i in g.graph.initializer}
    return any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and inits.get(n.input[2]) == onnx.TensorProto.FLOAT8E4M3FN
               for n in g.graph.node)


def return_freed_memory() -> None:
    """Give memory freed during session creation back to the OS.

    Constant folding (the int8 CPU variant expands its INT4 weights when the session starts) frees
    several bytes per parameter that glibc would otherwise keep in the process. Other C libraries
    have no ``malloc_trim``; nothing to do there.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def _cuda_device_present() -> bool:
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def run(sess: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    try:
        return sess.run(None, {k: v for k, v in feeds.items() if k in names})
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        raise HpedgeError(f"ONNX Runtime failed to run the model: {msg}") from None


def input_names(sess: Any) -> list[str]:
    return [i.name for i in sess.get_inputs()]


def output_names(sess: Any) -> list[str]:
    return [o.name for o in sess.get_outputs()]


def version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def calibration_providers() -> list[str]:
    """ModelOpt's ``calibration_eps`` for this machine: the CUDA execution provider first where ONNX Runtime has
    one and a GPU is present (calibration is a few full forward passes per sample), then the CPU."""
    cuda = "CUDAExecutionProvider" in available_providers() and _cuda_device_present()
    return (["cuda:0"] if cuda else []) + ["cpu"]


# ------------------------------------------------------------------ what an ONNX Runtime user picks instead
# (the peers of hpedge's INT4 in benchmarks/latency.py; not used by the export)


def quantize_dynamic_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime's own dynamic quantization: int8 weights per output channel, activations quantized on the fly.

    The quantizer runs ONNX shape inference again after its own edits, and on the FLUX export that second pass
    disagrees with shapes the exporter recorded for intermediate tensors ("Inferred shape and existing shape differ
    in dimension 0: (256) vs (128)", onnxruntime 1.24); it is given a copy without them (what clearing value_info
    by hand, the usual answer to that error, does; the graph's inputs and outputs keep their shapes)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    del model.graph.value_info[:]
    with tempfile.TemporaryDirectory(dir=Path(dst).parent) as tmp:
        plain = Path(tmp) / "model.onnx"
        big = model.ByteSize() > 2**31 - 2**26
        onnx.save(model, str(plain), save_as_external_data=big, location="model.onnx.data" if big else None)
        del model
        quantize_dynamic(str(plain), str(dst), per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=big)


def quantize_matmul_4bits(src: Path, dst: Path, block_size: int = 128, accuracy_level: int = 4) -> None:
    """ONNX Runtime's 4-bit weight-only quantizer (round to nearest, symmetric, blocks of ``block_size``) to
    ``MatMulNBits``; ``accuracy_level`` 4 runs the GEMM on int8-quantized activations."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block_size, is_symmetric=True,
                             accuracy_level=accuracy_level)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)
