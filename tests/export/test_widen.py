"""The fp16 graph widened to float32: PyTorch's float32 numbers for the fp16 weights, the weights not copied."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpedge.backends import ort
from hpedge.errors import HpedgeError
from hpedge.export import onnx_export as ox
from hpedge.export import onnx_io, verify
from hpedge.export.widen import fp32_view
from hpedge.targets.profiles import load_profile


def _fp16_export(arch: str, exporter: str, path: Path):  # -> (pipe, spec)
    import torch

    from hpedge.testing import tiny_pipeline

    torch.manual_seed(0)
    pipe = tiny_pipeline(arch, gain=1.0)
    pipe.transformer.half()
    spec = ox.transformer_spec(pipe, (64, 64, 128), (1, 1, 2), 32)
    ox.export_transformer(pipe.transformer, spec, path, exporter, dtype="fp16")
    return pipe, spec


@pytest.mark.parametrize("arch,exporter", [("sd3.5-large", "legacy"), ("sd3.5-large", "dynamo"), ("flux.1-dev", "dynamo")])
def test_the_view_computes_the_fp16_weights_in_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str,
                                                        exporter: str) -> None:
    import onnx
    import torch

    from hpedge.models.precision import fp32_compute

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 10_000)  # stands in for 256 MB: weights in model.onnx.data
    path = tmp_path / "model.onnx"
    pipe, spec = _fp16_export(arch, exporter, path)
    view = fp32_view(path)
    assert (tmp_path / "model.onnx.data").exists() and not list(tmp_path.glob("fp32_view.onnx.*"))
    g = onnx.load(str(view), load_external_data=False).graph

    def external(graph):  # -> {(location, offset)} of the tensors kept in the data file
        return {tuple(e.value for e in t.external_data if e.key in ("location", "offset"))
                for t in graph.initializer if t.external_data}

    kept = external(g)  # the view reads the fp16 graph's data file where it is: the weights are not copied
    assert kept and kept >= external(onnx.load(str(path), load_external_data=False).graph)  # (+ large Constants)
    assert {loc for loc, _ in kept} == {"model.onnx.data"}
    narrow = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    assert not [n for n in g.node if n.op_type == "Cast" and n.attribute[0].i in narrow]
    feed = spec.sample("opt", seed=3)
    with torch.no_grad(), fp32_compute(pipe.transformer):
        ref = ox._transformer_wrapper(pipe.transformer)(*(torch.from_numpy(v) for v in feed.values())).numpy()
    wide = ort.run(ort.session(view, "cpu", low_memory=True), feed)[0]
    narrow_out = ort.run(ort.session(path, "cpu"), feed)[0]
    assert np.abs(wide - ref).max() < 1e-4 * np.abs(ref).max()  # float32 agreement
    assert np.abs(narrow_out - ref).max() > 10 * np.abs(wide - ref).max()  # which the fp16 graph does not have


def test_the_graph_check_fails_on_a_changed_weight(tmp_path: Path) -> None:
    """The element-wise gate exists for export bugs: one weight of the exported graph off by a little aborts it."""
    import onnx
    from onnx import numpy_helper

    from hpedge.models.precision import fp32_compute

    path = tmp_path / "model.onnx"
    pipe, spec = _fp16_export("sd3.5-large", "legacy", path)
    fresh = verify.fresh_feeds(spec, "sd3")
    with fp32_compute(pipe.transformer):
        ref = verify.torch_outputs(pipe, list(fresh.values()))
    parity = load_profile("rtx4090").parity
    verify.check_fp32(fp32_view(path), fresh, ref, [], parity)  # passes as exported
    model = onnx.load(str(path))
    weights = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm")}
    init = next(i for i in model.graph.initializer if i.name in weights and i.data_type == onnx.TensorProto.FLOAT16)
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += np.float16(0.5)
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))
    with pytest.raises(HpedgeError, match="does not match PyTorch"):
        verify.check_fp32(fp32_view(path), fresh, ref, [], parity)
