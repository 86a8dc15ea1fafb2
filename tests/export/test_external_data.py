"""hpedge.export.onnx_io.save_onnx: the one writer of ONNX files, external data above the protobuf limit."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hpedge.export import onnx_export as ox
from hpedge.export import onnx_io


def _model(n: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(n * n, dtype=np.float32).reshape(n, n) / (n * n), "w")
    c = helper.make_tensor("c", TensorProto.FLOAT, [n], np.ones(n, dtype=np.float32))
    nodes = [helper.make_node("Constant", [], ["bias"], value=c), helper.make_node("MatMul", ["x", "w"], ["y0"]),
             helper.make_node("Add", ["y0", "bias"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_tensor_bytes_counts_initializers_and_constants_without_bytesize() -> None:
    assert onnx_io.tensor_bytes(_model(64)) == 64 * 64 * 4 + 64 * 4


def test_save_onnx_writes_one_external_data_file_above_the_threshold(tmp_path, monkeypatch) -> None:
    small, big = tmp_path / "small" / "model.onnx", tmp_path / "big" / "model.onnx"
    assert onnx_io.save_onnx(_model(64), small) is False
    assert sorted(p.name for p in small.parent.iterdir()) == ["model.onnx"]
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 10_000)  # stands in for protobuf's 2 GB
    (big.parent).mkdir()
    (big.parent / "model.onnx.data").write_bytes(b"stale" * 1000)  # a stale file is replaced, not appended to
    assert onnx_io.save_onnx(_model(64), big) is True
    assert sorted(p.name for p in big.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert (big.parent / "model.onnx.data").stat().st_size < 64 * 64 * 4 + 4096
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0] for p in (small, big)]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_rewrite_onnx_leaves_no_second_copy_of_a_foreign_external_data_file(tmp_path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save_model(_model(64), str(path), save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    assert onnx_io.external_files(path) == {tmp_path / "model.onnx_data"}
    onnx_io.rewrite_onnx(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # small: inline, the foreign file gone
    assert onnx_io.external_files(path) == set()
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_save_onnx_streams_weights_from_external_files_without_loading_them(tmp_path, monkeypatch) -> None:
    """A graph loaded without its weights is saved with them copied into one PATH.data, also in place."""
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(_model(64), str(src), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert (src.parent / "w").exists()  # one file per tensor, as the TorchScript exporter writes them
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 10_000)
    light = onnx.load(str(src), load_external_data=False)
    dst = tmp_path / "dst" / "model.onnx"
    assert onnx_io.save_onnx(light, dst, base_dir=src.parent) is True
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    want = run(src)
    np.testing.assert_array_equal(run(dst), want)
    again = onnx.load(str(dst), load_external_data=False)  # PATH.data as its own source
    assert onnx_io.save_onnx(again, dst, base_dir=dst.parent) is True
    np.testing.assert_array_equal(run(dst), want)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 1 << 30)  # below the limit: inline again, no stale .data
    assert onnx_io.save_onnx(onnx.load(str(dst), load_external_data=False), dst, base_dir=dst.parent) is False
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx"]
    np.testing.assert_array_equal(run(dst), want)
    with pytest.raises(ValueError, match="base_dir"):
        onnx_io.save_onnx(onnx.load(str(src), load_external_data=False), tmp_path / "x.onnx")


def test_a_transformer_above_the_limit_exports_with_the_dynamo_exporter_into_one_data_file(tmp_path, monkeypatch) -> None:
    """Above protobuf's 2 GB (a lowered threshold here) SD3 switches to the dynamo exporter, whose weights are
    streamed into one external data file; the graph matches PyTorch."""
    from hpedge.export.verify import torch_outputs as _torch_outputs
    from hpedge.testing import tiny_pipeline

    pipe = tiny_pipeline("sd3.5-medium")
    assert ox.auto_exporter(pipe.transformer) == "legacy"
    monkeypatch.setattr(ox, "PROTOBUF_LIMIT", 100_000)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 100_000)
    assert ox.auto_exporter(pipe.transformer) == "dynamo"
    spec = ox.transformer_spec(pipe, (128, 128, 128), (1, 1, 2), 512)  # one resolution: a range torch.export refuses
    path = tmp_path / "fp32" / "model.onnx"
    assert ox.export_transformer(pipe.transformer, spec, path) == "dynamo"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert onnx_io.external_files(path) == {path.with_name("model.onnx.data")}
    feed = spec.sample("opt", seed=3)
    feed["timestep"] = feed["timestep"] * 1000
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    ref = _torch_outputs(pipe, [feed])[0]
    assert float(np.abs(got - ref).max()) < 1e-3 * float(np.abs(ref).max())
