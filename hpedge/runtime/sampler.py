"""The sampler's tensor plumbing: prompt embeddings as ``encode_prompt`` combines them, FLUX's latent packing."""

from __future__ import annotations

import numpy as np

from hpedge.errors import HpedgeError


def combine_text(family: str, outs: dict[str, np.ndarray], t5_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_embeds, pooled) from the encoders' outputs, as ``encode_prompt`` builds them; ``t5_shape``
    (tokens, width) gives the zeros that stand for a dropped T5."""
    clip = outs.get("clip_embeds")
    batch = next(iter(outs.values())).shape[0]
    t5 = outs["t5_embeds"] if "t5_embeds" in outs else np.zeros((batch, *t5_shape), np.float32)
    if family == "sd3":
        if clip is None:
            raise HpedgeError("the package's SD3 text encoders give no clip_embeds (manifest components.text)",
                              HpedgeError.CHECK_FAILED)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        return np.concatenate([clip, t5], axis=1).astype(np.float32), outs["pooled"]
    return t5, outs["pooled"]


def pack(x: np.ndarray) -> np.ndarray:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: np.ndarray, h: int, w: int) -> np.ndarray:
    b, n, c4 = x.shape
    return x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def img_ids(h: int, w: int) -> np.ndarray:
    ids = np.zeros((h // 2, w // 2, 3), np.float32)
    ids[..., 1] = np.arange(h // 2)[:, None]
    ids[..., 2] = np.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)
