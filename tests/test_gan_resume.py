"""GAN checkpoints: SIGKILL mid-run and restart ends at the same step with the same weights;
a corrupt newest checkpoint falls back to the previous one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from _faces import make_pairs
from facecal.gan.train import (
    GanParams,
    Pix2PixParams,
    list_checkpoints,
    load_latest_checkpoint,
    run_train_gan,
)

# 8 pairs at 32², batch 2: 4 steps an epoch; 30 epochs = 120 steps, a checkpoint every 10.
EPOCHS, STEPS, EVERY = 30, 120, 10
SETTINGS = {
    "arch": "pix2pix",
    "pix2pix.ngf": 4,
    "pix2pix.ndf": 4,
    "batch_size": 2,
    "checkpoint_every": EVERY,
    "sample_every": 1000,
    "threads": 1,
    "lr": 0.001,
    "lr_decay": 0.5,
}


def _params() -> GanParams:
    return GanParams(
        arch="pix2pix",
        epochs=EPOCHS,
        batch_size=2,
        lr=0.001,
        lr_decay=0.5,
        pix2pix=Pix2PixParams(ngf=4, ndf=4),
        checkpoint_every=EVERY,
        sample_every=1000,
        threads=1,
    )


def _cmd(pairs, model, repo_root):
    cmd = [
        sys.executable,
        "-m",
        "facecal",
        "train-gan",
        str(pairs),
        str(EPOCHS),
        str(model),
        "--params",
        str(repo_root / "params.yaml"),
    ]
    for k, v in SETTINGS.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def _weights(d):
    return torch.load(d / "generator.pt", weights_only=True)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("resume"), size=32)


@pytest.fixture(scope="module")
def reference(pairs, tmp_path_factory):
    """The same training, uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    m = run_train_gan(
        _params(),
        0,
        pairs,
        None,
        out,
        out / "ckpt",
        out / "plots",
        out / "metrics.json",
        progress=False,
    )
    assert m["steps"] == STEPS and m["resumed_from_step"] == 0
    return out


def test_sigkill_then_restart_ends_where_an_uninterrupted_run_does(
    pairs, reference, tmp_path, repo_root
):
    model = tmp_path / "model"
    ckpt = model / "checkpoints"
    proc = subprocess.Popen(
        _cmd(pairs, model, repo_root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not list_checkpoints(ckpt) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = list_checkpoints(ckpt)[0][0]
    assert EVERY <= killed_at < STEPS
    assert not (model / "metrics.json").exists()

    done = subprocess.run(
        _cmd(pairs, model, repo_root), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["resumed_from_step"] >= killed_at
    assert [
        int(line.split(",")[0])
        for line in (model / "plots" / "losses.csv").read_text().splitlines()[1:]
    ] == list(range(1, STEPS + 1))
    # Same data order, RNG state, optimiser moments and BN statistics: bit-identical on CPU.
    ref, got = _weights(reference), _weights(model)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert len(list_checkpoints(ckpt)) == 2  # the last two are kept


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(pairs, reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "out"
    # Stop after 25 steps (checkpoints at 10, 20 and a last one at 25) and corrupt the newest.
    first = run_train_gan(
        _params(),
        0,
        pairs,
        None,
        out,
        ckpt,
        out / "plots",
        out / "metrics.json",
        progress=False,
        stop_after=25,
    )
    assert first == {"step": 25, "finished": False}
    (step_new, newest), (step_prev, _) = list_checkpoints(ckpt)[:2]
    assert (step_new, step_prev) == (25, 20)
    newest.write_bytes(newest.read_bytes()[:1000])
    run_hash = newest.name.split("-")[1]
    with pytest.warns(RuntimeWarning, match=f"{newest.name} is unreadable"):
        payload, path = load_latest_checkpoint(ckpt, run_hash, STEPS)
    assert payload["step"] == 20
    with pytest.warns(RuntimeWarning, match="unreadable"):
        m = run_train_gan(
            _params(),
            0,
            pairs,
            None,
            out,
            ckpt,
            out / "plots",
            out / "metrics.json",
            progress=False,
        )
    assert m["resumed_from_step"] == 20 and m["steps"] == STEPS
    ref, got = _weights(reference), _weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_changed_params_do_not_resume(pairs, reference, tmp_path):
    out = tmp_path / "out"
    ckpt = reference / "ckpt"
    assert list_checkpoints(ckpt)
    changed = _params()
    changed.lr = 0.002
    m = run_train_gan(
        changed,
        0,
        pairs,
        None,
        out,
        ckpt,
        out / "plots",
        out / "metrics.json",
        progress=False,
        stop_after=5,
    )
    assert m["step"] == 5  # started from 0, not from the reference's last checkpoint
    hashes = {p.name.split("-")[1] for _, p in list_checkpoints(ckpt)}
    assert len(hashes) == 1  # the other configuration's checkpoints were cleared
