"""`facecal train-gan` under torchrun: 2 gloo processes shard the data and end identical."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from _faces import make_pairs
from facecal.gan.models import load_generator


def test_two_gloo_ranks_end_with_identical_weights(tmp_path, repo_root):
    pairs = make_pairs(tmp_path / "data", n=8, size=32)
    model = tmp_path / "model"
    # 8 pairs over 2 ranks, 2 per batch: 2 steps an epoch on each rank.
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "facecal",
        "train-gan",
        str(pairs),
        "3",
        str(model),
        "--params",
        str(repo_root / "params.yaml"),
        "--set",
        "pix2pix.ngf=4",
        "--set",
        "pix2pix.ndf=4",
        "--set",
        "batch_size=2",
        "--set",
        "threads=1",
        "--set",
        "checkpoint_every=4",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    # every rank checksums its parameters after the last step; rank 0 records them
    sums = metrics["rank_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    G, cfg = load_generator(model)
    assert cfg["identity"] is True
    assert all(torch.isfinite(p).all() for p in G.parameters())
    # only rank 0 wrote: one set of outputs, checkpoints of one run
    assert sorted(p.name for p in (model / "checkpoints").iterdir()) == sorted(
        p.name for p in (model / "checkpoints").glob("ckpt-*-0000000[46].pt")
    )
    lines = (model / "plots" / "losses.csv").read_text().splitlines()
    assert len(lines) == 1 + 6
