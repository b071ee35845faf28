"""Shared test setup.

Tests never write to a tracking store they did not ask for: tracking is off unless a test turns
it on with a temporary store (see the `mlflow_store` fixture). Third-party data (JAFFE) is used
only where it lies beside the checkout, and those tests skip with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from facecal.paths import with_scripts_on_path

os.environ["FACECAL_TRACKING"] = "off"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MLFLOW_RUN_ID", None)
os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
# As with an activated venv: tools that start `uvicorn`, `facecal` or `dvc` by name (mlflow models
# serve, mlflow run, dvc repro) find this interpreter's scripts even when pytest was started by path.
os.environ["PATH"] = with_scripts_on_path(dict(os.environ))["PATH"]

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACECAL_SHARED", REPO.parent / "shared"))
JAFFE = SHARED / "data" / "jaffe"
UPSTREAM_REFERENCE = SHARED / "reference" / "upstream-calibration"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def jaffe_dir() -> Path:
    if not (JAFFE / "labels.csv").is_file():
        pytest.skip(f"JAFFE is not available at {JAFFE} (research-only data, never in the repo)")
    return JAFFE


@pytest.fixture(scope="session")
def upstream_reference() -> Path:
    if not (UPSTREAM_REFERENCE / "README.md").is_file():
        pytest.skip(f"upstream calibration reference vectors not found at {UPSTREAM_REFERENCE}")
    return UPSTREAM_REFERENCE


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A temporary MLflow tracking store; tracking is switched on for this test only."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("FACECAL_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("FACECAL_PARENT_RUN_ID", raising=False)
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; undone with the rest after the test.
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


# --- the embedded synthetic dataset (facecal.data.synth), rendered once per session ----------


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """8 subjects × 7 emotions × intensities (0.25, 1.0) + one neutral each = 120 faces, 128².
    Read-only: copy or symlink what a test wants to change."""
    from facecal.data.synth import SynthConfig, render_dataset

    out = tmp_path_factory.mktemp("synth_small")
    render_dataset(out, SynthConfig(subjects=8, intensities=(0.25, 1.0)), progress=False)
    return out


@pytest.fixture(scope="session")
def synth_default(tmp_path_factory) -> Path:
    """The default set of `facecal data synth` (40 subjects × (7 × 4 + 1) = 1160 faces, 128²).
    Read-only."""
    from facecal.data.synth import SynthConfig, render_dataset

    out = tmp_path_factory.mktemp("synth_default")
    render_dataset(out, SynthConfig(), progress=False)
    return out


# Debian's Chromium for the web-page tests (never a downloaded browser).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium through playwright; skips, saying why, where either is missing."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()
