"""A reusable training loop for `ExpressionNet` on uint8 faces held in memory.

* Deterministic under ``TrainConfig.seed``: the shuffling and augmentation of epoch ``e`` draw
  from a generator seeded with ``(seed, e)``, dropout from torch's global generator, whose state
  is checkpointed; the thread count is fixed by ``TrainConfig.threads`` (never derived from the
  machine's load), because a reduction split differently over threads sums in another order.
* Resumable: after every epoch the model, optimiser, schedule, generator state and history are
  written atomically to ``checkpoint_dir/last.pt``; `train` started again with the same config
  and data continues from there and ends with the same weights as an uninterrupted run. A
  checkpoint of another config or data set is refused, not silently continued.
* Augmentation runs on the batch as one affine resampling (shift, scale, rotation, horizontal
  flip) plus optional random erasing — cheap next to the convolutions.
* ``bf16`` runs forward/backward under CPU bfloat16 autocast (weights and optimiser stay fp32):
  on CPUs with AMX/AVX-512-bf16 it is several times faster than fp32 at equal accuracy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from facecal.errors import FacecalError
from facecal.recognition.net import ExpressionNet, NetConfig, preprocess


class TrainError(FacecalError):
    """Unusable training data or a checkpoint that belongs to another run."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05  # peak learning rate (SGD, Nesterov momentum)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to 0
    label_smoothing: float = 0.1
    # Class balance: "none" (plain cross-entropy) or "sqrt" (class weights ∝ 1/√frequency).
    balance: Literal["none", "sqrt"] = "none"
    # Augmentation (per image, uniform in ±range).
    hflip: bool = True
    max_shift: float = 0.1  # fraction of the image side
    max_rotation: float = 10.0  # degrees
    max_scale: float = 0.1  # zoom factor 1 ± max_scale
    erase_p: float = 0.0  # probability of erasing one random rectangle (up to a quarter side²)
    seed: int = 0
    threads: int = 2
    bf16: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    model: ExpressionNet
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the epochs run by this call (not resumed ones)
    images_per_s: float = 0.0  # training throughput of this call


def _fingerprint(
    net: NetConfig,
    cfg: TrainConfig,
    x: np.ndarray,
    y: np.ndarray,
    init: dict[str, torch.Tensor] | None = None,
) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"net": net.to_dict(), "train": cfg.to_dict()}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(y).astype(np.int64).tobytes())
    for name, t in sorted((init or {}).items()):  # a warm start is part of what the run is
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random shift/scale/rotation/flip of an N×1×H×W batch in one resampling (borders
    replicated), then optional random erasing (set to 0, the mid grey)."""
    n = x.shape[0]

    def u(lim: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen) * 2 - 1) * lim

    ang = u(math.radians(cfg.max_rotation))
    scale = 1 + u(cfg.max_scale)
    tx, ty = u(2 * cfg.max_shift), u(2 * cfg.max_shift)  # grid units: the side spans 2
    flip = (torch.rand(n, generator=gen) < 0.5) if cfg.hflip else torch.zeros(n, dtype=torch.bool)
    sx = torch.where(flip, -1.0, 1.0)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [torch.stack([cos * sx, -sin, tx], 1), torch.stack([sin * sx, cos, ty], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cfg.erase_p > 0:
        h, w = x.shape[2], x.shape[3]
        do = torch.rand(n, generator=gen) < cfg.erase_p
        eh = (torch.rand(n, generator=gen) * (h // 2 - 4) + 4).long()
        ew = (torch.rand(n, generator=gen) * (w // 2 - 4) + 4).long()
        y0 = (torch.rand(n, generator=gen) * (h - eh)).long()
        x0 = (torch.rand(n, generator=gen) * (w - ew)).long()
        rows = torch.arange(h).view(1, h, 1)
        cols = torch.arange(w).view(1, 1, w)
        mask = (
            (rows >= y0.view(n, 1, 1))
            & (rows < (y0 + eh).view(n, 1, 1))
            & (cols >= x0.view(n, 1, 1))
            & (cols < (x0 + ew).view(n, 1, 1))
            & do.view(n, 1, 1)
        )
        out = out.masked_fill(mask.unsqueeze(1), 0.0)
    return out


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


def class_weights(y: np.ndarray, n_classes: int, balance: str) -> torch.Tensor | None:
    if balance == "none":
        return None
    if balance != "sqrt":
        raise TrainError(f"balance: unknown value {balance!r} (none | sqrt)")
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 0.0)
    w = w / (w * counts).sum() * counts.sum()  # mean weight per sample stays 1
    return torch.tensor(w, dtype=torch.float32)


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    x: np.ndarray,
    y: np.ndarray,
    net_config: NetConfig,
    cfg: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    evaluate: Callable[[ExpressionNet], dict[str, float]] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    checkpoint_every: int = 0,
    stop_after_steps: int | None = None,
    init: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train a new `ExpressionNet` on uint8 faces ``x`` (N×48×48 grey or RGB) with labels ``y``.

    ``evaluate(model) -> metrics`` (model in eval mode) is called after every epoch and its
    metrics join the history. The checkpoint is written after every epoch and, with
    ``checkpoint_every`` = k > 0, also every k steps inside an epoch (an epoch is long on a
    shared 2-core machine; resuming mid-epoch gives the same weights too). ``stop_after``
    (epochs) and ``stop_after_steps`` (optimizer steps, counted from the start of training)
    end the call early — an interruption, for tests and time-sliced runs; calling again
    resumes from the last checkpoint. ``init`` (a state dict of the same `NetConfig`) is a warm
    start: training begins from those weights with a fresh optimiser and schedule — a second
    cosine cycle from a trained model is a snapshot for an ensemble (Huang et al. 2017)."""
    if len(x) != len(y) or len(x) < 2:
        raise TrainError(f"need ≥ 2 faces with one label each, got {len(x)} faces, {len(y)} labels")
    y = np.asarray(y, np.int64)
    if y.min() < 0 or y.max() >= net_config.n_classes:
        raise TrainError(f"labels must be in 0…{net_config.n_classes - 1}, got {y.min()}…{y.max()}")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(
            x,
            y,
            net_config,
            cfg,
            checkpoint_dir,
            evaluate,
            stop_after,
            progress,
            checkpoint_every,
            stop_after_steps,
            init,
        )
    finally:
        torch.set_num_threads(prev_threads)


def _train(
    x: np.ndarray,
    y: np.ndarray,
    net_config: NetConfig,
    cfg: TrainConfig,
    checkpoint_dir: str | Path | None,
    evaluate: Callable[[ExpressionNet], dict[str, float]] | None,
    stop_after: int | None,
    progress: bool,
    checkpoint_every: int,
    stop_after_steps: int | None,
    init: dict[str, torch.Tensor] | None,
) -> TrainResult:
    torch.manual_seed(cfg.seed)
    model = ExpressionNet(net_config).to(memory_format=torch.channels_last)
    if init is not None:
        try:
            model.load_state_dict(init)
        except RuntimeError as e:
            raise TrainError(f"init: weights of another network than {net_config}: {e}") from None
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    xt = preprocess(x)
    yt = torch.from_numpy(y)
    weight = class_weights(y, net_config.n_classes, cfg.balance)
    n = len(yt)
    steps_per_epoch = n // cfg.batch_size if n >= cfg.batch_size else 1
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch))
    fingerprint = _fingerprint(net_config, cfg, x, y, init)

    start_epoch, start_step, history = 0, 0, []
    partial: dict[str, Any] = {}  # the in-epoch state of a mid-epoch checkpoint
    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    if ckpt_path is not None and ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=False)
        if state.get("fingerprint") != fingerprint:
            raise TrainError(
                f"{ckpt_path}: checkpoint of another config or data set "
                f"(fingerprint {state.get('fingerprint')}, this run {fingerprint}); "
                "remove it or use another checkpoint folder"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        start_step = int(state.get("step", 0))  # steps done inside epoch start_epoch + 1
        partial = state.get("partial", {})
        if progress:
            where = f", step {start_step}" if start_step else ""
            print(f"resuming from {ckpt_path} after epoch {start_epoch}{where}", file=sys.stderr)

    def checkpoint(epoch_done: int, step: int, extra: dict[str, Any]) -> None:
        if ckpt_path is None:
            return
        _save_atomic(
            {
                "fingerprint": fingerprint,
                "epoch": epoch_done,
                "step": step,
                "partial": extra,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(),
                "history": history,
                "net": net_config.to_dict(),
                "train": cfg.to_dict(),
            },
            ckpt_path,
        )

    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    t0, seen = time.perf_counter(), 0
    for epoch in range(start_epoch, end_epoch):
        model.train()
        gen = _epoch_generator(cfg.seed, epoch)
        order = torch.randperm(n, generator=gen)
        first, loss_sum, correct, count = 0, 0.0, 0, 0
        if start_step and epoch == start_epoch:
            # Continue the epoch where the checkpoint left it: same order, same generator state.
            first = start_step
            gen.set_state(partial["gen"])
            loss_sum, correct, count = partial["loss_sum"], partial["correct"], partial["count"]
        bar = tqdm(
            range(first, steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            file=sys.stderr,
            disable=not progress,
            leave=False,
            mininterval=5.0,
        )
        for i in bar:
            step = epoch * steps_per_epoch + i
            if stop_after_steps is not None and step >= stop_after_steps:
                break
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, warmup, cfg.lr)
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb = augment(xt[idx], cfg, gen).contiguous(memory_format=torch.channels_last)
            yb = yt[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(xb)
            loss = F.cross_entropy(
                logits.float(), yb, weight=weight, label_smoothing=cfg.label_smoothing
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(yb)
            correct += int((logits.detach().argmax(1) == yb).sum())
            count += len(yb)
            seen += len(yb)
            if i % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}")
            if checkpoint_every > 0 and (i + 1) % checkpoint_every == 0 and i + 1 < steps_per_epoch:
                extra = {"gen": gen.get_state(), "loss_sum": loss_sum, "correct": correct}
                checkpoint(epoch, i + 1, {**extra, "count": count})
        if stop_after_steps is not None and (epoch + 1) * steps_per_epoch > stop_after_steps:
            break
        row: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / count,
            "train_accuracy": correct / count,
            "lr": opt.param_groups[0]["lr"],
        }
        if evaluate is not None:
            model.eval()
            row.update(evaluate(model))
        history.append(row)
        if progress:
            print(json.dumps({k: round(v, 4) for k, v in row.items()}), file=sys.stderr)
        checkpoint(epoch + 1, 0, {})
    seconds = time.perf_counter() - t0
    model.eval()
    return TrainResult(model, history, seconds, seen / seconds if seconds > 0 else 0.0)


TTA_MODES = ("none", "mirror", "shift")


def tta_views(xb: torch.Tensor, mode: str, shift_px: int = 2) -> list[torch.Tensor]:
    """The views of an N×1×H×W batch that ``predict_proba`` averages over: ``none`` the batch,
    ``mirror`` it and its mirror image (expressions are left-right symmetric; the net was trained
    with flips), ``shift`` each of those also moved ``shift_px`` pixels up, down, left and right
    (borders replicated, as in training) — the ten-crop of the FER2013 literature, at full size."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {mode!r}")
    base = [xb] if mode == "none" else [xb, torch.flip(xb, dims=[3])]
    if mode != "shift" or shift_px <= 0:
        return base
    d = shift_px
    h, w = xb.shape[2], xb.shape[3]
    views = []
    for v in base:
        padded = F.pad(v, (d, d, d, d), mode="replicate")
        views.append(v)
        for dy, dx in ((-d, 0), (d, 0), (0, -d), (0, d)):
            views.append(padded[:, :, d + dy : d + dy + h, d + dx : d + dx + w])
    return views


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    x: np.ndarray,
    batch_size: int = 512,
    tta: bool | str = True,
    bf16: bool = True,
    shift_px: int = 2,
) -> np.ndarray:
    """Class probabilities N×C for uint8 faces: the mean softmax over `tta_views` (``True`` is
    ``"mirror"``, ``False`` is ``"none"``)."""
    mode = ("mirror" if tta else "none") if isinstance(tta, bool) else tta
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = preprocess(x[i : i + batch_size])
        probs = []
        for v in tta_views(xb, mode, shift_px):
            v = v.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                probs.append(torch.softmax(model(v).float(), 1))
        out.append(torch.stack(probs).mean(0).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def save_model(model: ExpressionNet, meta: dict[str, Any], path: str | Path) -> None:
    """Weights (``torch.save`` of the state dict, loadable with ``weights_only=True``) plus a
    ``.json`` beside them with the `NetConfig` and whatever ``meta`` adds (classes, recipe)."""
    path = Path(path)
    _save_atomic(model.state_dict(), path)
    info = {"net": model.config.to_dict(), "input": "grey 48×48, uint8/127.5 − 1", **meta}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path.with_suffix(".json"))


def load_model(path: str | Path) -> tuple[ExpressionNet, dict[str, Any]]:
    path = Path(path)
    info = json.loads(path.with_suffix(".json").read_text())
    model = ExpressionNet(NetConfig.from_dict(info["net"]))
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval(), info
