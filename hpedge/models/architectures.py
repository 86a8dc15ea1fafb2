"""Real-scale transformer configs (as published in each checkpoint's ``transformer/config.json``).

They are built on the meta device, so parameter and byte counts at full scale cost no memory.
"""

from __future__ import annotations

from typing import Any

_SD35_LARGE: dict[str, Any] = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
)
_FLUX1: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
)

ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "sd3.5-large": ("sd3", _SD35_LARGE),
    "sd3.5-large-turbo": ("sd3", _SD35_LARGE),
    "sd3.5-medium": (
        "sd3",
        dict(
            _SD35_LARGE,
            num_layers=24,
            num_attention_heads=24,
            caption_projection_dim=1536,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
        ),
    ),
    "flux.1-schnell": ("flux", dict(_FLUX1, guidance_embeds=False)),
    "flux.1-dev": ("flux", dict(_FLUX1, guidance_embeds=True)),
}


def build_on_meta(name: str):  # -> torch.nn.Module on the meta device
    """The transformer of architecture ``name`` with empty (meta) weights."""
    from accelerate import init_empty_weights

    family, config = ARCHITECTURES[name]
    with init_empty_weights():
        return transformer_class(family).from_config(config)


def transformer_class(family: str):
    if family == "sd3":
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel


def pipeline_extras_on_meta(name: str) -> dict[str, int]:
    """Parameter counts of the other pipeline components (text encoders, VAE) of architecture ``name``.

    Built on the meta device from the published configs (CLIP-L, OpenCLIP bigG, T5-XXL encoder,
    the 16-channel VAE), so the counts are exact and cost no memory.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    family, _ = ARCHITECTURES[name]
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            projection_dim=768, hidden_act="quick_gelu")
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            projection_dim=1280, hidden_act="gelu")
    t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  feed_forward_proj="gated-gelu")
    vae = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2)

    def n(m: object) -> int:
        # T5's input embedding is tied to ``shared``; on the meta device the tie is not made, so skip it
        return sum(p.numel() for k, p in m.named_parameters() if k != "encoder.embed_tokens.weight")  # type: ignore[attr-defined]

    with init_empty_weights():
        out = {"vae": n(AutoencoderKL(**vae)), "t5_xxl": n(T5EncoderModel(t5))}
        if family == "sd3":
            out["clip_l"] = n(CLIPTextModelWithProjection(clip_l))
            out["clip_g"] = n(CLIPTextModelWithProjection(clip_g))
        else:
            out["clip_l"] = n(CLIPTextModel(clip_l))
    return out
