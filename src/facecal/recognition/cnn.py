"""The pipeline's expression CNN: network, weight files, prediction, the train_cnn model index.

What train_cnn writes and every consumer (evaluate, export_cnn, classify) loads; the pipeline's
recognizer (issue 15) builds on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facecal.config import from_dict, read_params
from facecal.emotions import EMOTIONS
from facecal.errors import FacecalError
from facecal.jsonio import write_json
from facecal.recognition.net import INPUT_SIZE, LUMA, ExpressionNet, NetConfig

# The training regimes of train_cnn (cnn.regimes), in the order they are reported.
REGIMES = ("real_all", "real_low", "gen_uncalibrated", "gen_calibrated", "real_low+gen_calibrated")


class ClassifierError(FacecalError):
    """Bad classifier inputs: missing tables, unknown regimes, empty training sets."""


@dataclass
class BaseParams:
    """The `base` section fields the classifier uses."""

    seed: int = 0
    image_size: int = 64
    emotions: list[str] = field(default_factory=lambda: list(EMOTIONS[1:]))


def load_base(path: str | Path | None = None) -> BaseParams:
    raw = read_params(path).get("base") or {}
    return from_dict(
        BaseParams,
        {k: raw[k] for k in ("seed", "image_size", "emotions") if k in raw},
        where="base",
    )


class ExpressionCNN(nn.Module):
    """A 5×5 stride-2 stem, three conv–BN–ReLU–maxpool blocks (2w, 4w, 8w channels), then a
    *spatial* head: the 8w × (S/16)² map is flattened into a 128-d embedding (the penultimate
    features of the evaluation's Fréchet distance) and a linear classifier.

    Faces are aligned crops, so *where* a feature fires (brow vs mouth corner) carries the
    expression; global average pooling would throw that away. The stem halves the resolution
    first because full-resolution layers dominate CPU time. ~360 k weights at width 16, 64²."""

    def __init__(
        self,
        n_classes: int,
        width: int = 16,
        dropout: float = 0.3,
        image_size: int = 64,
        hidden: int = 128,
    ):
        super().__init__()
        if image_size % 16:
            raise ClassifierError(f"image size must be a multiple of 16, got {image_size}")
        layers: list[nn.Module] = [
            nn.Conv2d(3, width, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        chans = [width, width * 2, width * 4, width * 8]
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.body = nn.Sequential(*layers)
        side = image_size // 16
        self.embed = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(chans[-1] * side * side, hidden),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_classes)
        self.feature_dim = hidden

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 128): the space of the evaluation's Fréchet distance."""
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


class GreyVGG(nn.Module):
    """`recognition.net.ExpressionNet` (the FER2013 recognizer's VGG-style network) behind the
    pipeline's input contract: N×3×S×S in [−1, 1] → grey (ITU-R 601 luma, as PIL's
    ``convert("L")``) → 48×48 bilinear → the network. Evaluate, export_cnn, classify and serve
    then need nothing new, and a recognizer trained on a large real set can initialise it
    (`cnn.init`). Penultimate features: the pooled ``widths[-1]`` vector."""

    luma: torch.Tensor

    def __init__(self, n_classes: int, config: NetConfig | None = None):
        super().__init__()
        base = config or NetConfig()
        self.net = ExpressionNet(NetConfig(n_classes, base.widths, base.convs, base.dropout))
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)
        self.head = self.net.fc
        self.feature_dim = self.net.config.widths[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        grey = (x * self.luma).sum(1, keepdim=True)  # luma weights sum to 1: [−1, 1] stays
        if grey.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            grey = F.interpolate(
                grey, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False
            )
        return self.net.embed(grey)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net.dropout(self.features(x)))


ARCHS = ("compact", "vgg")
Classifier = ExpressionCNN | GreyVGG


def build_classifier(
    arch: str,
    n_classes: int,
    image_size: int,
    width: int = 16,
    dropout: float = 0.3,
    net: dict[str, Any] | None = None,
) -> Classifier:
    """A fresh network of `cnn.arch` (`compact`: `ExpressionCNN`; `vgg`: `GreyVGG`, `net` =
    its `NetConfig` fields)."""
    if arch == "compact":
        return ExpressionCNN(n_classes, width, dropout, image_size)
    if arch == "vgg":
        cfg = NetConfig.from_dict({"n_classes": n_classes, **(net or NetConfig().to_dict())})
        return GreyVGG(n_classes, cfg)
    raise ClassifierError(f"cnn.arch: unknown architecture {arch!r}; known: {list(ARCHS)}")


def init_from_recognizer(model: GreyVGG, path: str | Path, classes: list[str]) -> dict[str, Any]:
    """Load weights trained elsewhere into `model`: every layer, and the rows of the classifier
    layer of the classes both know (by emotion name; others keep their fresh initialisation).
    `path` is either a recognizer (`recognition.train.save_model`, e.g.
    ``bench/fer2013_recognizer.py --model-out``) or a pipeline classifier of ``arch: vgg``
    (train_cnn's ``<regime>.pt``, or the weights registered with ``facecal-classifier``).
    Returns the classes matched."""
    from facecal.emotions import UnknownEmotion, normalize_emotion

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise ClassifierError(f"cnn.init: {path}: recognizer weights or its .json not found")
    info = json.loads(meta_path.read_text())
    pipeline = "arch" in info  # save_classifier's metadata; recognizers have none
    if pipeline and info["arch"] != "vgg":
        raise ClassifierError(
            f"cnn.init: {path}: a cnn.arch {info['arch']!r} classifier; only vgg weights can "
            "initialise cnn.arch vgg"
        )
    try:
        fields = info["net"] if not pipeline else {**info["net"], "dropout": info["dropout"]}
        net = NetConfig.from_dict({**fields, "n_classes": len(info["classes"])})
        state = torch.load(path, map_location="cpu", weights_only=True)
        if pipeline:  # GreyVGG's keys: net.* (head.* is the same layer as net.fc)
            state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    except Exception as e:  # a foreign or truncated file: torch and json raise many types
        raise ClassifierError(f"cnn.init: {path}: not a facecal recognizer: {e}") from e
    if (net.widths, net.convs) != (model.net.config.widths, model.net.config.convs):
        raise ClassifierError(
            f"cnn.init: {path}: network {net.widths}×{net.convs} differs from cnn.vgg "
            f"{model.net.config.widths}×{model.net.config.convs}"
        )
    theirs = {}
    for i, name in enumerate(info["classes"]):
        try:
            theirs[normalize_emotion(name)] = i
        except UnknownEmotion:
            continue
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    loaded = model.net.load_state_dict(body, strict=False)
    missing = [k for k in loaded.missing_keys if not k.startswith("fc.")]
    if missing or loaded.unexpected_keys:
        raise ClassifierError(
            f"cnn.init: {path}: layers do not match (missing {missing[:3]}, unexpected "
            f"{loaded.unexpected_keys[:3]})"
        )
    matched = [c for c in classes if c in theirs]
    with torch.no_grad():
        for j, c in enumerate(classes):
            if c in theirs:
                model.net.fc.weight[j] = state["fc.weight"][theirs[c]]
                model.net.fc.bias[j] = state["fc.bias"][theirs[c]]
    return {
        "classes_matched": matched,
    }


def to_input(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [−1, 1], the network's input scale."""
    t = (
        torch.as_tensor(np.asarray(images_u8))
        if not isinstance(images_u8, torch.Tensor)
        else images_u8
    )
    return t.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def save_classifier(model: Classifier, meta: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(path)
    write_json(path.with_suffix(".json"), meta)


def classifier_hash(model, meta: dict[str, Any]) -> str:
    """What the network computes: its architecture fields and every tensor."""
    h = hashlib.sha256()
    arch = {k: meta.get(k) for k in ("classes", "image_size", "width", "dropout", "mirror")}
    h.update(json.dumps(arch, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    return h.hexdigest()[:16]


def load_classifier(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """A trained classifier (eval mode) and its metadata (`classes`, `image_size`, …)."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise ClassifierError(
            f"{path}: classifier weights or its .json not found (run `facecal train-cnn`)"
        )
    meta = json.loads(meta_path.read_text())
    model = build_classifier(
        meta.get("arch", "compact"),
        len(meta["classes"]),
        meta["image_size"],
        meta.get("width", 16),
        meta.get("dropout", 0.3),
        meta.get("net"),
    )
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # truncated/foreign file: torch raises many types
        raise ClassifierError(f"{path}: cannot load classifier weights: {e}") from e
    model.eval()
    return model, meta


@torch.no_grad()
def predict(
    model: Classifier, images_u8: np.ndarray, batch_size: int = 256, mirror: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(class index (N,), penultimate features (N, D)) for uint8 (N, H, W, 3) faces.
    `mirror`: average the logits of each face and its mirror image (models trained with
    hflip; their metadata says so)."""
    model.eval()
    preds, feats = [], []
    for i in range(0, len(images_u8), batch_size):
        x = to_input(images_u8[i : i + batch_size])
        f = model.features(x)
        logits = model.head(f)
        if mirror:
            logits = (logits + model(x.flip(-1))) / 2
        preds.append(logits.argmax(1))
        feats.append(f)
    if not preds:
        return np.zeros(0, np.int64), np.zeros((0, model.feature_dim), np.float32)
    return torch.cat(preds).numpy(), torch.cat(feats).numpy()


def model_file(regime: str, k: int = 0) -> str:
    """File of training `k` of a regime in outputs/cnn (k = 0: ``<regime>.pt``)."""
    return f"{regime}.pt" if k == 0 else f"{regime}.s{k}.pt"


MODELS_INDEX = "models.json"


def trained_models(cnn_dir: Path) -> dict[str, Any]:
    """``{"regimes": {regime: [file, …] (one per seed)}, "skipped": {regime: reason}}`` of a
    train_cnn output folder (its models.json; a folder without one: the ``<regime>.pt`` files)."""
    index = cnn_dir / MODELS_INDEX
    if index.is_file():
        try:
            data = json.loads(index.read_text())
            return {"regimes": dict(data["regimes"]), "skipped": dict(data.get("skipped", {}))}
        except (ValueError, KeyError, TypeError) as e:
            raise ClassifierError(f"{index}: not a train_cnn models index ({e})") from e
    found = {r: [model_file(r)] for r in REGIMES if (cnn_dir / model_file(r)).is_file()}
    return {"regimes": found, "skipped": {}}
