"""The landmark-to-face networks and the generator file contract.

Three architectures share one training loop (`facecal.gan.train`):

* ``pldt`` — the original Pixel-Level Domain Transfer converter (Yoo et al. 2016) as the
  research code had it: 4 stride-2 4×4 convs 3→96→192→384→768 (LeakyReLU 0.2, batch norm on
  every conv but the first), 4 transposed convs back to 3 (BN + ReLU, tanh), no skips, no bias
  (~12.4 M parameters at ``width=96``); a real/fake discriminator ``D`` (the same encoder plus a
  4×4 stride-4 conv to one logit) and a domain discriminator ``DA`` (the same on landmark image
  ⊕ face).
* ``pix2pix`` — a U-Net generator (skips carry the landmark geometry straight to the output),
  a conditional PatchGAN discriminator, trained with adversarial loss + λ·L1.
* ``warp_refine`` — warp, then refine: the reference face is warped piecewise-affinely from its
  own landmarks to the target landmarks (`facecal.warp`, inside the network so that it exports
  with it), and a pix2pix U-Net that sees the landmark image and the warped face paints a face
  ``painted`` and a mask ``m``; the output is ``m·warped + (1 − m)·painted``
  (Averbuch-Elor et al. 2017's warp + residual, GANimation's mask composition). Geometry and
  identity come from the warp, sharp at any resolution; the net adds what a warp cannot
  (mouth interior, wrinkles). Same PatchGAN and losses as pix2pix, plus a penalty on ``1 − m``.

Generator contract (docs/architecture.md): ``outputs/gan/generator.pt`` holds
``G.state_dict()`` and ``generator.json`` everything needed to rebuild and feed it
(``arch``, ``image_size``, ``style``, ``identity``, ``in_channels``, ``kwargs``). Input is the
landmark image in [−1, 1] (⊕ a reference face with identity on), N×C×H×W; output a face in
[−1, 1]. ``warp_refine`` (identity only) also takes the reference's and the target's landmarks
in crop pixels, N×68×2 each: ``G(x, reference_points, target_points)`` (`takes_points`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facecal.errors import FacecalError
from facecal.warp import PiecewiseAffineWarp

ARCHS = ("pldt", "pix2pix", "warp_refine")
# Architectures whose generator also takes (reference points, target points).
POINT_ARCHS = ("warp_refine",)
GENERATOR_WEIGHTS = "generator.pt"
GENERATOR_CONFIG = "generator.json"
CONFIG_KEYS = ("arch", "image_size", "style", "identity", "in_channels", "kwargs")


class GeneratorError(FacecalError):
    """A generator directory, file or configuration is missing or inconsistent."""


# --------------------------------------------------------------------------- building blocks


def _down(cin: int, cout: int, norm: bool, stride: int = 2) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 4, stride, 1, bias=False)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation (N(0, 0.02) convs, N(1, 0.02) BN scales), as both originals used."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _check_size(arch: str, image_size: int, min_log2: int) -> None:
    if image_size < 2**min_log2 or image_size & (image_size - 1):
        raise GeneratorError(
            f"{arch}: image_size must be a power of two ≥ {2**min_log2}, got {image_size}"
        )


# --------------------------------------------------------------------------- PLDT


def _pldt_encoder(in_channels: int, width: int) -> list[nn.Module]:
    c = [width, width * 2, width * 4, width * 8]
    return [
        *_down(in_channels, c[0], norm=False),
        *_down(c[0], c[1], norm=True),
        *_down(c[1], c[2], norm=True),
        *_down(c[2], c[3], norm=True),
    ]


class PLDTGenerator(nn.Module):
    """The original converter: encoder to 1/16 resolution, decoder back, no skip connections."""

    def __init__(self, in_channels: int = 3, width: int = 96, out_channels: int = 3):
        super().__init__()
        c = [width, width * 2, width * 4, width * 8]
        self.encoder = nn.Sequential(*_pldt_encoder(in_channels, width))
        dec: list[nn.Module] = []
        for cin, cout in ((c[3], c[2]), (c[2], c[1]), (c[1], c[0])):
            dec += [
                nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
        dec += [nn.ConvTranspose2d(c[0], out_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.decoder = nn.Sequential(*dec)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class PLDTDiscriminator(nn.Module):
    """The PLDT encoder plus a 4×4 stride-4 conv to logits (one logit at 64², a small map above).

    ``D`` takes a face (3 channels); ``DA`` takes the generator's input ⊕ a face.
    """

    def __init__(self, in_channels: int = 3, width: int = 96):
        super().__init__()
        self.net = nn.Sequential(
            *_pldt_encoder(in_channels, width), nn.Conv2d(width * 8, 1, 4, 4, 0, bias=False)
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------- pix2pix


class _UNetBlock(nn.Module):
    """One level of the U-Net: down → (inner levels) → up, output concatenated with the input."""

    def __init__(
        self,
        outer: int,
        inner: int,
        sub: nn.Module | None,
        *,
        in_channels: int | None = None,
        outermost: bool = False,
        innermost: bool = False,
        dropout: bool = False,
        out_channels: int | None = None,
    ):
        super().__init__()
        self.outermost = outermost
        cin = in_channels if in_channels is not None else outer
        down = nn.Conv2d(cin, inner, 4, 2, 1, bias=False)
        layers: list[nn.Module]
        if outermost:
            up = nn.ConvTranspose2d(inner * 2, out_channels or outer, 4, 2, 1)
            assert sub is not None  # only the innermost block has no inner one
            layers = [down, sub, nn.ReLU(True), up, nn.Tanh()]
        elif innermost:
            # No norm at the 1×1 bottleneck: batch norm over one value per channel is undefined
            # at batch size 1.
            up = nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=False)
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, nn.BatchNorm2d(outer)]
        else:
            assert sub is not None
            up = nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1, bias=False)
            layers = [
                nn.LeakyReLU(0.2, True),
                down,
                nn.BatchNorm2d(inner),
                sub,
                nn.ReLU(True),
                up,
                nn.BatchNorm2d(outer),
            ]
            if dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class UNetGenerator(nn.Module):
    """pix2pix U-Net down to 1×1: ``depth`` = log2(image_size) levels (6 at 64², 8 at 256²).

    Channels double from ``ngf`` up to ``8·ngf`` and stay there; ``dropout`` on the three
    innermost decoder levels (pix2pix's noise source), which only exist from depth 5 on.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 64,
        ngf: int = 64,
        dropout: bool = False,
        out_channels: int = 3,
        depth: int | None = None,
    ):
        super().__init__()
        depth = depth or int(math.log2(image_size))
        if depth < 2 or 2**depth > image_size:
            raise GeneratorError(f"pix2pix: depth {depth} does not fit image_size {image_size}")
        # Channels of each level from the outside in.
        chans = [min(ngf * 2**i, ngf * 8) for i in range(depth)]
        block: nn.Module | None = None
        for level in range(depth - 1, 0, -1):
            outer, inner = chans[level - 1], chans[level]
            innermost = block is None
            use_dropout = dropout and not innermost and level >= depth - 3 and depth >= 5
            block = _UNetBlock(outer, inner, block, innermost=innermost, dropout=use_dropout)
        self.model = _UNetBlock(
            out_channels,
            chans[0],
            block,
            in_channels=in_channels,
            outermost=True,
            out_channels=out_channels,
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class WarpRefineGenerator(nn.Module):
    """Warp the reference to the target landmarks, then let a U-Net paint over it through a mask.

    ``forward(x, src, dst)``: ``x`` = landmark image ⊕ reference face (N×6×S×S, [−1, 1]),
    ``src``/``dst`` = the reference's / the target's landmarks in crop pixels (N×68×2).
    ``triangles`` is the mesh over the 68 points + `warp_mesh.frame_anchors` (fixed at training
    time from the training faces' mean shape, saved in the generator's config).
    """

    # Initial mask logit: the untrained net already returns (almost) the pure warp, so training
    # starts from the baseline it has to beat rather than from noise.
    MASK_BIAS = 1.5
    warp: PiecewiseAffineWarp

    def __init__(
        self,
        triangles: list[list[int]],
        image_size: int = 64,
        ngf: int = 32,
        dropout: bool = False,
        depth: int | None = None,
        mask_cell: int = 4,
        paint_gain: float = 1.0,
    ):
        super().__init__()
        self.mask_cell = int(mask_cell)
        self.paint_gain = float(paint_gain)
        if not 0.0 <= self.paint_gain <= 1.0:
            raise GeneratorError(f"warp_refine: paint_gain {paint_gain} must be in [0, 1]")
        if self.mask_cell < 1 or image_size % self.mask_cell:
            raise GeneratorError(f"warp_refine: mask_cell {mask_cell} must divide {image_size}")
        self.warp = PiecewiseAffineWarp(np.asarray(triangles, np.int64))
        self.refine = UNetGenerator(6, image_size, ngf, dropout, out_channels=4, depth=depth)
        outer = self.refine.model.model[3]
        assert isinstance(outer, nn.ConvTranspose2d) and outer.bias is not None
        with torch.no_grad():
            outer.bias[3] = self.MASK_BIAS

    def parts(
        self,
        x: torch.Tensor,
        src: torch.Tensor,
        dst: torch.Tensor,
        choice: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(warped reference, painted face, mask in [0, 1]) — serving composes them itself at
        the photo's resolution. `choice`: each pixel's target triangle if known
        (`warp.triangle_choice`; training), else found here."""
        landmarks, reference = x[:, :3], x[:, 3:6]
        warped = self.warp(reference, src, dst, choice)
        out = self.refine(torch.cat([landmarks, warped], 1))
        painted, mask = out[:, :3], (out[:, 3:4] + 1.0) * 0.5
        if self.mask_cell > 1:
            # A mask as sharp as the net's output lets it paint thin lines along the drawn
            # landmarks (measured: dotted brows and lips over a right warp); one value per
            # cell, bilinearly upsampled, only opens smooth regions (GANimation smooths its
            # attention with a TV penalty for the same reason).
            size = mask.shape[-2:]
            mask = F.interpolate(
                F.avg_pool2d(mask, self.mask_cell), size=size, mode="bilinear", align_corners=False
            )
        # Trained at full strength the paint overshoots away from its training pairs (on
        # calibrated targets half or a quarter of it beat both the full paint and none):
        # `gan.train` fits this strength on the val pairs after training. It is part of the
        # mask, so every composition (ONNX, the full-resolution photo) carries it.
        return warped, painted, self.weaken(mask, self.paint_gain)

    @staticmethod
    def weaken(mask: torch.Tensor, paint_gain: float) -> torch.Tensor:
        """The mask with the paint (1 − mask) scaled by `paint_gain`."""
        return mask if paint_gain == 1.0 else 1.0 - paint_gain * (1.0 - mask)

    @staticmethod
    def compose(warped: torch.Tensor, painted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The face: the warp where the mask is 1, the paint where it is 0."""
        return mask * warped + (1.0 - mask) * painted

    def forward(
        self,
        x: torch.Tensor,
        src: torch.Tensor,
        dst: torch.Tensor,
        with_mask: bool = False,
        choice: torch.Tensor | None = None,
    ) -> Any:
        """The face; with `with_mask` (training: through DDP's forward) (face, mask)."""
        warped, painted, mask = self.parts(x, src, dst, choice)
        face = self.compose(warped, painted, mask)
        return (face, mask) if with_mask else face


class PatchDiscriminator(nn.Module):
    """Conditional PatchGAN: judges overlapping patches of (generator input ⊕ face)."""

    def __init__(self, in_channels: int = 6, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = _down(in_channels, ndf, norm=False)
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += _down(ndf * prev, ndf * mult, norm=True)
        prev, mult = mult, min(2**n_layers, 8)
        layers += _down(ndf * prev, ndf * mult, norm=True, stride=1)
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------- factories

_G_KWARGS = {
    "pldt": {"width"},
    "pix2pix": {"ngf", "dropout", "depth"},
    "warp_refine": {"ngf", "dropout", "depth", "triangles", "mask_cell", "paint_gain"},
}
_D_KWARGS = {"pldt": {"width"}, "pix2pix": {"ndf", "n_layers"}, "warp_refine": {"ndf", "n_layers"}}


def takes_points(arch: str) -> bool:
    """Whether the generator of `arch` also takes (reference points, target points)."""
    return arch in POINT_ARCHS


def _check_kwargs(arch: str, kw: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise GeneratorError(
            f"{arch} {what}: unknown option(s) {unknown}; known: {sorted(allowed)}"
        )


def build_generator(arch: str, image_size: int = 64, in_channels: int = 3, **kw: Any) -> nn.Module:
    """A freshly initialised generator. ``in_channels`` is 3, or 6 with identity conditioning.

    pldt options: ``width`` (96 = the original). pix2pix: ``ngf`` (64), ``dropout`` (False),
    ``depth`` (log2(image_size)). warp_refine: pix2pix's and ``triangles`` (required; 6 input
    channels, i.e. identity on).
    """
    if arch not in ARCHS:
        raise GeneratorError(f"unknown generator arch {arch!r}; expected one of {ARCHS}")
    _check_kwargs(arch, kw, _G_KWARGS[arch], "generator")
    if arch == "pldt":
        _check_size(arch, image_size, 4)
        return PLDTGenerator(in_channels=in_channels, **kw)
    _check_size(arch, image_size, 2)
    if arch == "warp_refine":
        if in_channels != 6:
            raise GeneratorError("warp_refine warps a reference face: it needs identity: true")
        if "triangles" not in kw:
            raise GeneratorError("warp_refine: the mesh's triangles are missing")
        return WarpRefineGenerator(image_size=image_size, **kw)
    return UNetGenerator(in_channels=in_channels, image_size=image_size, **kw)


def build_discriminators(
    arch: str, image_size: int = 64, in_channels: int = 3, **kw: Any
) -> dict[str, nn.Module]:
    """The discriminators of an arch: pldt → {"D", "DA"}; pix2pix → {"D"} (conditional).

    ``in_channels`` is the generator's input channel count; conditional discriminators see that
    input ⊕ a 3-channel face.
    """
    if arch not in ARCHS:
        raise GeneratorError(f"unknown generator arch {arch!r}; expected one of {ARCHS}")
    _check_kwargs(arch, kw, _D_KWARGS[arch], "discriminator")
    if arch == "pldt":
        _check_size(arch, image_size, 4)
        return {"D": PLDTDiscriminator(3, **kw), "DA": PLDTDiscriminator(in_channels + 3, **kw)}
    if image_size < 32:
        raise GeneratorError(f"pix2pix discriminator needs image_size ≥ 32, got {image_size}")
    return {"D": PatchDiscriminator(in_channels + 3, **kw)}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def generator_config(
    arch: str, image_size: int, style: str, identity: bool, kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``generator.json`` contents for a generator built with these settings."""
    return {
        "arch": arch,
        "image_size": int(image_size),
        "style": style,
        "identity": bool(identity),
        "in_channels": 6 if identity else 3,
        "kwargs": dict(kwargs or {}),
    }


def _unwrap(module: nn.Module) -> nn.Module:
    return (
        module.module
        if hasattr(module, "module") and isinstance(module.module, nn.Module)
        else module
    )


def _check_config(config: dict[str, Any], where: str) -> None:
    if not isinstance(config, dict):
        raise GeneratorError(f"{where}: expected a JSON object")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise GeneratorError(f"{where}: missing key(s) {missing}")
    if config["arch"] not in ARCHS:
        raise GeneratorError(f"{where}: arch {config['arch']!r} is not one of {ARCHS}")
    if config["arch"] in POINT_ARCHS and not config["identity"]:
        raise GeneratorError(f"{where}: {config['arch']} needs identity: true")
    if config["in_channels"] != (6 if config["identity"] else 3):
        raise GeneratorError(
            f"{where}: in_channels {config['in_channels']} does not match "
            f"identity={config['identity']}"
        )
    if not isinstance(config["kwargs"], dict):
        raise GeneratorError(f"{where}: kwargs must be an object")


def _atomic_write_bytes(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_generator(G: nn.Module, config: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``generator.pt`` (state_dict, contiguous CPU tensors) and ``generator.json``.

    Accepts a DDP-wrapped generator. Both files are written atomically. Returns ``out_dir``.
    """
    out = Path(out_dir)
    _check_config(config, f"{out / GENERATOR_CONFIG}")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in _unwrap(G).state_dict().items()}
    _atomic_write_bytes(out / GENERATOR_WEIGHTS, lambda f: torch.save(state, f))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes(out / GENERATOR_CONFIG, lambda f: f.write(text.encode()))
    return out


def load_generator(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the generator saved in ``directory`` → (module in eval mode, config dict)."""
    d = Path(directory)
    cfg_path, weights_path = d / GENERATOR_CONFIG, d / GENERATOR_WEIGHTS
    if not cfg_path.is_file():
        raise GeneratorError(f"{cfg_path}: generator config not found")
    if not weights_path.is_file():
        raise GeneratorError(f"{weights_path}: generator weights not found")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GeneratorError(f"{cfg_path}: not valid JSON: {e}") from e
    _check_config(config, str(cfg_path))
    G = build_generator(
        config["arch"], config["image_size"], config["in_channels"], **config["kwargs"]
    )
    try:
        state = torch.load(weights_path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or foreign file: torch raises a zoo of types
        raise GeneratorError(f"{weights_path}: cannot read weights: {e}") from e
    try:
        G.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise GeneratorError(
            f"{weights_path}: weights do not fit {config['arch']} {config['kwargs']}: {e}"
        ) from e
    G.to(map_location)
    G.eval()
    return G, config


def model_hash(G: nn.Module, config: dict[str, Any]) -> str:
    """The identity of a generator: its config and every tensor of its state (names, dtypes,
    shapes, values). The evaluation records it with its metrics and export in the ONNX file,
    so the registry can tell whether metrics belong to the model it registers."""
    import hashlib

    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(_unwrap(G).state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def generator_hash(directory: str | Path) -> str:
    """`model_hash` of the generator saved in ``directory``."""
    G, config = load_generator(directory)
    return model_hash(G, config)
