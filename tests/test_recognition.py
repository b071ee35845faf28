"""facecal.recognition: the network's input contract, the training loop (learns, deterministic,
resumable), the FER2013 readers (folder and csv) on fixtures made here, and the real folder
where it lies beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facecal.manifest import Report
from facecal.recognition import fer2013
from facecal.recognition.net import ExpressionNet, NetConfig, preprocess, to_grey
from facecal.recognition.train import (
    TrainConfig,
    TrainError,
    class_weights,
    load_model,
    predict_proba,
    save_model,
    train,
    tta_views,
)

REPO = Path(__file__).resolve().parents[1]
FER2013 = Path(os.environ.get("FACECAL_SHARED", REPO.parent / "shared")) / "data" / "fer2013"

SMALL = NetConfig(n_classes=2, widths=(8, 16), convs=1, dropout=0.1)
FAST = TrainConfig(epochs=2, batch_size=32, lr=0.05, warmup_epochs=0.5, threads=1, seed=3)


def _stripes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: a bright horizontal bar, class 1: a bright vertical bar, at random places on
    noise. Separable, and invariant to the flips/shifts/small rotations of the augmentation."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 90, (n, 48, 48)).astype(np.uint8)
    y = rng.integers(0, 2, n)
    for i in range(n):
        p = rng.integers(12, 30)
        if y[i] == 0:
            x[i, p : p + 6, 6:42] = 230
        else:
            x[i, 6:42, p : p + 6] = 230
    return x, y.astype(np.int64)


# --------------------------------------------------------------------------- net


def test_net_shapes_and_input_contract():
    model = ExpressionNet(NetConfig()).eval()
    x = np.random.default_rng(0).integers(0, 256, (5, 48, 48)).astype(np.uint8)
    t = preprocess(x)
    assert t.shape == (5, 1, 48, 48) and t.dtype == torch.float32
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0
    assert torch.equal(t[0, 0], torch.from_numpy(x[0]).float() / 127.5 - 1)
    with torch.no_grad():
        assert model(t).shape == (5, 7)
        assert model.embed(t).shape == (5, 256)
    with pytest.raises(ValueError, match="48×48"):
        preprocess(np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((2, 48, 48), np.float32))
    with pytest.raises(ValueError, match="grey"):
        model(torch.zeros(1, 3, 48, 48))


def test_rgb_input_is_converted_like_pil():
    rgb = np.random.default_rng(1).integers(0, 256, (3, 48, 48, 3)).astype(np.uint8)
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])
    assert np.abs(to_grey(rgb).astype(int) - pil.astype(int)).max() <= 1
    grey = rgb[..., 0]
    assert torch.equal(preprocess(np.repeat(grey[..., None], 3, -1)), preprocess(grey))


def test_net_config_roundtrip_and_validation():
    c = NetConfig(n_classes=4, widths=(32, 64), convs=3, dropout=0.2)
    assert NetConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        ExpressionNet(NetConfig(n_classes=1))


# --------------------------------------------------------------------------- training


def test_training_learns_a_separable_problem(tmp_path):
    x, y = _stripes(256, 0)
    res = train(x, y, SMALL, TrainConfig(**{**FAST.to_dict(), "epochs": 4}), progress=False)
    xt, yt = _stripes(200, 1)
    acc = float((predict_proba(res.model, xt).argmax(1) == yt).mean())
    assert acc >= 0.9, acc
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert abs(predict_proba(res.model, xt[:3]).sum(1) - 1).max() < 1e-5
    save_model(res.model, {"classes": ["h", "v"]}, tmp_path / "m.pt")
    loaded, info = load_model(tmp_path / "m.pt")
    assert info["classes"] == ["h", "v"] and loaded.config == SMALL
    np.testing.assert_array_equal(predict_proba(loaded, xt[:8]), predict_proba(res.model, xt[:8]))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_same_weights_other_seed_other_weights():
    x, y = _stripes(96, 2)
    a = _weights(train(x, y, SMALL, FAST, progress=False).model)
    b = _weights(train(x, y, SMALL, FAST, progress=False).model)
    c = _weights(
        train(x, y, SMALL, TrainConfig(**{**FAST.to_dict(), "seed": 4}), progress=False).model
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    x, y = _stripes(96, 3)
    cfg = TrainConfig(**{**FAST.to_dict(), "epochs": 3})
    whole = train(x, y, SMALL, cfg, progress=False)
    first = train(x, y, SMALL, cfg, checkpoint_dir=tmp_path, stop_after=1, progress=False)
    assert len(first.history) == 1 and (tmp_path / "last.pt").is_file()
    rest = train(x, y, SMALL, cfg, checkpoint_dir=tmp_path, progress=False)
    a, b = _weights(whole.model), _weights(rest.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in rest.history] == [h["train_loss"] for h in whole.history]
    # A checkpoint of another recipe is refused, not continued.
    with pytest.raises(TrainError, match="another config"):
        train(x, y, SMALL, TrainConfig(**{**cfg.to_dict(), "lr": 0.01}), tmp_path, progress=False)


def test_warm_start_begins_from_the_given_weights(tmp_path):
    x, y = _stripes(96, 6)
    first = train(x, y, SMALL, FAST, progress=False)
    start = _weights(first.model)
    # A zero learning rate leaves a warm start exactly where it began (dropout aside, no step
    # moves the weights): the weights are loaded, not a fresh initialisation.
    still = TrainConfig(**{**FAST.to_dict(), "lr": 0.0, "epochs": 1})
    kept = _weights(train(x, y, SMALL, still, progress=False, init=start).model)
    batch_stats = ("running_mean", "running_var", "num_batches_tracked")
    assert all(torch.equal(start[k], kept[k]) for k in start if not k.endswith(batch_stats))
    # A second cycle from those weights starts at the first model's accuracy, not at chance.
    one = TrainConfig(**{**FAST.to_dict(), "epochs": 1})
    more = train(x, y, SMALL, one, progress=False, init=start)
    fresh = train(x, y, SMALL, one, progress=False)
    assert more.history[0]["train_accuracy"] > fresh.history[0]["train_accuracy"]
    # The warm start is part of the run: its checkpoint is not resumed by a cold start.
    train(x, y, SMALL, FAST, checkpoint_dir=tmp_path, stop_after=1, progress=False, init=start)
    with pytest.raises(TrainError, match="another config"):
        train(x, y, SMALL, FAST, checkpoint_dir=tmp_path, progress=False)
    other = NetConfig(2, (8, 32), 1, 0.1)
    with pytest.raises(TrainError, match="another network"):
        train(x, y, other, FAST, progress=False, init=start)


def test_resume_mid_epoch_gives_the_same_weights(tmp_path):
    x, y = _stripes(160, 5)  # 5 steps of 32 per epoch
    cfg = TrainConfig(**{**FAST.to_dict(), "epochs": 2})
    whole = train(x, y, SMALL, cfg, progress=False)
    # Stopped at step 8 (epoch 2, step 3); the last checkpoint is the one after step 7 (k = 2).
    part = train(x, y, SMALL, cfg, tmp_path, progress=False, checkpoint_every=2, stop_after_steps=8)
    assert len(part.history) == 1
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 2)
    rest = train(x, y, SMALL, cfg, tmp_path, progress=False, checkpoint_every=2)
    a, b = _weights(whole.model), _weights(rest.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rest.history[-1]["train_loss"] == whole.history[-1]["train_loss"]


def test_tta_views_are_exact_mirrors_and_pixel_shifts():
    xb = torch.arange(2 * 48 * 48, dtype=torch.float32).reshape(2, 1, 48, 48)
    (only,) = tta_views(xb, "none")
    assert only is xb
    plain, mirror = tta_views(xb, "mirror")
    torch.testing.assert_close(mirror, xb.flip(3))
    torch.testing.assert_close(plain, xb)
    views = tta_views(xb, "shift", shift_px=2)
    assert len(views) == 10 and all(v.shape == xb.shape for v in views)
    # view 1 is the face moved 2 px down: interior rows are the original's, 2 rows up,
    # and the top rows repeat the border row (replicated, as in training)
    torch.testing.assert_close(views[1][:, :, 2:], xb[:, :, :-2])
    torch.testing.assert_close(views[1][:, :, 0], xb[:, :, 0])
    torch.testing.assert_close(views[5], xb.flip(3))
    with pytest.raises(ValueError, match="tta must be one of"):
        tta_views(xb, "tencrop")


def test_shift_tta_probabilities_are_the_mean_over_ten_views():
    x, y = _stripes(64, 5)
    res = train(x, y, SMALL, FAST)
    p_shift = predict_proba(res.model, x[:8], tta="shift", shift_px=3, bf16=False)
    with torch.no_grad():
        views = tta_views(preprocess(x[:8]), "shift", 3)
        want = torch.stack([torch.softmax(res.model(v), 1) for v in views]).mean(0).numpy()
    np.testing.assert_allclose(p_shift, want, atol=1e-5)
    assert not np.allclose(p_shift, predict_proba(res.model, x[:8], tta="mirror", bf16=False))


def test_bad_training_input_is_a_clear_error():
    x, y = _stripes(8, 4)
    with pytest.raises(TrainError, match="labels"):
        train(x, y + 5, SMALL, FAST, progress=False)
    with pytest.raises(TrainError, match="one label each"):
        train(x, y[:3], SMALL, FAST, progress=False)


def test_sqrt_class_weights_keep_the_mean_weight():
    y = np.array([0] * 90 + [1] * 10)
    w = class_weights(y, 3, "sqrt")
    assert w is not None and w[2] == 0
    assert float(w[1] / w[0]) == pytest.approx(3.0)
    assert float((w[torch.from_numpy(y)]).mean()) == pytest.approx(1.0)
    assert class_weights(y, 3, "none") is None


# --------------------------------------------------------------------------- FER2013 readers


def _face(value: int, size: int = 48) -> np.ndarray:
    img = np.full((size, size), value, np.uint8)
    img[::7] = 255 - value
    return img


def test_read_folder_layout(tmp_path):
    for cls, vals in {"happy": [10, 20], "angry": [30], "neutral": []}.items():
        (tmp_path / cls).mkdir()
        for v in vals:
            Image.fromarray(_face(v)).save(tmp_path / cls / f"Training_{v}.png")
    (tmp_path / "angry" / "Training_broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(_face(40, 64)).save(tmp_path / "angry" / "Training_big.png")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "contempt").mkdir()
    report = Report()
    split = fer2013.read_folder(tmp_path, report)
    assert split.images.shape == (3, 48, 48) and split.images.dtype == np.uint8
    # Classes in FER2013 order (angry = 0, happy = 3), files sorted within a class.
    assert split.labels.tolist() == [0, 3, 3]
    np.testing.assert_array_equal(split.images[1], _face(10))
    assert split.counts()["happy"] == 2 and split.counts()["neutral"] == 0
    reasons = {Path(p.item).name: p.reason for p in report.problems}
    assert set(reasons) == {"Training_broken.jpg", "Training_big.png", "contempt"}
    assert "64×64" in reasons["Training_big.png"] and "unknown class" in reasons["contempt"]
    assert len(split.subset(np.array([2]))) == 1
    with pytest.raises(fer2013.Fer2013Error, match="not found"):
        fer2013.read_folder(tmp_path / "missing")
    with pytest.raises(fer2013.Fer2013Error, match="no class"):
        fer2013.read_folder(tmp_path / "contempt")


def test_read_csv(tmp_path):
    px = " ".join(str(v) for v in _face(50).ravel())
    lines = [
        "emotion,pixels,Usage",
        f"3,{px},Training",
        f"0,{px},PublicTest",
        f"6,{px},PrivateTest",
        f"9,{px},Training",  # unknown class
        f"x,{px},Training",
        "2,1 2 3,Training",  # too few pixels
        f"1,{px},Other",
        f"4,{px.replace('50', '300', 1)},Training",
    ]
    path = tmp_path / "fer2013.csv"
    path.write_text("\n".join(lines) + "\n")
    report = Report()
    splits = fer2013.read_csv(path, report)
    assert sorted(splits) == ["privatetest", "publictest", "train"]
    assert splits["train"].labels.tolist() == [3]
    np.testing.assert_array_equal(splits["train"].images[0], _face(50))
    assert splits["publictest"].labels.tolist() == [0] and splits[
        "privatetest"
    ].labels.tolist() == [6]
    assert sorted(p.item for p in report.problems) == [f"{path}:{n}" for n in (5, 6, 7, 8, 9)]
    bad = tmp_path / "bad.csv"
    bad.write_text("label,data\n1,2\n")
    with pytest.raises(fer2013.Fer2013Error, match="header"):
        fer2013.read_csv(bad)


def test_real_fer2013_publictest():
    folder = FER2013 / "publictest"
    if not folder.is_dir():
        pytest.skip(f"FER2013 not found at {folder} (research data, not distributed with facecal)")
    report = Report()
    split = fer2013.read_folder(folder, report)
    assert len(report) == 0
    assert len(split) == 3589 and split.images.shape[1:] == (48, 48)
    assert split.counts()["disgust"] == 56 and split.counts()["happy"] == 895
