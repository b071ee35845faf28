"""`facecal pipeline --preset`: presets/*.yaml become `dvc exp run -S` overrides, every key
checked against params.yaml, and a preset run through real DVC changes the params it names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _project import copy_project
from facecal import config
from facecal.calibrate import CalibrationParams
from facecal.evaluate import EvaluateParams
from facecal.gan.params import GanParams
from facecal.landmarks import LandmarksParams
from facecal.pairs import PairsParams
from facecal.pipeline import preset_overrides, with_preset
from facecal.recognition.fit import CnnParams

TYPED = {
    "landmarks": LandmarksParams,
    "calibration": CalibrationParams,
    "pairs": PairsParams,
    "gan": GanParams,
    "cnn": CnnParams,
    "evaluate": EvaluateParams,
}


@pytest.mark.parametrize("name", ["fer2013-cpu", "fer2013-gpu"])
def test_shipped_presets_name_real_keys_with_valid_values(repo_root, tmp_path, name):
    params = config.read_params(repo_root / "params.yaml")
    merged = with_preset(params, name, repo_root)
    assert merged != params
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(merged))
    for section, cls in TYPED.items():
        config.load_section(cls, section, path)  # types and ranges as the stages check them
    lm = config.load_section(LandmarksParams, "landmarks", path)
    assert lm.split_rename == {"val": "test"} and lm.val_from_train == 0.1


def test_override_strings_and_a_typo(repo_root, tmp_path):
    params = config.read_params(repo_root / "params.yaml")
    preset = tmp_path / "mine.yaml"
    preset.write_text(
        "base: {emotions: [anger, happy]}\n"
        "landmarks: {split_rename: {val: test}}\n"
        "cnn: {init: 'models:/facecal-classifier@champion', epochs: 3}\n"
        "serve: {classifier: null}\n"
    )
    assert preset_overrides(str(preset), params) == [
        "base.emotions=[anger, happy]",
        "++landmarks.split_rename={val: test}",
        "cnn.init='models:/facecal-classifier@champion'",
        "cnn.epochs=3",
        "serve.classifier=null",
    ]
    for text in preset_overrides(str(preset), params):  # what facecal's own --set reads back
        key, value = config.parse_override(text.removeprefix("++"))
        assert value is not None or key == "serve.classifier"
    preset.write_text("gan:\n  epoch: 3\n")
    with pytest.raises(config.ParamsError, match=r"mine\.yaml: gan\.epoch is not a key"):
        preset_overrides(str(preset), params)
    with pytest.raises(config.ParamsError, match="presets: fer2013-cpu, fer2013-gpu"):
        preset_overrides("no-such-preset", params, repo_root)


def test_preset_runs_as_a_dvc_experiment(repo_root, tmp_path):
    from facecal.data.synth import SynthConfig, render_dataset

    proj = tmp_path / "proj"
    proj.mkdir()
    copy_project(repo_root, proj)
    render_dataset(
        proj / "data", SynthConfig(subjects=3, intensities=(1.0,)), workers=1, progress=False
    )
    (proj / "small.yaml").write_text(
        "landmarks:\n  workers: 1\n  overlays: 2\n  split_rename: {val: test}\n"
    )
    env = dict(os.environ, FACECAL_TRACKING="off", DVC_NO_ANALYTICS="1", FACECAL_ROOT=str(proj))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "facecal"), "pipeline", "landmarks", "--single-item",
         "--preset", "small.yaml"],
        cwd=proj, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dvc exp run -S landmarks.workers=1 -S landmarks.overlays=2" in done.stderr
    applied = yaml.safe_load((proj / "params.yaml").read_text())["landmarks"]
    assert applied["workers"] == 1 and applied["split_rename"] == {"val": "test"}
    assert (proj / "metrics" / "landmarks.json").is_file()
