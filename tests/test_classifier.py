"""facecal.classifier: regime data selection, the network's training behaviour."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from _faces import make_dataset
from _tail import build_project, weak_images
from facecal import tables
from facecal.classifier import (
    REGIMES,
    ClassifierError,
    CnnParams,
    class_list,
    crop_faces,
    regime_seed,
    select_training_set,
    train_one,
)
from facecal.manifest import Report
from facecal.recognition.cnn import ExpressionCNN
from facecal.recognition.fit import augment


def _generated_index(lm: pd.DataFrame) -> pd.DataFrame:
    """What `facecal generate` indexes: two kinds per weak face, one per neutral face."""
    weak = weak_images(lm)
    rows = []
    for r in lm.itertuples():
        kinds = (
            ("calibrated", "uncalibrated")
            if r.image in weak
            else ("neutral",)
            if r.emotion == "neutral"
            else ()
        )
        for k in kinds:
            rows.append(
                {
                    "path": f"{r.split}/{k}/IID{r.Index}.png",
                    "split": r.split,
                    "kind": k,
                    "subject": r.subject,
                    "emotion": r.emotion,
                    "image": r.image,
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tables_(tmp_path_factory):
    p = build_project(tmp_path_factory.mktemp("cls"))
    lm = tables.read_table(p["table"])
    cal = tables.read_table(p["calibrated"])
    return p, lm, cal, _generated_index(lm)


def test_regimes_select_exactly_their_faces_and_never_a_held_out_subject(tables_):
    _, lm, cal, index = tables_
    classes = class_list(lm, ["happy", "surprise", "anger"])
    assert classes == ["neutral", "anger", "happy", "surprise"]  # EMOTIONS order
    train = lm[lm["split"] == "train"]
    weak = weak_images(lm)
    held_out = set(lm.loc[lm["split"] != "train", "subject"])
    expected = {
        "real_all": (len(train), 0),
        # weak = intensity ≤ 0.5 of 3 emotions × 2 intensities, + 1 neutral, per train subject
        "real_low": (3 * (3 * 2 + 1), 0),
        "gen_uncalibrated": (0, 3 * (3 * 2 + 1)),
        "gen_calibrated": (0, 3 * (3 * 2 + 1)),
        "real_low+gen_calibrated": (3 * 7, 3 * 7),
    }
    for regime in REGIMES:
        ts = select_training_set(regime, lm, cal, index, classes)
        assert (len(ts.real), len(ts.generated)) == expected[regime], regime
        assert not ts.subjects & held_out, regime
        assert set(ts.real["split"]) <= {"train"} and set(ts.generated["split"]) <= {"train"}
        if regime == "real_low":
            assert set(ts.real["image"]) == (
                {i for i in train["image"] if i in weak}
                | set(train.loc[train["emotion"] == "neutral", "image"])
            )
        if regime in ("gen_calibrated", "real_low+gen_calibrated"):
            assert set(ts.generated["kind"]) == {"calibrated", "neutral"}
        if regime == "gen_uncalibrated":
            assert set(ts.generated["kind"]) == {"uncalibrated", "neutral"}
        # every regime has every class
        labels = set(ts.real["emotion"]) | set(ts.generated["emotion"])
        assert labels == set(classes), regime


def test_a_generated_face_of_a_test_subject_is_refused(tables_):
    _, lm, cal, index = tables_
    bad = index.copy()
    test_subject = lm.loc[lm["split"] == "test", "subject"].iloc[0]
    bad.loc[0, "subject"] = test_subject  # claims train split, belongs to a test subject
    with pytest.raises(ClassifierError, match=test_subject):
        select_training_set(
            "gen_calibrated", lm, cal, bad, ["neutral", "anger", "happy", "surprise"]
        )
    with pytest.raises(ClassifierError, match="unknown regime"):
        select_training_set("real_some", lm, cal, index, ["neutral", "happy"])


def test_crop_faces_reports_a_broken_image_and_keeps_the_rest(tables_):
    p, lm, _, _ = tables_
    rows = lm[lm["split"] == "val"].reset_index(drop=True)
    broken = p["data"] / rows.loc[1, "image"]
    original = broken.read_bytes()
    try:
        broken.write_bytes(original[:40])
        report = Report()
        crops, ok = crop_faces(p["data"], rows, 64, report)
    finally:
        broken.write_bytes(original)
    assert ok.tolist() == [i != 1 for i in range(len(rows))]
    assert len(report) == 1 and rows.loc[1, "image"] in report.problems[0].item
    assert crops.shape == (len(rows), 64, 64, 3) and crops[ok].std() > 10


def test_augment_keeps_range_and_is_seeded():
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    p = CnnParams()
    a = augment(x, p, torch.Generator().manual_seed(1))
    b = augment(x, p, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= -1 and a.max() <= 1 and not torch.equal(a, x)
    # Pure mirror: with every other perturbation off, each image is flipped or untouched.
    flip_only = CnnParams(
        hflip=True, max_shift=0, max_rotation=0, max_scale=0, brightness=0, contrast=0
    )
    y = augment(torch.cat([x] * 4), flip_only, torch.Generator().manual_seed(3))
    mirrored = [torch.allclose(y[i], x[i % 4].flip(-1), atol=1e-5) for i in range(16)]
    kept = [torch.allclose(y[i], x[i % 4], atol=1e-5) for i in range(16)]
    assert all(m != k for m, k in zip(mirrored, kept)) and 0 < sum(mirrored) < 16
    # Mirroring is off by default (see params.yaml: contempt is one-sided in the synthetic set).
    no_flip = CnnParams(max_shift=0, max_rotation=0, max_scale=0, brightness=0, contrast=0)
    assert torch.allclose(augment(x, no_flip, torch.Generator().manual_seed(3)), x, atol=1e-5)


def test_training_learns_drawn_expressions_and_is_deterministic(tmp_path):
    # Two expressions of 4 subjects for training, 2 other subjects for validation.
    lm = make_dataset(
        tmp_path,
        subjects=6,
        emotions=("happy", "surprise"),
        intensities=(0.75, 1.0),
        splits={0: "train", 1: "train", 2: "train", 3: "train", 4: "val", 5: "val"},
    )
    crops, ok = crop_faces(tmp_path, lm, 64, Report())
    assert ok.all()
    y = (lm["emotion"] == "surprise").to_numpy().astype(np.int64)
    tr, va = (lm["split"] == "train").to_numpy(), (lm["split"] == "val").to_numpy()
    params = CnnParams(epochs=14, patience=14, batch_size=4, lr=0.003, augment=False)
    torch.set_num_threads(1)
    r1 = train_one(crops[tr], y[tr], crops[va], y[va], 2, params, regime_seed(0, "real_all"))
    assert r1.val_accuracy >= 7 / 8  # 8 faces of subjects it never saw; chance is 1/2
    assert len(r1.curve) == r1.epochs_run and r1.curve[0]["train_loss"] > r1.curve[-1]["train_loss"]
    short = CnnParams(epochs=2, batch_size=8)  # with augmentation: its randomness is seeded too
    r2 = train_one(crops[tr], y[tr], crops[va], y[va], 2, short, regime_seed(0, "real_all"))
    r3 = train_one(crops[tr], y[tr], crops[va], y[va], 2, short, regime_seed(0, "real_all"))
    for k, v in r2.model.state_dict().items():
        assert torch.equal(v, r3.model.state_dict()[k]), k
    assert regime_seed(0, "real_all") != regime_seed(0, "real_low") != regime_seed(1, "real_low")


def test_network_shapes_and_bad_params():
    m = ExpressionCNN(5, width=8).eval()
    x = torch.zeros(3, 3, 64, 64)
    assert m(x).shape == (3, 5) and m.features(x).shape == (3, 128) and m.feature_dim == 128
    big = ExpressionCNN(5, width=8, image_size=128).eval()
    assert big(torch.zeros(2, 3, 128, 128)).shape == (2, 5)
    with pytest.raises(ClassifierError, match="multiple of 16"):
        ExpressionCNN(5, image_size=72)
    with pytest.raises(ClassifierError, match="real_most"):
        CnnParams(regimes=["real_most"])
    with pytest.raises(ClassifierError, match="patience"):
        CnnParams(patience=0)


def test_stage_writes_models_curves_and_resumes_finished_regimes(tables_, tmp_path):
    import json

    from facecal.classifier import BaseParams, load_classifier, run_train_cnn

    p, lm, _, _ = tables_
    params = CnnParams(
        regimes=["real_all", "real_low"], epochs=2, patience=2, batch_size=16, workers=1
    )
    base = BaseParams(emotions=["happy", "surprise", "anger"])
    paths = (
        p["data"],
        p["table"],
        p["calibrated"],
        tmp_path / "none",
        tmp_path / "cnn",
        tmp_path / "plots",
        tmp_path / "cnn.json",
    )
    first = run_train_cnn(params, base, *paths)
    assert set(first) >= {"real_all", "real_low"} and first["val_n"] == int(
        (lm["split"] == "val").sum()
    )
    model, meta = load_classifier(tmp_path / "cnn/real_all.pt")
    assert meta["classes"] == ["neutral", "anger", "happy", "surprise"]
    assert meta["n_train"] == int((lm["split"] == "train").sum()) and meta["epochs_run"] == 2
    curves = (tmp_path / "plots/curves.csv").read_text().splitlines()
    assert curves[0] == "epoch,regime,train_loss,val_accuracy" and len(curves) == 1 + 2 * 2
    # The regimes' faces waited on disk for their workers; nothing of that is left behind.
    assert not list(tmp_path.glob(".train-cnn-inputs-*"))
    mtime = (tmp_path / "cnn/real_all.pt").stat().st_mtime_ns
    again = run_train_cnn(params, base, *paths)  # same inputs and params: nothing retrained
    assert again == first and (tmp_path / "cnn/real_all.pt").stat().st_mtime_ns == mtime
    assert json.loads((tmp_path / "cnn.json").read_text()) == json.loads(json.dumps(first))
    changed = run_train_cnn(
        CnnParams(regimes=["real_all"], epochs=1, batch_size=16, workers=1), base, *paths
    )
    assert changed["real_all"]["epochs_run"] == 1
    assert (tmp_path / "cnn/real_all.pt").stat().st_mtime_ns != mtime


def test_vgg_fine_tunes_from_a_recognizer_with_classes_mapped_by_name(tmp_path):
    from facecal.recognition import fer2013
    from facecal.recognition.cnn import load_classifier, save_classifier, to_input
    from facecal.recognition.fit import build_model, net_meta
    from facecal.recognition.net import ExpressionNet, NetConfig, preprocess
    from facecal.recognition.train import save_model

    torch.manual_seed(0)
    rec = ExpressionNet(NetConfig(n_classes=7, widths=(32, 32), convs=1)).eval()
    save_model(rec, {"classes": list(fer2013.CLASSES)}, tmp_path / "rec.pt")
    params = CnnParams(arch="vgg", vgg_widths=[32, 32], vgg_convs=1, init=str(tmp_path / "rec.pt"))
    classes = ["neutral", "anger", "contempt", "happy"]
    model = build_model(params, len(classes), 48, classes).eval()
    # The same grey face as the recognizer's own input and as the pipeline's RGB crop.
    grey = np.random.default_rng(0).integers(0, 256, (2, 48, 48), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    with torch.no_grad():
        theirs = rec(preprocess(grey))
        ours = model(to_input(rgb))
    fer = list(fer2013.CLASSES)
    for j, c in enumerate(["neutral", "angry", None, "happy"]):
        if c is not None:  # contempt: FER2013 has none, its row stays freshly initialised
            torch.testing.assert_close(ours[:, j], theirs[:, fer.index(c)], atol=1e-5, rtol=0)
    # Saved and loaded as train_cnn does: the architecture comes back from the metadata.
    meta = {"classes": classes, "image_size": 48, **net_meta(params)}
    save_classifier(model, meta, tmp_path / "cnn.pt")
    loaded, _ = load_classifier(tmp_path / "cnn.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(to_input(rgb)), ours)
    with pytest.raises(ClassifierError, match="needs cnn.arch: vgg"):
        CnnParams(init=str(tmp_path / "rec.pt"))
    with pytest.raises(ClassifierError, match="missing.pt"):
        build_model(CnnParams(arch="vgg", init=str(tmp_path / "missing.pt")), 4, 48, classes)
    with pytest.raises(ClassifierError, match="differs"):
        build_model(CnnParams(arch="vgg", init=str(tmp_path / "rec.pt")), 4, 48, classes)
