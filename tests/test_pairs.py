"""Stage `pairs`: aligned face crops and landmark images, named as the original loader reads."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest

from _faces import calibrated_table, make_dataset, subject_without_neutral
from facecal import cli, geometry, render, tables
from facecal.imageio import load_image
from facecal.pairs import (
    PAIR_FILE,
    BaseParams,
    PairsError,
    PairsParams,
    plan_pairs,
    run_pairs,
)
from facecal.references import choose_references


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    lm = make_dataset(root, subjects=3)
    tables.write_table(lm, root / "landmarks.parquet")
    tables.write_table(calibrated_table(lm), root / "calibrated.parquet")
    return root, lm


def _run(dataset, tmp_path, **kw):
    root, _ = dataset
    params = PairsParams(**kw)
    out, plots = tmp_path / "pairs", tmp_path / "plots"
    summary = run_pairs(
        params,
        BaseParams(image_size=64),
        root,
        root / "landmarks.parquet",
        root / "calibrated.parquet",
        out,
        plots,
        progress=False,
    )
    with open(out / "index.csv", newline="") as f:
        index = list(csv.DictReader(f))
    return summary, index, out, plots


def _close(a, b, tol=6.0):
    """JPEG at quality 95 moves pixels by a few levels; a wrong crop moves them by tens."""
    return np.abs(a.astype(float) - b.astype(float)).mean() < tol


def test_default_pairing_writes_aligned_pairs(dataset, tmp_path):
    root, lm = dataset
    summary, index, out, plots = _run(dataset, tmp_path, style="edges")
    assert summary["pairs"] == len(lm) == len(index)
    assert summary["pairs_train"] == 14 and summary["pairs_val"] == 7
    for row in index[:5] + index[-2:]:
        pid, split = int(row["pid"]), row["split"]
        iid = int(lm.index[lm["image"] == row["image"]][0])
        assert row["landmarks_file"] == f"{split}/PID{pid}_CLEAN0_IID{iid}.jpg"
        assert row["face_file"] == f"{split}/PID{pid}_CLEAN1_IID{iid}.jpg"
        assert PAIR_FILE.match(row["ref_file"].split("/")[1])
        assert row["kind"] == "true" and row["target_emotion"] == row["emotion"]
        # the face is the geometry crop of the raw image, the landmark image the render of the
        # same points in the same frame
        pts = np.asarray(lm.loc[iid, "points"]).reshape(68, 2)
        m = geometry.crop_transform(pts, 64)
        face = load_image(out / row["face_file"])
        assert face.shape == (64, 64, 3)
        assert _close(face, geometry.warp_image(load_image(root / row["image"]), m, 64))
        drawn = render.render_landmarks(geometry.apply_affine(m, pts), 64, "edges")
        assert _close(load_image(out / row["landmarks_file"]), drawn, 3.0)
    strip = load_image(plots / "strip.png")
    assert strip.shape == (3 * 64 + 2 * 2, 8 * 64 + 7 * 2, 3)
    info = json.loads((out / "pairs.json").read_text())
    assert info["style"] == "edges" and info["image_size"] == 64 and info["pairs"] == len(lm)


def test_points_file_holds_each_pairs_target_and_reference_points_in_crop_pixels(dataset, tmp_path):
    # what gan.arch warp_refine warps by: the face's own points and its reference's own
    # points, each in its own crop's pixels
    _, lm = dataset
    _, index, out, _ = _run(dataset, tmp_path)
    by_image = {r: i for i, r in zip(lm.index, lm["image"])}
    for split in ("train", "val"):
        z = np.load(out / split / "points.npz")
        rows = [r for r in index if r["split"] == split]
        assert sorted(z["pid"].tolist()) == sorted(int(r["pid"]) for r in rows)
        assert z["target"].shape == z["ref"].shape == (len(rows), 68, 2)
        for k, pid in enumerate(z["pid"]):
            row = next(r for r in rows if int(r["pid"]) == pid)
            for key, image in (("target", row["image"]), ("ref", row["ref_image"])):
                pts = np.asarray(lm.loc[by_image[image], "points"]).reshape(68, 2)
                crop = geometry.apply_affine(geometry.crop_transform(pts, 64), pts)
                np.testing.assert_allclose(z[key][k], crop, atol=1e-4)


def test_references_are_neutral_else_least_intense_never_self(dataset, tmp_path):
    _, lm = dataset
    _, index, _, _ = _run(dataset, tmp_path, weaker_references=False)
    for row in index:
        assert row["ref_image"] and row["ref_image"] != row["image"]
        ref = lm[lm["image"] == row["ref_image"]].iloc[0]
        assert ref["subject"] == row["subject"]
        if row["emotion"] != "neutral":
            assert ref["emotion"] == "neutral"
        else:  # the neutral face itself: the least intense other image
            own = lm[(lm["subject"] == row["subject"]) & (lm["image"] != row["image"])]
            assert ref["intensity"] == own["intensity"].min()


def test_reference_order_handles_unknown_intensity():
    faces = pd.DataFrame(
        {
            "subject": ["a"] * 4,
            "emotion": ["happy", "sad", "anger", "happy"],
            "intensity": [0.9, np.nan, 0.3, 0.5],
        },
        index=[10, 11, 12, 13],
    )
    refs = choose_references(faces)
    # Least intense first, unknown intensity last; never a face of the face's own emotion.
    assert refs[10] == [12, 11]
    assert refs[12] == [13, 10, 11]
    lone = pd.DataFrame({"subject": ["b"], "emotion": ["happy"], "intensity": [1.0]}, index=[0])
    assert choose_references(lone) == {0: []}


def test_training_pairs_never_take_a_reference_of_the_same_emotion():
    """Poisoned choice: subject a has no neutral face, and its least intense other face is the
    anger apex — by intensity alone the weak anger face's pair would reference it."""
    lm = subject_without_neutral()
    plan, report = plan_pairs(lm, None, PairsParams(weaker_references=False))
    assert not report
    refs = dict(zip(plan["image"], plan["refs"]))
    assert refs["a_weak_anger.png"] == [2]
    assert refs["a_apex_anger.png"] == [2]
    assert refs["a_happy.png"] == [0, 1]
    # generation: a weak face may fall back to itself — first, for a warping generator —
    # and still never takes its own emotion's apex
    lm.index = [0, 1, 2]
    assert choose_references(lm, self_fallback=[0]) == {0: [2, 0], 1: [2], 2: [0, 1]}
    assert choose_references(lm, self_fallback=[0], self_first=True)[0] == [0, 2]


def test_upstream_pairing_uses_calibrated_points_on_the_original_face(dataset, tmp_path):
    root, lm = dataset
    cal = tables.read_table(root / "calibrated.parquet")
    summary, index, out, _ = _run(dataset, tmp_path, pairing="upstream", style="dots")
    assert summary["pairs"] == len(cal) == 2 * len(lm)
    assert {r["target_emotion"] for r in index} == {"happy", "surprise"}
    row = next(r for r in index if r["emotion"] == "neutral" and r["target_emotion"] == "surprise")
    c = cal[(cal["image"] == row["image"]) & (cal["target_emotion"] == "surprise")].iloc[0]
    m = geometry.crop_transform(np.asarray(c["points"]).reshape(68, 2), 64)
    drawn = render.render_landmarks(
        geometry.apply_affine(m, np.asarray(c["calibrated"]).reshape(68, 2)), 64, "dots"
    )
    assert _close(load_image(out / row["landmarks_file"]), drawn, 3.0)
    plain = render.render_landmarks(
        geometry.apply_affine(m, np.asarray(c["points"]).reshape(68, 2)), 64, "dots"
    )
    assert not _close(load_image(out / row["landmarks_file"]), plain, 0.5)
    assert row["kind"] == "calibrated" and row["emotion"] == "neutral"


def test_bad_items_are_reported_and_skipped(tmp_path):
    root = tmp_path / "ds"
    lm = make_dataset(root, subjects=2, emotions=("neutral", "happy"))
    (root / lm.loc[1, "image"]).write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupt image
    lm.loc[2, "points"] = [float("nan")] * 136  # bad points
    lm.loc[3, "status"] = "no_face"
    lm.loc[3, "points"] = None
    tables.write_table(lm, root / "lm.parquet")
    out = tmp_path / "out"
    summary = run_pairs(
        PairsParams(weaker_references=False),  # the plain rule (below: no reference)
        BaseParams(),
        root,
        root / "lm.parquet",
        root / "none",
        out,
        tmp_path / "plots",
        progress=False,
    )
    # rows 0, 4, 5 stay; 1 and 2 are reported; 3 was never an ok face
    assert summary["pairs"] == 3 and summary["skipped"] == 2
    with open(out / "failures.csv", newline="") as f:
        failures = {r["item"]: r["reason"] for r in csv.DictReader(f)}
    assert "corrupt" in failures[lm.loc[1, "image"]] or "readable" in failures[lm.loc[1, "image"]]
    assert "NaN" in failures[lm.loc[2, "image"]]
    # Subject s0 is left with one usable image, subject s1 with two happy faces and no neutral
    # one (neither may reference the other): three pairs without a reference, and it says so.
    assert summary["without_reference"] == 3


def test_deterministic_and_stale_files_removed(dataset, tmp_path):
    _, _, out, _ = _run(dataset, tmp_path)
    stale = out / "train" / "PID999_CLEAN0_IID999.jpg"
    stale.write_bytes(b"old")
    first = {
        p.name: p.read_bytes() for p in sorted((out / "train").iterdir()) if p.name != stale.name
    }
    _run(dataset, tmp_path)
    second = {p.name: p.read_bytes() for p in sorted((out / "train").iterdir())}
    assert first == second


def test_no_usable_faces_is_a_clear_error(tmp_path):
    lm = make_dataset(tmp_path / "ds", subjects=1, emotions=("neutral",))
    lm["status"] = "no_face"
    tables.write_table(lm, tmp_path / "lm.parquet")
    with pytest.raises(PairsError, match="no usable faces"):
        run_pairs(
            PairsParams(),
            BaseParams(),
            tmp_path / "ds",
            tmp_path / "lm.parquet",
            tmp_path / "none",
            tmp_path / "out",
            tmp_path / "plots",
            progress=False,
        )
    plan, report = plan_pairs(lm.iloc[:0], None, PairsParams())
    assert plan.empty and not report


def test_cli_reads_params_and_paths(dataset, tmp_path, repo_root):
    root, lm = dataset
    params = tmp_path / "params.yaml"
    params.write_text((repo_root / "params.yaml").read_text())
    rc = cli.main(
        [
            "pairs",
            "--data",
            str(root),
            "--landmarks",
            str(root / "landmarks.parquet"),
            "--out",
            str(tmp_path / "p"),
            "--plots",
            str(tmp_path / "pl"),
            "--params",
            str(params),
            "--set",
            "pairs.style=dots",
            "--set",
            "strip=2",
        ]
    )
    assert rc == 0
    assert json.loads((tmp_path / "p" / "pairs.json").read_text())["style"] == "dots"
    assert load_image(tmp_path / "pl" / "strip.png").shape[1] == 2 * 64 + 2
    assert (
        cli.main(
            [
                "pairs",
                "--data",
                str(root),
                "--landmarks",
                str(tmp_path / "missing"),
                "--out",
                str(tmp_path / "q"),
                "--params",
                str(params),
            ]
        )
        == 2
    )


def test_weaker_references_give_a_pair_the_subjects_weaker_faces_of_its_emotion_first():
    faces = pd.DataFrame(
        {
            "subject": ["a"] * 6,
            "emotion": ["happy", "happy", "happy", "neutral", "sad", "happy"],
            "intensity": [1.0, 0.25, 0.5, 0.0, 0.3, np.nan],
        },
        index=[10, 11, 12, 13, 14, 15],
    )
    refs = choose_references(faces, weaker_first=True)
    assert refs[10] == [11, 12, 13, 14]  # weakest happy first, never the unknown one
    assert refs[12] == [11, 13, 14]  # never an equally or more intense face of happy
    assert refs[11] == [13, 14]  # nothing weaker: the usual rule
    assert refs[15] == [13, 14]  # unknown intensity: nothing is known to be weaker
    assert refs[13] == choose_references(faces)[13]  # neutral targets: the usual rule
    # In the pairs stage: the poisoned subject's apex now references its weak anger face, the
    # weak face still never the apex.
    plan, _ = plan_pairs(subject_without_neutral(), None, PairsParams(weaker_references=True))
    refs = dict(zip(plan["image"], plan["refs"]))
    assert refs["a_apex_anger.png"] == [0, 2] and refs["a_weak_anger.png"] == [2]
