"""Stage `train_gan`: train the landmark-to-face generator (one loop, three architectures).

``pix2pix`` (default): U-Net G, conditional PatchGAN D, D updated first, then G on
adversarial + λ·L1. ``warp_refine``: the same update on a generator that warps the
reference face to the target landmarks and paints over it through a mask (`models`), plus
λ_mask·mean(1 − mask); it reads the pairs' points file. ``pldt``: the original's three networks updated simultaneously from one
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

The parts live beside this stage: `params` (the `gan` section), `runtime` (device, DDP, threads,
AMP), `steps` (`Trainer`: networks, optimisers, each architecture's update; `lr_at`),
`checkpoint` (save, list, resume), `outputs` (sample grids, validation, loss table, MLflow
batches); this module holds the run itself (`RunSettings` → `TrainRun` + `TrainState`), the
training hash and the CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from facecal import config, tracking
from facecal.errors import FacecalError
from facecal.gan import models
from facecal.gan.checkpoint import (
    gather,
    load_latest_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from facecal.gan.checkpoint import list_checkpoints as list_checkpoints
from facecal.gan.data import PairDataError, PairSource, load_points, scan_pairs
from facecal.gan.outputs import (
    MetricBuffer,
    fit_paint_gain,
    sample_grid,
    validate,
    write_losses_csv,
)
from facecal.gan.params import GanParams
from facecal.gan.params import Pix2PixParams as Pix2PixParams
from facecal.gan.params import PLDTParams as PLDTParams
from facecal.gan.params import WarpRefineParams as WarpRefineParams
from facecal.gan.runtime import Runtime, resolve_threads, setup_runtime, to_model
from facecal.gan.runtime import auto_threads as auto_threads
from facecal.gan.steps import Trainer, lr_at
from facecal.imageio import save_image
from facecal.manifest import Report
from facecal.warp import triangle_choice
from facecal.warp_mesh import triangulate

# The `X as X` imports above are re-exports: tests, bench and callers import them from here.

SECTION = "gan"
PAIRS_DIR = Path("outputs/pairs")
OUT_DIR = Path("outputs/gan")
CHECKPOINT_DIR = Path("outputs/gan_checkpoints")
PLOTS_DIR = Path("plots/gan")
METRICS_FILE = Path("metrics/gan.json")
PAIRS_INFO = "pairs.json"  # written by the pairs stage: style, image_size, …


class TrainError(FacecalError):
    """Bad training inputs or options."""


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
    here = Path(__file__).parent
    # warp_refine's warp lives outside gan/ (export and serving use it too).
    shared = [
        here.parent / name for name in ("warp.py", "warp_mesh.py", "pair_files.py", "metrics.py")
    ]
    for f in sorted(here.glob("*.py")) + shared:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


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


@dataclass
class RunSettings:
    """What the caller asked for (`run_train_gan`'s arguments)."""

    params: GanParams
    seed: int
    train_dir: Path
    val_dir: Path | None
    out_dir: Path = OUT_DIR
    ckpt_dir: Path = CHECKPOINT_DIR
    plots_dir: Path = PLOTS_DIR
    metrics_file: Path = METRICS_FILE
    image_size: int | None = None
    style: str | None = None
    progress: bool = True
    stage: str = "train_gan"
    stop_after: int | None = None


@dataclass
class TrainRun:
    """A run's fixed parts, once its data, networks and schedule are set up."""

    s: RunSettings
    rt: Runtime
    size: int
    style: str
    show: bool  # progress bar and messages (rank 0 only)
    train: PairSource
    val: PairSource | None
    run_hash: str
    trainer: Trainer
    spe: int  # steps per epoch
    total: int
    sample_src: PairSource
    sample_idx: list[int]

    @property
    def params(self) -> GanParams:
        return self.s.params


@dataclass
class TrainState:
    """What moves as the run goes; `history` and `gate_skipped` travel in checkpoints."""

    start: int = 0
    step: int = 0
    images: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    gate_skipped: int = 0
    # (step, epoch, losses) not yet read back from the device
    pending: list[tuple[int, int, dict[str, torch.Tensor]]] = field(default_factory=list)

    def drain(self, buf: MetricBuffer) -> None:
        # .item() syncs with the device: do it in groups, not after every step
        for s, ep, losses in self.pending:
            row = {"step": s, "epoch": ep, **{k: float(v) for k, v in losses.items()}}
            if "updated" in row:
                self.gate_skipped += int(row["updated"] == 0.0)
            self.history.append(row)
            buf.add(s, {k: v for k, v in row.items() if k not in ("step", "epoch")})
        self.pending.clear()


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
    settings = RunSettings(
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
    try:
        return _run(settings)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _prepare(s: RunSettings) -> TrainRun:
    """Runtime, pairs, training hash and networks (seeded), in this order."""
    params, train_dir, val_dir, seed = s.params, s.train_dir, s.val_dir, s.seed
    info = _read_pairs_info(train_dir)
    size = int(s.image_size or info.get("image_size") or 64)
    style = s.style or info.get("style") or "dots"
    rt = setup_runtime(params)
    report = Report()
    show = s.progress and rt.main
    train_pairs = scan_pairs(train_dir, params.identity, report)
    if not train_pairs and params.identity and scan_pairs(train_dir, False):
        raise TrainError(
            f"{train_dir}: identity conditioning needs PID…_REF_… reference "
            f"faces beside the pairs (pairs.references: true), or gan.identity: "
            f"false"
        )
    if not train_pairs:
        raise TrainError(f"{train_dir}: no PID…_CLEAN0/CLEAN1 pairs to train on")
    point_scale = size / float(info.get("image_size") or size)

    def points(directory: Path, pairs: list) -> np.ndarray | None:
        if not models.takes_points(params.arch):
            return None
        try:
            return load_points(directory, pairs) * np.float32(point_scale)
        except PairDataError as e:
            raise TrainError(str(e)) from None

    train = PairSource(
        train_pairs,
        size,
        params.identity,
        params.cache_mb,
        params.workers,
        report,
        show,
        points(train_dir, train_pairs),
    )
    val = None
    if val_dir is not None and Path(val_dir).is_dir():
        val_pairs = scan_pairs(val_dir, params.identity, report)
        if val_pairs:
            val = PairSource(
                val_pairs,
                size,
                params.identity,
                params.cache_mb,
                0,
                report,
                show,
                points(Path(val_dir), val_pairs),
            )
    if report and rt.main:
        print(f"train-gan: skipped {len(report)} file(s):", file=sys.stderr)
        report.print()
    if params.arch in ("pix2pix", "warp_refine") and size < 32:  # the PatchGAN's receptive field
        raise TrainError(f"{params.arch} needs image_size ≥ 32, got {size}")

    run_hash = training_hash(params, seed, size, train.fingerprint(), rt.world, rt.threads)
    trainer = Trainer(
        params, size, train.in_channels, rt, seed, generator_extra(params, train, size)
    )
    if params.arch == "warp_refine" and train.points is not None:
        train.choices = _warp_choices(train, trainer.module("G"), size, show)
    spe = len(train.epoch_batches(0, params.batch_size, seed, rt.rank, rt.world))
    sample_src = val if val is not None else train
    # Spread the samples over the set (so over subjects and emotions), deterministically.
    sample_idx = sorted(
        {
            int(round(i))
            for i in np.linspace(0, len(sample_src) - 1, min(params.samples, len(sample_src)))
        }
    )
    return TrainRun(
        s,
        rt,
        size,
        style,
        show,
        train,
        val,
        run_hash,
        trainer,
        spe,
        params.epochs * spe,
        sample_src,
        sample_idx,
    )


def _warp_choices(train: PairSource, G: nn.Module, size: int, show: bool) -> torch.Tensor:
    """Each training pair's warp triangle per pixel, found once: the steps then evaluate one
    triangle per pixel instead of all ~150 (the same warp, bit for bit; the warp was over
    half of a 64² step on CPU)."""
    assert train.points is not None and isinstance(G, models.WarpRefineGenerator)
    triangles = G.warp.triangles.cpu()
    targets = train.points[:, 1]
    parts = [
        triangle_choice(targets[i : i + 64], triangles, size, size)
        for i in tqdm(
            range(0, len(targets), 64),
            desc="warp triangles",
            unit="batch",
            disable=not show,
            file=sys.stderr,
            leave=False,
        )
    ]
    return torch.cat(parts)


def generator_extra(params: GanParams, train: PairSource, size: int) -> dict[str, Any]:
    """Generator options taken from the data: warp_refine's mesh, triangulated once on the
    training faces' mean shape (so it is a pure function of the pairs)."""
    if params.arch != "warp_refine" or train.points is None:
        return {}
    mean = train.points[:, 1].double().mean(0).numpy()
    return {"triangles": triangulate(mean, size, size).tolist()}


def _resume(r: TrainRun) -> TrainState:
    """The newest checkpoint of this run (weights, optimisers, RNG), else fresh RNG streams."""
    state = TrainState()
    payload, ckpt_path = load_latest_checkpoint(r.s.ckpt_dir, r.run_hash, r.total)
    if payload is None:
        torch.manual_seed(r.s.seed + 1 + r.rt.rank)  # dropout etc.: one stream per rank
        return state
    r.trainer.load_state(payload["state"])
    restore_rng(payload, r.rt)
    state.start = state.step = payload["step"]
    state.history = list(payload["history"])
    state.gate_skipped = int(payload.get("gate_skipped", 0))
    if r.rt.main:
        print(
            f"train-gan: resuming from {ckpt_path} (step {state.start}/{r.total})", file=sys.stderr
        )
    return state


def _checkpoint(r: TrainRun, state: TrainState) -> None:
    # Every rank takes part (the RNG states are gathered); rank 0 writes.
    rng = gather(rng_state(r.rt), r.rt)
    if r.rt.main:
        save_checkpoint(
            r.s.ckpt_dir,
            r.run_hash,
            state.step,
            {
                "hash": r.run_hash,
                "step": state.step,
                "state": r.trainer.state(),
                "rng": rng,
                "history": state.history,
                "gate_skipped": state.gate_skipped,
            },
        )


def _grid(r: TrainRun, run: tracking.StageRun, name: str) -> None:
    if not r.rt.main:
        return
    batch = to_model(r.sample_src.take(r.sample_idx), r.rt)
    points = r.sample_src.points_of(r.sample_idx)
    fake = r.trainer.generate(batch[:, : r.train.in_channels], _on(points, r.rt))
    path = r.s.plots_dir / "samples" / f"{name}.png"
    save_image(sample_grid(batch, fake, r.train.in_channels), path)
    run.log_artifact(path, "samples")


def _on(points: torch.Tensor | None, rt) -> torch.Tensor | None:
    return points.to(rt.device, non_blocking=True) if points is not None else None


def _epoch(r: TrainRun, state: TrainState, buf: MetricBuffer, bar: tqdm, stop: int) -> None:
    """The steps of the epoch `state.step` is in, up to `stop`."""
    params, rt, train, seed = r.params, r.rt, r.train, r.s.seed
    epoch, skip = divmod(state.step, r.spe)
    batches = train.epoch_batches(epoch, params.batch_size, seed, rt.rank, rt.world)
    batches = batches[skip : skip + (stop - state.step)]
    for idx, raw in zip(batches, train.iterate(batches, rt.device.type == "cuda")):
        other = None
        if params.arch == "pldt":
            other_raw = train.take(train.other_indices(epoch, idx, seed))
            other = to_model(other_raw[:, train.in_channels :], rt)
        r.trainer.set_lr(lr_at(params, state.step, r.total))
        losses = r.trainer.step(
            to_model(raw, rt), other, _on(train.points_of(idx), rt), _on(train.choices_of(idx), rt)
        )
        state.step += 1
        state.images += len(idx)
        state.pending.append((state.step, epoch + 1, losses))
        if len(state.pending) >= params.log_every:
            state.drain(buf)
            bar.set_postfix({k: f"{state.history[-1][k]:.3g}" for k in ("loss_g", "loss_d")})
        if state.step % params.checkpoint_every == 0:
            state.drain(buf)
            _checkpoint(r, state)
        bar.update(1)


def _epoch_end(
    r: TrainRun, state: TrainState, buf: MetricBuffer, bar: tqdm, run: tracking.StageRun
) -> None:
    """Every `sample_every` epochs (but the last): a sample grid and the validation scores."""
    step, spe = state.step, r.spe
    if step % spe != 0 or (step // spe) % r.params.sample_every != 0 or step >= r.total:
        return
    _grid(r, run, f"epoch_{step // spe:03d}")
    if r.rt.main and r.val is not None:
        scores = validate(r.trainer, r.val, r.train.in_channels, r.rt)
        buf.add(step, scores)
        if r.show:
            bar.write(
                f"epoch {step // spe}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()),
                file=sys.stderr,
            )


def _run(s: RunSettings) -> dict[str, Any]:
    r = _prepare(s)
    params, rt = r.params, r.rt
    state = _resume(r)
    cfg = models.generator_config(
        params.arch,
        r.size,
        r.style,
        params.identity,
        {**params.model_kwargs()[0], **generator_extra(params, r.train, r.size)},
    )
    tracked = (
        tracking.stage_run(s.stage, {"gan": params, "seed": s.seed})
        if rt.main
        else contextlib.nullcontext(tracking.StageRun(None))
    )
    with tracked as run:
        run.set_tags(
            {
                "facecal.world_size": rt.world,
                "facecal.device": str(rt.device),
                "facecal.threads": rt.threads,
                "facecal.training_hash": r.run_hash,
            }
        )
        run.log_params({"gan.threads_resolved": rt.threads})
        buf = MetricBuffer(run, params.log_every)
        (s.plots_dir / "samples").mkdir(parents=True, exist_ok=True) if rt.main else None
        r.trainer.train()
        bar = tqdm(
            total=r.total,
            initial=state.start,
            desc=f"train-gan {params.arch}",
            unit="step",
            disable=not r.show,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        t0 = time.perf_counter()
        stop = r.total if s.stop_after is None else min(r.total, state.start + s.stop_after)
        while state.step < stop:
            _epoch(r, state, buf, bar, stop)
            _epoch_end(r, state, buf, bar, run)
        state.drain(buf)
        bar.close()
        seconds = time.perf_counter() - t0
        if state.step < r.total:  # stopped early on request: leave a checkpoint, write nothing else
            _checkpoint(r, state)
            buf.flush()
            return {"step": state.step, "finished": False}
        if state.step % params.checkpoint_every != 0 and state.step > state.start:
            _checkpoint(r, state)
        metrics = _finish(r, state, cfg, buf, run, seconds)
    if rt.distributed:
        torch.distributed.barrier()
    return metrics


def _finish(
    r: TrainRun,
    state: TrainState,
    cfg: dict[str, Any],
    buf: MetricBuffer,
    run: tracking.StageRun,
    seconds: float,
) -> dict[str, Any]:
    """The finished run's generator, loss table, final grid and metrics (rank 0 writes)."""
    rt, s = r.rt, r.s
    checksums = gather(r.trainer.param_checksum(), rt)
    r.trainer.sync_buffers()
    metrics: dict[str, Any] = {}
    if not rt.main:
        return metrics
    gain = _paint_gain(r)
    if gain is not None:
        cfg = {**cfg, "kwargs": {**cfg["kwargs"], "paint_gain": gain[0]}}
    models.save_generator(r.trainer.module("G"), cfg, s.out_dir)
    write_losses_csv(s.plots_dir / "losses.csv", state.history)
    _grid(r, run, "final")
    metrics = _final_metrics(r, state, seconds, checksums)
    if gain is not None:
        metrics["paint_gain"] = gain[0]
        metrics.update({f"val_ssim_paint_{g:g}": v for g, v in gain[1].items()})
    _write_json(s.metrics_file, metrics)
    buf.flush()
    # per-step losses are already logged under loss_*: the last epoch's means get
    # their own names so the curves keep one point per step
    run.log_metrics(
        {
            (f"final_{k}" if k.startswith("loss") else k): v
            for k, v in metrics.items()
            if k != "rank_checksums"
        },
        step=r.total,
    )
    run.log_artifact(s.plots_dir / "losses.csv")
    run.log_artifact(s.out_dir / models.GENERATOR_CONFIG, "generator")
    print(
        "train-gan: "
        + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in metrics.items()
            if k != "rank_checksums"
        ),
        file=sys.stderr,
    )
    return metrics


def _paint_gain(r: TrainRun) -> tuple[float, dict[float, float]] | None:
    """warp_refine: the paint strength to save — fitted on the val pairs when params give
    several (`outputs.fit_paint_gain`), else the one given; without val pairs full strength."""
    if r.params.arch != "warp_refine":
        return None
    gains = r.params.warp_refine.paint_gain
    G = r.trainer.module("G")
    assert isinstance(G, models.WarpRefineGenerator)
    if len(gains) == 1 or r.val is None or r.val.points is None:
        G.paint_gain = float(gains[0]) if len(gains) == 1 else 1.0
        if len(gains) > 1 and r.show:
            print("train-gan: no val pairs to fit paint_gain on: full strength", file=sys.stderr)
        return G.paint_gain, {}
    return fit_paint_gain(r.trainer, r.val, r.rt, gains)


def _final_metrics(
    r: TrainRun, state: TrainState, seconds: float, checksums: list[Any]
) -> dict[str, Any]:
    params, rt, trainer, train, val = r.params, r.rt, r.trainer, r.train, r.val
    history, spe, total = state.history, r.spe, r.total
    images = state.images * rt.world
    last = [h for h in history if h["step"] > total - spe] or history
    out: dict[str, Any] = {
        "arch": params.arch,
        "identity": params.identity,
        "steps": total,
        "epochs": params.epochs,
        "train_pairs": len(train),
        "val_pairs": len(val) if val is not None else 0,
        "resumed_from_step": state.start,
        "world_size": rt.world,
        "threads": rt.threads,
        "generator_parameters": models.count_parameters(trainer.module("G")),
    }
    for k in last[0] if last else []:
        if k not in ("step", "epoch", "updated"):
            out[k] = float(np.mean([h[k] for h in last]))
    if params.arch == "pldt":
        out["gate_skipped"] = state.gate_skipped
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
@dataclass
class _Seed:
    seed: int = 0
