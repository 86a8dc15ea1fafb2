"""A pipeline ``hpedge compress --vq`` wrote exports with a ``vq`` transformer variant (:mod:`hpedge.export.vq_variant`):
codebook lookups in the graph, gated against PyTorch with the same weights, rerun by ``hpedge check``, generating."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hpedge.cli import app
from hpedge.errors import HpedgeError
from hpedge.export import vq_variant
from hpedge.export.export import ExportOptions, export
from hpedge.export.onnx_io import weight_key
from hpedge.export.verify import check
from hpedge.export.vq_graph import layer_keys
from hpedge.models import codebooks
from tests.compress.cli_helpers import compress

runner = CliRunner()


@pytest.fixture(scope="module")
def vq_student(real_pipelines, tmp_path_factory):
    out = tmp_path_factory.mktemp("vq") / "student"
    r = compress(real_pipelines["sd3.5-large-turbo"], out, "--remove-blocks", "2,", "--sgd", "off", "--no-pwp",
                 "--steps", "0", "--vq", "2x8g8", "--vq-tune-steps", "3")
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    return out


def _export(student, folder, tiny_rtx4090):
    return export(str(student), folder, ExportOptions(target=str(tiny_rtx4090), method="rtn", engine="skip", precision="int4",
                                                      calibration_prompts=1, e2e_samples=1))


@pytest.fixture(scope="module")
def vq_package(vq_student, tiny_rtx4090, tmp_path_factory):
    pkg = tmp_path_factory.mktemp("vq-pkg") / "pkg"
    return pkg, _export(vq_student, pkg, tiny_rtx4090)


def test_vq_variant_holds_codes_not_dense_weights_and_passes_parity(vq_student, vq_package) -> None:
    import onnx
    from onnx import numpy_helper

    pkg, m = vq_package
    tr = m["components"]["transformer"]
    assert set(tr["variants"]) == {"int4", "int4_cpu", "vq"} and tr["bytes"]["vq"] > 0
    _, t = codebooks.read(vq_student / codebooks.FILE)
    layers = codebooks.layers_of(t)
    v = m["source"]["vq"]
    assert v["variant"]["layers"] == len(layers) > 0 and v["variant"]["file"] == tr["variants"]["vq"]
    g = onnx.load(str(pkg / tr["variants"]["vq"]))
    inits = {i.name: i for i in g.graph.initializer}
    assert sum(n.op_type == "Gather" and n.name.startswith("vq::") for n in g.graph.node) == len(layers)
    for name, (codes, _, _) in layers.items():  # one byte per 8-bit code
        c = inits[f"vq::{name}.codes"]
        assert c.data_type == onnx.TensorProto.UINT8 and list(c.dims) == list(codes.shape)
    dense = layer_keys(layers, np.float16)  # no dense weight of a codebook layer is left
    assert not [i.name for i in inits.values() if i.data_type == onnx.TensorProto.FLOAT16 and len(i.dims) == 2
                and weight_key(np.ascontiguousarray(numpy_helper.to_array(i))) in dense]
    checks = json.loads((pkg / "parity.json").read_text())["checks"]
    vq_checks = [c for c in checks if "transformer vq" in c["name"] or "package (vq)" in c["name"]]
    assert len(vq_checks) == 3 and all(c["passed"] for c in vq_checks), vq_checks  # quality, implementation, e2e
    impl = next(c for c in vq_checks if c["name"].startswith("implementation"))
    assert impl["metrics"]["min_psnr_db"] >= 60  # the graph's own weights: exact up to float32 rounding


def test_vq_package_checks_loads_in_plain_onnxruntime_and_generates(vq_package, tmp_path) -> None:
    import onnxruntime as ort

    pkg, m = vq_package
    res = check(pkg)
    assert res["passed"]
    names = [c["name"] for c in res["checks"]]
    assert any(n.startswith("vq vs PyTorch") for n in names)
    assert any("transformer vq vs PyTorch with the same dequantized weights" in n for n in names)
    sess = ort.InferenceSession(str(pkg / m["components"]["transformer"]["variants"]["vq"]),
                                providers=["CPUExecutionProvider"])
    assert {i.name for i in sess.get_inputs()} >= {"hidden_states", "timestep"}
    img = tmp_path / "img.png"
    r = runner.invoke(app, ["generate", str(pkg), "a red circle", "-o", str(img), "--variant", "vq", "--steps", "2"])
    assert r.exit_code == 0 and img.exists(), r.output


def test_vq_gate_fails_when_the_graph_is_not_the_codebook_weights(vq_student, tiny_rtx4090, tmp_path,
                                                                   monkeypatch) -> None:
    """Codes shifted by one in the graph (a wrong lookup): the implementation gate stops the export."""
    real = vq_variant.write_graph

    def off_by_one(src, dst, vq_file):
        out = real(src, dst, vq_file)
        import onnx
        from onnx import numpy_helper

        g = onnx.load(str(dst))
        for i in g.graph.initializer:
            if i.name.endswith(".codes"):
                i.CopyFrom(numpy_helper.from_array(((numpy_helper.to_array(i).astype(np.int32) + 1) % 256)
                                                   .astype(np.uint8), i.name))
        onnx.save(g, str(dst))
        return out

    monkeypatch.setattr(vq_variant, "write_graph", off_by_one)
    with pytest.raises(HpedgeError, match="parity failed.*transformer vq"):
        _export(vq_student, tmp_path / "pkg", tiny_rtx4090)
    assert not (tmp_path / "pkg").exists()
