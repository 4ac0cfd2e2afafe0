"""Contact sheets: rows of images (prompts x samples) in one JPEG, for people to look at."""
from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw


def image_grid(rows: Sequence[Sequence[Image.Image | None]], cell: int = 160,
               labels: Sequence[str] | None = None, label_width: int = 48) -> Image.Image:
    """One row per entry of `rows`, each image resized to `cell` pixels square; None leaves a blank cell.
    With `labels`, each row starts with its label."""
    columns = max((len(row) for row in rows), default=0)
    left = label_width if labels is not None else 0
    grid = Image.new("RGB", (left + columns * cell, max(1, len(rows)) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        if labels is not None:
            draw.text((6, r * cell + cell // 2 - 6), str(labels[r]), fill="black")
        for c, image in enumerate(row):
            if image is not None:
                grid.paste(image.convert("RGB").resize((cell, cell), Image.BICUBIC), (left + c * cell, r * cell))
    return grid
