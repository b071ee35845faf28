"""The dataset foundations: `facecal.manifest`, `facecal.emotions`, `facecal.imageio`."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest
from PIL import Image

from facecal.emotions import (
    CKPLUS_CODES,
    EMOTIONS,
    EXPRESSIVE,
    FER2013_CODES,
    UnknownEmotion,
    emotion_index,
    normalize_emotion,
)
from facecal.errors import FacecalError
from facecal.imageio import ImageError, encode_png, load_image, save_image
from facecal.manifest import (
    COLUMNS,
    LandmarkFileError,
    ManifestError,
    Report,
    Row,
    parse_intensity,
    parse_landmarks_text,
    read_landmarks_file,
    read_manifest,
    write_landmarks_file,
    write_manifest,
)

HEADER = ",".join(COLUMNS) + "\n"
POINTS = np.column_stack([np.linspace(10, 90, 68), np.linspace(-5.5, 120.25, 68)])


# --- emotions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "label, name",
    [
        ("Angry", "anger"),
        ("HA", "happy"),
        (" surprised ", "surprise"),
        ("happiness", "happy"),
        ("sadness", "sad"),
        ("NE", "neutral"),
        ("AF", "fear"),
        ("Contemptuous", "contempt"),
        ("disgusted", "disgust"),
    ],
)
def test_normalize_emotion_maps_dataset_labels(label, name):
    assert normalize_emotion(label) == name


def test_unknown_emotion_names_the_label_and_the_vocabulary():
    with pytest.raises(
        UnknownEmotion,
        match=r"unknown emotion label 'bored'; expected one of "
        r"\['neutral', 'anger'",
    ):
        normalize_emotion("bored")
    assert issubclass(UnknownEmotion, FacecalError)


def test_vocabulary_and_dataset_codes():
    assert EMOTIONS[0] == "neutral" and len(EMOTIONS) == 8 and "neutral" not in EXPRESSIVE
    assert [emotion_index(e) for e in EMOTIONS] == list(range(8))
    assert emotion_index("Happy") == 5
    assert set(CKPLUS_CODES.values()) == set(EMOTIONS)
    assert set(FER2013_CODES.values()) == set(EMOTIONS) - {"contempt"}
    assert FER2013_CODES[3] == "happy" and CKPLUS_CODES[5] == "happy"


# --- manifest -----------------------------------------------------------------------------


def test_manifest_round_trip_sorted_and_stable(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "lm").mkdir()
    for name in "bac":
        (tmp_path / "images" / f"{name}.png").write_bytes(b"x")
    (tmp_path / "lm" / "a.txt").write_text("")
    rows = [
        Row("images/b.png", "s1", "happy", 0.25, None, "t"),
        Row("images/a.png", "s,2", "neutral", 0.0, "lm/a.txt", "t"),
        Row("images/c.png", "s3", "anger", None, None, ""),
    ]
    path = write_manifest(tmp_path, rows)
    text = path.read_text()
    assert text == (
        HEADER + 'images/a.png,"s,2",neutral,0,lm/a.txt,t\n'
        "images/b.png,s1,happy,0.25,,t\nimages/c.png,s3,anger,,,\n"
    )
    back, report = read_manifest(tmp_path)
    assert not report
    assert back == sorted(rows, key=lambda r: r.image)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


def test_read_manifest_reports_each_bad_row(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ["a", "b", "c"]:
        (tmp_path / "images" / f"{name}.png").write_bytes(b"x")
    (tmp_path / "manifest.csv").write_text(
        HEADER
        + "\n".join(
            [
                "images/a.png,s1,Happy,0.5,,t",  # 2 ok (alias)
                ",s1,happy,,,t",  # 3
                "images/b.png,,happy,,,t",  # 4
                "images/b.png,s1,bored,,,t",  # 5
                "images/b.png,s1,sad,1.5,,t",  # 6
                "images/b.png,s1,sad,-0.1,,t",  # 7
                "images/b.png,s1,sad,nan,,t",  # 8
                "images/b.png,s1,sad,high,,t",  # 9
                "../b.png,s1,sad,,,t",  # 10
                "/abs/b.png,s1,sad,,,t",  # 11
                "images/c.png,s1,sad,,../x.txt,t",  # 12
                "images/a.png,s2,sad,,,t",  # 13 duplicate
                "./images/a.png,s2,sad,,,t",  # 14 the same file
                "images/nope.png,s2,sad,,,t",  # 15
                "images/c.png,s2,sad,,lm/none.txt,t",  # 16
                "",  # blank lines are skipped
                "images/b.png,s3,surprise",  # 18 short row: missing fields are empty
            ]
        )
        + "\n"
    )
    rows, report = read_manifest(tmp_path)
    assert rows == [
        Row("images/a.png", "s1", "happy", 0.5, None, "t"),
        Row("images/b.png", "s3", "surprise", None, None, ""),
    ]
    assert [(p.item, p.reason) for p in report.problems] == [
        ("manifest.csv:3", "empty 'image' field"),
        ("manifest.csv:4 (images/b.png)", "empty 'subject' field"),
        (
            "manifest.csv:5 (images/b.png)",
            f"field 'emotion': unknown emotion label 'bored'; expected one of {list(EMOTIONS)} "
            "or a known alias",
        ),
        ("manifest.csv:6 (images/b.png)", "field 'intensity': 1.5 is outside [0, 1]"),
        ("manifest.csv:7 (images/b.png)", "field 'intensity': -0.1 is outside [0, 1]"),
        ("manifest.csv:8 (images/b.png)", "field 'intensity': nan is outside [0, 1]"),
        ("manifest.csv:9 (images/b.png)", "field 'intensity': 'high' is not a number"),
        ("manifest.csv:10 (../b.png)", "path must be relative and stay inside the dataset folder"),
        (
            "manifest.csv:11 (/abs/b.png)",
            "path must be relative and stay inside the dataset folder",
        ),
        (
            "manifest.csv:12 (images/c.png)",
            "path must be relative and stay inside the dataset folder",
        ),
        ("manifest.csv:13 (images/a.png)", "duplicate of row 2"),
        ("manifest.csv:14 (./images/a.png)", "duplicate of row 2"),
        (
            "manifest.csv:15 (images/nope.png)",
            f"image file not found: {tmp_path / 'images' / 'nope.png'}",
        ),
        (
            "manifest.csv:16 (images/c.png)",
            f"landmarks file not found: {tmp_path / 'lm' / 'none.txt'}",
        ),
    ]
    # Without file checks the missing files pass.
    rows, report = read_manifest(tmp_path, check_files=False)
    assert len(rows) == 4 and len(report) == 12


def test_read_manifest_unusable_files(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("file,label\n")
    with pytest.raises(ManifestError, match="header must be image,subject,emotion"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_bytes(HEADER.encode() + b"images/\xff.png,s,happy,,,t\n")
    with pytest.raises(ManifestError, match=r"manifest\.csv:2: not UTF-8 text"):
        read_manifest(tmp_path)
    # A spreadsheet's byte-order mark is not part of the header.
    (tmp_path / "manifest.csv").write_bytes(
        b"\xef\xbb\xbf" + HEADER.encode() + b"images/a.png,s,happy,,,t\n"
    )
    rows, report = read_manifest(tmp_path, check_files=False)
    assert [r.image for r in rows] == ["images/a.png"] and not report


def test_parse_intensity():
    assert parse_intensity("") is None and parse_intensity(None) is None
    assert parse_intensity(" 0.75 ") == 0.75 and parse_intensity(1) == 1.0
    for bad, message in [("1.01", "outside"), ("inf", "outside"), ("x", "not a number")]:
        with pytest.raises(ValueError, match=message):
            parse_intensity(bad)


def test_report_csv_and_print(tmp_path, capsys):
    report = Report()
    assert not report and len(report) == 0
    report.add(tmp_path / "a.png", "corrupt")
    for i in range(3):
        report.add(f"manifest.csv:{i}", "bad, with a comma")
    assert report and len(report) == 4
    report.write_csv(tmp_path / "sub" / "r.csv")
    with open(tmp_path / "sub" / "r.csv", newline="") as f:
        assert list(csv.reader(f)) == [["item", "reason"], [str(tmp_path / "a.png"), "corrupt"]] + [
            [f"manifest.csv:{i}", "bad, with a comma"] for i in range(3)
        ]
    report.print(limit=2)
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"  skipped {tmp_path / 'a.png'}: corrupt",
        "  skipped manifest.csv:0: bad, with a comma",
        "  … and 2 more",
    ]


# --- landmark files -----------------------------------------------------------------------


@pytest.mark.parametrize("line", ["{x} {y}", "{x},{y}", "{x}, {y}", "\t{x}\t{y}  ", "{x};{y}"])
def test_landmark_formats(line):
    text = "\n" + "\n".join(line.format(x=x, y=y) for x, y in POINTS) + "\n\n"
    np.testing.assert_array_equal(parse_landmarks_text(text), POINTS)


def test_landmark_scientific_notation_as_ckplus_writes_it():
    text = "".join(f"   {x:.7e}   {y:.7e}\n" for x, y in POINTS)
    np.testing.assert_allclose(parse_landmarks_text(text), POINTS, rtol=1e-7)


@pytest.mark.parametrize(
    "text, message",
    [
        ("1 2\n" * 67, "<landmarks>: expected 68 points, found 67"),
        ("1 2\n" * 69, "<landmarks>: expected 68 points, found 69"),
        ("", "<landmarks>: expected 68 points, found 0"),
        ("x y\n" + "1 2\n" * 67, "<landmarks>:1: not numeric: 'x y'"),
        ("1 2\n" * 5 + "1 2 3\n", "<landmarks>:6: expected 2 numbers, got '1 2 3'"),
        ("1 2\n" * 5 + "7\n", "<landmarks>:6: expected 2 numbers, got '7'"),
        ("1 nan\n" + "1 2\n" * 67, "<landmarks>:1: non-finite value: '1 nan'"),
    ],
)
def test_bad_landmark_text_names_the_line(text, message):
    with pytest.raises(LandmarkFileError) as e:
        parse_landmarks_text(text)
    assert str(e.value) == message


def test_landmark_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "deep" / "pts.txt"
    write_landmarks_file(path, POINTS)
    assert path.read_text().splitlines()[0] == "10.000 -5.500"
    np.testing.assert_allclose(read_landmarks_file(path), POINTS, atol=5e-4)
    with pytest.raises(ValueError, match=r"expected \(68, 2\) points"):
        write_landmarks_file(tmp_path / "x.txt", POINTS[:10])
    with pytest.raises(LandmarkFileError, match="landmarks file not found"):
        read_landmarks_file(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LandmarkFileError, match=r"bin\.txt: cannot read"):
        read_landmarks_file(tmp_path / "bin.txt")
    (tmp_path / "short.txt").write_text("1 2\n" * 67)
    with pytest.raises(LandmarkFileError, match=rf"{tmp_path / 'short.txt'}: expected 68"):
        read_landmarks_file(tmp_path / "short.txt")


# --- images -------------------------------------------------------------------------------


def test_save_and_load_are_exact_and_byte_stable(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    grey = rgb[..., 0].copy()
    save_image(rgb, tmp_path / "a.png")
    save_image(rgb, tmp_path / "b.png")
    save_image(grey, tmp_path / "g.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgb)
    np.testing.assert_array_equal(load_image(tmp_path / "g.png", "L"), grey)
    assert load_image(tmp_path / "g.png").shape == (9, 7, 3)
    assert load_image(encode_png(grey), "L").tolist() == grey.tolist()
    save_image(rgb, tmp_path / "q.jpg")
    assert load_image(tmp_path / "q.jpg").shape == (9, 7, 3)
    with pytest.raises(ValueError, match="unsupported image suffix"):
        save_image(rgb, tmp_path / "a.tiff")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "g.png", "q.jpg"]


def test_load_image_errors_name_the_file(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.zeros((40, 30), np.uint8) + 99).save(good, format="PNG")
    data = good.getvalue()
    cases = {
        "truncated.png": (data[: len(data) // 2], "corrupt or truncated image"),
        "garbage.png": (b"\x89PNG not at all", "not a readable image"),
        "empty.jpg": (b"", "not a readable image"),
        "text.png": (b"hello, world\n" * 10, "not a readable image"),
    }
    for name, (blob, reason) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ImageError) as e:
            load_image(tmp_path / name)
        assert e.value.path == str(tmp_path / name)
        assert e.value.reason.startswith(reason), (name, e.value.reason)
        assert str(e.value).startswith(f"{tmp_path / name}: ")
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="cannot open"):
        load_image(tmp_path)  # a folder
    with pytest.raises(ImageError, match=r"40×30 pixels|30×40 pixels"):
        load_image(data, max_pixels=1000)
    with pytest.raises(ImageError, match="<bytes>: corrupt or truncated"):
        load_image(data[:-30])


def test_split_column_is_optional_round_trips_and_is_checked(tmp_path):
    rows = [Row("images/a.png", "a", "happy", None, None, "fer2013", "val"),
            Row("images/b.png", "b", "sad", None, None, "fer2013")]  # fmt: skip
    write_manifest(tmp_path, rows)
    assert (tmp_path / "manifest.csv").read_text() == (
        HEADER.rstrip("\n") + ",split\nimages/a.png,a,happy,,,fer2013,val\n"
        "images/b.png,b,sad,,,fer2013,\n"
    )
    assert read_manifest(tmp_path, check_files=False) == (rows, Report())
    # Without any split the file is byte for byte what it was before the column existed.
    write_manifest(tmp_path, [Row("images/b.png", "b", "sad")])
    assert (tmp_path / "manifest.csv").read_text() == HEADER + "images/b.png,b,sad,,,\n"
    (tmp_path / "manifest.csv").write_text(
        HEADER.rstrip("\n")
        + ",split\nimages/a.png,a,happy,,,t,holdout\nimages/b.png,b,sad,,,t,test\n"
    )
    back, report = read_manifest(tmp_path, check_files=False)
    assert [r.split for r in back] == ["test"]
    assert [(p.item, p.reason) for p in report.problems] == [
        ("manifest.csv:2 (images/a.png)",
         "field 'split': 'holdout' is not one of ['train', 'val', 'test'] or empty")
    ]  # fmt: skip
    with pytest.raises(ManifestError, match="split 'dev' not in"):
        write_manifest(tmp_path, [Row("images/a.png", "a", "happy", split="dev")])


def test_names_that_are_not_utf8_are_refused_by_the_writer_and_escaped_in_reports(tmp_path):
    bad = os.fsdecode(b"images/caf\xe9.png")
    with pytest.raises(ManifestError, match=r"'images/caf\\\\xe9.png' is not valid UTF-8"):
        write_manifest(tmp_path, [Row(bad, "s", "happy")])
    assert not (tmp_path / "manifest.csv").exists() and not list(tmp_path.iterdir())
    report = Report()
    report.add(bad, "why")
    report.write_csv(tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text(
        encoding="utf-8"
    ) == "item,reason\nimages/caf\\xe9.png,why\n"
