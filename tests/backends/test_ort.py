"""hpedge.backends.ort: the ONNX Runtime peers of hpedge's INT4 (what the latency benchmark compares against)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from hpedge.backends import ort


def _linear(path: Path, k: int = 256, n: int = 128) -> np.ndarray:
    w = (np.random.default_rng(0).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, n])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return w


def test_peer_quantizers_write_their_own_kernels_and_stay_close(tmp_path) -> None:
    src = tmp_path / "fp32.onnx"
    w = _linear(src)
    x = np.random.default_rng(1).standard_normal((2, 8, 256)).astype(np.float32)
    ref = x @ w
    for fn, op in ((ort.quantize_dynamic_int8, {"DynamicQuantizeMatMul", "MatMulInteger"}), (ort.quantize_matmul_4bits, {"MatMulNBits"})):
        dst = tmp_path / f"{fn.__name__}.onnx"
        fn(src, dst)
        assert {nd.op_type for nd in onnx.load(str(dst)).graph.node} & op, fn.__name__
        got = onnxruntime.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
        assert 0.98 < cos < 1.0 - 1e-7, (fn.__name__, cos)  # close, and really quantized


def test_calibration_runs_on_the_cpu_without_a_gpu(monkeypatch) -> None:
    monkeypatch.setattr(ort, "available_providers", lambda: ["CPUExecutionProvider"])
    assert ort.calibration_providers() == ["cpu"]
    monkeypatch.setattr(ort, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "_cuda_device_present", lambda: True)
    assert ort.calibration_providers() == ["cuda:0", "cpu"]
