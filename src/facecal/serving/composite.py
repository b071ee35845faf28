"""/v1/intensify output=photo for point archs (warp_refine): the generator's painted face and
mask, made in the S×S crop frame, composited over the full-resolution warp of the photo.

The warp (`warp_mesh.warp_region`) carries the photo's own pixels at its own resolution; the
generator adds what a warp cannot (mouth interior, wrinkles) where its mask says so. Per photo
pixel p of the face region, with q = the crop-frame position of p (the crop transform),
m_up(p) = mask(q) and painted_up(p) = painted(q) (bilinear):

    out = warped + w·(painted_up − warped),   w = (1 − m_up) · f_region · f_crop

i.e. out = m_up·warped + (1 − m_up)·painted_up away from the borders. ``f_region`` ramps from 0
at the face region's border to 1 (the region the warp changes: outside it the photo stays the
photo) and ``f_crop`` from 0 at the crop's border (outside the crop there is nothing painted), so
the painted face fades in without a seam. Numpy and scipy only: serving imports no torch.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import map_coordinates

# Width of the two ramps: this fraction of the region's shorter side, and of the crop's side.
FEATHER = 0.1
# Pixels per band: the region is composited in row bands so that the float temporaries stay
# a few MB whatever the region's size (within `REGION_BYTES_PER_PIXEL` of the warp before it).
BAND_PIXELS = 1 << 18


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    return np.clip(d / max(width, 1e-6), 0.0, 1.0)


def composite_photo(
    warped: np.ndarray,
    painted: np.ndarray,
    mask: np.ndarray,
    photo_to_crop: np.ndarray,
    region: tuple[int, int, int, int],
    feather: float = FEATHER,
) -> np.ndarray:
    """`warped` (H×W×3 uint8, the photo with its face warped to the target landmarks) with the
    generator's `painted` (S×S×3 float in [0, 1]) blended in through `mask` (S×S[×1] float in
    [0, 1]) inside `region` (x0, y0, x1, y1 of the photo), in place; returns `warped`.
    `photo_to_crop` (2×3) maps photo pixels to crop pixels (continuous coordinates, pixel
    centres at +0.5, as everywhere in facecal). Where the mask is 1 the warp stays as it was."""
    x0, y0, x1, y1 = (int(v) for v in region)
    h, w = warped.shape[:2]
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return warped
    s = painted.shape[0]
    if painted.shape != (s, s, 3) or mask.reshape(-1).size != s * s:
        raise ValueError(
            f"painted must be S×S×3 and mask S×S[×1], got {painted.shape}, {mask.shape}"
        )
    m = np.asarray(photo_to_crop, np.float64)
    planes = np.ascontiguousarray(np.moveaxis(np.asarray(painted, np.float32), -1, 0)) * 255.0
    alpha = np.asarray(mask, np.float32).reshape(s, s)
    width = feather * min(x1 - x0, y1 - y0)
    px = np.arange(x0, x1, dtype=np.float64) + 0.5
    f_x = _ramp(np.minimum(px - x0, x1 - px), width)
    rows = max(1, BAND_PIXELS // (x1 - x0))
    for b0 in range(y0, y1, rows):
        b1 = min(y1, b0 + rows)
        py = (np.arange(b0, b1, dtype=np.float64) + 0.5)[:, None]
        qx = m[0, 0] * px + m[0, 1] * py + m[0, 2]
        qy = m[1, 0] * px + m[1, 1] * py + m[1, 2]
        at = [qy - 0.5, qx - 0.5]  # continuous pixels → array indices
        # Outside the crop the mask reads 1: nothing painted there.
        m_up = map_coordinates(alpha, at, order=1, mode="constant", cval=1.0)
        f = (
            f_x[None, :]
            * _ramp(np.minimum(py - y0, y1 - py), width)
            * _ramp(np.minimum(np.minimum(qx, s - qx), np.minimum(qy, s - qy)), feather * s)
        )
        weight = ((1.0 - np.clip(m_up, 0.0, 1.0)) * f).astype(np.float32)
        band = warped[b0:b1, x0:x1]
        out = band.astype(np.float32)
        for c in range(3):
            up = map_coordinates(planes[c], at, order=1, mode="nearest")
            out[..., c] += weight * (up - out[..., c])
        band[...] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return warped
