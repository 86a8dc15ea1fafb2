"""The judge: a digit classifier trained by the project, and the checks it applies to a canvas.

Crops are found the same way for training and judging: inside a region (a half of the canvas, or the
whole canvas), pixels brighter than ``INK`` form the digit; their bounding box, padded to a square, is
resized to 16x16 and classified. A region with less ink than ``MIN_INK`` counts as empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpedge.zoo.digits import CANVAS, Item, Prompt, resize

INK = 0.3
MIN_INK = 4.0
CROP = 16
SMALL_MAX_HEIGHT = 11
BIG_MIN_HEIGHT = 18
REGIONS = {"left": (0, CANVAS // 2), "right": (CANVAS // 2, CANVAS), "center": (0, CANVAS)}


def region(canvas: np.ndarray, slot: str) -> np.ndarray:
    x0, x1 = REGIONS[slot]
    return canvas[:, x0:x1]


def ink_mass(area: np.ndarray) -> float:
    return float(area[area > INK].sum())


def bbox(area: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(area > INK)
    if len(ys) == 0:
        return None
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def crop(area: np.ndarray) -> np.ndarray:
    """The ink's bounding box, padded to a square with a 1-px margin, resized to 16x16."""
    box = bbox(area)
    if box is None:
        return np.zeros((CROP, CROP), np.float32)
    y0, y1, x0, x1 = box
    side = max(y1 - y0, x1 - x0) + 2
    sq = np.zeros((side, side), np.float32)
    h, w = y1 - y0, x1 - x0
    oy, ox = (side - h) // 2, (side - w) // 2
    sq[oy : oy + h, ox : ox + w] = area[y0:y1, x0:x1]
    return resize(sq, CROP).astype(np.float32)


def half_crops(canvas: np.ndarray) -> np.ndarray:
    """Fixed left and right halves resized to 16x16 (the Frechet distance's view of a canvas)."""
    return np.stack([_square_half(canvas, s) for s in ("left", "right")])


def _square_half(canvas: np.ndarray, slot: str) -> np.ndarray:
    x0, x1 = REGIONS[slot]
    return canvas[8:24, x0:x1]


def expected_checks(prompt: Prompt) -> list[tuple[str, Item | None]]:
    """(region, item) pairs to verify: item None means the region must be empty."""
    slots = {it.slot for it in prompt.items}
    checks: list[tuple[str, Item | None]] = [(it.slot, it) for it in prompt.items]
    if slots == {"left"}:
        checks.append(("right", None))
    if slots == {"right"}:
        checks.append(("left", None))
    return checks


@dataclass
class Verdict:
    correct: bool
    reason: str


def classifier_model():  # -> torch.nn.Module
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


class Judge:
    """Classifies crops and judges whole canvases against their prompts."""

    def __init__(self, weights_path: str) -> None:
        import torch
        from safetensors.torch import load_file

        self.model = classifier_model()
        self.model.load_state_dict(load_file(weights_path))
        self.model.eval()
        self._torch = torch

    def _run(self, crops: np.ndarray):
        torch = self._torch
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))[:, None]
            feats = self.model[:-1](x)
            logits = self.model[-1](feats)
        return logits.argmax(-1).numpy(), feats.numpy()

    def classify(self, crops: np.ndarray) -> np.ndarray:
        return self._run(crops)[0]

    def features(self, canvases: np.ndarray) -> np.ndarray:
        """64-d features per canvas: the classifier's penultimate layer on both halves."""
        halves = np.stack([half_crops(c) for c in canvases])  # (N, 2, 16, 16)
        _, f = self._run(halves.reshape(-1, CROP, CROP))
        return f.reshape(len(canvases), -1)

    def judge(self, canvases: np.ndarray, prompts: list[Prompt]) -> list[Verdict]:
        jobs: list[tuple[int, np.ndarray]] = []
        verdicts: list[Verdict | None] = [None] * len(prompts)
        plans = []
        for i, (canvas, p) in enumerate(zip(canvases, prompts)):
            plan = []
            for slot, item in expected_checks(p):
                area = region(canvas, slot)
                if item is None:
                    if ink_mass(area) >= MIN_INK:
                        verdicts[i] = Verdict(False, f"{slot} should be empty")
                    continue
                if ink_mass(area) < MIN_INK:
                    verdicts[i] = Verdict(False, f"no digit on the {slot}")
                    continue
                if item.size != "medium":
                    box = bbox(area)
                    h = 0 if box is None else box[1] - box[0]
                    if item.size == "small" and h > SMALL_MAX_HEIGHT:
                        verdicts[i] = Verdict(False, f"digit too big for 'small' ({h}px)")
                    if item.size == "big" and h < BIG_MIN_HEIGHT:
                        verdicts[i] = Verdict(False, f"digit too small for 'big' ({h}px)")
                plan.append((len(jobs), item))
                jobs.append((i, crop(area)))
            plans.append(plan)
        preds = self.classify(np.stack([c for _, c in jobs])) if jobs else np.zeros(0, int)
        for i, plan in enumerate(plans):
            if verdicts[i] is not None:
                continue
            wrong = [f"{it.slot}: saw {preds[j]}, wanted {it.digit}" for j, it in plan if preds[j] != it.digit]
            verdicts[i] = Verdict(not wrong, "; ".join(wrong) or "ok")
        return [v for v in verdicts if v is not None]
