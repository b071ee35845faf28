"""`facecal export`: a self-contained ONNX generator that matches torch."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import onnx
from _serving import GOLD_EMOTIONS, SIZE, exported, gold_json, gold_templates, write_generator
from facecal import cli, export, geometry, onnx_contract, render
from facecal.errors import FacecalError
from facecal.gan.models import load_generator
from facecal.imageio import load_image


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return exported(tmp_path_factory)


def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _torch_faces(gan_dir, landmarks: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """The generator run directly in torch, fed as the architecture contract says."""
    G, cfg = load_generator(gan_dir)
    x = landmarks if reference is None else np.concatenate([landmarks, reference], -1)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        y = G(x)
    return ((y.permute(0, 2, 3, 1).numpy() + 1.0) / 2.0).clip(0, 1)


def test_parity_report_and_checker(model):
    m = json.loads(model.metrics_path.read_text())
    assert m == model.metrics
    assert m["passed"] is True
    assert m["parity"]["fp32"]["max_abs_diff"] <= 1e-4
    assert m["parity"]["fp32"]["batch"] == 6
    assert m["parity"]["fp32"]["provider"] == "CPUExecutionProvider"
    assert m["opset"] >= 18 and m["exporter"] == "dynamo" and m["external_data"] is False
    for path in (model.onnx, model.onnx_fp16):
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        assert {o.domain: o.version for o in proto.opset_import}[""] >= 18
        # Single file: no tensor refers to external data.
        assert not any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer
        )
        # No checkout paths inside: the file depends on the weights, not on where it was made.
        assert str(Path(__file__).resolve().parents[1]) not in proto.SerializeToString().decode(
            "utf-8", "replace"
        )
    info = json.loads((model.out_dir / "model.json").read_text())
    assert info["inputs"] == ["landmarks", "reference"]
    assert info["outputs"] == ["image", "image_u8"]
    assert info["files"]["fp32"]["bytes"] == model.onnx.stat().st_size
    assert info["gold_emotions"] == sorted(GOLD_EMOTIONS)
    assert info["calibration_method"] == "pca"


def test_graph_takes_client_pixels_with_dynamic_batch(model):
    sess = _session(model.onnx)
    ins = {i.name: i for i in sess.get_inputs()}
    assert list(ins) == ["landmarks", "reference"]
    for i in ins.values():
        assert i.type == "tensor(uint8)"
        assert not isinstance(i.shape[0], int) and i.shape[1:] == [SIZE, SIZE, 3]
    outs = {o.name: o.type for o in sess.get_outputs()}
    assert outs == {"image": "tensor(float)", "image_u8": "tensor(uint8)"}

    rng = np.random.default_rng(7)
    gold = gold_templates()
    m = geometry.canonical_to_crop(SIZE)
    for n in (1, 3):  # batch sizes the parity batch did not use
        lm = np.stack(
            [
                render.render_landmarks(
                    geometry.apply_affine(m, gold["happy"] + rng.normal(0, 0.05, (68, 2))),
                    SIZE,
                    "edges",
                )
                for _ in range(n)
            ]
        )
        ref = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
        image, image_u8 = sess.run(None, {"landmarks": lm, "reference": ref})
        expected = _torch_faces(model.gan_dir, lm, ref)
        assert image.shape == image_u8.shape == (n, SIZE, SIZE, 3)
        assert np.abs(image - expected).max() <= 1e-4
        assert image.std() > 0.1  # a real picture, not a constant
        np.testing.assert_array_equal(image_u8, np.rint(image * 255).astype(np.uint8))


def test_model_file_is_self_contained(model):
    meta = onnx_contract.read_metadata(model.onnx)
    assert json.loads(meta["facecal.config"]) == json.loads(
        (model.gan_dir / "generator.json").read_text()
    )
    # gold.json travels whole: templates and the pca model's directions and coordinates.
    assert json.loads(meta["facecal.gold"]) == gold_json()
    # The default reference face is the mean of the three aligned neutral train faces only.
    ref = load_image(base64.b64decode(meta["facecal.reference_png"]))
    mean = np.mean([load_image(p).astype(np.float64) for p in model.neutral_faces], axis=0)
    np.testing.assert_array_equal(ref, np.clip(np.rint(mean), 0, 255).astype(np.uint8))
    io = json.loads(meta["facecal.io"])
    assert io["inputs"]["landmarks"]["dtype"] == "uint8"
    assert io["landmarks"]["style"] == "edges"
    # the generator's identity, as `facecal evaluate` records it beside its metrics (the
    # registry registers a model only with metrics of the same hash)
    from facecal.gan.models import generator_hash

    assert meta[export.META_GENERATOR_HASH] == generator_hash(model.gan_dir)
    assert len(meta[export.META_GENERATOR_HASH]) == 16


def test_fp16_variant(model):
    fp16 = model.metrics["parity"]["fp16"]
    # Bound stated in params (export.fp16_parity_atol) and met on the parity batch.
    assert fp16["passed"] and fp16["max_abs_diff"] <= 0.02
    assert fp16["max_abs_diff"] > model.metrics["parity"]["fp32"]["max_abs_diff"]
    proto = onnx.load(str(model.onnx_fp16))
    types = {t.name: t.data_type for t in proto.graph.initializer}
    conv_weights = [n.input[1] for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert conv_weights and all(types[w] == onnx.TensorProto.FLOAT16 for w in conv_weights)
    # Normalisation layers keep float32 parameters.
    bn = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert bn and all(types[n.input[1]] == onnx.TensorProto.FLOAT for n in bn)
    # Same client-facing I/O as the fp32 graph.
    sess = _session(model.onnx_fp16)
    assert [i.type for i in sess.get_inputs()] == ["tensor(uint8)"] * 2
    assert model.onnx_fp16.stat().st_size < 0.7 * model.onnx.stat().st_size


def test_cli_export_without_identity(tmp_path, monkeypatch, mlflow_store):
    """The CLI path (tracked in MLflow), a landmarks-only generator (one graph input), no fp16,
    no gold file — and the weights-beside-the-graph layout of models over 2 GB (limit lowered
    to 0 here)."""
    monkeypatch.setattr(export, "PROTOBUF_LIMIT", 0)
    gan = write_generator(tmp_path, identity=False, arch="pldt", style="dots")
    out, metrics = tmp_path / "export", tmp_path / "export.json"
    rc = cli.main(
        [
            "export",
            "--gan-dir",
            str(gan),
            "--gold",
            str(tmp_path / "missing.json"),
            "--out",
            str(out),
            "--metrics",
            str(metrics),
            "--set",
            "fp16=false",
            "--set",
            "parity_batch=3",
        ]
    )
    assert rc == 0
    m = json.loads(metrics.read_text())
    assert m["parity"]["fp32"]["max_abs_diff"] <= 1e-4 and "fp16" not in m["parity"]
    assert m["external_data"] is True
    assert not (out / "generator_fp16.onnx").exists()
    data_files = [p for p in out.iterdir() if p.suffix not in (".onnx", ".json")]
    assert data_files and data_files[0].name.startswith("generator.onnx")
    assert (out / "generator.onnx").stat().st_size < 0.5 * data_files[0].stat().st_size
    sess = _session(out / "generator.onnx")
    assert [i.name for i in sess.get_inputs()] == ["landmarks"]
    meta = onnx_contract.read_metadata(out / "generator.onnx")
    assert "facecal.gold" not in meta and "facecal.reference_png" not in meta
    import mlflow

    (run,) = mlflow.search_runs(
        search_all_experiments=True,
        output_format="list",
        filter_string="tags.`facecal.stage` = 'export'",
    )
    assert run.data.metrics["parity.fp32.max_abs_diff"] == m["parity"]["fp32"]["max_abs_diff"]
    assert run.data.params["fp16"] == "False"
    lm = np.full((2, SIZE, SIZE, 3), 255, np.uint8)
    lm[1, 20:40, 20:40] = (0, 0, 255)
    image = sess.run(["image"], {"landmarks": lm})[0]
    np.testing.assert_allclose(image, _torch_faces(gan, lm, None), atol=1e-4)


def test_bad_inputs_are_clear_errors(tmp_path, model):
    params = export.ExportParams(fp16=False)
    with pytest.raises(FacecalError, match="generator config not found"):
        export.run_export(params, tmp_path / "nothing", None, tmp_path, tmp_path / "o", None)
    bad_gold = tmp_path / "gold.json"
    bad_gold.write_text(
        json.dumps({"frame": "canonical", "emotions": {"happy": {"points": [[0, 0]] * 67}}})
    )
    with pytest.raises(export.ExportError, match=r"gold.json.*happy.*\(…, 68, 2\)"):
        export.run_export(params, model.gan_dir, bad_gold, model.pairs_dir, tmp_path / "o", None)
    pca_without_model = tmp_path / "pca.json"
    pca_without_model.write_text(json.dumps({**gold_json(), "neutral_mean": None}))
    with pytest.raises(export.ExportError, match=r"pca.json: gold.json: malformed"):
        export.run_export(
            params, model.gan_dir, pca_without_model, model.pairs_dir, tmp_path / "o", None
        )
    with pytest.raises(export.ExportError, match=r"index.csv: pairs index not found"):
        export.run_export(
            params, model.gan_dir, model.gold_path, tmp_path / "no-pairs", tmp_path / "o", None
        )
    with pytest.raises(export.config.ParamsError, match="opset"):
        export.load_params(overrides={"opset": 13})
    assert not (tmp_path / "o" / "generator.onnx").exists()


def test_pixel_frame_gold_is_brought_to_canonical(tmp_path):
    happy = gold_templates()["happy"]
    m = np.array([[40.0, 8.0, 300.0], [-8.0, 40.0, 200.0]])  # some photo's similarity
    path = tmp_path / "gold.json"
    path.write_text(
        json.dumps(
            {
                "mode": "upstream",
                "frame": "pixels",
                "emotions": {
                    "happy": {
                        "points": geometry.apply_affine(m, happy).tolist(),
                        "sources": ["x.png"],
                    }
                },
            }
        )
    )
    gold = export.read_gold(path)
    assert (gold["frame"], gold["mode"], gold["method"]) == ("canonical", "aligned", "quadratic")
    # The same similarity alignment any face gets (undoing the photo's transform exactly).
    np.testing.assert_allclose(
        gold["emotions"]["happy"]["points"], geometry.to_canonical(happy)[0], atol=1e-5
    )
