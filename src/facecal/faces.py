"""Aligned face crops of landmark-table rows (the crop frame of `geometry.crop_transform`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from facecal import geometry, tables
from facecal.errors import FacecalError
from facecal.imageio import ImageError, load_image
from facecal.manifest import Report


def crop_faces(
    data_dir: Path, rows: pd.DataFrame, size: int, report: Report
) -> tuple[np.ndarray, np.ndarray]:
    """Aligned uint8 crops (N, size, size, 3) of real faces and the mask of rows that loaded
    (an unreadable image is reported and skipped, never fatal)."""
    pts = tables.points_array(rows, "points") if len(rows) else np.zeros((0, 68, 2))
    out = np.zeros((len(rows), size, size, 3), np.uint8)
    ok = np.zeros(len(rows), bool)
    if len(rows):
        transforms = geometry.crop_transform(pts, size)
    for i, image in enumerate(rows["image"]):
        try:
            img = load_image(data_dir / image, "RGB")
        except ImageError as e:
            report.add(image, str(e.reason))
            continue
        out[i] = geometry.warp_image(img, transforms[i], size)
        ok[i] = True
    return out, ok


class FaceCrops:
    """Aligned crops of landmark-table rows, each decoded once; failures are remembered."""

    def __init__(self, data_dir: Path, table: pd.DataFrame, size: int):
        self.data_dir, self.table, self.size = Path(data_dir), table, size
        self.cache: dict[int, np.ndarray | FacecalError] = {}

    def transform(self, iid: int) -> np.ndarray:
        """Image → crop transform of a row (from its own landmarks)."""
        pts = np.asarray(self.table.loc[iid, "points"], np.float64).reshape(68, 2)
        return geometry.crop_transform(
            geometry.check_points(pts, f"{self.table.loc[iid, 'image']}"), self.size
        )

    def crop_points(self, iid: int) -> np.ndarray:
        """A row's own landmarks in its crop's pixels (what a warp of its crop moves)."""
        pts = np.asarray(self.table.loc[iid, "points"], np.float64).reshape(68, 2)
        return geometry.apply_affine(self.transform(iid), pts)

    def get(self, iid: int) -> np.ndarray:
        if iid not in self.cache:
            try:
                img = load_image(self.data_dir / self.table.loc[iid, "image"], "RGB")
                self.cache[iid] = geometry.warp_image(img, self.transform(iid), self.size)
            except FacecalError as e:
                self.cache[iid] = e
        got = self.cache[iid]
        if isinstance(got, FacecalError):
            raise got
        return got

    def reference(self, candidates: list[int]) -> int | None:
        """The first candidate that loads (the pairs stage's rule)."""
        for cand in candidates:
            try:
                self.get(cand)
                return cand
            except FacecalError:
                continue
        return None
