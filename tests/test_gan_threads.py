"""Training results do not depend on machine load: `gan.threads: 0` means the cores this process
may use (never the load average), the count is part of the checkpoint hash, and the same params
give bit-identical weights whether the machine is idle or busy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from _faces import make_pairs
from facecal.gan import train as gan_train
from facecal.gan.train import GanParams, Pix2PixParams, auto_threads, run_train_gan

BURN = "import time\nt = time.time() + 120\nwhile time.time() < t: pass\n"


@pytest.fixture(scope="module")
def pairs8(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs"), 8)


def _params(threads: int) -> GanParams:
    return GanParams(
        arch="pix2pix",
        epochs=2,
        batch_size=4,
        lr=2e-3,
        pix2pix=Pix2PixParams(ngf=8, ndf=8),
        checkpoint_every=1000,
        sample_every=1000,
        samples=2,
        threads=threads,
    )


def _train(params: GanParams, pairs, out, stop_after=None):
    return run_train_gan(
        params,
        0,
        pairs,
        None,
        out / "gan",
        out / "ckpt",
        out / "plots",
        out / "metrics.json",
        progress=False,
        stop_after=stop_after,
    )


def _weights(out):
    return torch.load(out / "gan" / "generator.pt", weights_only=True)


@pytest.mark.slow  # ~45 s: the busy run competes with a spinning process per core
def test_same_params_give_the_same_weights_on_an_idle_and_a_busy_machine(
    pairs8, tmp_path, monkeypatch
):
    cores = len(os.sched_getaffinity(0))
    # An idle machine (as the load average reports it) …
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    idle = _train(_params(0), pairs8, tmp_path / "idle")
    # … and a busy one: every core taken by another process, and a load average that says so.
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * cores, 4.0 * cores, 4.0 * cores))
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(cores)]
    try:
        busy = _train(_params(0), pairs8, tmp_path / "busy")
    finally:
        for p in burners:
            p.kill()
            p.wait()
    assert idle["threads"] == busy["threads"] == auto_threads() == cores
    a, b = _weights(tmp_path / "idle"), _weights(tmp_path / "busy")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_thread_count_is_part_of_the_run_and_a_resume_cannot_switch_it(pairs8, tmp_path):
    out = tmp_path / "run"
    first = _train(_params(1), pairs8, out, stop_after=2)
    assert first == {"step": 2, "finished": False}
    # the same run with another thread count, beside that checkpoint, does not continue it …
    shutil.copytree(out / "ckpt", tmp_path / "run2" / "ckpt")
    other = _train(_params(2), pairs8, tmp_path / "run2")
    assert other["resumed_from_step"] == 0 and other["threads"] == 2
    # … while the same count does
    done = _train(_params(1), pairs8, out)
    assert done["resumed_from_step"] == 2 and done["threads"] == 1
    # explicit counts are used as given; 0 is the cores, split among local processes
    assert gan_train.resolve_threads(_params(3), 1) == 3
    assert gan_train.resolve_threads(_params(0), 1) == len(os.sched_getaffinity(0))
    assert gan_train.resolve_threads(_params(0), 64) == 1
