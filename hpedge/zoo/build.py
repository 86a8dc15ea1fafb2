"""Configurations of the digits pipelines and their assembly into stock diffusers pipelines.

Both pipelines share one small VAE (32x32x1 pixels <-> 16x16x4 latents). The transformers use hidden
size 128 so that nearly every linear layer has an input dimension that is a multiple of the INT4
block size (128).
"""

from __future__ import annotations

from typing import Any

from hpedge.zoo.text import MAX_LENGTH, clip_tokenizer, t5_tokenizer

SD3_TRANSFORMER: dict[str, Any] = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=12,
    attention_head_dim=64,
    num_attention_heads=2,
    joint_attention_dim=128,
    caption_projection_dim=128,
    pooled_projection_dim=128,
    pos_embed_max_size=16,
    qk_norm="rms_norm",
)
FLUX_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=16,
    num_layers=4,
    num_single_layers=8,
    attention_head_dim=64,
    num_attention_heads=2,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    axes_dims_rope=(16, 24, 24),
    guidance_embeds=False,
)
VAE: dict[str, Any] = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=32,
    shift_factor=0.0,  # replaced by the latent statistics after VAE training
    scaling_factor=1.0,
)
TEXT_HIDDEN = 64


def clip_config(vocab_size: int, bos: int, eos: int):  # -> CLIPTextConfig
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def new_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE)


def new_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def new_pipeline(family: str, vae):
    """A freshly initialised pipeline of ``family`` ("sd3" or "flux") around a trained VAE."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    tok = clip_tokenizer()
    cfg = clip_config(len(tok), tok.bos_token_id, tok.eos_token_id)
    if family == "sd3":
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        torch.manual_seed(0)
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**SD3_TRANSFORMER),
            scheduler=new_scheduler(),
            vae=vae,
            text_encoder=CLIPTextModelWithProjection(cfg),
            tokenizer=tok,
            text_encoder_2=CLIPTextModelWithProjection(cfg),
            tokenizer_2=clip_tokenizer(),
            text_encoder_3=T5EncoderModel(_t5_config(SD3_TRANSFORMER["joint_attention_dim"])),
            tokenizer_3=t5_tokenizer(),
        )
    if family == "flux":
        from diffusers import FluxPipeline, FluxTransformer2DModel

        torch.manual_seed(0)
        return FluxPipeline(
            transformer=FluxTransformer2DModel(**FLUX_TRANSFORMER),
            scheduler=new_scheduler(),
            vae=vae,
            text_encoder=CLIPTextModel(cfg),
            tokenizer=tok,
            text_encoder_2=T5EncoderModel(_t5_config(FLUX_TRANSFORMER["joint_attention_dim"])),
            tokenizer_2=t5_tokenizer(),
        )
    raise ValueError(f"unknown family {family!r}")


def _t5_config(d_model: int):  # -> T5Config
    from transformers import T5Config

    t5tok = t5_tokenizer()
    return T5Config(
        vocab_size=len(t5tok),
        d_model=d_model,
        d_kv=32,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        pad_token_id=t5tok.pad_token_id,
        eos_token_id=t5tok.eos_token_id,
        decoder_start_token_id=t5tok.pad_token_id,
        dropout_rate=0.0,
    )
