"""A 16-bit transformer computed in float32: the numbers of a float32 model, the stored tensors untouched."""

from __future__ import annotations

import copy

import pytest

from hpedge.export import onnx_export as ox
from hpedge.models.precision import compute_dtype, fp32_compute


@pytest.mark.parametrize("arch", ["sd3.5-large", "flux.1-dev"])
def test_fp32_compute_of_bfloat16_weights_equals_the_float32_model(arch: str) -> None:
    import torch

    from hpedge.testing import tiny_pipeline

    torch.manual_seed(0)
    pipe = tiny_pipeline(arch, gain=1.0)
    held = pipe.transformer.to(torch.bfloat16)
    wide = copy.deepcopy(held).float()  # what stock diffusers computes from a bfloat16 checkpoint in float32
    spec = ox.transformer_spec(pipe, (64, 64, 64), (1, 2, 2), 32)
    args = [torch.from_numpy(v) for v in spec.sample("opt").values()]
    before = {n: (p.data_ptr(), p.dtype) for n, p in held.named_parameters()}
    with torch.no_grad():
        expected = ox._transformer_wrapper(wide)(*args)
        with fp32_compute(held):
            assert compute_dtype(held) == torch.float32
            got = ox._transformer_wrapper(held)(*args)
        plain = ox._transformer_wrapper(held)(*args)  # outside: bfloat16 compute again
    assert torch.equal(got, expected)
    assert not torch.equal(plain, expected)
    assert compute_dtype(held) == torch.bfloat16
    assert {n: (p.data_ptr(), p.dtype) for n, p in held.named_parameters()} == before


def test_fp32_compute_leaves_a_float32_model_alone() -> None:
    import torch

    lin = torch.nn.Linear(4, 4)
    with fp32_compute(lin):
        assert not lin._forward_pre_hooks
        y = lin(torch.ones(1, 4))
    assert y.dtype == torch.float32


@pytest.mark.parametrize("name,dtype", [("sd3.5-large", "float16"), ("flux.1-dev", "bfloat16")])
def test_t5_stored_in_16_bits_encodes_prompts_as_its_float32_model(name, dtype) -> None:
    import copy

    import torch

    from hpedge.models.families import family as family_facts
    from hpedge.models.precision import t5_fp32_compute
    from hpedge.models.sampling import defaults, prompt_embeddings
    from hpedge.testing import tiny_pipeline

    pipe = tiny_pipeline(name)
    attr = family_facts("sd3" if name.startswith("sd3") else "flux").t5_attribute
    stored = getattr(pipe, attr).to(getattr(torch, dtype))
    setattr(pipe, attr, copy.deepcopy(stored).float())  # the float32 model of the same 16-bit weights
    d = defaults(pipe)
    prompts = ["a red cube", "two blue spheres on the left"]
    ref = prompt_embeddings(pipe, prompts, d)
    setattr(pipe, attr, stored)
    with t5_fp32_compute(stored):
        got = prompt_embeddings(pipe, prompts, d)
    assert all(torch.equal(got[k], ref[k]) and got[k].dtype == torch.float32 for k in ref)
    assert next(stored.parameters()).dtype == getattr(torch, dtype)  # stored as it was
    plain = prompt_embeddings(pipe, prompts, d)  # without it: diffusers casts T5's output to 16 bits
    assert plain["prompt_embeds"].dtype != torch.float32 or not torch.equal(plain["prompt_embeds"], ref["prompt_embeds"])
