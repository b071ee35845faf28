"""Stage `train_cnn`: one compact expression CNN per training regime.

The regimes differ only in their training faces; validation (early stopping) always uses the
real faces of the val split and testing (`facecal evaluate`) the real faces of the test split, so
their accuracies are comparable:

* ``real_all`` — every real train face;
* ``real_low`` — the weak train faces (`calibrated.parquet` ``weak``) + the neutral ones;
* ``gen_uncalibrated`` — faces generated from the weak train faces' own landmarks;
* ``gen_calibrated`` — faces generated from their calibrated landmarks;
* ``real_low+gen_calibrated`` — the union of ``real_low`` and ``gen_calibrated``.

The generated regimes also contain the neutral train faces passed through the generator from
their own landmarks (`facecal generate` writes them), so every regime has every class: a
training set without neutral would make "neutral" unpredictable and the comparison unfair.

Inputs are aligned face crops (`geometry.crop_transform`) at ``base.image_size``; generated
faces already are such crops. No pretrained weights exist offline, so the network is small
and trained from scratch: four conv blocks, a spatial head (the feature map flattened into a
128-d embedding: the feature space of the evaluation's Fréchet distance), dropout, one linear
layer (see `ExpressionCNN`).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from facecal import tables, tracking
from facecal.config import add_params_arguments, params_from_args
from facecal.emotions import EMOTIONS, NEUTRAL
from facecal.errors import FacecalError
from facecal.faces import crop_faces
from facecal.imageio import ImageError, load_image
from facecal.jsonio import write_json
from facecal.manifest import Report
from facecal.recognition.cnn import (
    MODELS_INDEX,
    REGIMES,
    BaseParams,
    ClassifierError,
    load_base,
    load_classifier,
    model_file,
    save_classifier,
)
from facecal.recognition.fit import (
    CnnParams,
    TrainResult,
    check_init,
    init_path,
    net_meta,
    regime_seed,
    train_one,
)
from facecal.selection import real_faces, weak_images

STAGE = "train_cnn"
# Which generated faces (outputs/generate/index.csv `kind`) each generated regime uses.
GENERATED_KINDS = {
    "gen_uncalibrated": ("uncalibrated", "neutral"),
    "gen_calibrated": ("calibrated", "neutral"),
    "real_low+gen_calibrated": ("calibrated", "neutral"),
}
REAL_SELECTION = {"real_all": "all", "real_low": "low", "real_low+gen_calibrated": "low"}


# --------------------------------------------------------------------------- data


def class_list(table: pd.DataFrame, emotions: list[str]) -> list[str]:
    """Classes every regime predicts: neutral + the configured emotions that occur among the
    usable real train faces, in `EMOTIONS` order (the class order everywhere)."""
    wanted = {NEUTRAL, *emotions}
    present = set(table.loc[(table["status"] == "ok") & (table["split"] == "train"), "emotion"])
    return [e for e in EMOTIONS if e in wanted and e in present]


def generated_faces(
    index: pd.DataFrame, split: str, classes: list[str], kinds: tuple[str, ...]
) -> pd.DataFrame:
    tables.require_columns(index, ["split", "subject", "emotion", "kind", "path"], "generate index")
    df = index[
        (index["split"] == split) & index["kind"].isin(kinds) & index["emotion"].isin(classes)
    ]
    return df.sort_values("path", kind="stable").reset_index(drop=True)


@dataclass
class TrainingSet:
    """The faces one regime trains on: real rows (cropped from data/) and generated files."""

    regime: str
    real: pd.DataFrame
    generated: pd.DataFrame

    @property
    def subjects(self) -> set[str]:
        return set(self.real["subject"]) | set(self.generated["subject"])

    def __len__(self) -> int:
        return len(self.real) + len(self.generated)


def select_training_set(
    regime: str,
    table: pd.DataFrame,
    calibrated: pd.DataFrame | None,
    generated_index: pd.DataFrame | None,
    classes: list[str],
) -> TrainingSet:
    """The train-split faces of one regime. Never a val or test face: both the landmark table
    and the generate index carry the split of the face each row derives from, and the result is
    checked to share no subject with the val/test splits."""
    if regime not in REGIMES:
        raise ClassifierError(f"unknown regime {regime!r}; known: {list(REGIMES)}")
    real = table.iloc[0:0]
    if regime in REAL_SELECTION:
        selection = REAL_SELECTION[regime]
        if selection == "low" and calibrated is None:
            raise ClassifierError(f"regime {regime}: needs calibrated.parquet for the weak faces")
        weak = weak_images(calibrated) if selection == "low" else None
        real = real_faces(table, "train", classes, selection, weak)
    gen = pd.DataFrame(columns=["split", "subject", "emotion", "kind", "path"])
    if regime in GENERATED_KINDS:
        if generated_index is None:
            raise ClassifierError(f"regime {regime}: needs outputs/generate/index.csv")
        gen = generated_faces(generated_index, "train", classes, GENERATED_KINDS[regime])
    ts = TrainingSet(regime, real, gen)
    held_out = set(table.loc[table["split"].isin(["val", "test"]), "subject"])
    leaked = sorted(ts.subjects & held_out)
    if leaked:
        raise ClassifierError(
            f"regime {regime}: training faces of val/test subject(s) {leaked[:5]} "
            f"— the split assignment is inconsistent between tables"
        )
    return ts


def load_generated(
    gen_dir: Path, rows: pd.DataFrame, size: int, report: Report
) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((len(rows), size, size, 3), np.uint8)
    ok = np.zeros(len(rows), bool)
    for i, rel in enumerate(rows["path"]):
        try:
            img = load_image(gen_dir / rel, "RGB")
        except ImageError as e:
            report.add(rel, str(e.reason))
            continue
        if img.shape[:2] != (size, size):  # a generator trained at another size
            from PIL import Image

            img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
        out[i] = img
        ok[i] = True
    return out, ok


# --------------------------------------------------------------------------- training


# --------------------------------------------------------------------------- the stage


def _fingerprint(
    params: CnnParams,
    seed: int,
    classes: list[str],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    init_info: dict[str, Any] | None = None,
) -> str:
    """Everything a regime's weights depend on; equal fingerprint ⇒ equal weights."""
    h = hashlib.sha256()
    # Not the regime list, the worker count or the number of seeds: none changes one training.
    knobs = {k: v for k, v in asdict(params).items() if k not in ("regimes", "workers", "seeds")}
    if init_info:  # the file's content, not only its name
        knobs["init"] = init_info["sha256"]
    h.update(json.dumps([knobs, seed, classes], sort_keys=True).encode())
    for a in (x_train, y_train, x_val, y_val):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _finished(out_dir: Path, name: str, fingerprint: str) -> dict[str, Any] | None:
    """The metadata of an earlier, complete training of this model file on the same inputs."""
    try:
        meta = json.loads((out_dir / name).with_suffix(".json").read_text())
        if meta.get("fingerprint") != fingerprint or "curve" not in meta:
            return None
        load_classifier(out_dir / name)
        return meta
    except (OSError, ValueError, FacecalError):
        return None


def _train_job(
    job: dict[str, Any],
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    params: CnnParams,
    threads: int,
    progress: bool,
) -> tuple[str, TrainResult]:
    torch.set_num_threads(threads)
    tag = job["regime"] + (f" seed {job['k']}" if job["k"] else "")
    res = train_one(
        np.load(job["x_path"]),
        job["y"],
        x_val,
        y_val,
        n_classes,
        params,
        job["seed"],
        desc=f"cnn {tag}" if progress else None,
        classes=job["classes"],
    )
    return job["file"], res


def _train_jobs(
    jobs: list[dict[str, Any]],
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    params: CnnParams,
) -> dict[str, TrainResult]:
    """Train the regimes, in parallel single-threaded processes when there are cores for it:
    these small convolutions gain little from a second thread per op, and threads spin badly
    on cores shared with other work, while whole regimes are independent. Results do not
    depend on the worker count (each regime has its own seed). A job's faces travel as a .npy
    file (``x_path``), not pickled through the pool: the parent never holds every regime's
    faces at once (FER2013's five regimes are 1.8 GB of uint8)."""
    workers = min(params.workers or (os.cpu_count() or 1), len(jobs))
    if workers <= 1:
        # One thread here too, so the weights are bit-identical whatever the worker count.
        return dict(_train_job(j, x_val, y_val, n_classes, params, 1, True) for j in jobs)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a forked child of a process that already ran OpenMP code can hang.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [
            pool.submit(_train_job, j, x_val, y_val, n_classes, params, 1, True) for j in jobs
        ]
        out = {}
        for f in tqdm(futures, desc="cnn regimes", file=sys.stderr, leave=False):
            name, res = f.result()
            out[name] = res
    return out


def run_train_cnn(
    params: CnnParams,
    base: BaseParams,
    data_dir: Path,
    table_path: Path,
    calibrated_path: Path,
    generate_dir: Path,
    out_dir: Path,
    plots_dir: Path,
    metrics_path: Path,
) -> dict[str, Any]:
    table = tables.read_table(table_path)
    # Only what weak_images reads: the points columns of 32 k faces × 6 targets are 0.9 GB.
    calibrated = (
        tables.read_table(calibrated_path, columns=["image", "emotion", "weak"])
        if calibrated_path.is_file()
        else None
    )
    index_path = generate_dir / "index.csv"
    needs_gen = any(r in GENERATED_KINDS for r in params.regimes)
    if needs_gen and not index_path.is_file():
        raise ClassifierError(
            f"{index_path}: generated faces index not found (run `facecal generate`)"
        )
    gen_index = pd.read_csv(index_path, dtype={"subject": str}) if index_path.is_file() else None
    if calibrated is None and any(REAL_SELECTION.get(r) == "low" for r in params.regimes):
        raise ClassifierError(f"{calibrated_path}: not found (run `facecal calibrate`)")
    classes = class_list(table, base.emotions)
    cidx = {c: i for i, c in enumerate(classes)}
    size = base.image_size
    report = Report()
    skipped: dict[str, str] = {}  # regime → why it was not trained

    x_val = np.zeros((0, size, size, 3), np.uint8)
    y_val = np.zeros(0, np.int64)
    if len(classes) < 2:
        why = f"the train split has fewer than two usable classes ({classes})"
        skipped = {r: why for r in params.regimes}
    else:
        val_rows = real_faces(table, "val", classes)
        x_val, ok = crop_faces(data_dir, val_rows, size, report)
        x_val, y_val = x_val[ok], val_rows["emotion"].map(cidx).to_numpy()[ok]
        if len(x_val) == 0:
            skipped = {r: "no usable val faces for early stopping" for r in params.regimes}

    real_cache: dict[str, np.ndarray] = {}  # image → crop; regimes share their real faces
    if not skipped:
        all_train = real_faces(table, "train", classes)
        crops, ok = crop_faces(data_dir, all_train, size, report)
        for image, crop, good in zip(all_train["image"], crops, ok):
            if good:
                real_cache[image] = crop
        del crops  # the cache's views keep it until real_cache.clear() below

    jobs: list[dict[str, Any]] = []
    # Each regime's faces wait on disk for their training (see _train_jobs); removed after it.
    (out_dir.parent).mkdir(parents=True, exist_ok=True)
    inputs = tempfile.TemporaryDirectory(prefix=".train-cnn-inputs-", dir=out_dir.parent)
    # Fails before any training, naming the file; recorded in every model's metadata.
    init_info = check_init(params, classes, size)
    if init_info:
        print(
            f"cnn: fine-tuning from {params.init} ({init_info['classes_matched']})", file=sys.stderr
        )
    for regime in params.regimes:
        if regime in skipped:
            continue
        ts = select_training_set(regime, table, calibrated, gen_index, classes)
        real_keep = ts.real[ts.real["image"].isin(real_cache)]
        xs = [np.stack([real_cache[i] for i in real_keep["image"]])] if len(real_keep) else []
        ys = [real_keep["emotion"].map(cidx).to_numpy()]
        if len(ts.generated):
            xg, okg = load_generated(generate_dir, ts.generated, size, report)
            xs.append(xg[okg])
            ys.append(ts.generated["emotion"].map(cidx).to_numpy()[okg])
            del xg
        x_train = np.concatenate(xs) if xs else np.zeros((0, size, size, 3), np.uint8)
        del xs  # one regime's faces in memory at a time (x_train until its fingerprints)
        y_train = np.concatenate(ys).astype(np.int64)
        n_cls = len(set(y_train.tolist()))
        if len(x_train) < 2 or n_cls < 2:
            # e.g. data without weak faces: real_low is the neutral faces alone
            skipped[regime] = (
                f"{len(x_train)} training face(s) in {n_cls} class(es) "
                f"({', '.join(classes[c] for c in sorted(set(y_train.tolist()))) or 'none'}) "
                f"— a classifier needs two"
            )
            continue
        x_path = Path(inputs.name) / f"{len(jobs)}.npy"
        np.save(x_path, x_train)
        for k in range(params.seeds):
            seed = regime_seed(base.seed, regime, k)
            jobs.append(
                {
                    "regime": regime,
                    "k": k,
                    "file": model_file(regime, k),
                    "x_path": str(x_path),
                    "y": y_train,
                    "seed": seed,
                    "fingerprint": _fingerprint(
                        params, seed, classes, x_train, y_train, x_val, y_val, init_info
                    ),
                    "n_real": len(real_keep),
                    "classes": classes,
                }
            )
    real_cache.clear()
    x_train = np.zeros(0, np.uint8)  # the last regime's faces: on disk now
    for regime, why in skipped.items():
        print(f"cnn {regime}: not trained — {why}", file=sys.stderr)

    # The stage run spans the training, so its duration in MLflow is the stage's.
    with tracking.stage_run(STAGE, {"cnn": params, "base": base}) as run:
        out_dir.mkdir(parents=True, exist_ok=True)
        done = {j["file"]: _finished(out_dir, j["file"], j["fingerprint"]) for j in jobs}
        todo = [j for j in jobs if done[j["file"]] is None]
        for j in jobs:
            if done[j["file"]] is not None:
                print(
                    f"cnn {j['file']}: already trained with these inputs and params (resumed)",
                    file=sys.stderr,
                )
        # Every training from the one file check_init resolved (a registry alias may move).
        train_params = replace(params, init=str(init_path(params.init))) if init_info else params
        results = _train_jobs(todo, x_val, y_val, len(classes), train_params)
        inputs.cleanup()

        curves: list[dict[str, Any]] = []
        summary: dict[str, Any] = {}
        files: dict[str, list[str]] = {}
        for j in jobs:
            regime, y_train, name = j["regime"], j["y"], j["file"]
            meta = done[name]
            if meta is None:
                res = results[name]
                per_class = {c: int((y_train == i).sum()) for c, i in cidx.items()}
                meta = {
                    "regime": regime,
                    "seed_index": j["k"],
                    "classes": classes,
                    "image_size": size,
                    **net_meta(params),
                    **({"init": init_info} if init_info else {}),
                    "input": "RGB aligned crop, uint8/127.5 − 1",
                    "mirror": params.hflip,
                    "epochs_run": res.epochs_run,
                    "best_epoch": res.best_epoch,
                    "val_accuracy": res.val_accuracy,
                    "val_n": int(len(y_val)),
                    "n_train": int(len(y_train)),
                    "n_train_per_class": per_class,
                    "n_real": int(j["n_real"]),
                    "n_generated": int(len(y_train) - j["n_real"]),
                    "seed": j["seed"],
                    "fingerprint": j["fingerprint"],
                    "curve": res.curve,
                }
                save_classifier(res.model, meta, out_dir / name)
            files.setdefault(regime, []).append(name)
            run.log_metrics({f"{regime}.seed{j['k']}.best_val_accuracy": meta["val_accuracy"]})
            if j["k"] == 0:  # the curves of the first seed (one line per regime stays readable)
                for row in meta["curve"]:
                    curves.append(
                        {
                            "epoch": row["epoch"],
                            "regime": regime,
                            "train_loss": round(row["train_loss"], 6),
                            "val_accuracy": round(row["val_accuracy"], 6),
                        }
                    )
                    run.log_metrics(
                        {
                            f"{regime}.train_loss": row["train_loss"],
                            f"{regime}.val_accuracy": row["val_accuracy"],
                        },
                        step=row["epoch"],
                    )
                summary[regime] = {
                    "val_accuracy": meta["val_accuracy"],
                    "best_epoch": meta["best_epoch"],
                    "epochs_run": meta["epochs_run"],
                    "n_train": int(len(y_train)),
                    "val_accuracy_seeds": [],
                }
            summary[regime]["val_accuracy_seeds"].append(meta["val_accuracy"])
            print(
                f"cnn {regime} seed {j['k']}: {len(y_train)} faces, best val accuracy "
                f"{meta['val_accuracy']:.3f} at epoch {meta['best_epoch']}/{meta['epochs_run']}",
                file=sys.stderr,
            )
        for s in summary.values():
            s["val_accuracy_mean"] = float(np.mean(s["val_accuracy_seeds"]))
            s["val_accuracy_sd"] = (
                float(np.std(s["val_accuracy_seeds"], ddof=1))
                if (len(s["val_accuracy_seeds"]) > 1)
                else 0.0
            )

        # Models of regimes or seeds no longer configured must not be evaluated as current.
        keep = {f for names in files.values() for f in names}
        for stale in out_dir.glob("*.pt"):
            if stale.name not in keep:
                stale.unlink()
                stale.with_suffix(".json").unlink(missing_ok=True)
        index = {"classes": classes, "seeds": params.seeds, "regimes": files, "skipped": skipped}
        write_json(out_dir / MODELS_INDEX, index)

        plots_dir.mkdir(parents=True, exist_ok=True)
        with open(plots_dir / "curves.csv", "w", newline="") as f:
            w = csv.DictWriter(
                f, ["epoch", "regime", "train_loss", "val_accuracy"], lineterminator="\n"
            )
            w.writeheader()
            w.writerows(curves)
        _plot_curves(curves, plots_dir / "curves.png")
        metrics = {
            "classes": len(classes),
            "val_n": int(len(y_val)),
            "seeds": params.seeds,
            "skipped": len(report),
            "not_trained": skipped,
            **summary,
        }
        write_json(metrics_path, metrics)
        (out_dir / "skipped.csv").unlink(missing_ok=True)
        if report:
            report.write_csv(out_dir / "skipped.csv")
            print(f"train-cnn: skipped {len(report)} image(s):", file=sys.stderr)
            report.print()
        run.log_metrics({f"{r}.best_val_accuracy": s["val_accuracy"] for r, s in summary.items()})
        if skipped:
            run.set_tags(
                {
                    tracking.metric_name(f"facecal.not_trained.{r}"): why[:500]
                    for r, why in skipped.items()
                }
            )
        run.log_artifact(metrics_path)
        run.log_artifact(plots_dir)
        run.log_artifact(out_dir, "cnn")
    return metrics


def _plot_curves(curves: list[dict], path: Path) -> None:
    """Loss and val accuracy per epoch, one line per regime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for regime in dict.fromkeys(c["regime"] for c in curves):
        rows = [c for c in curves if c["regime"] == regime]
        ep = [c["epoch"] for c in rows]
        ax1.plot(ep, [c["train_loss"] for c in rows], label=regime)
        ax2.plot(ep, [c["val_accuracy"] for c in rows], label=regime)
    ax1.set(xlabel="epoch", ylabel="train loss", title="training loss")
    ax2.set(
        xlabel="epoch", ylabel="accuracy", title="val accuracy (real val faces)", ylim=(0, 1.02)
    )
    ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=Path("data"), help="raw dataset folder")
    parser.add_argument("--table", type=Path, default=Path("outputs/landmarks/landmarks.parquet"))
    parser.add_argument(
        "--calibrated", type=Path, default=Path("outputs/calibrate/calibrated.parquet")
    )
    parser.add_argument(
        "--generated",
        type=Path,
        default=Path("outputs/generate"),
        help="folder with index.csv of `facecal generate`",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/cnn"))
    parser.add_argument("--plots", type=Path, default=Path("plots/cnn"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/cnn.json"))
    add_params_arguments(parser)


def main(args: argparse.Namespace) -> int:
    params = params_from_args(args, CnnParams, "cnn")
    base = load_base(args.params)
    run_train_cnn(
        params,
        base,
        args.data,
        args.table,
        args.calibrated,
        args.generated,
        args.out,
        args.plots,
        args.metrics,
    )
    return 0
