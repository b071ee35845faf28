"""Stage `calibrate` and the single-pair tool `calibrate-pair`.

``facecal calibrate`` reads the landmark table and writes (docs/architecture.md, "Calibration
outputs"):

* ``outputs/calibrate/gold.json`` — the gold template per emotion (built from train faces only);
* ``outputs/calibrate/calibrated.parquet`` — every ok face calibrated toward every emotion that
  has a gold template (the PSNR-argmax evaluation and the upstream pairing need them all); the
  ``weak`` column marks the faces the paper calibrates (non-neutral, intensity ≤ intensity_max
  or unknown);
* ``outputs/calibrate/failures.csv`` — faces whose points no calibration can use;
* ``plots/calibrate/overlays.png`` — target with original (red) and calibrated (green) points,
  the gold template (blue) on its best source face, and all of them in the canonical frame with
  the subject's own apex (black) where known;
* ``metrics/calibrate.json`` — error to the gold before/after, the error to the subject's OWN
  most intense face of the same emotion before/after (weak faces), and ``neutral_apex``: every
  neutral face calibrated toward E against its subject's apex of E, train and held-out subjects
  apart — the numbers that say whether calibration moves a face toward what that person's
  strong expression looks like.

Methods (params ``calibration.method``): ``quadratic`` is the paper's warp (``mode: upstream``
reproduces the original numbers, ``aligned`` fits it in the canonical frame); ``pca`` moves each
face along its emotion's principal expression direction, keeping the person's own shape;
``learned`` (default) predicts the person's apex from the face with a model fitted on the train
subjects' neutral/weak → own-apex pairs (`calibration.fit_learned`). The quadratic warp toward
a population gold does not bring faces closer to the same person's apex (a 12-parameter smooth
warp cannot open a mouth, but does pull face proportions toward the population); pca and
learned do, learned a little more on held-out subjects (bench/calibration.py).

``facecal calibrate-pair`` is the original tool: one target landmark file toward one gold file.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from facecal import calibration as cal
from facecal import config, tracking
from facecal.emotions import EMOTIONS, NEUTRAL, UnknownEmotion, normalize_emotion
from facecal.face_points import OK
from facecal.geometry import apply_affine, canonical_to_crop, invert_affine, nme, to_canonical
from facecal.imageio import ImageError, load_image, save_image
from facecal.jsonio import write_json
from facecal.manifest import Report, read_landmarks_file
from facecal.paths import DATA_DIR, METRICS_DIR, OUTPUTS_DIR, PLOTS_DIR, project_root
from facecal.plotting import BLUE, GREEN, RED, TILE, draw_points, evenly, grid
from facecal.tables import points_array, points_column, read_table, require_columns, write_table

SECTION = "calibration"
STAGE = "calibrate"
GOLD = "gold.json"
TABLE = "calibrated.parquet"
FAILURES = "failures.csv"
OVERLAYS = "overlays.png"
METRICS = "calibrate.json"
HELDOUT = ("val", "test")
BLACK = (0, 0, 0)
COLUMNS = (
    "image",
    "subject",
    "emotion",
    "intensity",
    "split",
    "target_emotion",
    "weak",
    "points",
    "calibrated",
    "par_x",
    "par_y",
    "rms_before",
    "rms_after",
)


@dataclass
class CalibrationParams:
    """The `calibration` section of params.yaml (defaults equal the file's)."""

    mode: Literal["aligned", "upstream"] = "aligned"
    method: Literal["quadratic", "pca", "learned"] = "learned"
    gold_top_k: int = 5
    gold_images: dict[str, str | list[str]] = field(default_factory=dict)
    intensity_max: float = 0.5
    pca_reference: Literal["subject", "mean"] = "subject"
    learned_ranks: list[int] = field(default_factory=lambda: list(cal.RANKS))
    learned_ridges: list[float] = field(default_factory=lambda: list(cal.RIDGES))
    learned_folds: int = 5
    overlays: int = 8

    def __post_init__(self):
        if self.gold_top_k < 1:
            raise ValueError(f"gold_top_k must be ≥ 1, got {self.gold_top_k}")
        if not 0.0 <= self.intensity_max <= 1.0:
            raise ValueError(f"intensity_max must be in [0, 1], got {self.intensity_max}")
        if self.method in ("pca", "learned") and self.mode != "aligned":
            raise ValueError(
                f"method {self.method!r} works in the aligned shape space; set mode: aligned"
            )
        if not self.learned_ranks or min(self.learned_ranks) < 0:
            raise ValueError(f"learned_ranks: need ranks ≥ 0, got {self.learned_ranks}")
        if not self.learned_ridges or not all(
            math.isfinite(r) and r > 0 for r in self.learned_ridges
        ):
            raise ValueError(f"learned_ridges: need finite ridges > 0, got {self.learned_ridges}")
        if self.learned_folds < 2:
            raise ValueError(f"learned_folds must be ≥ 2, got {self.learned_folds}")
        if self.overlays < 0:
            raise ValueError(f"overlays must be ≥ 0, got {self.overlays}")
        named = {}
        for emo, images in self.gold_images.items():
            try:
                key = normalize_emotion(emo)
            except UnknownEmotion as e:
                raise ValueError(f"gold_images: {e}") from None
            named[key] = [images] if isinstance(images, str) else list(images)
            if not named[key]:
                raise ValueError(f"gold_images.{emo}: empty list")
        self.gold_images = named


def base_emotions(params_path: str | Path | None = None) -> list[str]:
    """`base.emotions` of the params file, normalised, neutral excluded (never calibrated)."""
    base = config.read_params(params_path).get("base") or {}
    raw = base.get("emotions", list(EMOTIONS[1:]))
    if not isinstance(raw, list):
        raise config.ParamsError(f"base.emotions: expected a list, got {raw!r}")
    out = []
    for e in raw:
        try:
            name = normalize_emotion(e)
        except UnknownEmotion as err:
            raise config.ParamsError(f"base.emotions: {err}") from None
        if name != NEUTRAL and name not in out:
            out.append(name)
    return sorted(out, key=EMOTIONS.index)


# --------------------------------------------------------------------------- the stage


@dataclass
class Faces:
    """The usable faces of the landmark table, with their canonical shapes."""

    df: pd.DataFrame  # ok rows, reset index
    points: np.ndarray  # (N, 68, 2) image pixels
    canonical: np.ndarray  # (N, 68, 2)
    frame: np.ndarray  # (N, 2, 3) image → canonical

    @property
    def intensity(self) -> np.ndarray:
        return self.df["intensity"].to_numpy(dtype=np.float64)


def load_faces(table: pd.DataFrame, report: Report) -> Faces:
    require_columns(
        table,
        ["image", "subject", "emotion", "intensity", "split", "status", "points"],
        "landmark table",
    )
    df = table[table["status"] == OK].reset_index(drop=True)
    points = points_array(df) if len(df) else np.zeros((0, 68, 2))
    valid = cal.valid_mask(points) if len(df) else np.zeros(0, bool)
    for name in df["image"][~valid]:
        report.add(name, "landmarks unusable for calibration (non-finite or degenerate)")
    df, points = df[valid].reset_index(drop=True), points[valid]
    canonical, frame = to_canonical(points) if len(df) else (points, np.zeros((0, 2, 3)))
    return Faces(df, points, canonical, frame)


def build_golds(
    faces: Faces, emotions: list[str], params: CalibrationParams
) -> dict[str, cal.GoldTemplate]:
    """Gold template per emotion from the train split (or the named images)."""
    names = faces.df["image"].tolist()
    index = {n: i for i, n in enumerate(names)}
    golds = {}
    for emo in emotions:
        if emo in params.gold_images:
            missing = [n for n in params.gold_images[emo] if n not in index]
            if missing:
                raise cal.CalibrationError(
                    f"calibration.gold_images.{emo}: {missing} not among the faces with "
                    "usable landmarks (check the image path as written in the manifest)"
                )
            idx = np.array([index[n] for n in params.gold_images[emo]])
            # A gold from a val/test subject would shape the training faces (generated from
            # calibrated landmarks) and leak those subjects into every regime's training data.
            held_out = [
                f"{names[i]} ({faces.df['split'].iloc[i]})"
                for i in idx
                if faces.df["split"].iloc[i] != "train"
            ]
            if held_out:
                raise cal.CalibrationError(
                    f"calibration.gold_images.{emo}: {held_out} not in the train split; gold "
                    "faces must come from training subjects"
                )
            k = len(idx)
        else:
            idx = np.flatnonzero(
                (faces.df["emotion"] == emo).to_numpy() & (faces.df["split"] == "train").to_numpy()
            )
            k = params.gold_top_k
        if len(idx) == 0:
            continue
        golds[emo] = cal.gold_template(
            emo, faces.points[idx], [names[i] for i in idx], faces.intensity[idx], k, params.mode
        )
    return golds


def neutral_references(faces: Faces, per_subject: bool) -> tuple[np.ndarray, np.ndarray]:
    """(each face's neutral reference (N, 68, 2), the mean neutral (68, 2)), canonical frame.

    The mean neutral comes from train faces (all train faces if none is neutral); a face's own
    reference is its subject's mean neutral face where the data has one (`per_subject`)."""
    df = faces.df
    neutral = (df["emotion"] == NEUTRAL).to_numpy()
    train = (df["split"] == "train").to_numpy()
    pool = (
        neutral & train
        if (neutral & train).any()
        else train
        if train.any()
        else np.ones(len(df), bool)
    )
    mean = faces.canonical[pool].mean(0)
    refs = np.broadcast_to(mean, faces.canonical.shape).copy()
    if per_subject:
        subjects = df["subject"].to_numpy()
        for s in np.unique(subjects[neutral]):
            own = neutral & (subjects == s)
            refs[subjects == s] = faces.canonical[own].mean(0)
    return refs, mean


def subject_apexes(faces: Faces) -> dict[tuple[str, str], int]:
    """(subject, emotion) → index of the subject's most intense face of that emotion (known
    intensity > 0; ties by image name); neutral has none."""
    df = faces.df
    inten = faces.intensity
    out: dict[tuple[str, str], int] = {}
    names = df["image"].to_numpy()
    for i in np.argsort(names, kind="stable"):
        if df["emotion"].iat[i] == NEUTRAL or not np.isfinite(inten[i]) or inten[i] <= 0:
            continue
        key = (str(df["subject"].iat[i]), str(df["emotion"].iat[i]))
        if key not in out or inten[i] > inten[out[key]]:
            out[key] = int(i)
    return out


def neutral_apex_pairs(faces: Faces, emotions) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """emotion → (neutral face indices, apex indices): every neutral face of a subject paired
    with that subject's apex of the emotion."""
    df = faces.df
    subjects = df["subject"].astype(str).to_numpy()
    neutral = (df["emotion"] == NEUTRAL).to_numpy()
    apexes = subject_apexes(faces)
    out = {}
    for emo in emotions:
        src, dst = [], []
        for (subj, e), a in sorted(apexes.items()):
            if e != emo:
                continue
            own = np.flatnonzero(neutral & (subjects == subj))
            src.extend(own.tolist())
            dst.extend([a] * len(own))
        out[emo] = (np.array(src, dtype=int), np.array(dst, dtype=int))
    return out


def training_pairs(
    faces: Faces, emotions, intensity_max: float
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train-split pairs of the learned method, emotion → (source indices, apex indices):
    each train subject's neutral faces and weak faces of the emotion (known intensity ≤
    `intensity_max`, below the apex's) → that subject's apex. Held-out subjects never enter."""
    df = faces.df
    inten = faces.intensity
    train = (df["split"] == "train").to_numpy()
    subjects = df["subject"].astype(str).to_numpy()
    emos = df["emotion"].to_numpy()
    neutral = emos == NEUTRAL
    known = np.isfinite(inten)
    apexes = subject_apexes(faces)
    out = {}
    for emo in emotions:
        src, dst = [], []
        for (subj, e), a in sorted(apexes.items()):
            if e != emo or not train[a]:
                continue
            own = train & (subjects == subj)
            weak = own & (emos == emo) & known & (np.where(known, inten, np.inf) <= intensity_max)
            weak &= np.where(known, inten, np.inf) < inten[a]
            idx = np.flatnonzero((own & neutral) | weak)
            src.extend(idx.tolist())
            dst.extend([a] * len(idx))
        out[emo] = (np.array(src, dtype=int), np.array(dst, dtype=int))
    return out


def own_intensity(faces: Faces, emotion: str) -> np.ndarray:
    """Each face's known intensity of `emotion`: its intensity where it shows that emotion,
    0 for neutral faces, faces of other emotions and unknown intensities."""
    inten = faces.intensity
    same = (faces.df["emotion"] == emotion).to_numpy() & np.isfinite(inten)
    return np.where(same, inten, 0.0)


def learned_model(
    faces: Faces, golds: dict[str, cal.GoldTemplate], params: CalibrationParams
) -> cal.LearnedModel:
    """The learned method's model from the train split only (basis: all train faces).

    An emotion whose train subjects give no pair (no known intensities, e.g. FER2013) falls
    back to a rank-0 model: the displacement from the mean train neutral face to the gold."""
    train = (faces.df["split"] == "train").to_numpy()
    subjects = faces.df["subject"].astype(str).to_numpy()
    pairs = {}
    for emo, (src, dst) in training_pairs(faces, list(golds), params.intensity_max).items():
        if len(src):
            t = own_intensity(faces, emo)[src]
            pairs[emo] = cal.Pairs(faces.canonical[src], faces.canonical[dst], subjects[src], t)
    model = cal.fit_learned(
        faces.canonical[train],
        subjects[train],
        pairs,
        params.learned_ranks,
        params.learned_ridges,
        params.learned_folds,
    )
    has_neutral = ((faces.df["emotion"] == NEUTRAL).to_numpy() & train).any()
    if has_neutral:
        _, neutral_mean = neutral_references(faces, per_subject=False)
        for emo, g in golds.items():
            if emo not in model.emotions and g.frame == "canonical":
                zero = np.zeros((cal.N_POINTS, 2))
                model.emotions[emo] = cal.LearnedEmotion(
                    g.points - neutral_mean, np.zeros((0, 2 * cal.N_POINTS)), zero, 0.0, 0, 0, None
                )
    return model


def calibrate_faces(
    faces: Faces, golds: dict[str, cal.GoldTemplate], params: CalibrationParams
) -> tuple[dict[str, dict[str, np.ndarray]], cal.ExpressionModel | cal.LearnedModel | None]:
    """Every face toward every gold: emotion → {calibrated, par (N, 2, 6), rms_before, rms_after}."""
    out: dict[str, dict[str, np.ndarray]] = {}
    model: cal.ExpressionModel | None = None
    if params.method == "learned":
        learned = learned_model(faces, golds, params) if golds else None
        for emo, gold in golds.items():
            if learned is None or emo not in learned.emotions:
                continue
            calibrated = learned.move(emo, faces.points, intensity=own_intensity(faces, emo))
            out[emo] = {
                "calibrated": calibrated,
                "par": np.full((len(faces.points), 2, cal.N_PARAMS), np.nan),
                "rms_before": cal.rms(faces.canonical, gold.points),
                "rms_after": cal.rms(apply_affine(faces.frame, calibrated), gold.points),
            }
        return out, learned
    if params.method == "pca" and golds:
        refs, mean = neutral_references(faces, params.pca_reference == "subject")
        train = (faces.df["split"] == "train").to_numpy()
        index = {n: i for i, n in enumerate(faces.df["image"])}
        gold_faces = {}
        for e, g in golds.items():
            idx = np.array([index[n] for n in g.sources])
            gold_faces[e] = (faces.canonical[idx], refs[idx])
        model = cal.expression_model(
            faces.canonical[train],
            faces.df["emotion"].to_numpy()[train],
            refs[train],
            mean,
            gold_faces,
        )
    for emo, gold in golds.items():
        if model is not None:
            if emo not in model.directions:
                continue
            calibrated = model.move(emo, faces.points, refs)
            gold_can = gold.points
            moved_can = apply_affine(faces.frame, calibrated)
            out[emo] = {
                "calibrated": calibrated,
                "par": np.full((len(faces.points), 2, cal.N_PARAMS), np.nan),
                "rms_before": cal.rms(faces.canonical, gold_can),
                "rms_after": cal.rms(moved_can, gold_can),
            }
            continue
        f = cal.fit(faces.points, gold.points, params.mode)
        calibrated = cal.apply(f, faces.points)
        before, after = cal.rms_in_fit_frame(f, faces.points, calibrated, gold.points)
        out[emo] = {
            "calibrated": calibrated,
            "par": f.par,
            "rms_before": before,
            "rms_after": after,
        }
    return out, model


def weak_mask(df: pd.DataFrame, intensity_max: float) -> np.ndarray:
    inten = df["intensity"].to_numpy(dtype=np.float64)
    known_weak = np.where(np.isfinite(inten), inten, -1.0) <= intensity_max
    return (df["emotion"] != NEUTRAL).to_numpy() & (known_weak | ~np.isfinite(inten))


def build_table(
    faces: Faces, results: dict[str, dict[str, np.ndarray]], intensity_max: float
) -> pd.DataFrame:
    """One row per (face, target emotion), faces in table order, emotions in vocabulary order."""
    emos = [e for e in EMOTIONS if e in results]
    n, k = len(faces.df), len(emos)
    if n == 0 or k == 0:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})

    def stack(key):  # (k, n, …) → (n·k, …), face-major
        arr = np.stack([results[e][key] for e in emos])
        return np.swapaxes(arr, 0, 1).reshape((n * k,) + arr.shape[2:])

    rep = lambda col: np.repeat(faces.df[col].to_numpy(), k)  # noqa: E731
    par = stack("par")
    return pd.DataFrame(
        {
            "image": rep("image"),
            "subject": rep("subject"),
            "emotion": rep("emotion"),
            "intensity": rep("intensity").astype(np.float64),
            "split": rep("split"),
            "target_emotion": np.tile(np.array(emos, dtype=object), n),
            "weak": np.repeat(weak_mask(faces.df, intensity_max), k),
            "points": points_column(np.repeat(faces.points, k, axis=0)),
            "calibrated": points_column(stack("calibrated")),
            # pca moves points without a warp: null parameters (parquet would turn NaN into null).
            "par_x": [r.tolist() if np.isfinite(r).all() else None for r in par[:, 0]],
            "par_y": [r.tolist() if np.isfinite(r).all() else None for r in par[:, 1]],
            "rms_before": stack("rms_before"),
            "rms_after": stack("rms_after"),
        },
        columns=list(COLUMNS),
    )


def own_apex(faces: Faces) -> np.ndarray:
    """For each face, the index of its subject's most intense face of the same emotion when
    that one is strictly more intense; −1 otherwise."""
    df = faces.df
    inten = faces.intensity
    out = np.full(len(df), -1)
    key = df["subject"].astype(str) + "\0" + df["emotion"].astype(str)
    for _, idx in df.groupby(key, sort=True).indices.items():
        known = idx[np.isfinite(inten[idx])]
        if len(known) < 2:
            continue
        # Most intense; ties broken by image name so the choice is deterministic.
        best = min(known, key=lambda i: (-inten[i], df["image"].iat[i]))
        weaker = known[inten[known] < inten[best]]
        out[weaker] = best
    return out


def _summary(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    if len(before) == 0:
        return {"n": 0, "before": None, "after": None, "improved": None}
    return {
        "n": int(len(before)),
        "before": float(before.mean()),
        "after": float(after.mean()),
        "improved": float((after < before).mean()),
    }


def compute_metrics(
    faces: Faces,
    golds: dict[str, cal.GoldTemplate],
    results: dict[str, dict[str, np.ndarray]],
    params: CalibrationParams,
    n_failed: int,
) -> dict[str, Any]:
    """Errors of weak faces calibrated toward their own emotion, in the canonical frame:
    mean point distance to the gold template, and NME to the subject's own apex face."""
    df = faces.df
    weak = weak_mask(df, params.intensity_max)
    emotions = df["emotion"].to_numpy()
    split = df["split"].to_numpy()
    apex = own_apex(faces)
    metrics: dict[str, Any] = {
        "mode": params.mode,
        "method": params.method,
        "n_faces": int(len(df)),
        "n_weak": int(weak.sum()),
        "n_unusable": int(n_failed),
        "n_rows": int(len(df) * len(results)),
        "gold_emotions": sorted(results, key=EMOTIONS.index),
        "gold_sources": {e: len(g.sources) for e, g in golds.items()},
    }
    gb, ga, ab, aa, a_split = [], [], [], [], []
    per_emotion: dict[str, Any] = {}
    for emo, res in results.items():
        sel = np.flatnonzero(weak & (emotions == emo))
        if len(sel) == 0:
            continue
        gold_can = (
            golds[emo].points
            if golds[emo].frame == "canonical"
            else to_canonical(golds[emo].points)[0]
        )
        before_can = faces.canonical[sel]
        after_can = to_canonical(res["calibrated"][sel])[0]
        g_before = cal.point_error(before_can, gold_can)
        g_after = cal.point_error(after_can, gold_can)
        gb.append(g_before)
        ga.append(g_after)
        has = apex[sel] >= 0
        a_idx = apex[sel][has]
        truth = faces.canonical[a_idx]
        x_before, x_after = nme(before_can[has], truth), nme(after_can[has], truth)
        ab.append(x_before)
        aa.append(x_after)
        a_split.append(split[sel][has])
        per_emotion[emo] = {
            "gold_error": _summary(g_before, g_after),
            "own_apex": _summary(x_before, x_after),
        }
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    apex_before, apex_after = cat(ab), cat(aa)
    held = np.isin(cat(a_split) if a_split else np.zeros(0, object), HELDOUT)
    metrics["gold_error"] = _summary(cat(gb), cat(ga))
    metrics["own_apex"] = _summary(apex_before, apex_after)
    # Train subjects' apex faces may be inside the gold itself: the held-out number is clean.
    metrics["own_apex_heldout"] = _summary(apex_before[held], apex_after[held])
    metrics["neutral_apex"] = neutral_apex_metrics(faces, results, per_emotion)
    metrics["per_emotion"] = per_emotion
    return metrics


def _ratio_summary(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    s = _summary(before, after)
    s["ratio"] = s["after"] / s["before"] if s["n"] and s["before"] > 0 else None
    return s


def neutral_apex_metrics(
    faces: Faces, results: dict[str, dict[str, np.ndarray]], per_emotion: dict[str, Any]
) -> dict[str, Any]:
    """Every neutral face calibrated toward emotion E, NME to its subject's apex of E
    (canonical frame), train and held-out subjects apart; `ratio` = after / before (mean NME).
    Adds ``neutral_apex`` to `per_emotion`; returns the overall figures. The learned method
    was fitted on the train subjects' pairs, so only the held-out figure is a test."""
    split = faces.df["split"].to_numpy()
    pairs = neutral_apex_pairs(faces, [e for e in EMOTIONS if e in results])
    parts: dict[str, tuple[list, list]] = {"train": ([], []), "heldout": ([], [])}
    for emo, (src, dst) in pairs.items():
        if len(src) == 0:
            continue
        truth = faces.canonical[dst]
        before = nme(faces.canonical[src], truth)
        after = nme(to_canonical(results[emo]["calibrated"][src])[0], truth)
        held = np.isin(split[src], HELDOUT)
        entry = {}
        for name, sel in (("train", ~held), ("heldout", held)):
            entry[name] = _ratio_summary(before[sel], after[sel])
            parts[name][0].append(before[sel])
            parts[name][1].append(after[sel])
        per_emotion.setdefault(emo, {})["neutral_apex"] = entry
    return {
        name: _ratio_summary(
            np.concatenate(b) if b else np.zeros(0), np.concatenate(a) if a else np.zeros(0)
        )
        for name, (b, a) in parts.items()
    }


def gold_json(
    golds: dict[str, cal.GoldTemplate],
    params: CalibrationParams,
    model: cal.ExpressionModel | cal.LearnedModel | None,
) -> dict[str, Any]:
    top: dict[str, Any] = {}
    per: dict[str, dict[str, Any]] = {}
    if isinstance(model, cal.ExpressionModel):
        top = {"neutral_mean": model.neutral_mean.tolist()}
        per = {
            e: {"direction": d.tolist(), "coordinate": model.gold_coordinate[e]}
            for e, d in model.directions.items()
        }
    elif isinstance(model, cal.LearnedModel):
        top, per = cal.learned_to_json(model)
    emotions = {}
    for emo in sorted(golds, key=EMOTIONS.index):
        g = golds[emo]
        emotions[emo] = {"points": g.points.tolist(), "sources": g.sources, **per.get(emo, {})}
    return {
        "mode": params.mode,
        "frame": "canonical" if params.mode == "aligned" else "pixels",
        "method": params.method,
        "emotions": emotions,
        **top,
    }


def run_calibrate(
    params: CalibrationParams,
    table_path: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    plots_dir: str | Path,
    emotions: list[str] | None = None,
) -> dict[str, Any]:
    """Run the stage; returns the metrics (also written to `metrics_path`)."""
    out_dir, plots_dir, data_dir = Path(out_dir), Path(plots_dir), Path(data_dir)
    emotions = list(emotions) if emotions is not None else [e for e in EMOTIONS if e != NEUTRAL]
    for emo in params.gold_images:
        if emo not in emotions:
            raise config.ParamsError(
                f"calibration.gold_images: {emo!r} is not among base.emotions {emotions}"
            )
    with tracking.stage_run(STAGE, params) as run:
        report = Report()
        faces = load_faces(read_table(table_path), report)
        golds = build_golds(faces, emotions, params)
        results, model = calibrate_faces(faces, golds, params)
        golds = {e: g for e, g in golds.items() if e in results}
        df = build_table(faces, results, params.intensity_max)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / GOLD, gold_json(golds, params, model))
        write_table(df, out_dir / TABLE)
        report.write_csv(out_dir / FAILURES)
        metrics = compute_metrics(faces, golds, results, params, len(report))
        metrics["emotions_without_gold"] = [e for e in emotions if e not in results]
        if isinstance(model, cal.LearnedModel):
            metrics["learned"] = {
                e: {k: v for k, v in entry.items() if k not in ("offset", "coef", "intensity_coef")}
                for e, entry in cal.learned_to_json(model)[1].items()
            }
        write_json(metrics_path, metrics)
        plots_dir.mkdir(parents=True, exist_ok=True)
        overlay = plots_dir / OVERLAYS
        if params.overlays and results:
            save_image(overlay_grid(faces, golds, results, params, data_dir), overlay)
        else:
            overlay.unlink(missing_ok=True)
        run.log_metrics({k: v for k, v in metrics.items() if k != "per_emotion"})
        run.log_artifact(metrics_path)
        run.log_artifact(out_dir / GOLD)
        run.log_artifact(overlay)
    if report:
        print(
            f"calibrate: {len(report)} face(s) skipped (see {out_dir / FAILURES}):", file=sys.stderr
        )
        report.print()
    if metrics["emotions_without_gold"]:
        print(
            f"calibrate: no train faces (so no gold) for {metrics['emotions_without_gold']}",
            file=sys.stderr,
        )
    print(
        f"calibrate: {metrics['n_faces']} faces × {len(results)} emotions "
        f"({metrics['n_weak']} weak); {_line('gold error', metrics['gold_error'])}; "
        f"{_line('own-apex NME', metrics['own_apex'])}; "
        f"{_line('held-out own-apex NME', metrics['own_apex_heldout'])}; "
        f"{_line('held-out neutral→apex NME', metrics['neutral_apex']['heldout'])}",
        file=sys.stderr,
    )
    return metrics


def _line(name: str, s: dict[str, Any]) -> str:
    if not s["n"]:
        return f"{name}: n/a"
    return f"{name} {s['before']:.4f} → {s['after']:.4f} (n={s['n']})"


# --------------------------------------------------------------------------- pictures


def _crop_view(points_can: list[tuple[np.ndarray | None, tuple]], caption: str) -> np.ndarray:
    """Point sets of the canonical frame drawn on a blank face-crop canvas."""
    m = canonical_to_crop(TILE)
    layers = [(None if p is None else apply_affine(m, p), c) for p, c in points_can]
    return draw_points(np.full((TILE, TILE, 3), 255, np.uint8), layers, caption=caption)


def _gold_view(gold: cal.GoldTemplate, faces: Faces, data_dir: Path) -> np.ndarray:
    """The gold template (blue) drawn on its first source face."""
    i = int(np.flatnonzero(faces.df["image"].to_numpy() == gold.sources[0])[0])
    pts = (
        apply_affine(invert_affine(faces.frame[i]), gold.points)
        if gold.frame == "canonical"
        else gold.points
    )
    caption = f"gold {gold.emotion} (k={len(gold.sources)})"
    try:
        img = load_image(data_dir / gold.sources[0], mode="RGB")
    except ImageError:
        img = np.full((TILE, TILE, 3), 255, np.uint8)
    return draw_points(img, [(pts, BLUE)], caption=caption)


def overlay_grid(
    faces: Faces, golds, results, params: CalibrationParams, data_dir: Path
) -> np.ndarray:
    """Rows of three: target (red original, green calibrated), gold on its source (blue),
    canonical frame (gold blue, original red, calibrated green, own apex black)."""
    df = faces.df
    weak = weak_mask(df, params.intensity_max) & df["emotion"].isin(list(results)).to_numpy()
    apex = own_apex(faces)
    held = df["split"].isin(HELDOUT).to_numpy()
    # Prefer held-out faces with a known own apex: they show whether calibration works.
    for pool in (weak & held & (apex >= 0), weak & (apex >= 0), weak):
        if pool.sum() >= min(params.overlays, int(weak.sum())):
            break
    tiles = []
    for i in evenly(np.flatnonzero(pool), params.overlays):
        emo = df["emotion"].iat[i]
        calibrated = results[emo]["calibrated"][i]
        try:
            img = load_image(data_dir / df["image"].iat[i], mode="RGB")
        except ImageError:
            continue
        name = Path(df["image"].iat[i]).name
        tiles.append(
            draw_points(
                img,
                [(faces.points[i], RED), (calibrated, GREEN)],
                caption=f"{name} {emo} {df['intensity'].iat[i]:.2f}",
            )
        )
        tiles.append(_gold_view(golds[emo], faces, data_dir))
        gold_can = (
            golds[emo].points
            if golds[emo].frame == "canonical"
            else to_canonical(golds[emo].points)[0]
        )
        canvas = [
            (gold_can, BLUE),
            (faces.canonical[i], RED),
            (apply_affine(faces.frame[i], calibrated), GREEN),
        ]
        if apex[i] >= 0:
            canvas.insert(0, (faces.canonical[apex[i]], BLACK))
        tiles.append(_crop_view(canvas, "canonical: black = own apex"))
    return grid(tiles, columns=3)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    root = "project root"
    parser.add_argument(
        "--table",
        type=Path,
        default=None,
        help=f"landmark table (default {OUTPUTS_DIR / 'landmarks' / 'landmarks.parquet'} "
        f"under the {root})",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"dataset folder, for the overlay pictures (default {DATA_DIR})",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"output folder (default {OUTPUTS_DIR / STAGE})"
    )
    parser.add_argument(
        "--metrics", type=Path, default=None, help=f"metrics file (default {METRICS_DIR / METRICS})"
    )
    parser.add_argument(
        "--plots", type=Path, default=None, help=f"plots folder (default {PLOTS_DIR / STAGE})"
    )
    config.add_params_arguments(parser)


def main(args) -> int:
    params = config.params_from_args(args, CalibrationParams, SECTION)
    root = project_root()
    run_calibrate(
        params,
        table_path=args.table or root / OUTPUTS_DIR / "landmarks" / "landmarks.parquet",
        data_dir=args.data or root / DATA_DIR,
        out_dir=args.out or root / OUTPUTS_DIR / STAGE,
        metrics_path=args.metrics or root / METRICS_DIR / METRICS,
        plots_dir=args.plots or root / PLOTS_DIR / STAGE,
        emotions=base_emotions(getattr(args, "params", None)),
    )
    return 0


def add_pair_arguments(parser) -> None:
    parser.add_argument(
        "--gold-landmarks",
        required=True,
        type=Path,
        metavar="G",
        help="gold (high-intensity) face: 68 lines 'x y' or 'x,y'",
    )
    parser.add_argument(
        "--target-landmarks",
        required=True,
        type=Path,
        metavar="T",
        help="target (low-intensity) face: 68 lines 'x y' or 'x,y'",
    )
    parser.add_argument(
        "--mode",
        choices=cal.MODES,
        default="aligned",
        help="aligned (default: fit in the canonical face frame) or upstream "
        "(raw pixels, bit-compatible with the original)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="intensity: 0 = original points, 1 = fully calibrated (default)",
    )
    parser.add_argument("--gold-image", type=Path, default=None, metavar="GI")
    parser.add_argument("--target-image", type=Path, default=None, metavar="TI")
    parser.add_argument(
        "--overlay",
        type=Path,
        default=None,
        metavar="OUT.png",
        help="with both images: write the picture of the original README "
        "(target: original red, calibrated green; gold: blue)",
    )
    parser.add_argument(
        "--resize-width",
        type=int,
        default=None,
        metavar="W",
        help="the images were resized to this width when their landmarks were "
        "extracted (the original used 400); applied before drawing",
    )


def calibrate_pair(
    gold_points: np.ndarray,
    target_points: np.ndarray,
    mode: cal.Mode = "aligned",
    alpha: float = 1.0,
) -> dict[str, Any]:
    calibrated, f = cal.calibrate(target_points, gold_points, mode, alpha)
    before, after = cal.rms_in_fit_frame(f, target_points, calibrated, gold_points)
    return {
        "par_x": f.par_x.tolist(),
        "par_y": f.par_y.tolist(),
        "calibrated": calibrated.tolist(),
        "rms_before": float(before),
        "rms_after": float(after),
        "mode": mode,
        "alpha": alpha,
        "rms_frame": "pixels" if mode == "upstream" else "canonical",
    }


def main_pair(args) -> int:
    images = (args.gold_image, args.target_image)
    if any(images) and not args.overlay:
        raise cal.CalibrationError("--gold-image/--target-image are only used with --overlay")
    if args.overlay and not all(images):
        raise cal.CalibrationError("--overlay needs both --gold-image and --target-image")
    if not math.isfinite(args.alpha):
        raise cal.CalibrationError(f"--alpha must be finite, got {args.alpha}")
    gold = read_landmarks_file(args.gold_landmarks)
    target = read_landmarks_file(args.target_landmarks)
    result = calibrate_pair(gold, target, args.mode, args.alpha)
    if args.overlay:
        save_image(
            pair_overlay(
                load_image(args.target_image, "RGB"),
                target,
                np.asarray(result["calibrated"]),
                load_image(args.gold_image, "RGB"),
                gold,
                args.resize_width,
            ),
            args.overlay,
        )
    print(json.dumps(result))
    return 0


def pair_overlay(target_img, target, calibrated, gold_img, gold, resize_width=None) -> np.ndarray:
    from PIL import Image

    def prep(img):
        if not resize_width:
            return img
        h, w = img.shape[:2]
        size = (int(resize_width), max(1, round(h * resize_width / w)))
        return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC))

    size = 400
    left = draw_points(
        prep(target_img),
        [(target, RED), (calibrated, GREEN)],
        size=size,
        caption="target: original red, calibrated green",
    )
    right = draw_points(prep(gold_img), [(gold, BLUE)], size=size, caption="gold: blue")
    return grid([left, right], columns=2)
