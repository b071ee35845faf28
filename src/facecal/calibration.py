"""Landmark calibration: move a weak expression's 68 points toward a strong ("gold") one.

What the original code computed (despite its "PCA/SVD" wording) is a least-squares quadratic
2-D warp: with target points (x = column, y = row) and features ``f = [y², x², xy, y, x, 1]``,
``par_x = pinv(A)·gold_x`` and ``par_y = pinv(A)·gold_y`` for the 68×6 feature matrix ``A``;
applying it maps each target point to ``(f·par_x, f·par_y)``.

Two frames:

* ``upstream`` — raw pixel coordinates of each image, no normalisation, pinv through an SVD:
  reproduces the original parameter files.
* ``aligned`` (default) — both point sets are first brought into the canonical frame of
  `facecal.geometry` (a similarity fitted on expression-stable anchors, so aligning does not
  undo the expression); the warp is fitted there, where the six features have comparable scale
  (well conditioned), and the result is mapped back into the target's image frame. Invariant to
  where the face sits in its picture, how large it is and how it is rotated.

A third method, ``pca``, does not warp: it moves a face along its emotion's principal
expression direction in aligned shape space (`ExpressionModel`). A fourth, ``learned``, predicts
the apex shape from the face itself: per emotion, the mean weak→apex displacement of the
training subjects plus a ridge-regularised linear model of how it varies with the face's shape
in a truncated PCA shape basis, rank and ridge chosen by cross-validation over subjects
(`LearnedModel`, `fit_learned`).

Everything is vectorised over a leading batch axis: N faces are one numpy call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

from facecal.errors import FacecalError
from facecal.geometry import (
    N_POINTS,
    RIGID_IDX,
    GeometryError,
    apply_affine,
    check_points,
    invert_affine,
    nme,
    to_canonical,
)

Mode = Literal["aligned", "upstream"]
MODES = ("aligned", "upstream")
FEATURES = ("y2", "x2", "xy", "y", "x", "1")  # the original column order
N_PARAMS = len(FEATURES)


class CalibrationError(FacecalError):
    """Landmarks a calibration cannot use (wrong shape, NaN, degenerate) or a bad request."""


# --------------------------------------------------------------------------- checks


def _normal_equations(a: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gram matrix AᵀA (…, 6, 6) and right-hand side Aᵀg (…, 6, 2)."""
    at = np.swapaxes(a, -1, -2)
    return at @ a, at @ g


def _well_posed(gram: np.ndarray) -> np.ndarray:
    """(…, 6, 6) Gram matrices → (…) bool: smallest/largest singular value of A above 1e-7."""
    w = np.linalg.eigvalsh(gram)
    return w[..., 0] > 1e-14 * w[..., -1]


def _degenerate(points: np.ndarray) -> np.ndarray:
    """(…, 68, 2) → (…) bool: True where the quadratic warp is not determined by the points
    (collinear, or all on one conic). Decided in a normalised copy so that the answer does
    not depend on the pixel scale (the upstream fit itself is not normalised)."""
    p = points - points.mean(-2, keepdims=True)
    scale = np.sqrt((p**2).sum((-2, -1)) / N_POINTS)
    p = p / np.where(scale > 0, scale, 1.0)[..., None, None]
    a = features(p)
    return ~_well_posed(np.swapaxes(a, -1, -2) @ a)


def _raise_degenerate(bad: np.ndarray, name: str) -> None:
    if bad.any():
        where = (
            "" if bad.ndim == 0 else f" (face(s) {np.flatnonzero(bad.reshape(-1))[:10].tolist()})"
        )
        raise CalibrationError(
            f"{name}: degenerate points{where}: collinear or all on one "
            "conic, so the quadratic warp is not determined"
        )


def check_landmarks(points, name: str = "landmarks") -> np.ndarray:
    """(…, 68, 2) finite float64 points that determine a quadratic warp, or CalibrationError."""
    pts = _checked(points, name)
    _raise_degenerate(_degenerate(pts), name)
    return pts


def _checked(points, name: str) -> np.ndarray:
    try:
        return check_points(points, name)
    except GeometryError as e:
        raise CalibrationError(str(e)) from None


def valid_mask(points: np.ndarray) -> np.ndarray:
    """(N, 68, 2) → (N,) bool: which faces `check_landmarks` would accept (batch jobs report
    and skip the others instead of failing the whole batch)."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 3 or pts.shape[1:] != (N_POINTS, 2):
        raise CalibrationError(f"expected (N, {N_POINTS}, 2) points, got {pts.shape}")
    ok: np.ndarray = np.asarray(np.isfinite(pts).all((1, 2)), dtype=bool)
    ok &= np.where(ok[:, None, None], pts, 0.0).std(1).min(-1) >= 1e-6
    if ok.any():
        ok[ok] &= ~_degenerate(pts[ok])
        # Anchors of the canonical fit must have spread too (geometry.fit_similarity).
        anchors = pts[:, RIGID_IDX]
        ok &= ((anchors - anchors.mean(1, keepdims=True)) ** 2).sum((1, 2)) > 1e-12
    return ok


# --------------------------------------------------------------------------- the warp


def features(points: np.ndarray) -> np.ndarray:
    """(…, K, 2) → (…, K, 6): ``[y², x², xy, y, x, 1]`` per point (x = column, y = row)."""
    p = np.asarray(points, dtype=np.float64)
    x, y = p[..., 0], p[..., 1]
    return np.stack([y * y, x * x, x * y, y, x, np.ones_like(x)], axis=-1)


def fit_quadratic(target: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Least-squares quadratic warp taking `target` onto `gold`, in the coordinates given.

    target (…, K, 2), gold broadcastable to it → parameters (…, 2, 6): ``[..., 0, :]`` is
    par_x, ``[..., 1, :]`` par_y. ``pinv`` through an SVD, exactly as the original (no
    normalisation, no truncation beyond numpy's default rcond).

    The SVD is taken of R from a QR decomposition of A (A = QR = Q·UΣVᵀ): the same singular
    values and pinv as an SVD of A to round-off (Householder QR does not square the condition
    number), and twice as fast batched."""
    a = features(target)
    g = np.broadcast_to(np.asarray(gold, dtype=np.float64), np.shape(target))
    q, r = np.linalg.qr(a)  # (…, K, 6), (…, 6, 6)
    u, sv, vt = np.linalg.svd(r)
    keep = sv > 1e-15 * sv[..., :1]  # numpy.linalg.pinv's default rcond
    inv = np.where(keep, 1.0 / np.where(keep, sv, 1.0), 0.0)
    tq = np.swapaxes(q, -1, -2) @ g  # Qᵀg (…, 6, 2)
    par = np.swapaxes(vt, -1, -2) @ (inv[..., None] * (np.swapaxes(u, -1, -2) @ tq))
    return np.swapaxes(par, -1, -2)


def apply_quadratic(par: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply (…, 2, 6) parameters to (…, K, 2) points (same coordinates as the fit)."""
    return features(points) @ np.swapaxes(np.asarray(par, dtype=np.float64), -1, -2)


@dataclass
class Fit:
    """A fitted calibration of N faces (or one face, without the batch axis).

    `par` acts in the fit frame: pixels for ``upstream``, the target's canonical frame for
    ``aligned``; `frame` is the image → fit-frame transform (identity for upstream).
    """

    mode: str
    par: np.ndarray  # (…, 2, 6)
    frame: np.ndarray  # (…, 2, 3)

    @property
    def par_x(self) -> np.ndarray:
        return self.par[..., 0, :]

    @property
    def par_y(self) -> np.ndarray:
        return self.par[..., 1, :]

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Calibrate points given in the target image's pixels; result in the same pixels."""
        return apply(self, points)


_IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def fit(target, gold, mode: Mode = "aligned") -> Fit:
    """Fit the warp of each target face (…, 68, 2) onto `gold` (68, 2 or broadcastable).

    Both are in image pixels (each of its own picture) — except that a canonical-frame gold
    (a `GoldTemplate` of aligned mode) may be passed as is: aligning it again changes nothing
    but round-off.
    """
    if mode not in MODES:
        raise CalibrationError(f"unknown calibration mode {mode!r}; expected one of {MODES}")
    gold = check_landmarks(gold, "gold landmarks")
    if mode == "upstream":
        target = check_landmarks(target, "target landmarks")
        frame = np.broadcast_to(_IDENTITY, target.shape[:-2] + (2, 3)).copy()
        return Fit(mode, fit_quadratic(target, gold), frame)
    t_can, frame = _canonical(target, "target landmarks")  # checks shape, NaN, spread
    g_can, _ = _canonical(gold, "gold landmarks")
    # In the canonical frame the six features have comparable scale (coordinates within ±3),
    # so the normal equations are well conditioned: one batched 6×6 eigendecomposition gives
    # both the degeneracy check and the solution, far cheaper than an SVD of every 68×6 A.
    gram, rhs = _normal_equations(features(t_can), np.broadcast_to(g_can, t_can.shape))
    w, v = np.linalg.eigh(gram)
    _raise_degenerate(~(w[..., 0] > 1e-14 * w[..., -1]), "target landmarks")
    par = v @ ((np.swapaxes(v, -1, -2) @ rhs) / w[..., :, None])
    return Fit(mode, np.swapaxes(par, -1, -2), frame)


def _canonical(points, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        return to_canonical(points)
    except GeometryError as e:
        raise CalibrationError(f"{name}: {str(e).removeprefix('landmarks: ')}") from None


def apply(f: Fit, points) -> np.ndarray:
    """Calibrated points in the target image's pixels."""
    pts = np.asarray(points, dtype=np.float64)
    if f.mode == "upstream":
        return apply_quadratic(f.par, pts)
    moved = apply_quadratic(f.par, apply_affine(f.frame, pts))
    return apply_affine(invert_affine(f.frame), moved)


def blend(points, calibrated, alpha) -> np.ndarray:
    """``(1 − α)·points + α·calibrated``; α = 0 original, 1 fully calibrated (any real α
    extrapolates linearly). `alpha` may be a scalar or one value per face."""
    a = np.asarray(alpha, dtype=np.float64)
    if not np.isfinite(a).all():
        raise CalibrationError(f"alpha must be finite, got {alpha!r}")
    if a.ndim:
        a = a[..., None, None]
    p, c = np.asarray(points, dtype=np.float64), np.asarray(calibrated, dtype=np.float64)
    return p + a * (c - p)


def calibrate(target, gold, mode: Mode = "aligned", alpha=1.0) -> tuple[np.ndarray, Fit]:
    """Fit and apply in one go: (calibrated points in the target's pixels, the fit)."""
    f = fit(target, gold, mode)
    return blend(target, apply(f, target), alpha), f


def rms(a, b) -> np.ndarray:
    """Root-mean-square point distance between (…, K, 2) sets → (…)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return np.sqrt((d**2).sum(-1).mean(-1))


def point_error(a, b) -> np.ndarray:
    """Mean point-to-point distance between (…, K, 2) sets → (…)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return np.linalg.norm(d, axis=-1).mean(-1)


def rms_in_fit_frame(f: Fit, target, calibrated, gold) -> tuple[np.ndarray, np.ndarray]:
    """RMS distance to gold before and after, in the frame the warp was fitted in (pixels for
    upstream, canonical units for aligned — where before/after are comparable)."""
    target, calibrated = np.asarray(target, np.float64), np.asarray(calibrated, np.float64)
    if f.mode == "upstream":
        g = np.asarray(gold, np.float64)
        return rms(target, g), rms(calibrated, g)
    g_can, _ = to_canonical(gold)
    return (
        rms(apply_affine(f.frame, target), g_can),
        rms(apply_affine(f.frame, calibrated), g_can),
    )


# --------------------------------------------------------------------------- gold templates


@dataclass
class GoldTemplate:
    """The target shape of one emotion: canonical frame (aligned) or pixels (upstream)."""

    emotion: str
    points: np.ndarray  # (68, 2)
    sources: list[str]  # images it was averaged from
    frame: str  # "canonical" | "pixels"


def rank_by_intensity(intensity: np.ndarray, names: list[str]) -> np.ndarray:
    """Indices, most intense first; unknown (NaN) intensities last; ties by name."""
    inten = np.asarray(intensity, dtype=np.float64)
    key = np.where(np.isfinite(inten), -inten, np.inf)
    return np.array(sorted(range(len(names)), key=lambda i: (key[i], names[i])), dtype=int)


def gold_template(
    emotion: str,
    points: np.ndarray,
    names: list[str],
    intensity: np.ndarray,
    top_k: int,
    mode: Mode = "aligned",
) -> GoldTemplate:
    """Mean of the `top_k` most intense of these faces (all of one emotion), aligned first.

    With no known intensity at all (e.g. FER2013) every face counts: the gold is then the
    emotion's typical (mean) shape rather than an arbitrary pick.
    """
    points = check_landmarks(points, f"gold faces of {emotion}")
    if points.ndim != 3 or len(points) == 0:
        raise CalibrationError(f"gold template of {emotion}: no faces")
    if top_k < 1:
        raise CalibrationError(f"gold_top_k must be ≥ 1, got {top_k}")
    order = rank_by_intensity(intensity, names)
    if np.isfinite(np.asarray(intensity, dtype=np.float64)).any():
        order = order[:top_k]
    chosen = points[order]
    if mode == "aligned":
        mean = to_canonical(chosen)[0].mean(0)
        frame = "canonical"
    else:
        mean = chosen.mean(0)  # upstream: raw pixels (exactly the named face when k = 1)
        frame = "pixels"
    return GoldTemplate(emotion, mean, [names[i] for i in order], frame)


# --------------------------------------------------------------------------- pca method


@dataclass
class ExpressionModel:
    """Principal expression directions in aligned shape space.

    A face's displacement is its canonical shape minus a neutral reference (its subject's
    neutral face where known, else the mean neutral face). Per emotion, the direction is the
    first principal axis (uncentred: it carries the mean displacement) of the training faces'
    displacements, signed so that expressing more means a larger coordinate; the gold
    coordinate is the mean coordinate of the gold faces.
    """

    neutral_mean: np.ndarray  # (68, 2) canonical
    directions: dict[str, np.ndarray]  # emotion → (68, 2), unit norm over 136 values
    gold_coordinate: dict[str, float]

    def coordinate(
        self, emotion: str, canonical: np.ndarray, reference: np.ndarray | None = None
    ) -> np.ndarray:
        ref = self.neutral_mean if reference is None else reference
        d = np.asarray(canonical, np.float64) - ref
        return (d * self.directions[emotion]).sum((-2, -1))

    def move(
        self, emotion: str, points, reference: np.ndarray | None = None, alpha=1.0
    ) -> np.ndarray:
        """Move faces (…, 68, 2 image pixels) along the emotion's direction to the gold's
        coordinate; `reference` = their neutral shape(s) in the canonical frame, if known."""
        if emotion not in self.directions:
            raise CalibrationError(
                f"no expression direction for {emotion!r}; known: {sorted(self.directions)}"
            )
        pts = np.asarray(points, dtype=np.float64)
        can, frame = _canonical(pts, "target landmarks")  # no warp: only the frame must exist
        c = self.coordinate(emotion, can, reference)
        a = np.asarray(alpha, dtype=np.float64)
        step = (a * (self.gold_coordinate[emotion] - c))[..., None, None]
        return apply_affine(invert_affine(frame), can + step * self.directions[emotion])


def expression_model(
    canonical: np.ndarray,
    emotions,
    references: np.ndarray,
    neutral_mean: np.ndarray,
    gold_faces: dict[str, tuple[np.ndarray, np.ndarray]],
) -> ExpressionModel:
    """Directions from training faces, gold coordinates from the gold faces.

    canonical (N, 68, 2): training faces in the canonical frame; emotions (N,): their labels;
    references (N, 68, 2): each face's neutral reference; gold_faces: emotion → (its gold faces
    in the canonical frame (k, 68, 2), their references (k, 68, 2)). An emotion gets a direction
    only when it has gold faces and training faces that moved away from neutral.
    """
    emotions = np.asarray(emotions)
    disp = (np.asarray(canonical, np.float64) - references).reshape(len(emotions), -1)
    directions, coords = {}, {}
    for emo, (gold_can, gold_ref) in gold_faces.items():
        d = disp[emotions == emo]
        if len(d) == 0 or not np.isfinite(d).all() or np.abs(d).max() == 0:
            continue
        v = np.linalg.svd(d, full_matrices=False)[2][0]
        if d.mean(0) @ v < 0:
            v = -v
        directions[emo] = v.reshape(N_POINTS, 2)
        g = (np.asarray(gold_can, np.float64) - gold_ref).reshape(len(gold_can), -1)
        coords[emo] = float((g @ v).mean())
    return ExpressionModel(np.asarray(neutral_mean, np.float64), directions, coords)


# --------------------------------------------------------------------------- learned method


@dataclass
class LearnedEmotion:
    """One emotion's displacement model: ``apex = x + offset + z(x)·coef + t·intensity_coef``
    in the canonical frame, with ``z(x)`` the first `rank` coordinates of x in the model's shape
    basis and t the face's known intensity of this emotion (0 for a neutral face, a face of
    another emotion, or one whose intensity is unknown)."""

    offset: np.ndarray  # (68, 2): the displacement of a neutral-level face at the basis centre
    coef: np.ndarray  # (rank, 136): how the displacement changes per basis coordinate
    intensity_coef: np.ndarray  # (68, 2): how it changes per unit of the face's own intensity
    ridge: float  # the regularisation chosen (relative to the mean coordinate energy)
    n_pairs: int
    n_subjects: int
    cv_nme: float | None  # cross-validated NME to the apex of the choice (None: no CV possible)

    @property
    def rank(self) -> int:
        return int(self.coef.shape[0])


@dataclass
class LearnedModel:
    """Per emotion, a model that predicts a face's apex shape from the face (`fit_learned`).

    Needs nothing but the face: no neutral reference, no intensity (a face's current expression
    level is part of its shape, so the model learns to move a half-expressed face less)."""

    shape_mean: np.ndarray  # (68, 2) canonical: the centre of the shape basis
    shape_basis: np.ndarray  # (K, 136) orthonormal rows, K = the largest rank in use
    emotions: dict[str, LearnedEmotion]

    def coordinates(self, canonical: np.ndarray, rank: int) -> np.ndarray:
        """(…, 68, 2) canonical shapes → (…, rank) basis coordinates."""
        c = np.asarray(canonical, np.float64) - self.shape_mean
        return c.reshape(c.shape[:-2] + (2 * N_POINTS,)) @ self.shape_basis[:rank].T

    def displacement(self, emotion: str, canonical: np.ndarray, intensity=None) -> np.ndarray:
        """Predicted apex − face, (…, 68, 2) canonical; `intensity` = the faces' known
        intensity of `emotion` (scalar or one per face; None = 0, a neutral-level face)."""
        if emotion not in self.emotions:
            raise CalibrationError(
                f"no learned model for {emotion!r}; known: {sorted(self.emotions)}"
            )
        e = self.emotions[emotion]
        z = self.coordinates(canonical, e.rank)
        d = (z @ e.coef).reshape(z.shape[:-1] + (N_POINTS, 2))
        t = np.zeros(z.shape[:-1]) if intensity is None else np.asarray(intensity, np.float64)
        t = np.broadcast_to(t, z.shape[:-1])
        if not np.isfinite(t).all():
            raise CalibrationError("intensity must be finite (pass 0 where it is unknown)")
        return e.offset + d + t[..., None, None] * e.intensity_coef

    def predict(self, emotion: str, canonical: np.ndarray, intensity=None) -> np.ndarray:
        """Predicted apex shape(s), canonical frame."""
        can = np.asarray(canonical, np.float64)
        return can + self.displacement(emotion, can, intensity)

    def move(self, emotion: str, points, alpha=1.0, intensity=None) -> np.ndarray:
        """Faces (…, 68, 2 image pixels) moved `alpha` of the way to their predicted apex
        (0 = unchanged, 1 = the prediction), in their own pixels; `intensity` as in
        `displacement` (a new face of unknown intensity is treated as neutral-level)."""
        a = np.asarray(alpha, dtype=np.float64)
        if not np.isfinite(a).all():
            raise CalibrationError(f"alpha must be finite, got {alpha!r}")
        can, frame = _canonical(np.asarray(points, np.float64), "target landmarks")
        step = self.displacement(emotion, can, intensity)
        if a.ndim:
            a = a[..., None, None]
        return apply_affine(invert_affine(frame), can + a * step)


@dataclass
class Pairs:
    """Training pairs of one emotion, canonical frame: source (weak or neutral) face →
    the same person's apex; `groups` = subject of each pair (cross-validation folds);
    `intensity` = the source's intensity of the emotion (0 for neutral)."""

    source: np.ndarray  # (n, 68, 2)
    target: np.ndarray  # (n, 68, 2)
    groups: np.ndarray  # (n,)
    intensity: np.ndarray  # (n,)


RANKS = (0, 2, 4, 8, 16, 32)
RIDGES = (0.01, 0.1, 1.0, 10.0, 100.0)


def shape_basis(shapes: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (68, 2), the first `rank` principal axes (rank, 136)) of canonical shapes."""
    x = np.asarray(shapes, np.float64).reshape(len(shapes), -1)
    mean = x.mean(0)
    rank = min(rank, len(x) - 1, x.shape[1]) if len(x) > 1 else 0
    if rank <= 0:
        return mean.reshape(N_POINTS, 2), np.zeros((0, x.shape[1]))
    vt = np.linalg.svd(x - mean, full_matrices=False)[2]
    return mean.reshape(N_POINTS, 2), vt[:rank]


def _ridge(
    z: np.ndarray, t: np.ndarray, d: np.ndarray, ridge: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge regression d ≈ b + z·W + t·c with the intercept b and the intensity slope c
    unpenalised (c only where the intensities vary); the penalty on W is `ridge` times the
    mean energy of a centred coordinate, so one grid fits any shape scale.
    → (b (136,), W (k, 136), c (136,))."""
    k = z.shape[1]
    use_t = bool(np.ptp(t) > 1e-9) if len(t) else False
    x = np.concatenate([z, t[:, None]], 1) if use_t else z
    xm, dm = x.mean(0), d.mean(0)
    if x.shape[1] == 0:
        return dm, np.zeros((0, d.shape[1])), np.zeros(d.shape[1])
    xc, dc = x - xm, d - dm
    gram = xc.T @ xc
    penalty = np.zeros(x.shape[1])
    if k:
        penalty[:k] = ridge * max(np.trace(gram[:k, :k]) / k, 1e-300)
    w = np.linalg.lstsq(gram + np.diag(penalty), xc.T @ dc, rcond=None)[0]
    c = w[k] if use_t else np.zeros(d.shape[1])
    return dm - xm @ w, w[:k], c


def _subject_folds(groups: np.ndarray, n_folds: int) -> np.ndarray:
    """Fold of each pair: subjects in sorted order dealt round-robin (no seed needed)."""
    subjects = sorted({str(g) for g in groups})
    fold_of = {s: i % n_folds for i, s in enumerate(subjects)}
    return np.array([fold_of[str(g)] for g in groups], dtype=int)


def _fit_emotion(z: np.ndarray, pairs: Pairs, rank: int, ridge: float) -> LearnedEmotion:
    d = (pairs.target - pairs.source).reshape(len(pairs.source), -1)
    b, w, c = _ridge(z[:, :rank], np.asarray(pairs.intensity, np.float64), d, ridge)
    n_subjects = len({str(g) for g in pairs.groups})
    return LearnedEmotion(
        b.reshape(N_POINTS, 2), w, c.reshape(N_POINTS, 2), ridge, len(d), n_subjects, None
    )


def fit_learned(
    shapes: np.ndarray,
    shape_groups: np.ndarray,
    pairs: dict[str, Pairs],
    ranks=RANKS,
    ridges=RIDGES,
    n_folds: int = 5,
) -> LearnedModel:
    """Fit the learned model from training data only.

    shapes (M, 68, 2): training faces in the canonical frame (the shape basis; any emotion),
    shape_groups (M,): their subjects; pairs: emotion → its training pairs. Per emotion, the
    (rank, ridge) is chosen by NME to the true apex over subject-disjoint folds (mean over
    subjects): the simplest model — lower rank, then stronger ridge — within one standard
    error of the best (the one-standard-error rule); with pairs of fewer than two subjects
    there is nothing to cross-validate and the model is the mean displacement (rank 0).
    In each fold the shape basis is refitted without the fold's subjects, so no score sees
    a face of its own subjects.
    """
    shapes = np.asarray(shapes, np.float64)
    shape_groups = np.asarray(shape_groups).astype(str)
    ranks = sorted({int(r) for r in ranks})
    ridges = sorted({float(r) for r in ridges}, reverse=True)  # strongest first: simpler
    if not ranks or ranks[0] < 0 or not ridges or ridges[-1] <= 0:
        raise CalibrationError(f"learned: ranks must be ≥ 0 and ridges > 0: {ranks}, {ridges}")
    grid = [(k, r) for k in ranks for r in (ridges if k else ridges[:1])]
    chosen: dict[str, tuple[int, float, float | None]] = {}
    for emo, p in pairs.items():
        groups = np.asarray(p.groups).astype(str)
        n_subj = len(set(groups))
        if n_subj < 2 or len(ranks) * len(ridges) == 1:
            chosen[emo] = (ranks[0] if n_subj >= 2 else 0, ridges[0], None)
            continue
        folds = _subject_folds(groups, min(n_folds, n_subj))
        err = np.zeros((len(grid), len(groups)))
        for f in range(folds.max() + 1):
            test = folds == f
            held = set(groups[test])
            mean, basis = shape_basis(shapes[~np.isin(shape_groups, list(held))], ranks[-1])
            fold_model = LearnedModel(mean, basis, {})
            z = fold_model.coordinates(p.source, basis.shape[0])
            for j, (k, r) in enumerate(grid):
                train = ~test
                fold_model.emotions[emo] = _fit_emotion(
                    z[train], _take(p, train), min(k, basis.shape[0]), r
                )
                pred = fold_model.predict(emo, p.source[test], p.intensity[test])
                err[j, test] = nme(pred, p.target[test])
        # One-standard-error rule: the simplest model within one standard error (over
        # subjects) of the best, since a few subjects cannot tell small gains from noise.
        subj = sorted(set(groups))
        per_subject = np.stack([err[:, groups == g].mean(1) for g in subj], 1)
        score = per_subject.mean(1)
        best = int(np.argmin(score))
        se = per_subject[best].std(ddof=1) / np.sqrt(len(subj))
        pick = int(np.flatnonzero(score <= score[best] + se)[0])
        chosen[emo] = (grid[pick][0], grid[pick][1], float(score[pick]))
    max_rank = max((k for k, _, _ in chosen.values()), default=0)
    mean, basis = shape_basis(shapes, max_rank)
    model = LearnedModel(mean, basis, {})
    for emo, (k, r, score) in chosen.items():
        p = pairs[emo]
        z = model.coordinates(p.source, basis.shape[0])
        model.emotions[emo] = _fit_emotion(z, p, min(k, basis.shape[0]), r)
        model.emotions[emo].cv_nme = score
    return model


def _take(p: Pairs, mask: np.ndarray) -> Pairs:
    return Pairs(p.source[mask], p.target[mask], p.groups[mask], p.intensity[mask])


# --------------------------------------------------------------------------- gold.json


@dataclass
class GoldModel:
    """The content of ``outputs/calibrate/gold.json``, ready to calibrate new faces (what the
    serving layer needs: points in, calibrated points out, whichever method made the file)."""

    mode: str
    method: str
    golds: dict[str, np.ndarray]  # emotion → (68, 2) in `frame`
    frame: str
    model: ExpressionModel | None = None  # method "pca" only
    learned: LearnedModel | None = None  # method "learned" only

    @classmethod
    def from_json(cls, data: dict) -> GoldModel:
        try:
            emotions = data["emotions"]
            mode, method = data.get("mode", "aligned"), data.get("method", "quadratic")
            frame = data.get("frame", "canonical" if mode == "aligned" else "pixels")
            golds = {
                e: check_landmarks(v["points"], f"gold.json emotions.{e}.points")
                for e, v in emotions.items()
            }
            model = None
            if method == "pca":
                model = ExpressionModel(
                    check_points(data["neutral_mean"], "gold.json neutral_mean"),
                    {
                        e: np.asarray(v["direction"], np.float64).reshape(N_POINTS, 2)
                        for e, v in emotions.items()
                        if "direction" in v
                    },
                    {e: float(v["coordinate"]) for e, v in emotions.items() if "coordinate" in v},
                )
            learned = learned_from_json(data) if method == "learned" else None
        except (KeyError, TypeError, ValueError, GeometryError) as e:
            raise CalibrationError(f"gold.json: malformed ({type(e).__name__}: {e})") from None
        if mode not in MODES:
            raise CalibrationError(f"gold.json: unknown mode {mode!r}")
        if method not in METHODS:
            raise CalibrationError(f"gold.json: unknown method {method!r}; expected {METHODS}")
        if method != "quadratic" and mode != "aligned":
            raise CalibrationError(f"gold.json: method {method!r} needs mode 'aligned'")
        return cls(mode, method, golds, frame, model, learned)

    def calibrate(
        self,
        points,
        emotion: str,
        alpha=1.0,
        reference: np.ndarray | None = None,
        intensity=None,
    ) -> np.ndarray:
        """Calibrated points (image pixels) of face(s) `points` toward `emotion`; `reference` =
        the subject's neutral shape in the canonical frame, if known (pca only; the learned
        model needs none); `intensity` = the faces' known intensity of `emotion` (learned
        only; None = a neutral-level face, what a new photo is taken to be)."""
        if emotion not in self.golds:
            raise CalibrationError(f"no gold template for {emotion!r}; known: {sorted(self.golds)}")
        if self.learned is not None:
            return self.learned.move(emotion, points, alpha, intensity)
        if self.model is not None:
            return self.model.move(emotion, points, reference, alpha)
        return calibrate(points, self.golds[emotion], cast(Mode, self.mode), alpha)[0]


METHODS = ("quadratic", "pca", "learned")


def learned_to_json(model: LearnedModel) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(top-level keys, per-emotion keys) of a learned model in gold.json."""
    top = {"shape_mean": model.shape_mean.tolist(), "shape_basis": model.shape_basis.tolist()}
    per = {
        e: {
            "offset": m.offset.tolist(),
            "coef": m.coef.tolist(),
            "intensity_coef": m.intensity_coef.tolist(),
            "rank": m.rank,
            "ridge": m.ridge,
            "n_pairs": m.n_pairs,
            "n_subjects": m.n_subjects,
            "cv_nme": m.cv_nme,
        }
        for e, m in model.emotions.items()
    }
    return top, per


def learned_from_json(data: dict) -> LearnedModel:
    """The learned model of a gold.json (KeyError/ValueError on a malformed one)."""
    dim = 2 * N_POINTS
    basis = np.asarray(data["shape_basis"], np.float64).reshape(-1, dim)
    emotions = {}
    for e, v in data["emotions"].items():
        coef = np.asarray(v["coef"], np.float64).reshape(-1, dim)
        if len(coef) > len(basis):
            raise ValueError(f"emotions.{e}.coef: rank {len(coef)} > basis size {len(basis)}")
        cv = v.get("cv_nme")
        emotions[e] = LearnedEmotion(
            np.asarray(v["offset"], np.float64).reshape(N_POINTS, 2),
            coef,
            np.asarray(v.get("intensity_coef", np.zeros((N_POINTS, 2))), np.float64).reshape(
                N_POINTS, 2
            ),
            float(v.get("ridge", 0.0)),
            int(v.get("n_pairs", 0)),
            int(v.get("n_subjects", 0)),
            None if cv is None else float(cv),
        )
    values = [basis] + [a for m in emotions.values() for a in (m.offset, m.coef, m.intensity_coef)]
    if not all(np.isfinite(x).all() for x in values):
        raise ValueError("non-finite learned-model values")
    mean = check_points(data["shape_mean"], "gold.json shape_mean")
    return LearnedModel(mean, basis, emotions)
