"""`facecal data import FORMAT SRC --out DIR`: known datasets into the canonical layout.

Writes `DIR/manifest.csv` (`facecal.manifest`), the faces under `DIR/images/` and ground-truth
landmarks (68 lines ``x y``) under `DIR/landmarks/`. Every image is fully decoded with
`imageio.load_image` first, so a corrupt or truncated file is reported, never imported. PNG and
JPEG files are then copied byte for byte (lossless, and exactly what the pipeline would read from
the source); other formats (JAFFE's TIFF, BMP, …) are written as PNG, grey when the picture is
grey, pixels unchanged.

Formats:

* ``jaffe``: ``SRC/labels.csv`` + ``SRC/images/*.tiff``. Subject = file-name prefix (``KA`` of
  ``KA.AN1.39.tiff``); intensity = (rating_of_posed_emotion − 1) / 4 clipped to [0, 1]; neutral 0.
* ``ckplus``: the official CK+ tree ``cohn-kanade-images/Sxxx/yyy/*.png``,
  ``Emotion/Sxxx/yyy/*_emotion.txt`` (one float code, `emotions.CKPLUS_CODES`, naming the apex
  frame) and optional ``Landmarks/Sxxx/yyy/*_landmarks.txt``. Frame k of a sequence whose apex is
  frame a gets intensity k / a (onset 0, apex 1). The onset frame is a neutral face, so it is
  labelled ``neutral`` (``--onset emotion`` keeps the sequence's emotion at intensity 0).
  Sequences without an emotion file (CK+ labels 327 of its 593) are reported and skipped.
  ``--frames all|apex|ends`` keeps every frame, the apex only, or onset + apex.
* ``fer2013``: the Kaggle csv (``emotion,pixels,Usage``; 48×48 grey; `emotions.FER2013_CODES`),
  or the same faces as JPEG folders: ``SRC/labels.csv`` (``file,emotion,usage``, paths relative
  to SRC) or, without it, ``SRC/<class>/<Usage>_<id>.jpg`` (a usage folder such as
  ``publictest/``; the usage from the file-name prefix). The official usage is kept as the
  manifest's ``split`` (Training → train, PublicTest → val, PrivateTest → test), so results
  compare with the literature. No intensity; no subject ids, so every image is its own subject.
  ``--usage`` filters rows.
* ``folder``: ``SRC/<emotion>/…/<image>``. Subject from ``--subject-regex`` searched in the path
  below the emotion folder (just the file name in a flat folder): its group ``subject``, else
  group 1, else the whole match; without it every image is its own subject (``<emotion>/<path
  below the emotion folder>``, suffix included). No intensity.

Bad items (unreadable images, pictures that decode to a constant or near-constant grey —
`validate.blank_reason` —, unknown emotions, broken landmark files, duplicate labels, file names
that are not valid UTF-8, FIFOs and other non-regular files, …) are reported naming the file or
csv line and skipped; the rest is imported. Output is deterministic (sources walked in sorted
order) and goes only into an empty DIR (``--force`` replaces the manifest, images/ and
landmarks/ of a previous import).

All or nothing: the import is written into a scratch folder beside DIR (same file system) and
moved into place by renames only at the end; a failure at any point (or an import with nothing
to import) leaves DIR exactly as it was — with ``--force`` the previous import's files are moved
aside first and moved back if the swap fails.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from facecal.data.validate import blank_reason
from facecal.emotions import CKPLUS_CODES, FER2013_CODES, NEUTRAL, UnknownEmotion, normalize_emotion
from facecal.errors import FacecalError
from facecal.imageio import ImageError, load_image, save_image
from facecal.manifest import (
    MANIFEST,
    Report,
    Row,
    is_utf8,
    read_landmarks_file,
    write_landmarks_file,
    write_manifest,
)
from facecal.paths import DATA_DIR

FORMATS = ("jaffe", "ckplus", "fer2013", "folder")
FRAMES = ("all", "apex", "ends")
ONSETS = ("neutral", "emotion")
IMAGES, LANDMARKS = "images", "landmarks"
STAGE = ".facecal-import"  # hidden work folder of earlier versions inside --out (ignored, removed)
COPY_SUFFIXES = {".png": ".png", ".jpg": ".jpg", ".jpeg": ".jpg"}  # copied byte for byte
FER_SIDE = 48
# FER2013's official usages → the manifest's split (the literature's train / validation / test).
FER_USAGE_SPLITS = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}


class DatasetImportError(FacecalError):
    """The source as a whole cannot be imported (missing folder, wrong csv header, busy --out)."""


@dataclass
class ImportResult:
    out: Path
    rows: list[Row]
    report: Report
    filtered: int = 0  # rows left out on purpose (fer2013 --usage)


@dataclass
class _Item:
    """One face to write. `key` names it in the report if writing fails."""

    key: str
    row: Row
    file: Path | None = None  # source image, decoded to check it, then copied/converted
    pixels: np.ndarray | None = None  # already decoded (fer2013)
    landmarks_file: Path | None = None  # source ground-truth landmarks


def import_dataset(
    fmt: str,
    src: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    frames: str = "all",
    onset: str = "neutral",
    subject_regex: str | None = None,
    usage: Iterable[str] | None = None,
    progress: bool = True,
) -> ImportResult:
    """Import dataset `src` of format `fmt` into `out` (see the module docstring).

    Returns the imported rows and a report of what was skipped. Nothing is written (and no
    manifest) when no item could be imported; the caller decides whether that is an error.
    """
    if fmt not in FORMATS:
        raise DatasetImportError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
    if frames not in FRAMES:
        raise DatasetImportError(f"--frames {frames!r}: expected one of {list(FRAMES)}")
    if onset not in ONSETS:
        raise DatasetImportError(f"--onset {onset!r}: expected one of {list(ONSETS)}")
    src, out = Path(src), Path(out)
    if not src.exists():
        raise DatasetImportError(f"{src}: not found")
    regex = _compile_subject_regex(subject_regex) if subject_regex else None
    _check_overlap(src, out)
    if out.exists() and not out.is_dir():
        raise DatasetImportError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(p.name != STAGE for p in out.iterdir()) and not force:
        raise DatasetImportError(
            f"--out {out}: not empty; import into an empty folder, or pass --force to "
            f"replace its {MANIFEST}, {IMAGES}/ and {LANDMARKS}/"
        )

    # Plan first (reads labels, walks folders, checks the csv header): a source that cannot be
    # imported at all fails before --out is touched.
    report = Report()
    filtered = [0]
    if fmt == "jaffe":
        items: Iterable[_Item] = _plan_jaffe(src, report)
    elif fmt == "ckplus":
        items = _plan_ckplus(src, report, frames, onset)
    elif fmt == "fer2013":
        items = _plan_fer2013(src, report, set(usage) if usage else None, filtered)
    else:
        items = _plan_folder(src, report, regex)
    total = len(items) if isinstance(items, list) else _fer_rows_estimate(src)

    # Written into a scratch folder beside --out (same file system, so moving is a rename) and
    # swapped in at the end: an import that fails, is interrupted or imports nothing leaves
    # --out as it was.
    scratch = _scratch_for(out)
    if scratch.exists():
        shutil.rmtree(scratch)  # left by an interrupted import
    scratch.mkdir(parents=True)
    try:
        rows = _write_items(items, scratch, report, total, f"import {fmt}", progress)
        if rows:
            # Before --out is touched: a row the manifest cannot hold fails here.
            write_manifest(scratch, rows)
            _swap_in(scratch, out)
    finally:
        previous = scratch / ".previous"
        if not previous.is_dir() or not any(previous.iterdir()):  # else it holds the only copy
            shutil.rmtree(scratch, ignore_errors=True)
    return ImportResult(out, sorted(rows, key=lambda r: r.image), report, filtered[0])


# --- output folder ------------------------------------------------------------------------


def _check_overlap(src: Path, out: Path) -> None:
    s, o = src.resolve(), out.resolve()
    if s == o or (src.is_dir() and (o.is_relative_to(s) or s.is_relative_to(o))):
        raise DatasetImportError(
            f"--out {out} overlaps the source {src}; import into a separate folder"
        )


def _scratch_for(out: Path) -> Path:
    # Beside where --out really lies (it may be a link to another disk): renames stay on one
    # file system.
    real = out.resolve()
    return real.parent / f".{real.name}.facecal-import"


OUTPUTS = (MANIFEST, IMAGES, LANDMARKS)


def _swap_in(scratch: Path, out: Path) -> None:
    """Move the finished import from `scratch` into `out` by renames only. What an earlier
    import wrote there goes aside first (into `scratch/.previous`) and is deleted only once
    the new files are in place; if a rename fails, it is put back. Other files stay."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / STAGE, ignore_errors=True)
    aside = scratch / ".previous"
    aside.mkdir()
    moved_aside: list[str] = []
    moved_in: list[str] = []
    try:
        for name in OUTPUTS:
            if (out / name).exists() or (out / name).is_symlink():
                os.replace(out / name, aside / name)
                moved_aside.append(name)
        for name in OUTPUTS:
            if (scratch / name).exists():
                os.replace(scratch / name, out / name)
                moved_in.append(name)
    except BaseException as error:
        try:
            for name in moved_in:
                os.replace(out / name, scratch / name)
            for name in moved_aside:
                os.replace(aside / name, out / name)
        except OSError as e:  # the caller keeps `scratch`, which holds them
            raise DatasetImportError(
                f"--out {out}: the import failed ({error}) and the previous import's files could "
                f"not be moved back ({e}); they are in {aside}"
            ) from error
        raise
    shutil.rmtree(aside)


# --- writing ------------------------------------------------------------------------------


def _write_items(
    items: Iterable[_Item], out: Path, report: Report, total: int | None, desc: str, progress: bool
) -> list[Row]:
    rows = []
    for item in tqdm(
        items, total=total, desc=desc, unit="img", disable=not progress, file=sys.stderr
    ):
        bad = [
            f
            for f in (item.row.image, item.row.subject, item.row.landmarks or "")
            if not is_utf8(f)
        ]
        if bad:
            # The manifest is UTF-8; a name with undecodable bytes has no text to store.
            report.add(item.key, "file name is not valid UTF-8 (shown with \\x escapes); rename it")
            continue
        try:
            _write_item(item, out)
        except ImageError as e:
            report.add(item.key, e.reason if e.path == item.key else str(e))
            continue
        except FacecalError as e:
            report.add(item.key, str(e))
            continue
        row = item.row
        if row.intensity is not None:  # as the manifest stores it, so a re-read compares equal
            row.intensity = float(f"{row.intensity:.6g}")
        rows.append(row)
    return rows


def _write_item(item: _Item, out: Path) -> None:
    # Check everything before writing anything, so a bad item leaves no file behind.
    if item.landmarks_file is not None:
        _check_regular(item.landmarks_file)
    points = read_landmarks_file(item.landmarks_file) if item.landmarks_file else None
    dest = out / item.row.image
    if item.pixels is not None:
        _check_not_blank(item.pixels)
        save_image(item.pixels, dest)
    else:
        assert item.file is not None
        _check_regular(item.file)  # opening a FIFO would wait for a writer forever
        pixels = load_image(item.file)  # full decode: corrupt or truncated → ImageError
        _check_not_blank(pixels)
        if item.file.suffix.lower() in COPY_SUFFIXES:
            _atomic_copy(item.file, dest)
        else:
            save_image(_grey_if_grey(pixels), dest)
    if points is not None:
        assert item.row.landmarks is not None
        write_landmarks_file(out / item.row.landmarks, points)


class _Skip(FacecalError):
    """An item that is readable but must not be imported; the message is the reason."""


def _check_regular(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return  # the reader reports it
    except OSError as e:
        raise _Skip(f"cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a folder"
            if stat.S_ISDIR(mode)
            else "not a regular file"
        )
        raise _Skip(f"{kind}, not a regular file; skipped")


def _check_not_blank(pixels: np.ndarray) -> None:
    reason = blank_reason(pixels)
    if reason:
        raise _Skip(f"{reason}; skipped")


def _grey_if_grey(rgb: np.ndarray) -> np.ndarray:
    """H×W for a picture whose three channels are equal (exactly what it was), else H×W×3."""
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0]
    return rgb


def _atomic_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=dest.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(src.read_bytes())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _out_name(rel: str, src_suffix: str) -> str:
    """`rel` (no suffix) + the suffix the written file gets."""
    return rel + COPY_SUFFIXES.get(src_suffix.lower(), ".png")


def _visible_files(folder: Path) -> list[Path]:
    """Files under `folder`, sorted, skipping hidden files and folders (.DS_Store, .git)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(found)


def _read_text(path: Path) -> str:
    try:
        _check_regular(path)
    except _Skip as e:
        raise DatasetImportError(f"{path}: {e}") from None
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetImportError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise DatasetImportError(f"{path}: cannot read ({e.strerror or e})") from None


def _csv_header(reader, path: Path, required: tuple[str, ...]) -> list[str]:
    header = [h.strip().lower() for h in next(reader, None) or []]
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetImportError(f"{path}: missing column(s) {missing}; header is {header}")
    return header


# --- jaffe --------------------------------------------------------------------------------


def _plan_jaffe(src: Path, report: Report) -> list[_Item]:
    labels = src / "labels.csv"
    if not labels.is_file():
        raise DatasetImportError(
            f"{labels}: not found (a JAFFE folder holds labels.csv and images/; see its README.md)"
        )
    reader = csv.reader(_read_text(labels).splitlines())
    header = _csv_header(reader, labels, ("file", "emotion", "rating_of_posed_emotion"))
    col = {name: i for i, name in enumerate(header)}
    items: list[_Item] = []
    listed: dict[str, int] = {}
    for rec in reader:
        line = reader.line_num
        if not any(c.strip() for c in rec):
            continue
        rec = rec + [""] * (len(header) - len(rec))
        file = rec[col["file"]].strip()
        where = f"{labels}:{line}"
        if not file:
            report.add(where, "empty 'file' field")
            continue
        where = f"{where} ({file})"
        rel = PurePosixPath(file)
        if rel.is_absolute() or ".." in rel.parts:
            report.add(where, "field 'file' must be a path inside the JAFFE folder")
            continue
        if rel.name in listed:
            report.add(where, f"duplicate of line {listed[rel.name]}")
            continue
        listed[rel.name] = line
        try:
            emotion = normalize_emotion(rec[col["emotion"]])
        except UnknownEmotion as e:
            report.add(where, f"field 'emotion': {e}")
            continue
        try:
            intensity = _jaffe_intensity(emotion, rec[col["rating_of_posed_emotion"]])
        except ValueError as e:
            report.add(where, f"field 'rating_of_posed_emotion': {e}")
            continue
        stem = rel.name.rsplit(".", 1)[0] if "." in rel.name else rel.name
        subject = stem.split(".")[0]
        image = _out_name(f"{IMAGES}/{stem}", rel.suffix)
        items.append(
            _Item(
                str(src / file),
                Row(image, subject, emotion, intensity, None, "jaffe"),
                file=src / file,
            )
        )
    images_dir = src / IMAGES
    if images_dir.is_dir():
        for path in _visible_files(images_dir):
            if path.name not in listed:
                report.add(str(path), "not listed in labels.csv; skipped")
    return items


def _jaffe_intensity(emotion: str, text: str) -> float | None:
    """(rating − 1) / 4 clipped to [0, 1]: the 1–5 scale of the 60 raters; neutral is 0."""
    if emotion == NEUTRAL:
        return 0.0
    text = text.strip()
    if not text:
        return None  # unrated: unknown intensity, the face is still usable
    try:
        rating = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(rating):
        raise ValueError(f"{text!r} is not a finite number")
    return min(1.0, max(0.0, (rating - 1.0) / 4.0))


# --- ck+ ----------------------------------------------------------------------------------


def _find_dir(src: Path, name: str) -> Path | None:
    """`src/name`, or `src/<one level>/name` as the official zips unpack."""
    if (src / name).is_dir():
        return src / name
    for child in sorted(p for p in src.iterdir() if p.is_dir()):
        if (child / name).is_dir():
            return child / name
    return None


def _plan_ckplus(src: Path, report: Report, frames: str, onset: str) -> list[_Item]:
    if not src.is_dir():
        raise DatasetImportError(f"{src}: a CK+ source is a folder")
    images_dir = _find_dir(src, "cohn-kanade-images")
    emotion_dir = _find_dir(src, "Emotion")
    landmarks_dir = _find_dir(src, "Landmarks")
    if images_dir is None:
        raise DatasetImportError(
            f"{src}: no cohn-kanade-images/ folder (the official CK+ "
            f"layout: cohn-kanade-images/, Emotion/, Landmarks/)"
        )
    if emotion_dir is None:
        raise DatasetImportError(
            f"{src}: no Emotion/ folder; CK+ emotions come from Emotion/Sxxx/yyy/*_emotion.txt"
        )
    items: list[_Item] = []
    sequences = set()
    for subject_dir in sorted(p for p in images_dir.iterdir() if not p.name.startswith(".")):
        if not subject_dir.is_dir():
            report.add(str(subject_dir), "not inside a Sxxx/yyy/ sequence folder; skipped")
            continue
        for seq_dir in sorted(p for p in subject_dir.iterdir() if not p.name.startswith(".")):
            if not seq_dir.is_dir():
                report.add(str(seq_dir), "not inside a Sxxx/yyy/ sequence folder; skipped")
                continue
            sequences.add((subject_dir.name, seq_dir.name))
            items += _plan_sequence(
                seq_dir,
                emotion_dir / subject_dir.name / seq_dir.name,
                landmarks_dir,
                report,
                frames,
                onset,
            )
    # Labels without pictures are as wrong as pictures without labels: say so.
    for label in _visible_files(emotion_dir):
        seq = label.parent.relative_to(emotion_dir).parts
        if len(seq) == 2 and label.name.endswith("_emotion.txt") and tuple(seq) not in sequences:
            report.add(str(label), f"no image sequence {images_dir / seq[0] / seq[1]}")
    return items


def _plan_sequence(
    seq_dir: Path,
    label_dir: Path,
    landmarks_dir: Path | None,
    report: Report,
    frames: str,
    onset: str,
) -> list[_Item]:
    subject, seq = seq_dir.parent.name, seq_dir.name
    files = _visible_files(seq_dir)
    pictures = [f for f in files if f.parent == seq_dir and f.suffix.lower() == ".png"]
    for f in files:
        if f not in pictures:
            report.add(str(f), "not a .png frame of the sequence; skipped")
    if not pictures:
        report.add(str(seq_dir), "no .png frames")
        return []
    labels = sorted(label_dir.glob("*_emotion.txt")) if label_dir.is_dir() else []
    if not labels:
        report.add(
            str(seq_dir),
            f"no emotion label ({label_dir}/*_emotion.txt); {len(pictures)} frames skipped",
        )
        return []
    if len(labels) > 1:
        report.add(str(seq_dir), f"{len(labels)} emotion files in {label_dir}; expected one")
        return []
    label = labels[0]
    try:
        emotion = _ckplus_emotion(label)
    except DatasetImportError as e:
        report.add(str(label), str(e).removeprefix(f"{label}: "))
        return []
    stems = [p.stem for p in pictures]
    apex_stem = label.name[: -len("_emotion.txt")]
    if apex_stem not in stems:
        report.add(str(label), f"names frame {apex_stem}, which is not in {seq_dir}")
        return []
    apex = stems.index(apex_stem)
    for late in pictures[apex + 1 :]:
        report.add(str(late), f"after the labelled apex frame {apex_stem}; skipped")
    keep = {"all": range(apex + 1), "apex": [apex], "ends": sorted({0, apex})}[frames]
    items = []
    for k in keep:
        picture = pictures[k]
        if emotion == NEUTRAL:
            row_emotion, intensity = NEUTRAL, 0.0
        elif apex == 0:
            row_emotion, intensity = emotion, 1.0
        else:
            intensity = k / apex
            row_emotion = NEUTRAL if (k == 0 and onset == "neutral") else emotion
        rel = f"{subject}/{seq}/{picture.stem}"
        lm_file = (
            landmarks_dir / subject / seq / f"{picture.stem}_landmarks.txt"
            if landmarks_dir
            else None
        )
        if lm_file is not None and not lm_file.is_file():
            lm_file = None  # ground truth is optional; the summary counts rows that have it
        row = Row(
            _out_name(f"{IMAGES}/{rel}", picture.suffix),
            subject,
            row_emotion,
            intensity,
            f"{LANDMARKS}/{rel}.txt" if lm_file else None,
            "ckplus",
        )
        items.append(_Item(str(picture), row, file=picture, landmarks_file=lm_file))
    return items


def _ckplus_emotion(label: Path) -> str:
    text = _read_text(label).strip()
    try:
        value = float(text)
    except ValueError:
        raise DatasetImportError(
            f"{label}: expected one number (the emotion code), got {text[:40]!r}"
        ) from None
    if not value.is_integer() or int(value) not in CKPLUS_CODES:
        raise DatasetImportError(
            f"{label}: emotion code {text!r} is not one of "
            f"{sorted(CKPLUS_CODES)} (emotions.CKPLUS_CODES)"
        )
    return CKPLUS_CODES[int(value)]


# --- fer2013 ------------------------------------------------------------------------------


def _fer_csv(src: Path) -> Path:
    if src.is_file():
        return src
    for name in ("fer2013.csv", "icml_face_data.csv"):
        if (src / name).is_file():
            return src / name
    raise DatasetImportError(
        f"{src}: no fer2013.csv or icml_face_data.csv, no labels.csv and no "
        f"<class>/<Usage>_<id>.jpg folders; pass the csv file or the FER2013 folder"
    )


def _fer_rows_estimate(src: Path) -> int | None:
    """Lines of the csv minus its header: the progress bar's total (no quoted newlines in it)."""
    try:
        path = _fer_csv(src)
        with open(path, "rb") as f:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        return max(lines - 1, 0)
    except (DatasetImportError, OSError):
        return None


def _fer_split(usage: str) -> str | None:
    """The manifest split of an official usage; ValueError for another value."""
    if usage in FER_USAGE_SPLITS:
        return FER_USAGE_SPLITS[usage]
    raise ValueError(f"{usage!r} is not one of {list(FER_USAGE_SPLITS)}")


def _plan_fer2013(
    src: Path, report: Report, usage: set[str] | None, filtered: list[int]
) -> Iterable[_Item]:
    if usage is not None and (unknown := sorted(usage - set(FER_USAGE_SPLITS))):
        raise DatasetImportError(
            f"--usage {','.join(unknown)}: expected values among {list(FER_USAGE_SPLITS)}"
        )
    if src.is_dir() and (src / "labels.csv").exists():
        return _plan_fer_labels(src, report, usage, filtered)
    if src.is_dir() and not any((src / n).is_file() for n in ("fer2013.csv", "icml_face_data.csv")):
        return _plan_fer_folders(src, report, usage, filtered)
    path = _fer_csv(src)
    header = _fer_header(path)
    if usage is not None and "usage" not in header:
        raise DatasetImportError(f"{path}: --usage given but the csv has no Usage column")
    return _fer_items(path, header, report, usage, filtered)


def _fer_emotion(label: str) -> str:
    """A class folder / labels.csv emotion: a FER2013 code or a label (``angry``, …)."""
    label = label.strip()
    if label.isdigit() and int(label) in FER2013_CODES:
        return FER2013_CODES[int(label)]
    return normalize_emotion(label)


def _fer_file_item(
    src: Path, rel: PurePosixPath, emotion: str, split: str | None, where: str
) -> _Item:
    stem = rel.name.rsplit(".", 1)[0]
    image = _out_name(f"{IMAGES}/{rel.parent.as_posix()}/{stem}", rel.suffix).replace("/./", "/")
    row = Row(image, stem, emotion, None, None, "fer2013", split)
    return _Item(where, row, file=src / rel)


def _plan_fer_labels(
    src: Path, report: Report, usage: set[str] | None, filtered: list[int]
) -> list[_Item]:
    """``SRC/labels.csv`` (``file, emotion, usage``) beside the JPEG folders it names."""
    labels = src / "labels.csv"
    reader = csv.reader(_read_text(labels).splitlines())
    header = _csv_header(reader, labels, ("file", "emotion"))
    col = {name: i for i, name in enumerate(header)}
    if usage is not None and "usage" not in col:
        raise DatasetImportError(f"{labels}: --usage given but the csv has no usage column")
    items: list[_Item] = []
    listed: dict[str, int] = {}
    for rec in reader:
        line = reader.line_num
        if not any(c.strip() for c in rec):
            continue
        rec = rec + [""] * (len(header) - len(rec))
        file = rec[col["file"]].strip()
        where = f"{labels}:{line}"
        if not file:
            report.add(where, "empty 'file' field")
            continue
        where = f"{where} ({file})"
        rel = PurePosixPath(file)
        if rel.is_absolute() or ".." in rel.parts:
            report.add(where, "field 'file' must be a path inside the FER2013 folder")
            continue
        if file in listed:
            report.add(where, f"duplicate of line {listed[file]}")
            continue
        listed[file] = line
        split = None
        if "usage" in col:
            use = rec[col["usage"]].strip()
            if usage is not None and use not in usage:
                filtered[0] += 1
                continue
            try:
                split = _fer_split(use)
            except ValueError as e:
                report.add(where, f"field 'usage': {e}")
                continue
        try:
            emotion = _fer_emotion(rec[col["emotion"]])
        except UnknownEmotion as e:
            report.add(where, f"field 'emotion': {e}")
            continue
        items.append(_fer_file_item(src, rel, emotion, split, str(src / rel)))
    return items


def _plan_fer_folders(
    src: Path, report: Report, usage: set[str] | None, filtered: list[int]
) -> list[_Item]:
    """``SRC/<class>/<Usage>_<id>.jpg`` (one usage folder of the distribution, e.g.
    ``publictest/``): the class from the folder, the usage from the file-name prefix."""
    items: list[_Item] = []
    found = False
    for entry in sorted(p for p in src.iterdir() if not p.name.startswith(".")):
        if not entry.is_dir():
            report.add(str(entry), "not inside a <class>/ folder; skipped")
            continue
        files = _visible_files(entry)
        try:
            emotion = _fer_emotion(entry.name)
        except UnknownEmotion as e:
            report.add(f"{entry}/", f"{e}; its {len(files)} file(s) skipped")
            continue
        for path in files:
            found = True
            use = path.name.split("_", 1)[0]
            if use not in FER_USAGE_SPLITS:
                report.add(
                    str(path),
                    f"file name does not start with a FER2013 usage "
                    f"({', '.join(f'{u}_' for u in FER_USAGE_SPLITS)}); skipped",
                )
                continue
            if usage is not None and use not in usage:
                filtered[0] += 1
                continue
            rel = PurePosixPath(path.relative_to(src).as_posix())
            items.append(_fer_file_item(src, rel, emotion, _fer_split(use), str(path)))
    if not found:
        _fer_csv(src)  # neither layout: the error names what a FER2013 source holds
    return items


def _fer_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        return _csv_header(csv.reader(f), path, ("emotion", "pixels"))


def _fer_items(
    path: Path, header: list[str], report: Report, usage: set[str] | None, filtered: list[int]
) -> Iterator[_Item]:
    col = {name: i for i, name in enumerate(header)}
    # Streamed (the real file is 300 MB of text); a stray non-UTF-8 byte spoils one row only.
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        next(reader)
        for index, rec in enumerate(reader):
            where = f"{path}:{reader.line_num}"
            rec = rec + [""] * (len(header) - len(rec))
            use = rec[col["usage"]].strip() if "usage" in col else None
            if usage is not None and use not in usage:
                filtered[0] += 1
                continue
            split = None
            if use is not None:
                try:
                    split = _fer_split(use)
                except ValueError as e:
                    report.add(where, f"field 'usage': {e}")
                    continue
            code = rec[col["emotion"]].strip()
            try:
                emotion = FER2013_CODES[int(code)]
            except (ValueError, KeyError):
                report.add(
                    where,
                    f"field 'emotion': code {code!r} is not one of "
                    f"{sorted(FER2013_CODES)} (emotions.FER2013_CODES)",
                )
                continue
            try:
                pixels = _fer_pixels(rec[col["pixels"]])
            except ValueError as e:
                report.add(where, f"field 'pixels': {e}")
                continue
            name = f"fer2013_{index:05d}"
            yield _Item(
                where,
                Row(f"{IMAGES}/{name}.png", name, emotion, None, None, "fer2013", split),
                pixels=pixels,
            )


def _fer_pixels(text: str) -> np.ndarray:
    values = text.split()
    if len(values) != FER_SIDE * FER_SIDE:
        raise ValueError(
            f"{len(values)} values, expected {FER_SIDE * FER_SIDE} ({FER_SIDE}×{FER_SIDE} grey)"
        )
    try:
        arr = np.array([int(v) for v in values], dtype=np.int64)
    except ValueError:
        bad = next(v for v in values if not v.lstrip("-").isdigit())
        raise ValueError(f"{bad[:20]!r} is not an integer") from None
    if arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"values must lie in 0–255, found {arr.min()}–{arr.max()}")
    return arr.astype(np.uint8).reshape(FER_SIDE, FER_SIDE)


# --- folder -------------------------------------------------------------------------------


def _compile_subject_regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise DatasetImportError(
            f"--subject-regex {pattern!r}: not a valid regular expression ({e})"
        ) from None


def _subject_from(regex: re.Pattern, rel: str) -> str | None:
    m = regex.search(rel)
    if m is None:
        return None
    if "subject" in regex.groupindex:
        return m.group("subject")
    return m.group(1) if regex.groups else m.group(0)


def _plan_folder(src: Path, report: Report, regex: re.Pattern | None) -> list[_Item]:
    if not src.is_dir():
        raise DatasetImportError(f"{src}: a folder source is a folder of <emotion>/ folders")
    items: list[_Item] = []
    taken: dict[str, Path] = {}
    for entry in sorted(p for p in src.iterdir() if not p.name.startswith(".")):
        if not entry.is_dir():
            report.add(str(entry), "not inside an <emotion>/ folder; skipped")
            continue
        files = _visible_files(entry)
        try:
            emotion = normalize_emotion(entry.name)
        except UnknownEmotion as e:
            report.add(f"{entry}/", f"{e}; its {len(files)} file(s) skipped")
            continue
        for path in files:
            rel = path.relative_to(entry).as_posix()
            # One subject per image without a regex: the source path with its suffix, so f.png
            # and f.jpeg (two images, two output files) are two subjects.
            subject = _subject_from(regex, rel) if regex is not None else f"{emotion}/{rel}"
            if not subject:
                assert regex is not None
                report.add(
                    str(path), f"--subject-regex {regex.pattern!r} finds no subject in {rel!r}"
                )
                continue
            stem = rel[: -len(path.suffix)] if path.suffix else rel
            image = _out_name(f"{IMAGES}/{emotion}/{stem}", path.suffix)
            if image in taken:
                report.add(
                    str(path), f"would be written to {image} like {taken[image]}; rename one"
                )
                continue
            taken[image] = path
            items.append(
                _Item(str(path), Row(image, subject, emotion, None, None, "folder"), file=path)
            )
    return items


# --- command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "format", choices=FORMATS, metavar="FORMAT", help=f"source layout: {', '.join(FORMATS)}"
    )
    parser.add_argument(
        "src",
        metavar="SRC",
        help="the dataset: a folder (jaffe, ckplus, folder) or the csv (fer2013)",
    )
    parser.add_argument(
        "--out",
        default=str(DATA_DIR),
        metavar="DIR",
        help=f"empty folder for manifest.csv, images/, landmarks/ (default: {DATA_DIR})",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace manifest.csv, images/ and landmarks/ of a non-empty --out",
    )
    parser.add_argument(
        "--report",
        metavar="FILE",
        default=None,
        help="also write the skipped items as CSV (item, reason) to FILE "
        "(keep it outside --out, which DVC tracks)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    group = parser.add_argument_group("ckplus")
    group.add_argument(
        "--frames",
        choices=FRAMES,
        default=None,
        help="frames of each sequence: all (default), apex, ends (onset + apex)",
    )
    group.add_argument(
        "--onset",
        choices=ONSETS,
        default=None,
        help="label of a sequence's onset frame: neutral (default) or the "
        "sequence's emotion at intensity 0",
    )
    group = parser.add_argument_group("fer2013")
    group.add_argument(
        "--usage",
        default=None,
        metavar="LIST",
        help="keep only these Usage values, comma-separated "
        "(e.g. Training,PublicTest); default: all rows",
    )
    group = parser.add_argument_group("folder")
    group.add_argument(
        "--subject-regex",
        default=None,
        metavar="REGEX",
        help="subject id from the path below the emotion folder: group "
        "'subject', else group 1, else the match (e.g. '^([A-Z]+\\d+)_'); "
        "default: one subject per image",
    )


def main(args: argparse.Namespace) -> int:
    only = {"frames": "ckplus", "onset": "ckplus", "usage": "fer2013", "subject_regex": "folder"}
    for name, fmt in only.items():
        if getattr(args, name) is not None and args.format != fmt:
            raise DatasetImportError(f"--{name.replace('_', '-')} applies to format {fmt} only")
    usage = [u.strip() for u in args.usage.split(",") if u.strip()] if args.usage else None
    result = import_dataset(
        args.format,
        args.src,
        args.out,
        force=args.force,
        frames=args.frames or "all",
        onset=args.onset or "neutral",
        subject_regex=args.subject_regex,
        usage=usage,
        progress=not args.quiet,
    )
    from facecal.data.validate import print_problems, summarize

    if args.report:
        result.report.write_csv(args.report)
    if result.report:
        hint = "" if args.report else " (--report FILE lists them all)"
        print(f"skipped {len(result.report)} item(s){hint}:", file=sys.stderr)
        print_problems(result.report, file=sys.stderr, limit=20, verb="skipped")
    if not result.rows:
        raise DatasetImportError(
            f"{args.src}: nothing imported ({len(result.report)} items skipped; see above)"
        )
    print(f"imported {len(result.rows)} images from {args.src} ({args.format}) into {result.out}")
    if result.filtered:
        print(f"  left out by --usage: {result.filtered} rows")
    for line in summarize(result.rows):
        print(f"  {line}")
    return 0
