"""/v1/classify and the page's recognised emotions, over real loopback HTTP (and Chromium)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from _classifier import exported_cnn, trained_cnn
from _serving import exported, http_client, running_server, synth_face
from facecal.imageio import encode_png, save_image
from facecal.serving.app import ServeParams, build
from facecal.serving.classifier_runtime import ClassifierRuntime


@pytest.fixture(scope="module")
def models(synth_small, tmp_path_factory):
    cnn = trained_cnn(synth_small, tmp_path_factory)
    return exported(tmp_path_factory), cnn, exported_cnn(cnn, tmp_path_factory)["onnx"]


@pytest.fixture(scope="module")
def url(models):
    generator, _, classifier = models
    params = ServeParams(model=str(generator.onnx), classifier=str(classifier), max_wait_ms=1)
    app, _ = build(params)
    with running_server(app, params) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with http_client(url) as c:
        yield c


def _post(client, image: bytes, frame: str | None = None) -> httpx.Response:
    data = {"frame": frame} if frame else {}
    return client.post("/v1/classify", files={"image": ("x.png", image, "image/png")}, data=data)


def test_a_photo_gets_the_probabilities_of_the_training_path(models, client, tmp_path):
    """The service's answer = the ONNX model on the crop the pipeline makes of the same file
    (face_points.process_image + faces.crop_faces)."""
    import pandas as pd

    from facecal.classifier import crop_faces
    from facecal.detector import LandmarkDetector
    from facecal.face_points import process_image
    from facecal.manifest import Report

    _, cnn, onnx_path = models
    rt = ClassifierRuntime(str(onnx_path))
    det = LandmarkDetector()
    seen = set()
    for subject, emotion in [(6, "happy"), (7, "surprise"), (6, "anger"), (7, "neutral")]:
        photo, _ = synth_face(subject, emotion, 1.0)
        path = tmp_path / f"{subject}_{emotion}.png"
        save_image(photo, path)
        res = process_image(det, path, None)
        rows = pd.DataFrame([{"image": str(path), "points": res.points.reshape(-1).tolist()}])
        crop, ok = crop_faces(tmp_path, rows, rt.image_size, Report())
        expected = rt.probabilities(crop)[0]
        r = _post(client, path.read_bytes())
        assert r.status_code == 200, r.text
        body = r.json()
        got = np.array([body["probabilities"][c] for c in body["classes"]])
        assert body["classes"] == cnn.meta["classes"] and abs(got.sum() - 1) < 1e-5
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert body["emotion"] == rt.classes[int(expected.argmax())] and body["faces"] == 1
        assert body["confidence"] == pytest.approx(float(expected.max()), abs=1e-6)
        seen.add(body["emotion"])


def test_an_aligned_crop_is_classified_as_it_is(models, client):
    _, cnn, onnx_path = models
    rt = ClassifierRuntime(str(onnx_path))
    for i in (0, 40, 80):
        crop = cnn.crops[i]
        r = _post(client, encode_png(crop), "crop")
        assert r.status_code == 200, r.text
        got = np.array([r.json()["probabilities"][c] for c in rt.classes])
        np.testing.assert_allclose(got, rt.probabilities(crop[None])[0], atol=1e-6)
        np.testing.assert_allclose(got.sum(), 1, atol=1e-5)
    # A larger square crop is resized to the model's size; a non-square one is refused.
    big = np.repeat(np.repeat(cnn.crops[0], 2, 0), 2, 1)
    assert _post(client, encode_png(big), "crop").status_code == 200
    r = _post(client, encode_png(big[:, :100]), "crop")
    assert r.status_code == 422 and "square" in r.json()["detail"]


def test_bad_uploads_and_no_classifier(models, client):
    photo, _ = synth_face(6, "happy", 1.0)
    r = _post(client, encode_png(photo[:20, :20]))
    assert r.status_code == 422 and "no face found" in r.json()["detail"]
    r = _post(client, b"not an image at all")
    assert r.status_code == 422 and r.json()["detail"].startswith("image:")
    assert _post(client, b"").status_code == 422
    r = _post(client, encode_png(photo), "sideways")
    assert r.status_code == 422
    info = client.get("/v1/model").json()["classifier"]
    assert info["classes"] and info["regime"] == "real_all" and len(info["classifier_hash"]) == 16

    generator, _, _ = models
    app, _ = build(ServeParams(model=str(generator.onnx)))
    with running_server(app) as base, http_client(base) as other:
        r = _post(other, encode_png(photo))
        assert r.status_code == 404 and "--classifier" in r.json()["detail"]
        assert other.get("/v1/model").json()["classifier"] is None


# --------------------------------------------------------------------------- the web page


def test_the_page_shows_the_recognised_emotion_of_photo_and_generated_face(
    browser, url, client, tmp_path
):
    photo, _ = synth_face(6, "neutral", 1.0)
    path = tmp_path / "face.png"
    save_image(photo, path)
    expected = _post(client, path.read_bytes()).json()
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#emotion option').length > 0")
    assert "classifier classifier.onnx (real_all" in page.inner_text("#model-info")
    page.select_option("#emotion", "happy")
    page.set_input_files("#photo", str(path))
    page.click("#go")
    page.wait_for_function("!document.querySelector('#recognised').hidden", timeout=30_000)
    assert page.inner_text("#status") == "Done."
    verdict = page.inner_text("#photo-emotion .verdict")
    assert verdict.startswith(expected["emotion"] + " (")
    assert f"{100 * expected['confidence']:.1f} %" in verdict
    bars = page.eval_on_selector_all("#photo-emotion .bar", "els => els.length")
    assert bars == len(expected["classes"])
    # The bars are drawn to scale (the top one first), not just labelled.
    fill, track = page.eval_on_selector(
        "#photo-emotion .bar",
        "e => [e.querySelector('.fill').offsetWidth, e.querySelector('.track').offsetWidth]",
    )
    assert track > 50 and abs(fill / track - expected["confidence"]) < 0.02
    generated = page.inner_text("#generated-emotion .verdict")
    assert generated.split(" (")[0] in expected["classes"]
    assert page.eval_on_selector_all("#generated-emotion .bar.top", "els => els.length") == 1
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert errors == []
    page.close()
