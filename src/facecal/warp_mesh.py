"""The landmark mesh, and the piecewise-affine warp of a photo at its own resolution (numpy).

The mesh: a face's 68 landmarks plus `frame_anchors` (fixed points on the frame's border, the
same in source and target, so the whole frame is covered and its border does not move),
triangulated once (`triangulate`, Delaunay). `facecal.warp` warps with it in torch (training,
evaluation, ONNX); `warp_region` here does the same for one photo with numpy and scipy only, so
that `facecal serve` — ONNX-only, no torch in the process — can return the uploaded photo at
its own resolution with the face moved to the calibrated landmarks.

Conventions (those of `geometry.warp_image`, i.e. PIL's): coordinates are continuous pixels,
pixel (row i, column j) covers [j, j+1) × [i, i+1) and its centre is (j + 0.5, i + 0.5).
Each output pixel takes the target triangle it lies in (the one whose smallest barycentric
coordinate is largest — also a deterministic choice where triangles fold) and samples the
source at the same barycentric position of the source triangle, bilinearly.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import map_coordinates
from scipy.spatial import Delaunay

ANCHORS_PER_SIDE = 4  # border segments per side: 4·4 = 16 anchor points


def frame_anchors(width: float, height: float, per_side: int = ANCHORS_PER_SIDE) -> np.ndarray:
    """Points evenly spaced on the frame's border (corners included), (4·per_side, 2)."""
    t = np.arange(per_side) / per_side
    top = np.stack([t * width, np.zeros(per_side)], 1)
    right = np.stack([np.full(per_side, width), t * height], 1)
    bottom = np.stack([width - t * width, np.full(per_side, height)], 1)
    left = np.stack([np.zeros(per_side), height - t * height], 1)
    return np.concatenate([top, right, bottom, left])


def triangulate(points: np.ndarray, width: float, height: float) -> np.ndarray:
    """Triangles (T, 3) of vertex indices into ``[points; frame_anchors]`` for a representative
    face's points (68, 2) in a width×height frame."""
    pts = np.asarray(points, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
        raise ValueError(f"triangulate: points must be finite (P, 2), got {pts.shape}")
    verts = np.concatenate([pts, frame_anchors(width, height)])
    tri = Delaunay(verts).simplices.astype(np.int64)
    # Drop slivers (collinear anchors along one border), which carry no pixels.
    a, b, c = verts[tri[:, 0]], verts[tri[:, 1]], verts[tri[:, 2]]
    area = 0.5 * np.abs((b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0])
    return tri[area > 1e-9 * width * height]


# Peak bytes per pixel of the face region `warp_region` holds: float32 source and output planes
# (12 + 12), the sampling coordinates (16), the best-score plane (8) and their flattened copies
# (16); the (chunk, T) temporaries of the fall-back are bounded separately by `REGION_CHUNK`.
REGION_BYTES_PER_PIXEL = 64
REGION_CHUNK = 4096


def source_points_np(
    src: np.ndarray, dst: np.ndarray, triangles: np.ndarray, query: np.ndarray
) -> np.ndarray:
    """Where the warp takes each query point (Q, 2) of the target frame from, for vertex sets
    `src`/`dst` (V, 2) (landmarks and anchors) and `triangles` (T, 3)."""
    a, b, c = dst[triangles[:, 0]], dst[triangles[:, 1]], dst[triangles[:, 2]]
    v0, v1 = b - a, c - a
    den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    den = np.where(np.abs(den) < 1e-6, 1e-6, den)  # a collapsed triangle contains no point
    v2x = query[:, 0:1] - a[None, :, 0]  # (Q, T)
    v2y = query[:, 1:2] - a[None, :, 1]
    l1 = (v2x * v1[None, :, 1] - v1[None, :, 0] * v2y) / den[None]
    l2 = (v0[None, :, 0] * v2y - v2x * v0[None, :, 1]) / den[None]
    l0 = 1.0 - l1 - l2
    k = np.minimum(np.minimum(l0, l1), l2).argmax(1)
    rows = np.arange(len(query))
    w0, w1, w2 = l0[rows, k, None], l1[rows, k, None], l2[rows, k, None]
    tri = triangles[k]
    return w0 * src[tri[:, 0]] + w1 * src[tri[:, 1]] + w2 * src[tri[:, 2]]


def pixel_sources(
    src: np.ndarray, dst: np.ndarray, triangles: np.ndarray, width: int, height: int
) -> np.ndarray:
    """`source_points_np` of every pixel centre of a width×height frame, (H, W, 2) — visiting
    each triangle's bounding box only (a pixel inside a triangle lies in its box), so the cost
    grows with the pixels, not pixels × triangles. Pixels inside no target triangle (where
    triangles fold) fall back to the full rule, so the result is the same as the full rule's."""
    best = np.full((height, width), -np.inf)
    out = np.zeros((height, width, 2))
    for ia, ib, ic in triangles:
        a, b, c = dst[ia], dst[ib], dst[ic]
        lo, hi = np.minimum(np.minimum(a, b), c), np.maximum(np.maximum(a, b), c)
        x0, y0 = max(0, int(np.floor(lo[0] - 0.5))), max(0, int(np.floor(lo[1] - 0.5)))
        x1, y1 = min(width, int(np.ceil(hi[0] + 0.5))), min(height, int(np.ceil(hi[1] + 0.5)))
        if x1 <= x0 or y1 <= y0:
            continue
        v0, v1 = b - a, c - a
        den = v0[0] * v1[1] - v1[0] * v0[1]
        den = den if abs(den) >= 1e-6 else 1e-6  # as source_points_np: a line holds no pixel
        px = np.arange(x0, x1) + 0.5 - a[0]
        py = (np.arange(y0, y1) + 0.5 - a[1])[:, None]
        l1 = (px * v1[1] - v1[0] * py) / den
        l2 = (v0[0] * py - px * v0[1]) / den
        l0 = 1.0 - l1 - l2
        score = np.minimum(np.minimum(l0, l1), l2)
        win = best[y0:y1, x0:x1]
        take = (score >= 0) & (score > win)
        if not take.any():
            continue
        win[take] = score[take]
        sa, sb, sc = src[ia], src[ib], src[ic]
        o = out[y0:y1, x0:x1]
        for k in range(2):
            o[..., k][take] = (l0 * sa[k] + l1 * sb[k] + l2 * sc[k])[take]
    hole = ~np.isfinite(best)
    if hole.any():
        ys, xs = np.nonzero(hole)
        q = np.stack([xs + 0.5, ys + 0.5], 1).astype(np.float64)
        for i in range(0, len(q), REGION_CHUNK):
            out[ys[i : i + REGION_CHUNK], xs[i : i + REGION_CHUNK]] = source_points_np(
                src, dst, triangles, q[i : i + REGION_CHUNK]
            )
    return out


def face_region(
    src: np.ndarray, dst: np.ndarray, width: int, height: int, margin: float = 0.3
) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1) a face warp changes: both point sets, grown by `margin` of the
    face's size on every side, within the image."""
    pts = np.concatenate([src, dst])
    lo, hi = pts.min(0), pts.max(0)
    pad = margin * float((hi - lo).max())
    x0, y0 = (int(max(0.0, np.floor(v - pad))) for v in lo)
    x1 = int(min(width, np.ceil(hi[0] + pad)))
    y1 = int(min(height, np.ceil(hi[1] + pad)))
    return x0, y0, x1, y1


def warp_region(
    image_u8: np.ndarray, src: np.ndarray, dst: np.ndarray, margin: float = 0.3
) -> np.ndarray:
    """A photo (H, W[, C] uint8) at its own resolution with the face's landmarks `src` moved to
    `dst` (68, 2, the photo's pixels), in place. Only `face_region` is resampled; its border is
    the mesh's fixed frame, so the warped face joins the untouched photo without a seam."""
    h, w = image_u8.shape[:2]
    x0, y0, x1, y1 = face_region(src, dst, w, h, margin)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return image_u8
    off = np.array([x0, y0], np.float64)
    rw, rh = x1 - x0, y1 - y0
    s = np.asarray(src, np.float64) - off
    d = np.asarray(dst, np.float64) - off
    tri = triangulate(s, rw, rh)
    anchors = frame_anchors(rw, rh)
    sv, dv = np.concatenate([s, anchors]), np.concatenate([d, anchors])
    coords = pixel_sources(sv, dv, tri, rw, rh).reshape(-1, 2)
    # Continuous pixels → array indices (centre of pixel j is j + 0.5); borders repeat.
    at = [coords[:, 1] - 0.5, coords[:, 0] - 0.5]
    sub = image_u8[y0:y1, x0:x1].reshape(rh, rw, -1)
    out = np.empty_like(sub)
    for ch in range(sub.shape[2]):
        plane = sub[..., ch].astype(np.float32)
        v = map_coordinates(plane, at, order=1, mode="nearest")
        out[..., ch] = np.clip(np.rint(v), 0, 255).reshape(rh, rw).astype(np.uint8)
    image_u8[y0:y1, x0:x1] = out.reshape(image_u8[y0:y1, x0:x1].shape)
    return image_u8
