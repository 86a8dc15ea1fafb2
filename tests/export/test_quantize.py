"""hpedge's streamed INT4 RTN gives ModelOpt's ``rtn_dq`` result: the same nibbles, scales and graph outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpedge.export.quantize import METHODS, quantize_int4

K, N, BLOCK = 256, 96, 128


def _linear_model(path: Path, dtype: type, rng: np.random.Generator) -> None:
    """x[1, 7, K] -> MatMul(W1 [K, K]) -> Relu -> MatMul(W2 [K, N]) + Gemm-free bias; float32 graph input/output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    t = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    w1 = (rng.standard_normal((K, K)) * 0.05).astype(dtype)
    w1[:BLOCK, 3] = 0.0  # an all-zero block: its scale is ModelOpt's floor
    w2 = (rng.standard_normal((K, N)) * 0.05).astype(dtype)
    bias = rng.standard_normal(N).astype(dtype)
    nodes = [helper.make_node("Cast", ["x"], ["xc"], to=t),
             helper.make_node("MatMul", ["xc", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("MatMul", ["hr", "w2"], ["y0"], name="mm2"),
             helper.make_node("Add", ["y0", "bias"], ["yb"]),
             helper.make_node("Cast", ["yb"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 7, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7, N])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                               numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(path))


def _modelopt_rtn(src: Path, dst: Path) -> None:
    import os

    from modelopt.onnx.quantization import quantize

    os.environ["TQDM_DISABLE"] = "1"
    quantize(str(src), quantize_mode="int4", calibration_method=METHODS["rtn"], calibration_data_reader=None,
             calibration_eps=["cpu"], output_path=str(dst), block_size=BLOCK, high_precision_dtype="fp32",
             use_external_data_format=False, log_level="ERROR")


def _int4_tensors(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
            if i.name.endswith(("_i4", "_scale")) or i.data_type == TensorProto.INT4}


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_streamed_rtn_equals_modelopt_rtn_dq(tmp_path: Path, dtype: type) -> None:
    rng = np.random.default_rng(3)
    src = tmp_path / "model.onnx"
    _linear_model(src, dtype, rng)
    ours, theirs = tmp_path / "hpedge" / "model.onnx", tmp_path / "modelopt.onnx"
    report = quantize_int4(src, ours, [], "rtn", BLOCK)
    _modelopt_rtn(src, theirs)
    assert report.quantized == ["mm1", "mm2"] and report.implementation.startswith("hpedge")
    a, b = _int4_tensors(ours), _int4_tensors(theirs)
    assert sorted(a) == sorted(b) == ["w1_i4", "w1_scale", "w2_i4", "w2_scale"]
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert a["w1_scale"].dtype == dtype
    x = rng.standard_normal((1, 7, K)).astype(np.float32)
    np.testing.assert_array_equal(_run(ours, x), _run(theirs, x))
    assert 0.0 < report.layer_error["w1"] < 0.2


def test_streamed_rtn_reads_and_writes_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the size threshold the source's weights stay in its data file and the result gets one of its own."""
    import onnx

    from hpedge.export import onnx_io

    rng = np.random.default_rng(4)
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    _linear_model(src, np.float16, rng)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 10_000)
    onnx_io.save_onnx(onnx.load(str(src)), src)
    assert (src.parent / "model.onnx.data").exists()
    inline = tmp_path / "inline.onnx"
    onnx.save(onnx.load(str(src)), str(inline))
    out = tmp_path / "out" / "model.onnx"
    quantize_int4(src, out, [], "rtn", BLOCK)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    ref = tmp_path / "ref" / "model.onnx"
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 1_800_000_000)
    quantize_int4(inline, ref, [], "rtn", BLOCK)
    x = rng.standard_normal((1, 7, K)).astype(np.float32)
    np.testing.assert_array_equal(_run(out, x), _run(ref, x))


def test_a_gemm_weight_is_read_only_when_quantized_and_equals_modelopt_on_the_matmul_form(tmp_path: Path) -> None:
    """Gemm(x, W [N, K], b, transB=1) becomes DequantizeLinear(W^T) -> MatMul + Add, as ModelOpt quantizes the
    MatMul form of the same graph; a Gemm excluded by a pattern keeps its (transposed) weight exactly."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from hpedge.export.quantize import gemm_to_matmul

    rng = np.random.default_rng(5)
    w1 = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    w2 = (rng.standard_normal((N, N)) * 0.05).astype(np.float32)  # K = 96: not a multiple of 128, excluded
    b1 = rng.standard_normal(N).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Gemm", ["h", "w2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                               numpy_helper.from_array(b1, "b1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    src, mm = tmp_path / "gemm.onnx", tmp_path / "matmul.onnx"
    onnx.save(model, str(src))
    gemm_to_matmul(model)
    onnx.save(model, str(mm))
    ours, theirs = tmp_path / "hpedge.onnx", tmp_path / "modelopt.onnx"
    report = quantize_int4(src, ours, [], "rtn", BLOCK)
    _modelopt_rtn(mm, theirs)
    assert report.quantized == ["fc1_matmul"] and "fc2_matmul" in report.excluded
    a, b = _int4_tensors(ours), _int4_tensors(theirs)  # (ModelOpt, not told to exclude fc2, pads and quantizes it)
    assert sorted(a) == ["w1_kn_i4", "w1_kn_scale"]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    kept = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(ours)).graph.initializer}
    np.testing.assert_array_equal(kept["w2_kn"], w2.T)
    import onnxruntime as ort

    x = rng.standard_normal((3, K)).astype(np.float32)
    h = x @ (a["w1_kn_i4"].astype(np.float32) * np.repeat(a["w1_kn_scale"], BLOCK, axis=0)) + b1
    got = ort.InferenceSession(str(ours), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, h @ w2.T, rtol=1e-4, atol=1e-4)


def test_awq_the_default_method_quantizes_every_matmul_at_int4_size(tmp_path) -> None:
    """ModelOpt's AWQ (clip search on calibration inputs): every MatMul weight INT4, the file as small as RTN's,
    and closer to the fp32 graph than RTN on the same seeded weights and inputs."""
    import onnx
    from onnx import TensorProto

    assert METHODS["awq_clip"] == "awq_clip"
    rng = np.random.default_rng(0)
    src = tmp_path / "src.onnx"
    _linear_model(src, np.float32, rng)
    calib = [{"x": rng.standard_normal((1, 7, K)).astype(np.float32)} for _ in range(4)]
    awq = quantize_int4(src, tmp_path / "awq" / "model.onnx", calib, "awq_clip", BLOCK)
    rtn = quantize_int4(src, tmp_path / "rtn" / "model.onnx", calib, "rtn", BLOCK)
    assert awq.method == "awq_clip" and sorted(awq.quantized) == sorted(rtn.quantized) and len(awq.quantized) == 2
    model = onnx.load(str(tmp_path / "awq" / "model.onnx"))
    inits = {i.name: i.data_type for i in model.graph.initializer}
    assert sum(inits[n.input[0]] == TensorProto.INT4 for n in model.graph.node if n.op_type == "DequantizeLinear") == 2
    size = (tmp_path / "awq" / "model.onnx").stat().st_size
    assert size <= 1.05 * (tmp_path / "rtn" / "model.onnx").stat().st_size < 0.25 * src.stat().st_size
    x = rng.standard_normal((1, 7, K)).astype(np.float32)
    ref = _run(src, x)
    err = {m: float(np.abs(_run(tmp_path / m / "model.onnx", x) - ref).mean() / np.abs(ref).mean()) for m in ("awq", "rtn")}
    assert err["awq"] < err["rtn"] < 0.1, err
    assert awq.implementation.startswith("hpedge (streamed")  # the default holds one weight at a time


def test_streamed_awq_clip_is_as_close_as_modelopts(tmp_path) -> None:
    """hpedge's streamed AWQ-clip (the same search on activation rows sampled inside the graph) against ModelOpt's
    own awq_clip on the same weights and calibration: within 10 % of its error, both below RTN's."""
    rng = np.random.default_rng(1)
    src = tmp_path / "src.onnx"
    _linear_model(src, np.float16, rng)
    calib = [{"x": (rng.standard_normal((1, 7, K)) * np.linspace(0.2, 3, K)).astype(np.float32)} for _ in range(12)]
    for m in ("awq_clip", "awq_clip_modelopt", "rtn"):
        quantize_int4(src, tmp_path / m / "model.onnx", calib, m, BLOCK)
    x = (rng.standard_normal((1, 7, K)) * np.linspace(0.2, 3, K)).astype(np.float32)
    ref = _run(src, x)
    err = {m: float(np.square(_run(tmp_path / m / "model.onnx", x) - ref).mean())
           for m in ("awq_clip", "awq_clip_modelopt", "rtn")}
    assert err["awq_clip"] < err["rtn"] and err["awq_clip_modelopt"] < err["rtn"], err
    assert err["awq_clip"] <= 1.1 * err["awq_clip_modelopt"], err
