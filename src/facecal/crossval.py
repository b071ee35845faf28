"""Subject-independent k-fold evaluation of the real-face regimes (`evaluate.protocol: kfold`).

A single held-out split of a small dataset (JAFFE: 10 subjects, 2 of them test) gives intervals
too wide to conclude anything. Here every subject is tested once: the subjects are dealt into
k folds (k = number of subjects: leave one subject out); for fold f the test faces are fold f's
subjects', the early-stopping (val) faces fold f+1's, and the regime trains on the faces of
every other subject — of any split of the landmark table, which k-fold replaces. The models
are trained exactly as train_cnn trains its own (`recognition.fit.train_one`, seed
`regime_seed(base.seed, "<regime>@fold<f>")`), one seed per fold; predictions of all folds are
pooled into one accuracy with a Wilson interval, and the per-fold accuracies are kept.

Only the real regimes run here: a generated regime would need a generator trained without the
fold's test subjects (one `train_gan` per fold), and the pipeline's generator has seen them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from facecal import metrics
from facecal.faces import crop_faces
from facecal.manifest import Report
from facecal.recognition.cnn import ClassifierError, predict
from facecal.recognition.fit import CnnParams, regime_seed, train_one
from facecal.selection import real_faces

# The regimes k-fold can run, and which real faces each trains on (train_cnn's selections).
KFOLD_REGIMES = {"real_all": "all", "real_low": "low"}


def subject_folds(subjects: list[str], k: int, seed: int) -> list[list[str]]:
    """The distinct subjects dealt into `k` folds (0 or ≥ the number of subjects: one subject
    per fold), in an order drawn under `seed`; every subject in exactly one fold."""
    names = sorted(set(subjects))
    if len(names) < 3:
        raise ClassifierError(f"k-fold needs ≥ 3 subjects (test, val, train), got {len(names)}")
    k = len(names) if k <= 0 or k >= len(names) else k
    if k < 3:
        raise ClassifierError(f"evaluate.folds: k-fold needs k ≥ 3 (test, val, train), got {k}")
    order = np.random.default_rng(seed).permutation(len(names))
    return [sorted(names[i] for i in order[f::k]) for f in range(k)]


def fold_table(table: pd.DataFrame, folds: list[list[str]], f: int) -> pd.DataFrame:
    """The landmark table with fold f's subjects as test, fold f+1's as val, the rest train."""
    out = table.copy()
    test, val = set(folds[f]), set(folds[(f + 1) % len(folds)])
    out["split"] = np.where(
        out["subject"].isin(test), "test", np.where(out["subject"].isin(val), "val", "train")
    )
    return out


def run_kfold(
    table: pd.DataFrame,
    weak: set[str],
    classes: list[str],
    data_dir: Path,
    image_size: int,
    cnn: CnnParams,
    k: int,
    seed: int,
    confidence: float,
    regimes: list[str],
    report: Report,
) -> dict[str, Any]:
    """Every fold of every regime in `regimes` ∩ `KFOLD_REGIMES`: pooled accuracy (Wilson
    interval), macro-F1, per-fold accuracies and the folds' subjects."""
    ok = table[(table["status"] == "ok") & table["emotion"].isin(classes)]
    folds = subject_folds(list(ok["subject"]), k, seed)
    rows = ok.sort_values("image", kind="stable").reset_index(drop=True)
    crops, loaded = crop_faces(data_dir, rows, image_size, report)
    crop_of = {img: crops[i] for i, img in enumerate(rows["image"]) if loaded[i]}
    cidx = {c: i for i, c in enumerate(classes)}

    def faces(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        df = df[df["image"].isin(crop_of)]
        x = np.stack([crop_of[i] for i in df["image"]]) if len(df) else crops[:0]
        return x, np.array(df["emotion"].map(cidx), np.int64)

    out: dict[str, Any] = {
        "k": len(folds),
        "folds": [{"test_subjects": f} for f in folds],
        "regimes": {},
    }
    for regime in [r for r in regimes if r in KFOLD_REGIMES]:
        y_all, p_all, per_fold = [], [], []
        for f in tqdm(range(len(folds)), desc=f"kfold {regime}", leave=False):
            t = fold_table(ok, folds, f)
            train = real_faces(t, "train", classes, KFOLD_REGIMES[regime], weak)
            x_tr, y_tr = faces(train)
            x_va, y_va = faces(real_faces(t, "val", classes))
            x_te, y_te = faces(real_faces(t, "test", classes))
            # By construction; checked because a leak here would inflate every number.
            if set(train["subject"]) & set(folds[f]):
                raise ClassifierError(f"kfold fold {f}: a test subject is in training")
            if len(x_te) == 0:
                continue
            if len(set(y_tr.tolist())) < 2:
                per_fold.append({"fold": f, "n": int(len(y_te)), "trained": False})
                continue
            res = train_one(
                x_tr,
                y_tr,
                x_va,
                y_va,
                len(classes),
                cnn,
                regime_seed(seed, f"{regime}@fold{f}"),
                desc=None,
                classes=classes,
            )
            pred, _ = predict(res.model, x_te, mirror=cnn.hflip)
            y_all.append(y_te)
            p_all.append(pred)
            per_fold.append(
                {
                    "fold": f,
                    "n": int(len(y_te)),
                    "n_train": int(len(y_tr)),
                    "accuracy": float((pred == y_te).mean()),
                }
            )
        if not y_all:
            out["regimes"][regime] = {"n": 0, "per_fold": per_fold}
            continue
        y, p = np.concatenate(y_all), np.concatenate(p_all)
        w = metrics.wilson_interval(int((p == y).sum()), int(len(y)), confidence)
        cm = metrics.confusion_matrix(y.tolist(), p.tolist(), len(classes))
        accs = [d["accuracy"] for d in per_fold if "accuracy" in d]
        out["regimes"][regime] = {
            "accuracy": w.value,
            "accuracy_lo": w.lo,
            "accuracy_hi": w.hi,
            "correct": int((p == y).sum()),
            "n": w.n,
            "macro_f1": metrics.macro_f1(cm),
            "recall": dict(zip(classes, map(float, metrics.per_class_recall(cm)))),
            "fold_accuracy_mean": float(np.mean(accs)),
            "fold_accuracy_sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            "per_fold": per_fold,
        }
    return out
