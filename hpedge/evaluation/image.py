"""PNG grids (numpy + Pillow only)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from hpedge.io import atomic_file

CHAR_PX = 6  # width of a character of Pillow's default bitmap font
LINE_PX = 11


def save_grid(canvases: list[np.ndarray | None] | np.ndarray, labels: list[str], path: Path, cols: int = 8, scale: int = 4,
              ) -> None:
    """A PNG grid of canvases with a caption under each (atomically written).

    A ``None`` canvas leaves its cell blank (so callers can keep rows aligned); captions are wrapped to the
    cell's width, never cut, and every row is as tall as its longest caption.
    """
    from PIL import Image, ImageDraw

    n = len(canvases)
    rows = (n + cols - 1) // cols
    cell = 32 * scale
    width_chars = max(8, (cell - 4) // CHAR_PX)
    wrapped = [textwrap.wrap(label, width_chars, break_long_words=True) or [""] for label in labels]
    caps = [max((len(w) for w in wrapped[r * cols:(r + 1) * cols]), default=1) * LINE_PX + 6 for r in range(rows)]
    tops = [sum(cell + c for c in caps[:r]) for r in range(rows)]
    rgb = any(c is not None and np.asarray(c).ndim == 3 for c in canvases)
    img = Image.new("RGB" if rgb else "L", (cols * cell, sum(cell + c for c in caps)), "white")
    draw = ImageDraw.Draw(img)
    for i, (c, lines) in enumerate(zip(canvases, wrapped)):
        r, k = divmod(i, cols)
        if c is None:
            continue
        tile = Image.fromarray((np.clip(c, 0, 1) * 255).astype(np.uint8)).convert("RGB" if rgb else "L")
        tile = tile.resize((cell, cell), Image.LANCZOS if tile.width > cell else Image.NEAREST)
        img.paste(tile, (k * cell, tops[r]))
        for j, line in enumerate(lines):
            draw.text((k * cell + 2, tops[r] + cell + 2 + j * LINE_PX), line, fill="black")

    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")


def save_image(image: np.ndarray, path: Path) -> None:
    """One image (H, W) or (H, W, C) in [0, 1] as a PNG at its own size (atomically written)."""
    from PIL import Image

    a = (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    with atomic_file(Path(path)) as tmp:
        Image.fromarray(a).save(tmp, format="PNG")
