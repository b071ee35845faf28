"""Stage `calibrate` and `facecal calibrate-pair`: file contracts, the own-apex error on
synthetic data (exact truth), unusable faces reported, and the original tool's output."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from facecal import calibrate as stage
from facecal import calibration as cal
from facecal import cli, config, export, plotting
from facecal import face_points as fp
from facecal import landmarks as lm
from facecal.data.synth import SynthConfig, render_dataset
from facecal.geometry import to_canonical
from facecal.imageio import load_image
from facecal.manifest import read_landmarks_file, read_manifest, write_landmarks_file
from facecal.tables import points_array, read_table, write_table

CFG = SynthConfig(subjects=4, emotions=("happy", "surprise"), intensities=(0.25, 0.5, 1.0))
EMOTIONS = ["happy", "surprise"]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    render_dataset(out, CFG, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def truth_table(synth_dir, tmp_path_factory):
    """The landmark table of the synthetic set with its exact points (no dlib noise), built by
    the landmarks stage's own table code."""
    rows, _ = read_manifest(synth_dir)
    results = []
    for r in rows:
        gt = read_landmarks_file(synth_dir / r.landmarks)
        results.append(
            fp.ImageResult(
                fp.OK,
                n_faces=1,
                box=[0.0, 0.0, 128.0, 128.0],
                points=gt,
                points_source=fp.SOURCE_TRUTH,
                gt_points=gt,
                width=128,
                height=128,
            )
        )
    splits = lm.assign_splits([r.subject for r in rows], 0, 0.15, 0.2)
    path = tmp_path_factory.mktemp("table") / "landmarks.parquet"
    write_table(lm.build_table(rows, results, splits), path)
    return path


def run(tmp_path, table, data, **overrides):
    params = config.from_dict(stage.CalibrationParams, {"overlays": 2, **overrides}, "calibration")
    metrics = stage.run_calibrate(
        params,
        table,
        data,
        tmp_path / "out",
        tmp_path / "m.json",
        tmp_path / "plots",
        emotions=EMOTIONS,
    )
    return params, metrics


def test_outputs_follow_the_contract(tmp_path, truth_table, synth_dir):
    _, metrics = run(tmp_path, truth_table, synth_dir, method="pca")
    landmarks = read_table(truth_table)
    gold = json.loads((tmp_path / "out" / stage.GOLD).read_text())
    assert (gold["mode"], gold["frame"], gold["method"]) == ("aligned", "canonical", "pca")
    assert sorted(gold["emotions"]) == EMOTIONS
    train = landmarks[landmarks["split"] == "train"]
    for emo, entry in gold["emotions"].items():
        assert np.asarray(entry["points"]).shape == (68, 2)
        assert np.asarray(entry["direction"]).shape == (68, 2)
        assert math.isfinite(entry["coordinate"])
        sources = train[train["image"].isin(entry["sources"])]
        assert len(sources) == min(5, int((train["emotion"] == emo).sum()))
        assert (sources["emotion"] == emo).all()
        # The most intense train faces of the emotion.
        assert (
            sources["intensity"].min()
            >= train.loc[
                ~train["image"].isin(entry["sources"]) & (train["emotion"] == emo), "intensity"
            ].max()
        )
    df = read_table(tmp_path / "out" / stage.TABLE)
    assert list(df.columns) == list(stage.COLUMNS)
    assert len(df) == len(landmarks) * len(EMOTIONS) == metrics["n_rows"]
    # Face-major, target emotions in vocabulary order, every face (neutral included).
    assert df["image"].tolist() == np.repeat(landmarks["image"].to_numpy(), 2).tolist()
    assert df["target_emotion"].tolist() == EMOTIONS * len(landmarks)
    weak = df["weak"].to_numpy()
    want = (df["emotion"] != "neutral") & (df["intensity"] <= 0.5)
    np.testing.assert_array_equal(weak, want.to_numpy())
    np.testing.assert_allclose(points_array(df), np.repeat(points_array(landmarks), 2, axis=0))
    assert df["par_x"].isna().all() and df["par_y"].isna().all()  # pca: no warp parameters
    assert (df["rms_before"] > 0).all() and np.isfinite(df["rms_after"]).all()
    # The serving layer's GoldModel, built from gold.json alone, reproduces the stage's
    # calibration wherever the face's reference is the mean neutral (no neutral of its own is
    # needed for this comparison: pass the stage's reference explicitly).
    model = cal.GoldModel.from_json(gold)
    row = df.iloc[7]
    faces = stage.load_faces(landmarks, stage.Report())
    refs, _ = stage.neutral_references(faces, True)
    i = int(np.flatnonzero(faces.df["image"] == row["image"])[0])
    np.testing.assert_allclose(
        model.calibrate(
            np.reshape(row["points"], (68, 2)), row["target_emotion"], reference=refs[i]
        ),
        np.reshape(row["calibrated"], (68, 2)),
        atol=1e-9,
    )
    assert (tmp_path / "plots" / stage.OVERLAYS).is_file()
    assert json.loads((tmp_path / "m.json").read_text()) == metrics


def test_own_apex_error_drops_with_the_default_method_on_synthetic_truth(
    tmp_path, truth_table, synth_dir, capsys
):
    _, m = run(tmp_path / "learned", truth_table, synth_dir)
    _, q = run(tmp_path / "quad", truth_table, synth_dir, method="quadratic")
    print(
        f"\nown-apex NME (synthetic truth): learned {m['own_apex']['before']:.4f} → "
        f"{m['own_apex']['after']:.4f}; quadratic {q['own_apex']['before']:.4f} → "
        f"{q['own_apex']['after']:.4f}"
    )
    # Four subjects × two emotions × two weak intensities, each with a more intense own face.
    assert m["own_apex"]["n"] == 4 * 2 * 2
    assert m["own_apex"]["after"] < 0.7 * m["own_apex"]["before"]
    assert m["own_apex_heldout"]["n"] > 0
    assert m["own_apex_heldout"]["after"] < m["own_apex_heldout"]["before"]
    assert m["own_apex"]["improved"] >= 0.75
    # The warp pulls weak faces toward the population gold template; the learned model
    # predicts each person's own apex instead, which keeps their face shape (and so need not
    # get closer to the population mean).
    assert q["gold_error"]["after"] < q["gold_error"]["before"]
    assert m["own_apex"]["after"] < q["own_apex"]["after"]
    par = np.stack(read_table(tmp_path / "quad" / "out" / stage.TABLE)["par_x"])
    assert np.isfinite(par).all()


def test_learned_method_contract_neutral_apex_and_the_serving_model(
    tmp_path, truth_table, synth_dir
):
    _, m = run(tmp_path, truth_table, synth_dir)  # defaults: aligned + learned
    gold = json.loads((tmp_path / "out" / stage.GOLD).read_text())
    assert (gold["mode"], gold["frame"], gold["method"]) == ("aligned", "canonical", "learned")
    assert np.asarray(gold["shape_mean"]).shape == (68, 2)
    basis = np.asarray(gold["shape_basis"]).reshape(-1, 136)
    for emo in EMOTIONS:
        entry = gold["emotions"][emo]
        assert np.asarray(entry["offset"]).shape == (68, 2)
        assert np.asarray(entry["coef"]).reshape(-1, 136).shape[0] == entry["rank"] <= len(basis)
        assert entry["n_pairs"] > 0 and entry["n_subjects"] >= 2
        assert m["learned"][emo]["rank"] == entry["rank"]
    # Neutral→apex: every subject here has one neutral face and an apex of each emotion.
    landmarks = read_table(truth_table)
    subjects = landmarks.groupby("split")["subject"].nunique()
    held = int(subjects.get("val", 0) + subjects.get("test", 0))
    assert m["neutral_apex"]["heldout"]["n"] == held * len(EMOTIONS)
    assert m["neutral_apex"]["train"]["n"] == int(subjects["train"]) * len(EMOTIONS)
    for emo in EMOTIONS:
        na = m["per_emotion"][emo]["neutral_apex"]
        assert na["heldout"]["n"] == held
        assert na["heldout"]["ratio"] == pytest.approx(
            na["heldout"]["after"] / na["heldout"]["before"]
        )
    # The serving layer's GoldModel, from gold.json alone, reproduces the stage's calibration:
    # neutral faces and faces of another emotion as they are (intensity 0), a weak face of the
    # target emotion given its own intensity.
    model = cal.GoldModel.from_json(gold)
    assert model.method == "learned" and model.learned is not None
    assert export.calibratable_emotions(gold) == EMOTIONS  # what the server offers
    df = read_table(tmp_path / "out" / stage.TABLE)
    assert df["par_x"].isna().all()
    sample = df.iloc[::5]
    assert (sample["emotion"] == sample["target_emotion"]).any()
    assert (sample["emotion"] != sample["target_emotion"]).any()
    for _, row in sample.iterrows():
        same = row["emotion"] == row["target_emotion"]
        got = model.calibrate(
            np.reshape(row["points"], (68, 2)),
            row["target_emotion"],
            intensity=row["intensity"] if same else None,
        )
        np.testing.assert_allclose(got, np.reshape(row["calibrated"], (68, 2)), atol=1e-9)


def test_learned_default_brings_held_out_neutral_faces_to_their_apex_on_synthetic_truth(
    tmp_path, truth_table, synth_dir
):
    _, m = run(tmp_path / "learned", truth_table, synth_dir)
    _, p = run(tmp_path / "pca", truth_table, synth_dir, method="pca")
    held = m["neutral_apex"]["heldout"]
    print(
        f"\nneutral→apex held-out (synthetic truth): learned {held['ratio']:.3f}, "
        f"pca {p['neutral_apex']['heldout']['ratio']:.3f} (n={held['n']})"
    )
    assert held["ratio"] <= 0.6 and held["improved"] == 1.0
    for emo in EMOTIONS:
        assert m["per_emotion"][emo]["neutral_apex"]["heldout"]["ratio"] < 1.0


def test_learned_model_never_sees_a_held_out_subject(tmp_path, truth_table, synth_dir):
    """Poison every face of the held-out subjects (a huge, consistent 'expression'): the
    learned model, its shape basis and every train face's calibration stay bit-identical."""
    df = read_table(truth_table)
    held = df["split"].isin(stage.HELDOUT).to_numpy()
    assert held.any()
    poisoned = df.copy()
    pts = points_array(df)
    pts[held, 48:68, 1] += 25.0  # mouths 25 px lower
    pts[held, 17:27, 1] -= 10.0  # brows 10 px higher
    poisoned["points"] = [p.reshape(-1).tolist() for p in pts]
    path = tmp_path / "poisoned.parquet"
    write_table(poisoned, path)
    _, clean = run(tmp_path / "clean", truth_table, synth_dir)
    _, dirty = run(tmp_path / "dirty", path, synth_dir)
    a = json.loads((tmp_path / "clean" / "out" / stage.GOLD).read_text())
    b = json.loads((tmp_path / "dirty" / "out" / stage.GOLD).read_text())
    assert a == b
    ta = read_table(tmp_path / "clean" / "out" / stage.TABLE)
    tb = read_table(tmp_path / "dirty" / "out" / stage.TABLE)
    train = (ta["split"] == "train").to_numpy()
    np.testing.assert_array_equal(
        points_array(ta[train], "calibrated"), points_array(tb[train], "calibrated")
    )
    # The poison did reach the held-out faces (the test could fail).
    assert dirty["neutral_apex"]["heldout"] != clean["neutral_apex"]["heldout"]


def test_real_jaffe_neutral_faces_move_toward_their_own_apex(jaffe_dir, tmp_path):
    """JAFFE (213 faces, 10 subjects, dlib points, the default split): held-out neutral faces
    calibrated by the default method get closer to the same person's apex, and no closer with
    the paper's warp. The acceptance level (≤ 0.6) is out of reach here: see bench/calibration.py
    and the calibration notes in the README."""
    from facecal.data.importers import import_dataset

    data = tmp_path / "jaffe"
    import_dataset("jaffe", jaffe_dir, data, progress=False)
    lm.run_landmarks(
        lm.LandmarksParams(workers=1, overlays=0),
        data,
        tmp_path / "lm",
        tmp_path / "lm.json",
        tmp_path / "lmplots",
        seed=0,
        progress=False,
    )
    emotions = ["anger", "disgust", "fear", "happy", "sad", "surprise"]

    def calibrate(method):
        params = config.from_dict(
            stage.CalibrationParams, {"method": method, "overlays": 0}, "calibration"
        )
        out = tmp_path / method
        return stage.run_calibrate(
            params, tmp_path / "lm" / lm.TABLE, data, out, out / "m.json", out / "p", emotions
        )

    learned, quad = calibrate("learned"), calibrate("quadratic")
    held = learned["neutral_apex"]["heldout"]
    print(
        f"\nJAFFE held-out neutral→apex: learned {held['ratio']:.3f}, "
        f"quadratic {quad['neutral_apex']['heldout']['ratio']:.3f} (n={held['n']})"
    )
    assert held["n"] >= 6 * 5  # every held-out subject: 3 neutral takes × 6 emotions
    assert held["ratio"] < 0.9 and held["improved"] > 0.6
    assert quad["neutral_apex"]["heldout"]["ratio"] > held["ratio"]
    # Not asserted: JAFFE's few "weak" faces (rated ≤ 0.5, 7 held out) are geometrically as far
    # along as their apex (NME 0.022, take-to-take level), and every method moves them away.
    assert set(learned["learned"]) == set(emotions)
    assert all(set(v) >= {"rank", "ridge", "cv_nme"} for v in learned["learned"].values())


def test_upstream_mode_fits_raw_pixels_toward_a_pixel_gold(tmp_path, truth_table, synth_dir):
    run(tmp_path, truth_table, synth_dir, mode="upstream", method="quadratic", gold_top_k=1)
    gold = json.loads((tmp_path / "out" / stage.GOLD).read_text())
    assert gold["frame"] == "pixels" and gold["mode"] == "upstream"
    df = read_table(tmp_path / "out" / stage.TABLE)
    landmarks = read_table(truth_table).set_index("image")
    for emo, entry in gold["emotions"].items():
        assert len(entry["sources"]) == 1
        # k = 1: the gold is exactly that face's pixels, as upstream picked one gold face.
        np.testing.assert_allclose(
            np.asarray(entry["points"]).reshape(-1), landmarks.loc[entry["sources"][0], "points"]
        )
        row = df[df["target_emotion"] == emo].iloc[3]
        f = cal.fit(np.reshape(row["points"], (68, 2)), np.asarray(entry["points"]), "upstream")
        np.testing.assert_allclose(f.par_x, row["par_x"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(
            f.apply(np.reshape(row["points"], (68, 2))),
            np.reshape(row["calibrated"], (68, 2)),
            atol=1e-9,
        )


def test_unusable_faces_are_reported_and_the_others_calibrated(tmp_path, truth_table, synth_dir):
    df = read_table(truth_table)
    bad = df.iloc[[1, 2]].copy()
    bad["image"] = ["images/nan.png", "images/line.png"]
    nan = np.full(136, np.nan)
    line = np.stack([np.arange(68.0), 2 * np.arange(68.0)], 1).reshape(-1)
    bad["points"] = [nan.tolist(), line.tolist()]
    gone = df.iloc[[3]].copy()
    gone["image"], gone["status"], gone["points"] = "images/noface.png", fp.NO_FACE, None
    table = tmp_path / "table.parquet"
    write_table(pd.concat([df, bad, gone], ignore_index=True), table)
    _, m = run(tmp_path, table, synth_dir)
    report = pd.read_csv(tmp_path / "out" / stage.FAILURES)
    assert sorted(report["item"]) == ["images/line.png", "images/nan.png"]
    assert m["n_unusable"] == 2 and m["n_faces"] == len(df)
    out = read_table(tmp_path / "out" / stage.TABLE)
    assert set(out["image"]) == set(df["image"])


def test_named_gold_images(tmp_path, truth_table, synth_dir):
    df = read_table(truth_table)
    name = df[(df["emotion"] == "happy") & (df["split"] == "train")]["image"].iloc[0]
    run(tmp_path, truth_table, synth_dir, method="quadratic", gold_images={"happy": name})
    gold = json.loads((tmp_path / "out" / stage.GOLD).read_text())
    assert gold["emotions"]["happy"]["sources"] == [name]
    np.testing.assert_allclose(
        gold["emotions"]["happy"]["points"],
        to_canonical(np.reshape(df.set_index("image").loc[name, "points"], (68, 2)))[0],
    )
    held_out = df[(df["emotion"] == "happy") & (df["split"] == "test")]["image"].iloc[0]
    with pytest.raises(cal.CalibrationError, match=r"not in the train split"):
        run(tmp_path, truth_table, synth_dir, gold_images={"happy": held_out})
    with pytest.raises(cal.CalibrationError, match="images/nope.png"):
        run(tmp_path, truth_table, synth_dir, gold_images={"happy": ["images/nope.png"]})
    with pytest.raises(config.ParamsError, match="anger"):
        run(tmp_path, truth_table, synth_dir, gold_images={"anger": name})  # not in emotions
    with pytest.raises(config.ParamsError, match="learned.*aligned shape space"):
        run(tmp_path, truth_table, synth_dir, mode="upstream")
    with pytest.raises(config.ParamsError, match="pca.*aligned shape space"):
        run(tmp_path, truth_table, synth_dir, mode="upstream", method="pca")
    with pytest.raises(config.ParamsError, match="learned_ridges"):
        run(tmp_path, truth_table, synth_dir, learned_ridges=[0.0])
    with pytest.raises(config.ParamsError, match="grumpy"):
        run(tmp_path, truth_table, synth_dir, gold_images={"grumpy": name})


def test_both_stages_end_to_end_on_dlib_points(tmp_path, synth_dir, capsys, mlflow_store):
    lm.run_landmarks(
        lm.LandmarksParams(workers=1, overlays=0),
        synth_dir,
        tmp_path / "lm",
        tmp_path / "lm.json",
        tmp_path / "lmplots",
        seed=0,
        progress=False,
    )
    m = stage.run_calibrate(
        stage.CalibrationParams(overlays=3),
        tmp_path / "lm" / lm.TABLE,
        synth_dir,
        tmp_path / "cal",
        tmp_path / "cal.json",
        tmp_path / "plots",
        emotions=EMOTIONS,
    )
    err = capsys.readouterr().err
    assert "own-apex NME" in err and "→" in err
    print(
        f"\nown-apex NME (dlib points): {m['own_apex']['before']:.4f} → "
        f"{m['own_apex']['after']:.4f} (n={m['own_apex']['n']})"
    )
    assert m["n_faces"] == len(read_manifest(synth_dir)[0]) and m["own_apex"]["n"] == 16
    assert math.isfinite(m["own_apex"]["before"]) and math.isfinite(m["own_apex"]["after"])
    overlay = load_image(tmp_path / "plots" / stage.OVERLAYS)
    assert overlay.shape[0] > 3 * plotting.TILE  # three rows of three panels
    # Both stages logged to MLflow: params, metrics, the pictures.
    import mlflow

    runs = {
        r.info.run_name: r
        for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
    }
    assert {"landmarks", "calibrate"} <= set(runs)
    assert runs["landmarks"].data.metrics["detection_rate"] == 1.0
    assert runs["calibrate"].data.metrics["own_apex.after"] == pytest.approx(m["own_apex"]["after"])
    assert runs["calibrate"].data.params["method"] == "learned"
    client = mlflow.MlflowClient()
    assert {"overlays.png", "gold.json", "cal.json"} <= {
        a.path for a in client.list_artifacts(runs["calibrate"].info.run_id)
    }


# --------------------------------------------------------------------------- calibrate-pair


def test_calibrate_pair_prints_the_original_json(tmp_path, capsys, upstream_reference):
    h = upstream_reference / "happy400"
    args = [
        "calibrate-pair",
        "--gold-landmarks",
        str(h / "gold_happy.txt"),
        "--target-landmarks",
        str(h / "sample_happy.txt"),
        "--mode",
        "upstream",
    ]
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    want_x = np.loadtxt(h / "parax_happy.txt", delimiter=",")
    want_y = np.loadtxt(h / "paray_happy.txt", delimiter=",")
    assert np.max(np.abs(np.array(out["par_x"]) - want_x) / np.abs(want_x)) < 1e-4
    assert np.max(np.abs(np.array(out["par_y"]) - want_y) / np.abs(want_y)) < 1e-4
    assert np.asarray(out["calibrated"]).shape == (68, 2)
    assert out["rms_after"] < out["rms_before"]
    # The picture of the original README; landmarks were taken at width 400.
    overlay = tmp_path / "pair.png"
    assert (
        cli.main(
            args
            + [
                "--gold-image",
                str(h / "gold_happy.jpg"),
                "--target-image",
                str(h / "sample_happy.jpg"),
                "--overlay",
                str(overlay),
                "--resize-width",
                "400",
            ]
        )
        == 0
    )
    img = load_image(overlay)
    assert img.shape[1] > 2 * 400
    # Red (original), green (calibrated) on the left, blue (gold) on the right.
    left, right = img[:, : img.shape[1] // 2], img[:, img.shape[1] // 2 :]
    assert ((left[..., 0] > 200) & (left[..., 1] < 40) & (left[..., 2] < 40)).sum() > 50
    assert ((left[..., 1] > 180) & (left[..., 0] < 40) & (left[..., 2] < 40)).sum() > 50
    assert ((right[..., 2] > 200) & (right[..., 0] < 40)).sum() > 50


def test_calibrate_pair_accepts_both_file_formats_and_reports_misuse(tmp_path, capsys, truth_table):
    df = read_table(truth_table)
    target = np.reshape(df["points"].iloc[1], (68, 2))
    gold = np.reshape(df["points"].iloc[3], (68, 2))
    write_landmarks_file(tmp_path / "t.txt", target)
    (tmp_path / "g.txt").write_text("".join(f"{x},{y}\n" for x, y in gold))  # x,y flavour
    base = [
        "calibrate-pair",
        "--gold-landmarks",
        str(tmp_path / "g.txt"),
        "--target-landmarks",
        str(tmp_path / "t.txt"),
    ]
    assert cli.main(base + ["--alpha", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    full, _ = cal.calibrate(np.round(target, 3), gold, "aligned")
    np.testing.assert_allclose(out["calibrated"], (np.round(target, 3) + full) / 2, atol=1e-9)
    assert out["mode"] == "aligned" and out["rms_frame"] == "canonical"
    assert cli.main(base + ["--overlay", str(tmp_path / "x.png")]) == 2
    assert "--gold-image" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_text("1 2\n")
    assert (
        cli.main(
            [
                "calibrate-pair",
                "--gold-landmarks",
                str(tmp_path / "bad.txt"),
                "--target-landmarks",
                str(tmp_path / "t.txt"),
            ]
        )
        == 2
    )
    assert "bad.txt" in capsys.readouterr().err
