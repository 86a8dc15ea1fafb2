"""What differs between the two transformer families, as data: every ``if family ==`` that is a fact, not code.

The code that differs (how each family's transformer is called, its blocks and sub-components, its text
encoding) lives in one adapter per concern in :mod:`hpedge.models` (``denoise``, ``adapters``); the facts below
are read where a shape, a scale or a rule depends on the family.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpedge.errors import HpedgeError


@dataclass(frozen=True)
class Family:
    name: str
    latent_packing: int  # latent channels per transformer input channel group: FLUX packs 2x2 patches (x4)
    clip_tokens: int  # CLIP tokens in the joint text sequence before T5's (SD3: 77; FLUX: CLIP gives the pooled vector only)
    cfg_batch: bool  # the pipeline runs negative and positive prompts as one batch (classifier-free guidance)
    timestep_scale: float  # the transformer's timestep input per unit of sigma
    t5_attribute: str  # the pipeline attribute that holds T5
    final_block_fixed: bool  # the last block is context_pre_only and cannot be removed
    t5_optional: bool  # the pipeline runs without T5 (zeros in its place)
    position_ids: bool  # the transformer takes img_ids / txt_ids (rotary positions)
    default_guidance_kind: str  # the runtime's guidance when a package does not say


FAMILIES = {
    "sd3": Family("sd3", latent_packing=1, clip_tokens=77, cfg_batch=True, timestep_scale=1000.0,
                  t5_attribute="text_encoder_3", final_block_fixed=True, t5_optional=True, position_ids=False,
                  default_guidance_kind="cfg"),
    "flux": Family("flux", latent_packing=4, clip_tokens=0, cfg_batch=False, timestep_scale=1.0,
                   t5_attribute="text_encoder_2", final_block_fixed=False, t5_optional=False, position_ids=True,
                   default_guidance_kind="true_cfg"),
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise HpedgeError(f"unknown transformer family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]
