"""Picture helpers of the stages' plots: colours, points drawn on a face, grids of tiles."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GREEN, RED, BLUE, YELLOW = (0, 200, 0), (230, 0, 0), (0, 80, 255), (255, 200, 0)


TILE = 224


def draw_points(
    image: np.ndarray,
    layers: list[tuple[np.ndarray | None, tuple[int, int, int]]],
    size: int = TILE,
    box: list[float] | None = None,
    caption: str = "",
) -> np.ndarray:
    """`image` (grey or RGB) scaled to fit size×size with point sets drawn in colours, and a
    caption strip underneath. Points are in the image's own pixel coordinates."""
    im = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    k = size / max(im.size)
    im = im.resize(
        (max(1, round(im.width * k)), max(1, round(im.height * k))), Image.Resampling.BILINEAR
    )
    canvas = Image.new("RGB", (size, size + 14), (255, 255, 255))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    off = np.array([(size - im.width) // 2, (size - im.height) // 2], dtype=np.float64)
    draw = ImageDraw.Draw(canvas)
    if box is not None:
        x0, y0, x1, y1 = (np.asarray(box, dtype=np.float64).reshape(2, 2) * k + off).ravel()
        draw.rectangle([x0, y0, x1, y1], outline=YELLOW)
    r = max(1.5, size / 150)
    for pts, colour in layers:
        if pts is None:
            continue
        for x, y in (np.asarray(pts, dtype=np.float64) + 0.5) * k + off:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    if caption:
        draw.text((2, size + 1), caption[:40], fill=(0, 0, 0), font=ImageFont.load_default())
    return np.asarray(canvas)


def grid(tiles: list[np.ndarray], columns: int = 4, pad: int = 4) -> np.ndarray:
    if not tiles:
        return np.full((8, 8, 3), 255, np.uint8)
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y : y + t.shape[0], x : x + t.shape[1]] = t
    return out


def evenly(indices: np.ndarray, k: int) -> list[int]:
    """Up to k of `indices`, evenly spread (deterministic, covers the whole range)."""
    if k <= 0 or len(indices) == 0:
        return []
    if len(indices) <= k:
        return [int(i) for i in indices]
    pick = np.unique(np.linspace(0, len(indices) - 1, k).round().astype(int))
    return [int(indices[i]) for i in pick]
