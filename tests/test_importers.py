"""`facecal data import` (jaffe, ckplus, fer2013, folder) and `facecal data validate`.

Every fixture is built here, small, with broken files among the good ones; the tests assert the
exact report and the exact surviving rows. Real JAFFE only through the `jaffe_dir` fixture.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facecal import cli
from facecal.data.importers import DatasetImportError, import_dataset
from facecal.data.validate import validate_dataset
from facecal.emotions import EMOTIONS
from facecal.imageio import load_image
from facecal.manifest import Row, read_landmarks_file

RNG = np.random.default_rng(7)


def _pixels(h=12, w=10, rgb=False) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3) if rgb else (h, w), dtype=np.uint8)


def _save(path: Path, arr: np.ndarray, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **kw)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _report(result) -> list[tuple[str, str]]:
    return [(p.item, p.reason) for p in result.report.problems]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _points(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.round(rng.uniform(0, 10, (68, 2)), 3)


# --- jaffe ---------------------------------------------------------------------------------

JAFFE_HEADER = (
    "file,subject,emotion_code,emotion,take,image_id,rating_HAP,rating_SAD,"
    "rating_SUR,rating_ANG,rating_DIS,rating_FEA,rating_of_posed_emotion"
)


@pytest.fixture
def jaffe_like(tmp_path):
    """The layout of JAFFE with grey palette TIFFs (as JAFFE stores some) and broken entries."""
    src = tmp_path / "jaffe"
    pixels = {}
    palette = [v for g in range(256) for v in (g, g, g)]
    for name in [
        "KA.AN1.39",
        "KA.NE1.26",
        "KB.HA1.1",
        "KB.SA1.2",
        "KB.SU1.3",
        "KB.DI1.4",
        "KB.FE1.5",
        "KB.AN2.6",
    ]:
        arr = _pixels()
        im = Image.fromarray(arr, mode="L") if name != "KA.AN1.39" else Image.fromarray(arr, "P")
        if im.mode == "P":
            im.putpalette(palette)
        (src / "images").mkdir(parents=True, exist_ok=True)
        im.save(src / "images" / f"{name}.tiff")
        pixels[name] = arr
    _truncate(src / "images" / "KB.DI1.4.tiff")
    _save(src / "images" / "KC.HA1.9.tiff", _pixels())  # not in labels.csv
    rows = [
        "images/KA.AN1.39.tiff,KA,AN,anger,1,39,1.55,1.90,2.10,4.32,3.90,1.81,4.32",
        "images/KA.NE1.26.tiff,KA,NE,neutral,1,26,3.03,2.16,2.06,1.94,1.84,1.87,",
        "images/KB.HA1.1.tiff,KB,HA,happiness,1,1,5.5,1,1,1,1,1,5.5",  # clipped to 1
        "images/KB.SA1.2.tiff,KB,SA,sadness,1,2,1,0.5,1,1,1,1,0.5",  # clipped to 0
        "images/KB.SU1.3.tiff,KB,SU,surprise,1,3,1,1,1,1,1,1,",  # unrated: unknown
        "images/KB.DI1.4.tiff,KB,DI,disgust,1,4,1,1,1,1,4,1,4",  # truncated file
        "images/KB.FE1.5.tiff,KB,FE,bored,1,5,1,1,1,1,1,4,4",  # unknown emotion
        "images/KB.AN2.6.tiff,KB,AN,anger,2,6,1,1,1,high,1,1,high",  # rating not a number
        "images/KA.AN1.39.tiff,KA,AN,anger,1,39,1.55,1.90,2.10,4.32,3.90,1.81,4.32",  # duplicate
        "images/KB.XX1.7.tiff,KB,AN,anger,1,7,1,1,1,3,1,1,3",  # file missing
    ]
    (src / "labels.csv").write_text("\n".join([JAFFE_HEADER, *rows]) + "\n")
    return src, pixels


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL, about the truncated TIFF
def test_jaffe_import_rows_intensities_and_report(jaffe_like, tmp_path):
    src, pixels = jaffe_like
    out = tmp_path / "out"
    result = import_dataset("jaffe", src, out, progress=False)
    assert result.rows == [
        Row("images/KA.AN1.39.png", "KA", "anger", pytest.approx(0.83), None, "jaffe"),
        Row("images/KA.NE1.26.png", "KA", "neutral", 0.0, None, "jaffe"),
        Row("images/KB.HA1.1.png", "KB", "happy", 1.0, None, "jaffe"),
        Row("images/KB.SA1.2.png", "KB", "sad", 0.0, None, "jaffe"),
        Row("images/KB.SU1.3.png", "KB", "surprise", None, None, "jaffe"),
    ]
    labels = src / "labels.csv"
    items = [item for item, _ in _report(result)]
    assert items == [
        f"{labels}:8 (images/KB.FE1.5.tiff)",
        f"{labels}:9 (images/KB.AN2.6.tiff)",
        f"{labels}:10 (images/KA.AN1.39.tiff)",
        str(src / "images" / "KC.HA1.9.tiff"),
        str(src / "images" / "KB.DI1.4.tiff"),
        str(src / "images" / "KB.XX1.7.tiff"),
    ]
    reasons = [reason for _, reason in _report(result)]
    assert reasons[0].startswith("field 'emotion': unknown emotion label 'bored'")
    assert reasons[1] == "field 'rating_of_posed_emotion': 'high' is not a number"
    assert reasons[2] == "duplicate of line 2"
    assert reasons[3] == "not listed in labels.csv; skipped"
    assert reasons[4].startswith("corrupt or truncated image")
    assert reasons[5] == "file not found"
    # Pixels exact (the palette TIFF too), written grey; nothing of the skipped items on disk.
    for name in ["KA.AN1.39", "KA.NE1.26", "KB.HA1.1"]:
        with Image.open(out / "images" / f"{name}.png") as im:
            assert im.mode == "L"
            np.testing.assert_array_equal(np.asarray(im), pixels[name])
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "KA.AN1.39.png",
        "KA.NE1.26.png",
        "KB.HA1.1.png",
        "KB.SA1.2.png",
        "KB.SU1.3.png",
    ]
    rows, report = validate_dataset(out, progress=False)
    assert rows == result.rows and not report


def test_jaffe_source_without_labels_is_an_error_and_out_untouched(tmp_path):
    (tmp_path / "src" / "images").mkdir(parents=True)
    with pytest.raises(DatasetImportError, match=r"labels\.csv: not found"):
        import_dataset("jaffe", tmp_path / "src", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "src" / "labels.csv").write_text("file,emotion\nimages/a.tiff,anger\n")
    with pytest.raises(DatasetImportError, match=r"missing column\(s\) \['rating_of_posed"):
        import_dataset("jaffe", tmp_path / "src", tmp_path / "out", progress=False)


def test_real_jaffe(jaffe_dir, tmp_path):
    out = tmp_path / "jaffe"
    result = import_dataset("jaffe", jaffe_dir, out, progress=False)
    assert not result.report, result.report.problems
    rows, report = validate_dataset(out, progress=False)
    assert not report and rows == result.rows
    assert len(rows) == 213
    assert len({r.subject for r in rows}) == 10
    assert {r.emotion for r in rows} == {
        "neutral",
        "anger",
        "disgust",
        "fear",
        "happy",
        "sad",
        "surprise",
    }
    assert all(r.intensity is not None and 0.0 <= r.intensity <= 1.0 for r in rows)
    assert all(r.intensity == 0.0 for r in rows if r.emotion == "neutral")
    assert all(r.intensity > 0.25 for r in rows if r.emotion != "neutral")  # ratings ≥ 2.16
    # Subject from the file name; pixels unchanged.
    first = rows[0]
    assert first.image == "images/KA.AN1.39.png" and first.subject == "KA"
    assert first.intensity == pytest.approx((4.32 - 1) / 4)
    np.testing.assert_array_equal(
        load_image(out / first.image, "L"), load_image(jaffe_dir / "images" / "KA.AN1.39.tiff", "L")
    )


# --- ck+ ----------------------------------------------------------------------------------


def _ck_landmarks(points: np.ndarray) -> str:
    return "".join(f"   {x:.7e}   {y:.7e}\n" for x, y in points)


@pytest.fixture
def ckplus_like(tmp_path):
    """An official-layout CK+ tree: two labelled sequences, an unlabelled one, broken files."""
    src = tmp_path / "CK+"
    imgs, emo, lms = src / "cohn-kanade-images", src / "Emotion", src / "Landmarks"
    frames: dict[str, np.ndarray] = {}
    points: dict[str, np.ndarray] = {}

    def sequence(subject, seq, n, code=None, apex=None):
        for k in range(1, n + 1):
            stem = f"{subject}_{seq}_{k:08d}"
            frames[stem] = _pixels()
            _save(imgs / subject / seq / f"{stem}.png", frames[stem])
            points[stem] = _points(k + 100 * n)
            path = lms / subject / seq / f"{stem}_landmarks.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_ck_landmarks(points[stem]))
        if code is not None:
            path = emo / subject / seq / f"{subject}_{seq}_{(apex or n):08d}_emotion.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"   {code}\n")

    sequence("S005", "001", 4, "3.0000000e+00")  # disgust, frames 0..3
    sequence("S010", "002", 3)  # no emotion file
    sequence("S011", "001", 3, "5.0000000e+00")  # happy
    sequence("S011", "003", 2, "9.0000000e+00")  # no such code
    # Broken: frame 2 of S005/001 has a 67-row landmarks file; S011/001 frame 2 is truncated,
    # frame 3 has no landmarks file (ground truth is optional); a label without pictures.
    bad = lms / "S005" / "001" / "S005_001_00000002_landmarks.txt"
    bad.write_text(_ck_landmarks(points["S005_001_00000002"][:67]))
    _truncate(imgs / "S011" / "001" / "S011_001_00000002.png")
    (lms / "S011" / "001" / "S011_001_00000003_landmarks.txt").unlink()
    orphan = emo / "S099" / "001" / "S099_001_00000002_emotion.txt"
    orphan.parent.mkdir(parents=True)
    orphan.write_text("   1.0000000e+00\n")
    return src, frames, points


def test_ckplus_all_frames(ckplus_like, tmp_path):
    src, frames, points = ckplus_like
    out = tmp_path / "out"
    result = import_dataset("ckplus", src, out, progress=False)
    lm = "landmarks/S005/001/S005_001_"
    assert result.rows == [
        Row(
            "images/S005/001/S005_001_00000001.png",
            "S005",
            "neutral",
            0.0,
            f"{lm}00000001.txt",
            "ckplus",
        ),
        Row(
            "images/S005/001/S005_001_00000003.png",
            "S005",
            "disgust",
            pytest.approx(2 / 3),
            f"{lm}00000003.txt",
            "ckplus",
        ),
        Row(
            "images/S005/001/S005_001_00000004.png",
            "S005",
            "disgust",
            1.0,
            f"{lm}00000004.txt",
            "ckplus",
        ),
        Row(
            "images/S011/001/S011_001_00000001.png",
            "S011",
            "neutral",
            0.0,
            "landmarks/S011/001/S011_001_00000001.txt",
            "ckplus",
        ),
        Row("images/S011/001/S011_001_00000003.png", "S011", "happy", 1.0, None, "ckplus"),
    ]
    ims, emo = src / "cohn-kanade-images", src / "Emotion"
    report = _report(result)
    assert report[:3] == [
        (
            str(ims / "S010" / "002"),
            f"no emotion label ({emo / 'S010' / '002'}/*_emotion.txt); 3 frames skipped",
        ),
        (
            str(emo / "S011" / "003" / "S011_003_00000002_emotion.txt"),
            "emotion code '9.0000000e+00' is not one of [0, 1, 2, 3, 4, 5, 6, 7] "
            "(emotions.CKPLUS_CODES)",
        ),
        (
            str(emo / "S099" / "001" / "S099_001_00000002_emotion.txt"),
            f"no image sequence {ims / 'S099' / '001'}",
        ),
    ]
    bad_lm = src / "Landmarks" / "S005" / "001" / "S005_001_00000002_landmarks.txt"
    assert report[3] == (
        str(ims / "S005" / "001" / "S005_001_00000002.png"),
        f"{bad_lm}: expected 68 points, found 67",
    )
    assert report[4][0] == str(ims / "S011" / "001" / "S011_001_00000002.png")
    assert report[4][1].startswith("corrupt or truncated image")
    assert len(report) == 5
    # PNG frames are copied byte for byte; landmarks rewritten as `x y` with the same numbers.
    assert (out / result.rows[0].image).read_bytes() == (
        ims / "S005" / "001" / "S005_001_00000001.png"
    ).read_bytes()
    np.testing.assert_allclose(
        read_landmarks_file(out / result.rows[2].landmarks), points["S005_001_00000004"], atol=5e-4
    )
    assert not (out / "images" / "S005" / "001" / "S005_001_00000002.png").exists()
    assert not (out / "landmarks" / "S005" / "001" / "S005_001_00000002.txt").exists()
    rows, problems = validate_dataset(out, progress=False)
    assert rows == result.rows and not problems


@pytest.mark.parametrize(
    "frames, onset, expected",
    [
        (
            "apex",
            "neutral",
            [("S005_001_00000004", "disgust", 1.0), ("S011_001_00000003", "happy", 1.0)],
        ),
        (
            "ends",
            "neutral",
            [
                ("S005_001_00000001", "neutral", 0.0),
                ("S005_001_00000004", "disgust", 1.0),
                ("S011_001_00000001", "neutral", 0.0),
                ("S011_001_00000003", "happy", 1.0),
            ],
        ),
        (
            "ends",
            "emotion",
            [
                ("S005_001_00000001", "disgust", 0.0),
                ("S005_001_00000004", "disgust", 1.0),
                ("S011_001_00000001", "happy", 0.0),
                ("S011_001_00000003", "happy", 1.0),
            ],
        ),
    ],
)
def test_ckplus_frame_selection(ckplus_like, tmp_path, frames, onset, expected):
    src, _, _ = ckplus_like
    result = import_dataset(
        "ckplus", src, tmp_path / "out", frames=frames, onset=onset, progress=False
    )
    assert [(Path(r.image).stem, r.emotion, r.intensity) for r in result.rows] == expected


def test_ckplus_needs_images_and_emotion_folders(tmp_path):
    (tmp_path / "src" / "cohn-kanade-images").mkdir(parents=True)
    with pytest.raises(DatasetImportError, match="no Emotion/ folder"):
        import_dataset("ckplus", tmp_path / "src", tmp_path / "out", progress=False)
    with pytest.raises(DatasetImportError, match="no cohn-kanade-images/ folder"):
        import_dataset(
            "ckplus", tmp_path / "src" / "cohn-kanade-images", tmp_path / "out", progress=False
        )


# --- fer2013 ------------------------------------------------------------------------------


@pytest.fixture
def fer_csv(tmp_path):
    faces = [_pixels(48, 48) for _ in range(4)]
    text = lambda a: " ".join(str(v) for v in a.ravel())  # noqa: E731
    lines = [
        "emotion,pixels,Usage",
        f"0,{text(faces[0])},Training",
        f"3,{text(faces[1])},PublicTest",
        f"7,{text(faces[2])},Training",  # no such code
        f"6,{text(faces[2])[:-4]},Training",  # 2303 values
        f"6,{'1 ' * 2303}256,Training",  # out of range
        f"5,{'x ' * 2304},PrivateTest",
        f"6,{text(faces[3])},PrivateTest",
    ]
    path = tmp_path / "fer2013.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, faces


def test_fer2013_rows_pixels_and_report(fer_csv, tmp_path):
    path, faces = fer_csv
    out = tmp_path / "out"
    result = import_dataset("fer2013", path, out, progress=False)
    # The official usage is the split (Training → train, PublicTest → val, PrivateTest → test).
    assert result.rows == [
        Row("images/fer2013_00000.png", "fer2013_00000", "anger", None, None, "fer2013", "train"),
        Row("images/fer2013_00001.png", "fer2013_00001", "happy", None, None, "fer2013", "val"),
        Row("images/fer2013_00006.png", "fer2013_00006", "neutral", None, None, "fer2013", "test"),
    ]
    assert _report(result) == [
        (
            f"{path}:4",
            "field 'emotion': code '7' is not one of [0, 1, 2, 3, 4, 5, 6] "
            "(emotions.FER2013_CODES)",
        ),
        (f"{path}:5", "field 'pixels': 2303 values, expected 2304 (48×48 grey)"),
        (f"{path}:6", "field 'pixels': values must lie in 0–255, found 1–256"),
        (f"{path}:7", "field 'pixels': 'x' is not an integer"),
    ]
    for row, face in zip(result.rows, [faces[0], faces[1], faces[3]]):
        np.testing.assert_array_equal(load_image(out / row.image, "L"), face)
    # --usage keeps only the named partitions; the rest is counted, not reported.
    kept = import_dataset("fer2013", path, tmp_path / "pub", usage=["PublicTest"], progress=False)
    assert [r.image for r in kept.rows] == ["images/fer2013_00001.png"]
    assert kept.filtered == 6 and not kept.report


def test_fer2013_header_checked_before_writing(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("pixels\n1 2 3\n")
    with pytest.raises(DatasetImportError, match=r"missing column\(s\) \['emotion'\]"):
        import_dataset("fer2013", path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --- folder -------------------------------------------------------------------------------


@pytest.fixture
def folder_like(tmp_path):
    src = tmp_path / "faces"
    px = {}
    px["S01_a"] = _pixels(rgb=True)
    _save(src / "happy" / "S01_a.png", px["S01_a"])
    _save(src / "happy" / "S01_b.jpg", _pixels(rgb=True), quality=90)
    px["S02_c"] = _pixels(rgb=True)
    _save(src / "happy" / "S02_c.bmp", px["S02_c"])
    _save(src / "happy" / "S02_c.tif", _pixels(rgb=True))  # also → S02_c.png: collision
    _save(src / "Angry" / "day1" / "S02_x.png", _pixels())
    _save(src / "happy" / "nosubject.png", _pixels())  # regex finds no subject
    (src / "happy" / "S05_notes.txt").write_text("not a picture")
    (src / "sad").mkdir()
    (src / "sad" / "S03_g.png").write_bytes(os.urandom(64))  # garbage
    _truncate(_save(src / "sad" / "S03_t.png", _pixels()))  # truncated
    _save(src / "bored" / "S04_a.png", _pixels())  # unknown emotion folder
    _save(src / "bored" / "S04_b.png", _pixels())
    (src / "README.txt").write_text("faces by emotion")
    (src / ".DS_Store").write_bytes(b"\0\0")  # hidden: ignored
    (src / "happy" / ".hidden.png").write_bytes(b"\0")
    return src, px


def test_folder_import_with_subject_regex(folder_like, tmp_path):
    src, px = folder_like
    out = tmp_path / "out"
    result = import_dataset("folder", src, out, subject_regex=r"(?P<subject>S\d+)_", progress=False)
    assert result.rows == [
        Row("images/anger/day1/S02_x.png", "S02", "anger", None, None, "folder"),
        Row("images/happy/S01_a.png", "S01", "happy", None, None, "folder"),
        Row("images/happy/S01_b.jpg", "S01", "happy", None, None, "folder"),
        Row("images/happy/S02_c.png", "S02", "happy", None, None, "folder"),
    ]
    report = _report(result)
    assert report[:6] == [
        (f"{src / 'README.txt'}", "not inside an <emotion>/ folder; skipped"),
        (
            f"{src / 'bored'}/",
            "unknown emotion label 'bored'; expected one of "
            f"{list(EMOTIONS)} or a known alias; its 2 file(s) skipped",
        ),
        (
            f"{src / 'happy' / 'S02_c.tif'}",
            f"would be written to images/happy/S02_c.png like {src / 'happy' / 'S02_c.bmp'}; "
            "rename one",
        ),
        (
            f"{src / 'happy' / 'nosubject.png'}",
            "--subject-regex '(?P<subject>S\\\\d+)_' finds no subject in 'nosubject.png'",
        ),
        (f"{src / 'happy' / 'S05_notes.txt'}", "not a readable image (unknown or corrupt format)"),
        (f"{src / 'sad' / 'S03_g.png'}", "not a readable image (unknown or corrupt format)"),
    ]
    assert report[6][0] == f"{src / 'sad' / 'S03_t.png'}"
    assert report[6][1].startswith("corrupt or truncated image")
    assert len(report) == 7
    # JPEG and PNG copied as they are; BMP decoded and written as a lossless PNG.
    assert (out / "images/happy/S01_b.jpg").read_bytes() == (src / "happy/S01_b.jpg").read_bytes()
    np.testing.assert_array_equal(load_image(out / "images/happy/S02_c.png"), px["S02_c"])
    assert not (out / "images" / "sad").exists()


def test_folder_regex_group_one_and_one_subject_per_image(folder_like, tmp_path):
    src, _ = folder_like
    for i, regex in enumerate([r"([A-Z]\d+)_", r"S\d\d"]):  # group 1, else the whole match
        result = import_dataset(
            "folder", src, tmp_path / f"out{i}", subject_regex=regex, progress=False
        )
        assert [r.subject for r in result.rows] == ["S02", "S01", "S01", "S02"]
    own = import_dataset("folder", src, tmp_path / "b", progress=False)
    assert [(r.image, r.subject) for r in own.rows] == [
        ("images/anger/day1/S02_x.png", "anger/day1/S02_x.png"),
        ("images/happy/S01_a.png", "happy/S01_a.png"),
        ("images/happy/S01_b.jpg", "happy/S01_b.jpg"),
        ("images/happy/S02_c.png", "happy/S02_c.bmp"),
        ("images/happy/nosubject.png", "happy/nosubject.png"),
    ]


def test_bad_subject_regex_is_an_error(folder_like, tmp_path):
    src, _ = folder_like
    with pytest.raises(DatasetImportError, match=r"--subject-regex '\(S': not a valid"):
        import_dataset("folder", src, tmp_path / "out", subject_regex="(S", progress=False)


# --- output folder, determinism -----------------------------------------------------------


def test_import_is_deterministic_and_refuses_a_busy_out(ckplus_like, tmp_path):
    src, _, _ = ckplus_like
    a, b = tmp_path / "a", tmp_path / "b"
    import_dataset("ckplus", src, a, progress=False)
    import_dataset("ckplus", src, b, progress=False)
    assert _tree_bytes(a) == _tree_bytes(b) and len(_tree_bytes(a)) == 1 + 5 + 4
    with pytest.raises(DatasetImportError, match="not empty; import into an empty folder"):
        import_dataset("ckplus", src, a, progress=False)
    # --force replaces what an import wrote and leaves the user's other files alone.
    (a / "notes.md").write_text("mine")
    (a / "images" / "stale.png").write_bytes(b"old")
    result = import_dataset("ckplus", src, a, frames="apex", force=True, progress=False)
    assert len(result.rows) == 2
    assert (a / "notes.md").read_text() == "mine"
    assert not (a / "images" / "stale.png").exists()
    assert sorted(p.relative_to(a).as_posix() for p in (a / "images").rglob("*.png")) == [
        "images/S005/001/S005_001_00000004.png",
        "images/S011/001/S011_001_00000003.png",
    ]
    with pytest.raises(DatasetImportError, match="overlaps the source"):
        import_dataset("ckplus", src, src / "out", progress=False)
    # A forced import that imports nothing keeps the previous one (written aside, then swapped).
    before = _tree_bytes(a)
    empty_src = tmp_path / "empty_ck"
    (empty_src / "cohn-kanade-images" / "S001" / "001").mkdir(parents=True)
    (empty_src / "Emotion").mkdir()
    result = import_dataset("ckplus", empty_src, a, force=True, progress=False)
    assert not result.rows and _tree_bytes(a) == before
    result = import_dataset("ckplus", empty_src, tmp_path / "new", progress=False)
    assert not result.rows and not (tmp_path / "new").exists()
    # What an interrupted import leaves behind does not make --out busy.
    (tmp_path / "c" / ".facecal-import" / "images").mkdir(parents=True)
    assert len(import_dataset("ckplus", src, tmp_path / "c", progress=False).rows) == 5
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "images",
        "landmarks",
        "manifest.csv",
    ]


# --- validate -----------------------------------------------------------------------------


def _write_dataset(root: Path, manifest: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.csv").write_text(manifest)


@pytest.fixture
def broken_dataset(tmp_path):
    root = tmp_path / "data"
    _save(root / "images" / "ok.png", _pixels(20, 20))
    _save(root / "images" / "ok2.png", _pixels(20, 20))
    _truncate(_save(root / "images" / "trunc.png", _pixels(20, 20)))
    (root / "images" / "garbage.png").write_bytes(b"GIF89a not really")
    for name in ["ok3", "ok4", "dup", "hot", "mood", "short", "text", "far"]:
        _save(root / "images" / f"{name}.png", _pixels(20, 20))
    lm = root / "landmarks"
    lm.mkdir()
    good = _points(1)
    (lm / "ok.txt").write_text("".join(f"{x} {y}\n" for x, y in good))
    (lm / "ok2.txt").write_text("".join(f"{x},{y}\n" for x, y in good))
    (lm / "short.txt").write_text("".join(f"{x} {y}\n" for x, y in good[:67]))
    (lm / "text.txt").write_text("x y\n" + "".join(f"{x} {y}\n" for x, y in good[1:]))
    (lm / "far.txt").write_text(
        "".join(f"{x} {y + (100 if i == 30 else 0)}\n" for i, (x, y) in enumerate(good))
    )
    _write_dataset(
        root,
        "\n".join(
            [
                "image,subject,emotion,intensity,landmarks,source",
                "images/ok.png,s1,happy,0.5,landmarks/ok.txt,t",  # 2
                "images/ok2.png,s1,Angry,,landmarks/ok2.txt,t",  # 3
                "images/trunc.png,s2,sad,0.1,,t",  # 4
                "images/garbage.png,s2,sad,0.1,,t",  # 5
                "images/ok.png,s3,happy,0.2,,t",  # 6 duplicate
                "images/hot.png,s3,happy,1.5,,t",  # 7 intensity
                "images/mood.png,s3,bored,,,t",  # 8 emotion
                "images/missing.png,s3,sad,,,t",  # 9 missing
                "images/short.png,s4,fear,0.3,landmarks/short.txt,t",  # 10
                "images/text.png,s4,fear,0.3,landmarks/text.txt,t",  # 11
                "images/far.png,s4,fear,0.3,landmarks/far.txt,t",  # 12
                "images/ok3.png,s5,neutral,0,,t",  # 13
                "./images/ok3.png,s5,neutral,0,,t",  # 14 same file
                "images/ok4.png,s5,surprise,1,landmarks/none.txt,t",  # 15 missing landmarks
            ]
        )
        + "\n",
    )
    return root


def test_validate_reports_every_problem_naming_the_row(broken_dataset):
    root = broken_dataset
    rows, report = validate_dataset(root, progress=False)
    assert rows == [
        Row("images/ok.png", "s1", "happy", 0.5, "landmarks/ok.txt", "t"),
        Row("images/ok2.png", "s1", "anger", None, "landmarks/ok2.txt", "t"),
        Row("images/ok3.png", "s5", "neutral", 0.0, None, "t"),
    ]
    problems = [(p.item, p.reason) for p in report.problems]
    assert problems[:7] == [
        ("manifest.csv:6 (images/ok.png)", "duplicate of row 2"),
        ("manifest.csv:7 (images/hot.png)", "field 'intensity': 1.5 is outside [0, 1]"),
        (
            "manifest.csv:8 (images/mood.png)",
            f"field 'emotion': unknown emotion label 'bored'; expected one of {list(EMOTIONS)} "
            "or a known alias",
        ),
        (
            "manifest.csv:9 (images/missing.png)",
            f"image file not found: {root / 'images' / 'missing.png'}",
        ),
        ("manifest.csv:14 (./images/ok3.png)", "duplicate of row 13"),
        (
            "manifest.csv:15 (images/ok4.png)",
            f"landmarks file not found: {root / 'landmarks' / 'none.txt'}",
        ),
        ("images/trunc.png", problems[6][1]),
    ]
    assert problems[6][1].startswith("corrupt or truncated image")
    assert problems[7:] == [
        ("images/garbage.png", "not a readable image (unknown or corrupt format)"),
        (
            "images/short.png",
            f"landmarks: {root / 'landmarks' / 'short.txt'}: expected 68 points, found 67",
        ),
        ("images/text.png", f"landmarks: {root / 'landmarks' / 'text.txt'}:1: not numeric: 'x y'"),
        ("images/far.png", problems[10][1]),
    ]
    assert problems[10][1].startswith(
        f"landmarks landmarks/far.txt: point 30 at ({_points(1)[30][0]:g}, "
        f"{_points(1)[30][1] + 100:g}) is far outside the 20×20 image (1 such points)"
    )


def test_validate_cli_exit_codes_and_report_file(broken_dataset, tmp_path, capsys):
    report_csv = tmp_path / "problems.csv"
    assert (
        cli.main(["data", "validate", str(broken_dataset), "--quiet", "--report", str(report_csv)])
        == 1
    )
    out = capsys.readouterr().out
    assert "3 valid of 14 rows" in out
    assert "11 problem(s):" in out
    assert "problem: images/garbage.png: not a readable image" in out
    with open(report_csv, newline="") as f:
        assert len(list(csv.reader(f))) == 1 + 11
    # A clean dataset: exit 0 and the summary.
    clean = tmp_path / "clean"
    _save(clean / "images" / "a.png", _pixels(8, 6))
    _save(clean / "images" / "b.png", _pixels(8, 6))
    _write_dataset(
        clean,
        "image,subject,emotion,intensity,landmarks,source\n"
        "images/a.png,x,happy,0.25,,t\nimages/b.png,y,neutral,,,t\n",
    )
    assert cli.main(["data", "validate", str(clean), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 valid of 2 rows" in out and "subjects: 2" in out
    assert "emotions: neutral 1, anger 0, contempt 0, disgust 0, fear 0, happy 1" in out
    assert "intensity: 0.25–0.25 (1 known, 1 unknown)" in out
    assert "image sizes: 6×8 (2)" in out and "no problems" in out
    # No manifest / a header-only manifest / not a folder.
    assert cli.main(["data", "validate", str(tmp_path / "nothing"), "--quiet"]) == 2
    empty = tmp_path / "empty"
    _write_dataset(empty, "image,subject,emotion,intensity,landmarks,source\n")
    assert cli.main(["data", "validate", str(empty), "--quiet"]) == 1
    assert "problem: manifest.csv: no rows" in capsys.readouterr().out
    (clean / "manifest.csv").write_text("img,who\n")
    assert cli.main(["data", "validate", str(clean), "--quiet"]) == 2
    assert "header must be image,subject,emotion" in capsys.readouterr().err


# --- import command line ------------------------------------------------------------------


def test_import_cli(fer_csv, tmp_path, capsys):
    path, _ = fer_csv
    out, report_csv = tmp_path / "data", tmp_path / "skipped.csv"
    assert (
        cli.main(
            [
                "data",
                "import",
                "fer2013",
                str(path),
                "--out",
                str(out),
                "--quiet",
                "--report",
                str(report_csv),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert f"imported 3 images from {path} (fer2013) into {out}" in captured.out
    assert "skipped 4 item(s):" in captured.err
    assert f"skipped: {path}:4: field 'emotion': code '7'" in captured.err
    with open(report_csv, newline="") as f:
        assert list(csv.reader(f))[0] == ["item", "reason"]
    assert cli.main(["data", "validate", str(out), "--quiet"]) == 0
    # Busy --out, an option of another format, nothing importable: exit 2 with the reason.
    assert cli.main(["data", "import", "fer2013", str(path), "--out", str(out), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "data",
                "import",
                "fer2013",
                str(path),
                "--out",
                str(tmp_path / "x"),
                "--frames",
                "apex",
            ]
        )
        == 2
    )
    assert "--frames applies to format ckplus only" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("emotion,pixels\n9,1 2\n")
    assert (
        cli.main(["data", "import", "fer2013", str(bad), "--out", str(tmp_path / "y"), "--quiet"])
        == 2
    )
    err = capsys.readouterr().err
    assert "nothing imported (1 items skipped" in err
    assert not (tmp_path / "y" / "manifest.csv").exists()


# --- robustness: odd file names, non-regular files, all-or-nothing -------------------------


def _import_in_subprocess(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`facecal data import …` in a child process, so a hang fails the test instead of hanging it."""
    code = "import sys; from facecal import cli; sys.exit(cli.main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "data", "import", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_non_utf8_file_name_is_reported_and_skipped(tmp_path):
    src, out, report_csv = tmp_path / "faces", tmp_path / "out", tmp_path / "skipped.csv"
    _save(src / "happy" / "good.png", _pixels())
    bad = src / "happy" / os.fsdecode(b"caf\xe9.png")  # Latin-1 name: no UTF-8 text for it
    _save(bad, _pixels())
    bad_dir = src / "sad" / os.fsdecode(b"d\xfcr")
    _save(bad_dir / "x.png", _pixels())
    rc = cli.main(["data", "import", "folder", str(src), "--out", str(out), "--quiet",
                   "--report", str(report_csv)])  # fmt: skip
    assert rc == 0
    rows, report = validate_dataset(out, progress=False)
    assert not report and [r.image for r in rows] == ["images/happy/good.png"]
    with open(report_csv, newline="", encoding="utf-8") as f:
        assert list(csv.reader(f))[1:] == [
            [f"{src}/happy/caf\\xe9.png", "file name is not valid UTF-8 (shown with \\x escapes); "
             "rename it"],
            [f"{src}/sad/d\\xfcr/x.png", "file name is not valid UTF-8 (shown with \\x escapes); "
             "rename it"],
        ]  # fmt: skip
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "images",
        "images/happy",
        "images/happy/good.png",
        "manifest.csv",
    ]


def test_fifo_and_other_non_regular_files_are_skipped_never_waited_on(tmp_path):
    src, out = tmp_path / "faces", tmp_path / "out"
    _save(src / "happy" / "good.png", _pixels())
    os.mkfifo(src / "happy" / "pipe.png")  # opening it would wait for a writer forever
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(src / "happy" / "sock.png"))
        os.symlink(src / "happy" / "pipe.png", src / "happy" / "link.png")
        done = _import_in_subprocess("folder", str(src), "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert f"skipped: {src}/happy/link.png: a FIFO, not a regular file; skipped" in done.stderr
    assert f"skipped: {src}/happy/pipe.png: a FIFO, not a regular file; skipped" in done.stderr
    assert f"skipped: {src}/happy/sock.png: a socket, not a regular file; skipped" in done.stderr
    assert (out / "manifest.csv").read_text().splitlines()[1:] == [
        "images/happy/good.png,happy/good.png,happy,,,folder"
    ]
    # A FIFO where a labels file should be is an error naming it, not a hang.
    fer = tmp_path / "fer"
    fer.mkdir()
    os.mkfifo(fer / "labels.csv")
    done = _import_in_subprocess("fer2013", str(fer), "--out", str(tmp_path / "o2"), "--quiet")
    assert done.returncode == 2
    assert f"{fer / 'labels.csv'}: a FIFO, not a regular file" in done.stderr
    assert not (tmp_path / "o2").exists()


def test_same_stem_different_suffix_are_two_subjects(tmp_path):
    src = tmp_path / "faces"
    _save(src / "happy" / "f.png", _pixels())
    _save(src / "happy" / "f.jpeg", _pixels(), fmt="JPEG")
    result = import_dataset("folder", src, tmp_path / "out", progress=False)
    assert [(r.image, r.subject) for r in result.rows] == [
        ("images/happy/f.jpg", "happy/f.jpeg"),
        ("images/happy/f.png", "happy/f.png"),
    ]


def test_interrupted_import_leaves_out_exactly_as_it_was(ckplus_like, tmp_path):
    src = tmp_path / "many"
    for i in range(400):
        _save(src / "happy" / f"{i:03d}.png", _pixels(64, 64))
    out = tmp_path / "out"
    import_dataset("ckplus", ckplus_like[0], out, progress=False)
    (out / "notes.md").write_text("mine")
    before = _tree_bytes(out)
    code = (
        "import sys; from facecal.data.importers import import_dataset; "
        "import_dataset('folder', sys.argv[1], sys.argv[2], force=True, progress=False)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(src), str(out)])
    try:
        scratch_images = tmp_path / ".out.facecal-import" / "images" / "happy"
        deadline = time.monotonic() + 60
        while not (scratch_images.is_dir() and len(os.listdir(scratch_images)) >= 20):
            assert child.poll() is None and time.monotonic() < deadline, "import never got going"
            time.sleep(0.01)
    finally:
        child.kill()  # SIGKILL: no clean-up code runs
        child.wait()
    assert _tree_bytes(out) == before
    # The next import clears the scratch folder and completes.
    assert len(import_dataset("folder", src, out, force=True, progress=False).rows) == 400
    assert not (tmp_path / ".out.facecal-import").exists()
    assert (out / "notes.md").read_text() == "mine"


def test_failed_swap_puts_the_previous_import_back(ckplus_like, tmp_path, monkeypatch):
    out = tmp_path / "out"
    import_dataset("ckplus", ckplus_like[0], out, progress=False)
    before = _tree_bytes(out)
    src = tmp_path / "faces"
    _save(src / "happy" / "a.png", _pixels())
    real_replace = os.replace

    def replace(a, b):  # the file system refuses to move the new images/ into --out
        if Path(a) == tmp_path / ".out.facecal-import" / "images":
            raise OSError(28, "No space left on device")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        import_dataset("folder", src, out, force=True, progress=False)
    monkeypatch.undo()
    assert _tree_bytes(out) == before
    assert not (tmp_path / ".out.facecal-import").exists()


# --- blank pictures -----------------------------------------------------------------------


def test_constant_and_near_constant_images_are_skipped_and_flagged(tmp_path):
    src = tmp_path / "faces"
    _save(src / "happy" / "face.png", _pixels())
    _save(src / "happy" / "black.png", np.zeros((48, 48), np.uint8))
    flat = np.full((48, 48, 3), 200, np.uint8)
    flat[10, 10] = 203  # one faint speck: std 0.06
    _save(src / "happy" / "speck.png", flat)
    result = import_dataset("folder", src, tmp_path / "out", progress=False)
    assert [r.image for r in result.rows] == ["images/happy/face.png"]
    assert _report(result) == [
        (f"{src}/happy/black.png", "decodes to a constant picture (every pixel = 0); skipped"),
        (
            f"{src}/happy/speck.png",
            "decodes to a near-constant picture (std 0.06 < 2 levels); skipped",
        ),
    ]
    # validate flags a constant picture already in a dataset (e.g. a 16-bit PNG gone white).
    root = tmp_path / "data"
    _save(root / "images" / "ok.png", _pixels())
    _save(root / "images" / "white.png", np.full((12, 10, 3), 255, np.uint8))
    _write_dataset(
        root,
        "image,subject,emotion,intensity,landmarks,source\n"
        "images/ok.png,a,happy,,,t\nimages/white.png,b,happy,,,t\n",
    )
    rows, report = validate_dataset(root, progress=False)
    assert [r.image for r in rows] == ["images/ok.png"]
    assert [(p.item, p.reason) for p in report.problems] == [
        ("images/white.png", "decodes to a constant picture (every pixel = 255)")
    ]


# --- fer2013 as distributed: folders + labels.csv ----------------------------------------


@pytest.fixture
def fer_folders(tmp_path):
    """The layout of ../shared/data/fer2013: train/<class>/, publictest/<class>/, labels.csv."""
    src = tmp_path / "fer2013"
    files = {
        "train/angry/Training_1.jpg": _pixels(48, 48),
        "train/happy/Training_2.jpg": _pixels(48, 48),
        "train/happy/Training_3.jpg": np.zeros((48, 48), np.uint8),  # FER2013's blank crops
        "publictest/surprise/PublicTest_4.jpg": _pixels(48, 48),
        "publictest/neutral/PublicTest_5.jpg": _pixels(48, 48),
    }
    for rel, arr in files.items():
        _save(src / rel, arr, fmt="JPEG", quality=95)
    (src / "labels.csv").write_text(
        "file,emotion,usage\n"
        "train/angry/Training_1.jpg,angry,Training\n"
        "train/happy/Training_2.jpg,happy,Training\n"
        "train/happy/Training_3.jpg,happy,Training\n"
        "publictest/surprise/PublicTest_4.jpg,surprise,PublicTest\n"
        "publictest/neutral/PublicTest_5.jpg,neutral,PublicTest\n"
        "publictest/neutral/PublicTest_6.jpg,neutral,PublicTest\n"  # missing
        "train/angry/Training_1.jpg,angry,Training\n"  # duplicate
        "train/sad/Training_7.jpg,sad,Holdout\n"  # unknown usage
    )
    return src


def test_fer2013_folders_keep_the_official_usage_as_split(fer_folders, tmp_path):
    src = fer_folders
    result = import_dataset("fer2013", src, tmp_path / "out", progress=False)
    assert result.rows == [
        Row("images/publictest/neutral/PublicTest_5.jpg", "PublicTest_5", "neutral", None,
            None, "fer2013", "val"),
        Row("images/publictest/surprise/PublicTest_4.jpg", "PublicTest_4", "surprise", None,
            None, "fer2013", "val"),
        Row("images/train/angry/Training_1.jpg", "Training_1", "anger", None, None, "fer2013",
            "train"),
        Row("images/train/happy/Training_2.jpg", "Training_2", "happy", None, None, "fer2013",
            "train"),
    ]  # fmt: skip
    labels = src / "labels.csv"
    assert _report(result) == [
        (f"{labels}:8 (train/angry/Training_1.jpg)", "duplicate of line 2"),
        (
            f"{labels}:9 (train/sad/Training_7.jpg)",
            "field 'usage': 'Holdout' is not one of ['Training', 'PublicTest', 'PrivateTest']",
        ),
        (
            f"{src}/train/happy/Training_3.jpg",
            "decodes to a constant picture (every pixel = 0); skipped",
        ),
        (f"{src}/publictest/neutral/PublicTest_6.jpg", "file not found"),
    ]
    out = tmp_path / "out"
    assert (out / "manifest.csv").read_text().splitlines()[:2] == [
        "image,subject,emotion,intensity,landmarks,source,split",
        "images/publictest/neutral/PublicTest_5.jpg,PublicTest_5,neutral,,,fer2013,val",
    ]
    rows, report = validate_dataset(out, progress=False)
    assert rows == result.rows and not report
    jpg = "train/angry/Training_1.jpg"  # copied byte for byte
    assert (out / "images" / jpg).read_bytes() == (src / jpg).read_bytes()
    # --usage selects official usages; a usage folder alone imports with the usage of its names.
    val = import_dataset("fer2013", src, tmp_path / "v", usage=["PublicTest"], progress=False)
    assert [r.split for r in val.rows] == ["val", "val"] and val.filtered == 4
    one = import_dataset("fer2013", src / "publictest", tmp_path / "p", progress=False)
    assert [(r.image, r.subject, r.split) for r in one.rows] == [
        ("images/neutral/PublicTest_5.jpg", "PublicTest_5", "val"),
        ("images/surprise/PublicTest_4.jpg", "PublicTest_4", "val"),
    ]
    with pytest.raises(DatasetImportError, match=r"--usage Public: expected values among"):
        import_dataset("fer2013", src, tmp_path / "u", usage=["Public"], progress=False)


def test_fer2013_csv_constant_rows_skipped(tmp_path):
    text = lambda a: " ".join(str(v) for v in a.ravel())  # noqa: E731
    path = tmp_path / "fer2013.csv"
    path.write_text(
        "emotion,pixels,Usage\n"
        f"3,{text(_pixels(48, 48))},Training\n"
        f"3,{text(np.zeros((48, 48), np.uint8))},Training\n"
        f"3,{text(_pixels(48, 48))},Validation\n"
    )
    result = import_dataset("fer2013", path, tmp_path / "out", progress=False)
    assert [(r.image, r.split) for r in result.rows] == [("images/fer2013_00000.png", "train")]
    assert _report(result) == [
        (f"{path}:3", "decodes to a constant picture (every pixel = 0); skipped"),
        (
            f"{path}:4",
            "field 'usage': 'Validation' is not one of ['Training', 'PublicTest', 'PrivateTest']",
        ),
    ]
