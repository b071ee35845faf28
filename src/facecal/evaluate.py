"""Stage `evaluate`: does training on calibrated generated faces help? Measured on real faces.

Everything is measured on the REAL TEST split (subjects never seen in training), with counts
and 95 % intervals:

* **classification** — every CNN regime: accuracy (Wilson interval), macro-F1, per-class
  recall, confusion matrix; also on the weak subset (the faces calibration is for); the paired
  difference gen_calibrated − gen_uncalibrated (bootstrap interval + McNemar);
* **PSNR-argmax** — the original evaluation: a face is generated from each emotion's
  calibration of a test face, and the emotion whose face has the highest PSNR against the real
  face is the prediction;
* **image quality** — SSIM, PSNR, L1 (bootstrap intervals) and a Fréchet distance in the
  ``real_all`` CNN's penultimate feature space (no downloaded Inception):
  ``reconstruction`` = a test face generated from its own landmarks vs that face;
  ``calibrated`` / ``uncalibrated`` = a weak test face generated from its calibrated / own
  landmarks vs the same subject's most intense real face of that emotion (the expression
  calibration aims at); ``real_weak`` = the real weak face vs that same face (the baseline);
  ``warp_calibrated`` = the weak face's own crop warped piecewise-affinely (`facecal.warp`) to
  its calibrated landmarks — geometry alone, no network; ``copy_reference`` = the identity
  reference the generator was given, copied (identity generators only);
* **judge** — does a face generated toward an emotion read as that emotion? The run's
  ``real_all`` CNN (seed 0: trained on real train-split faces only, never on a generated face
  or a test subject) classifies every face of every quality set; its accuracy against the
  emotion the face was made for (Wilson interval) sits beside SSIM/PSNR/FD;
* **landmark error** — dlib (`facecal.detector`) on generated faces vs the landmarks they were
  drawn from: detection rate and NME (real test crops give dlib's own floor).

Writes ``metrics/eval.json`` (DVC metrics; ``ssim_calibrated`` is the registry's gate metric,
``eval_set_hash`` names the evaluation set), ``eval/report.md``, and ``plots/evaluate/``
(``confusion_<regime>.csv`` for DVC's confusion template, ``confusion.png``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from tqdm import tqdm

from facecal import geometry, metrics, tables, tracking
from facecal.config import add_params_arguments, load_section, params_from_args
from facecal.crossval import KFOLD_REGIMES, run_kfold
from facecal.emotions import EMOTIONS
from facecal.errors import FacecalError
from facecal.faces import FaceCrops
from facecal.generation import (
    FaceGenerator,
    generate_rows,
    own_emotion_rows,
    reference_candidates,
)
from facecal.imageio import load_image
from facecal.jsonio import write_json
from facecal.manifest import Report
from facecal.recognition.cnn import REGIMES, load_classifier, predict, trained_models
from facecal.recognition.fit import CnnParams
from facecal.selection import real_faces, weak_images
from facecal.warp import warp_faces

STAGE = "evaluate"
QUALITY_SETS = (
    "reconstruction",
    "calibrated",
    "uncalibrated",
    "real_weak",
    "warp_calibrated",
    "copy_reference",
)
LANDMARK_SETS = ("real", "reconstruction", "uncalibrated", "calibrated", "warp_calibrated")
# Paired comparisons of regimes, (A, B): A − B on the same test faces.
COMPARISONS = (("gen_calibrated", "gen_uncalibrated"), ("real_low+gen_calibrated", "real_low"))


class EvaluateError(FacecalError):
    """Inputs the evaluation cannot use (missing models, empty test split)."""


@dataclass
class EvaluateParams:
    bootstrap: int = 2000
    confidence: float = 0.95
    fd_bootstrap: int = 200
    batch_size: int = 64
    landmark_upsample: int = 1
    # holdout: the landmark table's test split (as trained by train_cnn); kfold: also every
    # subject tested once by the real regimes (facecal.crossval), `folds` folds (0 = one
    # subject per fold: leave one subject out).
    protocol: Literal["holdout", "kfold"] = "holdout"
    folds: int = 0

    def __post_init__(self):
        if self.protocol not in ("holdout", "kfold"):
            raise EvaluateError(f"evaluate.protocol: holdout or kfold, got {self.protocol!r}")
        if not 0 < self.confidence < 1:
            raise EvaluateError(f"evaluate.confidence: must be in (0, 1), got {self.confidence}")
        if self.bootstrap < 100:
            raise EvaluateError(f"evaluate.bootstrap: need ≥ 100 resamples, got {self.bootstrap}")


# --------------------------------------------------------------------------- pieces


def strong_references(faces: pd.DataFrame, weak_rows: list[int]) -> dict[int, int]:
    """For each weak face (table row): the same subject's most intense face of the same emotion,
    if it is more intense (rows with unknown intensity have none). Ties → lowest row."""
    out: dict[int, int] = {}
    for iid in weak_rows:
        r = faces.loc[iid]
        if pd.isna(r["intensity"]):
            continue
        same = faces[
            (faces["subject"] == r["subject"])
            & (faces["emotion"] == r["emotion"])
            & faces["intensity"].notna()
            & (faces["intensity"] > r["intensity"])
        ]
        if len(same):
            best = same["intensity"].max()
            out[iid] = int(min(same.index[same["intensity"] == best]))
    return out


def _unit(images_u8: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) → float32 (N, 3, H, W) in [0, 1] for the metrics (float32: SSIM's
    convolutions run several times faster than in float64, and 8-bit inputs need no more)."""
    return np.ascontiguousarray(np.asarray(images_u8, np.float32).transpose(0, 3, 1, 2) / 255.0)


def image_quality(
    generated: np.ndarray, real: np.ndarray, p: EvaluateParams, seed: int
) -> dict[str, Any]:
    if len(generated) == 0:
        return {"n": 0}
    g, r = _unit(generated), _unit(real)
    out: dict[str, Any] = {"n": int(len(g))}
    for name, fn in (("ssim", metrics.ssim), ("psnr", metrics.psnr), ("l1", metrics.l1)):
        m = metrics.bootstrap_mean(fn(g, r), p.bootstrap, p.confidence, seed)
        out.update({name: m.mean, f"{name}_lo": m.lo, f"{name}_hi": m.hi})
    return out


def detect_landmarks(
    detector, images: np.ndarray, truth: np.ndarray, p: EvaluateParams, seed: int, desc: str
) -> dict[str, Any]:
    """dlib on (N, S, S, 3) faces vs the (N, 68, 2) points they show (crop pixels)."""
    n = len(images)
    if n == 0:
        return {"n": 0}
    errors = []
    for img, pts in tqdm(zip(images, truth), total=n, desc=desc, file=sys.stderr, leave=False):
        faces = detector.detect(img)
        if faces:
            errors.append(float(geometry.nme(faces[0].points, pts)))
    rate = metrics.wilson_interval(len(errors), n, p.confidence)
    nme = metrics.bootstrap_mean(errors, p.bootstrap, p.confidence, seed)
    return {
        "n": n,
        "detected": rate.k,
        "detection_rate": rate.value,
        "detection_rate_lo": rate.lo,
        "detection_rate_hi": rate.hi,
        "nme": nme.mean,
        "nme_lo": nme.lo,
        "nme_hi": nme.hi,
    }


def classification(
    y: np.ndarray, pred: np.ndarray, n_classes: int, confidence: float
) -> dict[str, Any]:
    correct = int((y == pred).sum())
    acc = metrics.wilson_interval(correct, len(y), confidence)
    cm = metrics.confusion_matrix(y.tolist(), pred.tolist(), n_classes)
    return {
        "n": int(len(y)),
        "correct": correct,
        "accuracy": acc.value,
        "accuracy_lo": acc.lo,
        "accuracy_hi": acc.hi,
        "macro_f1": metrics.macro_f1(cm),
        "_cm": cm,
    }


def eval_set_hash(
    names: list[str],
    crops: np.ndarray,
    points: np.ndarray,
    calibrated: np.ndarray,
    weak: np.ndarray | None = None,
) -> str:
    """What the numbers were measured on: test faces (names, pixels), their landmarks, their
    calibrated landmarks and which of them are weak (the subset `ssim_calibrated` is measured
    on, set by calibration.intensity_max). Equal hash ⇒ comparable generators (the registry's
    gate checks it)."""
    h = hashlib.sha256()
    if weak is not None:
        h.update(b"weak:" + np.packbits(np.asarray(weak, bool)).tobytes())
    for name in names:
        h.update(name.encode() + b"\0")
    h.update(np.ascontiguousarray(crops, np.uint8).tobytes())
    h.update(np.round(np.asarray(points, np.float64), 3).astype(np.float32).tobytes())
    h.update(np.round(np.asarray(calibrated, np.float64), 3).astype(np.float32).tobytes())
    return h.hexdigest()[:16]


def _finite(x):
    """JSON-safe numbers: NaN/inf become null (json.dumps would write invalid NaN)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items() if not k.startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def mlflow_metrics(d: dict[str, Any]) -> dict[str, float]:
    """Flatten to numeric metrics with names MLflow accepts (``+`` is not allowed)."""
    from facecal.config import flatten

    return {
        tracking.metric_name(k): float(v)
        for k, v in flatten(_finite(d)).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _paired(d: metrics.PairedDifference, prefix: str = "") -> dict[str, Any]:
    return {
        f"{prefix}diff": d.diff,
        f"{prefix}lo": d.lo,
        f"{prefix}hi": d.hi,
        f"{prefix}n": d.n,
        f"{prefix}a_only": d.a_only,
        f"{prefix}b_only": d.b_only,
        f"{prefix}p_mcnemar": d.p_value,
    }


def paired_over_seeds(
    correct_a: list[np.ndarray],
    correct_b: list[np.ndarray],
    is_weak: np.ndarray,
    resamples: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """acc(A) − acc(B) on the same test faces, for each seed k (A's k-th training against
    B's k-th): the first seed's difference with its bootstrap interval and McNemar test (the
    keys a single training had), every seed's difference and interval, their mean, spread and
    verdict (`metrics.seed_verdict`), and ``pooled_*``: the interval of the seed-averaged
    difference (bootstrap over faces of each face's mean correctness over seeds)."""
    out: dict[str, Any] = {}
    n_seeds = min(len(correct_a), len(correct_b))
    for prefix, mask in (("", np.ones(len(is_weak), bool)), ("weak_", is_weak)):
        per = [
            metrics.paired_difference(
                correct_a[k][mask], correct_b[k][mask], resamples, confidence, seed
            )
            for k in range(n_seeds)
        ]
        out.update(_paired(per[0], prefix))
        out.update(metrics.seed_spread([d.diff for d in per], f"{prefix}diff"))
        out[f"{prefix}lo_seeds"] = [d.lo for d in per]
        out[f"{prefix}hi_seeds"] = [d.hi for d in per]
        out[f"{prefix}verdict"] = metrics.seed_verdict([d.lo for d in per], [d.hi for d in per])
        avg = np.mean(
            [correct_a[k][mask].astype(float) - correct_b[k][mask] for k in range(n_seeds)], 0
        )
        pooled = metrics.bootstrap_mean(avg, resamples, confidence, seed)
        out.update({f"{prefix}pooled_lo": pooled.lo, f"{prefix}pooled_hi": pooled.hi})
    out["n_seeds"] = n_seeds
    return out


# --------------------------------------------------------------------------- the stage


def run_evaluate(
    params: EvaluateParams,
    seed: int,
    data_dir: Path,
    table_path: Path,
    calibrated_path: Path,
    gan_dir: Path,
    generate_dir: Path,
    cnn_dir: Path,
    metrics_path: Path,
    report_path: Path,
    plots_dir: Path,
    cnn: CnnParams | None = None,
) -> dict[str, Any]:
    """`cnn`: the train_cnn params, which the k-fold protocol trains its fold models with."""
    table = tables.read_table(table_path)
    # Not the warp parameters (par_x/par_y): per-row lists, most of a 32 k-face table's memory.
    calibrated = tables.read_table(
        calibrated_path,
        columns=["image", "emotion", "target_emotion", "weak", "points", "calibrated"],
    )
    report = Report()

    # ---- classifiers (every seed of every trained regime) and the real test faces
    trained = trained_models(cnn_dir)
    not_computed: dict[str, str] = {
        f"regime {r}": f"not trained: {why}" for r, why in trained["skipped"].items()
    }
    models: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
    for regime in REGIMES:
        if trained["regimes"].get(regime):
            models[regime] = [load_classifier(cnn_dir / f) for f in trained["regimes"][regime]]
    gen = FaceGenerator(gan_dir, params.batch_size)
    if models:
        first = next(iter(models.values()))[0][1]
        classes, size = list(first["classes"]), int(first["image_size"])
    else:
        if not trained["skipped"]:
            raise EvaluateError(f"{cnn_dir}: no trained classifiers (run `facecal train-cnn`)")
        # nothing to classify with: the generator's part is still measured
        classes = [e for e in EMOTIONS if e in set(table.loc[table["status"] == "ok", "emotion"])]
        size = gen.size
        not_computed["classification"] = "no regime could be trained (see train_cnn)"
    for regime, runs in models.items():
        for _, meta in runs:
            if meta["classes"] != classes or int(meta["image_size"]) != size:
                raise EvaluateError(
                    f"{cnn_dir / regime}.json: classes/image size differ from the other "
                    f"regimes' ({meta['classes']} vs {classes})"
                )
    test = real_faces(table, "test", classes)
    if test.empty:
        raise EvaluateError(f"{table_path}: no usable faces in the test split")
    test.index = _table_rows(table, test)
    crops = FaceCrops(data_dir, table, size)
    test_crops: list[np.ndarray] = []
    ok: list[bool] = []
    for iid in test.index:
        try:
            test_crops.append(crops.get(iid))
            ok.append(True)
        except FacecalError as e:
            report.add(table.loc[iid, "image"], str(e))
            ok.append(False)
    test = test[np.array(ok, bool)]
    x_test = np.stack(test_crops) if test_crops else np.zeros((0, size, size, 3), np.uint8)
    cidx = {c: i for i, c in enumerate(classes)}
    y_test = test["emotion"].map(cidx).to_numpy()
    weak = weak_images(calibrated)
    is_weak = test["image"].isin(weak).to_numpy()
    conf, rs = params.confidence, params.bootstrap
    if not is_weak.any():
        not_computed["weak subset"] = (
            "the test split has no weak faces (non-neutral, intensity ≤ "
            "calibration.intensity_max or unknown): weak_* numbers are empty"
        )

    others = table[
        (table["status"] == "ok") & (table["split"] == "test") & ~table["emotion"].isin(classes)
    ]
    results: dict[str, Any] = {
        "n_test": int(len(test)),
        "n_test_weak": int(is_weak.sum()),
        # test faces of an emotion no regime was trained on (left out)
        "n_test_other_classes": int(len(others)),
        "n_classes": len(classes),
        "n_seeds": max((len(r) for r in models.values()), default=0),
        "regimes": {},
    }
    correct: dict[str, list[np.ndarray]] = {}
    features_real_all = None
    cms = {}
    for regime, runs in models.items():
        accs, weak_accs = [], []
        for k, (model, meta) in enumerate(runs):
            pred, feats = predict(model, x_test, mirror=bool(meta.get("mirror", False)))
            correct.setdefault(regime, []).append(pred == y_test)
            accs.append(float((pred == y_test).mean()) if len(y_test) else math.nan)
            weak_accs.append(
                float((pred[is_weak] == y_test[is_weak]).mean()) if is_weak.any() else math.nan
            )
            if k:
                continue
            # the first seed's model: confusion matrices, recall, the FD feature space
            if regime == "real_all":
                features_real_all = (model, feats)
            allc = classification(y_test, pred, len(classes), conf)
            weakc = classification(y_test[is_weak], pred[is_weak], len(classes), conf)
            recall = metrics.per_class_recall(allc["_cm"])
            cms[regime] = (allc["_cm"], pred)
            results["regimes"][regime] = {
                **{k_: v for k_, v in allc.items() if not k_.startswith("_")},
                **{f"weak_{k_}": v for k_, v in weakc.items() if k_ not in ("macro_f1", "_cm")},
                "n_train": meta.get("n_train"),
                "recall": {c: recall[i] for i, c in enumerate(classes)},
            }
        results["regimes"][regime].update(
            {
                "n_seeds": len(runs),
                **metrics.seed_spread(accs, "accuracy"),
                **metrics.seed_spread(weak_accs, "weak_accuracy"),
            }
        )
    for a, b in COMPARISONS:
        key = f"{a}_vs_{b}"
        missing = [r for r in (a, b) if r not in correct]
        if missing:
            why = "; ".join(
                f"{r}: {trained['skipped'].get(r, 'not among cnn.regimes')}" for r in missing
            )
            not_computed[key] = f"regime(s) without a model — {why}"
            continue
        results[key] = paired_over_seeds(correct[a], correct[b], is_weak, rs, conf, seed)
        if not is_weak.any():
            not_computed[f"{key} (weak subset)"] = "no weak test faces"

    # ---- the generator: reconstruction, PSNR-argmax, quality of generated faces
    gcrops = crops if gen.size == size else FaceCrops(data_dir, table, gen.size)
    refs_of = reference_candidates(table, set(test.index[is_weak]))
    real_g = np.stack([gcrops.get(i) for i in test.index])
    own_pts = tables.points_array(test)
    recon, _, rok = generate_rows(
        gen,
        gcrops,
        list(test.index),
        list(own_pts),
        refs_of,
        report,
        [f"{i} (reconstruction)" for i in test["image"]],
        "evaluate recon",
    )
    m_crop = np.stack([gcrops.transform(i) for i in test.index])
    own_crop_pts = geometry.apply_affine(m_crop, own_pts)

    psnr_res, psnr_pred = psnr_argmax_eval(
        gen, gcrops, test, calibrated, refs_of, real_g, is_weak, report, conf
    )
    results["psnr_argmax"] = psnr_res

    # Generated weak test faces from `facecal generate` (exactly what the CNN regimes saw).
    index_path = generate_dir / "index.csv"
    if not index_path.is_file():
        raise EvaluateError(
            f"{index_path}: generated faces index not found (run `facecal generate`)"
        )
    index = pd.read_csv(index_path, dtype={"subject": str})
    index = index[index["split"] == "test"]
    faces = table[(table["status"] == "ok")]
    weak_rows = [i for i in test.index if test.loc[i, "image"] in weak]
    strong = strong_references(faces, weak_rows)
    own_cal = own_emotion_rows(calibrated).set_index("image")
    sets: dict[str, dict[str, Any]] = {
        "reconstruction": {"gen": recon[rok], "real": real_g[rok], "pts": own_crop_pts[rok]}
    }
    row_of_image = {img: int(i) for i, img in table["image"].items()}
    for kind in ("calibrated", "uncalibrated"):
        rows = index[index["kind"] == kind].set_index("iid")
        g_imgs, r_imgs, pts, real_weak, iids, own_pts_crop, refs = [], [], [], [], [], [], []
        for iid in weak_rows:
            if iid not in rows.index or iid not in strong:
                continue
            try:
                g_img = load_image(generate_dir / rows.loc[iid, "path"], "RGB")
                s_img = gcrops.get(strong[iid])
            except FacecalError as e:
                report.add(f"{table.loc[iid, 'image']} ({kind})", str(e))
                continue
            orig = np.asarray(table.loc[iid, "points"], np.float64).reshape(68, 2)
            cal = np.asarray(
                own_cal.loc[table.loc[iid, "image"], "calibrated"], np.float64
            ).reshape(68, 2)
            alpha = float(rows.loc[iid, "alpha"])
            g_imgs.append(g_img)
            r_imgs.append(s_img)
            pts.append(
                geometry.apply_affine(gcrops.transform(iid), (1 - alpha) * orig + alpha * cal)
            )
            real_weak.append(gcrops.get(iid))
            iids.append(iid)
            own_pts_crop.append(geometry.apply_affine(gcrops.transform(iid), orig))
            refs.append(_reference_row(row_of_image, rows.loc[iid]))
        shape = (0, gen.size, gen.size, 3)
        sets[kind] = {
            "gen": np.stack(g_imgs) if g_imgs else np.zeros(shape, np.uint8),
            "real": np.stack(r_imgs) if r_imgs else np.zeros(shape, np.uint8),
            "pts": np.stack(pts) if pts else np.zeros((0, 68, 2)),
            "iids": iids,
        }
        if kind == "calibrated":
            weak_faces = np.stack(real_weak) if real_weak else np.zeros(shape, np.uint8)
            sets["real_weak"] = {"gen": weak_faces, "real": sets[kind]["real"], "iids": iids}
            sets["warp_calibrated"] = {
                "gen": warp_faces(
                    weak_faces, np.array(own_pts_crop).reshape(-1, 68, 2), sets[kind]["pts"]
                ),
                "real": sets[kind]["real"],
                "pts": sets[kind]["pts"],
                "iids": iids,
            }
            with_ref = [k for k, r in enumerate(refs) if r is not None]
            ref_rows = [r for r in refs if r is not None]
            sets["copy_reference"] = {
                "gen": np.stack([gcrops.get(r) for r in ref_rows])
                if ref_rows
                else np.zeros(shape, np.uint8),
                "real": sets[kind]["real"][with_ref],
                "iids": [iids[k] for k in with_ref],
            }
    quality: dict[str, Any] = {}
    for name in QUALITY_SETS:
        s = sets[name]
        quality[name] = image_quality(s["gen"], s["real"], params, seed)
    # Fréchet distance in the real_all CNN's feature space (resized to its input if needed).
    if features_real_all is not None:
        model = features_real_all[0]
        for name in QUALITY_SETS:
            s = sets[name]
            if len(s["gen"]) >= 2:
                _, fg = predict(model, _resize(s["gen"], size))
                _, fr = predict(model, _resize(_unique_rows(s["real"]), size))
                if len(fr) >= 2:
                    fd = metrics.bootstrap_frechet(fr, fg, params.fd_bootstrap, conf, seed)
                    quality[name].update(
                        {
                            "fd": fd.mean,
                            "fd_lo": fd.lo,
                            "fd_hi": fd.hi,
                            "fd_n_real": int(len(fr)),
                            "fd_n_generated": int(len(fg)),
                        }
                    )
    # The judge: the real_all CNN's reading of each set against the emotion it was made for.
    if features_real_all is not None:
        sets["reconstruction"]["iids"] = [i for i, ok_ in zip(test.index, rok) if ok_]
        for name in QUALITY_SETS:
            quality[name].update(
                judge_accuracy(
                    features_real_all[0],
                    _resize(sets[name]["gen"], size),
                    [table.loc[i, "emotion"] for i in sets[name]["iids"]],
                    classes,
                    conf,
                )
            )
    else:
        not_computed["judge"] = "no real_all model to judge with"
    results["quality"] = quality
    for name in ("calibrated", "uncalibrated", "reconstruction", "real_weak"):
        results[f"ssim_{name}"] = quality[name].get("ssim", float("nan"))
    # Paired by face: only weak faces that both sets have (one may have been skipped). The
    # generator against its own calibration off, and against the two network-free baselines.
    for a_name, b_name in (
        ("calibrated", "uncalibrated"),
        ("calibrated", "warp_calibrated"),
        ("calibrated", "copy_reference"),
    ):
        key = f"ssim_{a_name}_minus_{b_name}"
        d = paired_ssim(sets[a_name], sets[b_name], rs, conf, seed)
        if d is not None:
            results[key] = {"diff": d.mean, "lo": d.lo, "hi": d.hi, "n": d.n}
        else:
            not_computed[key] = _why_no_weak_pairs(weak_rows, strong, index)
    for name in ("calibrated", "uncalibrated", "real_weak"):
        if not quality[name].get("n"):
            not_computed[f"ssim_{name}"] = _why_no_weak_pairs(weak_rows, strong, index)

    # ---- landmark error of generated faces (dlib)
    from facecal.detector import LandmarkDetector

    detector = LandmarkDetector(upsample=params.landmark_upsample)
    lm_sets = {
        "real": (real_g, own_crop_pts),
        "reconstruction": (recon[rok], own_crop_pts[rok]),
        "uncalibrated": (sets["uncalibrated"]["gen"], sets["uncalibrated"]["pts"]),
        "calibrated": (sets["calibrated"]["gen"], sets["calibrated"]["pts"]),
        "warp_calibrated": (sets["warp_calibrated"]["gen"], sets["warp_calibrated"]["pts"]),
    }
    results["landmarks"] = {
        name: detect_landmarks(detector, imgs, pts, params, seed, f"dlib {name}")
        for name, (imgs, pts) in lm_sets.items()
    }

    # ---- subject-independent k-fold of the real regimes
    if params.protocol == "kfold":
        cnn = cnn or CnnParams()
        results["kfold"] = run_kfold(
            table,
            weak,
            classes,
            data_dir,
            size,
            cnn,
            params.folds,
            seed,
            conf,
            list(cnn.regimes),
            report,
        )
        for regime in cnn.regimes:
            if regime not in KFOLD_REGIMES:
                not_computed[f"kfold {regime}"] = (
                    "a generated regime needs a generator trained without each fold's test "
                    "subjects; the pipeline's generator has seen them (`facecal kfold` trains "
                    "one per fold)"
                )

    # ---- the evaluation set's identity and the outputs
    cal_test = np.stack(
        [
            np.asarray(own_cal.loc[i, "calibrated"], np.float64).reshape(68, 2)
            if i in own_cal.index
            else np.zeros((68, 2))
            for i in test["image"]
        ]
    )
    results["eval_set_hash"] = eval_set_hash(
        list(test["image"]), x_test, own_pts, cal_test, weak=is_weak
    )
    # Which generator these numbers are of: `facecal register` refuses metrics of another one.
    results["generator_hash"] = gen.hash
    results["generator_arch"] = gen.config["arch"]
    if not psnr_res.get("n"):
        not_computed["psnr_argmax"] = (
            "no test face of an emotion with a gold template and calibrations toward every "
            "target emotion"
        )
    results["not_computed"] = not_computed
    for what, why in not_computed.items():
        print(f"evaluate: not computed — {what}: {why}", file=sys.stderr)
    results["skipped"] = len(report)
    results["_skipped"] = [f"{p.item}: {p.reason}" for p in report.problems]
    results["classes"] = ",".join(classes)

    plots_dir.mkdir(parents=True, exist_ok=True)
    for regime, (_cm, pred) in cms.items():
        write_confusion_csv(plots_dir / f"confusion_{regime}.csv", test, classes, pred)
    plot_confusions({r: cm for r, (cm, _) in cms.items()}, classes, plots_dir / "confusion.png")
    clean = _finite(results)  # drops "_" keys (confusion arrays, skipped list)
    write_json(metrics_path, clean)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(render_report(clean, classes, params, results["_skipped"]))
    if report:
        print(f"evaluate: skipped {len(report)} item(s):", file=sys.stderr)
        report.print()
    return clean


def _reference_row(row_of_image: dict[str, int], generated: pd.Series) -> int | None:
    """The table row of the identity reference a generated face was made with, if any."""
    ref = generated.get("ref_image")
    return row_of_image.get(ref) if isinstance(ref, str) and ref else None


def paired_ssim(
    a: dict[str, Any], b: dict[str, Any], resamples: int, conf: float, seed: int
) -> metrics.MeanInterval | None:
    """Mean SSIM difference a − b (each set against its own answers) over the faces both sets
    have, with a bootstrap interval; None when they share none."""
    b_at = {iid: n for n, iid in enumerate(b["iids"])}
    pairs = [(n, b_at[iid]) for n, iid in enumerate(a["iids"]) if iid in b_at]
    if not pairs:
        return None
    ai, bi = (list(ix) for ix in zip(*pairs))
    sa = metrics.ssim(_unit(a["gen"][ai]), _unit(a["real"][ai]))
    sb = metrics.ssim(_unit(b["gen"][bi]), _unit(b["real"][bi]))
    return metrics.bootstrap_mean(sa - sb, resamples, conf, seed)


def judge_accuracy(
    model, images_u8: np.ndarray, emotions: list[str], classes: list[str], confidence: float
) -> dict[str, Any]:
    """Share of faces the judge reads as the emotion they were made for (Wilson interval);
    faces of emotions the judge does not know are left out."""
    known = np.array([e in classes for e in emotions], bool)
    if not known.any():
        return {"judge_n": 0}
    cidx = {c: i for i, c in enumerate(classes)}
    pred, _ = predict(model, images_u8[known])
    y = np.array([cidx[e] for e, k in zip(emotions, known) if k])
    w = metrics.wilson_interval(int((pred == y).sum()), int(len(y)), confidence)
    return {"judge_accuracy": w.value, "judge_lo": w.lo, "judge_hi": w.hi, "judge_n": w.n}


def _why_no_weak_pairs(weak_rows: list[int], strong: dict[int, int], index: pd.DataFrame) -> str:
    """Why there is no weak test face to compare with its subject's stronger face."""
    if not weak_rows:
        return "no weak test faces (non-neutral, intensity ≤ calibration.intensity_max or unknown)"
    if not strong:
        return (
            f"none of the {len(weak_rows)} weak test face(s) has a more intense face of the "
            "same subject and emotion with a known intensity"
        )
    return f"no generated face of the {len(strong)} weak test face(s) with a stronger one"


def _table_rows(table: pd.DataFrame, rows: pd.DataFrame) -> list[int]:
    """Landmark-table row numbers of `rows` (matched by image, which is unique)."""
    where = {img: int(i) for i, img in table["image"].items()}
    return [where[i] for i in rows["image"]]


def _unique_rows(images: np.ndarray) -> np.ndarray:
    """Drop repeated images (a strong face shared by two weak faces counts once)."""
    if len(images) == 0:
        return images
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    return images[np.sort(first)]


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if len(images) == 0 or images.shape[1] == size:
        return images
    from PIL import Image

    return np.stack(
        [
            np.asarray(Image.fromarray(i).resize((size, size), Image.Resampling.BICUBIC))
            for i in images
        ]
    )


def psnr_argmax_eval(
    gen: FaceGenerator,
    crops: FaceCrops,
    test: pd.DataFrame,
    calibrated: pd.DataFrame,
    refs_of: dict[int, list[int]],
    real: np.ndarray,
    is_weak: np.ndarray,
    report: Report,
    confidence: float,
) -> tuple[dict[str, Any], np.ndarray]:
    """The original test: generate a face from each emotion's calibration of a test face;
    predict the emotion whose face has the highest PSNR against the real face."""
    targets = [e for e in EMOTIONS if e in set(calibrated["target_emotion"])]
    cal = calibrated.set_index(["image", "target_emotion"])
    pick = [
        k
        for k, (iid, r) in enumerate(test.iterrows())
        if r["emotion"] in targets and all((r["image"], t) in cal.index for t in targets)
    ]
    if not targets or not pick:
        return {"n": 0, "candidates": len(targets)}, np.zeros(0, np.int64)
    rows = test.iloc[pick]
    iids, pts, where = [], [], []
    for iid, r in rows.iterrows():
        for t in targets:
            iids.append(iid)
            pts.append(
                np.asarray(cal.loc[(r["image"], t), "calibrated"], np.float64).reshape(68, 2)
            )
            where.append(f"{r['image']} → {t} (psnr-argmax)")
    faces, _, ok = generate_rows(gen, crops, iids, pts, refs_of, report, where, "evaluate psnr")
    k = len(targets)
    ok_face = ok.reshape(-1, k).all(1)
    cand = faces.reshape(len(rows), k, gen.size, gen.size, 3)[ok_face]
    real_ok = real[pick][ok_face]
    # In blocks of faces (each face's argmax is its own): all of FER2013's PublicTest × 6
    # candidates in float64 at once is 6 GB.
    pred = np.concatenate(
        [
            metrics.psnr_argmax(
                _unit(real_ok[i : i + 256]),
                _unit(cand[i : i + 256].reshape(-1, gen.size, gen.size, 3)).reshape(
                    -1, k, 3, gen.size, gen.size
                ),
            )
            for i in range(0, len(real_ok), 256)
        ]
        or [np.zeros(0, np.int64)]
    )
    y = rows["emotion"].map({e: i for i, e in enumerate(targets)}).to_numpy()[ok_face]
    weak = is_weak[pick][ok_face]
    res = {"candidates": k, "chance": 1.0 / k, "targets": ",".join(targets)}
    for prefix, mask in (("", np.ones(len(y), bool)), ("weak_", weak)):
        c = int((pred[mask] == y[mask]).sum())
        w = metrics.wilson_interval(c, int(mask.sum()), confidence)
        res.update(
            {
                f"{prefix}n": w.n,
                f"{prefix}correct": c,
                f"{prefix}accuracy": w.value,
                f"{prefix}accuracy_lo": w.lo,
                f"{prefix}accuracy_hi": w.hi,
            }
        )
    per = {}
    for i, e in enumerate(targets):
        m = y == i
        if m.any():
            per[e] = {"n": int(m.sum()), "correct": int((pred[m] == i).sum())}
    res["per_emotion"] = per
    return res, pred


# --------------------------------------------------------------------------- outputs


def write_confusion_csv(
    path: Path, test: pd.DataFrame, classes: list[str], pred: np.ndarray
) -> None:
    """One row per test face: actual, predicted (DVC's `confusion` template counts them)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image", "actual", "predicted"])
        for image, actual, p in zip(test["image"], test["emotion"], pred):
            w.writerow([image, actual, classes[int(p)]])


def plot_confusions(cms: dict[str, np.ndarray], classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cms)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.6), dpi=100, squeeze=False)
    short = [c[:4] for c in classes]
    for ax, (regime, cm) in zip(axes[0], cms.items()):
        rows = cm.sum(1, keepdims=True)
        frac = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if frac[i, j] > 0.5 else "black",
                    )
        acc = np.trace(cm) / max(cm.sum(), 1)
        ax.set_title(f"{regime}\naccuracy {acc:.3f} (n={cm.sum()})", fontsize=8)
        ax.set_xticks(range(len(classes)), short, fontsize=6, rotation=90)
        ax.set_yticks(range(len(classes)), short, fontsize=6)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("actual", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def _section(title: str, intro: str, columns: list[str]) -> list[str]:
    """Report lines opening a section: its heading, a paragraph and a table header."""
    return [
        "",
        f"## {title}",
        "",
        intro,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]


def _pct(v, lo, hi, fmt: str = ".3f") -> str:
    if v is None:
        return "—"
    return (
        f"{v:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if lo is not None and hi is not None else f"{v:{fmt}}"
    )


def _spread(d: dict, key: str, signed: bool = False) -> str:
    """``mean ± sd (min–max)`` of a number over seeds; one seed: the value alone."""
    mean, sd = d.get(f"{key}_mean"), d.get(f"{key}_sd")
    if mean is None:
        return "—"
    f = "+.3f" if signed else ".3f"
    if sd is None:
        return f"{mean:{f}} (1 seed)"
    return f"{mean:{f}} ± {sd:.3f} ({d[f'{key}_min']:{f}} – {d[f'{key}_max']:{f}})"


def _acc(d: dict, prefix: str = "") -> str:
    n = d.get(f"{prefix}n", 0)
    if not n:
        return "— (n = 0)"
    return (
        f"{_pct(d.get(f'{prefix}accuracy'), d.get(f'{prefix}accuracy_lo'), d.get(f'{prefix}accuracy_hi'))} "
        f"({d.get(f'{prefix}correct')}/{n})"
    )


def render_report(
    r: dict[str, Any], classes: list[str], p: EvaluateParams, skipped: list[str] | None = None
) -> str:
    ci = f"{round(p.confidence * 100)} %"
    out = [
        "# facecal evaluation (real test split)",
        "",
        f"Test faces: {r['n_test']} (weak: {r['n_test_weak']}), subjects never seen in "
        f"training. Intervals: {ci} — Wilson for proportions, percentile bootstrap "
        f"({p.bootstrap} resamples) for means and differences. Evaluation set "
        f"`{r['eval_set_hash']}`."
        + (
            f" {r['n_test_other_classes']} test face(s) of emotions no regime was trained on "
            f"are left out."
            if r.get("n_test_other_classes")
            else ""
        ),
        "",
        "## Expression CNN per training regime",
        "",
        f"Each regime is trained {r.get('n_seeds', 1)} times (cnn.seeds), from different seeds, "
        "on the same faces: `mean ± sd (min–max)` is over those trainings; the interval, "
        "counts, macro-F1 and recalls are of the first seed's model.",
        "",
        f"| regime | train faces | accuracy over seeds | weak accuracy over seeds | "
        f"accuracy, seed 0 [{ci}] (k/n) | weak, seed 0 (k/n) | "
        f"macro-F1 | " + " | ".join(f"recall {c}" for c in classes) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(classes),
    ]
    for regime, d in r["regimes"].items():
        rec = " | ".join(
            "—" if d["recall"].get(c) is None else f"{d['recall'][c]:.2f}" for c in classes
        )
        f1 = "—" if d.get("macro_f1") is None else f"{d['macro_f1']:.3f}"
        out.append(
            f"| {regime} | {d.get('n_train')} | {_spread(d, 'accuracy')} | "
            f"{_spread(d, 'weak_accuracy')} | {_acc(d)} | {_acc(d, 'weak_')} | {f1} | {rec} |"
        )
    diffs = [k for k in r if k.endswith("_vs_real_low") or k.endswith("_vs_gen_uncalibrated")]
    if diffs:
        out += [
            "",
            "## Paired differences (same test faces)",
            "",
            "A − B in accuracy, seed k of A against seed k of B. `over seeds`: mean ± sd "
            "(min–max) of the per-seed differences; `seed-averaged [CI]`: bootstrap over faces "
            "of each face's correctness averaged over the seeds; `seeds`: how many per-seed "
            "intervals lie above / below 0; the verdict says whether the sign holds on every "
            "seed. Seed 0's interval and McNemar test are as for one training.",
            "",
            f"| comparison | subset | over seeds | seed-averaged [{ci}] | seeds > 0 / < 0 "
            f"| verdict | seed 0 [{ci}] | McNemar p (seed 0) | n |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for k in diffs:
            d = r[k]
            a, b = k.split("_vs_")
            for sub, pre in (("all", ""), ("weak", "weak_")):
                pv = d.get(f"{pre}p_mcnemar")
                los = [x for x in d.get(f"{pre}lo_seeds", []) if x is not None]
                his = [x for x in d.get(f"{pre}hi_seeds", []) if x is not None]
                above, below = sum(x > 0 for x in los), sum(x < 0 for x in his)
                out.append(
                    f"| {a} − {b} | {sub} | {_spread(d, f'{pre}diff', signed=True)} | "
                    f"{_pct(d.get(f'{pre}diff_mean'), d.get(f'{pre}pooled_lo'), d.get(f'{pre}pooled_hi'), '+.3f')} | "
                    f"{above} / {below} of {d.get('n_seeds', 1)} | {d.get(f'{pre}verdict', '—')} | "
                    f"{_pct(d.get(f'{pre}diff'), d.get(f'{pre}lo'), d.get(f'{pre}hi'), '+.3f')} | "
                    f"{'—' if pv is None else f'{pv:.3g}'} | {d.get(f'{pre}n')} |"
                )
    ps = r["psnr_argmax"]
    out += [
        "",
        "## PSNR-argmax (the original evaluation)",
        "",
        "A face is generated from each emotion's calibration of the test face; the emotion "
        "whose face has the highest PSNR against the real face is the prediction.",
        "",
        f"| subset | accuracy [{ci}] (k/n) | candidates | chance |",
        "|---|---|---|---|",
    ]
    if ps.get("n"):
        for sub, pre in (("all", ""), ("weak", "weak_")):
            out.append(
                f"| {sub} | {_acc(ps, pre)} | {ps['candidates']} ({ps.get('targets')}) "
                f"| {ps['chance']:.3f} |"
            )
        per = ", ".join(
            f"{e} {v['correct']}/{v['n']}" for e, v in ps.get("per_emotion", {}).items()
        )
        out += ["", f"Per emotion: {per}."]
    else:
        out.append("| all | — (n = 0) | — | — |")
    q = r["quality"]
    out += [
        "",
        "## Image quality of generated faces",
        "",
        "reconstruction: test face generated from its own landmarks vs the real face. "
        "calibrated / uncalibrated: weak test face generated from its calibrated / own "
        "landmarks vs the same subject's most intense real face of that emotion; "
        "real_weak: the real weak face vs that face (baseline); warp_calibrated: the weak "
        "face's own crop warped to its calibrated landmarks (no network); copy_reference: the "
        "generator's identity reference, copied. Judge: the real_all CNN (seed 0, real train "
        "faces only) reads the face as the emotion it was made for. FD: Fréchet distance in the "
        "real_all CNN's penultimate features (real set vs generated set); FD is biased "
        "upward on small sets, and so are its bootstrap resamples: with few faces the "
        "interval can lie above the estimate.",
        "",
        f"| set | n | SSIM [{ci}] | PSNR dB [{ci}] | L1 [{ci}] | FD [{ci}] (n real/gen) "
        f"| judge [{ci}] |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in QUALITY_SETS:
        d = q.get(name, {})
        if not d.get("n"):
            out.append(f"| {name} | 0 | — | — | — | — | — |")
            continue
        judge = _pct(d["judge_accuracy"], d["judge_lo"], d["judge_hi"]) if d.get("judge_n") else "—"
        fd = (
            _pct(d.get("fd"), d.get("fd_lo"), d.get("fd_hi"), ".4g")
            + f" ({d.get('fd_n_real')}/{d.get('fd_n_generated')})"
            if d.get("fd") is not None
            else "—"
        )
        out.append(
            f"| {name} | {d['n']} | {_pct(d['ssim'], d['ssim_lo'], d['ssim_hi'])} | "
            f"{_pct(d['psnr'], d['psnr_lo'], d['psnr_hi'])} | "
            f"{_pct(d['l1'], d['l1_lo'], d['l1_hi'])} | {fd} | {judge} |"
        )
    paired = [
        (b, r[f"ssim_calibrated_minus_{b}"])
        for b in ("uncalibrated", "warp_calibrated", "copy_reference")
        if f"ssim_calibrated_minus_{b}" in r
    ]
    if paired:
        out.append("")
    for b, d in paired:
        out.append(
            f"SSIM calibrated − {b} (paired, n = {d['n']}): {_pct(d['diff'], d['lo'], d['hi'])}."
        )
    out += _section(
        "Landmark error of generated faces (dlib)",
        "dlib's 68 points on each face vs the points it was generated from, NME normalised "
        "by the inter-ocular distance; `real` is dlib on the real test crops (its own floor).",
        ["set", "n", f"detection rate [{ci}] (k/n)", f"NME [{ci}]"],
    )
    for name, d in r["landmarks"].items():
        if not d.get("n"):
            out.append(f"| {name} | 0 | — | — |")
            continue
        rate = (
            f"{_pct(d['detection_rate'], d['detection_rate_lo'], d['detection_rate_hi'])} "
            f"({d['detected']}/{d['n']})"
        )
        out.append(
            f"| {name} | {d['n']} | {rate} | {_pct(d.get('nme'), d.get('nme_lo'), d.get('nme_hi'))} |"
        )
    kf = r.get("kfold")
    if kf:
        out += _section(
            f"Subject-independent k-fold (k = {kf['k']}, real regimes)",
            "Every subject tested once: fold f's subjects are the test faces, fold f+1's the "
            "early-stopping faces, every other subject's faces (any split) the training set; "
            "one training per fold; predictions of all folds pooled.",
            ["regime", f"accuracy [{ci}] (k/n)", "macro-F1", "per-fold mean ± sd"],
        )
        for regime, d in kf["regimes"].items():
            if not d.get("n"):
                out.append(f"| {regime} | — (n = 0) | — | — |")
                continue
            out.append(
                f"| {regime} | {_pct(d['accuracy'], d['accuracy_lo'], d['accuracy_hi'])} "
                f"({d['correct']}/{d['n']}) | {d['macro_f1']:.3f} | "
                f"{d['fold_accuracy_mean']:.3f} ± {d['fold_accuracy_sd']:.3f} |"
            )
    nc = r.get("not_computed") or {}
    if nc:
        out += ["", "## Not computed", ""]
        out += [f"- {what}: {why}" for what, why in nc.items()]
    out += [
        "",
        f"Generator `{r.get('generator_hash')}` (the registry checks that these metrics are "
        "its own).",
    ]
    out += ["", f"Skipped items: {r.get('skipped', 0)}."]
    skipped = skipped or []
    out += [f"- {s}" for s in skipped[:50]]
    if len(skipped) > 50:
        out.append(f"- … and {len(skipped) - 50} more")
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=Path("data"), help="raw dataset folder")
    parser.add_argument("--table", type=Path, default=Path("outputs/landmarks/landmarks.parquet"))
    parser.add_argument(
        "--calibrated", type=Path, default=Path("outputs/calibrate/calibrated.parquet")
    )
    parser.add_argument("--gan", type=Path, default=Path("outputs/gan"))
    parser.add_argument("--generated", type=Path, default=Path("outputs/generate"))
    parser.add_argument("--cnn", type=Path, default=Path("outputs/cnn"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/eval.json"))
    parser.add_argument("--report", type=Path, default=Path("eval/report.md"))
    parser.add_argument("--plots", type=Path, default=Path("plots/evaluate"))
    add_params_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from facecal.recognition.cnn import load_base

    params = params_from_args(args, EvaluateParams, STAGE)
    base = load_base(args.params)
    with tracking.stage_run(STAGE, {"evaluate": params, "base": base}) as run:
        res = run_evaluate(
            params,
            base.seed,
            args.data,
            args.table,
            args.calibrated,
            args.gan,
            args.generated,
            args.cnn,
            args.metrics,
            args.report,
            args.plots,
            load_section(CnnParams, "cnn", args.params),
        )
        run.log_metrics(mlflow_metrics(res))
        run.log_artifact(args.metrics)
        run.log_artifact(args.report)
        run.log_artifact(args.plots, "plots")
    print(args.report.read_text(), file=sys.stderr)
    return 0
