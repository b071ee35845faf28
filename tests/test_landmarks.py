"""Stage `landmarks` and `facecal landmarks -i`: real dlib on rendered synthetic faces, broken
files reported without costing other images their result, deterministic subject splits."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from facecal import cli
from facecal import landmarks as lm
from facecal.data.synth import SynthConfig, render_dataset, render_face
from facecal.detector import LandmarkDetector
from facecal.geometry import nme
from facecal.imageio import load_image, save_image
from facecal.manifest import (
    Row,
    read_landmarks_file,
    read_manifest,
    write_landmarks_file,
    write_manifest,
)
from facecal.tables import points_array, read_table

CFG = SynthConfig(subjects=4, emotions=("happy", "surprise"), intensities=(0.25, 0.5, 1.0))


@pytest.fixture(scope="module")
def detector():
    return LandmarkDetector(upsample=1)


@pytest.fixture(scope="module")
def one_face():
    img, pts = render_face(CFG, 0, "happy", 1.0)
    return img, pts


def build_dataset(root, synth_dir):
    """The synthetic faces plus every kind of broken row, under a fresh manifest.

    Synthetic images are linked, not copied; the broken ones live in `broken/`."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "landmarks"):
        os.symlink(synth_dir / sub, root / sub)
    rows, _ = read_manifest(synth_dir)
    subject = rows[0].subject
    b = root / "broken"
    b.mkdir()
    good = (synth_dir / rows[0].image).read_bytes()
    (b / "truncated.png").write_bytes(good[: len(good) // 2])
    (b / "not_an_image.png").write_text("hello")
    shutil.copy(synth_dir / rows[0].image, b / "copy.png")
    (b / "short.txt").write_text("1 2\n3 4\n")
    save_image(np.full((96, 96, 3), 128, np.uint8), b / "blank.png")
    write_landmarks_file(b / "blank.txt", read_landmarks_file(synth_dir / rows[0].landmarks))
    save_image(np.full((96, 96, 3), 200, np.uint8), b / "blank_no_truth.png")
    extra = [
        Row("broken/truncated.png", subject, "happy", 0.5, None, "test"),
        Row("broken/not_an_image.png", subject, "happy", 0.5, None, "test"),
        Row("broken/copy.png", subject, "happy", 0.5, "broken/short.txt", "test"),
        Row("broken/blank.png", subject, "happy", 0.5, "broken/blank.txt", "test"),
        Row("broken/blank_no_truth.png", subject, "happy", 0.5, None, "test"),
        Row("broken/missing.png", subject, "happy", 0.5, None, "test"),
    ]
    write_manifest(root, rows + extra)
    # One more manifest row that no stage can use (unknown emotion): reported, not in the table.
    with open(root / "manifest.csv", "a", encoding="utf-8") as f:
        f.write("broken/whatever.png,s000,grumpy,,,test\n")
    return rows, extra


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    render_dataset(out, CFG, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def stage(tmp_path_factory, synth_dir):
    root = tmp_path_factory.mktemp("lm")
    data = root / "data"
    rows, extra = build_dataset(data, synth_dir)
    params = lm.LandmarksParams(workers=2, chunksize=3, overlays=6)
    metrics = lm.run_landmarks(
        params, data, root / "out", root / "metrics.json", root / "plots", seed=0, progress=False
    )
    return {
        "root": root,
        "data": data,
        "rows": rows,
        "extra": extra,
        "metrics": metrics,
        "table": read_table(root / "out" / lm.TABLE),
    }


def test_table_has_one_row_per_usable_manifest_row_in_order(stage):
    df = stage["table"]
    rows = stage["rows"] + stage["extra"]
    assert df["image"].tolist() == sorted(r.image for r in rows)
    assert list(df.columns) == list(lm.COLUMNS)
    assert df["intensity"].dtype == np.float64 and df["n_faces"].dtype == np.int64


def test_broken_items_get_their_status_and_every_other_image_its_points(stage):
    df = stage["table"].set_index("image")
    status = df["status"].to_dict()
    assert status["broken/truncated.png"] == lm.UNREADABLE
    assert status["broken/not_an_image.png"] == lm.UNREADABLE
    assert status["broken/missing.png"] == lm.UNREADABLE
    assert status["broken/copy.png"] == lm.BAD_LANDMARKS_FILE
    assert status["broken/blank_no_truth.png"] == lm.NO_FACE
    # dlib misses the blank image; its ground truth is used, and said so.
    assert status["broken/blank.png"] == lm.OK
    assert df.loc["broken/blank.png", "points_source"] == lm.SOURCE_TRUTH
    synth = df.loc[[r.image for r in stage["rows"]]]
    assert (synth["status"] == lm.OK).all()
    assert (synth["points_source"] == lm.SOURCE_DLIB).all()
    assert (synth["n_faces"] == 1).all()
    pts = points_array(synth)
    truth = points_array(synth, "gt_points")
    np.testing.assert_allclose(synth["nme"], nme(pts, truth))
    assert synth["nme"].max() < 0.15  # dlib on these renders: ~0.04 typical
    for _, row in synth.iterrows():
        x0, y0, x1, y1 = row["box"]
        assert 0 <= x0 < x1 and 0 <= y0 < y1 and (row["width"], row["height"]) == (128, 128)
    assert df.loc["broken/truncated.png", "points"] is None


def test_failure_report_names_each_file_and_reason(stage):
    report = pd.read_csv(stage["root"] / "out" / lm.FAILURES)
    text = "\n".join(report["item"] + " " + report["reason"])
    for name, reason in [
        ("truncated.png", "unreadable"),
        ("not_an_image.png", "unreadable"),
        ("missing.png", "file not found"),
        ("copy.png", "short.txt"),
        ("blank_no_truth.png", "no_face"),
        ("manifest.csv:", "grumpy"),
    ]:
        assert any(name in line and reason in line for line in text.splitlines()), (name, text)
    assert not any("blank.png " in line for line in text.splitlines())


def test_metrics_count_statuses_fallbacks_and_nme(stage):
    m = json.loads((stage["root"] / "metrics.json").read_text())
    n_synth = len(stage["rows"])
    assert m == stage["metrics"]
    assert m["n_rows"] == n_synth + 6
    assert m["n_manifest_problems"] == 1
    assert m["status"] == {
        "ok": n_synth + 1,
        "no_face": 1,
        "multiple_faces": 0,
        "unreadable": 3,
        "bad_landmarks_file": 1,
        "error": 0,
    }
    assert m["n_fallback"] == 1 and m["n_dlib"] == n_synth
    # Decodable images: the synthetic ones + copy + 2 blanks; dlib found the synthetic faces.
    assert m["detection_rate"] == pytest.approx(n_synth / (n_synth + 3))
    assert m["n_nme"] == n_synth and 0 < m["nme_median"] <= m["nme_mean"] * 1.5 < 0.2
    assert (stage["root"] / "plots" / lm.OVERLAYS).is_file()
    overlay = load_image(stage["root"] / "plots" / lm.OVERLAYS)
    assert overlay.shape[0] > lm.TILE and overlay.shape[1] > 3 * lm.TILE


def test_splits_are_subject_disjoint_and_the_stage_is_deterministic(stage, tmp_path):
    df = stage["table"]
    per_subject = df.groupby("subject")["split"].nunique()
    assert (per_subject == 1).all()
    assert set(df["split"]) == {"train", "val", "test"}
    # Another run, one worker in-process this time: the same table.
    params = lm.LandmarksParams(workers=1, overlays=0)
    lm.run_landmarks(
        params,
        stage["data"],
        tmp_path / "out",
        tmp_path / "m.json",
        tmp_path / "plots",
        seed=0,
        progress=False,
    )
    again = read_table(tmp_path / "out" / lm.TABLE)
    pd.testing.assert_frame_equal(again, df)
    assert not (tmp_path / "plots" / lm.OVERLAYS).exists()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 23])
def test_assign_splits_properties(n):
    subjects = [f"s{i:02d}" for i in range(n)]
    a = lm.assign_splits(subjects, 0, 0.15, 0.2)
    assert set(a) == set(subjects)
    assert lm.assign_splits(list(reversed(subjects)) * 2, 0, 0.15, 0.2) == a  # order, repeats
    counts = {s: list(a.values()).count(s) for s in lm.SPLITS}
    assert counts["train"] >= 1
    if n >= 3:
        assert counts["val"] >= 1 and counts["test"] >= 1
    if n >= 10:
        assert counts["test"] == round(0.2 * n) and counts["val"] == round(0.15 * n)
    if n >= 4:
        others = [lm.assign_splits(subjects, seed, 0.15, 0.2) for seed in range(1, 6)]
        assert any(o != a for o in others)  # the seed matters


def test_process_image_statuses(tmp_path, detector, one_face):
    img, pts = one_face
    save_image(img, tmp_path / "face.png")
    write_landmarks_file(tmp_path / "face.txt", pts)
    res = lm.process_image(detector, tmp_path / "face.png", tmp_path / "face.txt")
    assert res.status == lm.OK and res.points_source == lm.SOURCE_DLIB and res.n_faces == 1
    assert res.nme < 0.15
    # Two faces side by side, one smaller: `largest` keeps the big one, `skip` refuses.
    small = np.asarray(load_image(tmp_path / "face.png"))[::1, ::1]
    pair = np.full((128, 128 + 110, 3), 255, np.uint8)
    pair[:, :128] = img
    from PIL import Image

    pair[9:119, 128:238] = np.asarray(Image.fromarray(small).resize((110, 110)))
    save_image(pair, tmp_path / "two.png")
    largest = lm.process_image(detector, tmp_path / "two.png", None, "largest")
    assert largest.status == lm.OK and largest.n_faces == 2
    assert largest.points[:, 0].max() < 128  # the left, larger face
    skipped = lm.process_image(detector, tmp_path / "two.png", None, "skip")
    assert skipped.status == lm.MULTIPLE_FACES and skipped.points is None
    save_image(np.zeros((64, 64), np.uint8), tmp_path / "black.png")
    off = lm.process_image(detector, tmp_path / "black.png", tmp_path / "face.txt", fallback=False)
    assert off.status == lm.NO_FACE and off.gt_points is not None


# --------------------------------------------------------------------------- one image (CLI)


def test_single_image_prints_68_lines_and_json(tmp_path, capsys, one_face):
    img, _ = one_face
    save_image(img, tmp_path / "face.png")
    assert cli.main(["landmarks", "-i", str(tmp_path / "face.png")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 68
    pts = np.array([[float(v) for v in line.split()] for line in lines])
    assert cli.main(["landmarks", "-i", str(tmp_path / "face.png"), "--format", "json"]) == 0
    arr = np.array(json.loads(capsys.readouterr().out))
    assert arr.shape == (68, 2)
    np.testing.assert_array_equal(arr, pts)


def test_single_image_without_face_exits_2_with_a_message(tmp_path, capsys):
    save_image(np.full((80, 80), 90, np.uint8), tmp_path / "wall.png")
    assert cli.main(["landmarks", "-i", str(tmp_path / "wall.png")]) == 2
    err = capsys.readouterr().err
    assert "no face" in err and "wall.png" in err
    assert cli.main(["landmarks", "-i", str(tmp_path / "nothing.png")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_single_image_reproduces_the_original_extractor(upstream_reference, capsys):
    # The FER 48×48 landmark files were extracted at native size: bit-identical.
    for png in sorted((upstream_reference / "fer48").glob("*.png")):
        assert cli.main(["landmarks", "-i", str(png)]) == 0
        got = np.array(
            [[float(v) for v in ln.split()] for ln in capsys.readouterr().out.strip().splitlines()]
        )
        np.testing.assert_array_equal(got, read_landmarks_file(png.with_suffix(".txt")), png.name)
    # emotion1o.txt came from a copy resized to width 400 (another resampler): within 2 px.
    pts = lm.landmarks_of_image(upstream_reference / "emotion1.jpg", resize_width=400)
    ref = read_landmarks_file(upstream_reference / "emotion1o.txt")
    assert np.abs(pts - ref).max() <= 2.0 and np.abs(pts - ref).mean() < 0.6
