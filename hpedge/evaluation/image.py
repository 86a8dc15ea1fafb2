"""PNG grids (numpy + Pillow only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_grid(canvases: list[np.ndarray] | np.ndarray, labels: list[str], path: Path, cols: int = 8, scale: int = 4,
              ) -> None:
    """A PNG grid of canvases with a caption under each (atomically written)."""
    from PIL import Image, ImageDraw

    n = len(canvases)
    rows = (n + cols - 1) // cols
    cell = 32 * scale
    cap = 22
    rgb = any(np.asarray(c).ndim == 3 for c in canvases)
    img = Image.new("RGB" if rgb else "L", (cols * cell, rows * (cell + cap)), "white")
    draw = ImageDraw.Draw(img)
    for i, (c, label) in enumerate(zip(canvases, labels)):
        r, k = divmod(i, cols)
        tile = Image.fromarray((np.clip(c, 0, 1) * 255).astype(np.uint8)).convert("RGB" if rgb else "L")
        tile = tile.resize((cell, cell), Image.NEAREST)
        img.paste(tile, (k * cell, r * (cell + cap)))
        draw.text((k * cell + 2, r * (cell + cap) + cell + 2), label[:24], fill="black")
    from hpedge.io import atomic_file

    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")
