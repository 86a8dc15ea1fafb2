"""Codebook weights in an ONNX graph (:mod:`hpedge.export.vq_graph`): ONNX Runtime runs the rewritten graph as
PyTorch runs the codebook layers; the file keeps codes, not dense weights; a layer that is not in the graph is an
error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpedge.backends import ort
from hpedge.compress.vq import VQSpec, fit_layer, vq_linear_class
from hpedge.errors import HpedgeError
from hpedge.export.vq_graph import rewrite


def _model(dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    cls = vq_linear_class()
    layers = {}
    x = torch.randn(256, 32, generator=g)
    for i in (0, 2):
        lin = net[i]
        h = torch.eye(lin.in_features)
        fit = fit_layer(lin.weight, h, VQSpec(2, 4, 4, tune_steps=5))
        net[i] = cls(fit.codes, fit.codebooks, fit.scales, lin.bias.detach().clone())
        layers[str(i)] = (fit.codes, fit.codebooks, fit.scales)
    dense = torch.nn.Sequential(net[0].dense(), torch.nn.GELU(), net[2].dense()).to(dtype)
    return net, {"layers": layers, "dense": dense, "x": x}


@pytest.mark.parametrize("dtype, rank", [(torch.float32, 2), (torch.float16, 2), (torch.float32, 3)])
def test_rewritten_graph_runs_the_codebook_layers_and_stores_codes(tmp_path, dtype, rank) -> None:
    """Rank 2: the exporter writes Gemm (weight [out, in]); rank 3, as a transformer's tokens: MatMul ([in, out])."""
    import onnx

    net, m = _model(dtype)
    if rank == 3:
        m["x"] = m["x"].reshape(8, 32, 32)
    path = tmp_path / "dense.onnx"
    x = m["x"][:4].to(dtype)
    torch.onnx.export(m["dense"], (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False,
                      dynamic_axes={"x": {0: "n"}}, opset_version=20)
    y_dense = ort.run(ort.session(path), {"x": m["x"].to(dtype).numpy()})[0]
    model = onnx.load(str(path))
    done = rewrite(model, m["layers"])
    assert set(done) == {"0", "2"}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Gather") == 2 and ops.count("MatMul") + ops.count("Gemm") >= 2
    dense_bytes = sum(t.numel() * t.element_size() for t in (m["dense"][0].weight, m["dense"][2].weight))
    inits = {t.name: t for t in model.graph.initializer}
    assert not any(t.dims == [32, 64] or t.dims == [64, 16] for t in inits.values())  # no dense weight left
    codes = sum(len(t.raw_data) for n, t in inits.items() if n.endswith(".codes"))
    assert codes == 64 * 8 * 2 + 16 * 16 * 2  # one uint8 per code in the graph (the file packs them)
    assert codes < dense_bytes
    out = tmp_path / "vq.onnx"
    onnx.save(model, str(out))
    sess = ort.session(out)
    y = ort.run(sess, {"x": m["x"].to(dtype).numpy()})[0]
    with torch.no_grad():
        want = net.to(torch.float32)(m["x"]).numpy()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(y.astype(np.float32), want, rtol=tol, atol=tol)
    np.testing.assert_array_equal(y, y_dense)  # the same weights as the dense graph's, bit for bit


def test_a_layer_missing_from_the_graph_is_an_error(tmp_path) -> None:
    import onnx

    _, m = _model(torch.float32)
    path = tmp_path / "dense.onnx"
    torch.onnx.export(m["dense"], (m["x"][:4],), str(path), input_names=["x"], dynamo=False, opset_version=20)
    model = onnx.load(str(path))
    codes, books, scales = m["layers"]["2"]
    layers = {**m["layers"], "2": (codes, books * 1.01, scales)}  # not the weights this graph was exported with
    with pytest.raises(HpedgeError, match="1 codebook layer"):
        rewrite(model, layers)
