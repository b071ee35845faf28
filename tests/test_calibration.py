"""facecal.calibration: the quadratic warp (upstream and aligned), gold templates, the pca
expression model, and errors on unusable landmarks."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from facecal import calibration as cal
from facecal.errors import FacecalError
from facecal.geometry import apply_affine, to_canonical
from facecal.manifest import read_landmarks_file


def face(rng: np.random.Generator | None = None, jitter: float = 0.0) -> np.ndarray:
    """A plausible 68-point face in a 200² image (iBUG order), optionally jittered."""
    p = np.zeros((68, 2))
    t = np.linspace(0, np.pi, 17)
    p[0:17] = np.stack([100 - 60 * np.cos(t), 90 + 70 * np.sin(t)], 1)  # jaw
    p[17:22] = np.stack([np.linspace(55, 90, 5), [70, 64, 62, 63, 66]], 1)  # brows
    p[22:27] = np.stack([np.linspace(110, 145, 5), [66, 63, 62, 64, 70]], 1)
    p[27:31] = np.stack([np.full(4, 100.0), np.linspace(78, 108, 4)], 1)  # nose
    p[31:36] = np.stack([np.linspace(88, 112, 5), [115, 117, 118, 117, 115]], 1)
    for start, cx in ((36, 72), (42, 128)):  # eyes
        a = np.linspace(0, 2 * np.pi, 7)[:-1]
        p[start : start + 6] = np.stack([cx - 14 * np.cos(a), 82 - 5 * np.sin(a)], 1)
    a = np.linspace(0, 2 * np.pi, 13)[:-1]  # lips
    p[48:60] = np.stack([100 - 26 * np.cos(a), 140 - 9 * np.sin(a)], 1)
    a = np.linspace(0, 2 * np.pi, 9)[:-1]
    p[60:68] = np.stack([100 - 18 * np.cos(a), 140 - 3 * np.sin(a)], 1)
    if rng is not None and jitter:
        p = p + rng.normal(0, jitter, p.shape)
    return p


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    c, s = math.cos(math.radians(angle_deg)) * scale, math.sin(math.radians(angle_deg)) * scale
    return np.array([[c, -s, tx], [s, c, ty]])


# --------------------------------------------------------------------------- upstream vectors


def _reference_pairs(root):
    pairs = []
    for gold in sorted((root / "fer48").glob("gold_*_img*.txt")):
        emotion = gold.name.split("_")[1]
        target = next((root / "fer48").glob(f"normal_{emotion}_img*.txt"))
        pairs.append(
            (
                emotion,
                target,
                gold,
                root / "fer48" / f"parax_{emotion}.txt",
                root / "fer48" / f"paray_{emotion}.txt",
            )
        )
    h = root / "happy400"
    pairs.append(
        (
            "happy400",
            h / "sample_happy.txt",
            h / "gold_happy.txt",
            h / "parax_happy.txt",
            h / "paray_happy.txt",
        )
    )
    return pairs


def test_upstream_mode_reproduces_the_five_reference_pairs(upstream_reference):
    pairs = _reference_pairs(upstream_reference)
    assert len(pairs) == 5
    for name, target, gold, parax, paray in pairs:
        t, g = read_landmarks_file(target), read_landmarks_file(gold)
        want_x = np.loadtxt(parax, delimiter=",")
        want_y = np.loadtxt(paray, delimiter=",")
        f = cal.fit(t, g, mode="upstream")
        for got, want in ((f.par_x, want_x), (f.par_y, want_y)):
            rel = np.abs(got - want) / np.abs(want)
            assert rel.max() < 1e-4, (name, got, want)
        # Applying the published parameters and ours gives the same calibrated points.
        theirs = cal.apply_quadratic(np.stack([want_x, want_y]), t)
        np.testing.assert_allclose(f.apply(t), theirs, atol=0.05)


def test_upstream_batched_fit_of_the_reference_pairs_equals_one_by_one(upstream_reference):
    pairs = _reference_pairs(upstream_reference)[:4]  # the four 48×48 pairs share a frame
    targets = np.stack([read_landmarks_file(p[1]) for p in pairs])
    golds = np.stack([read_landmarks_file(p[2]) for p in pairs])
    batched = cal.fit(targets, golds, mode="upstream").par
    single = np.stack([cal.fit(t, g, mode="upstream").par for t, g in zip(targets, golds)])
    np.testing.assert_allclose(batched, single, rtol=1e-10, atol=1e-14)


def test_feature_order_is_the_originals():
    np.testing.assert_array_equal(
        cal.features(np.array([[2.0, 3.0]])), [[9.0, 4.0, 6.0, 3.0, 2.0, 1.0]]
    )  # y², x², xy, y, x, 1


def test_upstream_recovers_a_known_quadratic_warp_exactly():
    rng = np.random.default_rng(1)
    target = face(rng, jitter=2.0)
    par = np.array(
        [
            [2e-4, -1e-4, 3e-4, 0.05, 0.97, 4.0],  # x' in terms of [y², x², xy, y, x, 1]
            [-3e-4, 1e-4, 2e-4, 1.02, -0.03, -6.0],
        ]
    )
    gold = cal.apply_quadratic(par, target)
    # By hand for one point, so the convention cannot drift: x' = f·par_x with f = [y², x², xy, y, x, 1].
    x, y = target[5]
    f = np.array([y * y, x * x, x * y, y, x, 1.0])
    np.testing.assert_allclose(gold[5], [f @ par[0], f @ par[1]])
    fit = cal.fit(target, gold, mode="upstream")
    np.testing.assert_allclose(fit.par, par, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(fit.apply(target), gold, atol=1e-8)
    _, after = cal.rms_in_fit_frame(fit, target, fit.apply(target), gold)
    assert after < 1e-8


def test_aligned_recovers_a_warp_defined_in_the_canonical_frame():
    rng = np.random.default_rng(2)
    target = face(rng, jitter=1.5)
    can, m = to_canonical(target)
    par = np.array([[0.02, -0.01, 0.015, 0.03, 1.01, 0.0], [0.04, 0.02, -0.01, 0.98, 0.01, 0.02]])
    gold_can = cal.apply_quadratic(par, can)
    # The gold is a different picture of that shape: another scale, angle and position.
    gold_img = apply_affine(similarity(1.7, -12, 40, -15), gold_can)
    fit = cal.fit(target, gold_img, mode="aligned")
    calibrated = fit.apply(target)
    # The gold's own canonical frame differs from the target's by the similarity its anchors
    # moved under the warp; the calibrated face in its own frame must match the gold's shape.
    got_can, _ = to_canonical(calibrated)
    want_can, _ = to_canonical(gold_img)
    np.testing.assert_allclose(got_can, want_can, atol=1e-6)


# --------------------------------------------------------------------------- batching, frames


@pytest.mark.parametrize("mode", ["aligned", "upstream"])
def test_batched_equals_per_face(mode):
    rng = np.random.default_rng(3)
    targets = np.stack(
        [
            apply_affine(
                similarity(
                    rng.uniform(0.5, 2),
                    rng.uniform(-20, 20),
                    rng.uniform(-30, 30),
                    rng.uniform(-30, 30),
                ),
                face(rng, 2.0),
            )
            for _ in range(25)
        ]
    )
    gold = face(rng, 2.0)
    batched, f = cal.calibrate(targets, gold, mode)
    for i in range(len(targets)):
        one, g = cal.calibrate(targets[i], gold, mode)
        np.testing.assert_allclose(batched[i], one, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(f.par[i], g.par, rtol=1e-7, atol=1e-12)
    assert f.par.shape == (25, 2, 6) and f.par_x.shape == (25, 6)


def test_aligned_mode_is_invariant_to_similarity_transforms_of_its_inputs():
    rng = np.random.default_rng(4)
    target, gold = face(rng, 2.5), face(rng, 2.5)
    base, f0 = cal.calibrate(target, gold, "aligned")
    s = similarity(0.6, 25, 80, -40)
    moved, f1 = cal.calibrate(apply_affine(s, target), gold, "aligned")
    np.testing.assert_allclose(moved, apply_affine(s, base), atol=1e-8)  # equivariant in target
    np.testing.assert_allclose(f1.par, f0.par, atol=1e-8)  # same warp
    same, _ = cal.calibrate(target, apply_affine(similarity(2.2, -30, 5, 9), gold), "aligned")
    np.testing.assert_allclose(same, base, atol=1e-8)  # invariant in gold
    # Upstream mode is not: it fits raw pixels.
    up_moved, _ = cal.calibrate(apply_affine(s, target), gold, "upstream")
    up_base, _ = cal.calibrate(target, gold, "upstream")
    assert np.abs(up_moved - apply_affine(s, up_base)).max() > 1.0


def test_calibration_moves_toward_gold_and_alpha_blends():
    rng = np.random.default_rng(5)
    target, gold = face(rng, 3.0), face(rng, 3.0)
    full, f = cal.calibrate(target, gold, "aligned")
    before, after = cal.rms_in_fit_frame(f, target, full, gold)
    assert after < before
    half, _ = cal.calibrate(target, gold, "aligned", alpha=0.5)
    np.testing.assert_allclose(half, (target + full) / 2)
    np.testing.assert_allclose(cal.calibrate(target, gold, "aligned", alpha=0.0)[0], target)
    per_face = cal.blend(np.stack([target, target]), np.stack([full, full]), [0.0, 1.0])
    np.testing.assert_allclose(per_face[0], target)
    np.testing.assert_allclose(per_face[1], full)
    with pytest.raises(cal.CalibrationError, match="alpha"):
        cal.blend(target, full, float("nan"))


# --------------------------------------------------------------------------- errors


def _circle() -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, 69)[:-1]
    return np.stack([50 + 20 * np.cos(a), 50 + 20 * np.sin(a)], 1)


@pytest.mark.parametrize("mode", ["aligned", "upstream"])
@pytest.mark.parametrize(
    "bad, message",
    [
        (np.full((68, 2), np.nan), "NaN"),
        (np.zeros((67, 2)), "shape"),
        ("not numbers", "numeric|shape"),
        (np.stack([np.arange(68.0), 2 * np.arange(68.0) + 1], 1), "degenerate|collinear"),
        (np.tile([[10.0, 20.0]], (68, 1)), "collinear|spread|degenerate"),
    ],
)
def test_unusable_target_raises_a_clear_error(mode, bad, message):
    gold = face()
    with pytest.raises(cal.CalibrationError, match=message) as err:
        cal.calibrate(bad, gold, mode)
    assert isinstance(err.value, FacecalError)
    assert "target landmarks" in str(err.value)


def test_points_on_one_conic_do_not_determine_the_warp():
    with pytest.raises(cal.CalibrationError, match="conic"):
        cal.fit(_circle(), face(), mode="upstream")
    with pytest.raises(cal.CalibrationError, match="gold landmarks"):
        cal.fit(face(), np.full((68, 2), np.inf), mode="aligned")


def test_valid_mask_flags_each_unusable_face_in_a_batch():
    rng = np.random.default_rng(6)
    batch = np.stack(
        [
            face(rng, 1.0),
            np.full((68, 2), np.nan),
            _circle(),
            face(rng, 1.0),
            np.tile([[3.0, 4.0]], (68, 1)),
        ]
    )
    assert cal.valid_mask(batch).tolist() == [True, False, False, True, False]
    with pytest.raises(cal.CalibrationError, match=re.escape("face(s) [2]")):
        cal.check_landmarks(batch[[0, 3, 2]])


# --------------------------------------------------------------------------- gold templates


def test_gold_template_is_the_aligned_mean_of_the_most_intense_faces():
    rng = np.random.default_rng(7)
    faces = np.stack([face(rng, 2.0) for _ in range(6)])
    # Each face in its own picture: alignment must undo scale/rotation/offset before averaging.
    placed = np.stack(
        [
            apply_affine(similarity(1 + 0.3 * i, 5 * i, 10 * i, -7 * i), f)
            for i, f in enumerate(faces)
        ]
    )
    names = [f"f{i}.png" for i in range(6)]
    intensity = np.array([0.2, 0.9, np.nan, 0.9, 0.5, 1.0])
    g = cal.gold_template("happy", placed, names, intensity, top_k=3, mode="aligned")
    assert g.sources == ["f5.png", "f1.png", "f3.png"]  # most intense first, ties by name
    assert g.frame == "canonical"
    np.testing.assert_allclose(g.points, to_canonical(faces[[5, 1, 3]])[0].mean(0), atol=1e-9)
    up = cal.gold_template("happy", placed, names, intensity, top_k=1, mode="upstream")
    assert up.frame == "pixels" and up.sources == ["f5.png"]
    np.testing.assert_allclose(up.points, placed[5])  # k = 1: exactly the named face
    # No intensities known (FER2013): the typical shape of the emotion, all faces.
    allg = cal.gold_template("happy", placed, names, np.full(6, np.nan), top_k=2)
    assert len(allg.sources) == 6


# --------------------------------------------------------------------------- pca


def test_expression_model_recovers_the_direction_and_keeps_identity():
    rng = np.random.default_rng(8)
    neutral = to_canonical(face())[0]
    v = np.zeros((68, 2))
    v[48:68, 1] = np.linspace(-1, 1, 20)  # a mouth-opening pattern
    v /= np.linalg.norm(v)
    n_subj = 12
    identities = rng.normal(0, 0.01, (n_subj, 68, 2))
    refs, can, emos = [], [], []
    for s in range(n_subj):
        for t in (0.0, 0.3, 0.6, 1.0):
            refs.append(neutral + identities[s])
            can.append(neutral + identities[s] + t * 0.4 * v + rng.normal(0, 1e-4, (68, 2)))
            emos.append("neutral" if t == 0 else "surprise")
    refs, can, emos = np.array(refs), np.array(can), np.array(emos)
    apex = np.flatnonzero(
        np.isclose([np.sum((c - r) * v) for c, r in zip(can, refs)], 0.4, atol=0.01)
    )
    model = cal.expression_model(can, emos, refs, neutral, {"surprise": (can[apex], refs[apex])})
    d = model.directions["surprise"]
    assert abs(np.sum(d * v)) > 0.999 and np.sum(d * v) > 0  # signed toward expressing
    assert model.gold_coordinate["surprise"] == pytest.approx(0.4, abs=0.01)
    # A weak face of a new subject, in its own picture, moves to the gold's coordinate along
    # the direction only: everything orthogonal to it (the person's shape) stays.
    ident = rng.normal(0, 0.01, (68, 2))
    reference = to_canonical(neutral + ident)[0]
    picture = similarity(90, 8, 120, 100)
    weak_img = apply_affine(picture, neutral + ident + 0.1 * v)
    moved_img = model.move("surprise", weak_img, reference=reference)
    weak_can, frame = to_canonical(weak_img)
    moved_can = apply_affine(frame, moved_img)
    delta = moved_can - weak_can
    np.testing.assert_allclose(delta, np.sum(delta * d) * d, atol=1e-9)
    assert model.coordinate("surprise", weak_can, reference) == pytest.approx(0.1, abs=0.01)
    assert model.coordinate("surprise", moved_can, reference) == pytest.approx(
        model.gold_coordinate["surprise"], abs=1e-9
    )
    half = apply_affine(frame, model.move("surprise", weak_img, reference, alpha=0.5))
    np.testing.assert_allclose(half, weak_can + delta / 2, atol=1e-9)
    with pytest.raises(cal.CalibrationError, match="no expression direction"):
        model.move("happy", weak_img)


def test_gold_model_round_trips_gold_json_for_both_methods():
    rng = np.random.default_rng(9)
    target, gold = face(rng, 2.0), to_canonical(face(rng, 2.0))[0]
    quad = cal.GoldModel.from_json(
        {
            "mode": "aligned",
            "frame": "canonical",
            "method": "quadratic",
            "emotions": {"happy": {"points": gold.tolist(), "sources": ["a.png"]}},
        }
    )
    np.testing.assert_allclose(
        quad.calibrate(target, "happy", alpha=0.5), cal.calibrate(target, gold, "aligned", 0.5)[0]
    )
    v = np.zeros((68, 2))
    v[57, 1] = 1.0
    pca = cal.GoldModel.from_json(
        {
            "mode": "aligned",
            "frame": "canonical",
            "method": "pca",
            "neutral_mean": gold.tolist(),
            "emotions": {
                "happy": {
                    "points": gold.tolist(),
                    "sources": [],
                    "direction": v.tolist(),
                    "coordinate": 0.3,
                }
            },
        }
    )
    moved = pca.calibrate(target, "happy")
    assert not np.allclose(moved, target)
    with pytest.raises(cal.CalibrationError, match="no gold template"):
        pca.calibrate(target, "anger")
    with pytest.raises(cal.CalibrationError, match="malformed"):
        cal.GoldModel.from_json({"emotions": {"happy": {}}})


# --------------------------------------------------------------------------- learned


def _linear_world(rng: np.random.Generator, n_subjects: int, dims: int = 4, noise: float = 5e-4):
    """Shapes varying in `dims` known directions around a canonical face, and a known linear
    law for the apex: ``apex = x + m + z(x)·C + t·c`` (z = coordinates in those directions,
    t = the source's own intensity)."""
    mu = to_canonical(face())[0]
    basis = np.linalg.qr(rng.normal(size=(136, dims)))[0].T  # (dims, 136) orthonormal
    m = rng.normal(0, 0.02, (68, 2))
    coef = rng.normal(0, 0.5, (dims, 136))
    c = rng.normal(0, 0.02, (68, 2))

    def apex(x, t):
        z = (x - mu).reshape(len(x), -1) @ basis.T
        return x + m + (z @ coef).reshape(-1, 68, 2) + t[:, None, None] * c

    def shapes(n):
        z = rng.normal(0, 0.03, (n, dims))
        return mu + (z @ basis).reshape(n, 68, 2) + rng.normal(0, 1e-5, (n, 68, 2))

    src, t, groups = [], [], []
    for s in range(n_subjects):
        for ti in (0.0, 0.25, 0.5):
            src.append(shapes(1)[0])
            t.append(ti)
            groups.append(f"s{s:02d}")
    src, t = np.array(src), np.array(t)
    observed = apex(src, t) + rng.normal(0, noise, src.shape)  # landmark noise on the apexes
    return shapes, apex, cal.Pairs(src, observed, np.array(groups), t)


def test_learned_model_recovers_a_known_linear_displacement():
    rng = np.random.default_rng(11)
    shapes, apex, pairs = _linear_world(rng, n_subjects=12)
    # The shape basis from the source faces: they vary in exactly the law's 4 directions.
    basis_faces = pairs.source
    model = cal.fit_learned(
        basis_faces,
        pairs.groups,
        {"happy": pairs},
        ranks=(0, 2, 4, 8),
        ridges=(1e-9, 1.0),
        n_folds=4,
    )
    e = model.emotions["happy"]
    # The true law needs exactly the 4 directions the faces vary in; more only fit the noise,
    # fewer miss part of it, so cross-validation over subjects lands on rank 4.
    assert e.rank == 4 and e.ridge == 1e-9
    assert (e.n_pairs, e.n_subjects) == (36, 12) and e.cv_nme is not None
    new = shapes(20)  # faces of new subjects
    t = rng.uniform(0, 0.5, 20)
    err = np.abs(model.predict("happy", new, t) - apex(new, t))
    assert err.max() < 1.5e-3 and err.mean() < 3e-4  # within the apexes' noise (σ 5e-4)
    # A mean displacement alone (rank 0) cannot follow the face's shape.
    flat = cal.fit_learned(basis_faces, pairs.groups, {"happy": pairs}, ranks=(0,))
    assert np.abs(flat.predict("happy", new, t) - apex(new, t)).max() > 1e-3


def test_learned_move_alpha_and_picture_frame():
    rng = np.random.default_rng(12)
    shapes, apex, pairs = _linear_world(rng, n_subjects=8)
    model = cal.fit_learned(pairs.source, pairs.groups, {"fear": pairs}, ranks=(0, 4))
    x = shapes(1)[0]
    picture = similarity(80, -6, 130, 90)
    img = apply_affine(picture, x)
    np.testing.assert_allclose(model.move("fear", img, alpha=0.0), img, atol=1e-9)  # identity
    full = model.move("fear", img, alpha=1.0)
    can, frame = to_canonical(img)
    np.testing.assert_allclose(apply_affine(frame, full), model.predict("fear", can), atol=1e-9)
    half = model.move("fear", img, alpha=0.5)
    np.testing.assert_allclose(half, (img + full) / 2, atol=1e-9)
    # Batched, one alpha per face, and the face's own intensity shifts the prediction.
    batch = np.stack([img, img])
    both = model.move("fear", batch, alpha=np.array([0.0, 1.0]))
    np.testing.assert_allclose(both, np.stack([img, full]), atol=1e-9)
    assert not np.allclose(model.move("fear", img, intensity=0.5), full)
    with pytest.raises(cal.CalibrationError, match="no learned model"):
        model.move("anger", img)
    with pytest.raises(cal.CalibrationError, match="alpha"):
        model.move("fear", img, alpha=math.nan)


def test_gold_model_round_trips_a_learned_gold_json():
    rng = np.random.default_rng(13)
    shapes, _, pairs = _linear_world(rng, n_subjects=6)
    model = cal.fit_learned(pairs.source, pairs.groups, {"sad": pairs}, ranks=(0, 2, 4))
    top, per = cal.learned_to_json(model)
    gold = to_canonical(face())[0]
    data = {
        "mode": "aligned",
        "frame": "canonical",
        "method": "learned",
        **top,
        "emotions": {"sad": {"points": gold.tolist(), "sources": [], **per["sad"]}},
    }
    import json

    served = cal.GoldModel.from_json(json.loads(json.dumps(data)))  # through text, as shipped
    img = apply_affine(similarity(70, 3, 100, 110), shapes(1)[0])
    for alpha in (0.0, 0.4, 1.0):
        np.testing.assert_allclose(
            served.calibrate(img, "sad", alpha), model.move("sad", img, alpha), atol=1e-12
        )
    np.testing.assert_allclose(served.calibrate(img, "sad", 0.0), img, atol=1e-9)
    bad = json.loads(json.dumps(data))
    bad["emotions"]["sad"]["coef"] = [[0.0] * 136] * 50  # rank above the basis
    with pytest.raises(cal.CalibrationError, match="malformed"):
        cal.GoldModel.from_json(bad)
    del data["emotions"]["sad"]["offset"]
    with pytest.raises(cal.CalibrationError, match="malformed"):
        cal.GoldModel.from_json(data)
