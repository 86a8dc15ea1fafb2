"""One denoiser call per family, shared by training, analysis, distillation, export and evaluation.

Latents are always (B, C, H, W) in the VAE's normalised space; ``sigma`` is the flow-matching noise
level in [0, 1] (x_t = (1 - sigma) x0 + sigma noise); the prediction is the velocity noise - x0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Conditioning:
    prompt_embeds: Any
    pooled: Any
    text_ids: Any = None  # FLUX only
    guidance: float | None = None  # FLUX.1-dev's distilled guidance scale (a transformer input)


def family_of(obj: Any) -> str:
    """'sd3' or 'flux' for a pipeline or transformer instance."""
    name = type(obj).__name__
    tr = getattr(obj, "transformer", obj)
    tnames = [c.__name__ for c in type(tr).__mro__]  # FSDP2 swaps in a subclass (FSDPSD3Transformer2DModel)
    if any(t.startswith("SD3Transformer") for t in tnames) or name.startswith("StableDiffusion3"):
        return "sd3"
    if any(t.startswith("FluxTransformer") for t in tnames) or name.startswith("Flux"):
        return "flux"
    raise ValueError(f"unsupported transformer class {tnames[0]}")


def encode(pipe: Any, prompts: list[str], max_sequence_length: int, guidance: float | None = None,
           device: Any = None) -> Conditioning:
    """Text conditioning through the pipeline's own encoders (keeps autograd if enabled), on ``device`` (default:
    the transformer's). ``guidance`` is passed to guidance-distilled FLUX transformers."""
    device = pipe.transformer.device if device is None else device
    if family_of(pipe) == "sd3":
        pe, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=prompts,
            prompt_3=prompts,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return Conditioning(pe, pooled)
    pe, pooled, text_ids = pipe.encode_prompt(
        prompt=prompts, prompt_2=prompts, device=device, max_sequence_length=max_sequence_length
    )
    return Conditioning(pe, pooled, text_ids, guidance)


def transformer_kwargs(transformer: Any, latents: Any, sigma: Any, cond: Conditioning) -> dict[str, Any]:
    """Keyword arguments of ``transformer.forward`` for unpacked latents at noise level sigma."""
    import torch

    if family_of(transformer) == "sd3":
        return dict(
            hidden_states=latents,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled,
            timestep=sigma * 1000.0,
        )
    b, c, h, w = latents.shape
    packed = pack(latents)
    img_ids = torch.zeros(h // 2, w // 2, 3, dtype=latents.dtype, device=latents.device)
    img_ids[..., 1] = torch.arange(h // 2, device=latents.device)[:, None]
    img_ids[..., 2] = torch.arange(w // 2, device=latents.device)[None, :]
    txt_ids = cond.text_ids
    if txt_ids is None:
        txt_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, dtype=latents.dtype, device=latents.device)
    kw: dict[str, Any] = {}
    if transformer.config.get("guidance_embeds"):
        if cond.guidance is None:
            raise ValueError("this FLUX transformer embeds the guidance scale: pass guidance to encode()")
        kw["guidance"] = torch.full((b,), float(cond.guidance), dtype=torch.float32, device=latents.device)
    return dict(
        **kw,
        hidden_states=packed,
        encoder_hidden_states=cond.prompt_embeds,
        pooled_projections=cond.pooled,
        timestep=sigma,  # FLUX multiplies by 1000 inside
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=txt_ids,
    )


def pack(latents: Any) -> Any:
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: Any, h: int, w: int) -> Any:
    b, n, c4 = packed.shape
    x = packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def predict(transformer: Any, latents: Any, sigma: Any, cond: Conditioning, module: Any = None) -> Any:
    """Velocity prediction, shaped like ``latents``. ``module`` is what is called when it is not the
    transformer itself (a DDP / FSDP / DeepSpeed wrapper of it); the arguments follow ``transformer``."""
    out = (module or transformer)(**transformer_kwargs(transformer, latents, sigma, cond), return_dict=False)[0]
    if family_of(transformer) == "flux":
        out = unpack(out, latents.shape[2], latents.shape[3])
    return out
