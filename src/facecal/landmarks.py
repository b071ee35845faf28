"""Stage `landmarks`: dlib's 68 points for every face of the dataset, and the subject split.

``facecal landmarks`` reads ``data/manifest.csv`` and writes (docs/architecture.md, "The
landmark table"):

* ``outputs/landmarks/landmarks.parquet`` — one row per manifest row, in manifest order;
* ``outputs/landmarks/failures.csv`` — every row that did not get points, and why;
* ``plots/landmarks/overlays.png`` — a grid of samples, dlib points green, ground truth red;
* ``metrics/landmarks.json`` — detection rate, count per status, NME against ground truth.

Face crops (datasets whose images are already tight face crops, such as FER2013's 48×48 web
crops, on which dlib's HOG detector misses about a third of the faces): where dlib finds no face,
the 68-point predictor is fitted on the crop's own box — the image frame moved by
``crop_padding``, set to mimic where dlib puts its box on the crops it does detect — and the
points are marked ``points_source = crop_box``. Where dlib does find the face on such a row, the
crop-box points are computed too and compared (``crop_nme``, inter-ocular NME against dlib's
points), so every run measures the fallback's quality on its own data.

Splits: a ``split`` the manifest prescribes (FER2013's official usages) is kept; rows without
one are split by subject (subject-disjoint, deterministic under ``base.seed``).

Images are decoded inside a process pool (one dlib model per worker process, loaded by the
pool initializer) and streamed through ``imap`` in manifest order, so memory stays flat however
large the dataset and the output does not depend on the number of workers.

``facecal landmarks -i IMAGE`` is the original ``facial_landmarks.py``: 68 lines ``x y``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from facecal import config, tracking
from facecal.errors import FacecalError
from facecal.face_points import (
    DEFAULT_CROP_PADDING,
    OK,
    SOURCE_CROP,
    SOURCE_DLIB,
    SOURCE_TRUTH,
    STATUSES,
    UNREADABLE,
    ImageResult,
    n_workers,
    process_image,
)
from facecal.geometry import N_POINTS
from facecal.imageio import ImageError, load_image, save_image
from facecal.jsonio import write_json
from facecal.manifest import Row, read_manifest
from facecal.parallel import worker_pool
from facecal.paths import DATA_DIR, METRICS_DIR, OUTPUTS_DIR, PLOTS_DIR, project_root
from facecal.plotting import BLUE, GREEN, RED, draw_points, evenly, grid
from facecal.tables import points_column, read_table, write_table

SECTION = "landmarks"
TABLE = "landmarks.parquet"
FAILURES = "failures.csv"
OVERLAYS = "overlays.png"
METRICS = "landmarks.json"
SPLITS = ("train", "val", "test")


# Manifest sources whose images are face crops (crop_fallback: auto applies to these).
CROP_SOURCES = ("fer2013",)
CROP_POLICIES = ("auto", "always", "never")

COLUMNS = (
    "image",
    "subject",
    "emotion",
    "intensity",
    "source",
    "split",
    "status",
    "n_faces",
    "box",
    "points",
    "points_source",
    "gt_points",
    "nme",
    "crop_nme",
    "width",
    "height",
)


class NoFaceError(FacecalError):
    """dlib found no face in an image given on the command line."""


@dataclass
class LandmarksParams:
    """The `landmarks` section of params.yaml (defaults equal the file's)."""

    workers: int = 0  # processes; 0 = one per CPU core
    chunksize: int = 8  # images handed to a worker at a time
    upsample: int = 1  # dlib HOG upsampling passes (the original used 1)
    multiple_faces: Literal["largest", "skip"] = "largest"
    ground_truth_fallback: bool = True
    # Where dlib finds no face in a face crop: predictor on the crop's box (auto: rows whose
    # source is in CROP_SOURCES; always: every row; never).
    crop_fallback: Literal["auto", "always", "never"] = "auto"
    # That box: the image frame grown by these fractions of its width/height (left, top,
    # right, bottom; negative = inset). Measured on FER2013 PublicTest to mimic dlib's own box.
    crop_padding: list[float] = dataclasses.field(
        default_factory=lambda: list(DEFAULT_CROP_PADDING)
    )
    # Refits after the first: each on the box dlib would have drawn around the last points
    # (adapts to how tightly a dataset frames its faces).
    crop_refine: int = 2
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    # Splits the manifest prescribes, renamed (FER2013 without PrivateTest: {val: test} scores
    # PublicTest as the test split), then this share of the prescribed-train subjects moved to
    # val (seeded), so early stopping never looks at the test faces.
    split_rename: dict[str, str] = dataclasses.field(default_factory=dict)
    val_from_train: float = 0.0
    overlays: int = 12

    def __post_init__(self):
        if self.workers < 0:
            raise ValueError(f"workers must be ≥ 0 (0 = all cores), got {self.workers}")
        if self.chunksize < 1:
            raise ValueError(f"chunksize must be ≥ 1, got {self.chunksize}")
        if self.upsample < 0:
            raise ValueError(f"upsample must be ≥ 0, got {self.upsample}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave subjects for train")
        for old, new in self.split_rename.items():
            if old not in SPLITS or new not in SPLITS:
                raise ValueError(f"split_rename {old}: {new}: splits are {', '.join(SPLITS)}")
        if not 0.0 <= self.val_from_train < 1.0:
            raise ValueError(f"val_from_train must be in [0, 1), got {self.val_from_train}")
        if self.overlays < 0:
            raise ValueError(f"overlays must be ≥ 0, got {self.overlays}")
        if self.crop_refine < 0:
            raise ValueError(f"crop_refine must be ≥ 0, got {self.crop_refine}")
        if len(self.crop_padding) != 4:
            raise ValueError(f"crop_padding: expected 4 numbers, got {self.crop_padding}")
        left, top, right, bottom = self.crop_padding
        if not (1 + left + right > 0.2 and 1 + top + bottom > 0.2):
            raise ValueError(f"crop_padding {self.crop_padding} leaves no box")

    def crop_applies(self, source: str) -> bool:
        return self.crop_fallback == "always" or (
            self.crop_fallback == "auto" and source in CROP_SOURCES
        )


def base_seed(params_path: str | Path | None = None) -> int:
    """`base.seed` of the params file."""
    base = config.read_params(params_path).get("base") or {}
    seed = base.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise config.ParamsError(f"base.seed: expected an integer, got {seed!r}")
    return seed


# --------------------------------------------------------------------------- split


def assign_splits(
    subjects: Iterable[str], seed: int, val_fraction: float, test_fraction: float
) -> dict[str, str]:
    """Subject → ``train``/``val``/``test``: the sorted subjects shuffled under `seed`.

    Depends only on the set of subjects (not on row order or detection results). With three
    or more subjects every split gets at least one whenever its fraction is non-zero.
    """
    unique = sorted(set(subjects))
    n = len(unique)
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    n_val = int(round(val_fraction * n))
    if n >= 3:
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
    # Train keeps at least one subject; shrink the larger held-out split first.
    while n_test + n_val > max(n - 1, 0):
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    out = {}
    for rank, i in enumerate(order):
        out[unique[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def row_splits(
    rows: list[Row],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    rename: dict[str, str] | None = None,
    val_from_train: float = 0.0,
) -> list[str]:
    """The split of each row: the manifest's own where it has one (after `rename`, then a
    seeded `val_from_train` share of its train subjects moved to val); the other rows by
    subject (`assign_splits` over their subjects; a subject with exactly one prescribed split
    keeps it, so subjects stay disjoint where the manifest allows)."""
    rename = rename or {}
    given = [rename.get(r.split, r.split) if r.split else "" for r in rows]
    prescribed: dict[str, set[str]] = {}
    for r, g in zip(rows, given):
        if g:
            prescribed.setdefault(r.subject, set()).add(g)
    if val_from_train > 0:
        only_train = sorted(s for s, sp in prescribed.items() if sp == {"train"})
        moved = assign_splits(only_train, seed + 1, val_from_train, 0.0)
        to_val = {s for s, sp in moved.items() if sp == "val"}
        given = ["val" if g == "train" and r.subject in to_val else g for r, g in zip(rows, given)]
        for s in to_val:
            prescribed[s] = {"val"}
    free = {
        r.subject for r, g in zip(rows, given) if not g and len(prescribed.get(r.subject, ())) != 1
    }
    by_subject = assign_splits(free, seed, val_fraction, test_fraction)
    out = []
    for r, g in zip(rows, given):
        if g:
            out.append(g)
        elif r.subject in by_subject:
            out.append(by_subject[r.subject])
        else:
            out.append(next(iter(prescribed[r.subject])))
    return out


# --------------------------------------------------------------------------- per image


_DETECTOR = None  # one per worker process, built by `_init_worker`


def _init_worker(upsample: int) -> None:
    global _DETECTOR
    from facecal.detector import LandmarkDetector

    _DETECTOR = LandmarkDetector(upsample=upsample)


_Job = tuple[str, str | None, str, bool, list[float] | None, int]


def _work(job: _Job) -> ImageResult:
    image, landmarks, policy, fallback, padding, refine = job
    return process_image(
        _DETECTOR,
        Path(image),
        Path(landmarks) if landmarks else None,
        policy,
        fallback,
        padding,
        refine,
    )


CHECKPOINT_ROWS = 2048  # results per checkpoint file of an interrupted run
CHECKPOINTS = "landmarks_checkpoints"  # beside the output folder: per-machine scratch, no out


def detect_rows(
    rows: list[Row],
    data_dir: Path,
    params: LandmarksParams,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
) -> list[ImageResult]:
    """One `ImageResult` per row, in row order, over a pool of `params.workers` processes.

    With `checkpoint_dir`, results are saved there every `CHECKPOINT_ROWS` rows, under a key
    of the jobs (paths, file sizes and times, params): a rerun after an interruption reads
    the finished chunks back and detects only the rest. The key's folder is removed once
    every row has its result."""
    data_dir = Path(data_dir)
    jobs: list[_Job] = [
        (
            str(data_dir / r.image),
            str(data_dir / r.landmarks) if r.landmarks else None,
            params.multiple_faces,
            params.ground_truth_fallback,
            list(params.crop_padding) if params.crop_applies(r.source) else None,
            params.crop_refine,
        )
        for r in rows
    ]
    if not jobs:
        return []
    results: list[ImageResult] = []
    folder = None
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir) / _jobs_key(jobs, params.upsample)
        while (folder / f"{len(results) // CHECKPOINT_ROWS:06d}.parquet").is_file():
            results += _read_chunk(folder / f"{len(results) // CHECKPOINT_ROWS:06d}.parquet")
        if results:
            print(f"landmarks: resuming after {len(results)} rows ({folder})", file=sys.stderr)
    todo = jobs[len(results) :]
    workers = n_workers(params.workers, len(todo))
    bar = tqdm(
        total=len(jobs),
        initial=len(results),
        desc="landmarks",
        unit="img",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )

    def collect(stream: Iterable[ImageResult]) -> None:
        for res in stream:
            results.append(res)
            bar.update()
            if folder is not None and len(results) % CHECKPOINT_ROWS == 0:
                _write_chunk(
                    folder / f"{len(results) // CHECKPOINT_ROWS - 1:06d}.parquet",
                    results[-CHECKPOINT_ROWS:],
                )

    with bar:
        if not todo:
            pass
        elif workers == 1:
            # In-process: no pickling, no worker start-up; same code path as a pool worker.
            _init_worker(params.upsample)
            collect(_work(j) for j in todo)
        else:
            # Forked where the OS can (facecal.parallel): workers inherit the imported modules
            # and dlib is not loaded yet here, so nothing is shared that should not be.
            with worker_pool(
                workers, initializer=_init_worker, initargs=(params.upsample,)
            ) as pool:
                collect(pool.imap(_work, todo, chunksize=params.chunksize))
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return results


def _jobs_key(jobs: list[_Job], upsample: int) -> str:
    h = hashlib.sha256(json.dumps([upsample, CHECKPOINT_ROWS]).encode())
    for job in jobs:
        stats = []
        for path in job[:2]:
            try:
                st = os.stat(path) if path else None
                stats.append([st.st_size, st.st_mtime_ns] if st else None)
            except OSError:
                stats.append(None)
        h.update(json.dumps([job, stats]).encode())
    return h.hexdigest()[:16]


_CHUNK_FIELDS = [f.name for f in dataclasses.fields(ImageResult)]


def _write_chunk(path: Path, results: list[ImageResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: dict[str, Any] = {name: [getattr(r, name) for r in results] for name in _CHUNK_FIELDS}
    cols["points"] = points_column(cols["points"])
    cols["gt_points"] = points_column(cols["gt_points"])
    write_table(pd.DataFrame(cols, columns=_CHUNK_FIELDS), path)


def _read_chunk(path: Path) -> list[ImageResult]:
    df = read_table(path)
    out = []
    for rec in df.to_dict("records"):
        rec["points"] = _pts(rec["points"])
        rec["gt_points"] = _pts(rec["gt_points"])
        rec["box"] = None if rec["box"] is None else [float(v) for v in rec["box"]]
        rec["n_faces"], rec["width"], rec["height"] = (
            int(rec["n_faces"]),
            int(rec["width"]),
            int(rec["height"]),
        )
        out.append(ImageResult(**rec))
    return out


# --------------------------------------------------------------------------- the stage


def build_table(
    rows: list[Row], results: list[ImageResult], splits: list[str] | dict[str, str]
) -> pd.DataFrame:
    """The landmark table; `splits`: one per row (`row_splits`) or subject → split."""
    if isinstance(splits, dict):
        splits = [splits[r.subject] for r in rows]
    return pd.DataFrame(
        {
            "image": [r.image for r in rows],
            "subject": [r.subject for r in rows],
            "emotion": [r.emotion for r in rows],
            "intensity": np.array(
                [math.nan if r.intensity is None else r.intensity for r in rows], dtype=np.float64
            ),
            "source": [r.source for r in rows],
            "split": list(splits),
            "status": [x.status for x in results],
            "n_faces": np.array([x.n_faces for x in results], dtype=np.int64),
            "box": [x.box for x in results],
            "points": points_column([x.points if x.status == OK else None for x in results]),
            "points_source": [x.points_source if x.status == OK else None for x in results],
            "gt_points": points_column([x.gt_points for x in results]),
            "nme": np.array([x.nme for x in results], dtype=np.float64),
            "crop_nme": np.array([x.crop_nme for x in results], dtype=np.float64),
            "width": np.array([x.width for x in results], dtype=np.int64),
            "height": np.array([x.height for x in results], dtype=np.int64),
        },
        columns=list(COLUMNS),
    )


def _stats(values: np.ndarray) -> dict[str, Any]:
    v = values[np.isfinite(values)]
    return {
        "n": int(v.size),
        "mean": float(v.mean()) if v.size else None,
        "median": float(np.median(v)) if v.size else None,
        "p90": float(np.percentile(v, 90)) if v.size else None,
    }


def compute_metrics(
    df: pd.DataFrame, n_manifest_problems: int, n_split_prescribed: int = 0
) -> dict[str, Any]:
    status = df["status"]
    readable = int((~status.isin([UNREADABLE])).sum())
    n_dlib = int((df["points_source"] == SOURCE_DLIB).sum())
    nme = df["nme"].to_numpy()
    sources = df["points_source"].to_numpy()
    nme_by_source = {
        src: _stats(nme[sources == src])
        for src in (SOURCE_DLIB, SOURCE_CROP)
        if (sources == src).any()
    }
    nme = nme[np.isfinite(nme)]
    split_stats = {}
    for s in SPLITS:
        part = df[df["split"] == s]
        split_stats[s] = {
            "subjects": int(part["subject"].nunique()),
            "images": int(len(part)),
            "ok": int((part["status"] == OK).sum()),
        }
    return {
        "n_rows": int(len(df)),
        "n_manifest_problems": int(n_manifest_problems),
        "n_ok": int((status == OK).sum()),
        "n_dlib": n_dlib,
        "n_fallback": int((df["points_source"] == SOURCE_TRUTH).sum()),
        "n_crop_fallback": int((df["points_source"] == SOURCE_CROP).sum()),
        # Rows with points ÷ rows: what the pipeline keeps.
        "coverage": int((status == OK).sum()) / len(df) if len(df) else 0.0,
        # Share of decodable images in which dlib found a usable face (fallbacks excluded).
        "detection_rate": n_dlib / readable if readable else 0.0,
        "n_several_faces": int((df["n_faces"] > 1).sum()),
        "status": {s: int((status == s).sum()) for s in STATUSES},
        "n_nme": int(nme.size),
        "nme_mean": float(nme.mean()) if nme.size else None,
        "nme_median": float(np.median(nme)) if nme.size else None,
        # Ground truth vs the points used, per points_source.
        "nme_by_source": nme_by_source,
        # The crop-box fallback against dlib's points on the crops dlib did detect.
        "crop_vs_dlib_nme": _stats(df["crop_nme"].to_numpy()),
        "split": split_stats,
        "n_split_from_manifest": int(n_split_prescribed),
    }


def run_landmarks(
    params: LandmarksParams,
    data_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    plots_dir: str | Path,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the stage; returns the metrics (also written to `metrics_path`). An interrupted run
    resumes from `checkpoint_dir` (default: `landmarks_checkpoints/` beside `out_dir`)."""
    data_dir, out_dir, plots_dir = Path(data_dir), Path(out_dir), Path(plots_dir)
    with tracking.stage_run(SECTION, params) as run:
        # Missing files are not rejected here: they become `unreadable` / `bad_landmarks_file`
        # rows, so the table keeps one row per manifest row that names a usable image path.
        rows, report = read_manifest(data_dir, check_files=False)
        n_manifest_problems = len(report)
        splits = row_splits(
            rows,
            seed,
            params.val_fraction,
            params.test_fraction,
            params.split_rename,
            params.val_from_train,
        )
        results = detect_rows(
            rows,
            data_dir,
            params,
            progress=progress,
            checkpoint_dir=Path(checkpoint_dir or out_dir.parent / CHECKPOINTS),
        )
        df = build_table(rows, results, splits)
        for row, res in zip(rows, results):
            if res.status != OK:
                report.add(data_dir / row.image, f"{res.status}: {res.reason}")
        out_dir.mkdir(parents=True, exist_ok=True)
        write_table(df, out_dir / TABLE)
        report.write_csv(out_dir / FAILURES)

        metrics = compute_metrics(df, n_manifest_problems, sum(1 for r in rows if r.split))
        write_json(metrics_path, metrics)
        plots_dir.mkdir(parents=True, exist_ok=True)
        overlay = plots_dir / OVERLAYS
        if params.overlays and len(df):
            save_image(overlay_grid(df, data_dir, params.overlays), overlay)
        else:
            overlay.unlink(missing_ok=True)

        run.log_metrics(metrics)
        run.log_artifact(metrics_path)
        run.log_artifact(out_dir / FAILURES)
        run.log_artifact(overlay)
    if report:
        print(
            f"landmarks: {len(report)} row(s) without points (see {out_dir / FAILURES}):",
            file=sys.stderr,
        )
        report.print()
    nme_text = f", NME {metrics['nme_mean']:.4f} (n={metrics['n_nme']})" if metrics["n_nme"] else ""
    print(
        f"landmarks: {metrics['n_ok']}/{metrics['n_rows']} rows ok, detection rate "
        f"{metrics['detection_rate']:.3f}, {metrics['n_fallback']} ground-truth fallbacks, "
        f"{metrics['n_crop_fallback']} crop-box fallbacks"
        f"{nme_text}",
        file=sys.stderr,
    )
    return metrics


# --------------------------------------------------------------------------- pictures


def overlay_grid(df: pd.DataFrame, data_dir: Path, n: int) -> np.ndarray:
    """Samples with dlib points (green), crop-box points (blue), ground truth (red) and the
    face box (yellow); a few failures (readable images without points) are shown too, so
    misses can be seen."""
    status = df["status"].to_numpy()
    failed = np.flatnonzero((status != OK) & (status != UNREADABLE))
    n_failed = min(len(failed), n // 4)
    chosen = evenly(np.flatnonzero(status == OK), n - n_failed) + evenly(failed, n_failed)
    tiles = []
    for i in chosen:
        row = df.iloc[i]
        try:
            img = load_image(data_dir / row["image"], mode="RGB")
        except ImageError:
            continue
        source = row["points_source"]
        pts = _pts(row["points"]) if source in (SOURCE_DLIB, SOURCE_CROP) else None
        gt = _pts(row["gt_points"])
        caption = f"{Path(row['image']).name} {row['status']}"
        if math.isfinite(row["nme"]):
            caption += f" nme {row['nme']:.3f}"
        colour = BLUE if source == SOURCE_CROP else GREEN
        tiles.append(draw_points(img, [(gt, RED), (pts, colour)], box=row["box"], caption=caption))
    return grid(tiles)


def _pts(value) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=np.float64).reshape(N_POINTS, 2)


# --------------------------------------------------------------------------- face crops


def face_crop(
    image: np.ndarray, points: np.ndarray, size: int = 48, margin: float = 0.05, lift: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """A tight square grey crop of a face with known points, framed like FER2013's (the jaw
    line near the sides, forehead above the brows), resized to size×size; returns the crop and
    its points in crop pixels. `margin`: extra side length (fraction); `lift`: centre moved up
    by this fraction of the side. Used to measure the crop-box policy against ground truth."""
    pts = np.asarray(points, dtype=np.float64)
    lo, hi = pts.min(0), pts.max(0)
    side = float(max(hi - lo)) * (1 + margin)
    cx, cy = (lo + hi) / 2
    cy -= lift * side
    x0, y0 = cx - side / 2, cy - side / 2
    grey = Image.fromarray(np.ascontiguousarray(image)).convert("L")
    crop = grey.transform(
        (size, size),
        Image.Transform.EXTENT,
        (x0, y0, x0 + side, y0 + side),
        Image.Resampling.BILINEAR,
    )
    k = size / side
    # Pixel centres: image pixel x covers [x, x + 1), so its centre x + 0.5 maps to crop c + 0.5.
    crop_pts = (pts + 0.5 - np.array([x0, y0])) * k - 0.5
    return np.asarray(crop), crop_pts


# --------------------------------------------------------------------------- one image


@functools.lru_cache(maxsize=2)
def _cached_detector(upsample: int):
    """One detector per process for repeated single-image calls (loading takes ~1 s)."""
    from facecal.detector import LandmarkDetector

    return LandmarkDetector(upsample=upsample)


def landmarks_of_image(
    path: str | Path, upsample: int = 1, resize_width: int | None = None
) -> np.ndarray:
    """The largest face's 68 points in one image (optionally resized first to `resize_width`,
    as the original script did with 400, points then in the resized frame)."""
    img = load_image(path, mode="L")
    if resize_width:
        h, w = img.shape
        size = (int(resize_width), max(1, round(h * resize_width / w)))
        img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC))
    faces = _cached_detector(upsample).detect(img)
    if not faces:
        raise NoFaceError(f"{path}: no face found (dlib HOG detector, upsample {upsample})")
    return faces[0].points


def format_points(points: np.ndarray, fmt: str = "text") -> str:
    if fmt == "json":
        return json.dumps([[_num(x), _num(y)] for x, y in points])
    return "".join(f"{_num(x)} {_num(y)}\n" for x, y in points).rstrip("\n")


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument(
        "-i",
        "--image",
        default=None,
        metavar="IMAGE",
        help="print the 68 points of the largest face in IMAGE and exit "
        "(the original facial_landmarks.py) instead of running the stage",
    )
    parser.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="with -i: 68 lines 'x y' (text) or one JSON array",
    )
    parser.add_argument(
        "--upsample",
        type=int,
        default=1,
        help="with -i: dlib HOG upsampling passes (default 1, as the original)",
    )
    parser.add_argument(
        "--resize-width",
        type=int,
        default=None,
        metavar="W",
        help="with -i: resize to this width first (the original used 400)",
    )
    parser.add_argument(
        "--data", type=Path, default=None, help=f"dataset folder (default {DATA_DIR})"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"output folder (default {OUTPUTS_DIR / SECTION})"
    )
    parser.add_argument(
        "--metrics", type=Path, default=None, help=f"metrics file (default {METRICS_DIR / METRICS})"
    )
    parser.add_argument(
        "--plots", type=Path, default=None, help=f"plots folder (default {PLOTS_DIR / SECTION})"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    config.add_params_arguments(parser)


def main(args) -> int:
    if args.image:
        points = landmarks_of_image(args.image, args.upsample, args.resize_width)
        print(format_points(points, args.format))
        return 0
    params = config.params_from_args(args, LandmarksParams, SECTION)
    root = project_root()
    run_landmarks(
        params,
        data_dir=args.data or root / DATA_DIR,
        out_dir=args.out or root / OUTPUTS_DIR / SECTION,
        metrics_path=args.metrics or root / METRICS_DIR / METRICS,
        plots_dir=args.plots or root / PLOTS_DIR / SECTION,
        seed=base_seed(getattr(args, "params", None)),
        progress=not args.no_progress,
    )
    return 0
