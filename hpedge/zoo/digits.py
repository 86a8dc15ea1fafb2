"""The digits world: a GenEval-like prompt grammar rendered onto 32x32 canvases.

Everything here is numpy only; the handwritten digits come from scikit-learn's bundled
``load_digits`` (1797 images, 8x8). A *scene* is a list of ``(digit, slot, size)`` items. Slots are
``left``/``right`` halves or ``center``; sizes are ``small`` (8 px), ``medium`` (16 px), ``big`` (24 px).

Categories (each has training phrasings and held-out phrasings that reuse known words in new orders):
  single      one medium digit in the center         "a 7"
  position    one medium digit in one half           "a 7 on the left"
  two_digits  two different digits, left and right   "a 3 on the left and a 7 on the right"
  counting    the same digit twice                    "two 5s"
  size        one small or big digit in the center    "a small 4" / "a big 4"
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

CANVAS = 32
SIZES = {"small": 8, "medium": 16, "big": 24}
CATEGORIES = ("single", "position", "two_digits", "counting", "size")

# Phrasings: {d}, {a}, {b} are digits, {side} is left/right, {size} is small/big.
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "single": ("a {d}", "the digit {d}", "a handwritten {d}"),
    "position": ("a {d} on the {side}", "on the {side} a {d}"),
    "two_digits": ("a {a} on the left and a {b} on the right", "a {a} and a {b}"),
    "counting": ("two {d}s", "a {d} and a {d}"),
    "size": ("a {size} {d}", "the {size} digit {d}"),
}
HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "single": ("a handwritten digit {d}",),
    "position": ("the digit {d} on the {side}",),
    "two_digits": ("a {b} on the right and a {a} on the left",),
    "counting": ("two handwritten {d}s",),
    "size": ("a {size} handwritten {d}",),
}
VOCABULARY = sorted(
    {
        w
        for t in (*TRAIN_TEMPLATES.values(), *HELDOUT_TEMPLATES.values())
        for tmpl in t
        for w in tmpl.replace("{d}s", "{d} s").split()
        if not w.startswith("{")
    }
    | {"left", "right", "small", "big", "s"}
    | {str(d) for d in range(10)}
)


@dataclass(frozen=True)
class Item:
    digit: int
    slot: str  # "left" | "right" | "center"
    size: str  # "small" | "medium" | "big"


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str
    items: tuple[Item, ...]
    heldout: bool = False


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def digit_split(split: str) -> np.ndarray:
    """Indices of the bundled digits used for training (``train``) or judging (``test``)."""
    _, y = _digits()
    idx = np.arange(len(y))
    return idx[idx % 5 != 0] if split == "train" else idx[idx % 5 == 0]


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a square image (numpy only, deterministic)."""
    n = img.shape[0]
    pos = (np.arange(size) + 0.5) * n / size - 0.5
    pos = np.clip(pos, 0, n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = pos - lo
    rows = img[lo] * (1 - w)[:, None] + img[hi] * w[:, None]
    return rows[:, lo] * (1 - w)[None, :] + rows[:, hi] * w[None, :]


def _slot_center_x(slot: str) -> int:
    return {"left": 8, "right": 24, "center": 16}[slot]


def render(items: tuple[Item, ...], rng: np.random.Generator, split: str = "train") -> np.ndarray:
    """Render a scene as a float32 canvas in [0, 1], shape (32, 32)."""
    images, labels = _digits()
    pool = digit_split(split)
    canvas = np.zeros((CANVAS, CANVAS), np.float32)
    for it in items:
        candidates = pool[labels[pool] == it.digit]
        img = images[rng.choice(candidates)]
        s = SIZES[it.size]
        glyph = resize(img, s)
        jitter = 2 if s <= 16 else 1
        cx = _slot_center_x(it.slot) + int(rng.integers(-1, 2))
        cy = CANVAS // 2 + int(rng.integers(-jitter, jitter + 1))
        x0 = int(np.clip(cx - s // 2, 0, CANVAS - s))
        y0 = int(np.clip(cy - s // 2, 0, CANVAS - s))
        region = canvas[y0 : y0 + s, x0 : x0 + s]
        np.maximum(region, glyph, out=region)
    return canvas


def sample_prompt(rng: np.random.Generator, heldout: bool = False, category: str | None = None) -> Prompt:
    """Draw one prompt of the grammar (uniform over categories unless one is given)."""
    cat = category or CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    templates = (HELDOUT_TEMPLATES if heldout else TRAIN_TEMPLATES)[cat]
    tmpl = templates[int(rng.integers(len(templates)))]
    d = int(rng.integers(10))
    if cat == "single":
        items: tuple[Item, ...] = (Item(d, "center", "medium"),)
        text = tmpl.format(d=d)
    elif cat == "position":
        side = ("left", "right")[int(rng.integers(2))]
        items = (Item(d, side, "medium"),)
        text = tmpl.format(d=d, side=side)
    elif cat == "two_digits":
        a, b = (int(x) for x in rng.choice(10, size=2, replace=False))
        items = (Item(a, "left", "medium"), Item(b, "right", "medium"))
        text = tmpl.format(a=a, b=b)
    elif cat == "counting":
        items = (Item(d, "left", "medium"), Item(d, "right", "medium"))
        text = tmpl.format(d=d)
    elif cat == "size":
        size = ("small", "big")[int(rng.integers(2))]
        items = (Item(d, "center", size),)
        text = tmpl.format(d=d, size=size)
    else:  # pragma: no cover - guarded by CATEGORIES
        raise ValueError(f"unknown category {cat!r}")
    return Prompt(text=text, category=cat, items=items, heldout=heldout)


def eval_prompts(n_per_category: int, seed: int = 1234, heldout_fraction: float = 0.25) -> list[Prompt]:
    """A fixed, seeded evaluation prompt set: every category, a share of held-out phrasings."""
    rng = np.random.default_rng(seed)
    out: list[Prompt] = []
    for cat in CATEGORIES:
        n_held = int(round(n_per_category * heldout_fraction))
        for i in range(n_per_category):
            out.append(sample_prompt(rng, heldout=i < n_held, category=cat))
    return out
