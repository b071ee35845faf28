"""Read FER2013 as it is distributed into uint8 arrays in memory.

Two layouts are understood:

* the folder layout of ``../shared/data/fer2013``: ``<usage dir>/<class>/<name>.jpg`` (48×48 grey
  JPEGs), e.g. ``train/angry/Training_10118481.jpg``;
* the original Kaggle csv: ``emotion,pixels,Usage`` with ``emotion`` an integer 0–6 and ``pixels``
  2304 space-separated grey values.

Both give a `Fer2013Split`: ``images`` N×48×48 uint8, ``labels`` N int64 indices into `CLASSES`
(FER2013's own order), ``names`` (file path or csv row). The whole Training usage is
28 k × 48 × 48 = 66 MB, so it is held in memory. Rows that cannot be used (unreadable image, wrong
size, unknown class, bad pixel string) are collected in a `manifest.Report` and skipped; they never
cost the other rows their result. Order is deterministic: classes in `CLASSES` order, files sorted
by name within a class; csv rows in file order.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facecal.errors import FacecalError
from facecal.imageio import ImageError, load_image
from facecal.manifest import Report

# FER2013's label order (the csv's integer codes 0–6).
CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
SIZE = 48
USAGES = {"Training": "train", "PublicTest": "publictest", "PrivateTest": "privatetest"}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".tif", ".tiff"}


class Fer2013Error(FacecalError):
    """A FER2013 folder or csv that cannot be read at all (missing, no classes, bad header)."""


@dataclass
class Fer2013Split:
    images: np.ndarray  # N×48×48 uint8
    labels: np.ndarray  # N int64, index into CLASSES
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(CLASSES)}

    def subset(self, idx: np.ndarray) -> Fer2013Split:
        return Fer2013Split(self.images[idx], self.labels[idx], [self.names[i] for i in idx])


def _empty() -> Fer2013Split:
    return Fer2013Split(np.zeros((0, SIZE, SIZE), np.uint8), np.zeros(0, np.int64), [])


def read_folder(folder: str | Path, report: Report | None = None) -> Fer2013Split:
    """Read ``folder/<class>/*`` for the classes of `CLASSES` present. Sub-folders with other
    names are reported (not guessed); a folder with none of the classes is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Fer2013Error(f"{folder}: FER2013 folder not found")
    report = report if report is not None else Report()
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    known = [p for p in subdirs if p.name in CLASSES]
    for p in subdirs:
        if p.name not in CLASSES:
            report.add(str(p), f"unknown class folder (expected one of {', '.join(CLASSES)})")
    if not known:
        raise Fer2013Error(f"{folder}: no class sub-folder ({', '.join(CLASSES)}) found")
    images, labels, names = [], [], []
    for p in sorted(known, key=lambda d: CLASSES.index(d.name)):
        label = CLASSES.index(p.name)
        for f in sorted(p.iterdir()):
            if not f.is_file() or f.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                img = load_image(f, mode="L")
            except ImageError as e:
                report.add(str(f), e.reason)
                continue
            if img.shape != (SIZE, SIZE):
                report.add(str(f), f"size {img.shape[1]}×{img.shape[0]}, expected {SIZE}×{SIZE}")
                continue
            images.append(img)
            labels.append(label)
            names.append(str(f))
    if not images:
        return _empty()
    return Fer2013Split(np.stack(images), np.asarray(labels, np.int64), names)


def read_csv(path: str | Path, report: Report | None = None) -> dict[str, Fer2013Split]:
    """Read the Kaggle csv (``emotion,pixels,Usage``) into one split per usage, keyed by
    `USAGES` values (``train``, ``publictest``, ``privatetest``); a csv without ``Usage`` gives
    everything as ``train``."""
    path = Path(path)
    if not path.is_file():
        raise Fer2013Error(f"{path}: FER2013 csv not found")
    report = report if report is not None else Report()
    rows: dict[str, tuple[list[np.ndarray], list[int], list[str]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if "emotion" not in header or "pixels" not in header:
            raise Fer2013Error(f"{path}: header must have 'emotion' and 'pixels', got {header}")
        for n, row in enumerate(reader, start=2):  # line 1 is the header
            item = f"{path}:{n}"
            usage = (row.get("Usage") or "Training").strip()
            if usage not in USAGES:
                report.add(item, f"unknown Usage {usage!r}")
                continue
            try:
                label = int(row["emotion"])
            except (TypeError, ValueError):
                report.add(item, f"emotion {row['emotion']!r} is not an integer")
                continue
            if not 0 <= label < len(CLASSES):
                report.add(item, f"emotion {label} outside 0–{len(CLASSES) - 1}")
                continue
            try:
                values = np.array((row["pixels"] or "").split(), dtype=np.int64)
            except ValueError:
                report.add(item, "pixels are not integers")
                continue
            if values.size != SIZE * SIZE:
                report.add(item, f"{values.size} pixels, expected {SIZE * SIZE}")
                continue
            if values.min() < 0 or values.max() > 255:
                report.add(item, "pixel values outside 0–255")
                continue
            imgs, labs, names = rows.setdefault(USAGES[usage], ([], [], []))
            imgs.append(values.astype(np.uint8).reshape(SIZE, SIZE))
            labs.append(label)
            names.append(item)
    return {
        split: Fer2013Split(np.stack(i), np.asarray(lab, np.int64), nm)
        for split, (i, lab, nm) in rows.items()
    }
