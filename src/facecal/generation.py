"""The trained generator at inference: faces drawn from landmarks (and identity references) for
table rows — what the generate stage writes and the evaluation measures."""

from __future__ import annotations

import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from facecal import geometry, render, tables
from facecal.errors import FacecalError
from facecal.faces import FaceCrops
from facecal.manifest import Report
from facecal.references import choose_references

SPLITS = ("train", "val", "test")


class GenerateError(FacecalError):
    """Inputs generation cannot use (missing tables, generator, or no faces at all)."""


class FaceGenerator:
    """The trained generator behind one call: landmarks in crop pixels (+ reference crops) →
    uint8 faces. Batched, `torch.no_grad`, eval mode."""

    def __init__(self, gan_dir: str | Path, batch_size: int = 64):
        from facecal.gan.models import load_generator, model_hash, takes_points

        self.model, self.config = load_generator(gan_dir)
        # warp_refine warps the reference: it also needs the reference's own points.
        self.points = takes_points(self.config["arch"])
        self.hash = model_hash(self.model, self.config)  # what metrics of these faces belong to
        self.size = int(self.config["image_size"])
        self.style = self.config["style"]
        self.identity = bool(self.config["identity"])
        self.batch_size = batch_size

    def render(self, crop_points: np.ndarray) -> np.ndarray:
        """Landmark images (N, S, S, 3) uint8 in the generator's style."""
        return render.render_batch(np.asarray(crop_points), self.size, self.style)

    @torch.no_grad()
    def __call__(
        self,
        crop_points: np.ndarray,
        refs: np.ndarray | None = None,
        progress: str | None = None,
        ref_points: np.ndarray | None = None,
    ) -> np.ndarray:
        """(N, 68, 2) points in crop pixels and (N, S, S, 3) uint8 references (+ their own
        points in crop pixels, for warp_refine) → (N, S, S, 3)."""
        n = len(crop_points)
        if self.identity and (refs is None or len(refs) != n):
            raise GenerateError("this generator needs a reference face per input (identity: true)")
        if self.points and (ref_points is None or len(ref_points) != n):
            raise GenerateError(
                f"this generator ({self.config['arch']}) needs each reference's landmarks"
            )
        out = np.zeros((n, self.size, self.size, 3), np.uint8)
        starts = range(0, n, self.batch_size)
        for i in tqdm(
            starts,
            desc=progress,
            disable=progress is None,
            file=sys.stderr,
            unit="batch",
            leave=False,
        ):
            j = slice(i, i + self.batch_size)
            x, src, dst = self._inputs(
                crop_points[j],
                None if refs is None else refs[j],
                None if ref_points is None else ref_points[j],
            )
            y = self.model(x, src, dst) if src is not None else self.model(x)
            out[j] = _to_uint8(y)
        return out

    def _inputs(
        self, crop_points: np.ndarray, refs: np.ndarray | None, ref_points: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One batch as the generator takes it: (landmark image ⊕ reference, reference points,
        target points); the points only for a warping generator."""
        lm = _to_signed(self.render(crop_points))
        x = torch.cat([lm, _to_signed(refs)], 1) if self.identity and refs is not None else lm
        if not (self.points and ref_points is not None):
            return x, None, None
        src = torch.as_tensor(np.asarray(ref_points), dtype=torch.float32)
        dst = torch.as_tensor(np.asarray(crop_points), dtype=torch.float32)
        return x, src, dst

    @torch.no_grad()
    def painted_and_mask(
        self, crop_points: np.ndarray, refs: np.ndarray, ref_points: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """warp_refine only: the painted face (N, S, S, 3 float in [0, 1]) and mask (N, S, S, 1
        in [0, 1]) the face is composed of — what a full-resolution composite needs."""
        if not self.points:
            raise GenerateError(f"{self.config['arch']} paints no separate face and mask")
        n = len(crop_points)
        painted = np.zeros((n, self.size, self.size, 3), np.float32)
        mask = np.zeros((n, self.size, self.size, 1), np.float32)
        for i in range(0, n, self.batch_size):
            j = slice(i, i + self.batch_size)
            x, src, dst = self._inputs(crop_points[j], refs[j], ref_points[j])
            refine: Any = self.model  # a WarpRefineGenerator (self.points)
            _, p, m = refine.parts(x, src, dst)
            painted[j] = ((p.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
            mask[j] = m.clamp(0, 1).permute(0, 2, 3, 1).numpy()
        return painted, mask


def _to_signed(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [−1, 1] (the generator's scale)."""
    return torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    return ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def usable_faces(table: pd.DataFrame) -> pd.DataFrame:
    """`status == ok` rows of a known split, keeping the table's row numbers as index."""
    tables.require_columns(
        table,
        ["image", "subject", "emotion", "intensity", "split", "status", "points"],
        "landmarks table",
    )
    return table[(table["status"] == "ok") & table["split"].isin(SPLITS)]


def own_emotion_rows(calibrated: pd.DataFrame) -> pd.DataFrame:
    """One row per face: its calibration toward its own emotion (what `weak` faces get)."""
    tables.require_columns(
        calibrated,
        ["image", "emotion", "target_emotion", "weak", "points", "calibrated"],
        "calibrated.parquet",
    )
    return calibrated[calibrated["target_emotion"] == calibrated["emotion"]].drop_duplicates(
        "image"
    )


def generate_rows(
    gen: FaceGenerator,
    crops: FaceCrops,
    iids: list[int],
    points: list[np.ndarray],
    refs_of: dict[int, list[int]],
    report: Report,
    where: list[str],
    progress: str | None = None,
) -> tuple[np.ndarray, list[int | None], np.ndarray]:
    """Generate faces for table rows `iids` from `points` (image pixels, drawn in each row's own
    crop frame). Returns (faces, reference row used, mask of rows that worked); rows without a
    usable transform or reference are reported and skipped."""
    n = len(iids)
    crop_pts = np.zeros((n, 68, 2))
    refs = np.zeros((n, gen.size, gen.size, 3), np.uint8)
    ref_pts = np.zeros((n, 68, 2))
    ref_rows: list[int | None] = [None] * n
    ok = np.zeros(n, bool)
    for k, (iid, pts) in enumerate(zip(iids, points)):
        try:
            m = crops.transform(iid)
            crop_pts[k] = geometry.apply_affine(m, geometry.check_points(pts, where[k]))
        except FacecalError as e:
            report.add(where[k], str(e))
            continue
        if gen.identity:
            ref = crops.reference(refs_of.get(iid, []))
            if ref is None:
                report.add(
                    where[k], "no usable reference image of the same subject (identity generator)"
                )
                continue
            refs[k], ref_rows[k] = crops.get(ref), ref
            ref_pts[k] = crops.crop_points(ref)
        ok[k] = True
    faces = np.zeros((n, gen.size, gen.size, 3), np.uint8)
    if ok.any():
        faces[ok] = gen(
            crop_pts[ok],
            refs[ok] if gen.identity else None,
            progress,
            ref_pts[ok] if gen.points else None,
        )
    return faces, ref_rows, ok


def reference_candidates(
    table: pd.DataFrame, weak_rows: Collection[int] = (), self_first: bool = False
) -> dict[int, list[int]]:
    """Reference candidates per usable row (`facecal.references`); the `weak_rows` may fall
    back to themselves (or take themselves first, for a generator that warps its reference)."""
    return choose_references(usable_faces(table), self_fallback=weak_rows, self_first=self_first)
