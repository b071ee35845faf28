"""dlib's HOG face detector and 68-point shape predictor, loaded from the installed
face-recognition-models package (never downloaded).

Create one `LandmarkDetector` per process and reuse it: loading the predictor takes about a
second, detecting a face on a 128² image a few milliseconds.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facecal.errors import FacecalError

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"


class ModelNotFound(FacecalError):
    pass


def predictor_path() -> Path:
    """Path of dlib's 68-point model inside face-recognition-models.

    Found through the import system instead of importing the package, whose __init__ needs
    pkg_resources (gone from setuptools ≥ 81).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "the package face-recognition-models is not installed "
            "(pip install face-recognition-models)"
        )
    path = Path(spec.origin).parent / "models" / PREDICTOR_FILE
    if not path.is_file():
        raise ModelNotFound(f"{path}: dlib model file missing from face-recognition-models")
    return path


@dataclass
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    points: np.ndarray  # (68, 2) float64, x = column, y = row
    score: float  # detector confidence

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


class LandmarkDetector:
    """Finds faces and their 68 landmarks in uint8 images (grey H×W or RGB H×W×3)."""

    def __init__(self, upsample: int = 1):
        import dlib

        self.upsample = int(upsample)
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(predictor_path()))
        self._dlib = dlib

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces, largest first."""
        img = np.ascontiguousarray(image, dtype=np.uint8)
        boxes, scores, _ = self._detector.run(img, self.upsample, 0.0)
        faces = [
            Face(
                (float(b.left()), float(b.top()), float(b.right()), float(b.bottom())),
                self._shape(img, b),
                float(s),
            )
            for b, s in zip(boxes, scores)
        ]
        faces.sort(key=lambda f: (-f.area, f.box))
        return faces

    def landmarks_in_box(
        self, image: np.ndarray, box: tuple[float, float, float, float]
    ) -> np.ndarray:
        """The 68 points for a given face box (e.g. a known crop), without detection."""
        img = np.ascontiguousarray(image, dtype=np.uint8)
        rect = self._dlib.rectangle(*(int(round(v)) for v in box))
        return self._shape(img, rect)

    def _shape(self, img: np.ndarray, rect) -> np.ndarray:
        shape = self._predictor(img, rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
