"""Piecewise-affine warp of a face image from its landmarks to target landmarks (torch).

Most of an expression change is geometry: brows rise, lip corners move. Moving the person's own
pixels along with their landmarks keeps identity and sharpness exactly, which a generator drawing
the face from scratch cannot; a refining network then only paints what a warp cannot (mouth
interior, wrinkles). This module is the geometry half, written with plain tensor ops and
`grid_sample` so that it runs inside an exported ONNX generator as well.

Conventions (those of `geometry.warp_image`, i.e. PIL's): coordinates are continuous pixels,
pixel (row i, column j) covers [j, j+1) × [i, i+1) and its centre is (j + 0.5, i + 0.5).

The mesh: the 68 landmarks plus `frame_anchors` (fixed points on the image border, the same in
source and target, so the whole frame is covered and the border does not move), triangulated
once (`triangulate`, Delaunay on a representative face) so that every face uses the same
triangles. Each output pixel takes the target triangle it lies in (the one whose smallest
barycentric coordinate is largest, which is also a deterministic choice where triangles fold)
and samples the source image at the same barycentric position of the source triangle.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from facecal.warp_mesh import frame_anchors, triangulate


def _with_anchors(points: torch.Tensor, width: int, height: int) -> torch.Tensor:
    anchors = torch.as_tensor(
        frame_anchors(width, height), dtype=points.dtype, device=points.device
    )
    return torch.cat([points, anchors.expand(points.shape[0], -1, -1)], 1)


def _barycentric(
    d: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor, ic: torch.Tensor, query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Barycentric coordinates (l0, l1, l2) of `query` (N, Q, 2) in the target triangles
    (ia, ib, ic) of the anchored points `d` (N, P, 2): (N, Q, T) for vertex indices (T,), or
    (N, Q) for per-query indices (N, Q) — the same arithmetic either way, element by element."""
    if ia.dim() == 1:
        a, b, c = d[:, None, ia], d[:, None, ib], d[:, None, ic]  # (N, 1, T, 2)
        qx, qy = query[..., 0:1], query[..., 1:2]  # (N, Q, 1)
    else:
        n_idx = torch.arange(d.shape[0], device=d.device).view(-1, 1)
        a, b, c = d[n_idx, ia], d[n_idx, ib], d[n_idx, ic]  # (N, Q, 2)
        qx, qy = query[..., 0], query[..., 1]
    v0, v1 = b - a, c - a
    den = v0[..., 0] * v1[..., 1] - v1[..., 0] * v0[..., 1]
    # A triangle collapsed to a line contains no point; keep its division finite.
    den = torch.where(den.abs() < 1e-6, torch.full_like(den, 1e-6), den)
    v2x, v2y = qx - a[..., 0], qy - a[..., 1]
    l1 = (v2x * v1[..., 1] - v1[..., 0] * v2y) / den
    l2 = (v0[..., 0] * v2y - v2x * v0[..., 1]) / den
    return 1.0 - l1 - l2, l1, l2


def source_points(
    src: torch.Tensor,
    dst: torch.Tensor,
    triangles: torch.Tensor,
    query: torch.Tensor,
    width: int,
    height: int,
    choice: torch.Tensor | None = None,
) -> torch.Tensor:
    """Where the warp takes each query point (N, Q, 2) of the output frame from: its position in
    the source frame, for landmarks `src`/`dst` (N, P, 2) of a width×height frame. `choice`
    (N, Q), if given, is each query's triangle (`triangle_choice`): only that one is evaluated,
    with the same result."""
    s = _with_anchors(src, width, height)
    d = _with_anchors(dst, width, height)
    if choice is None:
        choice = _choose(d, triangles, query)
    k = choice.long()
    ia, ib, ic = triangles[k, 0], triangles[k, 1], triangles[k, 2]  # (N, Q)
    w0, w1, w2 = _barycentric(d, ia, ib, ic, query)
    n_idx = torch.arange(src.shape[0], device=src.device).view(-1, 1)
    sa, sb, sc = s[n_idx, ia], s[n_idx, ib], s[n_idx, ic]  # (N, Q, 2)
    return w0[..., None] * sa + w1[..., None] * sb + w2[..., None] * sc


def _choose(d: torch.Tensor, triangles: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """(N, Q) index of the target triangle of each query: the one whose smallest barycentric
    coordinate is largest (inside it, or the nearest where none contains it)."""
    l0, l1, l2 = _barycentric(d, triangles[:, 0], triangles[:, 1], triangles[:, 2], query)
    return torch.minimum(torch.minimum(l0, l1), l2).argmax(-1)


def _pixel_centres(n: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    ys = torch.arange(height, dtype=like.dtype, device=like.device) + 0.5
    xs = torch.arange(width, dtype=like.dtype, device=like.device) + 0.5
    px = xs.view(1, width).expand(height, width).reshape(1, -1)
    py = ys.view(height, 1).expand(height, width).reshape(1, -1)
    return torch.stack([px, py], -1).expand(n, -1, -1)


def triangle_choice(
    dst: torch.Tensor, triangles: torch.Tensor, height: int, width: int, chunk: int = 256
) -> torch.Tensor:
    """(N, H, W) uint8/int16 target triangle of every pixel centre for target landmarks `dst`.

    It depends on the target points only, and finding it is most of a warp's cost (every pixel
    against every triangle): training pairs have fixed targets, so `gan.train` finds it once
    per pair and its steps evaluate one triangle per pixel (`warp(..., choice=)`). `chunk`
    pixels at a time: (N, chunk, T) temporaries that stay in cache run several times faster."""
    d = _with_anchors(dst, width, height)
    query = _pixel_centres(dst.shape[0], height, width, dst)
    dtype = torch.uint8 if len(triangles) <= 256 else torch.int16
    parts = [
        _choose(d, triangles, query[:, i : i + chunk]).to(dtype)
        for i in range(0, query.shape[1], chunk)
    ]
    return torch.cat(parts, 1).view(dst.shape[0], height, width)


def sampling_grid(
    src: torch.Tensor,
    dst: torch.Tensor,
    triangles: torch.Tensor,
    height: int,
    width: int,
    chunk: int = 0,
    choice: torch.Tensor | None = None,
) -> torch.Tensor:
    """Source coordinates (N, H, W, 2) of every output pixel centre (`source_points` on the
    pixel grid; source and output frames of the same size), `chunk` pixels at a time if set;
    `choice` (N, H, W): the pixels' triangles, if known (`triangle_choice`)."""
    query = _pixel_centres(src.shape[0], height, width, src)
    flat = choice.reshape(src.shape[0], -1) if choice is not None else None
    if chunk and query.shape[1] > chunk:  # bounded memory: (N, chunk, T) temporaries
        parts = [
            source_points(
                src,
                dst,
                triangles,
                query[:, i : i + chunk],
                width,
                height,
                flat[:, i : i + chunk] if flat is not None else None,
            )
            for i in range(0, query.shape[1], chunk)
        ]
        grid = torch.cat(parts, 1)
    else:
        grid = source_points(src, dst, triangles, query, width, height, flat)
    return grid.view(src.shape[0], height, width, 2)


def warp(
    image: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    triangles: torch.Tensor,
    chunk: int = 0,
    choice: torch.Tensor | None = None,
) -> torch.Tensor:
    """`image` (N, C, H, W) with landmarks `src` moved so that they sit at `dst` (N, P, 2),
    bilinear; pixels sampled outside the source frame repeat its border. `choice`: see
    `triangle_choice`."""
    n, _, h, w = image.shape
    grid = sampling_grid(src.to(image.dtype), dst.to(image.dtype), triangles, h, w, chunk, choice)
    # Continuous pixels → grid_sample's [−1, 1] with align_corners=False (−1 = left edge).
    norm = torch.stack([grid[..., 0] * (2.0 / w) - 1.0, grid[..., 1] * (2.0 / h) - 1.0], -1)
    return F.grid_sample(image, norm, mode="bilinear", padding_mode="border", align_corners=False)


class PiecewiseAffineWarp(torch.nn.Module):
    """`warp` with the mesh's triangles held as a buffer (saved and exported with the model)."""

    triangles: torch.Tensor

    def __init__(self, triangles: np.ndarray):
        super().__init__()
        tri = np.asarray(triangles, np.int64)
        if tri.ndim != 2 or tri.shape[1] != 3 or len(tri) == 0:
            raise ValueError(f"triangles must be (T, 3), got {tri.shape}")
        self.register_buffer("triangles", torch.as_tensor(tri))

    def forward(
        self,
        image: torch.Tensor,
        src: torch.Tensor,
        dst: torch.Tensor,
        choice: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return warp(image, src, dst, self.triangles, choice=choice)


def warp_faces(
    faces_u8: np.ndarray, src: np.ndarray, dst: np.ndarray, batch_size: int = 16
) -> np.ndarray:
    """uint8 faces (N, H, W, C) with their landmarks `src` moved to `dst` (N, 68, 2, pixels of
    the faces' frame) — the pure-warp baseline. The mesh is triangulated on the mean of `src`."""
    faces_u8 = np.asarray(faces_u8)
    if len(faces_u8) == 0:
        return faces_u8.copy()
    n, h, w = faces_u8.shape[:3]
    tri = torch.as_tensor(triangulate(np.asarray(src, np.float64).mean(0), w, h))
    out = np.empty_like(faces_u8)
    with torch.no_grad():
        for i in range(0, n, batch_size):
            x = torch.as_tensor(faces_u8[i : i + batch_size], dtype=torch.float32)
            x = x.reshape(len(x), h, w, -1).permute(0, 3, 1, 2)
            s = torch.as_tensor(np.asarray(src[i : i + batch_size]), dtype=torch.float32)
            d = torch.as_tensor(np.asarray(dst[i : i + batch_size]), dtype=torch.float32)
            y = warp(x, s, d, tri).permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8)
            out[i : i + batch_size] = y.numpy().reshape(out[i : i + batch_size].shape)
    return out
