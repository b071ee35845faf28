"""Stage `train_gan`: train the landmark-to-face generator (one loop, two architectures).

``pix2pix`` (default): U-Net G, conditional PatchGAN D, D updated first, then G on
adversarial + λ·L1. ``pldt``: the original's three networks updated simultaneously from one
forward pass (as its Theano code did): D tells real faces (the matched one and a random other
one) from generated ones, DA tells matched (landmarks, face) from mismatched or generated, G
fools both; an optional update gate applies a step only when ‖e‖² > e·P·eᵀ for
e = (loss_G, loss_D, loss_DA) — the original's intent (its code compared against an arbitrary
eigenvalue of a rank-1 matrix).

Runs the same under ``torchrun --nproc_per_node=N`` (DDP: gloo on CPU, NCCL on GPU; every rank
trains on its shard; rank 0 alone logs and writes). Checkpoints every ``checkpoint_every``
steps, atomically, keeping the last two; a restart resumes from the newest one whose params
hash matches (a corrupt one falls back to the one before). With identity conditioning the
generator input is landmark image ⊕ a reference face of the same subject (6 channels).

The original's command line also works: ``facecal train-gan DATADIR EPOCHS MODELDIR`` on any
folder of ``PID…_CLEAN0/CLEAN1`` pairs (``DATADIR/train`` and ``DATADIR/val`` when present).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from facecal import config, tracking
from facecal.errors import FacecalError
from facecal.gan import models
from facecal.gan.data import PairSource, scan_pairs
from facecal.imageio import save_image
from facecal.manifest import Report

SECTION = "gan"
PAIRS_DIR = Path("outputs/pairs")
OUT_DIR = Path("outputs/gan")
CHECKPOINT_DIR = Path("outputs/gan_checkpoints")
PLOTS_DIR = Path("plots/gan")
METRICS_FILE = Path("metrics/gan.json")
PAIRS_INFO = "pairs.json"  # written by the pairs stage: style, image_size, …
KEEP_CHECKPOINTS = 2
CKPT_NAME = re.compile(r"^ckpt-(?P<hash>[0-9a-f]{12})-(?P<step>\d{8})\.pt$")

# The original's fixed 3×3 gate matrix (reference/upstream-calibration/popt_low.txt).
UPSTREAM_P = [0.39223, 0.70605, 0.046171, 0.65548, 0.031833, 0.097132, 0.17119, 0.27692, 0.82346]


class TrainError(FacecalError):
    """Bad training inputs or options."""


@dataclass
class Pix2PixParams:
    ngf: int = 32
    ndf: int = 16
    n_layers: int = 3
    dropout: bool = False
    lambda_l1: float = 100.0


@dataclass
class PLDTParams:
    width: int = 96
    gate: bool = False
    gate_p: list[float] = field(default_factory=lambda: list(UPSTREAM_P))


@dataclass
class GanParams:
    arch: Literal["pix2pix", "pldt"] = "pix2pix"
    identity: bool = True
    epochs: int = 30
    batch_size: int = 16
    lr: float = 5e-4
    lr_decay: float = 0.5
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    pix2pix: Pix2PixParams = field(default_factory=Pix2PixParams)
    pldt: PLDTParams = field(default_factory=PLDTParams)
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
        if not 0.0 <= self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay: a fraction of the run in [0, 1], got {self.lr_decay}")
        for name in ("epochs", "batch_size", "checkpoint_every", "sample_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")

    def model_kwargs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(generator kwargs, discriminator kwargs) for `models.build_*`."""
        if self.arch == "pldt":
            return {"width": self.pldt.width}, {"width": self.pldt.width}
        p = self.pix2pix
        return {"ngf": p.ngf, "dropout": p.dropout}, {"ndf": p.ndf, "n_layers": p.n_layers}


# Knobs that change how a run is observed or scheduled, not what it computes: a checkpoint
# stays valid across them (so raising `epochs` continues a finished run — unless the learning
# rate decays toward the end, which `epochs` then moves).
_UNHASHED = (
    "epochs",
    "checkpoint_every",
    "samples",
    "sample_every",
    "log_every",
    "workers",
    "cache_mb",
)


def training_hash(
    params: GanParams,
    seed: int,
    image_size: int,
    data_fingerprint: str,
    world: int,
    threads: int | None = None,
) -> str:
    """What a checkpoint's weights depend on. `threads` is the resolved CPU thread count (the
    split of every reduction depends on it): a run resumed with another count would continue
    a different computation, so it starts afresh instead."""
    unhashed = set(_UNHASHED) - ({"epochs"} if params.lr_decay > 0 else set())
    d = {k: v for k, v in config.to_dict(params).items() if k not in unhashed}
    d["threads"] = resolve_threads(params) if threads is None else threads
    return config.params_hash(
        {
            "gan": d,
            "seed": seed,
            "image_size": image_size,
            "data": data_fingerprint,
            "world": world,
            "code": _code_hash(),
        }
    )


def _code_hash() -> str:
    """The GAN code itself: DVC reruns the stage when it changes, and a checkpoint of the old
    code must not then pass for the new one's result."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    threads: int = 1  # torch CPU threads of this process (part of the training hash)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def auto_threads(local_world: int = 1) -> int:
    """CPU threads per process for ``gan.threads: 0``: the cores this process may run on, split
    among its training processes. Never the load average: the thread count sets how every
    reduction inside a convolution is split, so it changes the weights (1 and 2 threads give
    different models), and a training must not depend on what else the machine was doing."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local_world))


def resolve_threads(params: GanParams, local_world: int | None = None) -> int:
    """The thread count a run uses (and its checkpoint hash records)."""
    if local_world is None:
        world = os.environ.get("WORLD_SIZE", "1")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return params.threads or auto_threads(local_world)


def setup_runtime(params: GanParams) -> Runtime:
    """Device, DDP process group (under torchrun), threads and AMP."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    threads = resolve_threads(params, local_world)
    torch.set_num_threads(threads)
    amp_dtype = None
    if cuda and params.amp != "off":
        if params.amp == "fp16" or (params.amp == "auto" and not torch.cuda.is_bf16_supported()):
            amp_dtype = torch.float16
        else:
            amp_dtype = torch.bfloat16
    return Runtime(
        device, rank, world, local_rank, amp_dtype, cuda and params.channels_last, threads
    )


def lr_at(params: GanParams, step: int, total: int) -> float:
    """Constant, then linearly to zero over the last `lr_decay` of the run (pix2pix's schedule);
    a pure function of the step, so a resumed run needs no scheduler state."""
    decay = round(params.lr_decay * total)
    if decay <= 0 or step < total - decay:
        return params.lr
    return params.lr * (total - step) / (decay + 1)


def _to_model(batch: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """uint8 (B, C, H, W) → float in [−1, 1] on the device."""
    x = batch.to(rt.device, non_blocking=True).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x


def _bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits.float(), target)


@contextlib.contextmanager
def _frozen(modules: list[nn.Module], active: bool):
    """No weight gradients for these modules inside (skipped under DDP, whose reducer expects
    every parameter to produce one)."""
    if not active:
        yield
        return
    for m in modules:
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m in modules:
            m.requires_grad_(True)


class Trainer:
    """Networks, optimisers and one training step of either architecture."""

    def __init__(
        self, params: GanParams, image_size: int, in_channels: int, rt: Runtime, seed: int
    ):
        self.params, self.rt, self.in_channels = params, rt, in_channels
        g_kw, d_kw = params.model_kwargs()
        torch.manual_seed(seed)  # equal initial weights on every rank and every run
        G = models.build_generator(params.arch, image_size, in_channels, **g_kw)
        Ds = models.build_discriminators(params.arch, image_size, in_channels, **d_kw)
        self.nets: dict[str, nn.Module] = {"G": G, **Ds}
        for name, net in self.nets.items():
            net.to(rt.device)
            if rt.channels_last:
                net.to(memory_format=torch.channels_last)
            if rt.distributed:
                self.nets[name] = nn.parallel.DistributedDataParallel(
                    net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
                )
        betas = (float(params.betas[0]), float(params.betas[1]))
        self.optims = {
            name: torch.optim.Adam(net.parameters(), lr=params.lr, betas=betas)
            for name, net in self.nets.items()
        }
        self.scaler = torch.amp.GradScaler("cuda") if rt.amp_dtype == torch.float16 else None
        self.gate_p = torch.tensor(params.pldt.gate_p, dtype=torch.float64).reshape(3, 3)
        self.single = not rt.distributed

    # --- helpers
    def module(self, name: str) -> nn.Module:
        net = self.nets[name]
        return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net

    def autocast(self):
        if self.rt.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.rt.amp_dtype)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _step(self, names: list[str]) -> None:
        for n in names:
            if self.scaler:
                self.scaler.step(self.optims[n])
            else:
                self.optims[n].step()
        if self.scaler:
            self.scaler.update()

    def train(self) -> None:
        for net in self.nets.values():
            net.train()

    def set_lr(self, lr: float) -> None:
        for opt in self.optims.values():
            for group in opt.param_groups:
                group["lr"] = lr

    # --- steps
    def step(
        self, batch: torch.Tensor, other_faces: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """One update from a [−1, 1] batch (generator input ⊕ face); returns detached losses."""
        x, face = batch[:, : self.in_channels], batch[:, self.in_channels :]
        if self.params.arch == "pix2pix":
            return self._step_pix2pix(x, face)
        return self._step_pldt(x, face, other_faces)

    def _step_pix2pix(self, x, face):
        G, D = self.nets["G"], self.nets["D"]
        lam = self.params.pix2pix.lambda_l1
        with self.autocast():
            fake = G(x)
        # D first: real pairs → 1, generated → 0 (each forward followed by its backward: DDP)
        self.optims["D"].zero_grad(set_to_none=True)
        with self.autocast():
            loss_real = _bce(D(torch.cat([x, face], 1)), True)
        self._backward(0.5 * loss_real)
        with self.autocast():
            loss_fake = _bce(D(torch.cat([x, fake.detach()], 1)), False)
        self._backward(0.5 * loss_fake)
        self._step(["D"])
        # then G against the updated D
        self.optims["G"].zero_grad(set_to_none=True)
        with _frozen([self.module("D")], self.single), self.autocast():
            loss_gan = _bce(D(torch.cat([x, fake], 1)), True)
            loss_l1 = F.l1_loss(fake.float(), face.float())
            loss_g = loss_gan + lam * loss_l1
        self._backward(loss_g)
        self._step(["G"])
        return {
            "loss_g": loss_g.detach(),
            "loss_d": (0.5 * (loss_real + loss_fake)).detach(),
            "loss_g_gan": loss_gan.detach(),
            "loss_l1": loss_l1.detach(),
        }

    def _step_pldt(self, x, face, other):
        G, D, DA = self.nets["G"], self.nets["D"], self.nets["DA"]
        for opt in self.optims.values():
            opt.zero_grad(set_to_none=True)
        with self.autocast():
            fake = G(x)
        # G's loss against the current D and DA (the three updates are simultaneous)
        with _frozen([self.module("D"), self.module("DA")], self.single), self.autocast():
            loss_g = 0.5 * (_bce(D(fake), True) + _bce(DA(torch.cat([x, fake], 1)), True))
        self._backward(loss_g)
        if not self.single:  # D/DA weight gradients of G's loss are not theirs to apply
            self.optims["D"].zero_grad(set_to_none=True)
            self.optims["DA"].zero_grad(set_to_none=True)
        fake = fake.detach()
        terms_d = [(face, True), (other, True), (fake, False)]
        terms_a = [(face, True), (other, False), (fake, False)]
        loss_d = loss_a = 0.0
        for img, real in terms_d:
            with self.autocast():
                loss = _bce(D(img), real) / 3
            self._backward(loss)
            loss_d = loss_d + loss.detach()
        for img, real in terms_a:
            with self.autocast():
                loss = _bce(DA(torch.cat([x, img], 1)), real) / 3
            self._backward(loss)
            loss_a = loss_a + loss.detach()
        losses = {"loss_g": loss_g.detach(), "loss_d": loss_d, "loss_a": loss_a}
        update = True
        if self.params.pldt.gate:
            e = torch.stack([loss_g.detach(), loss_d, loss_a]).double()
            if self.rt.distributed:  # every rank must take the same decision
                torch.distributed.all_reduce(e)
                e /= self.rt.world
            e = e.cpu()
            update = bool(e @ e > e @ self.gate_p @ e)
        if update:
            self._step(["G", "D", "DA"])
        losses["updated"] = torch.tensor(float(update))
        return losses

    # --- state
    def state(self) -> dict[str, Any]:
        return {
            "nets": {
                n: {k: v.detach().cpu() for k, v in self.module(n).state_dict().items()}
                for n in self.nets
            },
            "optims": {n: o.state_dict() for n, o in self.optims.items()},
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        for n in self.nets:
            self.module(n).load_state_dict(state["nets"][n])
            self.optims[n].load_state_dict(state["optims"][n])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def param_checksum(self) -> str:
        h = hashlib.sha256()
        for n in sorted(self.nets):
            for k, p in sorted(self.module(n).named_parameters()):
                h.update(k.encode())
                h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def sync_buffers(self) -> None:
        """BN running statistics from rank 0 (DDP broadcasts them only before each forward)."""
        if not self.rt.distributed:
            return
        for n in self.nets:
            for b in self.module(n).buffers():
                torch.distributed.broadcast(b, 0)

    @torch.no_grad()
    def generate(self, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """G in eval mode (as exported and served) on [−1, 1] inputs → [−1, 1] float32."""
        G = self.module("G")
        G.eval()
        out = []
        for i in range(0, len(x), batch):
            with self.autocast():
                out.append(G(x[i : i + batch]).float())
        G.train()
        return torch.cat(out) if out else x.new_zeros((0, 3, *x.shape[2:]))


# --------------------------------------------------------------------------- checkpoints


def _rng_state(rt: Runtime) -> dict[str, Any]:
    s = {"torch": torch.get_rng_state()}
    if rt.device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(rt.device)
    return s


def _gather(obj: Any, rt: Runtime) -> list[Any]:
    if not rt.distributed:
        return [obj]
    out: list[Any] = [None] * rt.world
    torch.distributed.all_gather_object(out, obj)
    return out


def list_checkpoints(ckpt_dir: Path, run_hash: str | None = None) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in `ckpt_dir`, newest first (only `run_hash`'s if given)."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for f in ckpt_dir.iterdir():
        m = CKPT_NAME.match(f.name)
        if m and (run_hash is None or m["hash"] == run_hash):
            found.append((int(m["step"]), f))
    return sorted(found, key=lambda t: t[0], reverse=True)


def save_checkpoint(ckpt_dir: Path, run_hash: str, step: int, payload: dict[str, Any]) -> Path:
    """Write atomically (temp file, fsync, rename); keep the newest KEEP_CHECKPOINTS of this
    run and remove checkpoints of other configurations."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt-{run_hash}-{step:08d}.pt"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-ckpt-", suffix=".pt", dir=ckpt_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    mine = list_checkpoints(ckpt_dir, run_hash)
    for _, old in mine[KEEP_CHECKPOINTS:]:
        old.unlink(missing_ok=True)
    for _, other in list_checkpoints(ckpt_dir):
        if not other.name.startswith(f"ckpt-{run_hash}-"):
            other.unlink(missing_ok=True)
    for stale in ckpt_dir.glob(".tmp-ckpt-*"):  # left by a killed writer
        if stale.name != Path(tmp).name:
            stale.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(
    ckpt_dir: Path, run_hash: str, max_step: int
) -> tuple[dict[str, Any] | None, Path | None]:
    """The newest readable checkpoint of this run at or below `max_step`; unreadable ones are
    skipped with a warning naming them."""
    for step, path in list_checkpoints(ckpt_dir, run_hash):
        if step > max_step:
            continue
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if (
                not isinstance(payload, dict)
                or payload.get("hash") != run_hash
                or payload.get("step") != step
            ):
                raise ValueError("contents do not match its name")
            return payload, path
        except Exception as e:  # truncated/corrupt files raise many types
            warnings.warn(
                f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                f"falling back to the previous one",
                RuntimeWarning,
                stacklevel=2,
            )
    return None, None


# --------------------------------------------------------------------------- outputs


def sample_grid(batch: torch.Tensor, fake: torch.Tensor, in_channels: int) -> np.ndarray:
    """Rows of landmarks | [reference] | generated | real, uint8 HWC."""

    def img(t):
        return ((t.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()

    rows = []
    for b, f in zip(batch, fake):
        cols = (
            [img(b[:3])]
            + ([img(b[3:6])] if in_channels == 6 else [])
            + [img(f), img(b[in_channels:])]
        )
        rows.append(cols)
    size, gap = batch.shape[-1], 2
    n, m = len(rows), len(rows[0])
    canvas = np.full((n * size + (n - 1) * gap, m * size + (m - 1) * gap, 3), 255, np.uint8)
    for r, cols in enumerate(rows):
        for c, tile in enumerate(cols):
            canvas[
                r * (size + gap) : r * (size + gap) + size,
                c * (size + gap) : c * (size + gap) + size,
            ] = tile
    return canvas


def write_losses_csv(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(history[0])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(cols)
        for row in history:
            w.writerow([int(row[c]) if c in ("step", "epoch") else f"{row[c]:.6g}" for c in cols])
    tmp.replace(path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


class MetricBuffer:
    """Per-step losses sent to MLflow in batches (one request per `every` steps, not per step)."""

    def __init__(self, run: tracking.StageRun, every: int):
        self.run, self.every = run, every
        self.pending: list[tuple[int, dict[str, float]]] = []

    def add(self, step: int, values: dict[str, float]) -> None:
        if not self.run.active:
            return
        self.pending.append((step, values))
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending or not self.run.active:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, step)
            for step, vals in self.pending
            for k, v in vals.items()
            if math.isfinite(float(v))
        ]
        client = MlflowClient()
        run_id = str(self.run.run_id)  # active: set
        for i in range(0, len(metrics), 1000):  # MLflow's per-request limit
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        self.pending = []


# --------------------------------------------------------------------------- the stage


def _read_pairs_info(pairs_dir: Path) -> dict[str, Any]:
    for d in (pairs_dir, pairs_dir.parent):
        f = d / PAIRS_INFO
        if f.is_file():
            try:
                return json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TrainError(f"{f}: not valid JSON: {e}") from e
    return {}


def run_train_gan(
    params: GanParams,
    seed: int,
    train_dir: Path,
    val_dir: Path | None,
    out_dir: Path = OUT_DIR,
    ckpt_dir: Path = CHECKPOINT_DIR,
    plots_dir: Path = PLOTS_DIR,
    metrics_file: Path = METRICS_FILE,
    image_size: int | None = None,
    style: str | None = None,
    progress: bool = True,
    stage: str = "train_gan",
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train, write generator + checkpoints + curves + grids + metrics; returns the metrics.

    `image_size`/`style` default to the pairs stage's ``pairs.json`` (else 64 / ``dots``).
    `stop_after` ends the run after that many steps (for tests of resume; the outputs of an
    unfinished run are not written).
    """
    threads = torch.get_num_threads()
    try:
        return _run(
            params,
            seed,
            Path(train_dir),
            val_dir,
            Path(out_dir),
            Path(ckpt_dir),
            Path(plots_dir),
            Path(metrics_file),
            image_size,
            style,
            progress,
            stage,
            stop_after,
        )
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _run(
    params,
    seed,
    train_dir,
    val_dir,
    out_dir,
    ckpt_dir,
    plots_dir,
    metrics_file,
    image_size,
    style,
    progress,
    stage,
    stop_after,
) -> dict[str, Any]:
    info = _read_pairs_info(train_dir)
    size = int(image_size or info.get("image_size") or 64)
    style = style or info.get("style") or "dots"
    rt = setup_runtime(params)
    report = Report()
    show = progress and rt.main
    train_pairs = scan_pairs(train_dir, params.identity, report)
    if not train_pairs and params.identity and scan_pairs(train_dir, False):
        raise TrainError(
            f"{train_dir}: identity conditioning needs PID…_REF_… reference "
            f"faces beside the pairs (pairs.references: true), or gan.identity: "
            f"false"
        )
    if not train_pairs:
        raise TrainError(f"{train_dir}: no PID…_CLEAN0/CLEAN1 pairs to train on")
    train = PairSource(
        train_pairs, size, params.identity, params.cache_mb, params.workers, report, show
    )
    val = None
    if val_dir is not None and Path(val_dir).is_dir():
        val_pairs = scan_pairs(val_dir, params.identity, report)
        if val_pairs:
            val = PairSource(val_pairs, size, params.identity, params.cache_mb, 0, report, show)
    if report and rt.main:
        print(f"train-gan: skipped {len(report)} file(s):", file=sys.stderr)
        report.print()
    if params.arch == "pix2pix" and size < 32:
        raise TrainError(f"pix2pix needs image_size ≥ 32, got {size}")

    run_hash = training_hash(params, seed, size, train.fingerprint(), rt.world, rt.threads)
    trainer = Trainer(params, size, train.in_channels, rt, seed)
    spe = len(train.epoch_batches(0, params.batch_size, seed, rt.rank, rt.world))
    total = params.epochs * spe
    history: list[dict[str, float]] = []
    start, gate_skipped = 0, 0
    payload, ckpt_path = load_latest_checkpoint(ckpt_dir, run_hash, total)
    if payload is not None:
        trainer.load_state(payload["state"])
        start, history = payload["step"], list(payload["history"])
        gate_skipped = int(payload.get("gate_skipped", 0))
        rng = payload["rng"]
        mine = rng[rt.rank] if len(rng) == rt.world else None
        if mine is not None:
            torch.set_rng_state(mine["torch"])
            if "cuda" in mine and rt.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], rt.device)
        if rt.main:
            print(f"train-gan: resuming from {ckpt_path} (step {start}/{total})", file=sys.stderr)
    else:
        torch.manual_seed(seed + 1 + rt.rank)  # dropout etc.: one stream per rank

    cfg = models.generator_config(
        params.arch, size, style, params.identity, params.model_kwargs()[0]
    )
    sample_src = val if val is not None else train
    # Spread the samples over the set (so over subjects and emotions), deterministically.
    sample_idx = sorted(
        {
            int(round(i))
            for i in np.linspace(0, len(sample_src) - 1, min(params.samples, len(sample_src)))
        }
    )
    tracked = (
        tracking.stage_run(stage, {"gan": params, "seed": seed})
        if rt.main
        else contextlib.nullcontext(tracking.StageRun(None))
    )
    with tracked as run:
        run.set_tags(
            {
                "facecal.world_size": rt.world,
                "facecal.device": str(rt.device),
                "facecal.threads": rt.threads,
                "facecal.training_hash": run_hash,
            }
        )
        run.log_params({"gan.threads_resolved": rt.threads})
        buf = MetricBuffer(run, params.log_every)
        (plots_dir / "samples").mkdir(parents=True, exist_ok=True) if rt.main else None

        def checkpoint(step: int) -> None:
            rng = _gather(_rng_state(rt), rt)
            if rt.main:
                save_checkpoint(
                    ckpt_dir,
                    run_hash,
                    step,
                    {
                        "hash": run_hash,
                        "step": step,
                        "state": trainer.state(),
                        "rng": rng,
                        "history": history,
                        "gate_skipped": gate_skipped,
                    },
                )

        def grid(name: str) -> None:
            if not rt.main:
                return
            batch = _to_model(sample_src.take(sample_idx), rt)
            fake = trainer.generate(batch[:, : train.in_channels])
            path = plots_dir / "samples" / f"{name}.png"
            save_image(sample_grid(batch, fake, train.in_channels), path)
            run.log_artifact(path, "samples")

        trainer.train()
        bar = tqdm(
            total=total,
            initial=start,
            desc=f"train-gan {params.arch}",
            unit="step",
            disable=not show,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        step, images, t0 = start, 0, time.perf_counter()
        pending: list[tuple[int, int, dict[str, torch.Tensor]]] = []

        def drain() -> None:
            # .item() syncs with the device: do it in groups, not after every step
            nonlocal gate_skipped
            for s, ep, losses in pending:
                row = {"step": s, "epoch": ep, **{k: float(v) for k, v in losses.items()}}
                if "updated" in row:
                    gate_skipped += int(row["updated"] == 0.0)
                history.append(row)
                buf.add(s, {k: v for k, v in row.items() if k not in ("step", "epoch")})
            pending.clear()

        stop = total if stop_after is None else min(total, start + stop_after)
        while step < stop:
            epoch, skip = divmod(step, spe)
            batches = train.epoch_batches(epoch, params.batch_size, seed, rt.rank, rt.world)
            batches = batches[skip : skip + (stop - step)]
            for idx, raw in zip(batches, train.iterate(batches, rt.device.type == "cuda")):
                other = None
                if params.arch == "pldt":
                    other_raw = train.take(train.other_indices(epoch, idx, seed))
                    other = _to_model(other_raw[:, train.in_channels :], rt)
                trainer.set_lr(lr_at(params, step, total))
                losses = trainer.step(_to_model(raw, rt), other)
                step += 1
                images += len(idx)
                pending.append((step, epoch + 1, losses))
                if len(pending) >= params.log_every:
                    drain()
                    bar.set_postfix({k: f"{history[-1][k]:.3g}" for k in ("loss_g", "loss_d")})
                if step % params.checkpoint_every == 0:
                    drain()
                    checkpoint(step)
                bar.update(1)
            if step % spe == 0 and (step // spe) % params.sample_every == 0 and step < total:
                grid(f"epoch_{step // spe:03d}")
                if rt.main and val is not None:
                    scores = validate(trainer, val, train.in_channels, rt)
                    buf.add(step, scores)
                    if show:
                        bar.write(
                            f"epoch {step // spe}: "
                            + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()),
                            file=sys.stderr,
                        )
        drain()
        bar.close()
        seconds = time.perf_counter() - t0
        if step < total:  # stopped early on request: leave a checkpoint, write nothing else
            checkpoint(step)
            buf.flush()
            return {"step": step, "finished": False}
        if step % params.checkpoint_every != 0 and step > start:
            checkpoint(step)
        checksums = _gather(trainer.param_checksum(), rt)
        trainer.sync_buffers()
        metrics: dict[str, Any] = {}
        if rt.main:
            models.save_generator(trainer.module("G"), cfg, out_dir)
            write_losses_csv(plots_dir / "losses.csv", history)
            grid("final")
            metrics = _final_metrics(
                params,
                trainer,
                train,
                val,
                history,
                spe,
                total,
                start,
                images * rt.world,
                seconds,
                gate_skipped,
                rt,
                checksums,
            )
            _write_json(metrics_file, metrics)
            buf.flush()
            # per-step losses are already logged under loss_*: the last epoch's means get
            # their own names so the curves keep one point per step
            run.log_metrics(
                {
                    (f"final_{k}" if k.startswith("loss") else k): v
                    for k, v in metrics.items()
                    if k != "rank_checksums"
                },
                step=total,
            )
            run.log_artifact(plots_dir / "losses.csv")
            run.log_artifact(out_dir / models.GENERATOR_CONFIG, "generator")
            print(
                "train-gan: "
                + ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in metrics.items()
                    if k != "rank_checksums"
                ),
                file=sys.stderr,
            )
    if rt.distributed:
        torch.distributed.barrier()
    return metrics


def validate(trainer: Trainer, val: PairSource, in_channels: int, rt: Runtime) -> dict[str, float]:
    """SSIM and L1 of eval-mode generated faces against the real ones, in [0, 1]; plus the
    same for the reference face taken as the answer (what copying the input would score)."""
    from facecal import metrics as qm

    out: dict[str, list[torch.Tensor]] = {"val_ssim": [], "val_l1": []}
    for i in range(0, len(val), 256):
        batch = _to_model(val.take(list(range(i, min(len(val), i + 256)))), rt)
        fake = ((trainer.generate(batch[:, :in_channels]) + 1) / 2).cpu().double()
        real = ((batch[:, in_channels:].float() + 1) / 2).cpu().double()
        out["val_ssim"].append(qm.ssim(fake, real))
        out["val_l1"].append(qm.l1(fake, real))
        if in_channels == 6:  # the baseline a generator must beat: returning its reference
            ref = ((batch[:, 3:6].float() + 1) / 2).cpu().double()
            out.setdefault("val_ssim_reference", []).append(qm.ssim(ref, real))
    return {k: float(torch.cat(v).mean()) for k, v in out.items()}


def _final_metrics(
    params,
    trainer,
    train,
    val,
    history,
    spe,
    total,
    start,
    images,
    seconds,
    gate_skipped,
    rt,
    checksums,
) -> dict[str, Any]:
    last = [h for h in history if h["step"] > total - spe] or history
    out: dict[str, Any] = {
        "arch": params.arch,
        "identity": params.identity,
        "steps": total,
        "epochs": params.epochs,
        "train_pairs": len(train),
        "val_pairs": len(val) if val is not None else 0,
        "resumed_from_step": start,
        "world_size": rt.world,
        "threads": rt.threads,
        "generator_parameters": models.count_parameters(trainer.module("G")),
    }
    for k in last[0] if last else []:
        if k not in ("step", "epoch", "updated"):
            out[k] = float(np.mean([h[k] for h in last]))
    if params.arch == "pldt":
        out["gate_skipped"] = gate_skipped
    out["images_per_s"] = images / seconds if seconds > 0 and images else None
    out["train_seconds"] = seconds
    if val is not None:
        out.update(validate(trainer, val, train.in_channels, rt))
    if rt.distributed:
        out["rank_checksums"] = checksums
    return out


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument(
        "datadir",
        nargs="?",
        type=Path,
        help="(original command line) folder of PID…_CLEAN0/CLEAN1 pairs, or "
        "one with train/ and val/ subfolders",
    )
    parser.add_argument("epochs", nargs="?", type=int, help="(original command line) epochs")
    parser.add_argument(
        "modeldir",
        nargs="?",
        type=Path,
        help="(original command line) where the generator, checkpoints, plots and metrics go",
    )
    parser.add_argument(
        "--pairs",
        type=Path,
        default=PAIRS_DIR,
        help="pairs of the `pairs` stage (train/ and val/ inside)",
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="generator folder")
    parser.add_argument(
        "--checkpoints",
        type=Path,
        default=None,
        help=f"checkpoint folder (default {CHECKPOINT_DIR}, or MODELDIR/checkpoints)",
    )
    parser.add_argument(
        "--plots",
        type=Path,
        default=None,
        help=f"loss curve and sample grids (default {PLOTS_DIR}, or MODELDIR/plots)",
    )
    parser.add_argument(
        "--metrics",
        type=Path,
        default=None,
        help=f"metrics JSON (default {METRICS_FILE}, or MODELDIR/metrics.json)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="train at this size (default: the pairs' pairs.json, else base.image_size)",
    )
    parser.add_argument(
        "--style",
        choices=("dots", "edges"),
        default=None,
        help="landmark style recorded in generator.json (default: pairs.json, "
        "else dots, the original's)",
    )
    # Ends a run early, leaving a checkpoint (used to test resuming); not a user option.
    parser.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    config.add_params_arguments(parser)


def main(args) -> int:
    overrides = list(getattr(args, "overrides", []) or [])
    if args.datadir is not None:
        if args.epochs is None or args.modeldir is None:
            raise TrainError(
                "the original command line is: facecal train-gan DATADIR EPOCHS MODELDIR"
            )
        overrides.append(f"epochs={args.epochs}")
    args.overrides = overrides
    params = config.params_from_args(args, GanParams, SECTION)
    base = config.read_params(args.params).get("base") or {}
    seed = config.from_dict(_Seed, {"seed": base.get("seed", 0)}, "base").seed
    if args.datadir is not None:
        d, m = args.datadir, args.modeldir
        train_dir, val_dir = (d / "train", d / "val") if (d / "train").is_dir() else (d, None)
        out, ckpt = m, args.checkpoints or m / "checkpoints"
        plots, metrics = args.plots or m / "plots", args.metrics or m / "metrics.json"
        size = args.image_size or (
            None if _read_pairs_info(train_dir) else base.get("image_size", 64)
        )
    else:
        train_dir, val_dir, out = args.pairs / "train", args.pairs / "val", args.out
        ckpt, plots = args.checkpoints or CHECKPOINT_DIR, args.plots or PLOTS_DIR
        metrics, size = args.metrics or METRICS_FILE, args.image_size
    result = run_train_gan(
        params,
        seed,
        train_dir,
        val_dir,
        out,
        ckpt,
        plots,
        metrics,
        image_size=size,
        style=args.style,
        stop_after=args.stop_after,
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if result is not None else 1


@dataclass
class _Seed:
    seed: int = 0
