"""The web page at `/`, driven in headless Chromium (Debian's `chromium` + playwright).

Skips, saying why, where Chromium or playwright is missing. Never downloads a browser: it
launches the system binary.
"""

from __future__ import annotations

import pytest

from _serving import exported, running_server, synth_face
from facecal.imageio import save_image
from facecal.serving.app import ServeParams, build


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    model = exported(tmp_path_factory)
    app, _ = build(ServeParams(model=str(model.onnx), max_wait_ms=1))
    with running_server(app) as base:
        yield base


def _canvas_is_drawn(page, selector: str) -> bool:
    return page.evaluate(
        """(sel) => {
        const c = document.querySelector(sel);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let min = 255, max = 0;
        for (let i = 0; i < d.length; i += 4) { min = Math.min(min, d[i]); max = Math.max(max, d[i]); }
        return max - min > 50;
    }""",
        selector,
    )


def test_upload_a_face_and_see_the_three_stages(browser, url, tmp_path):
    photo, _ = synth_face(6, "neutral", 1.0)
    path = tmp_path / "face.png"
    save_image(photo, path)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#emotion option').length > 0")
    assert "CPUExecutionProvider" in page.inner_text("#model-info")
    options = page.eval_on_selector_all("#emotion option", "els => els.map(e => e.value)")
    assert options == ["anger", "happy", "surprise"]
    page.select_option("#emotion", "surprise")
    page.fill("#intensity", "0.75")
    page.set_input_files("#photo", str(path))
    page.click("#go")
    page.wait_for_function(
        "document.querySelector('#result-image').complete && "
        "document.querySelector('#result-image').naturalWidth > 0",
        timeout=30_000,
    )
    # The warped photo follows the generated face; "Done." comes after both.
    page.wait_for_function(
        "document.querySelector('#status').textContent !== 'Working…'", timeout=60_000
    )
    assert page.inner_text("#status") == "Done."
    assert page.evaluate("document.querySelector('#result-image').naturalWidth") == 64
    assert page.evaluate("document.querySelector('#landmark-image').naturalWidth") == 64
    assert page.is_visible("#results")
    assert _canvas_is_drawn(page, "#detected") and _canvas_is_drawn(page, "#calibrated")
    assert "surprise at intensity 0.75" in page.inner_text("#timings")
    # The photo itself, at its own resolution, with the face warped.
    assert page.is_visible("#photo-result")
    size = page.evaluate(
        "[document.querySelector('#photo-image').naturalWidth, "
        "document.querySelector('#photo-image').naturalHeight]"
    )
    assert size == [photo.shape[1], photo.shape[0]]
    assert page.inner_text("#photo-size") == f"{photo.shape[1]}×{photo.shape[0]}"
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert errors == []

    # A picture without a face: the page shows the service's 4xx message.
    save_image(photo[:, :, ::-1][:20, :20], tmp_path / "no-face.png")
    page.set_input_files("#photo", str(tmp_path / "no-face.png"))
    page.click("#go")
    page.wait_for_function("document.querySelector('#status').className === 'error'")
    assert "422" in page.inner_text("#status") and "no face" in page.inner_text("#status")
    page.close()
