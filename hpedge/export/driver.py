"""Stock diffusers driving a package's own graphs: the reference of the implementation gate.

The pipeline's own ``__call__`` (its scheduler and shift, guidance, CFG batches, latent packing, the VAE's scaling)
runs with its transformer and VAE decoder replaced by the package's ONNX graphs (the same INT4 weights the runtime
runs, through the runtime's own sessions), and with prompt embeddings from the package's text graphs fed token ids
from the pipeline's own tokenizers. Quantization error is then the same on both sides: the runtime's images must
match these to float rounding, and what is left to differ is the runtime's sampling code (hpedge's numpy
re-implementation of diffusers' loop), which is what :func:`hpedge.export.verify.implementation_check` judges.
The text graphs themselves are judged against diffusers' ``encode_prompt`` by the text check.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np

from hpedge.export.encoders import tokenize
from hpedge.models.sampling import Defaults, sample
from hpedge.runtime.package import Package


def _modules(pkg: Package, transformer_config: dict[str, Any], vae: Any) -> tuple[Any, Any]:
    """(transformer, VAE) stand-ins: ``torch.nn.Module`` s with the attributes diffusers' calls read."""
    import torch
    from diffusers.configuration_utils import FrozenDict

    class Graph(torch.nn.Module):
        def __init__(self, config: Any) -> None:
            super().__init__()
            self.config = config
            self.register_buffer("anchor", torch.zeros(0), persistent=False)  # device and dtype for diffusers

        @property
        def device(self) -> Any:
            return torch.device("cpu")

        @property
        def dtype(self) -> Any:
            return torch.float32

    class Transformer(Graph):
        def cache_context(self, name: str) -> Any:  # FLUX pipelines mark their cond / uncond passes
            return nullcontext()

        def forward(self, **kw: Any) -> tuple[Any]:
            feeds = {k: v.detach().float().cpu().numpy() for k, v in kw.items() if isinstance(v, torch.Tensor)}
            return (torch.from_numpy(pkg.run_graph("transformer", feeds)[0]),)

    class Decoder(Graph):
        def decode(self, z: Any, return_dict: bool = False) -> tuple[Any]:
            # the graph takes the sampler's latents and scales them itself: undo the pipeline's scaling first
            latents = (z.float() - (self.config.shift_factor or 0.0)) * self.config.scaling_factor
            img = pkg.run_graph("vae_decoder", {"latents": latents.cpu().numpy()})[0]
            return (torch.from_numpy(img) * 2 - 1,)

    return Transformer(FrozenDict(transformer_config)).eval(), Decoder(vae.config).eval()


@contextmanager
def _driven(pipe: Any, transformer: Any, vae: Any) -> Iterator[None]:
    kept = pipe.transformer, pipe.vae
    pipe.transformer, pipe.vae = transformer, vae
    try:
        yield
    finally:
        pipe.transformer, pipe.vae = kept


def embeddings(pipe: Any, pkg: Package, prompts: list[str], gen: Defaults) -> dict[str, Any]:
    """The call's ``*prompt_embeds`` from the package's text graphs, on the pipeline tokenizers' ids (negative
    prompts "" where the call guides with CFG, as the stock call and the runtime both default)."""
    import torch

    def encode(texts: list[str]) -> tuple[Any, Any]:
        pe, pooled = pkg.encode_ids(tokenize(pipe, texts, gen.max_sequence_length))
        return torch.from_numpy(pe), torch.from_numpy(pooled)

    out: dict[str, Any] = {}
    out["prompt_embeds"], out["pooled_prompt_embeds"] = encode(prompts)
    if gen.guidance_kind in ("cfg", "true_cfg") and gen.guidance > 1:
        out["negative_prompt_embeds"], out["negative_pooled_prompt_embeds"] = encode([""] * len(prompts))
    return out


def driven_images(pipe: Any, pkg: Package, transformer_config: dict[str, Any], prompts: list[str],
                  latents: np.ndarray, gen: Defaults) -> np.ndarray:
    """Stock diffusers' images over the package's graphs, one prompt at a time (as the end-to-end check runs the
    runtime), from initial noise ``latents`` (N, C, h, w); (N, H, W) for one channel, else (N, H, W, 3)."""
    import torch

    transformer, vae = _modules(pkg, transformer_config, pipe.vae)
    out = []
    with _driven(pipe, transformer, vae):
        for i, p in enumerate(prompts):
            img = sample(pipe, [p], gen, latents=torch.from_numpy(latents[i : i + 1]),
                         embeds=embeddings(pipe, pkg, [p], gen))
            out.append(img[..., 0] if img.shape[-1] == 1 else img)
    return np.concatenate(out)
