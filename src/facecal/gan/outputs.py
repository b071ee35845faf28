"""What a training run shows while it runs: sample grids, validation scores, the loss table and
its MLflow metrics."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from facecal import tracking
from facecal.gan.data import PairSource
from facecal.gan.runtime import Runtime, to_model
from facecal.gan.steps import Trainer


def sample_grid(batch: torch.Tensor, fake: torch.Tensor, in_channels: int) -> np.ndarray:
    """Rows of landmarks | [reference] | generated | real, uint8 HWC."""

    def img(t):
        return ((t.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()

    rows = []
    for b, f in zip(batch, fake):
        cols = (
            [img(b[:3])]
            + ([img(b[3:6])] if in_channels == 6 else [])
            + [img(f), img(b[in_channels:])]
        )
        rows.append(cols)
    size, gap = batch.shape[-1], 2
    n, m = len(rows), len(rows[0])
    canvas = np.full((n * size + (n - 1) * gap, m * size + (m - 1) * gap, 3), 255, np.uint8)
    for r, cols in enumerate(rows):
        for c, tile in enumerate(cols):
            canvas[
                r * (size + gap) : r * (size + gap) + size,
                c * (size + gap) : c * (size + gap) + size,
            ] = tile
    return canvas


def write_losses_csv(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(history[0])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(cols)
        for row in history:
            w.writerow([int(row[c]) if c in ("step", "epoch") else f"{row[c]:.6g}" for c in cols])
    tmp.replace(path)


class MetricBuffer:
    """Per-step losses sent to MLflow in batches (one request per `every` steps, not per step)."""

    def __init__(self, run: tracking.StageRun, every: int):
        self.run, self.every = run, every
        self.pending: list[tuple[int, dict[str, float]]] = []

    def add(self, step: int, values: dict[str, float]) -> None:
        if not self.run.active:
            return
        self.pending.append((step, values))
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending or not self.run.active:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, step)
            for step, vals in self.pending
            for k, v in vals.items()
            if math.isfinite(float(v))
        ]
        client = MlflowClient()
        run_id = str(self.run.run_id)  # active: set
        for i in range(0, len(metrics), 1000):  # MLflow's per-request limit
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        self.pending = []


def fit_paint_gain(
    trainer: Trainer, val: PairSource, rt: Runtime, gains: list[float]
) -> tuple[float, dict[float, float]]:
    """warp_refine: the strength of the net's paint (`WarpRefineGenerator.paint_gain`) with
    the best mean SSIM of eval-mode faces on the val pairs, and the SSIM of every candidate
    (ties: the weaker paint). Leaves the generator at the chosen strength."""
    from facecal import metrics as qm
    from facecal.gan.models import WarpRefineGenerator

    G = trainer.module("G")
    if not isinstance(G, WarpRefineGenerator):
        raise TypeError("only a warp_refine generator paints through a mask")
    G.eval()
    G.paint_gain = 1.0
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for i in range(0, len(val), 256):
            idx = list(range(i, min(len(val), i + 256)))
            batch = to_model(val.take(idx), rt).float()
            points = val.points_of(idx)
            assert points is not None
            points = points.to(rt.device)
            warped, painted, mask = G.parts(batch[:, :6], points[:, 0], points[:, 1])
            parts.append((warped, painted, mask, batch[:, 6:]))
    G.train()
    scores: dict[float, float] = {}
    for g in sorted(set(float(x) for x in gains)):
        values = []
        for warped, painted, mask, real in parts:
            face = G.compose(warped, painted, G.weaken(mask, g))
            values.append(qm.ssim(((face + 1) / 2).cpu().double(), ((real + 1) / 2).cpu().double()))
        scores[g] = float(torch.cat(values).mean())
    best = max(scores, key=lambda g: (scores[g], -g))
    G.paint_gain = best
    return best, scores


def validate(trainer: Trainer, val: PairSource, in_channels: int, rt: Runtime) -> dict[str, float]:
    """SSIM and L1 of eval-mode generated faces against the real ones, in [0, 1]; plus the
    same for the reference face taken as the answer (what copying the input would score) and,
    for warp_refine, for the pure warp of the reference (what its net must add to)."""
    from facecal import metrics as qm
    from facecal.gan.models import WarpRefineGenerator
    from facecal.warp import warp

    out: dict[str, list[torch.Tensor]] = {"val_ssim": [], "val_l1": []}
    G = trainer.module("G")
    for i in range(0, len(val), 256):
        idx = list(range(i, min(len(val), i + 256)))
        batch = to_model(val.take(idx), rt)
        points = val.points_of(idx)
        points = points.to(rt.device) if points is not None else None
        fake = ((trainer.generate(batch[:, :in_channels], points) + 1) / 2).cpu().double()
        real = ((batch[:, in_channels:].float() + 1) / 2).cpu().double()
        out["val_ssim"].append(qm.ssim(fake, real))
        out["val_l1"].append(qm.l1(fake, real))
        if in_channels == 6:  # the baseline a generator must beat: returning its reference
            ref = ((batch[:, 3:6].float() + 1) / 2).cpu().double()
            out.setdefault("val_ssim_reference", []).append(qm.ssim(ref, real))
            if points is not None and isinstance(G, WarpRefineGenerator):
                with torch.no_grad():
                    tri = G.warp.triangles
                    warped = warp(batch[:, 3:6].float(), points[:, 0], points[:, 1], tri)
                warped = ((warped + 1) / 2).clamp(0, 1).cpu().double()
                out.setdefault("val_ssim_warp", []).append(qm.ssim(warped, real))
    return {k: float(torch.cat(v).mean()) for k, v in out.items()}
