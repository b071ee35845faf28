"""Image-quality and statistics library: SSIM, PSNR, L1, Fréchet distance, intervals,
classification scores and the original PSNR-argmax classifier.

Image functions take images in [0, 1] (``data_range`` otherwise) shaped (N, C, H, W), (C, H, W)
or (H, W), as torch tensors or numpy arrays, and return one value per image (a tensor for
tensor input, a numpy array for numpy input). They are batched and differentiable, so the GAN
can use them on its validation batches as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from facecal.errors import FacecalError


class MetricError(FacecalError):
    """Inputs a metric cannot be computed on (shape mismatch, too small, empty)."""


# --------------------------------------------------------------------------------------------
# Image quality
# --------------------------------------------------------------------------------------------

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_BLOCK = 256  # images per SSIM batch (memory)


def _as_batch(x, name: str) -> tuple[torch.Tensor, bool]:
    """(N, C, H, W) float tensor and whether the input was numpy."""
    is_numpy = not isinstance(x, torch.Tensor)
    t = torch.as_tensor(np.asarray(x)) if is_numpy else x
    if not t.is_floating_point():
        raise MetricError(
            f"{name}: expected float images in [0, 1], got dtype {t.dtype} "
            f"(convert uint8 with /255)"
        )
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[None]
    elif t.ndim != 4:
        raise MetricError(
            f"{name}: expected (N, C, H, W), (C, H, W) or (H, W), got {tuple(t.shape)}"
        )
    return t, is_numpy


def _pair(x, y) -> tuple[torch.Tensor, torch.Tensor, bool]:
    a, a_np = _as_batch(x, "x")
    b, _ = _as_batch(y, "y")
    if a.shape != b.shape:
        raise MetricError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype), a_np


def _out(t: torch.Tensor, is_numpy: bool):
    return t.detach().cpu().numpy() if is_numpy else t


def gaussian_window(
    size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype=torch.float64
) -> torch.Tensor:
    """1-D normalised Gaussian taps."""
    r = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x, y, data_range: float = 1.0, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA):
    """Mean structural similarity per image (Wang et al. 2004): Gaussian window (11, σ 1.5),
    K1 = 0.01, K2 = 0.03, population covariances, averaged over channels and over the
    positions where the window fits entirely (no padding). This equals
    ``skimage.metrics.structural_similarity(…, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=…, channel_axis=…)``. Images are taken in blocks
    of 256 (each image's value is its own): the eight blurred maps of 10 k faces at once would
    take gigabytes."""
    a, b, is_numpy = _pair(x, y)
    n, c, h, w = a.shape
    if h < window or w < window:
        raise MetricError(f"SSIM needs images of at least {window}×{window}, got {h}×{w}")
    if n > SSIM_BLOCK:
        blocks = [
            ssim(a[i : i + SSIM_BLOCK], b[i : i + SSIM_BLOCK], data_range, window, sigma)
            for i in range(0, n, SSIM_BLOCK)
        ]
        return _out(torch.cat(blocks), is_numpy)
    g = gaussian_window(window, sigma, a.dtype).to(a.device)
    kx = g.view(1, 1, 1, window).expand(c, 1, 1, window)
    ky = g.view(1, 1, window, 1).expand(c, 1, window, 1)

    def blur(t):  # separable Gaussian, one group per channel, "valid" positions only
        return F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return _out(s.mean(dim=(1, 2, 3)), is_numpy)


def mse(x, y):
    a, b, is_numpy = _pair(x, y)
    return _out(((a - b) ** 2).mean(dim=(1, 2, 3)), is_numpy)


def psnr(x, y, data_range: float = 1.0):
    """Peak signal-to-noise ratio in dB per image; identical images give +inf."""
    a, b, is_numpy = _pair(x, y)
    err = ((a - b) ** 2).mean(dim=(1, 2, 3))
    return _out(10.0 * torch.log10(data_range**2 / err), is_numpy)


def l1(x, y):
    """Mean absolute difference per image."""
    a, b, is_numpy = _pair(x, y)
    return _out((a - b).abs().mean(dim=(1, 2, 3)), is_numpy)


def psnr_argmax(real, candidates, data_range: float = 1.0) -> np.ndarray:
    """The original evaluation's classifier: for each real face, the index of the candidate
    (one generated face per emotion) with the highest PSNR against it.

    real: (N, C, H, W); candidates: (N, K, C, H, W). Ties go to the lowest index (equal MSE
    means equal PSNR; comparing MSE avoids log10 of zero). Returns int64 (N,).
    """
    r, _ = _as_batch(real, "real")
    cand = (
        candidates
        if isinstance(candidates, torch.Tensor)
        else torch.as_tensor(np.asarray(candidates))
    )
    if cand.ndim != 5 or cand.shape[0] != r.shape[0] or cand.shape[2:] != r.shape[1:]:
        raise MetricError(
            f"candidates must be (N, K, C, H, W) matching real {tuple(r.shape)}, "
            f"got {tuple(cand.shape)}"
        )
    if cand.shape[1] == 0:
        raise MetricError("psnr_argmax: no candidates")
    err = ((cand.to(torch.float64) - r.to(torch.float64)[:, None]) ** 2).mean(dim=(2, 3, 4))
    # Highest PSNR = lowest MSE; argmin returns the first minimum → ties to the lowest index.
    return torch.argmin(err, dim=1).cpu().numpy().astype(np.int64)


# --------------------------------------------------------------------------------------------
# Distribution distance
# --------------------------------------------------------------------------------------------


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise MetricError(f"Fréchet distance needs (N ≥ 2, D) features, got shape {f.shape}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance_stats(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) between two Gaussians.

    Tr (Σ1 Σ2)^½ is computed as Σ √λ of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½ (same
    eigenvalues as Σ1 Σ2), which stays real and stable where sqrtm of the product does not.
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise MetricError(
            f"Fréchet distance: shapes differ (μ {mu1.shape}/{mu2.shape}, Σ {s1.shape}/{s2.shape})"
        )
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    tr_cross = np.sqrt(np.clip(lam, 0, None)).sum()
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_cross)
    return max(d, 0.0)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (FID's formula,
    in whatever feature space the caller chose)."""
    return frechet_distance_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


# --------------------------------------------------------------------------------------------
# Intervals and paired comparisons
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proportion:
    """k successes of n with a confidence interval."""

    k: int
    n: int
    lo: float
    hi: float

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise MetricError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> Proportion:
    """Wilson score interval for a binomial proportion k/n (good at small n and at 0 or n
    successes, unlike the normal approximation). n = 0 gives the uninformative [0, 1]."""
    k, n = int(k), int(n)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise MetricError(f"wilson_interval: need 0 ≤ k ≤ n, got k={k}, n={n}")
    if n == 0:
        return Proportion(0, 0, 0.0, 1.0)
    z = _z(confidence)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 or k = n the bound is exactly 0 or 1; say so instead of a rounding residue.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return Proportion(k, n, lo, hi)


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of A minus accuracy of B on the same items, with a bootstrap interval and
    McNemar's exact test on the discordant pairs."""

    diff: float
    lo: float
    hi: float
    n: int
    a_only: int  # items A got right and B wrong
    b_only: int
    p_value: float  # McNemar exact (two-sided binomial on the discordant pairs)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: P(as extreme a split of the discordant pairs | p = ½)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    m = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(m + 1))
    # Exact integer arithmetic, then one division: no overflow for any realistic n.
    return min(1.0, 2 * tail / 2**n)


def paired_difference(
    correct_a: Sequence[bool],
    correct_b: Sequence[bool],
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """acc(A) − acc(B) on the same test items: percentile bootstrap over items (pairs kept
    together, so the correlation between the two models is respected) + McNemar."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise MetricError(
            f"paired_difference: need two equal-length 1-D vectors, got {a.shape} and {b.shape}"
        )
    n = len(a)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    if n == 0:
        return PairedDifference(float("nan"), float("nan"), float("nan"), 0, 0, 0, 1.0)
    _z(confidence)  # validates
    d = a.astype(np.float64) - b.astype(np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(int(resamples), n))
    boots = d[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(boots, [tail, 1 - tail])
    return PairedDifference(
        float(d.mean()), float(lo), float(hi), n, a_only, b_only, mcnemar_exact(a_only, b_only)
    )


@dataclass(frozen=True)
class MeanInterval:
    """A mean over n items with a percentile-bootstrap interval."""

    mean: float
    lo: float
    hi: float
    n: int


def bootstrap_mean(
    values: Sequence[float], resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> MeanInterval:
    """Mean of finite values with a percentile-bootstrap interval (non-finite values, e.g. the
    +inf PSNR of identical images, are left out and not counted)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return MeanInterval(float("nan"), float("nan"), float("nan"), 0)
    tail = (1 - confidence) / 2
    _z(confidence)
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, n, size=(int(resamples), n))].mean(axis=1)
    lo, hi = np.quantile(boots, [tail, 1 - tail])
    return MeanInterval(float(v.mean()), float(lo), float(hi), n)


def bootstrap_frechet(
    features_a: np.ndarray,
    features_b: np.ndarray,
    resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> MeanInterval:
    """Fréchet distance with a percentile-bootstrap interval (both sets resampled). `mean`
    holds the full-sample distance; n the smaller set size."""
    from threadpoolctl import threadpool_limits

    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    rng = np.random.default_rng(seed)
    # Hundreds of small (D×D) eigendecompositions: one BLAS thread each is fastest, and
    # multi-threaded BLAS busy-waits badly on cores shared with other work (~50× slower).
    with threadpool_limits(limits=1, user_api="blas"):
        d = frechet_distance(a, b)
        boots = [
            frechet_distance(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
            for _ in range(int(resamples))
        ]
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(boots, [tail, 1 - tail]) if boots else (float("nan"), float("nan"))
    return MeanInterval(d, float(lo), float(hi), int(min(len(a), len(b))))


# --------------------------------------------------------------------------------------------
# Classification scores
# --------------------------------------------------------------------------------------------


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts; rows = true class, columns = predicted class."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise MetricError(f"confusion_matrix: {t.shape} labels vs {p.shape} predictions")
    if len(t) and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= n_classes):
        raise MetricError(f"confusion_matrix: class index outside [0, {n_classes})")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall per class (NaN for classes absent from the truth)."""
    cm = np.asarray(cm, dtype=np.float64)
    support = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / support, np.nan)


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean F1 over the classes present in the truth (a class never predicted and
    never true carries no information and is left out; one that is true but never predicted
    counts as F1 = 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    present = support > 0
    if not present.any():
        return float("nan")
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    return float(f1[present].mean())


# --------------------------------------------------------------------------- over seeds


def seed_spread(values: Sequence[float], prefix: str) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max of one number over several trainings
    (seeds): ``{prefix}_mean``, ``{prefix}_sd``, ``{prefix}_min``, ``{prefix}_max`` and the
    values themselves as ``{prefix}_seeds`` (non-finite values, e.g. an empty subset, are left
    out of the statistics)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    nan = float("nan")
    return {
        f"{prefix}_seeds": [float(x) for x in values],
        f"{prefix}_mean": float(v.mean()) if len(v) else nan,
        f"{prefix}_sd": float(v.std(ddof=1)) if len(v) > 1 else nan,
        f"{prefix}_min": float(v.min()) if len(v) else nan,
        f"{prefix}_max": float(v.max()) if len(v) else nan,
    }


def seed_verdict(los: Sequence[float], his: Sequence[float]) -> str:
    """What per-seed intervals of a difference A − B say together: ``A better on every seed``
    / ``B better on every seed`` (every interval excludes 0 on that side), ``no difference on
    any seed`` (every interval holds 0), else ``depends on the seed``."""
    pairs = [(lo, hi) for lo, hi in zip(los, his) if math.isfinite(lo) and math.isfinite(hi)]
    if not pairs:
        return "not computable"
    if all(lo > 0 for lo, _ in pairs):
        return "A better on every seed"
    if all(hi < 0 for _, hi in pairs):
        return "B better on every seed"
    if all(lo <= 0 <= hi for lo, hi in pairs):
        return "no difference on any seed"
    return "depends on the seed"
