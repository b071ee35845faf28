"""Landmark images: what the generator sees instead of a face.

``dots`` reproduces the original (small blue dots on white, no lines); ``edges`` draws each
facial part as a coloured polyline (vid2vid-style), which carries the shape of the mouth and
eyes far better at 64². Drawn at 4× and box-filtered down, so equal points give equal pixels.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from facecal.geometry import CLOSED_PARTS, N_POINTS, PARTS

Style = Literal["dots", "edges"]
STYLES = ("dots", "edges")
_SUPERSAMPLE = 4
DOT_COLOUR = (0, 0, 255)
PART_COLOURS = {
    "jaw": (40, 40, 40),
    "right_brow": (170, 60, 0),
    "left_brow": (170, 60, 0),
    "nose_bridge": (0, 120, 0),
    "nose_base": (0, 120, 0),
    "right_eye": (0, 0, 220),
    "left_eye": (0, 0, 220),
    "outer_lip": (200, 0, 0),
    "inner_lip": (200, 0, 140),
}


def render_landmarks(points: np.ndarray, size: int, style: Style = "dots") -> np.ndarray:
    """Draw 68 points given in pixel coordinates of a size×size image. → uint8 (size, size, 3)."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape != (N_POINTS, 2):
        raise ValueError(f"expected ({N_POINTS}, 2) points, got {pts.shape}")
    if style not in STYLES:
        raise ValueError(f"unknown landmark style {style!r}; expected one of {STYLES}")
    big = size * _SUPERSAMPLE
    im = Image.new("RGB", (big, big), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    # Pixel centres: point (x, y) covers supersampled pixels around (x+0.5)·k − 0.5.
    p = (pts + 0.5) * _SUPERSAMPLE - 0.5
    if style == "dots":
        r = max(1.0, size / 64.0) * _SUPERSAMPLE * 0.75
        for x, y in p:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=DOT_COLOUR)
    else:
        width = max(1, round(size / 64.0 * _SUPERSAMPLE))
        for name, idx in PARTS.items():
            seq = [tuple(p[i]) for i in idx]
            if name in CLOSED_PARTS:
                seq.append(seq[0])
            draw.line(seq, fill=PART_COLOURS[name], width=width, joint="curve")
    small = im.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small)


def render_batch(points: np.ndarray, size: int, style: Style = "dots") -> np.ndarray:
    """(N, 68, 2) → uint8 (N, size, size, 3)."""
    return (
        np.stack([render_landmarks(p, size, style) for p in points])
        if len(points)
        else np.zeros((0, size, size, 3), np.uint8)
    )
