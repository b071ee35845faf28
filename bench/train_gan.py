"""Training throughput of the GAN: images/s per architecture and image size.

    python bench/train_gan.py                       # CPU (and the GPU when there is one)
    python bench/train_gan.py --sizes 64 --archs pix2pix --threads 2 --steps 20
    python bench/train_gan.py --device cuda --batch 64

Runs the real training step (`facecal.gan.train.Trainer.step`: both networks, losses, Adam) on
random pairs (warp_refine: random points, their warp triangles found once, as train_gan does)
with the default params of each arch (`params.yaml` → `gan`), after a warm-up.
On CPU it also prints images per CPU-second: on a machine shared with other jobs wall-clock
throughput suffers from their load, CPU time much less so — with ``--threads 1``, img/cpu-s is
what one quiet core does. (With more threads on busy cores, OpenMP threads spin while waiting
for each other and CPU time inflates too: measure multi-thread figures on a quiet machine.)
The GPU rows use channels-last + AMP as training does. Also prints the estimated duration of
the default `dvc repro train_gan` (epochs × train pairs ÷ images/s). On CPU
that underestimates: train_gan's warp_refine steps took 1.5× the bench's (2026-12-08, not
explained yet).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from facecal import config
from facecal.gan.train import GanParams, Runtime, Trainer, auto_threads


def bench(params: GanParams, size: int, device: str, steps: int, warmup: int) -> dict:
    cuda = device.startswith("cuda")
    amp = None
    if cuda and params.amp != "off":
        amp = (
            torch.float16
            if params.amp == "fp16" or not torch.cuda.is_bf16_supported()
            else torch.bfloat16
        )
    rt = Runtime(torch.device(device), amp_dtype=amp, channels_last=cuda and params.channels_last)
    cin = 6 if params.identity else 3
    points = extra = choice = None
    if params.arch == "warp_refine":
        # Random points inside the frame, jittered between reference and target: the warp's
        # cost does not depend on where the points are.
        from facecal.warp_mesh import triangulate

        gp = torch.Generator().manual_seed(1)
        base = torch.rand(68, 2, generator=gp, dtype=torch.float64) * 0.6 * size + 0.2 * size
        extra = {"triangles": triangulate(base.numpy(), size, size).tolist()}
        jitter = torch.randn(params.batch_size, 2, 68, 2, generator=gp) * 0.01 * size
        points = (base.float() + jitter).to(device)
    trainer = Trainer(params, size, cin, rt, seed=0, generator_extra=extra)
    trainer.train()
    if points is not None:
        # As train_gan does: each pair's target triangles are found once, before the steps
        # (without this the bench timed the uncached warp, about half the pipeline's rate).
        from facecal.warp import triangle_choice

        triangles = trainer.module("G").warp.triangles.cpu()
        choice = triangle_choice(points[:, 1].cpu(), triangles, size, size).to(device)
    g = torch.Generator().manual_seed(0)
    b = params.batch_size
    batch = torch.randint(0, 256, (b, cin + 3, size, size), generator=g).float() / 127.5 - 1
    other = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    batch, other = batch.to(device), other.to(device)
    if rt.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
        other = other.contiguous(memory_format=torch.channels_last)

    def run(n):
        for _ in range(n):
            losses = trainer.step(batch, other if params.arch == "pldt" else None, points, choice)
        float(losses["loss_g"])  # wait for the device

    run(warmup)
    wall, cpu = time.perf_counter(), time.process_time()
    run(steps)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "images_per_s": steps * b / wall,
        "images_per_cpu_s": steps * b / cpu if not cuda else float("nan"),
        "ms_per_step": 1000 * wall / steps,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["pix2pix", "warp_refine", "pldt"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: params)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: as training picks)")
    ap.add_argument("--device", default=None, help="cpu, cuda (default: cpu, then cuda if any)")
    ap.add_argument("--params", default=None, help="params file (default params.yaml)")
    ap.add_argument(
        "--train-pairs",
        type=int,
        default=800,
        help="train pairs of the default dataset, for the duration estimate",
    )
    args = ap.parse_args(argv)
    base = config.load_section(GanParams, "gan", args.params)
    devices = (
        [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    threads = args.threads or auto_threads()
    torch.set_num_threads(threads)
    print(
        f"torch {torch.__version__}, {threads} CPU thread(s)"
        + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    # default run: the default epochs over --train-pairs at the measured wall-clock rate, and
    # (CPU) at the CPU-time rate × threads — what this machine would do with nobody else on it.
    print(
        f"{'device':6} {'arch':8} {'size':>4} {'batch':>5} {'ms/step':>8} {'img/s':>8} "
        f"{'img/cpu-s':>9} {'default run (wall | quiet)':>27}"
    )
    for device in devices:
        for arch in args.archs:
            for size in args.sizes:
                p = config.load_section(GanParams, "gan", args.params, {"arch": arch})
                if args.batch:
                    p.batch_size = args.batch
                try:
                    r = bench(p, size, device, args.steps, args.warmup)
                except RuntimeError as e:  # e.g. out of memory at a large size
                    print(f"{device:6} {arch:11} {size:>4} failed: {e}", file=sys.stderr)
                    continue
                images = base.epochs * args.train_pairs
                wall = images / r["images_per_s"] / 60
                quiet = images / (r["images_per_cpu_s"] * threads) / 60 if device == "cpu" else wall
                print(
                    f"{device:6} {arch:11} {size:>4} {p.batch_size:>5} {r['ms_per_step']:>8.1f} "
                    f"{r['images_per_s']:>8.1f} {r['images_per_cpu_s']:>9.1f} "
                    f"{wall:>12.1f} m | {quiet:>8.1f} m",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
