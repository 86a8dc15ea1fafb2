"""The distillation's settings (``hpedge compress``'s options), shared by the distiller, PWP and SGDistill."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistillSettings:
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-4
    lambda_out: float = 1.0
    lambda_feat: float = 0.1
    weighting: str = "logit_normal"  # SD3 density / weighting scheme
    sgd: str = "continuous"  # continuous | binary | off
    sgd_min_weight: float = 0.1
    pwp: bool | None = None  # True / False as given (--pwp / --no-pwp); None: hpedge's default (resolve_pwp)
    pool_size: int = 256
    pool_steps: int | None = None  # None: the model's default steps
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    data_dir: str | None = None
    replay_frozen_prefix: bool = True  # under PWP: feed the student the teacher's prefix outputs (see _replaying)
