import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from hpedge.backends import ort
from hpedge.errors import HpedgeError
from hpedge.export.attention_chunks import chunk_attention, chunks_for
from hpedge.export.encoders import export_vae_decoder
from hpedge.testing import tiny_pipeline


def _attention(mask: bool = False) -> onnx.ModelProto:
    """softmax(Q K^T) V over a dynamic number of positions; ``mask``: an Add between the scores and the softmax."""
    f = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info(n, f, [1, "L", 8]) for n in ("q", "k", "v")]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"])]
    if mask:
        nodes.append(helper.make_node("Add", ["s", "s"], ["s2"]))
    nodes += [helper.make_node("Softmax", ["s2" if mask else "s"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["o"])]
    graph = helper.make_graph(nodes, "attn", ins, [helper.make_tensor_value_info("o", f, [1, "L", 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _run(model: onnx.ModelProto, tmp_path, name: str, length: int) -> np.ndarray:
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(length)
    feeds = {n: rng.standard_normal((1, length, 8)).astype(np.float32) for n in ("q", "k", "v")}
    return ort.run(ort.session(path, "cpu"), feeds)[0]  # type: ignore[no-any-return]


def test_chunks_for_splits_long_sequences_and_never_leaves_a_block_empty():
    assert chunks_for(1024, 1024) == 1  # 256 px: not worth a split
    assert chunks_for(1024, 168 * 168) == 16  # rtx4090's 256-1344 px
    assert chunks_for(16 * 16, 64 * 64) == 4
    for lo in range(1, 400):
        n = chunks_for(lo, 168 * 168)
        assert n == 1 or -(-lo // n) * (n - 1) < lo  # Split(num_outputs=n) of lo rows: n non-empty blocks
    with pytest.raises(HpedgeError, match="not a range"):
        chunks_for(100, 10)


@pytest.mark.parametrize("length", [16, 37, 240, 257])
def test_split_attention_is_exact_at_even_and_uneven_lengths(tmp_path, length):
    whole = _run(_attention(), tmp_path, "whole", length)
    split, n = _attention(), chunks_for(length, 10**6)  # as many blocks as the shortest length allows
    assert chunk_attention(split, n) == 1
    assert [x.op_type for x in split.graph.node].count("Softmax") == n > 1
    onnx.checker.check_model(split)
    np.testing.assert_allclose(_run(split, tmp_path, "split", length), whole, rtol=0, atol=1e-6)


def test_only_the_plain_chain_is_split():
    masked = _attention(mask=True)
    before = onnx.helper.printable_graph(masked.graph)
    assert chunk_attention(masked, 4) == 0
    assert onnx.helper.printable_graph(masked.graph) == before
    old = _attention()
    old.opset_import[0].version = 17
    with pytest.raises(HpedgeError, match="opset 18"):
        chunk_attention(old, 4)


def test_vae_decoder_attention_is_split_and_decodes_as_diffusers(tmp_path):
    import torch

    pipe = tiny_pipeline("flux.1-dev")
    n = export_vae_decoder(pipe, tmp_path / "vae" / "model.onnx", (8, 24, 64))
    model = onnx.load(str(tmp_path / "vae" / "model.onnx"))
    assert n == chunks_for(64, 64 * 64) == 4
    assert [x.op_type for x in model.graph.node].count("Softmax") == n
    for hw in (8, 24, 29):  # the range's ends, its opt size, an odd one
        lat = torch.randn(1, 16, hw, hw, generator=torch.Generator().manual_seed(hw))
        with torch.no_grad():
            z = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            ref = (pipe.vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1).numpy()
        got = ort.run(ort.session(tmp_path / "vae" / "model.onnx", "cpu"), {"latents": lat.numpy()})[0]
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)
