"""The stock pipelines' flow-matching Euler schedule and initial noise, in numpy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hpedge.errors import HpedgeError


def initial_latents(n: int, seed: int, channels: int, height: int, width: int) -> np.ndarray:
    """Seeded N(0, 1) initial noise (n, channels, height, width) in latent pixels, as every hpedge runtime draws it."""
    return np.random.default_rng(seed).standard_normal((n, channels, height, width)).astype(np.float32)


def _shift(cfg: dict[str, Any], s: np.ndarray, mu: float | None) -> np.ndarray:
    """The scheduler's static or resolution-dependent (dynamic) shift of sigmas ``s``."""
    if cfg.get("use_dynamic_shifting"):
        if cfg.get("time_shift_type", "exponential") == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / s - 1))  # type: ignore[arg-type, no-any-return]
        return mu / (mu + (1 / s - 1))  # type: ignore[no-any-return, operator]
    shift = float(cfg.get("shift", 1.0))
    return shift * s / (1 + (shift - 1) * s)  # type: ignore[no-any-return]


def calculate_shift(cfg: dict[str, Any], image_seq_len: int, default_max_shift: float = 1.15) -> float:
    """mu of dynamic shifting, linear in the image token count (the pipelines' ``calculate_shift``)."""
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", default_max_shift)
    m = (max_shift - base_shift) / (max_len - base_len)
    return float(image_seq_len * m + base_shift - m * base_len)


def sigmas(family: str, steps: int, scheduler: dict[str, Any] | None = None, image_seq_len: int = 0) -> np.ndarray:
    """The noise levels of the stock pipeline's flow-matching Euler schedule, final 0 appended (float32).

    The same arithmetic as diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` as the
    pipelines call it: SD3 spaces timesteps between the scheduler's own (shifted) extremes and shifts
    again; FLUX passes ``linspace(1, 1/steps)`` and a ``mu`` from the image token count. ``scheduler`` is
    the package's scheduler config (shift 1, no dynamic shifting when omitted).
    """
    if steps < 1:
        raise HpedgeError("--steps must be at least 1")
    cfg = scheduler or {}
    n_train = int(cfg.get("num_train_timesteps", 1000))
    dynamic = bool(cfg.get("use_dynamic_shifting"))
    mu = None
    if family == "sd3":
        train = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1] / np.float32(n_train)
        if not dynamic:
            train = _shift(cfg, train, None).astype(np.float32)
        else:
            mu = calculate_shift(cfg, image_seq_len, default_max_shift=1.16)
        t = np.linspace(float(train[0]) * n_train, float(train[-1]) * n_train, steps)
        s = t / n_train
    else:
        s = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
        mu = calculate_shift(cfg, image_seq_len)
    s = _shift(cfg, s, mu)
    if cfg.get("shift_terminal"):
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - cfg["shift_terminal"]))
    return np.append(np.asarray(s, dtype=np.float32), np.float32(0.0))
