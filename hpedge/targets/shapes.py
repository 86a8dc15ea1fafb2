"""The shapes a package covers on a profile: pixel resolutions and batch sizes (min, opt, max)."""

from __future__ import annotations

from typing import Any

from hpedge.models.families import family as family_facts
from hpedge.targets.profiles import Profile


def resolution_range(family: str, transformer_config: dict[str, Any], vae_scale_factor: int, profile: Profile,
                     marker: dict[str, Any]) -> tuple[int, int, int]:
    """Pixel resolutions (min, opt, max) the engine must cover: the profile's, within the model's limits."""
    vs = vae_scale_factor
    step = vs * 2
    cfg = transformer_config
    model_max = cfg["pos_embed_max_size"] * cfg["patch_size"] * vs if family == "sd3" else 1 << 14
    if "resolution" in marker:  # a small zoo model: around its native resolution
        r = int(marker["resolution"])
        lo, opt, hi = max(step, r // 2), r, r * 2
    else:
        lo, opt, hi = profile.resolution.min, profile.resolution.opt, profile.resolution.max
    hi = min(hi, model_max)
    lo, opt = min(lo, hi), min(opt, hi)
    snap = lambda v: max(step, v // step * step)  # noqa: E731
    return snap(lo), snap(opt), snap(hi)


def batch_range(profile: Profile, family: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(batch of prompts, batch of the transformer and text engines).

    SD3 pipelines sample with classifier-free guidance: the negative and the positive prompt run as one
    batch of twice the prompts, so their engines cover twice the profile's batch (opt and max); FLUX.1 has
    no CFG (FLUX.1-dev's guidance is an input of the transformer).
    """
    b = (profile.batch.min, profile.batch.opt, profile.batch.max)
    if family_facts(family).cfg_batch:
        return b, (b[0], 2 * b[1], 2 * b[2])
    return b, b
