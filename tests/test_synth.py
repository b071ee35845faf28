"""The embedded synthetic dataset: determinism, layout, expression geometry, and what dlib sees."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from facecal import cli, emotions, geometry, manifest
from facecal.data.synth import (
    SynthConfig,
    SynthError,
    face_points,
    measure_dlib,
    render_dataset,
    render_face,
)

SMALL = SynthConfig(subjects=8, intensities=(0.25, 1.0))  # = the synth_small fixture


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_bytes_with_any_worker_count(tmp_path):
    config = SynthConfig(
        subjects=2, intensities=(0.5, 1.0), emotions=("happy", "surprise"), size=64, seed=7
    )
    rows1 = render_dataset(tmp_path / "a", config, workers=1, progress=False)
    rows2 = render_dataset(tmp_path / "b", config, workers=2, progress=False)
    assert rows1 == rows2
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 2 * 5 * 2 + 1
    assert a == b
    # A different seed gives different faces.
    rows3 = render_dataset(
        tmp_path / "c", SynthConfig(**{**config.__dict__, "seed": 8}), workers=1, progress=False
    )
    c = _files(tmp_path / "c")
    assert [r.image for r in rows3] == [r.image for r in rows1]
    assert a["images/s000/s000_happy_100.png"] != c["images/s000/s000_happy_100.png"]


def test_manifest_layout_and_counts(synth_small):
    rows, report = manifest.read_manifest(synth_small)
    assert not report, report.problems
    n_per_subject = 1 + len(SMALL.emotions) * len(SMALL.intensities)
    assert len(rows) == SMALL.subjects * n_per_subject
    assert {r.source for r in rows} == {"synthetic"}
    assert Counter(r.subject for r in rows) == {f"s{i:03d}": n_per_subject for i in range(8)}
    counts = Counter((r.emotion, r.intensity) for r in rows)
    assert counts[("neutral", 0.0)] == SMALL.subjects
    for emo in emotions.EXPRESSIVE:
        for inten in SMALL.intensities:
            assert counts[(emo, inten)] == SMALL.subjects
    assert len(counts) == 1 + 7 * 2
    for r in rows:
        assert r.image == f"images/{r.subject}/{Path(r.image).name}"
        assert r.landmarks == f"landmarks/{r.subject}/{Path(r.image).stem}.txt"
    # Nothing but the dataset in the folder.
    files = {p.relative_to(synth_small).as_posix() for p in synth_small.rglob("*") if p.is_file()}
    assert files == {"manifest.csv"} | {r.image for r in rows} | {r.landmarks for r in rows}


def test_files_hold_the_rendered_pixels_and_points(synth_small):
    from facecal.imageio import load_image

    rows, _ = manifest.read_manifest(synth_small)
    for r in rows[::23]:
        img, pts = render_face(SMALL, int(r.subject[1:]), r.emotion, r.intensity)
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        np.testing.assert_array_equal(load_image(synth_small / r.image), img)
        truth = manifest.read_landmarks_file(synth_small / r.landmarks)
        np.testing.assert_allclose(truth, pts, atol=6e-4)
        np.testing.assert_array_equal(
            face_points(SMALL, int(r.subject[1:]), r.emotion, r.intensity), pts
        )
        # The face lies inside the picture, and the points are a plausible face.
        assert pts.min() > 2 and pts.max() < 126
        io = geometry.interocular(pts)
        assert 40 < io < 58


_EYE_CORNERS = [36, 39, 42, 45]


def _points(subject: int, emotion: str, intensity: float, seed: int = 0) -> np.ndarray:
    """The face's true points, posed by its eye corners (which expressions barely move) on
    the canonical frame: pose jitter removed, expression kept."""
    pts = face_points(SynthConfig(seed=seed), subject, emotion, intensity)
    m = geometry.fit_similarity(pts[_EYE_CORNERS], geometry.CANONICAL_RIGID[9:13])
    return geometry.apply_affine(m, pts)


@pytest.mark.parametrize("subject", range(6))
def test_expressions_move_the_landmarks_their_own_way(subject):
    neutral = _points(subject, "neutral", 0.0)
    levels = (0.25, 0.5, 0.75, 1.0)

    def series(emotion, measure):
        return np.array([measure(_points(subject, emotion, i)) - measure(neutral) for i in levels])

    corners_y = lambda p: p[[48, 54], 1].mean()  # noqa: E731 (image y points down)
    mouth_w = lambda p: p[54, 0] - p[48, 0]  # noqa: E731
    opening = lambda p: (p[[65, 66, 67], 1] - p[[63, 62, 61], 1]).mean()  # noqa: E731
    brow_y = lambda p: p[17:27, 1].mean()  # noqa: E731
    inner_brow_y = lambda p: p[[21, 22], 1].mean()  # noqa: E731
    brow_gap = lambda p: p[22, 0] - p[21, 0]  # noqa: E731
    eye_open = lambda p: (p[[41, 40, 47, 46], 1] - p[[37, 38, 43, 44], 1]).mean()  # noqa: E731
    nose_base_y = lambda p: p[31:36, 1].mean()  # noqa: E731
    lip_height = lambda p: p[57, 1] - p[51, 1]  # noqa: E731

    def rising(values, least):  # strictly growing with intensity, clearly visible at apex
        assert np.all(np.diff(values) > 0), values
        assert values[-1] > least, values

    rising(-series("happy", corners_y), 0.1)  # corners up …
    rising(series("happy", mouth_w), 0.1)  # … and out
    rising(series("surprise", opening), 0.25)  # jaw drops
    rising(-series("surprise", brow_y), 0.12)  # brows up
    rising(series("surprise", eye_open), 0.05)  # eyes wide
    rising(series("anger", brow_y), 0.06)  # brows down …
    rising(-series("anger", brow_gap), 0.04)  # … and together
    rising(-series("anger", lip_height), 0.04)  # lips pressed
    rising(-series("anger", eye_open), 0.02)  # lids tightened
    rising(series("sad", corners_y), 0.06)  # corners down
    rising(-series("sad", inner_brow_y), 0.06)  # inner brows up
    rising(series("fear", eye_open), 0.05)  # eyes wide
    rising(series("fear", mouth_w), 0.08)  # lips stretched
    rising(-series("fear", brow_gap), 0.02)  # brows together
    rising(-series("disgust", nose_base_y), 0.03)  # nose wrinkled up
    rising(series("disgust", brow_y), 0.02)  # brows lowered
    # Contempt lifts one corner much more than the other.
    c = _points(subject, "contempt", 1.0) - neutral
    lift = -c[[48, 54], 1]
    assert abs(lift[1] - lift[0]) > 0.05 and max(lift) > 0.06


def test_subjects_differ_in_identity_and_in_expression_style():
    n = 8
    neutral = np.stack([_points(s, "neutral", 0.0) for s in range(n)])
    # Identity: every pair of neutral faces differs clearly (NME in the canonical frame).
    for i in range(n):
        for j in range(i + 1, n):
            assert geometry.nme(neutral[i], neutral[j]) > 0.02
    for emo in emotions.EXPRESSIVE:
        apex = np.stack([_points(s, emo, 1.0) for s in range(n)])
        moves = (apex - neutral).reshape(n, -1)
        mean = moves.mean(0)
        # Each subject's own style: nobody's expression is a copy of another's, and two
        # subjects typically differ by a fifth of the motion or more …
        rel = [
            np.linalg.norm(moves[i] - moves[j]) / np.linalg.norm(mean)
            for i in range(n)
            for j in range(i + 1, n)
        ]
        assert min(rel) > 0.02 and np.median(rel) > 0.2, (emo, min(rel), np.median(rel))
        # … but the emotion's common direction dominates every subject's movement.
        cos = moves @ mean / (np.linalg.norm(moves, axis=1) * np.linalg.norm(mean))
        assert cos.min() > 0.6, (emo, cos)


def test_the_average_expression_moves_a_weak_face_toward_its_own_apex():
    """The premise of calibration on this data: adding an emotion's average weak → apex motion
    (learnt from *other* subjects) brings a weak face closer to its own apex."""
    n = 10
    for emo in emotions.EXPRESSIVE:
        weak = np.stack([_points(s, emo, 0.25) for s in range(n)])
        apex = np.stack([_points(s, emo, 1.0) for s in range(n)])
        gain = []
        for s in range(n):
            others = np.delete(np.arange(n), s)
            moved = weak[s] + (apex[others] - weak[others]).mean(0)
            gain.append(geometry.nme(weak[s], apex[s]) - geometry.nme(moved, apex[s]))
        gain = np.array(gain)
        assert (gain > 0).all(), (emo, gain)


def test_config_and_output_folder_errors(tmp_path):
    with pytest.raises(SynthError, match="subjects"):
        SynthConfig(subjects=0)
    with pytest.raises(SynthError, match="intensities"):
        SynthConfig(intensities=(0.0, 1.0))
    with pytest.raises(SynthError, match="emotions"):
        SynthConfig(emotions=("happy", "bored"))
    with pytest.raises(SynthError, match="size"):
        SynthConfig(size=16)
    with pytest.raises(SynthError, match="percent"):
        SynthConfig(intensities=(0.501, 0.502))
    config = SynthConfig(subjects=1, intensities=(1.0,), emotions=("sad",), size=64)
    # Leftovers of an interrupted run are cleared, not mixed into the set.
    (tmp_path / ".synth-partial" / "images").mkdir(parents=True)
    (tmp_path / ".synth-partial" / "images" / "junk.png").write_bytes(b"x")
    render_dataset(tmp_path, config, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "landmarks", "manifest.csv"]
    with pytest.raises(SynthError, match="already holds a dataset"):
        render_dataset(tmp_path, config, workers=1, progress=False)
    # --overwrite replaces the set exactly (no stale files of a bigger earlier set).
    stale = tmp_path / "images" / "s000" / "stale.png"
    stale.write_bytes(b"x")
    rows = render_dataset(tmp_path, config, workers=1, progress=False, overwrite=True)
    assert not stale.exists() and len(rows) == 2


def test_cli_renders_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "data"
    assert (
        cli.main(
            [
                "data",
                "synth",
                "--out",
                str(out),
                "--subjects",
                "1",
                "--size",
                "64",
                "--workers",
                "1",
                "--no-measure",
            ]
        )
        == 0
    )
    rows, report = manifest.read_manifest(out)
    assert len(rows) == 1 + 7 * 4 and not report
    assert "rendered 29 faces" in capsys.readouterr().out
    assert cli.main(["data", "synth", "--out", str(out), "--no-measure"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err


def test_dlib_finds_the_default_faces_and_their_landmarks(synth_default):
    """Acceptance (issue 2): dlib's HOG detector (upsample 1) finds ≥ 90 % of a freshly
    rendered default set, and its 68 points land within NME ≤ 0.10 of the truth."""
    m = measure_dlib(synth_default, upsample=1, workers=0)
    print(
        f"\nsynthetic default set: dlib detection {m['detection_rate']:.4f} "
        f"({m['n_detected']}/{m['n']}), NME mean {m['nme_mean']:.4f}, "
        f"median {m['nme_median']:.4f}, p95 {m['nme_p95']:.4f}"
    )
    assert m["n"] == 40 * (7 * 4 + 1)
    assert m["detection_rate"] >= 0.90
    assert m["nme_mean"] <= 0.10
    for emo, s in m["per_emotion"].items():
        assert s["detection_rate"] >= 0.85, (emo, s)
        assert s["nme_mean"] <= 0.12, (emo, s)


def test_measure_dlib_counts_a_face_that_is_not_there(tmp_path, synth_small):
    """A detection only counts when its box holds the true face: with the truth moved off the
    face, the same images count as misses."""
    import shutil

    rows, _ = manifest.read_manifest(synth_small)
    keep = [r for r in rows if r.subject == "s000"][:6]
    for r in keep:
        for rel in (r.image, r.landmarks):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(synth_small / rel, tmp_path / rel)
    manifest.write_manifest(tmp_path, keep)
    good = measure_dlib(tmp_path, workers=1)
    assert good["n"] == 6 and good["detection_rate"] == 1.0 and good["nme_mean"] < 0.1
    for r in keep:  # shift the truth into a corner of the picture
        pts = manifest.read_landmarks_file(tmp_path / r.landmarks)
        manifest.write_landmarks_file(tmp_path / r.landmarks, pts * 0.1)
    bad = measure_dlib(tmp_path, workers=1)
    assert bad["detection_rate"] == 0.0 and len(bad["missed"]) == 6
    assert np.isnan(bad["nme_mean"])
