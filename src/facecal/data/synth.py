"""The embedded default dataset: synthetic faces with exact 68-point ground truth.

A fresh machine has no face data, so `facecal data synth --out DIR` renders one. Every face is
built from its landmarks: a parametric neutral face per subject (identity), FACS-like action
units displace the points per emotion (scaled by intensity, with a per-subject expression
style), a small similarity jitter poses the head, and then skin, eyes, brows, nose, lips and
wrinkles are painted *from the same points*, so the 68 points written beside each image are
its exact truth (iBUG order).

Three modules: `synth_face` (identities, action units, `express`, `head_pose`: the points),
`synth_render` (the rasteriser: `render` and its painters), and this one (the stage: which faces
with which keys, `render_face` / `face_points`, the dataset writer, dlib's score on it, the CLI).

Randomness: identity from ``SeedSequence(seed, spawn_key=(0, subject))``, each image from
``SeedSequence(seed, spawn_key=(1, subject, emotion, intensity))`` — the files do not depend on
the worker count or order, and adding subjects leaves the existing ones unchanged.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facecal import emotions, manifest
from facecal.data.synth_face import RECIPES, express, head_pose, identity
from facecal.data.synth_render import render
from facecal.errors import FacecalError
from facecal.geometry import nme as _nme
from facecal.imageio import load_image, save_image
from facecal.parallel import worker_pool

if TYPE_CHECKING:
    from facecal.detector import LandmarkDetector

SOURCE = "synthetic"


class SynthError(FacecalError):
    """Bad synthetic-dataset settings or output folder."""


@dataclass(frozen=True)
class SynthConfig:
    subjects: int = 40
    intensities: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    emotions: tuple[str, ...] = emotions.EXPRESSIVE
    size: int = 128  # RGB size×size
    seed: int = 0

    def __post_init__(self):
        if self.subjects < 1:
            raise SynthError(f"subjects: need at least 1, got {self.subjects}")
        if self.size < 48:
            raise SynthError(
                f"size: need at least 48 pixels for a detectable face, got {self.size}"
            )
        for i in self.intensities:
            if not 0.0 < float(i) <= 1.0:
                raise SynthError(f"intensities: {i} is outside (0, 1]")
        if len(set(self.intensities)) != len(self.intensities):
            raise SynthError(f"intensities: duplicates in {self.intensities}")
        if len({round(float(i) * 100) for i in self.intensities}) != len(self.intensities):
            raise SynthError(
                f"intensities: {self.intensities} must differ in percent "
                "(file names carry the intensity in percent)"
            )
        if len(set(self.emotions)) != len(self.emotions):
            raise SynthError(f"emotions: duplicates in {self.emotions}")
        for e in self.emotions:
            if e not in RECIPES:
                raise SynthError(f"emotions: {e!r} is not one of {list(RECIPES)}")


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    subject: int
    emotion: str
    intensity: float
    e_index: int
    i_index: int

    @property
    def name(self) -> str:
        return f"{subject_name(self.subject)}_{self.emotion}_{round(self.intensity * 100):03d}"


def subject_name(i: int) -> str:
    return f"s{i:03d}"


def _items(config: SynthConfig) -> list[_Item]:
    items = []
    for s in range(config.subjects):
        items.append(_Item(s, emotions.NEUTRAL, 0.0, 0, 0))
        for emo in config.emotions:
            for inten in config.intensities:
                # Keys are the emotion's vocabulary index and the intensity in percent, so an
                # image does not change when other emotions or intensities are added.
                items.append(
                    _Item(
                        s,
                        emo,
                        float(inten),
                        emotions.EMOTIONS.index(emo),
                        round(float(inten) * 1000),
                    )
                )
    return items


def render_face(
    config: SynthConfig, subject: int, emotion: str, intensity: float
) -> tuple[np.ndarray, np.ndarray]:
    """One face: uint8 (size, size, 3) pixels and its (68, 2) landmarks in pixels — exactly
    the files `render_dataset` writes for it (neutral ignores `intensity`)."""
    img, pts = _render_item(config, _item(subject, emotion, intensity))
    assert img is not None  # pixels=True renders them
    return img, pts


def face_points(config: SynthConfig, subject: int, emotion: str, intensity: float) -> np.ndarray:
    """The (68, 2) landmarks of `render_face` without painting the pixels (cheap)."""
    return _render_item(config, _item(subject, emotion, intensity), pixels=False)[1]


def _item(subject: int, emotion: str, intensity: float) -> _Item:
    emotion = emotions.normalize_emotion(emotion)
    if emotion == emotions.NEUTRAL:
        return _Item(subject, emotion, 0.0, 0, 0)
    return _Item(
        subject,
        emotion,
        float(intensity),
        emotions.EMOTIONS.index(emotion),
        round(float(intensity) * 1000),
    )


def _render_item(
    config: SynthConfig, item: _Item, pixels: bool = True
) -> tuple[np.ndarray | None, np.ndarray]:
    ident = identity(config.seed, item.subject)
    rng = np.random.default_rng(
        np.random.SeedSequence(config.seed, spawn_key=(1, item.subject, item.e_index, item.i_index))
    )
    expr = express(ident, item.emotion, item.intensity)
    pose = head_pose(rng, config.size)
    pts = expr.points @ pose[:, :2].T + pose[:, 2]
    img = render(ident, expr, pose, config.size, rng) if pixels else None
    return img, pts


def _work(args) -> manifest.Row:
    config, item, out_dir = args
    img, pts = _render_item(config, item)
    assert img is not None  # pixels=True renders them
    subj = subject_name(item.subject)
    image = f"images/{subj}/{item.name}.png"
    lmk = f"landmarks/{subj}/{item.name}.txt"
    save_image(img, Path(out_dir) / image)
    manifest.write_landmarks_file(Path(out_dir) / lmk, pts)
    return manifest.Row(image, subj, item.emotion, item.intensity, lmk, SOURCE)


def _workers(workers: int, jobs: int) -> int:
    return max(1, min(workers or os.cpu_count() or 1, jobs))


# Workers are forked where the OS can (facecal.parallel): a spawned worker re-imports the
# caller's main module, which loops forever for a plain script without a `__main__` guard.


_SCRATCH = ".synth-partial"


def render_dataset(
    out_dir: str | Path,
    config: SynthConfig = SynthConfig(),
    workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> list[manifest.Row]:
    """Render the dataset into `out_dir` (manifest.csv, images/, landmarks/). Returns its rows.

    A folder that already holds a dataset is refused unless `overwrite`, which replaces its
    manifest, images/ and landmarks/ (so the folder is exactly the rendered set). Faces are
    rendered into a hidden scratch folder and moved into place when all are done, so an
    interrupted run leaves no half dataset (and the next run starts clean).
    """
    from tqdm import tqdm

    out = Path(out_dir)
    existing = [out / n for n in (manifest.MANIFEST, "images", "landmarks") if (out / n).exists()]
    if existing and not overwrite:
        raise SynthError(
            f"{out}: already holds a dataset ({existing[0].name}); use --overwrite to replace it"
        )
    scratch = out / _SCRATCH
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    items = _items(config)
    jobs = [(config, it, str(scratch)) for it in items]
    n = _workers(workers, len(jobs))
    rows = []
    with tqdm(
        total=len(jobs), desc="synth", unit="img", disable=not progress, file=sys.stderr
    ) as bar:
        if n == 1:
            for job in jobs:
                rows.append(_work(job))
                bar.update()
        else:
            # Chunks of consecutive faces keep a worker on one subject (its identity is cached).
            with worker_pool(n) as pool:
                for row in pool.imap(_work, jobs, chunksize=8):
                    rows.append(row)
                    bar.update()
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in ("images", "landmarks"):
        os.replace(scratch / name, out / name)
    scratch.rmdir()
    manifest.write_manifest(out, rows)
    return rows


# ---------------------------------------------------------------------------------------------
# How well dlib sees the faces
# ---------------------------------------------------------------------------------------------

_DETECTOR: LandmarkDetector | None = None


def _detector_init(upsample: int) -> None:
    global _DETECTOR
    from facecal.detector import LandmarkDetector

    _DETECTOR = LandmarkDetector(upsample=upsample)


def _measure_one(args) -> tuple[str, str, bool, float]:
    image_path, landmarks_path, emotion = args
    truth = manifest.read_landmarks_file(landmarks_path)
    assert _DETECTOR is not None, "worker not initialised by _detector_init"
    faces = _DETECTOR.detect(load_image(image_path))
    cx, cy = truth.mean(0)
    # A detection counts only if its box holds the face (the truth's centroid).
    hits = [f for f in faces if f.box[0] <= cx <= f.box[2] and f.box[1] <= cy <= f.box[3]]
    if not hits:
        return image_path, emotion, False, float("nan")
    return image_path, emotion, True, float(_nme(hits[0].points, truth))


def measure_dlib(
    data_dir: str | Path, upsample: int = 1, workers: int = 0, progress: bool = False
) -> dict:
    """dlib's detection rate and landmark error (NME, inter-ocular) against the ground truth.

    Returns detection_rate, nme_mean, nme_median, nme_p95 (over detected faces), n,
    n_detected, and the same per emotion under "per_emotion".
    """
    from tqdm import tqdm

    data_dir = Path(data_dir)
    rows, report = manifest.read_manifest(data_dir)
    jobs = [
        (str(data_dir / r.image), str(data_dir / r.landmarks), r.emotion)
        for r in rows
        if r.landmarks
    ]
    if not jobs:
        raise SynthError(f"{data_dir}: no rows with ground-truth landmarks to measure")
    n = _workers(workers, len(jobs) // 32 + 1)  # loading dlib costs ~1 s per process
    results = []
    with tqdm(
        total=len(jobs), desc="dlib", unit="img", disable=not progress, file=sys.stderr
    ) as bar:
        if n == 1:
            _detector_init(upsample)
            for j in jobs:
                results.append(_measure_one(j))
                bar.update()
        else:
            with worker_pool(n, initializer=_detector_init, initargs=(upsample,)) as pool:
                for r in pool.imap(_measure_one, jobs, chunksize=16):
                    results.append(r)
                    bar.update()

    def summary(res) -> dict:
        errs = np.array([r[3] for r in res if r[2]])
        return {
            "n": len(res),
            "n_detected": int(len(errs)),
            "detection_rate": len(errs) / len(res) if res else float("nan"),
            "nme_mean": float(errs.mean()) if len(errs) else float("nan"),
            "nme_median": float(np.median(errs)) if len(errs) else float("nan"),
            "nme_p95": float(np.percentile(errs, 95)) if len(errs) else float("nan"),
        }

    out = summary(results)
    out["per_emotion"] = {
        e: summary([r for r in results if r[1] == e]) for e in sorted({r[1] for r in results})
    }
    out["missed"] = sorted(Path(r[0]).relative_to(data_dir).as_posix() for r in results if not r[2])
    out["skipped_rows"] = len(report)
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthConfig()
    parser.add_argument(
        "--out", type=Path, default=Path("data"), help="dataset folder to create (default: data)"
    )
    parser.add_argument(
        "--subjects",
        type=int,
        default=d.subjects,
        help=f"number of identities (default {d.subjects})",
    )
    parser.add_argument(
        "--size", type=int, default=d.size, help=f"image side in pixels (default {d.size})"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed (default 0)")
    parser.add_argument(
        "--workers", type=int, default=0, help="processes (default 0 = one per CPU core)"
    )
    parser.add_argument(
        "--no-measure",
        action="store_true",
        help="skip measuring dlib's detection rate and NME afterwards",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a dataset already in --out"
    )


def main(args: argparse.Namespace) -> int:
    config = SynthConfig(subjects=args.subjects, size=args.size, seed=args.seed)
    t0 = time.perf_counter()
    rows = render_dataset(args.out, config, workers=args.workers, overwrite=args.overwrite)
    dt = time.perf_counter() - t0
    print(
        f"rendered {len(rows)} faces of {config.subjects} subjects ({config.size}×{config.size}) "
        f"into {args.out} in {dt:.1f} s"
    )
    if not args.no_measure:
        m = measure_dlib(args.out, upsample=1, workers=args.workers, progress=True)
        print(
            f"dlib (HOG, upsample 1): detection rate {m['detection_rate']:.3f} "
            f"({m['n_detected']}/{m['n']}), NME mean {m['nme_mean']:.4f}, "
            f"median {m['nme_median']:.4f}, p95 {m['nme_p95']:.4f}"
        )
        for emo, s in m["per_emotion"].items():
            print(f"  {emo:9s} detected {s['detection_rate']:.3f}  NME {s['nme_mean']:.4f}")
    return 0
