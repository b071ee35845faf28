"""Training of the pipeline's expression CNN: the `cnn` params, augmentation, `train_one`.

What train_cnn runs per regime and seed, and what the k-fold protocol of `facecal evaluate` runs
per fold — one definition, so a fold's model is trained exactly as the stage's are.
"""

from __future__ import annotations

import hashlib
import math
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from facecal.errors import FacecalError
from facecal.recognition.cnn import (
    ARCHS,
    REGIMES,
    Classifier,
    ClassifierError,
    GreyVGG,
    build_classifier,
    init_from_recognizer,
    to_input,
)


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
    # Network: compact (ExpressionCNN, RGB at base.image_size) or vgg (recognition.net's
    # VGG-style recognizer on grey 48×48, widths/convs below) — the one `init` can start from.
    arch: Literal["compact", "vgg"] = "compact"
    vgg_widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    vgg_convs: int = 2
    # scratch; a recognizer file trained on a large real set (bench/fer2013_recognizer.py
    # --model-out), a vgg classifier of train_cnn (<regime>.pt), or a registered one
    # (models:/facecal-classifier@champion or …/<version>): fine-tune from its weights (needs
    # arch vgg with the same widths/convs).
    init: str = "scratch"

    def __post_init__(self):
        unknown = [r for r in self.regimes if r not in REGIMES]
        if unknown:
            raise ClassifierError(
                f"cnn.regimes: unknown regime(s) {unknown}; known: {list(REGIMES)}"
            )
        if not self.regimes:
            raise ClassifierError("cnn.regimes: empty")
        if self.arch not in ARCHS:
            raise ClassifierError(f"cnn.arch: {self.arch!r} is not one of {list(ARCHS)}")
        if self.init != "scratch" and self.arch != "vgg":
            raise ClassifierError(f"cnn.init: {self.init!r} needs cnn.arch: vgg")
        for name in ("epochs", "batch_size", "patience", "width", "seeds"):
            if getattr(self, name) < 1:
                raise ClassifierError(f"cnn.{name}: must be ≥ 1, got {getattr(self, name)}")


def net_meta(params: CnnParams) -> dict[str, Any]:
    """What rebuilds the network (`recognition.cnn.load_classifier` reads it back)."""
    meta: dict[str, Any] = {"arch": params.arch, "width": params.width, "dropout": params.dropout}
    if params.arch == "vgg":
        meta["net"] = {
            "widths": list(params.vgg_widths),
            "convs": params.vgg_convs,
            "dropout": params.dropout,
        }
    return meta


def build_model(
    params: CnnParams, n_classes: int, image_size: int, classes: list[str] | None = None
) -> Classifier:
    """A network of `params.arch`, initialised from `params.init` unless scratch."""
    m = net_meta(params)
    model = build_classifier(
        m["arch"], n_classes, image_size, m["width"], m["dropout"], m.get("net")
    )
    if params.init != "scratch":
        if classes is None or not isinstance(model, GreyVGG):
            raise ClassifierError("cnn.init: needs cnn.arch vgg and the class names")
        init_from_recognizer(model, init_path(params.init), classes)
    return model


# models:/ URI → (local weights, version), resolved once per process: every training of a
# stage then starts from the same weights even if the alias moves meanwhile.
_RESOLVED: dict[str, tuple[Path, str]] = {}


def resolve_init(init: str) -> tuple[Path, str | None]:
    """The local weights file `cnn.init` names and, for a ``models:/`` URI, the registry
    version: the torch weights registered with that classifier version (downloaded once,
    sha256-checked)."""
    if not init.startswith("models:/"):
        return Path(init), None
    if init not in _RESOLVED:
        from facecal.registry_common import registered_classifier_weights

        try:
            _RESOLVED[init] = registered_classifier_weights(init)
        except FacecalError as e:
            raise ClassifierError(f"cnn.init: {e}") from None
    return _RESOLVED[init]


def init_path(init: str) -> Path:
    return resolve_init(init)[0]


def check_init(params: CnnParams, classes: list[str], image_size: int) -> dict[str, Any] | None:
    """What `params.init` loads (file, its sha256, classes matched), or None for scratch —
    read and hashed once here; each training then only loads the weights."""
    if params.init == "scratch":
        return None
    model = build_classifier("vgg", len(classes), image_size, net=net_meta(params)["net"])
    assert isinstance(model, GreyVGG)
    path, version = resolve_init(params.init)
    loaded = init_from_recognizer(model, path, classes)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    registry = {"registry_version": version} if version else {}
    return {"file": params.init, "sha256": sha, **registry, **loaded}


def logits_of(model: Classifier, x: torch.Tensor, mirror: bool) -> torch.Tensor:
    """Logits, averaged with those of the mirrored faces when the model was trained with
    mirroring (a free variance reduction for a small model)."""
    out = model(x)
    return (out + model(x.flip(-1))) / 2 if mirror else out


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
    model: Classifier
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
    classes: list[str] | None = None,
) -> TrainResult:
    """Train from scratch or `params.init` (which needs the class names, `classes`); keep the
    weights of the best val epoch (accuracy, then loss)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    # channels_last: ~30 % faster convolutions on CPU (oneDNN), same numbers.
    model = build_model(params, n_classes, x_train.shape[1], classes).to(
        memory_format=torch.channels_last
    )
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    # Cosine decay over the epoch budget: converges in fewer epochs than a constant rate.
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=params.epochs)
        if params.schedule == "cosine"
        else None
    )
    # uint8 in memory, scaled per batch: a float copy of FER2013's 51.6 k-face regime would
    # be 2.5 GB per process.
    xu, yt = torch.as_tensor(np.asarray(x_train)), torch.as_tensor(y_train, dtype=torch.long)
    weight = None
    if params.balance:
        # Inverse-frequency class weights: a dataset with one neutral face per subject and
        # several per emotion would otherwise teach the network never to say "neutral".
        counts = torch.bincount(yt, minlength=n_classes).float()
        weight = torch.where(
            counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), torch.zeros(())
        )
    xv_u8, yv = torch.as_tensor(np.asarray(x_val)), torch.as_tensor(y_val, dtype=torch.long)
    best = (-1.0, math.inf)
    best_state, best_epoch, since_best, curve = None, 0, 0, []
    bar = tqdm(
        range(1, params.epochs + 1), desc=desc, file=sys.stderr, leave=False, disable=desc is None
    )
    epoch = 0
    for epoch in bar:
        model.train()
        order = torch.randperm(len(xu), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(order), params.batch_size):
            idx = order[i : i + params.batch_size]
            if len(idx) < 2:  # batch norm needs two samples; the remainder joins next epoch
                continue
            xb = to_input(xu[idx]).contiguous()
            xb = augment(xb, params, gen) if params.augment else xb
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
                    [
                        logits_of(model, to_input(xv_u8[i : i + 256]).contiguous(), params.hflip)
                        for i in range(0, len(xv_u8), 256)
                    ]
                )
                if len(xv_u8)
                else torch.zeros(0, n_classes)
            )
            val_loss = float(F.cross_entropy(logits, yv)) if len(yv) else math.nan
            val_acc = float((logits.argmax(1) == yv).float().mean()) if len(yv) else math.nan
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
