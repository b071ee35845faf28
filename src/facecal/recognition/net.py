"""The expression recognizer's network: a VGG-style CNN for 48×48 grey faces.

Input contract (`preprocess` implements it; use it rather than re-deriving it):

* grey, 1 channel, 48×48 pixels — FER2013's own format. RGB input is converted to grey with
  ITU-R 601 luma (the weights PIL's ``convert("L")`` uses), so RGB crops from the pipeline give
  the same values as grey files of the same picture;
* float32 N×1×48×48, ``uint8 / 127.5 − 1`` (so [−1, 1]), the same scaling as `classifier.py`;
* output: N×``n_classes`` logits (softmax for probabilities), classes in the order the model was
  trained with (for FER2013: `fer2013.CLASSES`).

Architecture: ``len(widths)`` stages of ``convs`` 3×3 conv → BatchNorm → ReLU, each stage closed by
2×2 max-pooling (48 → 24 → 12 → 6 → 3), then global average pooling, dropout and one linear layer.
Widths are multiples of 32 on purpose: oneDNN's bf16 (AMX) kernels run channels-last convolutions
with such widths several times faster than fp32 on CPU, while odd widths fall off the fast path
(measured: widths 48/96/… were slower in bf16 than in fp32).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

INPUT_SIZE = 48
# ITU-R 601-2 luma, the transform PIL's convert("L") applies.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class NetConfig:
    """Everything needed to rebuild the network (stored with its weights)."""

    n_classes: int = 7
    widths: tuple[int, ...] = (32, 64, 128, 256)
    convs: int = 2
    dropout: float = 0.3

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NetConfig:
        return cls(
            n_classes=int(d["n_classes"]),
            widths=tuple(int(w) for w in d["widths"]),
            convs=int(d["convs"]),
            dropout=float(d["dropout"]),
        )


class ExpressionNet(nn.Module):
    def __init__(self, config: NetConfig | None = None):
        super().__init__()
        self.config = config or NetConfig()
        c = self.config
        if c.n_classes < 2 or not c.widths or c.convs < 1 or not 0.0 <= c.dropout < 1.0:
            raise ValueError(f"invalid NetConfig {c}")
        layers: list[nn.Module] = []
        cin = 1
        for w in c.widths:
            for _ in range(c.convs):
                # No conv bias: BatchNorm's shift replaces it.
                layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)]
                layers.append(nn.ReLU(inplace=True))
                cin = w
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(c.dropout)
        self.fc = nn.Linear(cin, c.n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature vector (N × widths[-1]) the classifier layer reads."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected N×1×H×W grey input, got shape {tuple(x.shape)}")
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.embed(x)))


def to_grey(images: np.ndarray) -> np.ndarray:
    """N×H×W (grey) or N×H×W×3 (RGB) uint8 → N×H×W uint8 grey."""
    if images.ndim == 3:
        return images
    if images.ndim == 4 and images.shape[-1] == 3:
        grey = images.astype(np.float32) @ LUMA
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    raise ValueError(f"expected N×H×W or N×H×W×3 images, got shape {images.shape}")


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 faces (N×48×48 grey or N×48×48×3 RGB) → float32 N×1×48×48 in [−1, 1]."""
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    grey = to_grey(images)
    if grey.shape[1:] != (INPUT_SIZE, INPUT_SIZE):
        raise ValueError(
            f"expected {INPUT_SIZE}×{INPUT_SIZE} faces, got {grey.shape[2]}×{grey.shape[1]}"
        )
    return torch.from_numpy(grey).unsqueeze(1).float() / 127.5 - 1.0
