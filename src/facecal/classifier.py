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
import math
import os
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
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
    ExpressionCNN,
    load_base,
    load_classifier,
    model_file,
    save_classifier,
    to_input,
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


# --------------------------------------------------------------------------- params


@dataclass
class CnnParams:
    regimes: list[str] = field(default_factory=lambda: list(REGIMES))
    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.001
    weight_decay: float = 0.0001
    patience: int = 8
    balance: bool = True
    schedule: Literal["constant", "cosine"] = "constant"
    width: int = 16
    dropout: float = 0.3
    augment: bool = True
    hflip: bool = False
    max_shift: float = 0.03
    max_rotation: float = 3.0
    max_scale: float = 0.03
    brightness: float = 0.15
    contrast: float = 0.15
    workers: int = 0
    seeds: int = 3

    def __post_init__(self):
        unknown = [r for r in self.regimes if r not in REGIMES]
        if unknown:
            raise ClassifierError(
                f"cnn.regimes: unknown regime(s) {unknown}; known: {list(REGIMES)}"
            )
        if not self.regimes:
            raise ClassifierError("cnn.regimes: empty")
        for name in ("epochs", "batch_size", "patience", "width", "seeds"):
            if getattr(self, name) < 1:
                raise ClassifierError(f"cnn.{name}: must be ≥ 1, got {getattr(self, name)}")


# --------------------------------------------------------------------------- the network


def _logits(model: ExpressionCNN, x: torch.Tensor, mirror: bool) -> torch.Tensor:
    """Logits, averaged with those of the mirrored faces when the model was trained with
    mirroring (a free variance reduction for a small model)."""
    out = model(x)
    return (out + model(x.flip(-1))) / 2 if mirror else out


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


def regime_seed(seed: int, regime: str, k: int = 0) -> int:
    """The seed of training `k` of a regime: stable across runs and Python versions (crc32, not
    hash()); k = 0 is the seed a single training always had."""
    key = regime if k == 0 else f"{regime}#{k}"
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**31)


def augment(x: torch.Tensor, p: CnnParams, gen: torch.Generator) -> torch.Tensor:
    """Random small rotation/shift/scale (and mirror, with `hflip`) in one affine resample,
    then brightness and contrast. The label of a mirrored face is unchanged — contempt is
    one-sided, but mirrored it is still contempt — yet mirroring is off by default: where a
    dataset acts contempt on one side for everyone (the synthetic default), mirrored contempt
    is a face the data never shows and costs accuracy (measured: see params.yaml)."""
    n = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=gen) * 2 - 1  # noqa: E731  U(−1, 1)
    angle = u(n) * math.radians(p.max_rotation)
    scale = 1 + u(n) * p.max_scale
    shift = u(n, 2) * p.max_shift * 2  # affine_grid units span 2 per image side
    flip = torch.ones(n)
    if p.hflip:
        flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], 1),
            torch.stack([sin * flip, cos, shift[:, 1]], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = 1 + u(n, 1, 1, 1) * p.contrast
    bias = u(n, 1, 1, 1) * p.brightness * 2  # inputs span 2 ([−1, 1])
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * gain + mean + bias).clamp(-1, 1)


@dataclass
class TrainResult:
    model: ExpressionCNN
    curve: list[dict[str, float]]
    best_epoch: int
    val_accuracy: float
    epochs_run: int


def train_one(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    params: CnnParams,
    seed: int,
    desc: str | None = "",
) -> TrainResult:
    """Train from scratch; keep the weights of the best val epoch (accuracy, then loss)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    # channels_last: ~30 % faster convolutions on CPU (oneDNN), same numbers.
    model = ExpressionCNN(n_classes, params.width, params.dropout, x_train.shape[1]).to(
        memory_format=torch.channels_last
    )
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    # Cosine decay over the epoch budget: converges in fewer epochs than a constant rate.
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=params.epochs)
        if params.schedule == "cosine"
        else None
    )
    xt, yt = to_input(x_train), torch.as_tensor(y_train, dtype=torch.long)
    weight = None
    if params.balance:
        # Inverse-frequency class weights: a dataset with one neutral face per subject and
        # several per emotion would otherwise teach the network never to say "neutral".
        counts = torch.bincount(yt, minlength=n_classes).float()
        weight = torch.where(
            counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), torch.zeros(())
        )
    xv, yv = to_input(x_val), torch.as_tensor(y_val, dtype=torch.long)
    best = (-1.0, math.inf)
    best_state, best_epoch, since_best, curve = None, 0, 0, []
    bar = tqdm(
        range(1, params.epochs + 1), desc=desc, file=sys.stderr, leave=False, disable=desc is None
    )
    epoch = 0
    for epoch in bar:
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(order), params.batch_size):
            idx = order[i : i + params.batch_size]
            if len(idx) < 2:  # batch norm needs two samples; the remainder joins next epoch
                continue
            xb = augment(xt[idx], params, gen) if params.augment else xt[idx]
            xb = xb.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(xb), yt[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        if sched is not None:
            sched.step()
        model.eval()
        with torch.no_grad():
            logits = (
                torch.cat(
                    [_logits(model, xv[i : i + 256], params.hflip) for i in range(0, len(xv), 256)]
                )
                if len(xv)
                else torch.zeros(0, n_classes)
            )
            val_loss = float(F.cross_entropy(logits, yv)) if len(xv) else math.nan
            val_acc = float((logits.argmax(1) == yv).float().mean()) if len(xv) else math.nan
        curve.append(
            {
                "epoch": epoch,
                "train_loss": total / max(count, 1),
                "val_accuracy": val_acc,
                "val_loss": val_loss,
            }
        )
        bar.set_postfix(loss=f"{total / max(count, 1):.3f}", val=f"{val_acc:.3f}")
        score = (
            val_acc if math.isfinite(val_acc) else 0.0,
            val_loss if math.isfinite(val_loss) else 0.0,
        )
        if score[0] > best[0] or (score[0] == best[0] and score[1] < best[1]):
            best, best_epoch, since_best = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if since_best >= params.patience:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, curve, best_epoch, best[0], epoch)


# --------------------------------------------------------------------------- the stage


def _fingerprint(
    params: CnnParams,
    seed: int,
    classes: list[str],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
) -> str:
    """Everything a regime's weights depend on; equal fingerprint ⇒ equal weights."""
    h = hashlib.sha256()
    # Not the regime list, the worker count or the number of seeds: none changes one training.
    knobs = {k: v for k, v in asdict(params).items() if k not in ("regimes", "workers", "seeds")}
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
        job["x"],
        job["y"],
        x_val,
        y_val,
        n_classes,
        params,
        job["seed"],
        desc=f"cnn {tag}" if progress else None,
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
    depend on the worker count (each regime has its own seed)."""
    workers = min(params.workers or (os.cpu_count() or 1), len(jobs))
    if workers <= 1:
        # One thread here too, so the weights are bit-identical whatever the worker count.
        return dict(_train_job(j, x_val, y_val, n_classes, params, 1, True) for j in jobs)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a forked child of a process that already ran OpenMP code can hang.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [
            pool.submit(_train_job, j, x_val, y_val, n_classes, params, 1, False) for j in jobs
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
    calibrated = tables.read_table(calibrated_path) if calibrated_path.is_file() else None
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

    jobs: list[dict[str, Any]] = []
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
        x_train = np.concatenate(xs) if xs else np.zeros((0, size, size, 3), np.uint8)
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
        for k in range(params.seeds):
            seed = regime_seed(base.seed, regime, k)
            jobs.append(
                {
                    "regime": regime,
                    "k": k,
                    "file": model_file(regime, k),
                    "x": x_train,
                    "y": y_train,
                    "seed": seed,
                    "fingerprint": _fingerprint(
                        params, seed, classes, x_train, y_train, x_val, y_val
                    ),
                    "n_real": len(real_keep),
                }
            )
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
        results = _train_jobs(todo, x_val, y_val, len(classes), params)

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
                    "width": params.width,
                    "dropout": params.dropout,
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
