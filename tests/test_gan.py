"""The landmark-to-face GAN: networks, the generator file contract, training behaviour."""

from __future__ import annotations

import json

import pytest
import torch

from facecal.gan import models
from facecal.gan.models import (
    GeneratorError,
    build_discriminators,
    build_generator,
    count_parameters,
    generator_config,
    load_generator,
    save_generator,
)


def test_pldt_matches_the_original_size():
    # 4 convs 3→96→192→384→768 and 4 transposed convs back, no bias: 12.40 M weights + BN.
    G = build_generator("pldt", 64, 3)
    assert 12.3e6 < count_parameters(G) < 12.5e6
    convs = [m for m in G.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert [m.out_channels for m in convs] == [96, 192, 384, 768, 384, 192, 96, 3]
    assert all(m.bias is None for m in convs)


@pytest.mark.parametrize("arch,kw", [("pldt", {"width": 8}), ("pix2pix", {"ngf": 8})])
@pytest.mark.parametrize("identity", [False, True])
def test_shapes_and_range(arch, kw, identity):
    cin = 6 if identity else 3
    G = build_generator(arch, 64, cin, **kw).eval()
    x = torch.rand(2, cin, 64, 64) * 2 - 1
    y = G(x)
    assert y.shape == (2, 3, 64, 64)
    assert y.min() >= -1 and y.max() <= 1
    Ds = build_discriminators(arch, 64, cin, **({"width": 8} if arch == "pldt" else {"ndf": 8}))
    assert set(Ds) == ({"D", "DA"} if arch == "pldt" else {"D"})
    for name, D in Ds.items():
        inp = y if (arch == "pldt" and name == "D") else torch.cat([x, y], 1)
        assert D(inp).shape[:2] == (2, 1)


@pytest.mark.parametrize("size", [128, 256])
def test_pix2pix_sizes(size):
    G = build_generator("pix2pix", size, 3, ngf=4).eval()
    assert G(torch.zeros(1, 3, size, size)).shape == (1, 3, size, size)


def test_bad_options_are_named():
    with pytest.raises(GeneratorError, match="arch"):
        build_generator("vae", 64, 3)
    with pytest.raises(GeneratorError, match="widht"):
        build_generator("pldt", 64, 3, widht=8)
    with pytest.raises(GeneratorError, match="power of two"):
        build_generator("pldt", 60, 3)


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    G = build_generator("pix2pix", 64, 6, ngf=8)
    cfg = generator_config("pix2pix", 64, "edges", True, {"ngf": 8})
    save_generator(G, cfg, tmp_path)
    assert json.loads((tmp_path / "generator.json").read_text()) == cfg
    # weights_only loading: the file holds nothing but tensors
    assert set(torch.load(tmp_path / "generator.pt", weights_only=True)) == set(G.state_dict())
    G2, cfg2 = load_generator(tmp_path)
    assert cfg2 == cfg and not G2.training
    x = torch.rand(2, 6, 64, 64) * 2 - 1
    G.eval()
    assert torch.equal(G(x), G2(x))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(GeneratorError, match="generator.json"):
        load_generator(tmp_path)
    cfg = generator_config("pldt", 64, "dots", False, {"width": 8})
    save_generator(build_generator("pldt", 64, 3, width=8), cfg, tmp_path)
    (tmp_path / "generator.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(GeneratorError, match="generator.pt"):
        load_generator(tmp_path)
    save_generator(build_generator("pldt", 64, 3, width=16), cfg, tmp_path)  # width mismatch
    with pytest.raises(GeneratorError, match="do not fit"):
        load_generator(tmp_path)
    bad = dict(cfg, in_channels=6)
    (tmp_path / "generator.json").write_text(json.dumps(bad))
    with pytest.raises(GeneratorError, match="in_channels"):
        load_generator(tmp_path)


def test_save_unwraps_ddp_like_wrappers(tmp_path):
    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    G = build_generator("pldt", 64, 3, width=8)
    save_generator(Wrapper(G), generator_config("pldt", 64, "dots", False, {"width": 8}), tmp_path)
    G2, _ = load_generator(tmp_path)
    assert set(G2.state_dict()) == set(G.state_dict())
    assert models.GENERATOR_WEIGHTS == "generator.pt"


# --------------------------------------------------------------------------- training

import csv  # noqa: E402

import numpy as np  # noqa: E402

from _faces import make_pairs  # noqa: E402
from facecal import cli  # noqa: E402
from facecal import metrics as qm  # noqa: E402
from facecal.gan.data import PairSource, scan_pairs  # noqa: E402
from facecal.gan.train import GanParams, Pix2PixParams, PLDTParams, TrainError, run_train_gan  # noqa: E402
from facecal.imageio import load_image  # noqa: E402
from facecal.manifest import Report  # noqa: E402


@pytest.fixture(scope="module")
def pairs8(tmp_path_factory):
    """8 drawn (landmarks, face, reference) pairs of 2 subjects at 64², all in train/."""
    return make_pairs(tmp_path_factory.mktemp("pairs8"))


def _train(params, pairs_dir, out, val=None, **kw):
    return run_train_gan(
        params,
        0,
        pairs_dir,
        val,
        out / "gan",
        out / "ckpt",
        out / "plots",
        out / "metrics.json",
        progress=False,
        **kw,
    )


def test_pix2pix_overfits_8_pairs(pairs8, tmp_path):
    # 100 steps of the whole set: measured SSIM 0.84 (eval-mode G, BN running statistics, as
    # exported); the untrained generator scores ≈ 0.39 (flat backgrounds match).
    params = GanParams(
        arch="pix2pix",
        epochs=100,
        batch_size=8,
        lr=2e-3,
        pix2pix=Pix2PixParams(ngf=16, ndf=16),
        checkpoint_every=1000,
        sample_every=1000,
        threads=1,
    )
    m = _train(params, pairs8, tmp_path, val=pairs8)
    G, cfg = load_generator(tmp_path / "gan")
    assert cfg == {
        "arch": "pix2pix",
        "image_size": 64,
        "style": "edges",
        "identity": True,
        "in_channels": 6,
        "kwargs": {"ngf": 16, "dropout": False},
    }
    src = PairSource(scan_pairs(pairs8, True), 64, True, progress=False)
    batch = src.take(list(range(8))).float() / 127.5 - 1
    with torch.no_grad():
        fake = (G(batch[:, :6]) + 1) / 2
    real = (batch[:, 6:] + 1) / 2
    score = float(qm.ssim(fake.double(), real.double()).mean())
    assert score > 0.8
    assert m["val_ssim"] == pytest.approx(score, abs=1e-3)
    with torch.no_grad():
        untrained = build_generator("pix2pix", 64, 6, ngf=16).eval()(batch[:, :6])
    assert float(qm.ssim(((untrained + 1) / 2).double(), real.double()).mean()) < 0.5
    # the losses CSV and the sample grid (8 rows of landmarks | reference | generated | real)
    with open(tmp_path / "plots" / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100 and list(rows[0]) == [
        "step",
        "epoch",
        "loss_g",
        "loss_d",
        "loss_g_gan",
        "loss_l1",
    ]
    assert float(rows[-1]["loss_l1"]) < 0.5 * float(rows[0]["loss_l1"])
    grid = load_image(tmp_path / "plots" / "samples" / "final.png")
    assert grid.shape == (8 * 64 + 7 * 2, 4 * 64 + 3 * 2, 3)


def _weights(directory):
    return torch.load(directory / "generator.pt", weights_only=True)


def test_pldt_losses_move_and_weights_change(pairs8, tmp_path):
    params = GanParams(
        arch="pldt",
        identity=False,
        epochs=4,
        batch_size=2,
        lr=2e-3,
        pldt=PLDTParams(width=8),
        checkpoint_every=1000,
        threads=1,
    )
    torch.manual_seed(0)
    before = build_generator("pldt", 64, 3, width=8).state_dict()
    m = _train(params, pairs8, tmp_path / "a")
    after = _weights(tmp_path / "a" / "gan")
    # the trainer seeds G's initialisation with base.seed, as this test did
    changed = [
        k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])
    ]
    assert len(changed) > len(before) // 2
    with open(tmp_path / "a" / "plots" / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and {"loss_g", "loss_d", "loss_a", "updated"} <= set(rows[0])
    for k in ("loss_g", "loss_d", "loss_a"):
        values = np.array([float(r[k]) for r in rows])
        assert np.isfinite(values).all() and values.std() > 1e-3
    assert m["gate_skipped"] == 0 and "val_ssim" not in m
    # a gate that never opens (e·P·eᵀ = 10‖e‖²) leaves every weight as initialised
    closed = GanParams(
        arch="pldt",
        identity=False,
        epochs=1,
        batch_size=2,
        lr=2e-3,
        pldt=PLDTParams(width=8, gate=True, gate_p=[10, 0, 0, 0, 10, 0, 0, 0, 10]),
        threads=1,
    )
    m = _train(closed, pairs8, tmp_path / "b")
    assert m["gate_skipped"] == m["steps"] == 4
    frozen = _weights(tmp_path / "b" / "gan")
    assert all(torch.equal(before[k], frozen[k]) for k in before if k.endswith("weight"))


def test_identity_needs_references_and_says_which_are_missing(pairs8, tmp_path):
    d = tmp_path / "pairs"
    d.mkdir()
    for f in pairs8.iterdir():
        if "PID0_" in f.name and "_REF_" in f.name:
            continue
        (d / f.name).write_bytes(f.read_bytes())
    report = Report()
    assert len(scan_pairs(d, True, report)) == 7
    assert len(report) == 1 and "PID 0 has no REF" in report.problems[0].reason
    assert len(scan_pairs(d, False)) == 8
    (d / "PID99_CLEAN0_IID5.jpg").write_bytes((d / "PID1_CLEAN0_IID1.jpg").read_bytes())
    report = Report()
    scan_pairs(d, False, report)
    assert "PID 99 has no CLEAN1" in report.problems[0].reason
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in d.glob("*_CLEAN*"):
        (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(TrainError, match="pairs.references"):
        _train(GanParams(epochs=1), bare, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainError, match="no PID"):
        _train(GanParams(epochs=1), tmp_path / "empty", tmp_path / "out2")


def test_original_command_line_on_a_pairs_folder(pairs8, tmp_path, repo_root):
    params = tmp_path / "params.yaml"
    params.write_text((repo_root / "params.yaml").read_text())
    model = tmp_path / "model"
    rc = cli.main(
        [
            "train-gan",
            str(pairs8),
            "2",
            str(model),
            "--params",
            str(params),
            "--set",
            "arch=pix2pix",
            "--set",
            "pix2pix.ngf=4",
            "--set",
            "pix2pix.ndf=4",
            "--set",
            "batch_size=4",
            "--set",
            "identity=false",
            "--set",
            "threads=1",
        ]
    )
    assert rc == 0
    G, cfg = load_generator(model)
    assert cfg["identity"] is False and cfg["in_channels"] == 3
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["epochs"] == 2 and metrics["train_pairs"] == 8
    assert (model / "plots" / "losses.csv").is_file()
    assert len(list((model / "checkpoints").glob("ckpt-*.pt"))) == 1
    assert cli.main(["train-gan", str(pairs8), "2", "--params", str(params)]) == 2
    assert (
        cli.main(["train-gan", str(tmp_path / "nowhere"), "1", str(model), "--params", str(params)])
        == 2
    )


def test_losses_and_grids_go_to_mlflow(pairs8, tmp_path, mlflow_store):
    import mlflow

    params = GanParams(
        arch="pix2pix",
        epochs=2,
        batch_size=4,
        pix2pix=Pix2PixParams(ngf=4, ndf=4),
        log_every=3,
        sample_every=1,
        threads=1,
    )
    _train(params, pairs8, tmp_path, val=pairs8)
    run = mlflow.search_runs(experiment_names=["facecal"], output_format="list")[0]
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run.info.run_id, "loss_g")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert run.data.params["gan.arch"] == "pix2pix"
    # validation after each sample epoch and at the end, on the step axis of the losses
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_ssim")] == [2, 4]
    assert "val_ssim_reference" in run.data.metrics and "final_loss_g" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert arts == {"samples/epoch_001.png", "samples/final.png"}


@pytest.mark.parametrize("arch", ["pix2pix", "pldt"])
def test_mixed_precision_and_channels_last_step(arch):
    # The GPU path (autocast + channels-last) exercised on CPU with bfloat16: same code, and
    # the losses must stay finite and the weights must move.
    from facecal.gan.train import Runtime, Trainer

    params = GanParams(arch=arch, pix2pix=Pix2PixParams(ngf=4, ndf=4), pldt=PLDTParams(width=4))
    rt = Runtime(torch.device("cpu"), amp_dtype=torch.bfloat16, channels_last=True)
    trainer = Trainer(params, 64, 6, rt, seed=0)
    trainer.train()
    before = {k: v.clone() for k, v in trainer.module("G").state_dict().items()}
    batch = (torch.rand(2, 9, 64, 64) * 2 - 1).contiguous(memory_format=torch.channels_last)
    losses = trainer.step(batch, torch.rand(2, 3, 64, 64) * 2 - 1)
    assert all(torch.isfinite(v).all() for v in losses.values())
    after = trainer.module("G").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert trainer.generate(batch[:, :6]).dtype == torch.float32


def test_lr_schedule_and_what_invalidates_a_checkpoint():
    from facecal.gan.train import lr_at, training_hash

    p = GanParams(lr=1.0, lr_decay=0.5)
    lrs = [lr_at(p, s, 10) for s in range(10)]
    assert lrs[:5] == [1.0] * 5
    assert all(a > b > 0 for a, b in zip(lrs[4:], lrs[5:]))
    assert lr_at(GanParams(lr=1.0, lr_decay=0.0), 9, 10) == 1.0
    # with decay, the schedule depends on the run length: more epochs is another run;
    # without, a longer run continues a finished one
    h = training_hash(p, 0, 64, "data", 1)
    assert training_hash(GanParams(lr=1.0, lr_decay=0.5, epochs=99), 0, 64, "data", 1) != h
    flat = GanParams(lr=1.0, lr_decay=0.0)
    assert training_hash(flat, 0, 64, "d", 1) == training_hash(
        GanParams(lr=1.0, lr_decay=0.0, epochs=99, samples=2, workers=5), 0, 64, "d", 1
    )
    # the thread count changes the weights: a checkpoint of another count is another run
    one = GanParams(lr=1.0, lr_decay=0.0, threads=1)
    assert training_hash(one, 0, 64, "d", 1) != training_hash(
        GanParams(lr=1.0, lr_decay=0.0, threads=2), 0, 64, "d", 1
    )
    assert training_hash(one, 0, 64, "d", 1) == training_hash(flat, 0, 64, "d", 1, threads=1)
    assert training_hash(flat, 1, 64, "d", 1) != training_hash(flat, 0, 64, "d", 1)
    assert training_hash(flat, 0, 64, "other data", 1) != training_hash(flat, 0, 64, "d", 1)
    with pytest.raises(ValueError, match="lr_decay"):
        GanParams(lr_decay=1.5)


def test_params_dataclass_defaults_equal_params_yaml(repo_root):
    from facecal import config

    assert config.load_section(GanParams, "gan", repo_root / "params.yaml") == GanParams()


def test_cached_and_streamed_pairs_give_the_same_batches(pairs8):
    cached = PairSource(scan_pairs(pairs8, True), 64, True, progress=False)
    streamed = PairSource(scan_pairs(pairs8, True), 64, True, cache_mb=0, workers=1, progress=False)
    assert cached.data is not None and streamed.data is None
    assert cached.data.shape == (8, 9, 64, 64) and cached.data.dtype == torch.uint8
    batches = cached.epoch_batches(3, 3, seed=0)
    assert [len(b) for b in batches] == [3, 3, 2]
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert batches != cached.epoch_batches(4, 3, seed=0)  # reshuffled every epoch
    assert batches == streamed.epoch_batches(3, 3, seed=0)  # a pure function of the seed
    for a, b in zip(cached.iterate(batches), streamed.iterate(batches)):
        assert torch.equal(a, b)
    # two ranks: disjoint halves of the same permutation, equal batch counts
    r0, r1 = (cached.epoch_batches(3, 2, 0, rank=r, world=2) for r in (0, 1))
    assert len(r0) == len(r1) == 2
    assert sorted(i for b in r0 + r1 for i in b) == list(range(8))
    others = cached.other_indices(3, list(range(8)), seed=0)
    assert all(o != i for i, o in enumerate(others))
    # a different size is resized on load (the original's 200² files, trained at 64²)
    assert PairSource(scan_pairs(pairs8, False), 32, False, progress=False).data.shape == (
        8,
        6,
        32,
        32,
    )


# --------------------------------------------------------------------------- warp_refine

from facecal.gan.data import PairDataError, load_points  # noqa: E402
from facecal.gan.train import WarpRefineParams  # noqa: E402
from facecal.generation import FaceGenerator, GenerateError  # noqa: E402
from facecal.warp import warp  # noqa: E402
from facecal.warp_mesh import triangulate  # noqa: E402


def _pair_points(pairs_dir):
    pairs = scan_pairs(pairs_dir, True)
    return pairs, torch.from_numpy(load_points(pairs_dir, pairs))


def test_warp_refine_starts_as_the_pure_warp(pairs8):
    pairs, points = _pair_points(pairs8)
    tri = triangulate(points[:, 1].double().mean(0).numpy(), 64, 64).tolist()
    torch.manual_seed(0)
    G = build_generator("warp_refine", 64, 6, ngf=8, triangles=tri).eval()
    batch = PairSource(pairs, 64, True, progress=False).take(list(range(8))).float() / 127.5 - 1
    with torch.no_grad():
        warped, painted, mask = G.parts(batch[:, :6], points[:, 0], points[:, 1])
        out = G(batch[:, :6], points[:, 0], points[:, 1])
    # The warp moves the reference by its own points: the same as `facecal.warp` on them.
    assert torch.allclose(
        warped, warp(batch[:, 3:6], points[:, 0], points[:, 1], G.warp.triangles), atol=1e-6
    )
    assert mask.shape == (8, 1, 64, 64) and 0.85 < float(mask.mean()) < 0.99
    assert torch.allclose(out, mask * warped + (1 - mask) * painted, atol=1e-6)
    # so an untrained generator already returns (almost) the warp, not noise
    assert float((out - warped).abs().mean()) < 0.08
    # The paint's strength is part of the mask: 0 is the pure warp, g scales what it paints.
    with torch.no_grad():
        G.paint_gain = 0.0
        assert torch.equal(G(batch[:, :6], points[:, 0], points[:, 1]), warped)
        G.paint_gain = 0.5
        half = G(batch[:, :6], points[:, 0], points[:, 1])
    assert torch.allclose(half, warped + 0.5 * (1 - mask) * (painted - warped), atol=1e-6)
    with pytest.raises(GeneratorError, match="paint_gain"):
        build_generator("warp_refine", 64, 6, triangles=tri, paint_gain=1.5)
    for gains in ([], [0.5, 1.2]):
        with pytest.raises(ValueError, match="paint_gain"):
            GanParams(warp_refine=WarpRefineParams(paint_gain=gains))
    with pytest.raises(GeneratorError, match="identity"):
        build_generator("warp_refine", 64, 3, triangles=tri)
    with pytest.raises(GeneratorError, match="triangles"):
        build_generator("warp_refine", 64, 6)
    with pytest.raises(ValueError, match="identity"):
        GanParams(arch="warp_refine", identity=False)
    for name in ("lambda_l1", "lambda_mask", "lambda_ssim"):  # a negative weight rewards error
        with pytest.raises(ValueError, match=f"warp_refine.{name}"):
            GanParams(warp_refine=WarpRefineParams(**{name: -1.0}))


def test_warp_refine_keeps_the_warp_and_generates_from_points(pairs8, tmp_path):
    # 8 drawn pairs whose expressions are pure geometry: the warp is already near-perfect
    # (SSIM 0.96 vs 0.91 for the reference), so training must keep it — the mask learns to
    # leave the warp alone (painted share 0.05 at the start → measured 0.01 after 30 steps).
    params = GanParams(
        arch="warp_refine",
        epochs=30,
        batch_size=8,
        lr=2e-3,
        warp_refine=WarpRefineParams(ngf=8, ndf=8),
        checkpoint_every=1000,
        sample_every=1000,
        threads=1,
    )
    m = _train(params, pairs8, tmp_path, val=pairs8)
    assert m["val_ssim"] > m["val_ssim_reference"] + 0.03
    assert abs(m["val_ssim"] - m["val_ssim_warp"]) < 0.01
    assert m["painted_share"] < 0.03
    with open(tmp_path / "plots" / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert "painted_share" in rows[0] and all(0 <= float(r["painted_share"]) <= 1 for r in rows)
    G, cfg = load_generator(tmp_path / "gan")
    assert cfg["arch"] == "warp_refine" and len(cfg["kwargs"]["triangles"]) > 100
    # The paint strength fitted on the val pairs is the best candidate, saved and reloaded.
    tried = {g: m[f"val_ssim_paint_{g:g}"] for g in params.warp_refine.paint_gain}
    assert m["paint_gain"] == max(tried, key=lambda g: (tried[g], -g))
    assert m["val_ssim"] == pytest.approx(tried[m["paint_gain"]], abs=1e-5)
    assert tried[0.0] == pytest.approx(m["val_ssim_warp"], abs=1e-5)  # no paint: the warp
    assert cfg["kwargs"]["paint_gain"] == m["paint_gain"] == G.paint_gain
    # In-pipeline generation (crop points + reference crops + reference points) is the model.
    pairs, points = _pair_points(pairs8)
    batch = PairSource(pairs, 64, True, progress=False).take(list(range(8)))
    refs = batch[:, 3:6].permute(0, 2, 3, 1).numpy()
    gen = FaceGenerator(tmp_path / "gan")
    faces = gen(points[:, 1].numpy(), refs, ref_points=points[:, 0].numpy())
    x = (
        torch.cat(
            [torch.from_numpy(gen.render(points[:, 1].numpy())).permute(0, 3, 1, 2), batch[:, 3:6]],
            1,
        ).float()
        / 127.5
        - 1
    )
    with torch.no_grad():
        direct = ((G(x, points[:, 0], points[:, 1]).clamp(-1, 1) + 1) * 127.5).round()
    assert np.abs(faces.astype(float) - direct.permute(0, 2, 3, 1).numpy()).max() <= 1
    with pytest.raises(GenerateError, match="reference's landmarks"):
        gen(points[:, 1].numpy(), refs)


def test_warp_refine_needs_the_pairs_points_file(pairs8, tmp_path):
    d = tmp_path / "pairs"
    d.mkdir()
    for f in pairs8.iterdir():
        if f.name != "points.npz":
            (d / f.name).write_bytes(f.read_bytes())
    with pytest.raises(TrainError, match="points.npz.*re-run `facecal pairs`"):
        _train(GanParams(arch="warp_refine", epochs=1), d, tmp_path / "out")
    pairs = scan_pairs(pairs8, True)
    z = dict(np.load(pairs8 / "points.npz"))
    z["ref"][0] = np.nan  # a pair without reference points
    np.savez(d / "points.npz", **z)
    with pytest.raises(PairDataError, match=f"PID {int(z['pid'][0])}"):
        load_points(d, pairs)


def test_a_warp_refine_step_warps_with_the_batch_points_and_refuses_none():
    from _serving import synth_face
    from facecal.gan.params import WarpRefineParams
    from facecal.gan.train import Runtime, Trainer
    from facecal.geometry import apply_affine, crop_transform
    from facecal.warp_mesh import triangulate

    size = 64
    _, face_pts = synth_face(0, "neutral", 1.0)
    crop = apply_affine(crop_transform(face_pts, size), face_pts)
    pts = torch.tensor(crop, dtype=torch.float32)
    tri = triangulate(pts.double().numpy(), size, size).tolist()
    params = GanParams(arch="warp_refine", warp_refine=WarpRefineParams(ngf=4, ndf=4))
    trainer = Trainer(params, size, 6, Runtime(torch.device("cpu")), 0, {"triangles": tri})
    trainer.train()
    batch = torch.rand(2, 9, size, size) * 2 - 1
    points = torch.stack([pts, pts + 1.5]).expand(2, 2, 68, 2).contiguous()
    losses = trainer.step(batch, None, points)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert 0.0 <= float(losses["painted_share"]) <= 1.0
    with pytest.raises(ValueError, match="points.npz"):
        trainer.step(batch, None, None)
    assert "loss_ssim" not in losses
    # The SSIM term, when weighted: part of the generator's loss and reported.
    params.warp_refine.lambda_ssim = 10.0
    trainer = Trainer(params, size, 6, Runtime(torch.device("cpu")), 0, {"triangles": tri})
    trainer.train()
    with_ssim = trainer.step(batch, None, points)
    assert 0.0 < float(with_ssim["loss_ssim"]) < 2.0
    gan_l1 = with_ssim["loss_g_gan"] + 100.0 * with_ssim["loss_l1"] + with_ssim["painted_share"]
    torch.testing.assert_close(with_ssim["loss_g"], gan_l1 + 10.0 * with_ssim["loss_ssim"])
