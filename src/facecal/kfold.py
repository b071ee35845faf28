"""`facecal kfold`: every regime under subject-independent k-fold, with a generator per fold.

`evaluate.protocol: kfold` runs only the real regimes: the pipeline's generator has seen every
subject. Here each fold is a pipeline of its own. The landmark table, with fold f's subjects as
test, fold f+1's as val and the rest as train (`crossval.fold_table`), goes through the stage
commands themselves — calibrate, pairs, train-gan, generate, train-cnn, with this project's
params.yaml — into ``outputs/kfold/fold<f>/``. The calibration model, the generator and every
CNN of fold f are therefore fitted on its training subjects only, and each stage's own split
checks apply. Every training of every regime then classifies the fold's test faces.

Predictions of all folds are pooled per regime and training (seed index) into an accuracy with
a Wilson interval; each regime gets the mean ± sd over its trainings, and every fold keeps its
accuracies. The result goes to ``metrics/kfold.json``.

Resume: a finished fold leaves ``predictions.json`` with the fingerprint of its inputs (the
params file, the landmark table, the fold deal). A rerun skips it; an interrupted fold resumes
where its stages do (train_gan from its checkpoint, train_cnn per finished training). The fold
stages are not tracked one by one; the command logs one MLflow run with the pooled figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from facecal import config, metrics, tables, tracking
from facecal.crossval import fold_table, subject_folds
from facecal.errors import FacecalError
from facecal.faces import crop_faces
from facecal.jsonio import write_json
from facecal.manifest import Report
from facecal.paths import project_root

STAGE = "kfold"
TABLE_PATH = Path("outputs/landmarks/landmarks.parquet")
DATA_DIR = Path("data")
OUT_DIR = Path("outputs/kfold")
METRICS_PATH = Path("metrics/kfold.json")
PREDICTIONS = "predictions.json"


class KfoldError(FacecalError):
    """Inputs the k-fold run cannot use."""


def fold_commands(fold_dir: Path, data_dir: Path) -> list[list[str | Path]]:
    """The stage commands of one fold, every input and output inside `fold_dir`."""
    d, t = fold_dir, fold_dir / "landmarks.parquet"
    cal = d / "calibrate" / "calibrated.parquet"
    return [
        ["calibrate", "--table", t, "--data", data_dir, "--out", d / "calibrate",
         "--metrics", d / "metrics/calibrate.json", "--plots", d / "plots/calibrate"],
        ["pairs", "--data", data_dir, "--landmarks", t, "--calibrated", cal,
         "--out", d / "pairs", "--plots", d / "plots/pairs"],
        ["train-gan", "--pairs", d / "pairs", "--out", d / "gan",
         "--checkpoints", d / "gan_checkpoints", "--plots", d / "plots/gan",
         "--metrics", d / "metrics/gan.json"],
        ["generate", "--data", data_dir, "--table", t, "--calibrated", cal, "--gan", d / "gan",
         "--out", d / "generate", "--plots", d / "plots/generate",
         "--photos", d / "generate_photos"],
        ["train-cnn", "--data", data_dir, "--table", t, "--calibrated", cal,
         "--generated", d / "generate", "--out", d / "cnn", "--plots", d / "plots/cnn",
         "--metrics", d / "metrics/cnn.json"],
    ]  # fmt: skip


def fingerprint(params_file: Path, table_path: Path, folds: list[list[str]], f: int) -> str:
    h = hashlib.sha256()
    for path in (params_file, table_path):
        h.update(path.read_bytes())
    h.update(json.dumps({"folds": folds, "fold": f}).encode())
    return h.hexdigest()[:16]


def run_fold_stages(fold_dir: Path, data_dir: Path, root: Path, progress: bool) -> None:
    """The fold's stages as subprocesses of this interpreter (the `facecal` CLI), in order; a
    failing stage stops the fold with its command named."""
    env = dict(os.environ, FACECAL_ROOT=str(root), FACECAL_TRACKING="off")
    for cmd in fold_commands(fold_dir, data_dir):
        argv = [sys.executable, "-m", "facecal", *map(str, cmd)]
        done = subprocess.run(
            argv,
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL if not progress else None,
            stderr=None if progress else subprocess.PIPE,
            text=True,
        )
        if done.returncode != 0:
            tail = "" if progress else "\n" + (done.stderr or "")[-2000:]
            raise KfoldError(f"{fold_dir.name}: `facecal {cmd[0]}` failed{tail}")


def fold_predictions(fold_dir: Path, data_dir: Path, table: pd.DataFrame) -> dict[str, Any]:
    """Every training of every regime of the fold on the fold's test faces (class names)."""
    from facecal.recognition.cnn import load_classifier, predict, trained_models

    index = trained_models(fold_dir / "cnn")
    test = table[(table["status"] == "ok") & (table["split"] == "test")]
    test = test.sort_values("image", kind="stable").reset_index(drop=True)
    out: dict[str, Any] = {"skipped": index["skipped"], "regimes": {}}
    report = Report()
    loaded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for regime, files in sorted(index["regimes"].items()):
        preds = []
        for name in files:
            model, meta = load_classifier(fold_dir / "cnn" / name)
            classes = list(meta["classes"])
            size = int(meta["image_size"])
            if size not in loaded:
                loaded[size] = crop_faces(data_dir, test, size, report)
            crops, ok = loaded[size]
            p, _ = predict(model, crops[ok], mirror=bool(meta.get("mirror", False)))
            preds.append([classes[i] for i in p])
        out["regimes"][regime] = preds
    ok = loaded[next(iter(loaded))][1] if loaded else np.ones(len(test), bool)
    out["images"] = test.loc[ok, "image"].tolist()
    out["truth"] = test.loc[ok, "emotion"].tolist()
    out["subjects"] = sorted(set(test["subject"].astype(str)))
    out["unreadable"] = [f"{q.item}: {q.reason}" for q in report.problems]
    return out


def pool(folds: list[dict[str, Any]], confidence: float) -> dict[str, Any]:
    """Per regime: each training's pooled accuracy over all folds (Wilson interval), macro-F1
    and per-fold accuracies, then mean ± sd over the trainings."""
    regimes = sorted({r for f in folds for r in f["regimes"]})
    out: dict[str, Any] = {}
    for regime in regimes:
        n_train = max(len(f["regimes"].get(regime, [])) for f in folds)
        trainings = []
        for k in range(n_train):
            truth, pred, per_fold = [], [], []
            for i, f in enumerate(folds):
                runs = f["regimes"].get(regime, [])
                if k >= len(runs):  # the regime was not trained on this fold: its faces count wrong
                    p = [None] * len(f["truth"])
                    per_fold.append({"fold": i, "n": len(p), "trained": False})
                else:
                    p = runs[k]
                    hits = sum(a == b for a, b in zip(p, f["truth"]))
                    per_fold.append({"fold": i, "n": len(p), "accuracy": hits / max(len(p), 1)})
                truth += f["truth"]
                pred += p
            correct = sum(a == b for a, b in zip(pred, truth))
            w = metrics.wilson_interval(correct, len(truth), confidence)
            # One extra column for "no prediction" (untrained) and classes never true.
            names = sorted(set(truth))
            other = len(names)
            cm = metrics.confusion_matrix(
                [names.index(t) for t in truth],
                [names.index(p) if p in names else other for p in pred],
                other + 1,
            )
            trainings.append(
                {
                    "accuracy": w.value,
                    "accuracy_lo": w.lo,
                    "accuracy_hi": w.hi,
                    "correct": correct,
                    "n": w.n,
                    "macro_f1": metrics.macro_f1(cm),
                    "per_fold": per_fold,
                }
            )
        accs = [t["accuracy"] for t in trainings]
        out[regime] = {
            "accuracy_mean": float(np.mean(accs)),
            "accuracy_sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            "trainings": trainings,
        }
    return out


def run_kfold_pipeline(
    k: int,
    seed: int,
    confidence: float,
    root: Path,
    data_dir: Path,
    table_path: Path,
    out_dir: Path,
    metrics_path: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Every fold (module doc); returns what it writes to `metrics_path`."""
    table = tables.read_table(table_path)
    tables.require_columns(table, ["image", "subject", "status", "split"], str(table_path))
    ok = table[table["status"] == "ok"]
    folds = subject_folds(ok["subject"].astype(str).tolist(), k, seed)
    params_file = root / config.DEFAULT_PARAMS_FILE
    results = []
    for f in tqdm(range(len(folds)), desc="kfold", unit="fold", file=sys.stderr):
        fold_dir = out_dir / f"fold{f}"
        pred_path = fold_dir / PREDICTIONS
        fp = fingerprint(params_file, table_path, folds, f)
        if pred_path.is_file():
            done = json.loads(pred_path.read_text())
            if done.get("fingerprint") == fp:
                results.append(done)
                continue
            pred_path.unlink()  # stale: other params, table or deal
        fold_dir.mkdir(parents=True, exist_ok=True)
        t = fold_table(table, folds, f)
        train_subjects = set(t.loc[t["split"] == "train", "subject"].astype(str))
        if train_subjects & set(folds[f]):  # by construction; checked before hours of training
            raise KfoldError(f"fold {f}: a test subject is among the training subjects")
        tables.write_table(t, fold_dir / "landmarks.parquet")
        run_fold_stages(fold_dir, data_dir, root, progress)
        pred = fold_predictions(fold_dir, data_dir, t)
        pred.update(fingerprint=fp, fold=f, test_subjects=folds[f])
        write_json(pred_path, pred)
        results.append(pred)
    summary = {
        "k": len(folds),
        "seed": seed,
        "folds": [{"test_subjects": f} for f in folds],
        "regimes": pool(results, confidence),
    }
    write_json(metrics_path, summary)
    return summary


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument(
        "--folds", type=int, default=None, help="k (default: evaluate.folds; 0 = one subject each)"
    )
    parser.add_argument("--out", type=Path, default=None, help=f"default: {OUT_DIR}")
    parser.add_argument("--metrics", type=Path, default=None, help=f"default: {METRICS_PATH}")
    parser.add_argument("--quiet", action="store_true", help="hide the stages' own output")


def main(args) -> int:
    from facecal.evaluate import EvaluateParams

    root = project_root()
    params = config.load_section(EvaluateParams, "evaluate")
    seed = int((config.read_params().get("base") or {}).get("seed", 0))
    k = params.folds if args.folds is None else args.folds
    with tracking.stage_run(STAGE, {"evaluate": params}) as run:
        summary = run_kfold_pipeline(
            k,
            seed,
            params.confidence,
            root,
            root / DATA_DIR,
            root / TABLE_PATH,
            args.out or root / OUT_DIR,
            args.metrics or root / METRICS_PATH,
            progress=not args.quiet,
        )
        for regime, r in summary["regimes"].items():
            run.log_metrics({f"{regime}.accuracy_mean": r["accuracy_mean"]})
    for regime, r in summary["regimes"].items():
        first = r["trainings"][0]
        print(
            f"kfold {regime}: {r['accuracy_mean']:.3f} ± {r['accuracy_sd']:.3f} over "
            f"{len(r['trainings'])} training(s); first {first['accuracy']:.3f} "
            f"[{first['accuracy_lo']:.3f}, {first['accuracy_hi']:.3f}] (n = {first['n']})"
        )
    return 0
