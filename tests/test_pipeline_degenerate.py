"""The whole pipeline on data it cannot fully use: no weak faces and one emotion (as CK+ crops
imported with onsets as neutral). Every stage completes and says what it could not compute."""

from __future__ import annotations

import json

import pytest
import yaml

from facecal import cli
from facecal.data.synth import SynthConfig, render_dataset

# Stage commands in dvc.yaml's order (what `dvc repro` runs, bare: paths are the defaults).
STAGES = [
    "landmarks",
    "calibrate",
    "pairs",
    "train-gan",
    "generate",
    "train-cnn",
    "evaluate",
    "export",
    "export-cnn",
    "register",
    "register-cnn",
]


def _small_params(repo_root) -> dict:
    p = yaml.safe_load((repo_root / "params.yaml").read_text())
    p["landmarks"]["workers"] = 1
    p["gan"].update(epochs=1, batch_size=4, checkpoint_every=1000, sample_every=1000, samples=2)
    p["gan"]["pix2pix"].update(ngf=8, ndf=8)
    p["gan"]["warp_refine"].update(ngf=8, ndf=8)  # the default arch: every stage on warp_refine
    p["cnn"].update(epochs=2, patience=2, seeds=2, workers=1, width=8)
    p["evaluate"].update(bootstrap=100, fd_bootstrap=10)
    p["export"].update(fp16=False, parity_batch=2)
    return p


@pytest.mark.slow  # ~1 min: every stage, each on 12 faces
def test_pipeline_completes_on_data_without_weak_faces_and_with_one_emotion(
    repo_root, tmp_path, monkeypatch, mlflow_store
):
    # 6 subjects × (neutral + happy at full intensity): no weak face, one emotion.
    render_dataset(
        tmp_path / "data",
        SynthConfig(subjects=6, intensities=(1.0,), emotions=("happy",)),
        progress=False,
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_small_params(repo_root)))
    monkeypatch.chdir(tmp_path)
    for stage in STAGES:
        assert cli.main([stage]) == 0, stage

    # generate: the neutral faces, and a sweep picture even without weak faces to sweep
    assert (tmp_path / "plots/generate/sweep.png").stat().st_size > 500
    index = (tmp_path / "outputs/generate/index.csv").read_text().splitlines()
    assert len(index) > 1 and all(",neutral," in row for row in index[1:])

    # train_cnn: real_all is trained (neutral vs happy); the regimes made of weak or generated
    # faces have only neutral ones and are skipped, each with its reason
    models = json.loads((tmp_path / "outputs/cnn/models.json").read_text())
    assert models["regimes"] == {"real_all": ["real_all.pt", "real_all.s1.pt"]}
    skipped = models["skipped"]
    assert set(skipped) == {
        "real_low",
        "gen_uncalibrated",
        "gen_calibrated",
        "real_low+gen_calibrated",
    }
    assert all("1 class(es) (neutral)" in why for why in skipped.values())
    cnn = json.loads((tmp_path / "metrics/cnn.json").read_text())
    assert cnn["not_trained"] == skipped and cnn["real_all"]["n_train"] > 0

    # evaluate: real_all over both seeds; what it could not compare is listed with why
    ev = json.loads((tmp_path / "metrics/eval.json").read_text())
    assert ev["n_test_weak"] == 0 and ev["regimes"]["real_all"]["n_seeds"] == 2
    nc = ev["not_computed"]
    assert "regime(s) without a model" in nc["gen_calibrated_vs_gen_uncalibrated"]
    assert "regime(s) without a model" in nc["real_low+gen_calibrated_vs_real_low"]
    assert "no weak test faces" in nc["ssim_calibrated"]
    assert ev["ssim_calibrated"] is None and len(ev["generator_hash"]) == 16
    report = (tmp_path / "eval/report.md").read_text()
    assert "## Not computed" in report and "- ssim_calibrated: no weak test faces" in report

    # register: the version is registered, the gate keeps the (absent) champion and says why
    reg = json.loads((tmp_path / "outputs/register/registration.json").read_text())
    assert reg["version"] == "1" and reg["gate"]["decision"] == "kept_champion"
    assert "ssim_calibrated' is None (no weak test faces" in reg["gate"]["reason"]

    # the classifier: real_all is exported and registered through its own gate
    cls = json.loads((tmp_path / "outputs/register_cnn/registration.json").read_text())
    assert cls["model_name"] == "facecal-classifier" and cls["gate"]["decision"] == "promoted"
    assert json.loads((tmp_path / "metrics/export_cnn.json").read_text())["passed"] is True
