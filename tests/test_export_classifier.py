"""Stage `export_cnn`: the expression CNN as ONNX — parity with torch, the file contract."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _classifier import exported_cnn, pipeline_predictions, trained_cnn
from facecal.cli import main as cli_main


@pytest.fixture(scope="module")
def cnn(synth_small, tmp_path_factory):
    return trained_cnn(synth_small, tmp_path_factory)


@pytest.fixture(scope="module")
def export(cnn, tmp_path_factory):
    return exported_cnn(cnn, tmp_path_factory)


def test_parity_with_torch_on_real_crops_and_extremes(cnn, export):
    from facecal import tables
    from facecal.selection import real_faces

    m = export["metrics"]
    p = m["parity"]
    n_val = len(real_faces(tables.read_table(cnn.table_path), "val", cnn.meta["classes"]))
    assert p["real_faces"] == min(24, n_val) > 0 and p["batch"] == p["real_faces"] + 8
    assert m["passed"] and p["passed"]
    assert p["max_abs_diff"] <= 1e-5 and p["argmax_agreement"] == 1.0
    assert json.loads(export["metrics_path"].read_text()) == m
    model_json = json.loads(export["model_json"].read_text())
    assert (
        model_json["classifier_hash"] == m["classifier_hash"] and model_json["kind"] == "classifier"
    )


def test_onnx_matches_the_pipelines_model_on_every_face(cnn, export):
    """Independently of the stage's own check: a fresh session on every pipeline crop, at
    batch sizes the export never saw."""
    from facecal.serving.classifier_runtime import ClassifierRuntime

    rt = ClassifierRuntime(str(export["onnx"]))
    assert rt.classes == cnn.meta["classes"] and rt.image_size == 64
    assert rt.contract["regime"] == "real_all" and rt.contract["fingerprint"] == "test-fingerprint"
    pred, probs = pipeline_predictions(cnn)
    got = np.concatenate([rt.probabilities(cnn.crops[i : i + 37]) for i in range(0, 120, 37)])
    np.testing.assert_allclose(got, probs, atol=1e-5)
    assert (got.argmax(1) == pred).all()
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)


def test_classify_with_the_onnx_export_gives_the_torch_results(cnn, export, capsys):
    images = [str(cnn.data_dir / i) for i in cnn.table["image"][:20]]
    outs = {}
    for model in (cnn.model_path, export["onnx"], export["onnx"].parent):
        rc = cli_main(["classify", "--quiet", "--json", "--model", str(model), *images])
        out, err = capsys.readouterr()
        assert rc == 0, err
        outs[str(model)] = json.loads(out)["results"]
    torch_res, onnx_res, dir_res = outs.values()
    assert onnx_res == dir_res
    for a, b in zip(torch_res, onnx_res):
        assert a["image"] == b["image"] and a["emotion"] == b["emotion"]
        for c, p in a["probabilities"].items():
            assert abs(p - b["probabilities"][c]) < 1e-5


def test_bad_models_are_named_errors(cnn, export, tmp_path):
    from facecal.export_classifier import ExportClassifierError, ExportCnnParams, run_export_cnn
    from facecal.serving.runtime import ModelLoadError

    skipped = tmp_path / "cnn"
    skipped.mkdir()
    (skipped / "models.json").write_text(
        json.dumps({"regimes": {}, "skipped": {"real_all": "fewer than two classes"}})
    )
    stale = tmp_path / "out" / "classifier.onnx"
    stale.parent.mkdir()
    stale.write_bytes(b"an older export")
    res = run_export_cnn(ExportCnnParams(), skipped, tmp_path / "out", tmp_path / "m.json")
    # Nothing to export: said why, and no stale model left behind to be served or registered.
    assert res["passed"] is None and "fewer than two classes" in res["not_exported"]
    assert json.loads((tmp_path / "m.json").read_text()) == res and not stale.exists()
    with pytest.raises(ExportClassifierError, match="run `facecal train-cnn`"):
        run_export_cnn(ExportCnnParams(regime="real_low"), skipped, tmp_path / "out", None)
    with pytest.raises(ExportClassifierError, match="seed_index 3"):
        run_export_cnn(ExportCnnParams(seed_index=3), cnn.model_path.parent, tmp_path / "o", None)
    # The generator's export is not a classifier (and vice versa: GeneratorRuntime refuses it).
    import onnx
    from facecal.serving.classifier_runtime import ClassifierRuntime

    model = onnx.load(str(export["onnx"]))
    for p in model.metadata_props:
        if p.key == "facecal.kind":
            p.value = "generator"
    onnx.save(model, str(tmp_path / "other.onnx"))
    with pytest.raises(ModelLoadError, match="not a facecal classifier export"):
        ClassifierRuntime(str(tmp_path / "other.onnx"))
    from facecal.serving.runtime import GeneratorRuntime

    with pytest.raises(ModelLoadError, match="not a facecal export"):
        GeneratorRuntime(export["onnx"])


def test_the_vgg_recognizer_exports_with_parity(cnn, tmp_path):
    """cnn.arch vgg: grey conversion and the 48² resize are inside the model, so its ONNX file
    keeps the RGB crop input contract and matches torch."""
    import onnxruntime as ort
    import torch

    from facecal.export_classifier import ExportCnnParams, run_export_cnn
    from facecal.recognition.cnn import save_classifier, to_input
    from facecal.recognition.fit import CnnParams, build_model, net_meta

    torch.manual_seed(0)
    params = CnnParams(arch="vgg", vgg_widths=[32, 64], vgg_convs=1)
    classes = cnn.meta["classes"]
    model = build_model(params, len(classes), 64).eval()
    meta = {**cnn.meta, **net_meta(params)}
    save_classifier(model, meta, tmp_path / "cnn" / "real_all.pt")
    (tmp_path / "cnn" / "models.json").write_text(
        json.dumps({"classes": classes, "regimes": {"real_all": ["real_all.pt"]}, "skipped": {}})
    )
    m = run_export_cnn(
        ExportCnnParams(parity_faces=8),
        tmp_path / "cnn",
        tmp_path / "out",
        tmp_path / "export_cnn.json",
        cnn.data_dir,
        cnn.table_path,
    )
    assert m["passed"] and m["parity"]["max_abs_diff"] <= 1e-4
    sess = ort.InferenceSession(
        str(tmp_path / "out" / "classifier.onnx"), providers=["CPUExecutionProvider"]
    )
    (name,) = [i.name for i in sess.get_inputs()]
    got = sess.run(None, {name: cnn.crops[:6]})[0]
    with torch.no_grad():
        want = torch.softmax(model(to_input(cnn.crops[:6])), 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
