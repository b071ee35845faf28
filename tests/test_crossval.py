"""facecal.crossval: the subject-independent k-fold protocol of the real regimes."""

from __future__ import annotations

import pytest

from _faces import make_dataset
from facecal.crossval import fold_table, run_kfold, subject_folds
from facecal.manifest import Report
from facecal.recognition.cnn import ClassifierError
from facecal.recognition.fit import CnnParams


def test_folds_deal_every_subject_once():
    subjects = [f"s{i}" for i in range(10)] * 3
    loso = subject_folds(subjects, 0, seed=0)
    assert len(loso) == 10 and all(len(f) == 1 for f in loso)
    assert sorted(s for f in loso for s in f) == sorted(set(subjects))
    three = subject_folds(subjects, 3, seed=0)
    assert sorted(len(f) for f in three) == [3, 3, 4]
    assert sorted(s for f in three for s in f) == sorted(set(subjects))
    assert subject_folds(subjects, 3, seed=0) == three  # seeded
    assert subject_folds(subjects, 99, seed=0) == subject_folds(subjects, 0, seed=0)
    with pytest.raises(ClassifierError, match="≥ 3 subjects"):
        subject_folds(["a", "b"], 0, seed=0)
    with pytest.raises(ClassifierError, match="k ≥ 3"):
        subject_folds(subjects, 2, seed=0)


def test_every_face_is_tested_once_and_never_trained_on_in_its_fold(tmp_path):
    lm = make_dataset(tmp_path, subjects=4, emotions=("neutral", "happy", "surprise"))
    lm["split"] = "train"  # k-fold ignores the table's split
    folds = subject_folds(list(lm["subject"]), 0, seed=0)
    for f in range(len(folds)):
        t = fold_table(lm, folds, f)
        test = set(t.loc[t["split"] == "test", "subject"])
        val = set(t.loc[t["split"] == "val", "subject"])
        train = set(t.loc[t["split"] == "train", "subject"])
        assert test == set(folds[f]) and not (test & val) and not (test & train)
        assert not (val & train) and test | val | train == set(lm["subject"])
    cnn = CnnParams(epochs=2, patience=2, batch_size=8, augment=False, width=8)
    weak = set(lm.loc[(lm["emotion"] != "neutral") & (lm["intensity"] < 1), "image"])
    classes = ["neutral", "happy", "surprise"]
    res = run_kfold(
        lm, weak, classes, tmp_path, 64, cnn, 0, 0, 0.95, ["real_all", "real_low"], Report()
    )
    assert res["k"] == 4
    for regime in ("real_all", "real_low"):
        d = res["regimes"][regime]
        # Every usable face is a test face exactly once over the folds.
        assert d["n"] == len(lm) == sum(p["n"] for p in d["per_fold"])
        assert d["accuracy_lo"] <= d["accuracy"] <= d["accuracy_hi"]
        assert d["correct"] == round(d["accuracy"] * d["n"])
    # real_low trains on weak + neutral faces only: fewer than real_all in every fold.
    lows = [p["n_train"] for p in res["regimes"]["real_low"]["per_fold"]]
    alls = [p["n_train"] for p in res["regimes"]["real_all"]["per_fold"]]
    assert all(lo < a for lo, a in zip(lows, alls))
    again = run_kfold(lm, weak, classes, tmp_path, 64, cnn, 0, 0, 0.95, ["real_all"], Report())
    assert again["regimes"]["real_all"] == res["regimes"]["real_all"]  # deterministic
