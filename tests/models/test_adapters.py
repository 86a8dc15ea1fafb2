import pytest
import torch

from hpedge.errors import HpedgeError
from hpedge.models import adapters
from hpedge.models.architectures import build_on_meta
from hpedge.models.loading import load_pipeline, resolve


@pytest.mark.parametrize(
    "name,params_b,bf16_gb",
    [("sd3.5-large", 8.057, 16.11), ("sd3.5-medium", 2.243, 4.49), ("flux.1-schnell", 11.891, 23.78)],
)
def test_real_scale_counts_on_meta(name: str, params_b: float, bf16_gb: float) -> None:
    d = adapters.describe(build_on_meta(name))
    assert round(d["params"] / 1e9, 3) == params_b
    assert round(d["bytes"]["bf16"] / 1e9, 2) == bf16_gb


def test_sd35_medium_dual_attention_is_remapped() -> None:
    m = build_on_meta("sd3.5-medium")
    pruned, kept = adapters.prune(m, {3, 5, 20})
    assert pruned.config.num_layers == 21
    assert pruned.config.dual_attention_layers == tuple(range(11))
    assert kept[:6] == [0, 1, 2, 4, 6, 7]
    assert all(pruned.transformer_blocks[i].attn2 is not None for i in range(11))
    assert getattr(pruned.transformer_blocks[11], "attn2", None) is None


def test_final_sd3_block_and_range_are_checked() -> None:
    m = build_on_meta("sd3.5-large")
    with pytest.raises(HpedgeError, match="context_pre_only"):
        adapters.prune(m, {37})
    with pytest.raises(HpedgeError, match="out of range"):
        adapters.prune(m, {38})


def test_components_of_sd3_final_block() -> None:
    refs = adapters.blocks(build_on_meta("sd3.5-large"))
    assert "ff_context" in adapters.components(refs[0])
    assert "ff_context" not in adapters.components(refs[-1])


def test_pruned_model_saves_and_reloads_with_stock_diffusers(random_pipeline, tmp_path) -> None:
    from hpedge.models.architectures import transformer_class
    from hpedge.models.denoise import encode, predict

    ref = resolve(str(random_pipeline))
    pipe = load_pipeline(ref)
    n = len(adapters.blocks(pipe.transformer))
    remove = {n - 3, n - 2} if ref.family == "sd3" else {1, n - 1}
    pruned, kept = adapters.prune(pipe.transformer, remove)
    assert len(kept) == n - 2 and not set(kept) & remove
    pruned.save_pretrained(tmp_path / "t")
    reloaded = transformer_class(ref.family).from_pretrained(tmp_path / "t")  # stock loader, no hpedge involved
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        cond = encode(pipe, ["a 3", "two 5s"], 16)
        a = predict(pruned, x, sigma, cond)
        b = predict(reloaded, x, sigma, cond)
        full = predict(pipe.transformer, x, sigma, cond)
    assert torch.equal(a, b)
    assert not torch.allclose(a, full)
