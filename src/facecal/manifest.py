"""The canonical raw dataset: `DIR/manifest.csv` + `DIR/images/`, and its problem reports.

Columns: ``image`` (path relative to DIR), ``subject``, ``emotion`` (vocabulary of
`facecal.emotions`), ``intensity`` (0–1 or empty), ``landmarks`` (optional relative path of a
68-row ground-truth file), ``source`` (dataset of origin) and, optionally, ``split``
(``train``/``val``/``test`` or empty: a split the dataset prescribes, e.g. FER2013's official
usages; the landmarks stage keeps it and splits the other rows by subject). The ``split``
column is written only when some row has one, so datasets without it keep their exact bytes.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from facecal.emotions import UnknownEmotion, normalize_emotion
from facecal.errors import FacecalError

MANIFEST = "manifest.csv"
COLUMNS = ("image", "subject", "emotion", "intensity", "landmarks", "source")
SPLIT_COLUMN = "split"  # optional 7th column
SPLITS = ("train", "val", "test")
N_POINTS = 68


class ManifestError(FacecalError):
    """The manifest as a whole is unusable (missing, wrong header)."""


class LandmarkFileError(FacecalError):
    """A landmarks file that is not 68 rows of two numbers; the message names the file."""


@dataclass
class Problem:
    item: str  # file or "manifest.csv:<row>" the problem is about
    reason: str


@dataclass
class Report:
    """What a batch job skipped and why. Jobs never stop at a bad item; they add it here."""

    problems: list[Problem] = field(default_factory=list)

    def add(self, item: str | Path, reason: str) -> None:
        self.problems.append(Problem(safe_text(str(item)), safe_text(reason)))

    def __len__(self) -> int:
        return len(self.problems)

    def __bool__(self) -> bool:  # a Report is truthy when it holds problems
        return bool(self.problems)

    def extend(self, other: Report) -> None:
        self.problems.extend(other.problems)

    def write_csv(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["item", "reason"])
            for p in self.problems:
                w.writerow([p.item, p.reason])

    def print(self, file=None, limit: int = 20) -> None:
        file = file or sys.stderr  # looked up now, so redirecting sys.stderr works
        for p in self.problems[:limit]:
            print(f"  skipped {p.item}: {p.reason}", file=file)
        if len(self.problems) > limit:
            print(f"  … and {len(self.problems) - limit} more", file=file)


def safe_text(text: str) -> str:
    """`text` as valid UTF-8: the undecodable bytes of a file name (which Python carries as
    lone surrogates) become ``\\xNN`` escapes, so a report naming such a file can be written."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class Row:
    image: str
    subject: str
    emotion: str
    intensity: float | None = None
    landmarks: str | None = None
    source: str = ""
    split: str | None = None  # prescribed by the dataset (``SPLITS``), else None

    def as_csv(self, with_split: bool = False) -> list[str]:
        inten = "" if self.intensity is None else f"{self.intensity:.6g}"
        fields = [self.image, self.subject, self.emotion, inten, self.landmarks or "", self.source]
        return fields + [self.split or ""] if with_split else fields


def write_manifest(directory: str | Path, rows: list[Row]) -> Path:
    """Write `DIR/manifest.csv` sorted by image path (stable output for DVC hashing).

    Raises `ManifestError` naming the row when a field is not valid UTF-8 (a file name with
    undecodable bytes) or a split is not one of `SPLITS`; nothing is written then."""
    path = Path(directory) / MANIFEST
    with_split = any(r.split for r in rows)
    lines = [list(COLUMNS) + ([SPLIT_COLUMN] if with_split else [])]
    for row in sorted(rows, key=lambda r: r.image):
        fields = row.as_csv(with_split)
        bad = next((f for f in fields if not is_utf8(f)), None)
        if bad is not None:
            raise ManifestError(f"{path}: {safe_text(bad)!r} is not valid UTF-8 text")
        if row.split and row.split not in SPLITS:
            raise ManifestError(f"{path}: {row.image}: split {row.split!r} not in {list(SPLITS)}")
        lines.append(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: an interrupted import must not leave a half manifest that looks complete.
    tmp = path.with_name(f".{MANIFEST}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows(lines)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_manifest(directory: str | Path, check_files: bool = True) -> tuple[list[Row], Report]:
    """Parse and check a manifest. Bad rows go to the report (naming the row); good rows return.

    Checks: header, empty fields, unknown emotion, intensity not a number in [0, 1], split not
    one of `SPLITS`, duplicate image paths, paths escaping DIR, and (with `check_files`) missing
    image/landmark files.
    Image *contents* are checked where they are decoded (`facecal.imageio.load_image`).
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (import a dataset with `facecal data import`)")
    report = Report()
    rows: list[Row] = []
    seen: dict[str, int] = {}
    data = path.read_bytes()
    try:
        # utf-8-sig: a manifest saved by a spreadsheet starts with a byte-order mark.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ManifestError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or [h.strip() for h in header[: len(COLUMNS)]] != list(COLUMNS):
            raise ManifestError(
                f"{path}: header must be {','.join(COLUMNS)}[,{SPLIT_COLUMN}]; got {header}"
            )
        has_split = len(header) > len(COLUMNS) and header[len(COLUMNS)].strip() == SPLIT_COLUMN
        width = len(COLUMNS) + has_split
        for rec in reader:
            lineno = reader.line_num  # the file's line (a quoted field may span lines)
            where = f"{MANIFEST}:{lineno}"
            if not any(c.strip() for c in rec):
                continue
            if len(rec) < width:
                rec = rec + [""] * (width - len(rec))
            image, subject, emotion, intensity, landmarks, source = (c.strip() for c in rec[:6])
            split = rec[6].strip() if has_split else ""
            if not image:
                report.add(where, "empty 'image' field")
                continue
            where = f"{where} ({image})"
            if not subject:
                report.add(where, "empty 'subject' field")
                continue
            try:
                emotion = normalize_emotion(emotion)
            except UnknownEmotion as e:
                report.add(where, f"field 'emotion': {e}")
                continue
            try:
                inten = parse_intensity(intensity)
            except ValueError as e:
                report.add(where, f"field 'intensity': {e}")
                continue
            if split and split not in SPLITS:
                report.add(where, f"field 'split': {split!r} is not one of {list(SPLITS)} or empty")
                continue
            if _escapes(image) or (landmarks and _escapes(landmarks)):
                report.add(where, "path must be relative and stay inside the dataset folder")
                continue
            key = PurePosixPath(image).as_posix()  # "./images/a.png" is "images/a.png"
            if key in seen:
                report.add(where, f"duplicate of row {seen[key]}")
                continue
            if check_files and not (directory / image).is_file():
                report.add(where, f"image file not found: {directory / image}")
                continue
            if check_files and landmarks and not (directory / landmarks).is_file():
                report.add(where, f"landmarks file not found: {directory / landmarks}")
                continue
            seen[key] = lineno
            rows.append(
                Row(image, subject, emotion, inten, landmarks or None, source, split or None)
            )
    except csv.Error as e:
        raise ManifestError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows, report


def parse_intensity(text: str | float | None) -> float | None:
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{value} is outside [0, 1]")
    return value


_SPLIT = re.compile(r"[\s,;]+")


def read_landmarks_file(path: str | Path) -> np.ndarray:
    """A 68-point file as a (68, 2) float64 array of (x = column, y = row).

    Accepts the original code's formats: ``x y`` or ``x,y`` per line, blank lines ignored.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except FileNotFoundError:
        raise LandmarkFileError(f"{path}: landmarks file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LandmarkFileError(f"{path}: cannot read ({e})") from None
    return parse_landmarks_text(text, str(path))


def parse_landmarks_text(text: str, name: str = "<landmarks>") -> np.ndarray:
    points = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parts = [p for p in _SPLIT.split(line) if p]
        if len(parts) != 2:
            raise LandmarkFileError(f"{name}:{lineno}: expected 2 numbers, got {line!r}")
        try:
            xy = [float(p) for p in parts]
        except ValueError:
            raise LandmarkFileError(f"{name}:{lineno}: not numeric: {line!r}") from None
        if not all(math.isfinite(v) for v in xy):
            raise LandmarkFileError(f"{name}:{lineno}: non-finite value: {line!r}")
        points.append(xy)
    if len(points) != N_POINTS:
        raise LandmarkFileError(f"{name}: expected {N_POINTS} points, found {len(points)}")
    return np.asarray(points, dtype=np.float64)


def write_landmarks_file(path: str | Path, points: np.ndarray) -> None:
    """68 lines ``x y`` (the original extractor's output format)."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (N_POINTS, 2):
        raise ValueError(f"{path}: expected ({N_POINTS}, 2) points, got {points.shape}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(f"{x:.3f} {y:.3f}\n" for x, y in points), encoding="utf-8")


def _escapes(rel: str) -> bool:
    p = Path(rel)
    return p.is_absolute() or ".." in p.parts
