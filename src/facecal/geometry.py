"""Landmark geometry shared by every stage: the canonical face frame, similarity transforms,
face crops, and landmark error.

Affine transforms are 2×3 matrices ``M`` acting on points as ``M[:, :2] @ p + M[:, 2]``; every
function broadcasts over leading batch axes, so 10 000 faces are one call.

The canonical frame is anchored on points that expressions barely move — the outer and inner
eye corners and the nose — so aligning a face does not undo its expression (aligning on all 68
points would shrink an open mouth back toward the mean). In it the outer eye corners sit at
(−1, 0) and (1, 0), x to the right, y down.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from facecal.errors import FacecalError

N_POINTS = 68

# iBUG 68-point index groups.
JAW = tuple(range(0, 17))
RIGHT_BROW = tuple(range(17, 22))  # subject's right = image left
LEFT_BROW = tuple(range(22, 27))
NOSE_BRIDGE = tuple(range(27, 31))
NOSE_BASE = tuple(range(31, 36))
RIGHT_EYE = tuple(range(36, 42))
LEFT_EYE = tuple(range(42, 48))
OUTER_LIP = tuple(range(48, 60))
INNER_LIP = tuple(range(60, 68))
PARTS = {
    "jaw": JAW,
    "right_brow": RIGHT_BROW,
    "left_brow": LEFT_BROW,
    "nose_bridge": NOSE_BRIDGE,
    "nose_base": NOSE_BASE,
    "right_eye": RIGHT_EYE,
    "left_eye": LEFT_EYE,
    "outer_lip": OUTER_LIP,
    "inner_lip": INNER_LIP,
}
CLOSED_PARTS = frozenset({"right_eye", "left_eye", "outer_lip", "inner_lip"})

# Expression-stable anchors and where they sit in the canonical frame: symmetric, rounded
# adult proportions (they agree with dlib's mean on JAFFE to ~0.02 units).
RIGID_IDX = np.array([27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 39, 42, 45])
CANONICAL_RIGID = np.array(
    [
        [0.00, -0.04],
        [0.00, 0.25],
        [0.00, 0.53],
        [0.00, 0.81],  # nose bridge
        [-0.31, 1.03],
        [-0.16, 1.07],
        [0.00, 1.10],
        [0.16, 1.07],
        [0.31, 1.03],  # nose base
        [-1.00, 0.00],
        [-0.43, 0.06],
        [0.43, 0.06],
        [1.00, 0.00],  # eye corners
    ]
)

# The square face crop in canonical units: the jaw spans x ≈ ±1.55, brows to chin y ≈ −0.6…2.5.
CROP_ORIGIN = np.array([-2.0, -1.05])
CROP_SPAN = 4.0


class GeometryError(FacecalError):
    """Landmarks with the wrong shape, non-finite values, or no spatial extent."""


def check_points(points: np.ndarray, name: str = "landmarks") -> np.ndarray:
    """(…, 68, 2) finite float64 points with non-degenerate spread, or a clear error."""
    try:
        pts = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise GeometryError(f"{name}: not numeric ({e})") from None
    if pts.ndim < 2 or pts.shape[-2:] != (N_POINTS, 2):
        raise GeometryError(f"{name}: expected shape (…, {N_POINTS}, 2), got {pts.shape}")
    if not np.isfinite(pts).all():
        raise GeometryError(f"{name}: contains NaN or infinite values")
    spread = pts.std(axis=-2).min(axis=-1)
    if (spread < 1e-6).any():
        raise GeometryError(f"{name}: points are collinear or all equal along an axis")
    return pts


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation taking `src` onto `dst`
    (Umeyama 1991, reflections excluded). src, dst: (…, K, 2) → (…, 2, 3)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.broadcast_to(np.asarray(dst, dtype=np.float64), src.shape)
    mu_s, mu_d = src.mean(-2, keepdims=True), dst.mean(-2, keepdims=True)
    s0, d0 = src - mu_s, dst - mu_d
    # For 2-D similarity the optimum has a closed form in a = Σ(s·d), b = Σ(s×d).
    a = (s0 * d0).sum((-2, -1))
    b = (s0[..., 0] * d0[..., 1] - s0[..., 1] * d0[..., 0]).sum(-1)
    var = (s0**2).sum((-2, -1))
    if (var <= 1e-12).any():
        raise GeometryError("similarity fit: source points have no spread")
    c, s = a / var, b / var  # scale·cos, scale·sin
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    t = mu_d[..., 0, :] - np.einsum("...ij,...j->...i", rot, mu_s[..., 0, :])
    return np.concatenate([rot, t[..., None]], -1)


def apply_affine(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply (…, 2, 3) transforms to (…, K, 2) points."""
    m = np.asarray(m, dtype=np.float64)
    # matmul, not einsum: same numbers, ~4× faster on (N, 68, 2) batches.
    return (
        np.asarray(points, dtype=np.float64) @ np.swapaxes(m[..., :2], -1, -2) + m[..., None, :, 2]
    )


def invert_affine(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    a_inv = np.linalg.inv(m[..., :2])
    t = -np.einsum("...ij,...j->...i", a_inv, m[..., 2])
    return np.concatenate([a_inv, t[..., None]], -1)


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The transform ``outer ∘ inner`` (apply `inner` first)."""
    a = outer[..., :2] @ inner[..., :2]
    t = np.einsum("...ij,...j->...i", outer[..., :2], inner[..., 2]) + outer[..., 2]
    return np.concatenate([a, t[..., None]], -1)


def canonical_transform(points: np.ndarray) -> np.ndarray:
    """Image → canonical frame, fitted on the expression-stable anchors. (…, 68, 2) → (…, 2, 3)."""
    pts = check_points(points)
    return fit_similarity(pts[..., RIGID_IDX, :], CANONICAL_RIGID)


def to_canonical(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points in the canonical frame and the image → canonical transform used."""
    m = canonical_transform(points)
    return apply_affine(m, points), m


def canonical_to_crop(size: int) -> np.ndarray:
    """Canonical frame → pixel coordinates of a size×size face crop."""
    k = size / CROP_SPAN
    return np.array([[k, 0.0, -CROP_ORIGIN[0] * k], [0.0, k, -CROP_ORIGIN[1] * k]])


def crop_transform(points: np.ndarray, size: int) -> np.ndarray:
    """Image → crop pixels for the face with these landmarks. (…, 68, 2) → (…, 2, 3)."""
    return compose(canonical_to_crop(size), canonical_transform(points))


def warp_image(image: np.ndarray, m: np.ndarray, size: int, fill: int = 0) -> np.ndarray:
    """Resample `image` (H×W or H×W×C uint8) into a size×size crop under image → crop `m`."""
    inv = invert_affine(m)  # PIL wants crop → image
    im = Image.fromarray(np.ascontiguousarray(image))
    fillcolor = fill if im.mode == "L" else (fill,) * len(im.getbands())
    out = im.transform(
        (size, size),
        Image.Transform.AFFINE,
        data=tuple(inv.reshape(-1)),
        resample=Image.Resampling.BICUBIC,
        fillcolor=fillcolor,
    )
    return np.asarray(out)


def interocular(points: np.ndarray) -> np.ndarray:
    """Outer-eye-corner distance (300-W's normaliser for NME). (…, 68, 2) → (…)."""
    p = np.asarray(points, dtype=np.float64)
    return np.linalg.norm(p[..., 45, :] - p[..., 36, :], axis=-1)


def nme(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mean point-to-point error divided by the true inter-ocular distance. → (…)."""
    pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    return np.linalg.norm(pred - truth, axis=-1).mean(-1) / interocular(truth)
