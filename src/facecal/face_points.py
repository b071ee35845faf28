"""The 68 landmarks of one image: dlib's detector, the face-crop fallback, ground truth.

What the landmarks stage runs per manifest row (`process_image`) and `facecal classify` runs per
photo, so both find the same points; the statuses and sources name the landmark table's
``status`` and ``points_source`` values (docs/architecture.md, "The landmark table").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facecal.geometry import nme as nme_of
from facecal.imageio import ImageError, load_image
from facecal.manifest import LandmarkFileError, read_landmarks_file

# Row statuses. Only `ok` rows carry points.
OK = "ok"


NO_FACE = "no_face"


MULTIPLE_FACES = "multiple_faces"  # several faces and `multiple_faces: skip`


UNREADABLE = "unreadable"  # image missing, corrupt, truncated, too large


BAD_LANDMARKS_FILE = "bad_landmarks_file"


ERROR = "error"  # dlib itself failed on a decodable image


STATUSES = (OK, NO_FACE, MULTIPLE_FACES, UNREADABLE, BAD_LANDMARKS_FILE, ERROR)


SOURCE_DLIB = "dlib"


SOURCE_TRUTH = "ground_truth"


SOURCE_CROP = "crop_box"  # the predictor fitted on the (padded) image frame of a face crop


# left, top, right, bottom: see LandmarksParams.crop_padding (measurement in bench/fer2013.py).
DEFAULT_CROP_PADDING = (-0.04, -0.06, -0.04, -0.02)


# Where dlib puts its box around the 68 points it finds, measured on the 2,386 FER2013
# PublicTest crops it detects (medians): side = BOX_SIDE × the points' extent (larger of width
# and height), centre = the points' bounding-box centre + BOX_OFFSET × that extent. The crop
# policy's refinement places its next box there.
BOX_SIDE = 1.059


BOX_OFFSET = (-0.014, -0.063)


def crop_box(
    width: int, height: int, padding: list[float] | tuple[float, ...]
) -> tuple[float, float, float, float]:
    """The face box of a face crop: its frame grown by `padding` (fractions of the size)."""
    left, top, right, bottom = padding
    return (-left * width, -top * height, (1 + right) * width - 1, (1 + bottom) * height - 1)


def box_around(points: np.ndarray) -> tuple[float, float, float, float]:
    """The box dlib's detector would draw around a face with these 68 points (`BOX_SIDE`,
    `BOX_OFFSET`)."""
    lo, hi = points.min(0), points.max(0)
    extent = float(max(hi - lo))
    cx, cy = (lo + hi) / 2 + np.asarray(BOX_OFFSET) * extent
    half = BOX_SIDE * extent / 2
    return (float(cx - half), float(cy - half), float(cx + half), float(cy + half))


def fit_crop(
    detector, image: np.ndarray, padding: list[float] | tuple[float, ...], refine: int
) -> tuple[tuple[float, float, float, float], np.ndarray]:
    """The crop-box policy: the predictor on `crop_box`, then `refine` refits each on
    `box_around` the last points. Returns the last box and its points."""
    height, width = image.shape[:2]
    box = crop_box(width, height, padding)
    points = detector.landmarks_in_box(image, box)
    for _ in range(refine):
        box = box_around(points)
        points = detector.landmarks_in_box(image, box)
    return box, points


@dataclass
class ImageResult:
    status: str
    reason: str = ""
    n_faces: int = 0
    box: list[float] | None = None
    points: np.ndarray | None = None  # (68, 2) used by the pipeline
    points_source: str | None = None
    gt_points: np.ndarray | None = None
    nme: float = math.nan
    crop_nme: float = math.nan  # crop-box points vs dlib's, where both exist
    width: int = 0
    height: int = 0


def process_image(
    detector,
    image_path: Path,
    landmarks_path: Path | None,
    multiple_faces: str = "largest",
    fallback: bool = True,
    crop_padding: list[float] | tuple[float, ...] | None = None,
    crop_refine: int = 2,
) -> ImageResult:
    """Landmarks of one manifest row. Never raises for bad input: the status says what failed.

    With `crop_padding` the image is a face crop: where dlib finds no face (and no ground truth
    stands in), the predictor is fitted on `crop_box`; where it does, the crop-box points are
    compared with dlib's (`crop_nme`)."""
    try:
        img = load_image(image_path, mode="L")  # the original detected on grey images
    except ImageError as e:
        return ImageResult(UNREADABLE, e.reason)
    height, width = img.shape[:2]
    gt = None
    if landmarks_path is not None:
        try:
            gt = read_landmarks_file(landmarks_path)
        except LandmarkFileError as e:
            return ImageResult(BAD_LANDMARKS_FILE, str(e), width=width, height=height)
    try:
        faces = detector.detect(img)
    except RuntimeError as e:  # dlib refuses some inputs (e.g. degenerate sizes)
        return ImageResult(ERROR, f"dlib failed: {e}", gt_points=gt, width=width, height=height)
    res = ImageResult(NO_FACE, n_faces=len(faces), gt_points=gt, width=width, height=height)
    if len(faces) > 1 and multiple_faces == "skip":
        res.status, res.reason = MULTIPLE_FACES, f"{len(faces)} faces found (policy: skip)"
        return res
    crop = None
    if crop_padding is not None and (not faces or len(faces) == 1):
        try:
            crop = fit_crop(detector, img, crop_padding, crop_refine)
        except RuntimeError as e:
            return ImageResult(ERROR, f"dlib failed: {e}", gt_points=gt, width=width, height=height)
    if faces:
        face = faces[0]  # largest first
        res.status, res.box, res.points, res.points_source = (
            OK,
            list(face.box),
            face.points,
            SOURCE_DLIB,
        )
        if gt is not None:
            res.nme = float(nme_of(face.points, gt))
        if crop is not None:
            res.crop_nme = float(nme_of(crop[1], face.points))
    elif gt is not None and fallback:
        res.status, res.points, res.points_source = OK, gt, SOURCE_TRUTH
        res.reason = "no face found by dlib; ground-truth landmarks used"
    elif crop is not None:
        res.status, res.box, res.points, res.points_source = OK, list(crop[0]), crop[1], SOURCE_CROP
        res.reason = "no face found by dlib; predictor fitted on the crop's box"
        if gt is not None:
            res.nme = float(nme_of(crop[1], gt))
    else:
        res.reason = f"dlib found no face (upsample {detector.upsample})"
    return res


def n_workers(requested: int, n_jobs: int) -> int:
    if requested == 0:
        try:
            requested = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            requested = os.cpu_count() or 1
    return max(1, min(requested, n_jobs))
