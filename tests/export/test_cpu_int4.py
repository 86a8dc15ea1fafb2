"""The CPU variants of the INT4 transformer keep ModelOpt's 4-bit weights and compute the same product."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpedge.export.cpu_int4 import convert

K, N, BLOCK = 256, 64, 128


def _dq_matmul_model(path: Path, rng: np.random.Generator) -> None:
    """x[2, 5, K] @ DequantizeLinear(int4 [K, N], scale [K/128, N]) -- ModelOpt's layout."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    q = rng.integers(-8, 8, size=(K, N)).astype(np.int8)
    scale = (rng.random((K // BLOCK, N)) * 0.05 + 0.01).astype(np.float32)
    w = helper.make_tensor("w_i4", TensorProto.INT4, [K, N], q.flatten().tolist())
    nodes = [helper.make_node("DequantizeLinear", ["w_i4", "w_scale"], ["w"], axis=0, block_size=BLOCK),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, N])],
                              [w, numpy_helper.from_array(scale, "w_scale")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("kernel", ["int8", "nbits"])
def test_cpu_variant_matches_the_int4_graph(tmp_path: Path, kernel: str) -> None:
    import onnx
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    src, dst = tmp_path / "int4.onnx", tmp_path / f"{kernel}.onnx"
    _dq_matmul_model(src, rng)
    assert convert(src, dst, kernel) == 1
    model = onnx.load(str(dst))
    ops = {n.op_type for n in model.graph.node}
    assert ("DynamicQuantizeMatMul" if kernel == "int8" else "MatMulNBits") in ops
    assert "DequantizeLinear" not in ops
    # nbits keeps 4-bit weights; int8 stores one byte per weight (ONNX Runtime opens it at its size)
    bits = {"int8": 8, "nbits": 4}[kernel]
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) >= K * N // 2:
            assert init.data_type in (TensorProto.INT8, TensorProto.UINT8) and len(init.raw_data or b"") <= K * N * bits // 8 + 8
    x = rng.standard_normal((2, 5, K)).astype(np.float32)
    ref, got = _run(src, x), _run(dst, x)
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    if kernel == "nbits":
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    else:  # int8 weights per channel + uint8 activations per tensor: close, not exact. The bound holds on
        # any x86 CPU only because the weights keep 7 bits: with 8, AVX2-only CPUs saturate (0.9957 measured)
        assert cos > 0.9999, cos
        assert not np.allclose(got, ref, rtol=1e-6, atol=1e-6)  # it really is the quantized kernel


def test_int8_weights_are_stored_so_nothing_is_folded_at_session_start(tmp_path: Path) -> None:
    """The int8 weights are in the file: ONNX Runtime's optimized graph is the one int8 GEMM. Each int8 value is
    q * s_block / S rounded to the nearest (S = the channel's largest block scale / 8): within half a step, 7 bits,
    and exact (8 q) in the channel's largest-scale block."""
    import onnx
    import onnxruntime as ort

    from hpedge.export.cpu_int4 import int8_weight

    src, dst, opt = tmp_path / "int4.onnx", tmp_path / "int8.onnx", tmp_path / "optimized.onnx"
    _dq_matmul_model(src, np.random.default_rng(1))
    convert(src, dst, "int8")
    assert not [n for n in onnx.load(str(dst)).graph.node if n.op_type in ("Cast", "QuantizeLinear")]
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(str(opt)).graph.node] == ["DynamicQuantizeMatMul"]

    rng = np.random.default_rng(4)
    q = rng.integers(-8, 8, size=(K, N)).astype(np.int8)
    scale = (rng.random((K // BLOCK, N)) * 0.05 + 0.01).astype(np.float32)
    w8, s_chan = int8_weight(q, scale, BLOCK)
    exact = q.astype(np.float64) * np.repeat(scale, BLOCK, axis=0) / s_chan.astype(np.float64)
    assert float(np.abs(w8 - exact).max()) <= 0.5 + 1e-5
    assert int(np.abs(w8).max()) <= 64
    top = scale.argmax(axis=0)
    for c in range(N):
        rows = slice(top[c] * BLOCK, (top[c] + 1) * BLOCK)
        np.testing.assert_array_equal(w8[rows, c], 8 * q[rows, c].astype(np.int16))


def test_unknown_kernel_is_refused(tmp_path: Path) -> None:
    _dq_matmul_model(tmp_path / "int4.onnx", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown CPU INT4 kernel"):
        convert(tmp_path / "int4.onnx", tmp_path / "x.onnx", "fp8")
    assert not (tmp_path / "x.onnx").exists()


def _as_fp16_compute(src: Path, dst: Path) -> None:
    """The same layer as the TensorRT input of an fp16 export has it: x cast to fp16, fp16 scales and product,
    the output cast back to float32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    scale = next(i for i in model.graph.initializer if i.name == "w_scale")
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale).astype(np.float16), "w_scale"))
    mm = next(n for n in model.graph.node if n.op_type == "MatMul")
    mm.input[0], mm.output[0] = "x16", "y16"
    model.graph.node.insert(0, helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16))
    model.graph.node.append(helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT))
    model.graph.value_info.append(helper.make_tensor_value_info("y16", TensorProto.FLOAT16, [2, 5, N]))
    onnx.save(model, str(dst))


@pytest.mark.parametrize("kernel", ["int8", "nbits"])
def test_an_fp16_compute_graph_gives_the_cpu_variant_of_the_same_weights(tmp_path: Path, kernel: str) -> None:
    """int4_cpu is derived from the fp16 TensorRT input: same nibbles, its fp16 scales, computed in fp32."""
    import onnx
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(2)
    src, fp16, dst = tmp_path / "int4.onnx", tmp_path / "int4_fp16.onnx", tmp_path / "cpu.onnx"
    _dq_matmul_model(src, rng)
    _as_fp16_compute(src, fp16)
    assert convert(fp16, dst, kernel) == 1
    model = onnx.load(str(dst))
    assert all(n.attribute[0].i == TensorProto.FLOAT for n in model.graph.node if n.op_type == "Cast")
    assert not model.graph.value_info  # the stale fp16 annotations are gone
    # the reference: the fp32 graph with the fp16-rounded scales
    ref_model = onnx.load(str(src))
    scale = next(i for i in ref_model.graph.initializer if i.name == "w_scale")
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale).astype(np.float16).astype(np.float32), "w_scale"))
    onnx.save(ref_model, str(tmp_path / "ref.onnx"))
    x = rng.standard_normal((2, 5, K)).astype(np.float32)
    ref, got = _run(tmp_path / "ref.onnx", x), _run(dst, x)
    if kernel == "nbits":
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    else:
        assert float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.9999


def test_store_floats_fp16_keeps_fp32_compute(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto

    from hpedge.export.quantize import store_floats_fp16

    rng = np.random.default_rng(1)
    src = tmp_path / "int4.onnx"
    _dq_matmul_model(src, rng)
    x = rng.standard_normal((2, 5, K)).astype(np.float32)
    ref = _run(src, x)
    assert store_floats_fp16(src, keep_dq_scales=True, min_elements=1) == 0  # the only float is a DQ scale
    assert store_floats_fp16(src, keep_dq_scales=False, min_elements=1) == 1
    types = {i.name: i.data_type for i in onnx.load(str(src)).graph.initializer}
    assert types["w_scale_fp16"] == TensorProto.FLOAT16 and "w_scale" not in types
    got = _run(src, x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * float(np.abs(ref).max()))


def _qkv_model(path: Path, rng: np.random.Generator) -> None:
    """Three INT4 projections of the same x (a block's Q, K, V), each with its bias Add, and a fourth without bias
    on another input: the layout a Linear exports to."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes = [], []
    for j, (src, bias) in enumerate((("x", True), ("x", True), ("x", True), ("h", False))):
        q = rng.integers(-8, 8, size=(K, N)).astype(np.int8)
        inits += [helper.make_tensor(f"w{j}_i4", TensorProto.INT4, [K, N], q.flatten().tolist()),
                  numpy_helper.from_array((rng.random((K // BLOCK, N)) * 0.05 + 0.01).astype(np.float32), f"w{j}_scale")]
        nodes += [helper.make_node("DequantizeLinear", [f"w{j}_i4", f"w{j}_scale"], [f"w{j}"], axis=0, block_size=BLOCK),
                  helper.make_node("MatMul", [src, f"w{j}"], [f"m{j}" if bias else f"y{j}"], name=f"mm{j}")]
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), f"b{j}"))
            nodes.append(helper.make_node("Add", [f"b{j}", f"m{j}"] if j == 1 else [f"m{j}", f"b{j}"], [f"y{j}"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 5, K]) for n in "xh"],
                              [helper.make_tensor_value_info(f"y{j}", TensorProto.FLOAT, [2, 5, N]) for j in range(4)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))


def test_int8_fuses_biases_and_quantizes_shared_activations_once(tmp_path: Path) -> None:
    """As ONNX Runtime's quantize_dynamic lays it out: the bias Adds become the kernels' bias inputs and the three
    projections of x share one DynamicQuantizeLinear; the product stays that of the INT4 graph."""
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    src, dst, opt = tmp_path / "int4.onnx", tmp_path / "int8.onnx", tmp_path / "optimized.onnx"
    _qkv_model(src, rng)
    assert convert(src, dst, "int8") == 4
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(opt)
    sess = ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
    ops = sorted(n.op_type for n in onnx.load(str(opt)).graph.node)
    assert ops == ["DynamicQuantizeLinear", "DynamicQuantizeMatMul"] + ["MatMulIntegerToFloat"] * 3, ops
    feeds = {n: rng.standard_normal((2, 5, K)).astype(np.float32) for n in "xh"}
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)
    for r, g in zip(ref, sess.run(None, feeds)):
        assert float((r * g).sum() / np.linalg.norm(r) / np.linalg.norm(g)) > 0.9999


@pytest.mark.parametrize("kernel", ["int8", "nbits"])
def test_the_streamed_conversion_writes_what_the_inline_one_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 kernel: str) -> None:
    """Above the external-data threshold (patched small) the INT4 file is read one weight at a time and the new
    weights are spilled to disk as they are made: same graph, same product, no spill file left behind."""
    from hpedge.export import onnx_io
    from hpedge.export.quantize import store_floats_fp16

    rng = np.random.default_rng(5)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _qkv_model(tmp_path / "a" / "int4.onnx", rng)
    convert(tmp_path / "a" / "int4.onnx", tmp_path / "a" / "cpu" / "model.onnx", kernel)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    import onnx

    # the source itself with external data, as a large INT4 file has it
    onnx_io.save_onnx(onnx.load(str(tmp_path / "a" / "int4.onnx")), tmp_path / "b" / "int4.onnx")
    assert (tmp_path / "b" / "int4.onnx.data").exists()
    assert store_floats_fp16(tmp_path / "b" / "int4.onnx") == 0  # nothing to store: the file is left as it is
    convert(tmp_path / "b" / "int4.onnx", tmp_path / "b" / "cpu" / "model.onnx", kernel)
    assert (tmp_path / "b" / "cpu" / "model.onnx.data").exists()
    assert not list(tmp_path.rglob("*.spill"))
    feeds = {n: rng.standard_normal((2, 5, K)).astype(np.float32) for n in "xh"}
    import onnxruntime as ort

    inline, streamed = (ort.InferenceSession(str(tmp_path / d / "cpu" / "model.onnx"), providers=["CPUExecutionProvider"])
                        for d in "ab")
    for x, y in zip(inline.run(None, feeds), streamed.run(None, feeds)):
        np.testing.assert_array_equal(x, y)
