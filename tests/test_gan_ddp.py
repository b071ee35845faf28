"""`facecal train-gan` under torchrun: 2 gloo processes shard the data and end identical; the
documented stage command (`torchrun --no-python facecal train-gan`, DVC's default paths)
resumes an interrupted 2-rank run to the very weights of an uninterrupted one, with rank 0
alone logging to MLflow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _faces import make_pairs
from facecal.gan.models import load_generator

pytestmark = pytest.mark.slow

# 8 pairs over 2 ranks, 2 per batch: 2 steps an epoch on each rank; 3 epochs = 6 steps.
TINY = [
    "--set",
    "arch=pix2pix",
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


def _run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, repo_root):
    """The original command line (DATADIR EPOCHS MODELDIR) under `python -m torch.distributed.run`."""
    root = tmp_path_factory.mktemp("ddp")
    pairs = make_pairs(root / "data", n=8, size=32)
    model = root / "model"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "facecal", "train-gan", str(pairs), "3", str(model)]
    _run(cmd + ["--params", str(repo_root / "params.yaml"), *TINY])
    return pairs, model


def test_two_gloo_ranks_end_with_identical_weights(uninterrupted):
    _, model = uninterrupted
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


def test_the_stage_command_under_torchrun_resumes_to_the_same_weights(
    uninterrupted, tmp_path, repo_root, mlflow_store
):
    pairs, model = uninterrupted
    # A project folder laid out as DVC runs the stage: outputs/pairs/{pairs.json,train/}.
    shutil.copytree(pairs.parent, tmp_path / "outputs" / "pairs")
    torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun (torch's console script) is not on PATH"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "--no-python"]
    cmd += ["facecal", "train-gan", "--params", str(repo_root / "params.yaml")]
    cmd += [*TINY, "--set", "epochs=3"]
    # Killed after 3 of 6 steps (a checkpoint at the stop), untracked …
    _run(cmd + ["--stop-after", "3"], tmp_path, {**os.environ, "FACECAL_TRACKING": "off"})
    assert not (tmp_path / "outputs" / "gan" / "generator.pt").exists()
    # … then the same command again, tracked, finishes the run.
    _run(cmd, tmp_path, dict(os.environ))

    metrics = json.loads((tmp_path / "metrics" / "gan.json").read_text())
    ref = json.loads((model / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["steps"], metrics["resumed_from_step"]) == (2, 6, 3)
    assert metrics["rank_checksums"] == ref["rank_checksums"]
    ours = torch.load(tmp_path / "outputs" / "gan" / "generator.pt", weights_only=True)
    theirs = torch.load(model / "generator.pt", weights_only=True)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert len((tmp_path / "plots" / "gan" / "losses.csv").read_text().splitlines()) == 1 + 6

    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    stage_runs = [r for r in runs if r.data.tags.get("facecal.stage") == "train_gan"]
    assert len(stage_runs) == 1, [r.data.tags for r in runs]
    assert stage_runs[0].data.tags["facecal.world_size"] == "2"
    assert stage_runs[0].data.metrics["world_size"] == 2
