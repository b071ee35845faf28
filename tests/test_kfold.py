"""`facecal kfold`: every regime under subject-independent k-fold, a generator per fold."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from facecal import cli, tables
from facecal.data.synth import SynthConfig, render_dataset
from facecal.kfold import fingerprint, pool


def test_pooling_counts_an_untrained_fold_as_wrong_and_keeps_every_fold():
    folds = [
        {"truth": ["happy", "neutral"], "regimes": {"a": [["happy", "neutral"]]}},
        {"truth": ["happy", "happy"], "regimes": {"a": [["happy", "neutral"]]}},
        {"truth": ["neutral"], "regimes": {}},  # regime a not trained on this fold
    ]
    r = pool(folds, 0.95)["a"]
    t = r["trainings"][0]
    assert (t["correct"], t["n"]) == (3, 5) and t["accuracy"] == pytest.approx(0.6)
    assert [p.get("accuracy") for p in t["per_fold"]] == [1.0, 0.5, None]
    assert t["per_fold"][2]["trained"] is False
    assert t["accuracy_lo"] < 0.6 < t["accuracy_hi"] and r["accuracy_sd"] == 0.0
    # macro-F1 over the true classes: happy 2·2/(3+2), neutral 2·1/(2+2)
    assert t["macro_f1"] == pytest.approx((0.8 + 0.5) / 2)


def test_the_fingerprint_follows_params_table_and_deal(tmp_path):
    params, table = tmp_path / "params.yaml", tmp_path / "t.parquet"
    params.write_text("a: 1\n")
    table.write_bytes(b"x")
    folds = [["s1"], ["s2"], ["s3"]]
    fp = fingerprint(params, table, folds, 0)
    assert fp == fingerprint(params, table, folds, 0)
    assert fp != fingerprint(params, table, folds, 1)
    assert fp != fingerprint(params, table, [["s2"], ["s1"], ["s3"]], 0)
    params.write_text("a: 2\n")
    assert fp != fingerprint(params, table, folds, 0)


@pytest.mark.slow  # ~2 min: three folds, each a whole calibrate → train-cnn pipeline on 20 faces
def test_kfold_trains_a_generator_per_fold_that_never_sees_the_fold_test_subjects(
    repo_root, tmp_path, monkeypatch
):
    from test_pipeline_degenerate import _small_params

    render_dataset(
        tmp_path / "data",
        SynthConfig(subjects=4, intensities=(0.25, 1.0), emotions=("happy", "surprise")),
        progress=False,
    )
    p = _small_params(repo_root)
    p["cnn"].update(seeds=1, regimes=["real_all", "gen_calibrated"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FACECAL_TRACKING", "off")
    assert cli.main(["landmarks"]) == 0
    table = tables.read_table(tmp_path / "outputs/landmarks/landmarks.parquet")
    usable = int((table["status"] == "ok").sum())
    assert cli.main(["kfold", "--folds", "3", "--quiet"]) == 0

    summary = json.loads((tmp_path / "metrics/kfold.json").read_text())
    assert summary["k"] == 3 and set(summary["regimes"]) == {"real_all", "gen_calibrated"}
    dealt = [s for f in summary["folds"] for s in f["test_subjects"]]
    assert sorted(dealt) == sorted(set(table["subject"]))  # every subject tested once
    for regime, r in summary["regimes"].items():
        t = r["trainings"][0]
        assert t["n"] == usable == sum(f["n"] for f in t["per_fold"]), regime
        assert t["accuracy_lo"] <= t["accuracy"] <= t["accuracy_hi"]

    for f, fold in enumerate(summary["folds"]):
        test = set(fold["test_subjects"])
        d = tmp_path / f"outputs/kfold/fold{f}"
        lm = tables.read_table(d / "landmarks.parquet")
        assert set(lm.loc[lm["split"] == "test", "subject"]) == test
        # The generator's training pairs, and the generated faces a CNN trains on, are of
        # training subjects only.
        pairs = pd.read_csv(d / "pairs/index.csv", dtype={"subject": str})
        assert len(pairs[pairs["split"] == "train"]) > 0
        assert not set(pairs.loc[pairs["split"] == "train", "subject"]) & test
        assert not set(pairs.loc[pairs["split"] == "val", "subject"]) & test
        gen = pd.read_csv(d / "generate/index.csv", dtype={"subject": str})
        assert not set(gen.loc[gen["split"] == "train", "subject"]) & test
        assert set(gen.loc[gen["split"] == "test", "subject"]) <= test
        pred = json.loads((d / "predictions.json").read_text())
        assert pred["subjects"] == sorted(test)

    # A rerun with the same inputs resumes every fold from its predictions.
    stamps = [
        (tmp_path / f"outputs/kfold/fold{f}/predictions.json").stat().st_mtime_ns for f in range(3)
    ]
    assert cli.main(["kfold", "--folds", "3", "--quiet"]) == 0
    again = json.loads((tmp_path / "metrics/kfold.json").read_text())
    assert again == summary
    assert stamps == [
        (tmp_path / f"outputs/kfold/fold{f}/predictions.json").stat().st_mtime_ns for f in range(3)
    ]
