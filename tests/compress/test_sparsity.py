"""Weight sparsity (arXiv 2411.15113): exact masks, N:M held, masks kept through distillation, the report, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hpedge.cli import app
from hpedge.compress.sparsity import SparsitySpec, check_pattern, layer_mask, pruned_layers, sparsify
from hpedge.errors import HpedgeError
from hpedge.testing import tiny_pipeline
from tests.compress.cli_helpers import assert_refused, runner
from tests.compress.cli_helpers import compress as _compress


def test_layer_mask_zeroes_exactly_the_share_per_layer_per_row_and_n_of_m() -> None:
    scores = torch.rand(16, 32, generator=torch.Generator().manual_seed(0))
    keep = layer_mask(scores, 0.35, None, per_row=False)
    assert int((~keep).sum()) == round(16 * 32 * 0.35)
    assert bool(scores[~keep].max() <= scores[keep].min())  # the smallest ones
    keep = layer_mask(scores, 0.25, None, per_row=True)
    assert ((~keep).sum(dim=1) == 8).all()
    keep = layer_mask(scores, 0.5, (2, 4), per_row=False)
    groups = keep.reshape(16, 8, 4)
    assert (groups.sum(dim=-1) == 2).all()  # two of every four consecutive inputs stay
    kept_min = torch.where(groups, scores.reshape(16, 8, 4), torch.inf).min(dim=-1).values
    dropped_max = torch.where(~groups, scores.reshape(16, 8, 4), -torch.inf).max(dim=-1).values
    assert (dropped_max <= kept_min).all()


@pytest.mark.parametrize("text, pattern, method, scope, message", [
    ("transformer=1.0", "unstructured", "magnitude", "layer", "must be in \\[0, 1\\)"),
    ("transformer=-0.1", "unstructured", "magnitude", "layer", "must be in \\[0, 1\\)"),
    ("transformer=0.35", "2:4", "magnitude", "layer", "zeroes exactly 0.5"),
    ("transformer=0.5", "2:x", "magnitude", "layer", "unstructured or N:M"),
    ("transformer=0.5", "2:4", "magnitude", "global", "for unstructured"),
    ("transformer=0.5", "unstructured", "sparsegpt", "layer", "magnitude or wanda"),
    ("transformer=0.5", "unstructured", "wanda", "global", "within each output row"),
])
def test_bad_specs_are_refused(text: str, pattern: str, method: str, scope: str, message: str) -> None:
    with pytest.raises(HpedgeError, match=message):
        SparsitySpec.parse(text, pattern, method, scope).check()


def test_components_resolve_broad_to_specific_and_unknown_or_absent_ones_are_errors() -> None:
    sd3 = tiny_pipeline("sd3.5-medium")
    spec = SparsitySpec.parse("text=0.4,t5=0.5,text_encoder=0.1,transformer=0.3")
    assert spec.resolve(sd3) == {"text_encoder": 0.1, "text_encoder_2": 0.4, "text_encoder_3": 0.5, "transformer": 0.3}
    assert SparsitySpec.parse("clip=0.3").resolve(sd3) == {"text_encoder": 0.3, "text_encoder_2": 0.3}
    with pytest.raises(HpedgeError, match="unknown component 'unet'"):
        SparsitySpec.parse("unet=0.3").resolve(sd3)
    flux = tiny_pipeline("flux.1-schnell")
    assert SparsitySpec.parse("t5=0.5").resolve(flux) == {"text_encoder_2": 0.5}
    with pytest.raises(HpedgeError, match="no text_encoder_3"):
        SparsitySpec.parse("text_encoder_3=0.5").resolve(flux)
    with pytest.raises(HpedgeError, match="COMPONENT=FRACTION"):
        SparsitySpec.parse("transformer:0.5")


def test_n_m_needs_input_widths_divisible_by_m() -> None:
    check_pattern({"a": torch.nn.Linear(8, 4)}, (2, 4), "x")
    with pytest.raises(HpedgeError, match="layer b has 6 inputs, not a multiple of 4"):
        check_pattern({"a": torch.nn.Linear(8, 4), "b": torch.nn.Linear(6, 4)}, (2, 4), "x")


def test_global_scope_sets_one_threshold_over_the_component() -> None:
    pipe = tiny_pipeline("sd3.5-large")
    layers = pruned_layers(pipe.transformer)
    with torch.no_grad():  # layers of different scales: a global threshold prunes the small ones more
        for i, m in enumerate(layers.values()):
            m.weight.mul_(1 + i % 3)
    masks = sparsify(pipe.transformer, 0.4, SparsitySpec({"transformer": 0.4}, scope="global"))
    assert abs(masks.achieved() - 0.4) < 1e-3
    shares = masks.per_layer()
    assert max(shares.values()) - min(shares.values()) > 0.2
    assert all(bool((m.weight[~masks.masks[n]] == 0).all()) for n, m in layers.items())


def test_2_4_with_block_removal_holds_its_zeros_through_distillation_and_loads_stock(real_pipelines, tmp_path) -> None:
    from diffusers import DiffusionPipeline

    src, out = real_pipelines["sd3.5-medium"], tmp_path / "out"
    r = _compress(src, out, "--remove-blocks", "2,", "--sgd", "off", "--no-pwp", "--steps", "4", "--lr", "1e-2",
                  "--sparsity", "transformer=0.5,text=0.5", "--sparsity-pattern", "2:4")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "hpedge_compress.json").read_text())
    sp = report["sparsity"]
    assert report["removed_blocks"] == [2] and sp["pattern"] == "2:4" and sp["transformer_zeros_held"]
    assert set(sp["components"]) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert all(c["achieved"] == 0.5 and set(c["layers"].values()) == {0.5} for c in sp["components"].values())
    student = DiffusionPipeline.from_pretrained(out)  # stock diffusers
    teacher = DiffusionPipeline.from_pretrained(src)
    for attr in sp["components"]:
        layers = pruned_layers(getattr(student, attr))
        assert set(layers) == set(sp["components"][attr]["layers"])
        for m in layers.values():  # two zeros in every four consecutive inputs of every row, exactly
            zeros = (m.weight == 0).reshape(m.out_features, -1, 4).sum(dim=-1)
            assert (zeros == 2).all()
    # distillation trained the kept weights (they moved) and left the pruned ones at zero
    t_layers = pruned_layers(teacher.transformer)
    s_name, s_layer = next(iter(pruned_layers(student.transformer).items()))
    kept = s_layer.weight != 0
    assert not torch.equal(s_layer.weight[kept], t_layers[s_name].weight[kept])


def test_wanda_alone_without_block_removal_or_distillation(real_pipelines, tmp_path) -> None:
    src, out = real_pipelines["flux.1-schnell"], tmp_path / "out"
    r = _compress(src, out, "--steps", "0", "--sparsity", "transformer=0.35,t5=0.475", "--sparsity-method", "wanda")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "hpedge_compress.json").read_text())
    assert report["removed_blocks"] == [] and report["plan"] is None
    comps = report["sparsity"]["components"]
    assert set(comps) == {"transformer", "text_encoder_2"}
    assert abs(comps["transformer"]["achieved"] - 0.35) < 0.01 and abs(comps["text_encoder_2"]["achieved"] - 0.475) < 0.01
    assert "transformer: " in r.output and "weights zero (wanda, unstructured)" in r.output


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "transformer=1.0"], "must be in [0, 1)"),
    (["--sparsity", "unet=0.3"], "unknown component 'unet'"),
    (["--sparsity", "transformer=0.333333", "--sparsity-pattern", "1:3"], "not a multiple of 3"),
    (["--sparsity", "transformer=0.5", "--importance", "x.json"], "--importance plans block removal"),
])
def test_bad_sparsity_input_is_one_line_and_writes_nothing(real_pipelines, tmp_path, args, message) -> None:
    out = tmp_path / "out"
    assert_refused(_compress(real_pipelines["sd3.5-large"], out, "--steps", "1", *args), out, message)


def test_a_2_4_package_keeps_its_zeros_in_int4_and_builds_sparse_engines(real_pipelines, tiny_rtx4090, tmp_path) -> None:
    """Zeros survive INT4 (round-to-nearest of 0 is 0, with any block scale) and int4_cpu's int8 weights; the
    transformer's TensorRT-RTX engine is built with the sparse-weights flag, recorded; the package passes check."""
    import onnx
    from onnx import numpy_helper

    from hpedge.export.export import ExportOptions, export
    from hpedge.export.verify import check

    src, student = real_pipelines["sd3.5-large-turbo"], tmp_path / "student"
    r = _compress(src, student, "--steps", "0", "--sparsity", "transformer=0.5", "--sparsity-pattern", "2:4")
    assert r.exit_code == 0, r.output
    pkg = tmp_path / "pkg"
    m = export(str(student), pkg, ExportOptions(target=str(tiny_rtx4090), method="awq_clip", calibration_prompts=1,
                                                 e2e_samples=1))
    assert m["source"]["sparsity"] == {"pattern": "2:4", "method": "magnitude", "scope": "layer",
                                       "components": {"transformer": 0.5}}
    comps = m["engines"]["components"]
    assert m["engines"]["status"] == "built" and comps["transformer"]["sparse_weights"] is True
    assert not any(c.get("sparse_weights") for n, c in comps.items() if n != "transformer")
    assert check(pkg)["passed"]
    from diffusers import DiffusionPipeline

    pruned = [m for m in pruned_layers(DiffusionPipeline.from_pretrained(student).transformer).values()
              if m.in_features % 128 == 0]  # the ones INT4 quantizes (block 128)
    g = onnx.load(str(pkg / "transformer" / "int4" / "model.onnx"))
    q = [numpy_helper.to_array(i) for i in g.graph.initializer if i.name.endswith("_i4")]
    sparse = [w for w in q if np.mean(w == 0) >= 0.45]  # the rest: embedders and projections, left dense
    assert len(sparse) == len(pruned) > 0
    for w in sparse:  # [K, N]: along K, two zeros in every four
        assert ((w.reshape(-1, 4, w.shape[1]) == 0).sum(axis=1) >= 2).all()
    cpu = onnx.load(str(pkg / "transformer" / "int4_cpu" / "model.onnx"))
    w8 = [numpy_helper.to_array(i) for i in cpu.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert sum(np.mean(w == 0) >= 0.5 for w in w8) >= len(pruned)  # int8 of 0 is 0


def test_plan_says_what_sparsity_does_to_the_package(real_pipelines) -> None:
    src = str(real_pipelines["sd3.5-large"])

    def plan(*args: str) -> tuple[int, str]:
        r = runner.invoke(app, ["plan", src, "--remove-blocks", "2,", *args])
        return r.exit_code, " ".join(r.output.split())  # the console wraps long lines

    code, out = plan("--sparsity", "transformer=0.35,text=0.475")
    assert code == 0 and "as large as a dense one" in out and "no bytes are counted" in out, out
    code, out = plan("--sparsity", "transformer=0.5", "--sparsity-pattern", "2:4")
    assert code == 0 and "sparse-weights flag" in out, out
    code, out = plan("--sparsity", "transformer=1.5")
    assert code == 2 and "must be in [0, 1)" in out
