"""Benchmark: train the FER2013 expression recognizer and score it (a script, not a test).

    python bench/fer2013_recognizer.py                         # final recipe, reports PublicTest
    python bench/fer2013_recognizer.py --holdout 0.1 --epochs 5 --subset 10000   # a probe
    python bench/fer2013_recognizer.py --json out.json --checkpoint-dir DIR --model-out m.pt
    python bench/fer2013_recognizer.py --ensemble a.pt b.pt       # score saved models, averaged
    python bench/fer2013_recognizer.py --init a.pt --epochs 15 --lr 0.02 --model-out b.pt
                                                 # a second cosine cycle from a.pt: a snapshot

Trains `facecal.recognition` on the official Training usage (``DATA/train``) and evaluates it:

* default: on PublicTest (``DATA/publictest``) once, after the last epoch (no selection on it);
* ``--holdout F``: on a stratified, seeded fraction F of Training held out from training (for
  choosing the recipe), after every epoch.

Reports accuracy with a Wilson 95 % interval, macro-F1, per-class recall, the confusion matrix,
training wall time and images/s (training, and inference with the ``--tta`` views; on
``--holdout`` every view set is scored, to choose one there and not on PublicTest). Interrupted runs
resume from ``--checkpoint-dir`` (every ``--checkpoint-every`` steps). Never writes weights into the project:
``--model-out`` must name a path you choose (FER2013-trained weights are not to be committed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("FACECAL_TRACKING", "off")

from facecal.metrics import confusion_matrix, macro_f1, per_class_recall, wilson_interval  # noqa: E402
from facecal.recognition import fer2013  # noqa: E402
from facecal.recognition.net import NetConfig  # noqa: E402
from facecal.recognition.train import (  # noqa: E402
    TTA_MODES,
    TrainConfig,
    load_model,
    predict_proba,
    save_model,
    train,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fer2013"


def stratified_split(y: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out): ``frac`` of every class held out, drawn under ``seed``."""
    rng = np.random.default_rng(seed)
    hold = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        hold.append(rng.permutation(idx)[: round(frac * len(idx))])
    held = np.sort(np.concatenate(hold))
    return np.setdiff1d(np.arange(len(y)), held), held


def score(proba: np.ndarray, y: np.ndarray, classes: tuple[str, ...]) -> dict:
    pred = proba.argmax(1)
    cm = confusion_matrix(y.tolist(), pred.tolist(), len(classes))
    acc = wilson_interval(int((pred == y).sum()), len(y))
    recall = per_class_recall(cm)
    return {
        "n": len(y),
        "accuracy": acc.value,
        "accuracy_ci95": [acc.lo, acc.hi],
        "macro_f1": macro_f1(cm),
        "per_class_recall": {c: float(r) for c, r in zip(classes, recall)},
        "confusion": cm.tolist(),
    }


def tta_accuracies(model, x: np.ndarray, y: np.ndarray, bf16: bool) -> dict[str, float]:
    """Accuracy under every test-time view set (shift of 1–3 px), for choosing one on a held-out
    set."""

    def acc(mode: str, px: int = 0) -> float:
        proba = predict_proba(model, x, tta=mode, bf16=bf16, shift_px=px)
        return float((proba.argmax(1) == y).mean())

    res = {m: acc(m) for m in TTA_MODES if m != "shift"}
    res.update({f"shift {px}px": acc("shift", px) for px in (1, 2, 3)})
    return res


def score_ensemble(
    paths: list[Path], x: np.ndarray, y: np.ndarray, bf16: bool, tta: str, shift_px: int, out
) -> int:
    """PublicTest scores of each saved model and of their averaged probabilities."""
    probas, result = [], {}
    for path in paths:
        model, _ = load_model(path)
        probas.append(predict_proba(model, x, tta=tta, bf16=bf16, shift_px=shift_px))
        result[str(path)] = score(probas[-1], y, fer2013.CLASSES)
    if len(paths) > 1:
        result["ensemble"] = score(np.mean(probas, 0), y, fer2013.CLASSES)
    for name, r in result.items():
        lo, hi = r["accuracy_ci95"]
        print(
            f"{name}: accuracy {r['accuracy']:.4f} [{lo:.4f}, {hi:.4f}], macro-F1 {r['macro_f1']:.4f}"
        )
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main() -> int:
    d, n = TrainConfig(), NetConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument(
        "--holdout",
        type=float,
        default=0.1,
        help="hold out this part of Training, scored after every epoch (0: train on all of it)",
    )
    p.add_argument(
        "--no-publictest", action="store_true", help="probes: do not score PublicTest at all"
    )
    p.add_argument("--subset", type=int, default=0, help="train on this many faces (probes)")
    p.add_argument("--widths", type=int, nargs="+", default=list(n.widths))
    p.add_argument("--convs", type=int, default=n.convs)
    p.add_argument("--dropout", type=float, default=n.dropout)
    for name in ("epochs", "batch_size", "seed", "threads"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in (
        "lr",
        "weight_decay",
        "warmup_epochs",
        "label_smoothing",
        "max_shift",
        "max_rotation",
        "max_scale",
        "erase_p",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--balance", choices=["none", "sqrt"], default=d.balance)
    p.add_argument("--no-hflip", action="store_true")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument(
        "--tta", choices=TTA_MODES, default="mirror", help="test-time views (reported figure)"
    )
    p.add_argument("--shift-px", type=int, default=2, help="pixel shift of --tta shift")
    p.add_argument("--checkpoint-dir", type=Path, default=None)
    p.add_argument(
        "--checkpoint-every", type=int, default=50, help="also checkpoint every N steps in an epoch"
    )
    p.add_argument("--model-out", type=Path, default=None)
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="warm start from this saved model (its network; --widths/--convs/--dropout ignored)",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--cache", type=Path, default=None, help="npz cache of the decoded images")
    p.add_argument(
        "--ensemble",
        type=Path,
        nargs="+",
        default=None,
        help="train nothing: score these saved models on PublicTest, each and averaged",
    )
    a = p.parse_args()

    cfg = TrainConfig(
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        weight_decay=a.weight_decay,
        warmup_epochs=a.warmup_epochs,
        label_smoothing=a.label_smoothing,
        balance=a.balance,
        hflip=not a.no_hflip,
        max_shift=a.max_shift,
        max_rotation=a.max_rotation,
        max_scale=a.max_scale,
        erase_p=a.erase_p,
        seed=a.seed,
        threads=a.threads,
        bf16=not a.fp32,
    )
    net = NetConfig(len(fer2013.CLASSES), tuple(a.widths), a.convs, a.dropout)
    init, init_name = None, None if a.init is None else str(a.init)
    if a.init is not None:
        init_model, info = load_model(a.init)
        if info.get("classes") != list(fer2013.CLASSES):
            print(
                f"{a.init}: not a FER2013 recognizer (classes {info.get('classes')})",
                file=sys.stderr,
            )
            return 2
        net, init = init_model.config, init_model.state_dict()

    t = time.perf_counter()
    if a.cache is not None and a.cache.is_file():
        z = np.load(a.cache)
        xtr, ytr, xpt, ypt = z["xtr"], z["ytr"], z["xpt"], z["ypt"]
    else:
        tr = fer2013.read_folder(a.data / "train")
        pt = fer2013.read_folder(a.data / "publictest")
        xtr, ytr, xpt, ypt = tr.images, tr.labels, pt.images, pt.labels
        if a.cache is not None:
            np.savez(a.cache, xtr=xtr, ytr=ytr, xpt=xpt, ypt=ypt)
    load_s = time.perf_counter() - t
    print(
        f"loaded {len(ytr)} Training, {len(ypt)} PublicTest faces in {load_s:.1f} s",
        file=sys.stderr,
    )

    if a.ensemble:
        return score_ensemble(a.ensemble, xpt, ypt, not a.fp32, a.tta, a.shift_px, a.json)
    tr_idx = np.arange(len(ytr))
    if a.holdout > 0:
        tr_idx, ho_idx = stratified_split(ytr, a.holdout, 12345)
    if a.subset:
        tr_idx = np.sort(np.random.default_rng(a.seed).permutation(tr_idx)[: a.subset])
    x, y = xtr[tr_idx], ytr[tr_idx]

    def per_epoch(model) -> dict[str, float]:
        pr = predict_proba(model, xtr[ho_idx], bf16=cfg.bf16)
        return {"holdout_accuracy": float((pr.argmax(1) == ytr[ho_idx]).mean())}

    res = train(
        x,
        y,
        net,
        cfg,
        checkpoint_dir=a.checkpoint_dir,
        checkpoint_every=a.checkpoint_every,
        evaluate=per_epoch if a.holdout > 0 else None,
        init=init,
    )
    out: dict = {
        "n_train": len(y),
        "holdout": a.holdout,
        "net": net.to_dict(),
        "init": init_name,
        "train": cfg.to_dict(),
        "params": sum(p.numel() for p in res.model.parameters()),
        "load_seconds": load_s,
        "train_seconds_this_call": res.seconds,
        "train_images_per_s": res.images_per_s,
        "history": res.history,
        "threads": cfg.threads,
        "cpu": platform.processor() or platform.machine(),
        "nproc": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
    }
    sets = {}
    if a.holdout > 0:
        sets["holdout"] = (xtr[ho_idx], ytr[ho_idx])
    if not a.no_publictest:
        sets["publictest"] = (xpt, ypt)
    for name, (xe, ye) in sets.items():
        t = time.perf_counter()
        proba = predict_proba(res.model, xe, tta=a.tta, bf16=cfg.bf16, shift_px=a.shift_px)
        infer_s = time.perf_counter() - t
        r = score(proba, ye, fer2013.CLASSES)
        r["tta"] = a.tta
        r["infer_images_per_s_tta"] = len(ye) / infer_s
        if name == "holdout":  # the other view sets, to choose --tta on held-out faces only
            r["accuracy_by_tta"] = tta_accuracies(res.model, xe, ye, cfg.bf16)
        out[name] = r
        print(
            f"{name}: accuracy {r['accuracy']:.4f} [{r['accuracy_ci95'][0]:.4f}, "
            f"{r['accuracy_ci95'][1]:.4f}] (n={r['n']}), macro-F1 {r['macro_f1']:.4f}; "
            f"inference {r['infer_images_per_s_tta']:.0f} img/s ({a.tta} TTA)"
        )
        if "accuracy_by_tta" in r:
            print("  by TTA: " + ", ".join(f"{m} {v:.4f}" for m, v in r["accuracy_by_tta"].items()))
        print("  recall: " + ", ".join(f"{c} {v:.3f}" for c, v in r["per_class_recall"].items()))
    print(
        f"train: {len(y)} faces, {len(res.history)} epochs, {res.seconds:.0f} s in this call "
        f"({res.images_per_s:.0f} img/s, {cfg.threads} threads)"
    )
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    if a.model_out is not None:
        save_model(
            res.model,
            {
                "classes": list(fer2013.CLASSES),
                "recipe": cfg.to_dict(),
                "init": init_name,
            },
            a.model_out,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
