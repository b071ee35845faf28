"""`facecal.serving`: the onnxruntime runtime and the HTTP service, over real loopback HTTP."""

from __future__ import annotations

import base64
import json
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnx
from _serving import (
    GOLD_EMOTIONS,
    SIZE,
    exported,
    gold_json,
    gold_templates,
    http_client,
    running_server,
    synth_face,
)
from facecal import calibration, geometry
from facecal.imageio import encode_png, load_image
from facecal.serving import runtime as rt
from facecal.serving.app import ServeParams, build
from facecal.warp_mesh import face_region

MAX_BATCH = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return exported(tmp_path_factory)


@pytest.fixture(scope="module")
def runtime(model):
    """An independent session on the same file: the reference the service must agree with."""
    return rt.GeneratorRuntime(model.onnx)


@pytest.fixture(scope="module")
def server(model):
    params = ServeParams(
        model=str(model.onnx),
        max_batch=MAX_BATCH,
        max_wait_ms=30,
        max_body_bytes=2_000_000,
        max_image_pixels=4_000_000,
    )
    app, _ = build(params)
    with running_server(app, params) as url, http_client(url) as client:
        yield client


def png(image: np.ndarray) -> bytes:
    return encode_png(image)


def decode(data: bytes | str) -> np.ndarray:
    return load_image(base64.b64decode(data) if isinstance(data, str) else data)


def crop_points(emotion: str = "happy", jitter: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    canon = gold_templates()[emotion] + rng.normal(0, jitter, (68, 2))
    return geometry.apply_affine(geometry.canonical_to_crop(SIZE), canon)


def expected_face(runtime, crop: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    ref = None if reference is None else reference[None]
    return runtime.generate(runtime.render(crop)[None], ref)[0]


def assert_close_u8(a: np.ndarray, b: np.ndarray, tol: int = 1) -> None:
    # Batched and single runs may differ by one grey level (summation order in the kernels).
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).max() <= tol


# --------------------------------------------------------------------------- runtime


def test_provider_fallback_reports_cpu(runtime):
    if rt.cuda_driver_present():
        pytest.skip("a CUDA driver is present: the session may run on the GPU here")
    assert runtime.providers == ["CPUExecutionProvider"]
    assert runtime.io_binding is False
    assert rt.available_providers(tensorrt=True) == ["CPUExecutionProvider"]
    info = runtime.info()
    assert info["providers"] == ["CPUExecutionProvider"] and info["input_size"] == [SIZE, SIZE]
    assert info["identity"] is True and info["emotions"] == sorted(GOLD_EMOTIONS)


def test_runtime_matches_torch_and_accepts_float(runtime, model):
    import torch

    from facecal.gan.models import load_generator

    lm = np.stack([runtime.render(crop_points(e, 0.03, i)) for i, e in enumerate(GOLD_EMOTIONS)])
    ref = np.broadcast_to(runtime.default_reference, lm.shape).copy()
    G, _ = load_generator(model.gan_dir)
    x = torch.from_numpy(np.concatenate([lm, ref], -1)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        want = ((G(x).permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)
    got = runtime.generate(lm, output="image")
    assert np.abs(got - want).max() <= 1e-4
    u8 = runtime.generate(lm)  # default reference when none is given
    np.testing.assert_array_equal(u8, np.rint(got * 255).astype(np.uint8))
    np.testing.assert_array_equal(runtime.generate(lm.astype(np.float32) / 255.0, ref), u8)
    with pytest.raises(rt.InputError, match="expected N×64×64×3"):
        runtime.generate(lm[:, :32])
    with pytest.raises(rt.InputError, match=r"\[0, 1\]"):
        runtime.generate(lm.astype(np.float32))
    with pytest.raises(rt.InputError, match="2 images for 3"):
        runtime.generate(lm, ref[:2])


def test_runtime_of_an_image_only_arch_takes_no_points(runtime):
    """pix2pix graphs keep their two inputs; points (warp_refine's) are refused, not ignored."""
    assert runtime.info()["points"] is False and runtime.input_names == ["landmarks", "reference"]
    lm = runtime.render(crop_points("happy"))[None]
    with pytest.raises(rt.InputError, match="takes no landmark points"):
        runtime.generate(lm, target_points=crop_points("happy"))
    with pytest.raises(rt.InputError, match="no painted/mask outputs"):
        runtime.generate_parts(lm)


def test_runtime_refuses_what_is_not_a_facecal_model(tmp_path):
    with pytest.raises(rt.ModelLoadError, match="model file not found"):
        rt.GeneratorRuntime(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 definitely not protobuf" * 10)
    with pytest.raises(rt.ModelLoadError, match="onnxruntime cannot load it"):
        rt.GeneratorRuntime(garbage)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(
        onnx.helper.make_model(
            graph, ir_version=10, opset_imports=[onnx.helper.make_opsetid("", 18)]
        ),
        str(foreign),
    )
    with pytest.raises(rt.ModelLoadError, match="not a facecal export"):
        rt.GeneratorRuntime(foreign)
    with pytest.raises(rt.ModelLoadError, match="models:/<name>@<alias>"):
        rt.parse_models_uri("models:/just-a-name")


# --------------------------------------------------------------------------- endpoints


def test_health_model_and_docs(server):
    r = server.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    info = server.get("/v1/model").json()
    assert info["input_size"] == [SIZE, SIZE] and info["file"] == "generator.onnx"
    assert info["providers"][-1] == "CPUExecutionProvider"
    assert {"name", "version", "alias"} <= set(info)
    assert info["batching"]["enabled"] and info["batching"]["max_batch"] == MAX_BATCH
    schema = server.get("/openapi.json").json()
    assert {"/healthz", "/v1/model", "/v1/generate", "/v1/generate/batch", "/v1/intensify"} <= set(
        schema["paths"]
    )
    assert server.get("/docs").status_code == 200
    page = server.get("/")
    assert page.status_code == 200 and 'id="result-image"' in page.text
    assert server.get("/static/app.js").status_code == 200


def test_generate_png_and_json(server, runtime):
    crop = crop_points("surprise")
    r = server.post("/v1/generate", json={"landmarks": crop.tolist()})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    face = decode(r.content)
    assert_close_u8(face, expected_face(runtime, crop))
    assert face.std() > 10
    r = server.post("/v1/generate", params={"format": "json"}, json={"landmarks": crop.tolist()})
    body = r.json()
    assert r.status_code == 200 and (body["width"], body["height"]) == (SIZE, SIZE)
    np.testing.assert_array_equal(decode(body["image"]), face)
    np.testing.assert_allclose(body["landmarks_crop"], crop, atol=1e-3)


def test_generate_from_image_pixels_with_a_reference_photo(server, runtime):
    photo, pts = synth_face(4, "neutral", 1.0)
    h, w = photo.shape[:2]
    r = server.post(
        "/v1/generate",
        params={"format": "json"},
        json={
            "landmarks": pts.tolist(),
            "frame": "image",
            "image_size": [w, h],
            "reference": base64.b64encode(png(photo)).decode(),
        },
    )
    assert r.status_code == 200, r.text
    m = geometry.crop_transform(pts, SIZE)
    crop = geometry.apply_affine(m, pts)
    np.testing.assert_allclose(r.json()["landmarks_crop"], crop, atol=1e-3)
    want = expected_face(runtime, crop, geometry.warp_image(photo, m, SIZE))
    assert_close_u8(decode(r.json()["image"]), want)
    # The reference matters: the default average face gives another picture.
    assert np.abs(want.astype(int) - expected_face(runtime, crop).astype(int)).mean() > 1


def test_batch_endpoint_reports_bad_items_without_failing_others(server, runtime):
    good = [crop_points(e, 0.02, i) for i, e in enumerate(GOLD_EMOTIONS)]
    items = [{"landmarks": p.tolist()} for p in good]
    items.insert(1, {"landmarks": [[10.0, 10.0]] * 68})  # degenerate
    items.append({"landmarks": (good[0] + 1000).tolist()})  # out of range
    r = server.post("/v1/generate/batch", json={"items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 5 and body["failed"] == 2
    res = body["results"]
    assert "collinear or all equal" in res[1]["detail"] and "items[1]" in res[1]["detail"]
    assert "lies outside" in res[4]["detail"] and "items[4]" in res[4]["detail"]
    for i, p in zip((0, 2, 3), good):
        assert_close_u8(decode(res[i]["image"]), expected_face(runtime, p))
    too_many = {"items": [{"landmarks": good[0].tolist()}] * (MAX_BATCH + 1)}
    r = server.post("/v1/generate/batch", json=too_many)
    assert r.status_code == 413 and "max_batch" in r.json()["detail"]


def test_concurrent_requests_are_batched_and_stay_in_order(server, runtime):
    before = server.get("/v1/model").json()["batching"]
    crops = [crop_points(GOLD_EMOTIONS[i % 3], 0.04, 100 + i) for i in range(16)]

    def one(crop):
        with http_client(str(server.base_url)) as c:
            return c.post("/v1/generate", json={"landmarks": crop.tolist()})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, crops))
    for crop, r in zip(crops, answers):
        assert r.status_code == 200
        assert_close_u8(decode(r.content), expected_face(runtime, crop))
    after = server.get("/v1/model").json()["batching"]
    assert after["items"] - before["items"] == 16
    assert after["batches"] - before["batches"] < 16  # some requests shared a run
    assert after["largest_batch"] > 1


def test_intensify(server, runtime):
    photo, truth = synth_face(5, "neutral", 1.0)
    upload = {"image": ("face.png", png(photo), "image/png")}
    results = {}
    for a in (0.0, 0.5, 1.0):
        r = server.post(
            "/v1/intensify",
            params={"format": "json"},
            files=upload,
            data={"emotion": "Happy", "intensity": str(a)},
        )
        assert r.status_code == 200, r.text
        results[a] = r.json()
    res = results[1.0]
    assert res["emotion"] == "happy" and res["faces"] == 1
    detected = np.asarray(res["detected"])
    assert geometry.nme(detected, truth) < 0.08  # dlib found this face
    cal = {a: np.asarray(v["calibrated"]) for a, v in results.items()}
    np.testing.assert_allclose(cal[0.0], detected, atol=1e-3)
    np.testing.assert_allclose(cal[0.5], (cal[0.0] + cal[1.0]) / 2, atol=2e-3)
    # The service calibrates with the method that made gold.json (pca here, the pipeline's
    # default): full intensity puts the face at the gold's coordinate along the happy direction.
    gold = calibration.GoldModel.from_json(gold_json())
    assert gold.method == "pca"
    np.testing.assert_allclose(cal[1.0], gold.calibrate(detected, "happy", 1.0), atol=0.01)
    coordinate = gold.model.coordinate("happy", geometry.to_canonical(cal[1.0])[0])
    assert coordinate == pytest.approx(gold.model.gold_coordinate["happy"], abs=1e-3)
    assert gold.model.coordinate("happy", geometry.to_canonical(detected)[0]) < coordinate
    # The returned intermediates are exactly what the generator got.
    lm, aligned = decode(res["landmark_image"]), decode(res["aligned"])
    assert lm.shape == aligned.shape == (SIZE, SIZE, 3)
    assert_close_u8(decode(res["image"]), runtime.generate(lm[None], aligned[None])[0])
    m = geometry.crop_transform(detected, SIZE)
    np.testing.assert_allclose(
        res["crop"]["calibrated"], geometry.apply_affine(m, cal[1.0]), atol=0.02
    )
    r = server.post("/v1/intensify", files=upload, data={"emotion": "surprise"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert decode(r.content).shape == (SIZE, SIZE, 3)


def test_intensify_photo_output_is_the_photo_at_its_own_resolution(server):
    face, _ = synth_face(5, "neutral", 1.0, size=256)
    # Not square, and larger than the detection copy would be at detect_max_side 1024.
    photo = np.pad(face, ((40, 0), (0, 120), (0, 0)), mode="edge")
    upload = {"image": ("face.png", png(photo), "image/png")}
    out = {}
    for a in (0.0, 1.0):
        r = server.post(
            "/v1/intensify",
            params={"format": "json"},
            files=upload,
            data={"emotion": "happy", "intensity": str(a), "output": "photo"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["output"] == "photo" and r.json()["width"] == photo.shape[1]
        out[a] = decode(r.json()["image"])
        assert out[a].shape == photo.shape
    # Intensity 0 leaves the landmarks where they are: the photo comes back as it was.
    assert np.abs(out[0.0].astype(int) - photo.astype(int)).max() <= 1
    # Intensity 1 moves the face; far from it (the region's frame is fixed) nothing changes.
    diff = np.abs(out[1.0].astype(int) - photo.astype(int)).sum(-1)
    assert diff.mean() > 0.1 and diff.max() > 30
    detected = np.asarray(r.json()["detected"])
    x0, y0, x1, y1 = face_region(detected, np.asarray(r.json()["calibrated"]), *photo.shape[1::-1])
    outside = np.ones(diff.shape, bool)
    outside[y0:y1, x0:x1] = False
    assert diff[outside].max() == 0
    r = server.post("/v1/intensify", files=upload, data={"emotion": "surprise", "output": "photo"})
    assert r.status_code == 200 and decode(r.content).shape == photo.shape


def test_no_batching_gives_the_same_faces(model, runtime):
    params = ServeParams(model=str(model.onnx), batching=False)
    app, _ = build(params)
    crop = crop_points("anger", 0.02, 3)
    with running_server(app, params) as url:
        r = httpx.post(url + "/v1/generate", json={"landmarks": crop.tolist()}, timeout=30)
        info = httpx.get(url + "/v1/model").json()
    assert r.status_code == 200 and info["batching"]["enabled"] is False
    assert_close_u8(decode(r.content), expected_face(runtime, crop))


# --------------------------------------------------------------------------- bad requests


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width×height pixels that compresses to a few kilobytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    raw = zlib.compress(row * height, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", raw)
        + chunk(b"IEND", b"")
    )


def test_oversize_and_garbage_uploads_are_refused_quickly(server):
    photo, _ = synth_face(0, "neutral", 1.0)
    form = {"emotion": "happy", "intensity": "1"}
    cases = [
        (png_bomb(4000, 4000), 413, "exceeds the limit"),  # 16 MP > 4 MP, a 2 KB file
        (b"\x00garbage" * 100, 422, "not a readable image"),
        (png(photo)[:200], 422, "corrupt or truncated"),
        (b"", 422, "empty upload"),
        (png(np.full((80, 80, 3), 128, np.uint8)), 422, "no face found"),
    ]
    for data, status, message in cases:
        t0 = time.perf_counter()
        r = server.post("/v1/intensify", files={"image": ("x.png", data, "image/png")}, data=form)
        took = time.perf_counter() - t0
        assert r.status_code == status, (message, r.text)
        assert message in r.json()["detail"]
        assert took < 5.0, f"{message}: took {took:.1f} s"  # refused, not decoded or hung
    # Bodies over max_body_bytes (2 MB here): refused by Content-Length before any of the body
    # is sent, and counted while a chunked body (no length) streams in. Raw sockets, so the
    # client sends exactly this much and then reads.
    t0 = time.perf_counter()
    answer = raw_http(
        server,
        b"POST /v1/intensify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
        b"multipart/form-data; boundary=b\r\nContent-Length: 3000000\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer
    chunk = b"186a0\r\n" + b"x" * 100_000 + b"\r\n"  # 100 000 bytes, chunked encoding
    answer = raw_http(
        server,
        b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
        b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 21,
    )
    assert answer.startswith(b"HTTP/1.1 413") and b"exceeds the limit of 2000000" in answer
    assert time.perf_counter() - t0 < 10.0
    assert server.get("/healthz").status_code == 200  # and it still serves


def raw_http(client: httpx.Client, request: bytes) -> bytes:
    """Send `request` bytes on a fresh connection; everything the server answers until it
    closes the connection."""
    import socket

    host, port = str(client.base_url).rstrip("/").rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def test_a_stalled_body_gets_408_not_a_hang(model):
    params = ServeParams(model=str(model.onnx), body_timeout_s=0.5)
    app, _ = build(params)
    with running_server(app, params) as url, http_client(url) as client:
        answer = raw_http(
            client,
            b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b'application/json\r\nContent-Length: 100\r\n\r\n{"landmarks": ',
        )
        r = client.get("/static/app.js")  # responses that listen for disconnects still work
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer
    assert r.status_code == 200 and b"intensify" in r.content


@pytest.mark.parametrize(
    "body, message",
    [
        ({"landmarks": [[1.0, 2.0]] * 67}, "at least 68"),
        ({"landmarks": [[1.0, 2.0, 3.0]] * 68}, "at most 2"),
        ({"landmarks": "nope"}, "valid list"),
        ({"landmarks": "FACE", "extra": 1}, "Extra inputs"),
        ({"landmarks": [[float("nan"), 2.0]] * 68}, "finite"),
        ({"landmarks": "FAR"}, "lies outside"),
        ({"landmarks": [[10.0, 10.0]] * 68}, "collinear or all equal"),
        ({"frame": "image"}, "Field required"),
        ({"landmarks": "FACE", "frame": "sideways"}, "'crop' or 'image'"),
        ({"landmarks": "FACE", "image_size": [64, 64]}, "only meaningful with frame 'image'"),
        ({"landmarks": "FACE", "frame": "image"}, "image_size: required"),
        ({"landmarks": "FACE", "frame": "image", "image_size": [20000, 20000]}, "exceeds"),
        ({"landmarks": "FACE", "frame": "image", "image_size": [0, 5]}, "greater than or equal"),
        ({"landmarks": "FACE", "reference": "%%%"}, "not valid base64"),
        (
            {"landmarks": "FACE", "reference": base64.b64encode(b"notanimage").decode()},
            "not a readable image",
        ),
    ],
)
def test_bad_generate_requests_are_4xx_json(server, body, message):
    face = crop_points()
    far = face.copy()
    far[30] += 1e9
    body = {
        **body,
        **(
            {"landmarks": {"FACE": face, "FAR": far}[body["landmarks"]].tolist()}
            if isinstance(body.get("landmarks"), str) and body["landmarks"] in ("FACE", "FAR")
            else {}
        ),
    }
    r = server.post(
        "/v1/generate", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"] and message in json.dumps(r.json()), r.text


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_coord = st.floats(-200, 300) | st.integers(-(10**6), 10**6) | st.just(float("inf"))
_near_valid = st.fixed_dictionaries(
    {
        "landmarks": st.lists(st.lists(_coord, min_size=1, max_size=3), min_size=66, max_size=69)
        | st.lists(
            st.tuples(st.floats(0, 64), st.floats(0, 64)).map(list), min_size=68, max_size=68
        )
    },
    optional={
        "frame": st.sampled_from(["crop", "image", "CROP", ""]),
        "image_size": st.lists(st.integers(-3, 30000), max_size=3),
        "reference": st.text(max_size=30)
        | st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(
        [
            "/v1/generate",
            "/v1/generate?format=json",
            "/v1/generate/batch",
            "/v1/generate?format=gif",
        ]
    ),
    body=_json | _near_valid | _near_valid.map(lambda d: {"items": [d, d]}),
)
def test_fuzz_json_endpoints_never_5xx(server, path, body):
    r = server.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert "error" in r.json()


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    data=st.binary(max_size=300) | st.sampled_from([b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM"]),
    emotion=st.text(max_size=10) | st.sampled_from(["happy", "neutral", "sad", "HA"]),
    intensity=st.text(max_size=6) | st.floats(-2, 3).map(str) | st.just("nan"),
    fmt=st.sampled_from(["png", "json", "xml"]),
)
def test_fuzz_intensify_never_5xx(server, data, emotion, intensity, fmt):
    r = server.post(
        "/v1/intensify",
        params={"format": fmt},
        files={"image": ("f", data, "application/octet-stream")},
        data={"emotion": emotion, "intensity": intensity},
    )
    assert 400 <= r.status_code < 500, r.text
    assert "error" in r.json()


def test_micro_batcher_groups_orders_and_isolates_failures():
    import asyncio

    from facecal.serving.batching import MicroBatcher

    seen = []

    def run(items):
        seen.append(list(items))
        if "bad" in items:
            raise ValueError("broken batch")
        return [i * 2 for i in items]

    async def scenario():
        b = MicroBatcher(run, max_batch=4, max_wait_s=0.05, max_inflight=1)
        await b.start()
        try:
            first = await asyncio.gather(*(b.submit(i) for i in range(6)))
            bad = await asyncio.gather(b.submit("bad"), b.submit(1), return_exceptions=True)
            after = await b.submit(21)
        finally:
            await b.stop()
        return first, bad, after, b.stats

    first, bad, after, stats = asyncio.run(scenario())
    assert first == [0, 2, 4, 6, 8, 10]  # each caller gets its own result
    assert [len(s) for s in seen[:2]] == [4, 2]  # max_batch respected, rest batched
    assert all(isinstance(e, ValueError) for e in bad)  # the failing batch fails its items…
    assert after == 42  # …and the next batch runs normally
    assert stats.items == 9 and stats.max_seen == 4


def test_landmarks_whose_alignment_collapses_are_refused(server):
    """Anchors built so the least-squares similarity onto the canonical frame is zero (every
    point would map onto one crop pixel, and warping the reference would divide by zero)."""
    d0 = geometry.CANONICAL_RIGID - geometry.CANONICAL_RIGID.mean(0)
    alpha, beta = (d0[:, 1] ** 2).sum(), (d0[:, 0] ** 2).sum()
    pts = np.tile([[300.0, 200.0]], (68, 1)) + np.random.default_rng(0).uniform(-40, 40, (68, 2))
    pts[geometry.RIGID_IDX] = [300.0, 200.0] + 80 * np.c_[alpha * d0[:, 0], -beta * d0[:, 1]] / max(
        alpha, beta
    )
    photo = np.zeros((400, 600, 3), np.uint8)
    r = server.post(
        "/v1/generate",
        json={
            "landmarks": pts.tolist(),
            "frame": "image",
            "image_size": [600, 400],
            "reference": base64.b64encode(png(photo)).decode(),
        },
    )
    assert r.status_code == 422, r.text
    assert "crop frame" in r.json()["detail"]


def test_a_download_finished_meanwhile_by_another_process_is_used(tmp_path):
    """cached_download: another process fills the cache entry while this one downloads; the
    rename onto its (non-empty) folder fails, and its complete copy is used."""
    import json

    target = tmp_path / "cache" / "m" / "v1-abc"

    def fetch(folder):
        (folder / "model.onnx").write_bytes(b"ours")
        target.mkdir(parents=True)  # the other process, finishing first
        (target / "model.onnx").write_bytes(b"theirs")
        (target / rt.COMPLETE_MARKER).write_text(json.dumps({"name": "m"}))

    assert rt.cached_download(target, fetch, {"name": "m"}) == target
    assert (target / "model.onnx").read_bytes() == b"theirs"
    assert [p.name for p in target.parent.iterdir()] == ["v1-abc"]  # no temporary left

    # An incomplete entry (no marker: an interrupted earlier attempt) is replaced by ours.
    stale = target.parent / "v2"
    stale.mkdir()
    (stale / "partial").write_bytes(b"")
    rt.cached_download(stale, lambda folder: (folder / "model.onnx").write_bytes(b"ours"), {})
    assert sorted(p.name for p in stale.iterdir()) == [rt.COMPLETE_MARKER, "model.onnx"]
