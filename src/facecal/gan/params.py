"""The `gan` section of params.yaml as dataclasses: what a training run computes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# The original's fixed 3×3 gate matrix (reference/upstream-calibration/popt_low.txt).
UPSTREAM_P = [0.39223, 0.70605, 0.046171, 0.65548, 0.031833, 0.097132, 0.17119, 0.27692, 0.82346]


@dataclass
class Pix2PixParams:
    ngf: int = 32
    ndf: int = 16
    n_layers: int = 3
    dropout: bool = False
    lambda_l1: float = 100.0


@dataclass
class WarpRefineParams(Pix2PixParams):
    """pix2pix's nets and losses over the warped reference, plus the mask's."""

    lambda_mask: float = 1.0
    lambda_ssim: float = 0.0
    self_share: float = 0.0
    mask_cell: int = 4
    # Strengths of the net's paint tried on the val pairs after training (the best is kept);
    # one value: that one, no fit.
    paint_gain: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])


@dataclass
class PLDTParams:
    width: int = 96
    gate: bool = False
    gate_p: list[float] = field(default_factory=lambda: list(UPSTREAM_P))


@dataclass
class GanParams:
    arch: Literal["pix2pix", "pldt", "warp_refine"] = "warp_refine"
    identity: bool = True
    epochs: int = 30
    batch_size: int = 16
    lr: float = 5e-4
    lr_decay: float = 0.5
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    pix2pix: Pix2PixParams = field(default_factory=Pix2PixParams)
    pldt: PLDTParams = field(default_factory=PLDTParams)
    warp_refine: WarpRefineParams = field(default_factory=WarpRefineParams)
    checkpoint_every: int = 200
    samples: int = 8
    sample_every: int = 10
    log_every: int = 25
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    threads: int = 0
    workers: int = 2
    cache_mb: float = 2048.0

    def __post_init__(self):
        if len(self.betas) != 2:
            raise ValueError(f"betas: expected 2 numbers, got {self.betas}")
        if len(self.pldt.gate_p) != 9:
            raise ValueError(
                f"pldt.gate_p: expected 9 numbers (a 3×3 matrix), got {len(self.pldt.gate_p)}"
            )
        if self.arch == "warp_refine" and not self.identity:
            raise ValueError("arch warp_refine warps the reference face: it needs identity: true")
        if not 0.0 <= self.warp_refine.self_share <= 1.0:
            raise ValueError(
                f"warp_refine.self_share: a fraction in [0, 1], got {self.warp_refine.self_share}"
            )
        for name in ("lambda_l1", "lambda_mask", "lambda_ssim"):
            if getattr(self.warp_refine, name) < 0:
                raise ValueError(
                    f"warp_refine.{name}: must be ≥ 0, got {getattr(self.warp_refine, name)}"
                )
        gains = self.warp_refine.paint_gain
        if not gains or any(not 0.0 <= g <= 1.0 for g in gains):
            raise ValueError(f"warp_refine.paint_gain: one or more values in [0, 1], got {gains}")
        if not 0.0 <= self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay: a fraction of the run in [0, 1], got {self.lr_decay}")
        for name in ("epochs", "batch_size", "checkpoint_every", "sample_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")

    def model_kwargs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(generator kwargs, discriminator kwargs) for `models.build_*`."""
        if self.arch == "pldt":
            return {"width": self.pldt.width}, {"width": self.pldt.width}
        if self.arch == "warp_refine":
            w = self.warp_refine
            g = {"ngf": w.ngf, "dropout": w.dropout, "mask_cell": w.mask_cell}
            return g, {"ndf": w.ndf, "n_layers": w.n_layers}
        p = self.pix2pix
        return {"ngf": p.ngf, "dropout": p.dropout}, {"ndf": p.ndf, "n_layers": p.n_layers}
