"""Stage `register_cnn`: the exported classifier as `facecal-classifier`, through its own gate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from _classifier import exported_cnn, trained_cnn
from facecal.cli import main as cli_main
from facecal.register_classifier import RegisterCnnParams, register_classifier
from facecal.registry_common import GateParams, RegistryError

NAME = "facecal-classifier"


@pytest.fixture(scope="module")
def onnx_path(synth_small, tmp_path_factory) -> Path:
    return exported_cnn(trained_cnn(synth_small, tmp_path_factory), tmp_path_factory)["onnx"]


def _eval(path: Path, accuracy: float | None, eval_set: str = "set-A") -> Path:
    """metrics/eval.json as evaluate writes it (the parts the gate reads)."""
    regimes = {"real_all": {"accuracy": accuracy, "accuracy_mean": 0.5, "n": 40}}
    regimes["real_low"] = {"accuracy": 0.99}  # another regime's number must not gate this model
    path.write_text(json.dumps({"eval_set_hash": eval_set, "regimes": regimes, "ssim": 0.9}))
    return path


def _aliases(client) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}


def test_the_gate_promotes_only_a_better_classifier_on_the_same_set(
    mlflow_store, onnx_path, tmp_path
):
    import mlflow

    client = mlflow.MlflowClient()
    params = RegisterCnnParams()
    assert params.gate.metric == "regimes.real_all.accuracy"
    first = register_classifier(
        onnx_path, _eval(tmp_path / "a.json", 0.70), params, tmp_path / "r.json"
    )
    assert first["version"] == "1" and first["gate"]["decision"] == "promoted"
    assert json.loads((tmp_path / "r.json").read_text()) == first
    tags = client.get_model_version(NAME, "1").tags
    assert tags["eval_set_hash"] == "set-A" and tags["regime"] == "real_all"
    assert (
        tags["classifier_hash"] == first["classifier_hash"] and len(tags["classifier_hash"]) == 16
    )
    assert tags["gate.decision"] == "promoted" and tags["gate.metric"] == params.gate.metric

    worse = register_classifier(onnx_path, _eval(tmp_path / "b.json", 0.65), params)
    assert (
        worse["gate"]["decision"] == "kept_champion" and "does not beat" in worse["gate"]["reason"]
    )
    assert _aliases(client) == {"champion": "1", "challenger": "2"}
    equal = register_classifier(onnx_path, _eval(tmp_path / "c.json", 0.70), params)
    assert equal["gate"]["decision"] == "kept_champion"  # must beat by more than min_delta 0
    better = register_classifier(onnx_path, _eval(tmp_path / "d.json", 0.75), params)
    assert better["gate"]["decision"] == "promoted" and _aliases(client)["champion"] == "4"
    # A higher number on another evaluation set says nothing: the champion stays.
    other = register_classifier(onnx_path, _eval(tmp_path / "e.json", 0.99, "set-B"), params)
    assert other["gate"]["decision"] == "kept_champion"
    assert "evaluation sets differ" in other["gate"]["reason"]
    # A null accuracy (regime not evaluated) registers and keeps the champion, saying why.
    null = register_classifier(onnx_path, _eval(tmp_path / "f.json", None), params)
    assert null["gate"]["decision"] == "kept_champion" and "is None" in null["gate"]["reason"]
    assert _aliases(client) == {"champion": "4", "challenger": "6"}
    # The generator's gate never looked at these numbers: separate registered models.
    assert [m.name for m in client.search_registered_models()] == [NAME]

    # The champion serves through its registry URI, with the exported file's classes.
    from facecal.serving.classifier_runtime import ClassifierRuntime

    rt = ClassifierRuntime(f"models:/{NAME}@champion", cache_dir=str(tmp_path / "cache"))
    assert rt.source.version == "4" and rt.classifier_hash == first["classifier_hash"]
    assert rt.classes == tags["classes"].split(",")


def test_promote_cnn_by_hand_goes_through_the_classifier_gate(
    mlflow_store, onnx_path, tmp_path, capsys
):
    import mlflow

    params = RegisterCnnParams()
    register_classifier(onnx_path, _eval(tmp_path / "a.json", 0.8), params)  # v1 champion
    register_classifier(onnx_path, _eval(tmp_path / "b.json", 0.6), params)  # v2 worse
    client = mlflow.MlflowClient()
    assert cli_main(["promote-cnn", "--version", "2"]) == 1
    assert "not promoted" in capsys.readouterr().out and _aliases(client)["champion"] == "1"
    assert cli_main(["promote-cnn", "--version", "2", "--force", "--reason", "rollback"]) == 0
    assert _aliases(client)["champion"] == "2"
    assert client.get_model_version(NAME, "2").tags["promotion.reason"] == "rollback"


def test_refuses_what_cannot_vouch_for_this_classifier(mlflow_store, onnx_path, tmp_path):
    import mlflow

    import onnx

    good = _eval(tmp_path / "a.json", 0.8)
    # Another regime's accuracy does not gate a real_all model.
    low = RegisterCnnParams(gate=GateParams(metric="regimes.real_low.accuracy"))
    with pytest.raises(RegistryError, match="regime 'real_low'"):
        register_classifier(onnx_path, good, low)
    with pytest.raises(RegistryError, match="'regimes.real_all.macro_f1' not found"):
        register_classifier(
            onnx_path, good, RegisterCnnParams(gate=GateParams(metric="regimes.real_all.macro_f1"))
        )
    # The generator's ONNX (no classifier metadata) is not a classifier.
    model = onnx.load(str(onnx_path))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "generator.onnx"))
    with pytest.raises(RegistryError, match="not a facecal classifier export"):
        register_classifier(tmp_path / "generator.onnx", good, RegisterCnnParams())
    (tmp_path / "junk.onnx").write_bytes(b"\x00not onnx")
    with pytest.raises(RegistryError, match="junk.onnx: not a valid ONNX model"):
        register_classifier(tmp_path / "junk.onnx", good, RegisterCnnParams())
    assert mlflow.MlflowClient().search_registered_models() == []


def test_nothing_exported_is_recorded_not_registered(mlflow_store, tmp_path):
    out = tmp_path / "export_cnn"
    out.mkdir()
    (out / "model.json").write_text(json.dumps({"not_exported": "train_cnn skipped real_all"}))
    rec = register_classifier(
        out / "classifier.onnx", _eval(tmp_path / "a.json", math.nan), RegisterCnnParams(),
        tmp_path / "r.json",
    )  # fmt: skip
    assert rec == {"model_name": NAME, "registered": False, "reason": "train_cnn skipped real_all"}
    with pytest.raises(RegistryError, match="run `facecal export-cnn`"):
        register_classifier(tmp_path / "none.onnx", tmp_path / "a.json", RegisterCnnParams())


def test_a_registered_vgg_classifier_initialises_a_fine_tuning(
    mlflow_store, synth_small, tmp_path, monkeypatch
):
    """`cnn.init: models:/facecal-classifier@champion`: the torch weights export_cnn keeps
    beside the ONNX file are registered with it and load back, layer by layer and class by
    class name, into a new network."""
    import shutil

    import numpy as np
    import torch

    from facecal.export_classifier import ExportCnnParams, run_export_cnn
    from facecal.onnx_contract import CACHE_ENV
    from facecal.recognition.cnn import ClassifierError, save_classifier, to_input
    from facecal.recognition.fit import CnnParams, build_model, check_init, net_meta

    torch.manual_seed(0)
    arch = {"arch": "vgg", "vgg_widths": [32, 32], "vgg_convs": 1}
    classes = ["anger", "happy", "neutral"]
    model = build_model(CnnParams(**arch), len(classes), 48).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics: they must travel too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    meta = {"regime": "real_all", "seed_index": 0, "classes": classes, "image_size": 48,
            "mirror": False, "fingerprint": "fp", **net_meta(CnnParams(**arch))}  # fmt: skip
    cnn = tmp_path / "cnn"
    save_classifier(model, meta, cnn / "real_all.pt")
    (cnn / "models.json").write_text(
        json.dumps({"classes": classes, "regimes": {"real_all": ["real_all.pt"]}, "skipped": {}})
    )
    out = tmp_path / "export_cnn"
    run_export_cnn(ExportCnnParams(parity_faces=0), cnn, out, None, synth_small, tmp_path / "none")
    assert (out / "torch" / "classifier.pt").read_bytes() == (cnn / "real_all.pt").read_bytes()
    register_classifier(
        out / "classifier.onnx", _eval(tmp_path / "a.json", 0.7), RegisterCnnParams()
    )

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    mine = ["happy", "contempt", "anger"]  # another order, and a class it never learned
    uri = f"models:/{NAME}@champion"
    tuned = build_model(CnnParams(**arch, init=uri), len(mine), 48, mine).eval()
    faces = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    with torch.no_grad():
        theirs, ours = model(to_input(faces)), tuned(to_input(faces))
    for j, c in enumerate(mine):
        if c != "contempt":
            torch.testing.assert_close(ours[:, j], theirs[:, classes.index(c)])
    info = check_init(CnnParams(**arch, init=uri), mine, 48)
    assert (
        info is not None and info["file"] == uri and info["classes_matched"] == ["happy", "anger"]
    )
    import hashlib

    assert info["sha256"] == hashlib.sha256((cnn / "real_all.pt").read_bytes()).hexdigest()

    # Weights that are not the exported network are never registered beside it.
    other = build_model(CnnParams(**arch), len(classes), 48)
    save_classifier(other, meta, tmp_path / "other.pt")
    shutil.copyfile(tmp_path / "other.pt", out / "torch" / "classifier.pt")
    with pytest.raises(RegistryError, match="not the network"):
        register_classifier(
            out / "classifier.onnx", _eval(tmp_path / "c.json", 0.6), RegisterCnnParams()
        )

    # A version registered without its weights (an older export) says what to do.
    shutil.rmtree(out / "torch")
    register_classifier(
        out / "classifier.onnx", _eval(tmp_path / "b.json", 0.6), RegisterCnnParams()
    )
    with pytest.raises(ClassifierError, match="version 2 was registered without its torch weights"):
        build_model(CnnParams(**arch, init=f"models:/{NAME}/2"), len(mine), 48, mine)
    with pytest.raises(ClassifierError, match="not found in the registry"):
        build_model(CnnParams(**arch, init=f"models:/{NAME}/9"), len(mine), 48, mine)
    # A compact classifier's weights cannot initialise a vgg network.
    compact = cnn / "compact.pt"
    save_classifier(build_model(CnnParams(width=8), 3, 48), {"classes": classes,
                    "image_size": 48, **net_meta(CnnParams(width=8))}, compact)  # fmt: skip
    with pytest.raises(ClassifierError, match="only vgg weights"):
        build_model(CnnParams(**arch, init=str(compact)), len(mine), 48, mine)
