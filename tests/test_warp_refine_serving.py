"""gan.arch warp_refine through export and serving: the 4-input ONNX graph (images + reference
and target points) with its painted/mask outputs, the runtime's point handling, and
/v1/intensify compositing the painted face over the photo's full-resolution warp."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import onnx
from _serving import SIZE, http_client, running_server, synth_face, write_gold, write_pairs
from facecal import export, geometry, onnx_contract
from facecal.imageio import encode_png, load_image
from facecal.serving import runtime as rt
from facecal.serving.app import ServeParams, build
from facecal.serving.composite import composite_photo
from facecal.warp_mesh import face_region, triangulate, warp_region

# The pairs of `_serving.write_pairs` (pid → subject, emotion) in the train split.
TRAIN_PAIRS = [(0, "neutral"), (1, "neutral"), (2, "neutral"), (0, "happy")]


def crop_points_of(subject: int, emotion: str) -> np.ndarray:
    _, pts = synth_face(subject, emotion, 1.0)
    return geometry.apply_affine(geometry.crop_transform(pts, SIZE), pts)


def warp_refine_generator(seed: int = 0):
    """An untrained warp_refine generator whose painted face and mask span their ranges (conv
    weights rescaled as `_serving.small_generator` does), and its config kwargs."""
    import torch
    from torch import nn

    from facecal.gan.models import build_generator

    tri = triangulate(crop_points_of(0, "neutral"), SIZE, SIZE).tolist()
    kw = {"ngf": 8, "triangles": tri}
    torch.manual_seed(seed)
    G = build_generator("warp_refine", SIZE, 6, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.normal_(0.0, 1.0 / m.weight[0].numel() ** 0.5, generator=gen)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
        # Without the initial mask bias (which makes an untrained net almost the pure warp)
        # the mask mixes warp and painted face everywhere: both parts are exercised.
        G.refine.model.model[3].bias.zero_()
    return G.eval(), kw


def write_points(pairs: Path) -> np.ndarray:
    """points.npz of the train split, as the pairs stage writes it; returns the targets."""
    target = np.stack([crop_points_of(s, e) for _, (s, e) in enumerate(TRAIN_PAIRS)])
    np.savez(
        pairs / "train" / "points.npz",
        pid=np.arange(len(TRAIN_PAIRS), dtype=np.int64),
        target=target.astype(np.float32),
        ref=np.full(target.shape, np.nan, np.float32),
    )
    return target


@dataclass
class Model:
    root: Path
    gan_dir: Path
    gold: Path
    pairs: Path
    out: Path
    metrics: dict
    targets: np.ndarray

    @property
    def onnx(self) -> Path:
        return self.out / "generator.onnx"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    from facecal.gan.models import generator_config, save_generator

    root = tmp_path_factory.mktemp("warp_refine")
    G, kw = warp_refine_generator()
    gan = save_generator(G, generator_config("warp_refine", SIZE, "edges", True, kw), root / "gan")
    gold = write_gold(root)
    pairs, _ = write_pairs(root)
    targets = write_points(pairs)
    metrics = export.run_export(
        export.ExportParams(parity_batch=6), gan, gold, pairs, root / "export", None, seed=0
    )
    return Model(root, gan, gold, pairs, root / "export", metrics, targets)


@pytest.fixture(scope="module")
def runtime(model):
    return rt.GeneratorRuntime(model.onnx)


def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _torch_parts(gan_dir, lm, ref, src, dst):
    """The generator run directly in torch: (face, painted, mask) in [0, 1], NHWC."""
    import torch

    from facecal.gan.models import load_generator

    G, _ = load_generator(gan_dir)
    x = torch.from_numpy(np.concatenate([lm, ref], -1)).permute(0, 3, 1, 2).float() / 127.5 - 1
    s, d = torch.from_numpy(src).float(), torch.from_numpy(dst).float()
    with torch.no_grad():
        face = G(x, s, d)
        _, painted, mask = G.parts(x, s, d)
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    return nhwc((face + 1) / 2).clip(0, 1), nhwc((painted + 1) / 2).clip(0, 1), nhwc(mask)


def _inputs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    src = np.stack([crop_points_of(s % 3, "neutral") for s in range(n)]).astype(np.float32)
    dst = np.stack([crop_points_of(s % 3, "happy") for s in range(n)]).astype(np.float32)
    dst += rng.normal(0, 0.5, dst.shape).astype(np.float32)
    from facecal.render import render_landmarks

    lm = np.stack([render_landmarks(p, SIZE, "edges") for p in dst])
    ref = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    return lm, ref, src, dst


# --------------------------------------------------------------------------- contract, export


def test_contract_knows_the_point_archs_and_keeps_the_old_names():
    from facecal.gan import models

    assert onnx_contract.POINT_ARCHS == models.POINT_ARCHS
    assert all(onnx_contract.takes_points(a) == models.takes_points(a) for a in models.ARCHS)
    assert onnx_contract.input_names(True) == ["landmarks", "reference"]
    assert onnx_contract.input_names(False) == ["landmarks"]
    assert onnx_contract.input_names(True, "pix2pix") == ["landmarks", "reference"]
    assert onnx_contract.input_names(True, "warp_refine") == [
        "landmarks",
        "reference",
        "reference_points",
        "target_points",
    ]
    assert onnx_contract.output_names("pldt") == ["image", "image_u8"]
    assert onnx_contract.output_names("warp_refine") == ["image", "image_u8", "painted", "mask"]


def test_export_parity_covers_image_painted_and_mask(model):
    fp32, fp16 = model.metrics["parity"]["fp32"], model.metrics["parity"]["fp16"]
    assert model.metrics["passed"] is True
    for key in ("max_abs_diff", "painted_max_abs_diff", "mask_max_abs_diff"):
        assert fp32[key] <= 1e-4, key
        # fp16 U-Net, fp32 warp: within export.fp16_parity_atol, and really rounded.
        assert fp16[key] <= 0.02, key
    assert fp16["max_abs_diff"] > fp32["max_abs_diff"]
    info = json.loads((model.out / "model.json").read_text())
    assert info["inputs"] == ["landmarks", "reference", "reference_points", "target_points"]
    assert info["outputs"] == ["image", "image_u8", "painted", "mask"]
    assert info["reference_points"] == "mean points of 3 neutral train faces"

    for path in (model.onnx, model.out / "generator_fp16.onnx"):
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        sess = _session(path)
        ins = {i.name: (i.type, i.shape[1:]) for i in sess.get_inputs()}
        assert ins == {
            "landmarks": ("tensor(uint8)", [SIZE, SIZE, 3]),
            "reference": ("tensor(uint8)", [SIZE, SIZE, 3]),
            "reference_points": ("tensor(float)", [68, 2]),
            "target_points": ("tensor(float)", [68, 2]),
        }
        outs = {o.name: (o.type, o.shape[1:]) for o in sess.get_outputs()}
        assert outs == {
            "image": ("tensor(float)", [SIZE, SIZE, 3]),
            "image_u8": ("tensor(uint8)", [SIZE, SIZE, 3]),
            "painted": ("tensor(float)", [SIZE, SIZE, 3]),
            "mask": ("tensor(float)", [SIZE, SIZE, 1]),
        }


@pytest.mark.parametrize("n", [1, 3])  # batch sizes the parity batch did not use
def test_graph_matches_the_generator_in_torch(model, n):
    lm, ref, src, dst = _inputs(n, seed=n)
    feeds = {"landmarks": lm, "reference": ref, "reference_points": src, "target_points": dst}
    image, image_u8, painted, mask = _session(model.onnx).run(None, feeds)
    want_face, want_painted, want_mask = _torch_parts(model.gan_dir, lm, ref, src, dst)
    assert np.abs(image - want_face).max() <= 1e-4
    assert np.abs(painted - want_painted).max() <= 1e-4
    assert np.abs(mask - want_mask).max() <= 1e-4
    np.testing.assert_array_equal(image_u8, np.rint(image * 255).astype(np.uint8))
    # A test worth its name: the mask really mixes, and the painted face is a picture.
    assert mask.max() - mask.min() > 0.1 and painted.std() > 0.1  # (a smooth mask: 4 px cells)
    fp16 = _session(model.out / "generator_fp16.onnx").run(None, feeds)
    assert np.abs(fp16[0] - want_face).max() <= 0.02
    assert np.abs(fp16[3] - want_mask).max() <= 0.02


def test_metadata_carries_the_default_reference_points(model):
    meta = onnx_contract.read_metadata(model.onnx)
    pts = np.asarray(json.loads(meta["facecal.reference_points"]))
    # The pixel-mean neutral face's points: the mean of those faces' own (pids 0–2).
    np.testing.assert_allclose(pts, model.targets[:3].mean(0), atol=1e-4)
    io = json.loads(meta["facecal.io"])
    assert io["inputs"]["target_points"] == {
        "dtype": "float32",
        "shape": ["N", 68, 2],
        "frame": "crop",
        "units": "pixels",
    }
    assert io["outputs"]["mask"]["shape"] == ["N", SIZE, SIZE, 1]


def test_reference_points_sources_and_errors(model, tmp_path):
    pts, source = export.reference_points("train_neutral_mean", model.pairs)
    np.testing.assert_allclose(pts, model.targets[:3].mean(0), atol=1e-5)
    # An image as the reference: its own points are unknown; the mean train points stand in.
    pts2, source2 = export.reference_points("face.png", model.pairs)
    np.testing.assert_array_equal(pts2, pts)
    assert "stand-in" in source2 and "face.png" in source2
    bare = tmp_path / "pairs"
    shutil.copytree(model.pairs, bare)
    (bare / "train" / "points.npz").unlink()
    with pytest.raises(export.ExportError, match=r"points.npz: landmark points not found"):
        export.run_export(
            export.ExportParams(fp16=False), model.gan_dir, model.gold, bare, tmp_path / "o", None
        )
    with pytest.raises(export.ExportError, match=r"index.csv.*point arch still needs"):
        export.reference_points("face.png", tmp_path / "nothing")
    assert not (tmp_path / "o" / "generator.onnx").exists()


# --------------------------------------------------------------------------- runtime


def test_runtime_needs_points_for_a_point_arch(runtime, model):
    info = runtime.info()
    assert info["arch"] == "warp_refine" and info["points"] is True
    assert info["inputs"] == ["landmarks", "reference", "reference_points", "target_points"]
    assert info["default_reference_points"] is True
    lm, ref, src, dst = _inputs(2, seed=7)
    with pytest.raises(rt.InputError, match=r"target_points: required by this warp_refine model"):
        runtime.generate(lm)
    with pytest.raises(rt.InputError, match=r"reference_points: required .* with a reference"):
        runtime.generate(lm, ref, target_points=dst)
    with pytest.raises(rt.InputError, match=r"target_points: expected N×68×2"):
        runtime.generate(lm, ref, reference_points=src, target_points=dst[:, :60])
    with pytest.raises(rt.InputError, match=r"reference_points: 3 point sets for 2"):
        runtime.generate(
            lm, ref, reference_points=np.concatenate([src, src[:1]]), target_points=dst
        )
    face = runtime.generate(lm, ref, reference_points=src, target_points=dst, output="image")
    want_face, want_painted, want_mask = _torch_parts(model.gan_dir, lm, ref, src, dst)
    assert np.abs(face - want_face).max() <= 1e-4
    u8, painted, mask = runtime.generate_parts(lm, ref, src, dst)
    np.testing.assert_array_equal(u8, np.rint(face * 255).astype(np.uint8))
    assert np.abs(painted - want_painted).max() <= 1e-4 and mask.shape == (2, SIZE, SIZE, 1)
    # The default reference comes with its points from the metadata.
    default = np.broadcast_to(runtime.default_reference, lm.shape).copy()
    np.testing.assert_array_equal(
        runtime.generate(lm, target_points=dst),
        runtime.generate(
            lm, default, reference_points=runtime.default_reference_points, target_points=dst
        ),
    )


def test_runtime_checks_the_graph_against_the_config_arch(model, tmp_path):
    """A config that says pix2pix on this 4-input graph (or the reverse) is refused at load."""
    meta = onnx_contract.read_metadata(model.onnx)
    cfg = json.loads(meta["facecal.config"])
    path = tmp_path / "relabelled.onnx"
    shutil.copy(model.onnx, path)
    onnx_contract.attach_metadata(
        path, {"facecal.config": json.dumps({**cfg, "arch": "pix2pix"})}, "relabelled"
    )
    with pytest.raises(rt.ModelLoadError, match=r"graph inputs .* expected \['landmarks', "):
        rt.GeneratorRuntime(path)


# --------------------------------------------------------------------------- compositing


def test_composite_with_mask_one_is_the_pure_warp_and_with_mask_zero_the_painted_face():
    rng = np.random.default_rng(3)
    warped = rng.integers(0, 256, (240, 300, 3), dtype=np.uint8)
    painted = rng.uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32)
    # The crop covers photo pixels [22, 278) × [−8, 248): 4 photo pixels per crop pixel.
    photo_to_crop = np.array([[0.25, 0.0, -22 / 4], [0.0, 0.25, 8 / 4]])
    region = (40, 10, 260, 230)
    ones = np.ones((SIZE, SIZE, 1), np.float32)
    out = composite_photo(warped.copy(), painted, ones, photo_to_crop, region)
    np.testing.assert_array_equal(out, warped)  # mask ≡ 1: exactly the warp
    flat = np.full((SIZE, SIZE, 3), 0.25, np.float32)
    out = composite_photo(warped.copy(), flat, np.zeros_like(ones), photo_to_crop, region)
    # mask ≡ 0 away from the feathered borders: the painted face (bilinearly brought up).
    np.testing.assert_array_equal(out[70:160, 100:200], np.full((90, 100, 3), 64, np.uint8))
    outside = np.ones((240, 300), bool)
    outside[10:230, 40:260] = False
    np.testing.assert_array_equal(out[outside], warped[outside])
    # The region's ramp (feather 0.1 · 220 = 22 px): 11.5 px in, the painted face weighs 11.5/22.
    w = 11.5 / 22
    want = (1 - w) * warped[120, 51].astype(float) + w * 63.75
    assert np.abs(out[120, 51].astype(float) - want).max() <= 1


def test_serving_imports_no_torch(model):
    """The serving process, with a warp_refine model loaded, run and composited: no torch."""
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import facecal.serving.app, facecal.serving.routes
        from facecal.serving.runtime import GeneratorRuntime
        from facecal.serving.composite import composite_photo
        r = GeneratorRuntime({str(model.onnx)!r})
        lm = np.full((1, {SIZE}, {SIZE}, 3), 255, np.uint8)
        face, painted, mask = r.generate_parts(lm, None, None, r.default_reference_points)
        photo = np.zeros((100, 120, 3), np.uint8)
        composite_photo(photo, painted[0], mask[0], np.eye(2, 3), (0, 0, 120, 100))
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("torch modules:", bad)
        sys.exit(1 if bad else 0)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def server(model):
    params = ServeParams(model=str(model.onnx), max_batch=4, max_wait_ms=20)
    app, _ = build(params)
    with running_server(app, params) as url, http_client(url, timeout=60) as client:
        yield client


def _photo() -> np.ndarray:
    """A 300×240 (width × height) photo with one face."""
    face, _ = synth_face(5, "neutral", 1.0, size=200)
    return np.pad(face, ((20, 20), (40, 60), (0, 0)), mode="edge")


def _decode(data) -> np.ndarray:
    return load_image(base64.b64decode(data) if isinstance(data, str) else data)


def test_intensify_crop_and_photo_with_warp_refine(server, runtime):
    photo = _photo()
    assert photo.shape == (240, 300, 3)
    upload = {"image": ("face.png", encode_png(photo), "image/png")}
    r = server.post(
        "/v1/intensify", params={"format": "json"}, files=upload, data={"emotion": "happy"}
    )
    assert r.status_code == 200, r.text
    res = r.json()
    crop = _decode(res["image"])
    assert crop.shape == (SIZE, SIZE, 3)
    # The photo's own crop is the reference, warped from its landmarks to the calibrated ones.
    lm, aligned = _decode(res["landmark_image"]), _decode(res["aligned"])
    src = np.asarray(res["crop"]["detected"])
    dst = np.asarray(res["crop"]["calibrated"])
    want = runtime.generate(lm[None], aligned[None], reference_points=src, target_points=dst)[0]
    assert np.abs(crop.astype(int) - want.astype(int)).max() <= 1

    r = server.post(
        "/v1/intensify",
        params={"format": "json"},
        files=upload,
        data={"emotion": "happy", "output": "photo"},
    )
    assert r.status_code == 200, r.text
    res = r.json()
    out = _decode(res["image"])
    assert out.shape == photo.shape and res["output"] == "photo"
    assert (res["width"], res["height"]) == (300, 240)
    assert {"warp", "composite"} <= set(res["timings_ms"])
    detected, calibrated = np.asarray(res["detected"]), np.asarray(res["calibrated"])
    # The same composition, rebuilt from the response's numbers (rounded to 1e-3 px).
    pure = warp_region(photo.copy(), detected, calibrated)
    _, painted, mask = runtime.generate_parts(lm[None], aligned[None], src, dst)
    m = geometry.crop_transform(detected, SIZE)  # no shrink at this size: photo = work frame
    region = face_region(detected, calibrated, 300, 240)
    want = composite_photo(pure.copy(), painted[0], mask[0], m, region)
    diff = np.abs(out.astype(int) - want.astype(int))
    assert diff.mean() < 0.1 and np.percentile(diff, 99.9) <= 2
    # The painted face shows (the mask is far from 1 here), and only inside the face region.
    x0, y0, x1, y1 = region
    assert np.abs(out.astype(int) - pure.astype(int))[y0:y1, x0:x1].mean() > 2
    outside = np.ones(photo.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(out[outside], photo[outside])
    r = server.post("/v1/intensify", files=upload, data={"emotion": "surprise", "output": "photo"})
    assert r.status_code == 200 and _decode(r.content).shape == photo.shape


def test_generate_with_warp_refine(server, runtime):
    dst = crop_points_of(1, "happy")
    r = server.post("/v1/generate", json={"landmarks": dst.tolist()})
    assert r.status_code == 200, r.text
    want = runtime.generate(runtime.render(dst)[None], target_points=dst)[0]
    assert np.abs(_decode(r.content).astype(int) - want.astype(int)).max() <= 1
    # An aligned crop as the reference comes without its landmarks: refused, saying why.
    ref = base64.b64encode(encode_png(np.zeros((SIZE, SIZE, 3), np.uint8))).decode()
    r = server.post("/v1/generate", json={"landmarks": dst.tolist(), "reference": ref})
    assert r.status_code == 422 and "its own landmarks" in r.json()["detail"]
    # The photo the landmarks come from (frame 'image'): they are its own points.
    photo, pts = synth_face(4, "neutral", 1.0)
    h, w = photo.shape[:2]
    r = server.post(
        "/v1/generate",
        json={
            "landmarks": pts.tolist(),
            "frame": "image",
            "image_size": [w, h],
            "reference": base64.b64encode(encode_png(photo)).decode(),
        },
    )
    assert r.status_code == 200, r.text
    m = geometry.crop_transform(pts, SIZE)
    crop = geometry.apply_affine(m, pts)
    aligned = geometry.warp_image(photo, m, SIZE)
    lm = runtime.render(crop)[None]
    want = runtime.generate(lm, aligned[None], reference_points=crop, target_points=crop)[0]
    assert np.abs(_decode(r.content).astype(int) - want.astype(int)).max() <= 1


def test_generate_warps_another_photo_of_the_person_from_its_own_landmarks(server, runtime):
    """`reference_landmarks`: the reference is another photo (other size, other pose), aligned
    by its own points and warped from them to `landmarks`, as training aligned every face."""
    target_photo, target = synth_face(4, "happy", 1.0)
    h, w = target_photo.shape[:2]
    ref_face, ref_pts = synth_face(4, "neutral", 1.0, size=200)
    ref_photo = np.pad(ref_face, ((10, 30), (50, 0), (0, 0)), mode="edge")  # 250×240
    ref_pts = ref_pts + [50, 10]
    body = {
        "landmarks": target.tolist(),
        "frame": "image",
        "image_size": [w, h],
        "reference": base64.b64encode(encode_png(ref_photo)).decode(),
        "reference_landmarks": ref_pts.tolist(),
    }
    r = server.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    m_ref = geometry.crop_transform(ref_pts, SIZE)
    src = geometry.apply_affine(m_ref, ref_pts)
    dst = geometry.apply_affine(geometry.crop_transform(target, SIZE), target)
    aligned = geometry.warp_image(ref_photo, m_ref, SIZE)
    want = runtime.generate(
        runtime.render(dst)[None], aligned[None], reference_points=src, target_points=dst
    )[0]
    got = _decode(r.content)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    # Not the identity warp the request without reference_landmarks would be.
    body_same = {**body, "reference_landmarks": None}
    body_same["reference"] = base64.b64encode(encode_png(target_photo)).decode()
    same = _decode(server.post("/v1/generate", json=body_same).content)
    assert np.abs(got.astype(int) - same.astype(int)).mean() > 1
    # Bad reference points are named; they need a reference photo and the image frame.
    bad = {**body, "reference_landmarks": (ref_pts + [400, 0]).tolist()}  # right of 2 × 250
    r = server.post("/v1/generate", json=bad)
    assert r.status_code == 422 and "request.reference_landmarks: point 4 " in r.json()["detail"]
    flat = {**body, "reference_landmarks": [[100.0, 100.0]] * 68}
    detail = server.post("/v1/generate", json=flat).json()["detail"]
    assert detail.startswith("request.reference_landmarks: ") and detail.count("reference_") == 1
    r = server.post("/v1/generate", json={**body, "reference": None})
    assert r.status_code == 422 and "only with a reference photo" in r.json()["detail"]
    crop_frame = {"landmarks": dst.tolist(), "reference_landmarks": src.tolist()}
    r = server.post("/v1/generate", json=crop_frame)
    assert r.status_code == 422 and "only meaningful with frame 'image'" in r.json()["detail"]
