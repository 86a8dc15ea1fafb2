"""ONNX export of the text encoding and the VAE decoder (the transformer's is :mod:`hpedge.export.onnx_export`).

The text wrapper reproduces the pipeline's own ``encode_prompt`` arithmetic (SD3: penultimate CLIP states of
both encoders, concatenated, zero-padded to the T5 width and joined with the T5 states; FLUX: CLIP pooled
output and T5 states) and is verified against it. The VAE wrapper takes the transformer's normalised latents
and returns images in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hpedge.errors import HpedgeError
from hpedge.export.attention_chunks import chunk_attention, chunks_for
from hpedge.export.onnx_export import COMPUTE_DTYPES, _export, half_copy
from hpedge.models.denoise import family_of


class TextEncoders:
    """The text encoders as the package ships them: ``clip`` (the CLIP encoders, one graph) and ``t5`` (one
    graph), combined by the runtime exactly as the pipeline's ``encode_prompt`` combines them.

    SD3: ``clip(clip_ids, clip2_ids) -> clip_embeds`` (the penultimate hidden states of CLIP-L and CLIP-G side
    by side) and ``pooled``; ``t5(t5_ids) -> t5_embeds``; prompt embeddings = [clip_embeds padded to T5's width,
    t5_embeds] along the sequence. FLUX.1: ``clip(clip_ids) -> pooled``; prompt embeddings = ``t5_embeds``.
    Without T5 (SD3 only) its part is zeros of (max_sequence_length, joint_attention_dim), as in diffusers.
    The combination: :func:`hpedge.runtime.combine_text`.
    """

    INPUTS = {"sd3": {"clip": ["clip_ids", "clip2_ids"], "t5": ["t5_ids"]},
              "flux": {"clip": ["clip_ids"], "t5": ["t5_ids"]}}
    OUTPUTS = {"sd3": {"clip": ["clip_embeds", "pooled"], "t5": ["t5_embeds"]},
               "flux": {"clip": ["pooled"], "t5": ["t5_embeds"]}}

    @staticmethod
    def module(pipe: Any, which: str, half: bool, in_place: bool = False) -> Any:
        """The graph's module; ``half``: in fp16, an fp16 copy of the pipeline's encoders, or with ``in_place`` the
        pipeline's own encoders cast (no second copy of T5-XXL's 4.7 B parameters; the pipeline's encoders are fp16
        from then on)."""
        import torch

        family = family_of(pipe)

        def copy(m: Any) -> Any:
            if not half:
                return m
            m = m.half() if in_place else half_copy(m)
            # the legacy exporter's SDPA symbolic computes in fp32 and leaks fp32 into an fp16 graph (ONNX Runtime
            # then rejects its LayerNormalization): export fp16 CLIPs with their eager attention (same arithmetic)
            if hasattr(m, "set_attn_implementation") and type(m).__name__.startswith("CLIP"):
                m.set_attn_implementation("eager")
            return m

        class SD3Clip(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.l, self.g = copy(pipe.text_encoder), copy(pipe.text_encoder_2)

            def forward(self, clip_ids, clip2_ids):  # type: ignore[no-untyped-def]
                a = self.l(clip_ids, output_hidden_states=True)
                b = self.g(clip2_ids, output_hidden_states=True)
                clip = torch.cat([a.hidden_states[-2], b.hidden_states[-2]], dim=-1)
                return clip.float(), torch.cat([a.text_embeds, b.text_embeds], dim=-1).float()

        class FluxClip(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.clip = copy(pipe.text_encoder)

            def forward(self, clip_ids):  # type: ignore[no-untyped-def]
                return self.clip(clip_ids).pooler_output.float()

        class T5(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.t5 = copy(pipe.text_encoder_3 if family == "sd3" else pipe.text_encoder_2)

            def forward(self, t5_ids):  # type: ignore[no-untyped-def]
                return self.t5(t5_ids)[0].float()

        if which == "t5":
            return T5().eval()
        return (SD3Clip if family == "sd3" else FluxClip)().eval()


def text_inputs(pipe: Any, max_sequence_length: int) -> dict[str, tuple[str, int]]:
    """Input name -> (tokenizer attribute, length)."""
    clip_len = int(pipe.tokenizer_max_length)
    if family_of(pipe) == "sd3":
        clips = {"clip_ids": ("tokenizer", clip_len), "clip2_ids": ("tokenizer_2", clip_len)}
        return clips if pipe.text_encoder_3 is None else {**clips, "t5_ids": ("tokenizer_3", max_sequence_length)}
    return {"clip_ids": ("tokenizer", clip_len), "t5_ids": ("tokenizer_2", max_sequence_length)}


def tokenize(pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, np.ndarray]:
    out = {}
    for name, (attr, length) in text_inputs(pipe, max_sequence_length).items():
        tok = getattr(pipe, attr)
        out[name] = np.asarray(tok(prompts, padding="max_length", max_length=length, truncation=True,
                                   return_tensors="np").input_ids, dtype=np.int64)
    return out


def export_text_encoder(pipe: Any, which: str, path: Path, max_sequence_length: int, dtype: str = "fp32",
                        in_place: bool = False, exporter: str = "legacy") -> dict[str, Any]:
    """Export text encoder graph ``which`` (``clip`` | ``t5``) computing in ``dtype`` (fp32 | fp16; inputs int64,
    outputs float32); returns its manifest entry. ``in_place``: an fp16 graph is exported from the pipeline's own
    encoders, cast (see :meth:`TextEncoders.module`)."""
    import torch

    family = family_of(pipe)
    if dtype not in COMPUTE_DTYPES:
        raise HpedgeError(f"unknown compute dtype {dtype!r} for the text encoders (choose from {', '.join(COMPUTE_DTYPES)})")
    module = TextEncoders.module(pipe, which, dtype == "fp16", in_place)
    names, outputs = TextEncoders.INPUTS[family][which], TextEncoders.OUTPUTS[family][which]
    ids = tokenize(pipe, ["a 1", "two 3s"], max_sequence_length)
    args = tuple(torch.from_numpy(ids[n]) for n in names)
    axes = {n: {0: "batch"} for n in [*names, *outputs]}
    dynamic = None
    if exporter == "dynamo":  # weights streamed to external data (the TorchScript exporter builds one message)
        from torch.export import Dim

        batch = Dim("batch", min=1, max=1024)
        dynamic = tuple({0: batch} for _ in names)
    _export(module, args, path, names, outputs, axes, exporter, dynamic)
    return {"inputs": names, "outputs": outputs, "compute": dtype}


def export_vae_decoder(pipe: Any, path: Path, latent_hw: int | tuple[int, int, int], dtype: str = "fp32") -> int:
    """Export the VAE decoder (float32 latents in, image in [0, 1] out) computing in ``dtype``, traced at the
    opt latent size; ``latent_hw``: that size, or the (min, opt, max) range the package covers, from which the
    mid-block's attention over every latent pixel is split into blocks of queries
    (:mod:`hpedge.export.attention_chunks`). Returns the number of blocks (1: not split)."""
    import torch

    if dtype not in COMPUTE_DTYPES:
        raise HpedgeError(f"unknown compute dtype {dtype!r} for the VAE decoder (choose from {', '.join(COMPUTE_DTYPES)})")
    lo, opt, hi = (latent_hw, latent_hw, latent_hw) if isinstance(latent_hw, int) else latent_hw
    half = dtype == "fp16"
    vae = half_copy(pipe.vae) if half else pipe.vae

    class Decoder(torch.nn.Module):  # float32 in and out; computes in the VAE's dtype
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latents):  # type: ignore[no-untyped-def]
            z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
            img = self.vae.decode(z, return_dict=False)[0]
            return (img / 2 + 0.5).clamp(0, 1).float()

    attends = bool(pipe.vae.config.get("mid_block_add_attention", True))
    chunks = chunks_for(lo * lo, hi * hi) if attends else 1

    def split_attention(graph: Any) -> None:
        found = chunk_attention(graph, chunks)
        if chunks > 1 and found != 1:  # the decoder has one attention (its mid block)
            raise HpedgeError(f"the exported VAE decoder has {found} attention chains of the form MatMul -> Softmax "
                              "-> MatMul where 1 was expected: this torch / diffusers exports its attention "
                              "differently, and a decode at large sizes would hold every score at once")

    c = vae.config.latent_channels
    args = (torch.randn(1, c, opt, opt),)
    axes = {"latents": {0: "batch", 2: "height", 3: "width"}, "image": {0: "batch", 2: "img_height", 3: "img_width"}}
    _export(Decoder().eval(), args, path, ["latents"], ["image"], axes, "legacy", edit=split_attention)
    return chunks
