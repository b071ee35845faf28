"""Stage `generate`: faces drawn by the trained generator from calibrated and uncalibrated
landmarks — the training material of the generated CNN regimes.

For every weak non-neutral face (`calibrated.parquet` ``weak``, its own-emotion row) of every
split, two faces come out of the generator:

* ``calibrated`` — from ``(1 − α)·points + α·calibrated`` (α = ``generate.alpha``), the weak
  expression pushed toward the emotion's gold template;
* ``uncalibrated`` — from the face's own landmarks, the weak expression as it is.

Neutral faces are passed through the generator from their own landmarks (kind ``neutral``) so
that a training set made only of generated faces still has every class, and generated and real
neutral faces look alike to the classifier.

Every face is drawn in the face's own crop frame (`geometry.crop_transform` of its detected
landmarks — the frame `facecal pairs` used), so calibrated landmarks move the expression, not
the head. With an identity generator the reference face is chosen by the pairs stage's rule
(`facecal.references`: never another face of the emotion being generated; a weak face with no
other usable image of its subject is its own reference). Outputs: ``outputs/generate/index.csv`` +
``<split>/<kind>/IID<row>.png`` (PNG: the CNN sees the generator's exact pixels), and
``plots/generate/sweep.png``, a grid of a few faces generated at α from 0 to 1.

With a generator that warps its reference (warp_refine) and ``generate.full_resolution``, every
calibrated face whose reference was the weak face itself is also written at its photo's own
resolution, ``outputs/generate_photos/<split>/IID<row>.png`` (a folder of its own: train_cnn
reads outputs/generate, and these pictures are for people): the photo with the face warped to the
calibrated points (`warp_mesh.warp_region`) and the generator's painted face blended in through
its mask (`serving.composite.composite_photo`) — exactly what ``/v1/intensify output=photo``
returns for that photo.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from facecal import geometry, tables, tracking
from facecal.config import add_params_arguments, from_dict, params_from_args, read_params
from facecal.emotions import EMOTIONS, NEUTRAL
from facecal.errors import FacecalError
from facecal.faces import FaceCrops
from facecal.generation import (
    SPLITS,
    FaceGenerator,
    GenerateError,
    generate_rows,
    own_emotion_rows,
    reference_candidates,
    usable_faces,
)
from facecal.imageio import save_image
from facecal.manifest import Report

STAGE = "generate"
PHOTOS_DIR = "generate_photos"  # beside outputs/generate
KINDS = ("calibrated", "uncalibrated", "neutral")
INDEX_COLUMNS = (
    "path",
    "split",
    "kind",
    "alpha",
    "image",
    "iid",
    "subject",
    "emotion",
    "intensity",
    "ref_image",
)


@dataclass
class GenerateParams:
    alpha: float = 1.0
    batch_size: int = 64
    sweep_alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    sweep_faces: int = 6
    # warp_refine: also write each calibrated face as its photo at the photo's own resolution.
    full_resolution: bool = True

    def __post_init__(self):
        if self.batch_size < 1:
            raise GenerateError(f"generate.batch_size: must be ≥ 1, got {self.batch_size}")


@dataclass
class BaseParams:
    seed: int = 0
    image_size: int = 64


def load_base(path: str | Path | None = None) -> BaseParams:
    raw = read_params(path).get("base") or {}
    return from_dict(
        BaseParams, {k: raw[k] for k in ("seed", "image_size") if k in raw}, where="base"
    )


# --------------------------------------------------------------------------- the plan


def plan_generation(
    table: pd.DataFrame, calibrated: pd.DataFrame, alpha: float, report: Report
) -> pd.DataFrame:
    """One row per face to generate: iid (table row), kind, points (image pixels)."""
    ok = usable_faces(table)
    iid_of = {img: int(i) for i, img in ok["image"].items()}
    rows: list[dict[str, Any]] = []
    own = own_emotion_rows(calibrated)
    weak = own[own["weak"].astype(bool) & (own["emotion"] != NEUTRAL)]
    for c in weak.itertuples(index=False):
        iid = iid_of.get(c.image)
        if iid is None:
            report.add(
                c.image, "weak face in calibrated.parquet but not an ok face of the landmark table"
            )
            continue
        orig = np.asarray(table.loc[iid, "points"], np.float64).reshape(68, 2)
        if c.calibrated is None:
            report.add(c.image, "no calibrated points")
            continue
        cal = np.asarray(c.calibrated, np.float64).reshape(68, 2)
        rows.append(
            {
                "iid": iid,
                "kind": "calibrated",
                "alpha": alpha,
                "points": (1 - alpha) * orig + alpha * cal,
            }
        )
        rows.append({"iid": iid, "kind": "uncalibrated", "alpha": 0.0, "points": orig})
    for iid in ok.index[ok["emotion"] == NEUTRAL]:
        rows.append(
            {
                "iid": int(iid),
                "kind": "neutral",
                "alpha": 0.0,
                "points": np.asarray(table.loc[iid, "points"], np.float64).reshape(68, 2),
            }
        )
    plan = pd.DataFrame(rows, columns=["iid", "kind", "alpha", "points"])
    plan["kind_rank"] = plan["kind"].map(KINDS.index)
    plan = plan.sort_values(["iid", "kind_rank"], kind="stable").drop(columns="kind_rank")
    return plan.reset_index(drop=True)


def run_generate(
    params: GenerateParams,
    base: BaseParams,
    data_dir: Path,
    table_path: Path,
    calibrated_path: Path,
    gan_dir: Path,
    out_dir: Path,
    plots_dir: Path,
    photos_dir: Path | None = None,
) -> dict[str, Any]:
    """Write the generated faces (module doc); returns the summary metrics."""
    photos_dir = Path(photos_dir) if photos_dir is not None else out_dir.parent / PHOTOS_DIR
    table = tables.read_table(table_path)
    calibrated = tables.read_table(calibrated_path)
    gen = FaceGenerator(gan_dir, params.batch_size)
    if gen.size != base.image_size:
        print(
            f"generate: note: generator image_size {gen.size} ≠ base.image_size "
            f"{base.image_size}; faces are written at {gen.size}",
            file=sys.stderr,
        )
    report = Report()
    plan = plan_generation(table, calibrated, params.alpha, report)
    if plan.empty:  # the stage still completes: an empty index, and train_cnn says what it lacks
        print(
            f"generate: {table_path}: nothing to generate (no weak or neutral usable faces)",
            file=sys.stderr,
        )
    crops = FaceCrops(data_dir, table, gen.size)
    # A warping generator moves a weak face's own pixels (as served); others draw it anew.
    refs_of = reference_candidates(
        table, set(plan.loc[plan["kind"] == "calibrated", "iid"]), self_first=gen.points
    )
    where = [f"{table.loc[i, 'image']} ({k})" for i, k in zip(plan["iid"], plan["kind"])]
    faces, ref_rows, ok = generate_rows(
        gen,
        crops,
        plan["iid"].tolist(),
        plan["points"].tolist(),
        refs_of,
        report,
        where,
        progress="generate",
    )
    # A fresh folder: stale faces of an earlier generator must never leak into training.
    for split in SPLITS:
        shutil.rmtree(out_dir / split, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = []
    for k, r in enumerate(plan.itertuples(index=False)):
        if not ok[k]:
            continue
        t = table.loc[r.iid]
        rel = f"{t['split']}/{r.kind}/IID{r.iid}.png"
        save_image(faces[k], out_dir / rel)
        inten = t["intensity"]
        index.append(
            {
                "path": rel,
                "split": t["split"],
                "kind": r.kind,
                "alpha": r.alpha,
                "image": t["image"],
                "iid": r.iid,
                "subject": t["subject"],
                "emotion": t["emotion"],
                "intensity": "" if inten is None or pd.isna(inten) else float(inten),
                "ref_image": "" if ref_rows[k] is None else table.loc[ref_rows[k], "image"],
            }
        )
    photos = 0
    shutil.rmtree(photos_dir, ignore_errors=True)
    photos_dir.mkdir(parents=True)  # a DVC out: there, empty where nothing is written
    if params.full_resolution and gen.points:
        photos = write_photos(gen, crops, table, plan, ok, ref_rows, data_dir, photos_dir, report)
    with open(out_dir / "index.csv.tmp", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, INDEX_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(index)
    (out_dir / "index.csv.tmp").replace(out_dir / "index.csv")
    report.write_csv(out_dir / "failures.csv")
    if report:
        print(
            f"generate: skipped {len(report)} item(s) (see {out_dir / 'failures.csv'}):",
            file=sys.stderr,
        )
        report.print()

    sweep, note = draw_sweep(gen, crops, table, calibrated, refs_of, params)
    if note:
        print(f"generate: sweep: {note}", file=sys.stderr)
    # Always a picture (DVC expects the plot): the sweep, or a card saying why there is none.
    save_image(sweep if sweep is not None else _message_card(note), plots_dir / "sweep.png")
    counts = {
        f"{s}_{kind}": sum(1 for i in index if i["split"] == s and i["kind"] == kind)
        for s in SPLITS
        for kind in KINDS
    }
    return {"generated": len(index), "skipped": len(report), "photos": photos, **counts}


def write_photos(
    gen: FaceGenerator,
    crops: FaceCrops,
    table: pd.DataFrame,
    plan: pd.DataFrame,
    ok: np.ndarray,
    ref_rows: list[int | None],
    data_dir: Path,
    out_dir: Path,
    report: Report,
) -> int:
    """The calibrated faces of a warping generator at their photos' resolution (module doc);
    only where the weak face itself was the reference (its pixels are what gets warped).
    Returns how many were written; an unreadable photo is reported, never fatal."""
    from facecal.imageio import load_image
    from facecal.serving.composite import composite_photo
    from facecal.warp_mesh import face_region, warp_region

    todo = [
        k
        for k, r in enumerate(plan.itertuples(index=False))
        if ok[k] and r.kind == "calibrated" and ref_rows[k] == r.iid
    ]
    written = 0
    steps = range(0, len(todo), gen.batch_size)
    for b in tqdm(steps, desc="generate: photos", unit="batch", file=sys.stderr, leave=False):
        batch = todo[b : b + gen.batch_size]
        iids = [int(plan.at[k, "iid"]) for k in batch]
        targets = [np.asarray(plan.at[k, "points"], np.float64) for k in batch]
        transforms = [crops.transform(i) for i in iids]
        crop_pts = np.stack([geometry.apply_affine(m, t) for m, t in zip(transforms, targets)])
        refs = np.stack([crops.get(i) for i in iids])  # loaded already by generate_rows
        ref_pts = np.stack([crops.crop_points(i) for i in iids])
        painted, mask = gen.painted_and_mask(crop_pts, refs, ref_pts)
        for j, iid in enumerate(iids):
            t = table.loc[iid]
            try:
                photo = load_image(data_dir / t["image"], "RGB")
            except FacecalError as e:
                report.add(f"{t['image']} (full-resolution photo)", str(e))
                continue
            own = np.asarray(t["points"], np.float64).reshape(68, 2)
            h, w = photo.shape[:2]
            warped = warp_region(photo, own, targets[j])
            region = face_region(own, targets[j], w, h)
            composite_photo(warped, painted[j], mask[j], transforms[j], region)
            save_image(warped, out_dir / f"{t['split']}/IID{iid}.png")
            written += 1
    return written


# --------------------------------------------------------------------------- the sweep


def pick_sweep_faces(
    table: pd.DataFrame, calibrated: pd.DataFrame, n: int, weak: bool = True
) -> list[int]:
    """Up to n weak faces (`weak=False`: any expressive faces with a calibration), test split
    first, cycling over emotions and subjects so the grid shows several people and expressions
    (deterministic)."""
    ok = usable_faces(table)
    own = own_emotion_rows(calibrated)
    expressive = own["emotion"] != NEUTRAL
    chosen = set(own.loc[(own["weak"].astype(bool) if weak else True) & expressive, "image"])
    cands = ok[ok["image"].isin(chosen)]
    picks: list[int] = []
    for split in ("test", "val", "train"):
        pool = cands[cands["split"] == split]
        subjects = sorted(set(pool["subject"]))
        order = [e for e in EMOTIONS if e in set(pool["emotion"])]
        k = 0
        while len(picks) < n and k < len(pool) * max(len(order), 1):
            emotion, subject = order[k % len(order)], subjects[k % len(subjects)]
            k += 1
            rows = pool[(pool["emotion"] == emotion) & ~pool.index.isin(picks)]
            if rows.empty:
                continue
            same = rows[rows["subject"] == subject]
            picks.append(int((same if len(same) else rows).index[0]))
        if len(picks) >= n:
            break
    return picks


def draw_sweep(
    gen: FaceGenerator,
    crops: FaceCrops,
    table: pd.DataFrame,
    calibrated: pd.DataFrame,
    refs_of: dict[int, list[int]],
    params: GenerateParams,
) -> tuple[np.ndarray | None, str]:
    """Per face two rows: landmark images at each α, and the real face then the generated
    faces at each α (α = 0: the face's own landmarks; 1: fully calibrated). Returns the grid
    (None when there is nothing to show) and a note saying what was shown instead, or why
    nothing."""
    if not params.sweep_alphas or params.sweep_faces < 1:
        return None, "generate.sweep_alphas / sweep_faces ask for no sweep"
    note = ""
    picks = pick_sweep_faces(table, calibrated, params.sweep_faces)
    if not picks:
        picks = pick_sweep_faces(table, calibrated, params.sweep_faces, weak=False)
        note = (
            "no weak faces in the data; the sweep shows expressive faces instead"
            if picks
            else "no weak or expressive face with a calibration: nothing to sweep"
        )
    if not picks:
        return None, note
    own = own_emotion_rows(calibrated).set_index("image")
    alphas = list(params.sweep_alphas)
    iids, pts, where = [], [], []
    for iid in picks:
        image = table.loc[iid, "image"]
        orig = np.asarray(table.loc[iid, "points"], np.float64).reshape(68, 2)
        cal = np.asarray(own.loc[image, "calibrated"], np.float64).reshape(68, 2)
        for a in alphas:
            iids.append(iid)
            pts.append((1 - a) * orig + a * cal)
            where.append(f"{image} (sweep α={a})")
    faces, _, ok = generate_rows(gen, crops, iids, pts, refs_of, Report(), where)
    s, gap, cols = gen.size, 2, len(alphas) + 1
    rows_out = []
    for f, iid in enumerate(picks):
        block = slice(f * len(alphas), (f + 1) * len(alphas))
        if not ok[block].all():
            continue
        m = crops.transform(iid)
        lms = gen.render(geometry.apply_affine(m, np.stack(pts[block])))
        try:
            real = crops.get(iid)
        except FacecalError:
            continue
        top = [np.full((s, s, 3), 255, np.uint8), *lms]
        bottom = [real, *faces[block]]
        rows_out += [top, bottom]
    if not rows_out:
        return None, "no sweep face could be generated (see failures.csv)"
    canvas = np.full((len(rows_out) * (s + gap) - gap, cols * (s + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows_out):
        for c, img in enumerate(row):
            canvas[r * (s + gap) : r * (s + gap) + s, c * (s + gap) : c * (s + gap) + s] = img
    # Small faces are blown up (nearest neighbour: the pixels as generated) to be seen.
    k = max(1, 128 // s)
    return (canvas.repeat(k, 0).repeat(k, 1) if k > 1 else canvas), note


def _message_card(text: str) -> np.ndarray:
    """A small white picture carrying `text` (in place of a plot that cannot be drawn)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (480, 60), "white")
    draw = ImageDraw.Draw(img)
    words, lines, line = text.split(), [], ""
    for w in words:  # wrap at ~70 characters
        if len(line) + len(w) > 70:
            lines.append(line)
            line = ""
        line = f"{line} {w}".strip()
    lines.append(line)
    for i, ln in enumerate(lines[:4]):
        draw.text((8, 6 + 13 * i), ln, fill="black")
    return np.asarray(img)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=Path("data"), help="raw dataset folder")
    parser.add_argument("--table", type=Path, default=Path("outputs/landmarks/landmarks.parquet"))
    parser.add_argument(
        "--calibrated", type=Path, default=Path("outputs/calibrate/calibrated.parquet")
    )
    parser.add_argument(
        "--gan",
        type=Path,
        default=Path("outputs/gan"),
        help="folder with generator.pt + generator.json",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/generate"))
    parser.add_argument("--plots", type=Path, default=Path("plots/generate"))
    parser.add_argument(
        "--photos",
        type=Path,
        default=Path("outputs") / PHOTOS_DIR,
        help="full-resolution calibrated faces (warp_refine)",
    )
    add_params_arguments(parser)


def main(args: argparse.Namespace) -> int:
    params = params_from_args(args, GenerateParams, STAGE)
    base = load_base(args.params)
    with tracking.stage_run(STAGE, {"generate": params, "base": base}) as run:
        summary = run_generate(
            params,
            base,
            args.data,
            args.table,
            args.calibrated,
            args.gan,
            args.out,
            args.plots,
            args.photos,
        )
        run.log_metrics(summary)
        run.log_artifact(args.plots / "sweep.png", "plots")
        run.log_artifact(args.out / "index.csv")
    print("generate: " + ", ".join(f"{k} {v}" for k, v in summary.items() if v), file=sys.stderr)
    return 0
