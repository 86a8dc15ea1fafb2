"""FP8 and NVFP4 graphs (hpedge.export.float_quant): the stored values, what ONNX Runtime computes from them against a
numpy / PyTorch reference of the same quantization, NVFP4's emulation, and the layers kept in 16 bits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpedge.backends import ort
from hpedge.export.dequantized import read_dequantized
from hpedge.export.float_quant import (
    E2M1_MAX,
    activation_scales,
    e2m1,
    e4m3,
    fp4_dynamic,
    fp8_static,
    nvfp4_emulation,
    nvfp4_weight,
    quantize_float,
)
from hpedge.export.onnx_io import weight_key
from hpedge.export.widen import fp32_view
from tests.export.test_quantize import K, N, _linear_model


def _torch_run(src: Path, x: np.ndarray, graph: Path, precision: str) -> np.ndarray:
    """numpy / PyTorch: the linear model with the graph's weights as stored and its activations fake-quantized."""
    import onnx
    import torch
    from onnx import numpy_helper

    ref = {i.name: numpy_helper.to_array(i).astype(np.float32) for i in onnx.load(str(src)).graph.initializer}
    model = onnx.load(str(graph))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scales = activation_scales(graph)
    fake = fp8_static if precision == "fp8" else fp4_dynamic

    def weight(name: str) -> np.ndarray:
        if precision == "fp8":
            return inits[name + "_f8"].astype(np.float32) * inits[name + "_scale"].astype(np.float32)[None, :]
        return read_dequantized(model, graph.parent)[name + "_f4"].astype(np.float32)

    h = torch.from_numpy(x)
    for name, post in (("w1", torch.relu), ("w2", lambda t: t + torch.from_numpy(ref["bias"]))):
        kind, s = scales[name + ("_f8" if precision == "fp8" else "_f4")]
        h = post(fake(h, s) @ torch.from_numpy(weight(name)))
    return h.numpy()


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_onnxruntime_computes_what_the_quantization_means(tmp_path: Path, precision: str) -> None:
    rng = np.random.default_rng(5)
    src = tmp_path / "model.onnx"
    _linear_model(src, np.float16, rng)
    calib = [{"x": rng.standard_normal((1, 7, K)).astype(np.float32)} for _ in range(3)]
    out = tmp_path / precision / "model.onnx"
    rep = quantize_float(precision, src, out, calib)
    assert rep.quantized == ["mm1", "mm2"] and not rep.excluded and set(rep.sources) == {"w1", "w2"}
    x = calib[0]["x"]
    graph = out if precision == "fp8" else nvfp4_emulation(out, tmp_path / "emulated" / "model.onnx")
    (tmp_path / "view").mkdir()
    wide = fp32_view(graph, "model.onnx", tmp_path / "view")  # the same graph in float32 (the gate runs it so)
    got = ort.run(ort.session(wide, "cpu", data_dir=graph.parent), {"x": x})[0]
    want = _torch_run(src, x, out, precision)
    exact = ort.run(ort.session(src, "cpu"), {"x": x})[0]
    err, quant = np.abs(got - want).max(), np.abs(exact - want).max()
    assert err < quant / 100, (err, quant)  # the graph is its quantization, not something near it


def test_stored_values_and_scales(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(0)
    src = tmp_path / "model.onnx"
    _linear_model(src, np.float16, rng)
    w1 = numpy_helper.to_array(next(i for i in onnx.load(str(src)).graph.initializer if i.name == "w1"))
    for precision, dtype in (("fp8", TensorProto.FLOAT8E4M3FN), ("nvfp4", TensorProto.FLOAT4E2M1)):
        out = tmp_path / precision / "model.onnx"
        quantize_float(precision, src, out, [{"x": rng.standard_normal((1, 7, K)).astype(np.float32)}])
        inits = {i.name: i for i in onnx.load(str(out)).graph.initializer}
        suffix = "_f8" if precision == "fp8" else "_f4"
        assert inits["w1" + suffix].data_type == dtype and list(inits["w1" + suffix].dims) == [K, K]
        assert "w1" not in inits and "w2" not in inits  # no dense copy left
    q, s8, g = nvfp4_weight(w1)
    back = read_dequantized(onnx.load(str(tmp_path / "nvfp4" / "model.onnx")), tmp_path / "nvfp4")["w1_f4"]
    sd = (s8.astype(np.float32) * np.float32(g)).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(back.astype(np.float32), (q.astype(np.float32) * np.repeat(sd, 16, 0)).astype(np.float16))
    assert np.abs(q.astype(np.float32)).max() <= E2M1_MAX and s8.astype(np.float32).max() <= 448
    rel = np.linalg.norm(back.astype(np.float32) - w1) / np.linalg.norm(w1.astype(np.float32))
    assert rel < 0.15  # 4-bit values in blocks of 16


def test_e2m1_and_e4m3_round_to_nearest_even_and_saturate() -> None:
    x = np.array([0.25, 0.75, 1.75, 2.5, 3.5, 5.0, 7.0, -0.3], np.float32)
    np.testing.assert_array_equal(e2m1(x).astype(np.float32), [0, 1, 2, 2, 4, 4, 6, -0.5])
    assert e4m3(np.array([1000.0], np.float32)).astype(np.float32)[0] == 448


def test_the_fp4_emulation_is_bit_identical_to_pytorchs(tmp_path: Path) -> None:
    """TensorRT's FP4 dynamic quantizer as ONNX Runtime runs it (nvfp4_emulation) and as the PyTorch reference computes
    it (fp4_dynamic): same values to the last bit, every value on the E2M1 grid of its block."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    x = (np.random.default_rng(1).standard_normal((2, 50, 64)) * 3).astype(np.float16)
    x[0, 0, :16] = 0.0  # an all-zero block
    g = np.asarray(10 / (6 * 448), np.float16)
    w = np.eye(64, dtype=np.float16)
    q, s8, wg = nvfp4_weight(w)
    from hpedge.export.float_quant import _initializer  # noqa: PLC0415 - the graph's own writer

    nodes = [helper.make_node("TRT_FP4DynamicQuantize", ["x", "g"], ["q", "bs"], domain="trt", name="dyn", axis=-1,
                              block_size=16, scale_type=TensorProto.FLOAT8E4M3FN),
             helper.make_node("DequantizeLinear", ["bs", "g"], ["bsd"]),
             helper.make_node("DequantizeLinear", ["q", "bsd"], ["xd"], axis=-1, block_size=16),
             helper.make_node("DequantizeLinear", ["w_bs", "w_g"], ["wbs"]),
             helper.make_node("DequantizeLinear", ["w_f4", "wbs"], ["wd"], axis=0, block_size=16),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
                              [numpy_helper.from_array(g, "g"), _initializer("w_f4", q, TensorProto.FLOAT4E2M1),
                               _initializer("w_bs", s8, TensorProto.FLOAT8E4M3FN), numpy_helper.from_array(wg, "w_g")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("trt", 1)])
    model.ir_version = 11
    (tmp_path / "g").mkdir()
    onnx.save(model, str(tmp_path / "g" / "model.onnx"))
    emulated = nvfp4_emulation(tmp_path / "g" / "model.onnx", tmp_path / "e" / "model.onnx")
    got = ort.run(ort.session(emulated, "cpu"), {"x": x})[0]
    want = fp4_dynamic(torch.from_numpy(x), float(g)).half().numpy()  # the identity weight: the quantized input
    np.testing.assert_array_equal(got, want)
    blocks = np.abs(want.astype(np.float32).reshape(-1, 16))
    top = np.maximum(blocks.max(axis=1, keepdims=True), 1e-30)
    assert set(np.unique(np.round(blocks / top * 6, 2))) <= {0, 0.5, 1, 1.5, 2, 3, 4, 6}


def test_layers_named_to_stay_16bit_are_left_alone(tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(2)
    src = tmp_path / "model.onnx"
    _linear_model(src, np.float16, rng)
    w2 = numpy_helper.to_array(next(i for i in onnx.load(str(src)).graph.initializer if i.name == "w2"))
    rep = quantize_float("fp8", src, tmp_path / "q" / "model.onnx",
                         [{"x": rng.standard_normal((1, 7, K)).astype(np.float32)}], keep={weight_key(w2): "proj_out"})
    assert rep.quantized == ["mm1"] and rep.excluded == {"mm2": "kept in 16 bits (proj_out)"}
    inits = {i.name: i for i in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(inits["w2"]), w2)
    assert N % 16 == 0
