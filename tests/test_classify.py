"""`facecal classify`: photos → emotions, agreeing with the pipeline's own predictions."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from _classifier import pipeline_predictions, trained_cnn
from facecal.cli import main as cli_main


@pytest.fixture(scope="module")
def cnn(synth_small, tmp_path_factory):
    return trained_cnn(synth_small, tmp_path_factory)


def run_cli(args, capsys) -> tuple[int, str, str]:
    rc = cli_main(["classify", "--quiet", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_classify_agrees_with_the_pipelines_predictions(cnn, capsys):
    # The whole dataset folder (recursive), as a user would point at it.
    rc, out, err = run_cli(["--model", cnn.model_path, "--json", cnn.data_dir], capsys)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["classes"] == cnn.meta["classes"] and doc["image_size"] == 64
    by_image = {r["image"]: r for r in doc["results"]}
    pred, probs = pipeline_predictions(cnn)
    # Every face the landmarks stage found is classified, with the same crop → same numbers.
    assert len(cnn.table) > 100
    for i, image in enumerate(cnn.table["image"]):
        r = by_image[str(cnn.data_dir / image)]
        assert r["emotion"] == cnn.meta["classes"][pred[i]]
        got = np.array([r["probabilities"][c] for c in doc["classes"]])
        np.testing.assert_allclose(got, probs[i], atol=2e-6)
        assert abs(got.sum() - 1) < 1e-5
    assert len(set(pred.tolist())) >= 3  # a model that tells faces apart: not a trivial check
    assert "skipped" not in err.replace("0 skipped", "")


def test_csv_header_rows_and_bad_images_reported_not_fatal(cnn, tmp_path, capsys):
    images = sorted((cnn.data_dir / "images").rglob("*.png"))[:5]
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    for p in images[:3]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(images[0].read_bytes()[:60])  # truncated
    blank = np.full((128, 128, 3), 200, np.uint8)
    from facecal.imageio import save_image

    save_image(blank, folder / "no_face.png")
    (folder / "notes.txt").write_text("not an image")  # not searched for in a folder
    rc, out, err = run_cli(
        ["--model", cnn.model_path.with_suffix(".json"), "--csv", tmp_path / "photos",
         images[3], tmp_path / "missing.jpg", "--batch-size", "2"],
        capsys,
    )  # fmt: skip
    assert rc == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["image", "emotion", "confidence", *cnn.meta["classes"]]
    got = {r[0]: r for r in rows[1:]}
    assert set(got) == {str(folder / p.name) for p in images[:3]} | {str(images[3])}
    for r in rows[1:]:
        p = np.array([float(v) for v in r[3:]])
        assert r[1] == cnn.meta["classes"][int(p.argmax())] and float(r[2]) == p.max()
        assert abs(p.sum() - 1) < 1e-4
    # Each bad input named on stderr with its reason; the good ones all have their result.
    assert f"skipped {folder / 'broken.png'}:" in err and "truncated" in err.lower()
    assert f"skipped {folder / 'no_face.png'}: dlib found no face" in err
    assert f"skipped {tmp_path / 'missing.jpg'}: no such file or folder" in err
    assert "notes.txt" not in out + err
    assert "4 image(s) classified, 3 skipped" in err


def test_text_output_and_nothing_classified_is_exit_1(cnn, tmp_path, capsys):
    image = sorted((cnn.data_dir / "images").rglob("*.png"))[0]
    rc, out, _ = run_cli(["--model", cnn.model_path, image], capsys)
    assert rc == 0
    name, emotion, conf = out.strip().split("\t")
    assert name == str(image) and emotion in cnn.meta["classes"] and 0 < float(conf) <= 1
    rc, out, err = run_cli(["--model", cnn.model_path, tmp_path / "nothing.png"], capsys)
    assert rc == 1 and out == "" and "no such file" in err
    rc, _, err = run_cli(["--model", tmp_path / "none.pt", image], capsys)
    assert rc == 2 and "none.pt" in err and "not found" in err


def test_workers_give_the_same_results_as_one_process(cnn, tmp_path):
    images = sorted((cnn.data_dir / "images").rglob("*.png"))[:6]
    outs = []
    for workers in ("1", "2"):
        proc = subprocess.run(
            [sys.executable, "-m", "facecal", "classify", "--quiet", "--csv", "--workers",
             workers, "--batch-size", "4", "--model", str(cnn.model_path), *map(str, images)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 7
