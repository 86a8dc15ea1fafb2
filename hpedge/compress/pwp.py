"""Positional Weight Preservation and Sensitivity-Guided Distillation: which kept blocks learn, and how fast.

PWP freezes every kept block before the first removed position (and the input embedders): on unless given,
except for a cut that leaves no kept block after the first removed position (PWP would freeze them all), which
is distilled without it; :func:`resolve_pwp` is the one place that decides, for ``compress`` and ``plan`` alike.
SGDistill gives each trainable block an update weight that decreases with its sensitivity
(:func:`update_weights`; the rule is in :mod:`hpedge.compress.distill`'s docstring).
"""

from __future__ import annotations

import numpy as np

from hpedge.compress.settings import DistillSettings
from hpedge.errors import HpedgeError

# Below this many trainable kept blocks per removed block, PWP is kept (the paper's method, and what keeps a
# real model's distillation in memory) but `hpedge compress` says what the compression curve measured there.
PWP_FEW_TRAINABLE_PER_REMOVED = 0.5


def resolve_pwp(remove: list[int], num_blocks: int, s: DistillSettings) -> tuple[bool, str]:
    """Whether PWP is used for this cut, and a one-line reason (printed by ``hpedge compress`` and ``hpedge plan``
    and kept in the report).

    ``s.pwp`` True or False is used as given, except that an explicit ``--pwp`` on a cut that leaves no kept block
    after it is refused (:class:`HpedgeError`) where anything is distilled: only the output layers (norm_out,
    proj_out) would learn, and the run would cost its full time for the truncated teacher with a retuned head. None is hpedge's default: PWP on, except for a cut that leaves no
    kept block after the first removed position (PWP would freeze every kept block; distilled without it). PWP
    freezes the kept blocks before the first removed position, so only the kept blocks after it learn to make
    up for the removed ones; when fewer than one is left per two removed, the message says what the compression
    curve measured (benchmarks/results/curve-sd3.md: 2 trainable blocks for 6 removed scored 74.5 % of the
    teacher with PWP, 85.7 % without). PWP stays on there because turning it off trains every kept block: at
    SD3.5 Large's reference cut, 452 GB per GPU instead of 53 GB (``hpedge plan --distill``)."""
    first = min(remove) if remove else num_blocks
    frozen = [b for b in range(first) if b not in remove]
    trainable = [b for b in range(first, num_blocks) if b not in remove]
    span = f"kept blocks 0-{first - 1}" if frozen else "no kept block"
    counts = f"{len(trainable)} kept block(s) after the first removed block {first} train for {len(remove)} removed"
    few = ("; fewer than one per two removed: on the compression curve such cuts distilled better with --no-pwp, "
           "which trains every kept block (see hpedge plan --distill --no-pwp for its memory)"
           if trainable and len(trainable) < PWP_FEW_TRAINABLE_PER_REMOVED * len(remove) else "")
    if s.pwp is False:
        return False, "PWP off (--no-pwp)"
    if s.pwp is True:
        if remove and not trainable and s.steps:
            raise HpedgeError(
                f"PWP would freeze every kept block: the cut removes the last {len(remove)} blocks ({min(remove)}-{num_blocks - 1}), "
                "so no kept block sits after the first removed position and only the output layers would be distilled; "
                "pass --no-pwp or leave PWP to hpedge's default (SGDistill still scales each block's updates by its "
                "sensitivity), or choose a cut that keeps a later block (--remove-blocks); with the same OUT add --resume "
                "to reuse the contribution analysis")
        return True, f"PWP on (--pwp): freezes {span}; {counts}{few}"
    if not trainable and remove:
        return False, (f"PWP off (hpedge's default for this cut): it would freeze every kept block (0-{first - 1}), the cut "
                       f"removes the last blocks; every kept block is distilled (--pwp refuses such a cut)")
    return True, f"PWP on (hpedge's default): freezes {span}; {counts}{few}"


def update_weights(kept: list[int], first_removed: int, harm: dict[int, float] | None, s: DistillSettings
                   ) -> dict[int, float]:
    """Per kept block (original index): its update weight in [0, 1] (0 = frozen). ``s.pwp`` must be resolved."""
    if s.pwp is None:
        raise ValueError("update_weights needs PWP resolved to True or False (resolve_pwp)")
    weights = {b: 1.0 for b in kept}
    if s.pwp:
        for b in kept:
            if b < first_removed:
                weights[b] = 0.0
    trainable = [b for b in kept if weights[b] > 0]
    if s.sgd == "off" or not trainable:
        return weights
    if harm is None:
        raise HpedgeError("SGDistill needs block sensitivities: provide an importance table or pass --sgd off")
    vals = np.array([harm.get(b, 0.0) for b in trainable])
    if s.sgd == "continuous":
        scale = max([*harm.values(), 0.0])  # the model's largest block harm
        norm = np.clip(vals / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(vals)
        for b, v in zip(trainable, norm):
            weights[b] = s.sgd_min_weight + (1 - s.sgd_min_weight) * (1 - float(v))
    elif s.sgd == "binary":
        order = np.argsort(-vals)
        for rank, j in enumerate(order):
            weights[trainable[j]] = 0.0 if rank < len(trainable) // 2 else 1.0
    else:
        raise HpedgeError(f"unknown --sgd mode {s.sgd!r} (continuous, binary, off)")
    return weights
