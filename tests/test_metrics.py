"""facecal.metrics: image quality against references, Fréchet on known Gaussians, intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from facecal import metrics
from facecal.metrics import MetricError


def _pair_images(seed=0, shape=(3, 32, 40)):
    rng = np.random.default_rng(seed)
    a = rng.random(shape)
    # A blurred, shifted, noisy version: SSIM well inside (0, 1), not a trivial case.
    b = np.clip(0.7 * a + 0.3 * np.roll(a, 2, axis=-1) + 0.05 * rng.standard_normal(shape), 0, 1)
    return a, b


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_skimage(channels):
    a, b = _pair_images(shape=(channels, 32, 40))
    ref = structural_similarity(
        a,
        b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=0,
    )
    ours = metrics.ssim(a, b)
    assert ours.shape == (1,)
    assert ours[0] == pytest.approx(ref, abs=1e-7)


def test_ssim_batched_torch_equals_per_image_and_identity_is_one():
    imgs = [_pair_images(seed=s) for s in range(3)]
    a = torch.tensor(np.stack([p[0] for p in imgs]), dtype=torch.float32)
    b = torch.tensor(np.stack([p[1] for p in imgs]), dtype=torch.float32)
    batch = metrics.ssim(a, b)
    assert isinstance(batch, torch.Tensor) and batch.shape == (3,)
    singles = [float(metrics.ssim(a[i], b[i])[0]) for i in range(3)]
    np.testing.assert_allclose(batch.numpy(), singles, atol=1e-6)
    assert torch.allclose(metrics.ssim(a, a), torch.ones(3), atol=1e-6)
    assert (batch < 0.95).all()


def test_ssim_in_blocks_equals_one_batch():
    # More images than one block: the blocks' values are those of the whole batch, in order.
    rng = np.random.default_rng(0)
    n = metrics.SSIM_BLOCK + 7
    a = rng.random((n, 3, 16, 16)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    blocked = metrics.ssim(a, b)
    assert blocked.shape == (n,)
    tail = metrics.ssim(a[-7:], b[-7:])
    np.testing.assert_allclose(blocked[-7:], tail, atol=1e-6)
    head = metrics.ssim(a[:3], b[:3])
    np.testing.assert_allclose(blocked[:3], head, atol=1e-6)


def test_ssim_rejects_small_and_mismatched_and_uint8():
    with pytest.raises(MetricError, match="at least 11"):
        metrics.ssim(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(MetricError, match="shapes differ"):
        metrics.ssim(np.zeros((16, 16)), np.zeros((16, 17)))
    with pytest.raises(MetricError, match="/255"):
        metrics.ssim(np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8))


def test_psnr_and_l1_known_values():
    a = np.zeros((1, 1, 4, 4))
    b = np.full((1, 1, 4, 4), 0.1)
    # MSE = 0.01 → PSNR = 10·log10(1 / 0.01) = 20 dB.
    assert metrics.psnr(a, b)[0] == pytest.approx(20.0)
    assert metrics.l1(a, b)[0] == pytest.approx(0.1)
    assert metrics.psnr(a, b, data_range=255.0)[0] == pytest.approx(20 + 20 * math.log10(255))
    assert math.isinf(metrics.psnr(a, a)[0])


def test_psnr_argmax_tiny_case_by_hand():
    # Real faces are 1×2×2. Face 0 = all 0.5; face 1 = [[0, 1], [0, 1]].
    real = np.array([[[[0.5, 0.5], [0.5, 0.5]]], [[[0.0, 1.0], [0.0, 1.0]]]])
    # Three candidates (emotions) per face.
    cand = np.zeros((2, 3, 1, 2, 2))
    cand[0, 0] = 0.0  # MSE 0.25   → PSNR 6.02 dB
    cand[0, 1] = 0.6  # MSE 0.01   → PSNR 20 dB   ← best
    cand[0, 2] = 0.3  # MSE 0.04   → PSNR 13.98 dB
    cand[1, 0] = [[0, 1], [0, 1]]  # MSE 0 → +inf  ← best
    cand[1, 1] = [[0, 1], [0, 0.9]]  # MSE 0.0025
    cand[1, 2] = [[1, 0], [1, 0]]  # MSE 1
    assert metrics.psnr_argmax(real, cand).tolist() == [1, 0]
    # Ties go to the lowest index.
    tie = np.stack([cand[0, 2], cand[0, 1], cand[0, 1]])[None]
    assert metrics.psnr_argmax(real[:1], tie).tolist() == [1]


def test_frechet_known_gaussians_closed_form():
    # Commuting (diagonal) covariances: d = ‖μ1−μ2‖² + Σ (√a − √b)².
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = 5.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
    assert metrics.frechet_distance_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(
        expected
    )
    # Non-commuting covariances against scipy's matrix square root.
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    m1, m2 = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(4), m2 @ m2.T + 0.1 * np.eye(4)
    ref = np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    assert metrics.frechet_distance_stats(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(
        ref, rel=1e-8
    )
    # Equal Gaussians: 0.
    assert metrics.frechet_distance_stats(mu1, s1[:3, :3], mu1, s1[:3, :3]) == pytest.approx(
        0.0, abs=1e-9
    )


def test_frechet_from_samples_converges_to_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal([0, 0], [1, 2], size=(200_000, 2))
    y = rng.normal([3, 0], [2, 2], size=(200_000, 2))
    # ‖(3,0)‖² + (1−2)² + (2−2)² = 10
    assert metrics.frechet_distance(x, y) == pytest.approx(10.0, rel=0.01)
    with pytest.raises(MetricError):
        metrics.frechet_distance(x[:1], y)


def test_wilson_interval_known_values():
    # k=20, n=36 (the paper's PSNR-argmax anger result), z = 1.959964:
    # centre = (p + z²/2n)/(1 + z²/n), half = z·√(p(1−p)/n + z²/4n²)/(1 + z²/n)
    w = metrics.wilson_interval(20, 36)
    assert w.value == pytest.approx(20 / 36)
    assert (w.lo, w.hi) == pytest.approx((0.39581, 0.70459), abs=1e-5)
    from scipy.stats import binomtest

    ref = binomtest(20, 36).proportion_ci(confidence_level=0.95, method="wilson")
    assert (w.lo, w.hi) == pytest.approx((ref.low, ref.high), abs=1e-12)
    # Edges stay inside [0, 1] and are not degenerate.
    zero, full = metrics.wilson_interval(0, 10), metrics.wilson_interval(10, 10)
    assert zero.lo == 0.0 and zero.hi == pytest.approx(0.2775, abs=1e-4)
    assert full.hi == 1.0 and full.lo == pytest.approx(0.7225, abs=1e-4)
    assert metrics.wilson_interval(0, 0) == metrics.Proportion(0, 0, 0.0, 1.0)
    # Wider at higher confidence.
    assert metrics.wilson_interval(20, 36, 0.99).lo < w.lo
    with pytest.raises(MetricError):
        metrics.wilson_interval(5, 3)


def test_paired_difference_bootstrap_and_mcnemar():
    a = np.array([1] * 30 + [0] * 10, bool)
    b = a.copy()
    b[:8] = False  # A right, B wrong on 8 items
    b[30:32] = True  # B right, A wrong on 2
    r = metrics.paired_difference(a, b, resamples=4000, seed=0)
    assert r.diff == pytest.approx(6 / 40)
    assert (r.a_only, r.b_only, r.n) == (8, 2, 40)
    assert r.lo < r.diff < r.hi
    # Normal approximation of the paired difference: se = √((b + c)/n − d²)/√n = 0.0754,
    # so ≈ 0.15 ± 0.148; the percentile bootstrap lands close to it.
    se = math.sqrt((8 + 2) / 40 - 0.15**2) / math.sqrt(40)
    assert r.lo == pytest.approx(0.15 - 1.96 * se, abs=0.03)
    assert r.hi == pytest.approx(0.15 + 1.96 * se, abs=0.03)
    # McNemar exact: 2·P(X ≤ 2 | Bin(10, ½)) = 2·56/1024.
    assert r.p_value == pytest.approx(2 * 56 / 1024)
    assert metrics.paired_difference(a, b, resamples=4000, seed=0) == r  # deterministic
    same = metrics.paired_difference(a, a)
    assert (same.diff, same.lo, same.hi, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(MetricError):
        metrics.paired_difference(a, b[:-1])


def test_confusion_recall_macro_f1():
    y = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 0, 2]
    cm = metrics.confusion_matrix(y, p, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    rec = metrics.per_class_recall(cm)
    assert rec[:3].tolist() == [0.5, 1.0, 0.5] and math.isnan(rec[3])
    # F1: class0 P=1/2 R=1/2 → 0.5; class1 P=2/3 R=1 → 0.8; class2 P=1 R=1/2 → 2/3
    assert metrics.macro_f1(cm) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    with pytest.raises(MetricError):
        metrics.confusion_matrix([0, 5], [0, 1], 4)


def test_bootstrap_mean_and_frechet_intervals():
    rng = np.random.default_rng(0)
    v = rng.normal(2.0, 1.0, 400)
    m = metrics.bootstrap_mean(np.append(v, np.inf), resamples=2000, seed=1)
    assert m.n == 400 and m.mean == pytest.approx(v.mean())
    # ≈ mean ± 1.96·σ/√n
    assert m.hi - m.lo == pytest.approx(2 * 1.96 / 20, rel=0.15)
    assert m.lo < 2.0 < m.hi
    assert metrics.bootstrap_mean([]).n == 0
    x, y = rng.normal(0, 1, (300, 2)), rng.normal([2, 0], 1, (300, 2))
    f = metrics.bootstrap_frechet(x, y, resamples=100, seed=0)
    assert f.mean == pytest.approx(metrics.frechet_distance(x, y))
    assert f.lo < f.mean < f.hi and f.hi - f.lo < 2.0 and f.n == 300
