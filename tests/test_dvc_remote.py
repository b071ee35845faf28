"""A DVC remote shared by a team: one checkout trains and `dvc push`es; a fresh clone gets the
data and every output with `dvc pull` and has nothing to rerun — in particular it does not
retrain the generator.

The project is tiny but real: the stages landmarks → calibrate → pairs → train_gan of this
repository's own dvc.yaml (only the `src/` code deps are left out: the tiny project has no
source tree), its params.yaml with tiny GAN knobs, its .gitignore, and the embedded synthetic
faces (the `synth_small` fixture). The remote is a local folder, added with the command the
README documents.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from facecal.gan.models import load_generator

REPO = Path(__file__).resolve().parents[1]
STAGES = ("landmarks", "calibrate", "pairs", "train_gan")
GENERATOR = Path("outputs/gan/generator.pt")

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "FACECAL_TRACKING": "off",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "facecal test",
        "GIT_AUTHOR_EMAIL": "test@facecal.invalid",
        "GIT_COMMITTER_NAME": "facecal test",
        "GIT_COMMITTER_EMAIL": "test@facecal.invalid",
    }


def _sh(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} in {cwd}:\n{done.stdout}\n{done.stderr}"[-5000:]
    return done.stdout + done.stderr


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiny_project(root: Path, faces: Path) -> Path:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = {}
    for name in STAGES:
        stage = spec["stages"][name]
        stage["deps"] = [d for d in stage["deps"] if not str(d).startswith("src/")]
        stages[name] = stage
    root.mkdir(parents=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"]["image_size"] = 32
    params["landmarks"]["workers"] = 1
    params["gan"].update(epochs=2, batch_size=16, threads=1, workers=0, checkpoint_every=2)
    params["gan"]["pix2pix"].update(ngf=4, ndf=4)
    params["gan"]["warp_refine"].update(ngf=4, ndf=4)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    shutil.copytree(faces, root / "data")
    return root


def test_a_fresh_clone_pulls_the_trained_generator_and_does_not_retrain(synth_small, tmp_path):
    origin = _tiny_project(tmp_path / "origin", synth_small)
    remote = tmp_path / "remote"
    _sh(["git", "init", "-q", "-b", "main"], origin)
    _sh(["dvc", "init", "-q"], origin)
    # The README's command (a local path here; s3://… or ssh://… the same way).
    _sh(["dvc", "remote", "add", "-d", "team", str(remote)], origin)
    _sh(["dvc", "add", "-q", "data"], origin)
    _sh(["dvc", "repro", "train_gan"], origin)
    _sh(["git", "add", "-A"], origin)
    _sh(["git", "commit", "-qm", "tiny pipeline"], origin)
    # Checkpoints were written, but are machine-local scratch: neither in git nor in DVC.
    assert list((origin / "outputs" / "gan_checkpoints").glob("ckpt-*.pt"))
    _sh(["dvc", "push", "-q"], origin)
    assert any(remote.rglob("*")), "dvc push sent nothing to the remote"

    clone = tmp_path / "clone"
    _sh(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / "data").exists() and not (clone / GENERATOR).exists()
    # The control: before the pull the clone's pipeline is out of date.
    before = _sh(["dvc", "status", "train_gan"], clone)
    assert "not in cache" in before or "deleted" in before, before

    _sh(["dvc", "pull", "-q"], clone)
    assert _sha(clone / GENERATOR) == _sha(origin / GENERATOR)
    assert _sha(clone / "data" / "manifest.csv") == _sha(origin / "data" / "manifest.csv")
    assert sorted(p.name for p in (clone / "plots/gan/samples").iterdir()) == sorted(
        p.name for p in (origin / "plots/gan/samples").iterdir()
    )
    status = _sh(["dvc", "status"], clone)
    assert "up to date" in status, status

    mtime = (clone / GENERATOR).stat().st_mtime_ns
    repro = _sh(["dvc", "repro", "train_gan"], clone)
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in repro, repro
    assert "train-gan" not in repro  # the trainer never started
    assert (clone / GENERATOR).stat().st_mtime_ns == mtime
    assert not (clone / "outputs" / "gan_checkpoints").exists()
    G, cfg = load_generator(clone / "outputs" / "gan")
    assert (cfg["arch"], cfg["image_size"], cfg["identity"]) == ("warp_refine", 32, True)
