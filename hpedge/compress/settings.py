"""The distillation's settings (``hpedge compress``'s options), shared by the distiller, PWP and SGDistill."""

from __future__ import annotations

from dataclasses import dataclass

from hpedge.errors import HpedgeError


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

    def check(self) -> None:
        """Every number in range and every choice known, before any long step (one line each)."""
        for name, v, lo in (("steps", self.steps, 0), ("batch-size", self.batch_size, 1), ("pool-size", self.pool_size, 1),
                            ("checkpoint-every", self.checkpoint_every, 1), ("keep-checkpoints", self.keep_checkpoints, 1),
                            ("pool-steps", self.pool_steps, 1)):
            if v is not None and v < lo:
                raise HpedgeError(f"--{name} must be at least {lo}, got {v}")
        for name, f in (("lr", self.lr), ("lambda-out", self.lambda_out)):
            if not f > 0:
                raise HpedgeError(f"--{name} must be positive, got {f}")
        if not self.lambda_feat >= 0:
            raise HpedgeError(f"--lambda-feat must not be negative, got {self.lambda_feat}")
        if not 0 <= self.sgd_min_weight <= 1:
            raise HpedgeError(f"--sgd-min-weight must be in [0, 1], got {self.sgd_min_weight}")
        if self.sgd not in ("continuous", "binary", "off"):
            raise HpedgeError(f"--sgd must be continuous, binary or off, got {self.sgd!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise HpedgeError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
