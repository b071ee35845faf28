"""Stage `pairs`: aligned (landmark image, face) training pairs for the GAN.

Every face is cropped into the canonical frame of `facecal.geometry` (`crop_transform` +
`warp_image`, the same crop the generator sees at serving time), and its landmark image is
drawn by `facecal.render.render_landmarks` in that same frame. Files are named as the original
research loader expects — it pairs by the PID number only::

    outputs/pairs/<split>/PID<p>_CLEAN0_IID<k>.jpg   landmark image
    outputs/pairs/<split>/PID<p>_CLEAN1_IID<k>.jpg   face
    outputs/pairs/<split>/PID<p>_REF_IID<r>.jpg      identity reference (another image of the
                                                     same subject, never of the face's own
                                                     emotion — unless weaker, with
                                                     `weaker_references`: `facecal.references`),
                                                     with `references` on
    outputs/pairs/<split>/points.npz                 every pair's target and reference landmarks
                                                     in crop pixels (what warp_refine warps by)

``k`` is the face's row in the landmark table (manifest order), ``r`` the reference's row.

Pairing ``default``: a face's true landmarks → that face (the generator learns to draw the face
the landmarks describe; calibrated landmarks are fed only at generation time). Pairing
``upstream``: the landmarks calibrated toward each emotion → the original face, as the original
did (needed for its PSNR-argmax evaluation).
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from tqdm import tqdm

from facecal import config, geometry, render, tables, tracking
from facecal.errors import FacecalError
from facecal.imageio import load_image, save_image
from facecal.jsonio import write_json
from facecal.manifest import Report
from facecal.pair_files import PAIR_FILE, POINTS_FILE, pair_name
from facecal.references import choose_references

SECTION = "pairs"
LANDMARKS_TABLE = Path("outputs/landmarks/landmarks.parquet")
CALIBRATED_TABLE = Path("outputs/calibrate/calibrated.parquet")
DATA_DIR = Path("data")
OUT_DIR = Path("outputs/pairs")
PLOTS_DIR = Path("plots/pairs")
SPLITS = ("train", "val", "test")
INDEX = "index.csv"
INFO = "pairs.json"
FAILURES = "failures.csv"
INDEX_COLUMNS = (
    "pid",
    "split",
    "landmarks_file",
    "face_file",
    "ref_file",
    "image",
    "ref_image",
    "subject",
    "emotion",
    "intensity",
    "kind",
    "target_emotion",
)


class PairsError(FacecalError):
    """Inputs the pairs stage cannot use (missing columns, no usable faces)."""


@dataclass
class PairsParams:
    style: Literal["dots", "edges"] = "edges"
    pairing: Literal["default", "upstream"] = "default"
    alpha: float = 1.0
    references: bool = True
    # Reference of a pair: the subject's weaker faces of the target's own emotion first (then
    # the usual rule: `facecal.references`) — the weak → apex task warp_refine serves
    # (measured: README, "Generators compared").
    weaker_references: bool = True
    strip: int = 8


@dataclass
class BaseParams:
    """The `base` knobs this stage uses (the section has more; they are ignored here)."""

    seed: int = 0
    image_size: int = 64


def load_base(path: str | Path | None = None) -> BaseParams:
    raw = config.read_params(path).get("base") or {}
    return config.from_dict(
        BaseParams, {k: raw[k] for k in ("seed", "image_size") if k in raw}, where="base"
    )


# --------------------------------------------------------------------------- planning

LANDMARK_COLUMNS = ["image", "subject", "emotion", "intensity", "split", "status", "points"]
CALIBRATED_COLUMNS = ["image", "target_emotion", "points", "calibrated"]


def plan_pairs(
    landmarks: pd.DataFrame, calibrated: pd.DataFrame | None, params: PairsParams
) -> tuple[pd.DataFrame, Report]:
    """One row per pair to write (before images are read): pid, split, image row ``iid``, the
    landmark points in image pixels, kind, target emotion, reference candidates."""
    report = Report()
    tables.require_columns(landmarks, LANDMARK_COLUMNS, str(LANDMARKS_TABLE))
    ok = landmarks[landmarks["status"] == "ok"].copy()
    ok.index = landmarks.index[landmarks["status"] == "ok"]
    bad_split = ~ok["split"].isin(SPLITS)
    for image in ok.loc[bad_split, "image"]:
        report.add(
            image,
            f"split {ok.loc[ok['image'] == image, 'split'].iloc[0]!r} is not one of {list(SPLITS)}",
        )
    ok = ok[~bad_split]
    refs = choose_references(ok, weaker_first=params.weaker_references) if params.references else {}
    rows: list[dict[str, Any]] = []
    if params.pairing == "default":
        for iid, r in ok.iterrows():
            rows.append(
                {
                    "iid": int(iid),
                    "points": r["points"],
                    "kind": "true",
                    "target_emotion": r["emotion"],
                }
            )
    else:
        if calibrated is None:
            raise PairsError(f"pairing 'upstream' needs the calibrated table ({CALIBRATED_TABLE})")
        tables.require_columns(calibrated, CALIBRATED_COLUMNS, str(CALIBRATED_TABLE))
        iid_of = {img: int(i) for i, img in ok["image"].items()}
        for _, c in calibrated.iterrows():
            iid = iid_of.get(c["image"])
            if iid is None:
                report.add(
                    c["image"], "in the calibrated table but not an ok face of the landmark table"
                )
                continue
            orig = np.asarray(c["points"], dtype=np.float64)
            cal = (
                np.asarray(c["calibrated"], dtype=np.float64)
                if c["calibrated"] is not None
                else None
            )
            if cal is None or cal.shape != orig.shape:
                report.add(f"{c['image']} → {c['target_emotion']}", "no calibrated points")
                continue
            blended = (1.0 - params.alpha) * orig + params.alpha * cal
            rows.append(
                {
                    "iid": iid,
                    "points": blended,
                    "kind": "calibrated",
                    "target_emotion": c["target_emotion"],
                }
            )
    plan = pd.DataFrame(rows, columns=["iid", "points", "kind", "target_emotion"])
    if plan.empty:
        return plan.assign(pid=[], split=[], refs=[]), report
    meta = ok.loc[plan["iid"], ["image", "subject", "emotion", "intensity", "split"]]
    plan = pd.concat([plan.reset_index(drop=True), meta.reset_index(drop=True)], axis=1)
    plan["refs"] = [refs.get(i, []) for i in plan["iid"]]
    # Deterministic numbering: split order, then table order, then target emotion.
    plan["split_rank"] = plan["split"].map(SPLITS.index)
    plan = plan.sort_values(["split_rank", "iid", "target_emotion"], kind="stable")
    plan = plan.drop(columns="split_rank").reset_index(drop=True)
    plan.insert(0, "pid", range(len(plan)))
    return plan, report


# --------------------------------------------------------------------------- writing


class _Crops:
    """Aligned face crops of table rows. Rows in `keep` (the references) are kept once made;
    of the others only the latest, which upstream pairing asks for once per target emotion —
    so memory stays bounded on large datasets."""

    def __init__(self, data_dir: Path, landmarks: pd.DataFrame, size: int, keep: set[int]):
        self.data_dir, self.table, self.size, self.keep = data_dir, landmarks, size, keep
        self.cache: dict[int, tuple[np.ndarray, np.ndarray] | FacecalError] = {}
        self.last: int | None = None

    def get(self, iid: int) -> tuple[np.ndarray, np.ndarray]:
        """(crop uint8 size×size×3, image → crop transform) of table row `iid`."""
        if iid != self.last and self.last is not None and self.last not in self.keep:
            self.cache.pop(self.last, None)
        self.last = iid
        if iid not in self.cache:
            try:
                row = self.table.loc[iid]
                pts = as_points(row["points"], f"{row['image']} points")
                m = geometry.crop_transform(pts, self.size)
                img = load_image(self.data_dir / row["image"], "RGB")
                self.cache[iid] = (geometry.warp_image(img, m, self.size), m)
            except FacecalError as e:
                self.cache[iid] = e
        got = self.cache[iid]
        if isinstance(got, FacecalError):
            raise got
        return got


def as_points(value: Any, where: str) -> np.ndarray:
    """A table cell of 136 floats as checked (68, 2) points, or a GeometryError naming it."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise geometry.GeometryError(f"{where}: not numeric") from None
    if arr.size != 2 * geometry.N_POINTS:
        raise geometry.GeometryError(
            f"{where}: expected {2 * geometry.N_POINTS} values, got {arr.size}"
        )
    return geometry.check_points(arr.reshape(geometry.N_POINTS, 2), where)


def _clean_outputs(out_dir: Path) -> None:
    """Remove pair files of an earlier run (DVC does this itself; plain runs need it)."""
    for split in SPLITS:
        d = out_dir / split
        if d.is_dir():
            for f in d.iterdir():
                if PAIR_FILE.match(f.name) or f.name == POINTS_FILE:
                    f.unlink()


def run_pairs(
    params: PairsParams,
    base: BaseParams,
    data_dir: Path = DATA_DIR,
    landmarks_path: Path = LANDMARKS_TABLE,
    calibrated_path: Path = CALIBRATED_TABLE,
    out_dir: Path = OUT_DIR,
    plots_dir: Path = PLOTS_DIR,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the pairs, index and strip; returns summary counts."""
    data_dir, out_dir, plots_dir = Path(data_dir), Path(out_dir), Path(plots_dir)
    size = base.image_size
    landmarks = tables.read_table(landmarks_path)
    calibrated = tables.read_table(calibrated_path) if params.pairing == "upstream" else None
    plan, report = plan_pairs(landmarks, calibrated, params)
    if plan.empty:
        raise PairsError(
            f"{landmarks_path}: no usable faces (no rows with status 'ok' in a "
            f"train/val/test split)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_outputs(out_dir)
    crops = _Crops(data_dir, landmarks, size, {refs[0] for refs in plan["refs"] if refs})
    index: list[dict[str, Any]] = []
    points: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {s: [] for s in SPLITS}
    no_ref = 0
    for r in tqdm(
        plan.itertuples(index=False),
        total=len(plan),
        desc="pairs",
        unit="pair",
        disable=not progress,
        file=sys.stderr,
    ):
        where = r.image if r.kind == "true" else f"{r.image} → {r.target_emotion}"
        try:
            face, m = crops.get(r.iid)
            target = geometry.apply_affine(m, as_points(r.points, where))
            lm = render.render_landmarks(target, size, params.style)
        except FacecalError as e:
            report.add(where, str(e))
            continue
        ref_iid, ref_points = None, np.full((geometry.N_POINTS, 2), np.nan)
        for cand in r.refs:
            try:
                ref, m_ref = crops.get(cand)
                cand_points = as_points(landmarks.loc[cand, "points"], "reference points")
            except FacecalError:
                continue  # a broken candidate was reported where it is a face itself
            ref_iid, ref_points = cand, geometry.apply_affine(m_ref, cand_points)
            break
        split_dir = out_dir / r.split
        lm_file, face_file = pair_name(r.pid, "CLEAN0", r.iid), pair_name(r.pid, "CLEAN1", r.iid)
        save_image(lm, split_dir / lm_file)
        save_image(face, split_dir / face_file)
        ref_file = ""
        if ref_iid is not None:
            ref_file = pair_name(r.pid, "REF", ref_iid)
            save_image(ref, split_dir / ref_file)
        elif params.references:
            no_ref += 1
        points[r.split].append((r.pid, target, ref_points))
        index.append(
            {
                "pid": r.pid,
                "split": r.split,
                "landmarks_file": f"{r.split}/{lm_file}",
                "face_file": f"{r.split}/{face_file}",
                "ref_file": f"{r.split}/{ref_file}" if ref_file else "",
                "image": r.image,
                "ref_image": landmarks.loc[ref_iid, "image"] if ref_iid is not None else "",
                "subject": r.subject,
                "emotion": r.emotion,
                "intensity": "" if r.intensity is None or pd.isna(r.intensity) else r.intensity,
                "kind": r.kind,
                "target_emotion": r.target_emotion,
            }
        )
    _write_csv(out_dir / INDEX, INDEX_COLUMNS, index)
    for split, rows in points.items():
        if rows:
            _write_points(out_dir / split / POINTS_FILE, rows)
    report.write_csv(out_dir / FAILURES)
    if report:
        print(f"pairs: skipped {len(report)} item(s) (see {out_dir / FAILURES}):", file=sys.stderr)
        report.print()
    strip = draw_strip(out_dir, index, params.strip)
    if strip is not None:
        save_image(strip, plots_dir / "strip.png")
    counts = {s: sum(1 for i in index if i["split"] == s) for s in SPLITS}
    summary = {
        "pairs": len(index),
        **{f"pairs_{s}": n for s, n in counts.items()},
        "skipped": len(report),
        "without_reference": no_ref,
    }
    # What the GAN stage needs to know about these files (it records style in generator.json).
    info = {
        "image_size": size,
        "style": params.style,
        "pairing": params.pairing,
        "alpha": params.alpha,
        "references": params.references,
        **summary,
    }
    write_json(out_dir / INFO, info)
    return summary


def _write_points(path: Path, rows: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
    """The split's landmark points in crop pixels (`pair_files.POINTS_FILE`), atomically."""
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            pid=np.array([r[0] for r in rows], np.int64),
            target=np.stack([r[1] for r in rows]).astype(np.float32),
            ref=np.stack([r[2] for r in rows]).astype(np.float32),
        )
    tmp.replace(path)


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def draw_strip(out_dir: Path, index: list[dict[str, Any]], n: int) -> np.ndarray | None:
    """Columns of (landmark image, face, reference) for n train pairs spread over the set."""
    rows = [i for i in index if i["split"] == "train"] or index
    if not rows or n <= 0:
        return None
    # Spread the picks over the set (and so over subjects and emotions), deterministically.
    picks = [
        rows[int(j)]
        for j in np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int))
    ]
    tiles = []
    for p in picks:
        parts = [load_image(out_dir / p["landmarks_file"]), load_image(out_dir / p["face_file"])]
        if p["ref_file"]:
            parts.append(load_image(out_dir / p["ref_file"]))
        tiles.append(parts)
    size = tiles[0][0].shape[0]
    depth = max(len(t) for t in tiles)
    gap = 2
    h, w = depth * size + (depth - 1) * gap, len(tiles) * size + (len(tiles) - 1) * gap
    canvas = np.full((h, w, 3), 255, np.uint8)
    for c, parts in enumerate(tiles):
        for r, img in enumerate(parts):
            y, x = r * (size + gap), c * (size + gap)
            canvas[y : y + size, x : x + size] = img
    return canvas


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="raw dataset folder")
    parser.add_argument(
        "--landmarks",
        type=Path,
        default=LANDMARKS_TABLE,
        help="landmark table of the `landmarks` stage",
    )
    parser.add_argument(
        "--calibrated",
        type=Path,
        default=CALIBRATED_TABLE,
        help="calibrated table of the `calibrate` stage (pairing upstream)",
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder of the pairs")
    parser.add_argument("--plots", type=Path, default=PLOTS_DIR, help="folder of strip.png")
    config.add_params_arguments(parser)


def main(args) -> int:
    params = config.params_from_args(args, PairsParams, SECTION)
    base = load_base(args.params)
    with tracking.stage_run(SECTION, {"pairs": params, "base": base}) as run:
        summary = run_pairs(
            params, base, args.data, args.landmarks, args.calibrated, args.out, args.plots
        )
        run.log_metrics(summary)
        run.log_artifact(args.plots / "strip.png", "plots")
        run.log_artifact(args.out / INDEX)
    print("pairs: " + ", ".join(f"{k} {v}" for k, v in summary.items()), file=sys.stderr)
    return 0
