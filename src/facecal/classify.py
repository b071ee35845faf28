"""`facecal classify`: the expression CNN as a product — photos in, emotions out.

Every image goes through what the training faces went through: dlib's detector and 68-point
predictor on the grey image, the largest face (`face_points.process_image`, what the landmarks
stage runs), then the aligned crop of `faces.crop_faces` at the model's image size. The
model is a train_cnn file (``<regime>.pt`` + its ``.json``) or the ONNX export of `export-cnn`
(a file, or ``models:/facecal-classifier@champion`` through the registry); both give every
class probability (mirror-averaged logits where the model was trained with mirroring, as
`recognition.cnn.predict` does).

Images without a usable face (unreadable, no face, dlib failure, degenerate landmarks) are
reported on stderr with the reason and never stop the others. Output: one line per image
(default), ``--csv`` (header ``image,emotion,confidence,<class>…``) or ``--json`` (one
document), on stdout.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from facecal.errors import FacecalError
from facecal.manifest import Report

# What a folder is searched for (any file named on the command line is tried whatever its name).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".gif")
REGISTRY_PREFIX = "models:/"


class ClassifyError(FacecalError):
    """The model cannot be loaded, or no path was given."""


# --------------------------------------------------------------------------- models


class Recognizer(Protocol):
    """What classify needs of a model: its classes, crop size, and probabilities."""

    classes: list[str]
    image_size: int
    source: str

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) aligned crops → float (N, len(classes)), rows summing to 1."""
        ...


class TorchRecognizer:
    """A train_cnn model file (``.pt`` + ``.json``), loaded with ``weights_only=True``."""

    def __init__(self, path: Path, batch_size: int = 256):
        from facecal.recognition.cnn import load_classifier

        self.model, self.meta = load_classifier(path)
        self.classes: list[str] = list(self.meta["classes"])
        self.image_size = int(self.meta["image_size"])
        self.mirror = bool(self.meta.get("mirror", False))
        self.batch_size = batch_size
        self.source = str(path)

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        import torch

        from facecal.recognition.cnn import to_input

        out = []
        with torch.no_grad():
            for i in range(0, len(crops), self.batch_size):
                x = to_input(crops[i : i + self.batch_size])
                logits = self.model(x)
                if self.mirror:  # as cnn.predict: the mean of the face's and its mirror's
                    logits = (logits + self.model(x.flip(-1))) / 2
                out.append(torch.softmax(logits, 1).double().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))


class OnnxRecognizer:
    """The ONNX export (`export_classifier`), through the serving layer's runtime."""

    def __init__(self, spec: str, cache_dir: str | None = None):
        from facecal.serving.classifier_runtime import ClassifierRuntime

        self.runtime = ClassifierRuntime(spec, cache_dir=cache_dir)
        self.classes = list(self.runtime.classes)
        self.image_size = self.runtime.image_size
        self.source = self.runtime.describe()

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        return self.runtime.probabilities(crops).astype(np.float64)


def load_recognizer(spec: str, cache_dir: str | None = None) -> Recognizer:
    """``models:/…``, an .onnx file or a folder holding one → ONNX; a .pt (or its .json) →
    torch."""
    if spec.startswith(REGISTRY_PREFIX):
        return OnnxRecognizer(spec, cache_dir)
    path = Path(spec)
    if path.is_dir() or path.suffix.lower() == ".onnx":
        return OnnxRecognizer(spec, cache_dir)
    if path.suffix.lower() == ".json":
        path = path.with_suffix(".pt")
    return TorchRecognizer(path)


# --------------------------------------------------------------------------- inputs


def discover(paths: Iterable[str | Path], report: Report) -> list[Path]:
    """Image files: files as given, folders searched recursively (sorted, images by suffix);
    a missing path is reported."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                report.add(p, "folder holds no image (" + ", ".join(IMAGE_SUFFIXES) + ")")
            out += found
        elif p.exists():
            out.append(p)
        else:
            report.add(p, "no such file or folder")
    return out


# --------------------------------------------------------------------------- detection


@dataclass
class DetectOptions:
    """How faces are found: the landmarks stage's knobs (`landmarks.LandmarksParams`)."""

    upsample: int = 1
    multiple_faces: str = "largest"
    # Face crops (FER2013-like): where dlib finds no face, fit the predictor on the crop's box.
    crop_padding: list[float] | None = None
    crop_refine: int = 2


_DETECTOR = None  # one per worker process


def _init_detector(upsample: int) -> None:
    global _DETECTOR
    from facecal.detector import LandmarkDetector

    if _DETECTOR is None or _DETECTOR.upsample != upsample:  # loading takes about a second
        _DETECTOR = LandmarkDetector(upsample=upsample)


def _detect(job: tuple[str, DetectOptions]):
    from facecal.face_points import process_image

    path, o = job
    # No ground truth here: a photo has only what dlib finds.
    return process_image(
        _DETECTOR, Path(path), None, o.multiple_faces, False, o.crop_padding, o.crop_refine
    )


# --------------------------------------------------------------------------- classifying


@dataclass
class Classified:
    image: str
    emotion: str
    probabilities: np.ndarray  # (C,) in the model's class order
    box: list[float] | None = None
    points_source: str | None = None
    faces: int = 0

    def as_dict(self, classes: Sequence[str]) -> dict[str, Any]:
        return {
            "image": self.image,
            "emotion": self.emotion,
            "confidence": round(float(self.probabilities.max()), 6),
            "probabilities": {c: round(float(p), 6) for c, p in zip(classes, self.probabilities)},
            "faces": self.faces,
            "box": None if self.box is None else [round(float(v), 2) for v in self.box],
            "points_source": self.points_source,
        }


def classify_files(
    recognizer: Recognizer,
    files: Sequence[Path],
    report: Report,
    options: DetectOptions | None = None,
    batch_size: int = 64,
    workers: int = 1,
    progress: bool = True,
) -> Iterator[Classified]:
    """Classified images in input order, `batch_size` at a time (detection over `workers`
    processes); every image without a usable face goes to `report` (and stderr) instead."""
    import pandas as pd

    from facecal import geometry
    from facecal.face_points import OK
    from facecal.faces import crop_faces

    options = options or DetectOptions()
    if batch_size < 1:
        raise ClassifyError(f"--batch-size must be ≥ 1, got {batch_size}")
    bar = tqdm(total=len(files), desc="classify", unit="img", file=sys.stderr, disable=not progress)

    def skip(image: str, reason: str) -> None:
        report.add(image, reason)
        tqdm.write(f"facecal classify: skipped {image}: {reason}", file=sys.stderr)

    def batches(detect) -> Iterator[Classified]:
        # One stream over every file: pool workers detect ahead while this process crops and
        # runs the model on the previous batch.
        stream = detect([(str(f), options) for f in files])
        for start in range(0, len(files), batch_size):
            chunk = [str(f) for f in files[start : start + batch_size]]
            found = list(itertools.islice(stream, len(chunk)))
            rows: list[dict[str, Any]] = []
            for image, res in zip(chunk, found):
                if res.status != OK:
                    skip(image, res.reason or res.status)
                    continue
                try:
                    geometry.crop_transform(geometry.check_points(res.points), 8)
                except geometry.GeometryError as e:
                    skip(image, f"the detected landmarks cannot be aligned ({e})")
                    continue
                rows.append(
                    {
                        "image": image,
                        "points": np.asarray(res.points, np.float64).reshape(-1).tolist(),
                        "box": res.box,
                        "source": res.points_source,
                        "faces": res.n_faces,
                    }
                )
            if rows:
                table = pd.DataFrame(rows)
                crop_report = Report()
                # The training crop itself (an absolute or relative path joins "." unchanged).
                crops, ok = crop_faces(Path("."), table, recognizer.image_size, crop_report)
                for p in crop_report.problems:
                    skip(p.item, p.reason)
                probs = recognizer.probabilities(crops[ok])
                for row, prob in zip(table[ok].itertuples(), probs):
                    yield Classified(
                        row.image,
                        recognizer.classes[int(np.argmax(prob))],
                        prob,
                        row.box,
                        row.source,
                        int(row.faces),
                    )
            bar.update(len(chunk))

    try:
        if workers <= 1 or len(files) < 2:
            _init_detector(options.upsample)
            yield from batches(lambda jobs: map(_detect, jobs))
        else:
            from facecal.parallel import worker_pool

            with worker_pool(min(workers, len(files)), _init_detector, (options.upsample,)) as pool:
                yield from batches(lambda jobs: pool.imap(_detect, jobs, chunksize=4))
    finally:
        bar.close()


# --------------------------------------------------------------------------- output


def write_line(out, item: Classified) -> None:
    print(f"{item.image}\t{item.emotion}\t{float(item.probabilities.max()):.3f}", file=out)


def csv_header(classes: Sequence[str]) -> list[str]:
    return ["image", "emotion", "confidence", *classes]


def csv_row(item: Classified) -> list[str]:
    return [
        item.image,
        item.emotion,
        f"{float(item.probabilities.max()):.6f}",
        *(f"{float(p):.6f}" for p in item.probabilities),
    ]


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="a train_cnn model (outputs/cnn/<regime>.pt, beside its .json), its ONNX export "
        "(outputs/export_cnn/classifier.onnx), or models:/facecal-classifier@champion",
    )
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument(
        "--csv",
        dest="format",
        action="store_const",
        const="csv",
        help="CSV on stdout: image,emotion,confidence,<one column per class>",
    )
    fmt.add_argument(
        "--json",
        dest="format",
        action="store_const",
        const="json",
        help="one JSON document on stdout (results, failures, classes, model)",
    )
    parser.set_defaults(format="text")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="images or folders (recursive)")
    parser.add_argument("--batch-size", type=int, default=64, help="faces per model run")
    parser.add_argument(
        "--workers", type=int, default=1, help="detection processes (0 = one per CPU core)"
    )
    parser.add_argument(
        "--upsample", type=int, default=1, help="dlib HOG upsampling passes (as landmarks)"
    )
    parser.add_argument(
        "--face-crops",
        action="store_true",
        help="images are tight face crops (FER2013-like): where dlib finds no face, fit the "
        "predictor on the crop's box as the landmarks stage does (landmarks.crop_padding)",
    )
    parser.add_argument(
        "--skip-multiple",
        action="store_true",
        help="skip images with several faces (default: classify the largest)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from facecal.face_points import DEFAULT_CROP_PADDING, n_workers

    recognizer = load_recognizer(args.model)
    report = Report()
    files = discover(args.paths, report)
    for p in report.problems:
        print(f"facecal classify: skipped {p.item}: {p.reason}", file=sys.stderr)
    options = DetectOptions(
        upsample=args.upsample,
        multiple_faces="skip" if args.skip_multiple else "largest",
        crop_padding=list(DEFAULT_CROP_PADDING) if args.face_crops else None,
    )
    workers = n_workers(args.workers, max(1, len(files)))
    stream = classify_files(
        recognizer, files, report, options, args.batch_size, workers, progress=not args.quiet
    )
    out = sys.stdout
    n = 0
    if args.format == "json":
        results = [r.as_dict(recognizer.classes) for r in stream]
        n = len(results)
        doc = {
            "model": recognizer.source,
            "classes": recognizer.classes,
            "image_size": recognizer.image_size,
            "results": results,
            "failures": [{"image": p.item, "reason": p.reason} for p in report.problems],
        }
        json.dump(doc, out, indent=2)
        out.write("\n")
    elif args.format == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(csv_header(recognizer.classes))
        for r in stream:
            w.writerow(csv_row(r))
            n += 1
    else:
        for r in stream:
            write_line(out, r)
            n += 1
    out.flush()
    print(
        f"facecal classify: {n} image(s) classified, {len(report)} skipped "
        f"(model {recognizer.source})",
        file=sys.stderr,
    )
    # Skipped images are not an error (the others have their result); nothing classified is.
    return 0 if n else 1
