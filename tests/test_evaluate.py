"""facecal.evaluate (+ the tail of the pipeline end to end on small constructed inputs)."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pandas as pd
import pytest

from _tail import build_project, weak_images
from facecal import evaluate, tables
from facecal.classifier import REGIMES, CnnParams, run_train_cnn
from facecal.classifier import BaseParams as CnnBase
from facecal.evaluate import (
    QUALITY_SETS,
    EvaluateParams,
    eval_set_hash,
    mlflow_metrics,
    run_evaluate,
    strong_references,
)
from facecal.generate import BaseParams, GenerateParams, run_generate


@pytest.fixture(scope="module")
def tail(tmp_path_factory):
    """generate → train-cnn → evaluate on 6 drawn subjects (3 train, 1 val, 2 test)."""
    p = build_project(tmp_path_factory.mktemp("tail"))
    root = p["root"]
    run_generate(
        GenerateParams(batch_size=32, sweep_faces=2),
        BaseParams(),
        p["data"],
        p["table"],
        p["calibrated"],
        p["gan"],
        root / "outputs/generate",
        root / "plots/generate",
    )
    cnn = CnnParams(epochs=3, patience=3, batch_size=16)
    run_train_cnn(
        cnn,
        CnnBase(emotions=["happy", "surprise", "anger"]),
        p["data"],
        p["table"],
        p["calibrated"],
        root / "outputs/generate",
        root / "outputs/cnn",
        root / "plots/cnn",
        root / "metrics/cnn.json",
    )
    p.update(generate=root / "outputs/generate", cnn=root / "outputs/cnn")
    # The stage command itself, logging to a temporary MLflow store (checked below).
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACECAL_TRACKING", "on")
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("FACECAL_PARENT_RUN_ID", raising=False)
        out = root / "eval1"
        args = argparse.Namespace(
            data=p["data"],
            table=p["table"],
            calibrated=p["calibrated"],
            gan=p["gan"],
            generated=p["generate"],
            cnn=p["cnn"],
            metrics=out / "eval.json",
            report=out / "report.md",
            plots=out / "plots",
            params=None,
            overrides=["bootstrap=200", "fd_bootstrap=20"],
        )
        assert evaluate.main(args) == 0
    p["mlflow"] = uri
    return p, json.loads((out / "eval.json").read_text())


def _evaluate(p, out, **kw):
    return run_evaluate(
        EvaluateParams(bootstrap=200, fd_bootstrap=20, **kw),
        0,
        p["data"],
        p["table"],
        p["calibrated"],
        p["gan"],
        p["generate"],
        p["cnn"],
        out / "eval.json",
        out / "report.md",
        out / "plots",
    )


def test_every_regime_is_scored_on_the_real_test_split_with_intervals(tail):
    p, res = tail
    lm = tables.read_table(p["table"])
    test = lm[lm["split"] == "test"]
    weak = weak_images(lm)
    assert res["n_test"] == len(test) and res["n_test_weak"] == len(weak & set(test["image"]))
    assert set(res["regimes"]) == set(REGIMES)
    for regime, d in res["regimes"].items():
        assert d["n"] == len(test) and d["weak_n"] == res["n_test_weak"]
        assert d["accuracy"] == pytest.approx(d["correct"] / d["n"])
        assert d["accuracy_lo"] <= d["accuracy"] <= d["accuracy_hi"]
        assert (
            0 <= d["accuracy_lo"]
            and d["accuracy_hi"] <= 1
            and d["accuracy_hi"] - d["accuracy_lo"] > 0.1
        )
        assert set(d["recall"]) == {"neutral", "anger", "happy", "surprise"}
        assert 0 <= d["macro_f1"] <= 1
        csv = pd.read_csv(p["root"] / "eval1/plots" / f"confusion_{regime}.csv")
        assert list(csv.columns) == ["image", "actual", "predicted"] and len(csv) == len(test)
        assert (csv["actual"] == csv["image"].map(lm.set_index("image")["emotion"])).all()
        assert (csv["actual"] == csv["predicted"]).sum() == d["correct"]
    diff = res["gen_calibrated_vs_gen_uncalibrated"]
    ra, rb = res["regimes"]["gen_calibrated"], res["regimes"]["gen_uncalibrated"]
    assert diff["diff"] == pytest.approx(ra["accuracy"] - rb["accuracy"])
    assert diff["a_only"] - diff["b_only"] == ra["correct"] - rb["correct"]
    assert diff["lo"] <= diff["diff"] <= diff["hi"] and diff["n"] == len(test)


def test_psnr_argmax_quality_and_landmarks_are_reported(tail):
    p, res = tail
    lm = tables.read_table(p["table"])
    test = lm[lm["split"] == "test"]
    ps = res["psnr_argmax"]
    assert ps["candidates"] == 3 and ps["chance"] == pytest.approx(1 / 3)
    assert ps["n"] == int((test["emotion"] != "neutral").sum())
    assert ps["accuracy_lo"] <= ps["accuracy"] <= ps["accuracy_hi"]
    assert sum(v["n"] for v in ps["per_emotion"].values()) == ps["n"]
    q = res["quality"]
    assert q["reconstruction"]["n"] == len(test)
    # Every weak test face has a more intense face of its subject and emotion (intensity 1.0).
    assert (
        q["calibrated"]["n"] == q["uncalibrated"]["n"] == q["real_weak"]["n"] == res["n_test_weak"]
    )
    for name in ("reconstruction", "calibrated", "uncalibrated", "real_weak"):
        for m in ("ssim", "psnr", "l1"):
            assert q[name][f"{m}_lo"] <= q[name][m] <= q[name][f"{m}_hi"], (name, m)
        # FD is biased upward at small n, so its percentile interval may sit above the estimate.
        assert q[name]["fd"] >= 0 and q[name]["fd_lo"] <= q[name]["fd_hi"]
    assert res["ssim_calibrated"] == q["calibrated"]["ssim"]
    # The real weak face resembles its own strong face far more than an untrained generator's.
    assert q["real_weak"]["ssim"] > q["calibrated"]["ssim"] + 0.2
    # The pure warp moves the real weak face's own pixels: as close as the face itself, or closer.
    assert q["warp_calibrated"]["n"] == res["n_test_weak"]
    assert q["warp_calibrated"]["ssim"] > q["calibrated"]["ssim"] + 0.2
    assert q["warp_calibrated"]["ssim"] >= q["real_weak"]["ssim"] - 0.02
    # The judge (real_all, seed 0) reads every face of every set against its intended emotion.
    for name in QUALITY_SETS:
        if q[name]["n"]:
            assert q[name]["judge_n"] == q[name]["n"], name
            assert q[name]["judge_lo"] <= q[name]["judge_accuracy"] <= q[name]["judge_hi"]
    # The real weak faces read as their emotion at least as often as an untrained generator's.
    assert q["real_weak"]["judge_accuracy"] >= q["calibrated"]["judge_accuracy"]
    for _name, d in res["landmarks"].items():
        assert (
            d["detected"] <= d["n"]
            and d["detection_rate_lo"] <= d["detection_rate"] <= d["detection_rate_hi"]
        )
    assert res["landmarks"]["real"]["n"] == len(test)
    assert len(res["eval_set_hash"]) == 16


def test_report_and_json_agree_and_every_row_has_counts_and_intervals(tail):
    p, res = tail
    on_disk = json.loads((p["root"] / "eval1/eval.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert isinstance(on_disk["ssim_calibrated"], float) and on_disk["eval_set_hash"]
    report = (p["root"] / "eval1/report.md").read_text()
    num = r"-?\d+(?:\.\d+)?(?:e-?\d+)?"
    interval = rf"{num} \[{num}, {num}\]"
    for regime in REGIMES:
        row = next(line for line in report.splitlines() if line.startswith(f"| {regime} |"))
        assert len(re.findall(interval + r" \(\d+/\d+\)", row)) == 2, row
    for name in QUALITY_SETS:
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        # SSIM, PSNR, L1, FD, judge — where the set has faces
        assert len(re.findall(interval, row)) == (5 if res["quality"][name]["n"] else 0), row
    assert re.search(r"\| all \| " + interval + r" \(\d+/\d+\) \| 3 ", report)
    # over seeds: mean ± sd (min – max), the seed-averaged interval, the per-seed signs, a verdict
    snum = r"[-+]?\d+\.\d+"
    spread = rf"{snum} ± {snum} \({snum} – {snum}\)"
    sint = rf"{snum} \[{snum}, {snum}\]"
    assert re.search(
        rf"\| gen_calibrated − gen_uncalibrated \| all \| {spread} \| {sint} \| \d / \d of 3 \| "
        rf"[a-zA-Z ]+ \| {sint} \|",
        report,
    )
    for regime in REGIMES:
        d = res["regimes"][regime]
        assert d["n_seeds"] == 3 and len(d["accuracy_seeds"]) == 3
        assert d["accuracy_min"] <= d["accuracy_mean"] <= d["accuracy_max"]
        assert d["accuracy_seeds"][0] == d["accuracy"]  # seed 0 is the detailed model
    for key in ("gen_calibrated_vs_gen_uncalibrated", "real_low+gen_calibrated_vs_real_low"):
        d = res[key]
        assert d["n_seeds"] == 3 and d["diff_seeds"][0] == d["diff"]
        assert d["pooled_lo"] <= d["diff_mean"] <= d["pooled_hi"]
        assert d["diff_mean"] == pytest.approx(np.mean(d["diff_seeds"]))
        assert d["verdict"] in {
            "A better on every seed",
            "B better on every seed",
            "no difference on any seed",
            "depends on the seed",
        }
    assert res["not_computed"] == {} and len(res["generator_hash"]) == 16
    assert (p["root"] / "eval1/plots/confusion.png").stat().st_size > 1000


def test_evaluation_is_deterministic(tail, tmp_path):
    p, res = tail
    again = json.loads(json.dumps(_evaluate(p, tmp_path / "again")))
    assert again == res


def test_kfold_protocol_tests_every_subject_once_beside_the_holdout(tail, tmp_path):
    p, res = tail
    kf = _evaluate(p, tmp_path / "kfold", protocol="kfold", folds=3)
    # The holdout figures are unchanged; the k-fold section comes in addition.
    assert kf["regimes"] == res["regimes"]
    lm = tables.read_table(p["table"])
    classes = res["classes"].split(",")
    usable = lm[(lm["status"] == "ok") & lm["emotion"].isin(classes)]
    folds = kf["kfold"]["folds"]
    assert kf["kfold"]["k"] == 3 == len(folds)
    assert sorted(s for f in folds for s in f["test_subjects"]) == sorted(set(usable["subject"]))
    assert kf["kfold"]["regimes"]["real_all"]["n"] == len(usable)
    assert "kfold gen_calibrated" in kf["not_computed"]
    report = (tmp_path / "kfold/report.md").read_text()
    assert "## Subject-independent k-fold (k = 3, real regimes)" in report
    assert re.search(r"\| real_all \| \d\.\d{3} \[", report)


def test_eval_set_hash_tracks_names_pixels_and_landmarks():
    rng = np.random.default_rng(0)
    names, crops = ["a.png", "b.png"], rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    pts, cal = rng.normal(size=(2, 68, 2)), rng.normal(size=(2, 68, 2))
    h = eval_set_hash(names, crops, pts, cal)
    assert h == eval_set_hash(list(names), crops.copy(), pts.copy(), cal.copy())
    crops2 = crops.copy()
    crops2[0, 0, 0, 0] ^= 1
    cal2 = cal.copy()
    cal2[1, 5, 0] += 0.01
    assert (
        len(
            {
                h,
                eval_set_hash(["a.png", "c.png"], crops, pts, cal),
                eval_set_hash(names, crops2, pts, cal),
                eval_set_hash(names, crops, pts, cal2),
            }
        )
        == 4
    )
    # Round-off far below a pixel does not change it.
    assert eval_set_hash(names, crops, pts + 1e-6, cal) == h
    # Which faces are weak (the gate metric's subset) is part of the set.
    hw = eval_set_hash(names, crops, pts, cal, weak=np.array([True, False]))
    assert hw != h and hw != eval_set_hash(names, crops, pts, cal, weak=np.array([False, True]))


def test_strong_reference_is_the_most_intense_face_of_the_same_subject_and_emotion():
    faces = pd.DataFrame(
        {
            "subject": ["a", "a", "a", "a", "b", "a"],
            "emotion": ["happy", "happy", "happy", "sad", "happy", "happy"],
            "intensity": [0.25, 0.5, 1.0, 1.0, 1.0, np.nan],
        },
        index=[10, 11, 12, 13, 14, 15],
    )
    assert strong_references(faces, [10, 11, 12, 15]) == {10: 12, 11: 12}


def test_mlflow_names_are_sanitised():
    out = mlflow_metrics(
        {
            "regimes": {"real_low+gen_calibrated": {"accuracy": 0.5, "n": 3}},
            "eval_set_hash": "abc",
            "x": float("nan"),
        }
    )
    assert out == {
        "regimes.real_low_plus_gen_calibrated.accuracy": 0.5,
        "regimes.real_low_plus_gen_calibrated.n": 3.0,
    }


def test_evaluate_command_logs_to_mlflow(tail):
    import mlflow

    p, res = tail
    mlflow.set_tracking_uri(p["mlflow"])
    runs = mlflow.search_runs(experiment_names=["facecal"], output_format="list")
    run = next(r for r in runs if r.data.tags.get("facecal.stage") == "evaluate")
    assert run.data.metrics["ssim_calibrated"] == pytest.approx(res["ssim_calibrated"])
    assert run.data.metrics["regimes.real_low_plus_gen_calibrated.accuracy"] == pytest.approx(
        res["regimes"]["real_low+gen_calibrated"]["accuracy"]
    )
    assert run.data.params["evaluate.bootstrap"] == "200"
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"eval.json", "report.md", "plots"} <= names


def test_a_corrupt_generated_face_costs_only_its_own_pair(tail, tmp_path):
    import shutil

    import pandas as pd

    p, res = tail
    gen = tmp_path / "generate"
    shutil.copytree(p["generate"], gen)
    index = pd.read_csv(gen / "index.csv")
    victim = index[(index["split"] == "test") & (index["kind"] == "uncalibrated")].iloc[0]
    (gen / victim["path"]).write_bytes(b"not a png")
    out = _evaluate({**p, "generate": gen}, tmp_path / "e")
    n_weak = res["n_test_weak"]
    assert out["quality"]["calibrated"]["n"] == n_weak  # the other kind keeps every face
    assert out["quality"]["uncalibrated"]["n"] == n_weak - 1
    assert out["ssim_calibrated_minus_uncalibrated"]["n"] == n_weak - 1  # paired by face
    # the generator against the warp of the same faces: every calibrated face has both
    d = out["ssim_calibrated_minus_warp_calibrated"]
    q = out["quality"]
    assert d["n"] == n_weak and d["lo"] <= d["diff"] <= d["hi"]
    assert d["diff"] == pytest.approx(q["calibrated"]["ssim"] - q["warp_calibrated"]["ssim"])
    assert out["skipped"] >= 1 and "(uncalibrated)" in (tmp_path / "e" / "report.md").read_text()

    (gen / "index.csv").unlink()
    with pytest.raises(
        evaluate.EvaluateError, match=r"index\.csv: generated faces index not found"
    ):
        _evaluate({**p, "generate": gen}, tmp_path / "f")
