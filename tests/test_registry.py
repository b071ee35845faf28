"""Model registry: registration, the promotion gate, forced promotion — on a real MLflow store
(a temporary sqlite file, and a real `mlflow server` over HTTP)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import onnx
from facecal import registry
from facecal.registry import RegisterParams
from facecal.registry_common import Candidate, GateParams, RegistryError, gate_decision
from onnx import TensorProto, helper

NAME = "facecal-generator"
GEN_HASH = "0123456789abcdef"


# ---------------------------------------------------------------- the gate (pure policy)
def test_gate_promotes_when_there_is_no_champion():
    d = gate_decision(Candidate(None, 0.5, "e1"), None, GateParams())
    assert d.promote and "no champion" in d.reason


@pytest.mark.parametrize(
    "cand, champ, direction, min_delta, promote",
    [
        (0.80, 0.70, "maximize", 0.0, True),
        (0.70, 0.80, "maximize", 0.0, False),
        (0.70, 0.70, "maximize", 0.0, False),  # a tie does not move the champion
        (0.72, 0.70, "maximize", 0.05, False),  # better, but not by min_delta
        (0.76, 0.70, "maximize", 0.05, True),
        (0.10, 0.20, "minimize", 0.0, True),
        (0.30, 0.20, "minimize", 0.0, False),
    ],
)
def test_gate_compares_with_direction_and_margin(cand, champ, direction, min_delta, promote):
    gate = GateParams("m", direction, min_delta)
    d = gate_decision(Candidate(None, cand, "e"), Candidate("3", champ, "e"), gate)
    assert d.promote is promote
    assert (d.candidate, d.champion, d.champion_version) == (cand, champ, "3")


def test_gate_refuses_numbers_from_different_evaluation_sets():
    d = gate_decision(
        Candidate(None, 0.99, "new-set"), Candidate("1", 0.1, "old-set"), GateParams()
    )
    assert not d.promote and "evaluation sets differ" in d.reason


def test_gate_refuses_a_non_finite_candidate():
    assert not gate_decision(Candidate(None, math.nan, "e"), None, GateParams()).promote


# ---------------------------------------------------------------- registering for real
def _tiny_onnx(path: Path, gain: float = 1.0) -> Path:
    """A real (tiny) image-to-image ONNX model: uint8 NHWC in, float [0, 1] out."""
    nodes = [
        helper.make_node("Cast", ["landmarks"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["f", "k"], ["image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("landmarks", TensorProto.UINT8, ["N", 8, 8, 3])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 8, 8, 3])],
        [helper.make_tensor("k", TensorProto.FLOAT, [], [255.0 / gain])],
    )
    # IR 10: what onnxruntime 1.2x–1.3x reads (onnx 1.23 would write 14 by default).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    # what `facecal export` writes: the hash of the generator inside (evaluate writes the same)
    model.metadata_props.add(key=registry.ONNX_GENERATOR_HASH, value=GEN_HASH)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _eval_json(
    path: Path, ssim: float | None, eval_set: str = "set-A", generator: str | None = GEN_HASH
) -> Path:
    path.write_text(
        json.dumps(
            {
                "ssim_calibrated": ssim,
                "eval_set_hash": eval_set,
                **({"generator_hash": generator} if generator else {}),
                # regime names hold "+", which MLflow metric names may not
                "accuracy": {"real_all": 0.9, "real_low+gen_calibrated": 0.8},
            }
        )
    )
    return path


@pytest.fixture
def model_files(tmp_path):
    return _tiny_onnx(tmp_path / "generator.onnx"), tmp_path


def _champion(client) -> str:
    return str(client.get_model_version_by_alias(NAME, registry.CHAMPION).version)


def test_register_runs_the_gate_and_tags_every_decision(mlflow_store, model_files):
    import mlflow

    onnx_path, tmp = model_files
    params = RegisterParams()
    client = mlflow.MlflowClient()

    first = registry.register(
        onnx_path, _eval_json(tmp / "e1.json", 0.70), params, tmp / "registration.json"
    )
    assert first["version"] == "1" and first["gate"]["decision"] == "promoted"
    assert json.loads((tmp / "registration.json").read_text())["version"] == "1"
    assert _champion(client) == "1"
    logged = client.get_run(first["run_id"]).data.metrics
    assert logged["accuracy.real_low_plus_gen_calibrated"] == pytest.approx(0.8)

    worse = registry.register(onnx_path, _eval_json(tmp / "e2.json", 0.60), params)
    assert worse["gate"]["decision"] == "kept_champion"
    assert _champion(client) == "1"
    assert str(client.get_model_version_by_alias(NAME, registry.CHALLENGER).version) == "2"
    tags = client.get_model_version(NAME, "2").tags
    assert tags["gate.decision"] == "kept_champion"
    assert float(tags["gate.value"]) == pytest.approx(0.60)
    assert float(tags["gate.champion_value"]) == pytest.approx(0.70)
    assert tags["eval_set_hash"] == "set-A" and "git_commit" in tags and "data_hash" in tags

    better = registry.register(onnx_path, _eval_json(tmp / "e3.json", 0.75), params)
    assert better["gate"]["decision"] == "promoted"
    assert _champion(client) == "3"

    other_set = registry.register(onnx_path, _eval_json(tmp / "e4.json", 0.99, "set-B"), params)
    assert other_set["gate"]["decision"] == "kept_champion"
    assert "evaluation sets differ" in other_set["gate"]["reason"]
    assert _champion(client) == "3"

    # The registered model really is the ONNX flavour and loads in onnxruntime.
    local = mlflow.artifacts.download_artifacts(
        f"models:/{NAME}@champion", dst_path=str(tmp / "dl")
    )
    mlmodel = (Path(local) / "MLmodel").read_text()
    assert "onnx:" in mlmodel and "CUDAExecutionProvider" in mlmodel
    import onnxruntime as ort

    sess = ort.InferenceSession(
        str(next(Path(local).glob("*.onnx"))), providers=["CPUExecutionProvider"]
    )
    out = sess.run(None, {"landmarks": np.full((2, 8, 8, 3), 255, np.uint8)})[0]
    np.testing.assert_allclose(out, 1.0)


def test_promote_by_hand_goes_through_the_gate_or_is_forced_and_tagged(mlflow_store, model_files):
    import mlflow

    onnx_path, tmp = model_files
    params = RegisterParams()
    client = mlflow.MlflowClient()
    registry.register(onnx_path, _eval_json(tmp / "a.json", 0.8), params)  # v1 champion
    registry.register(onnx_path, _eval_json(tmp / "b.json", 0.5), params)  # v2 worse

    refused = registry.promote(NAME, "2", params.gate)
    assert not refused.promote and _champion(client) == "1"
    with pytest.raises(RegistryError, match="--reason"):
        registry.promote(NAME, "2", params.gate, force=True)
    forced = registry.promote(NAME, "2", params.gate, force=True, reason="rollback test")
    assert forced.promote and _champion(client) == "2"
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion"] == "forced" and tags["promotion.reason"] == "rollback test"
    assert tags["promotion.previous_champion"] == "1"
    # Through the gate, v1 (0.8) now beats the forced champion v2 (0.5).
    assert registry.promote(NAME, "1", params.gate).promote and _champion(client) == "1"
    with pytest.raises(RegistryError, match="no version 9"):
        registry.promote(NAME, "9", params.gate)


def test_register_refuses_missing_inputs(mlflow_store, model_files):
    onnx_path, tmp = model_files
    with pytest.raises(RegistryError, match="gate metric 'ssim_calibrated' not found"):
        (tmp / "e.json").write_text(json.dumps({"eval_set_hash": "x", "psnr": 20}))
        registry.register(onnx_path, tmp / "e.json", RegisterParams())
    with pytest.raises(RegistryError, match="ONNX model not found"):
        registry.register(tmp / "nope.onnx", _eval_json(tmp / "f.json", 0.5), RegisterParams())
    # Not an ONNX file: an error naming it, before anything is logged or registered.
    for name, content in (("garbage.onnx", bytes(range(256)) * 40), ("text.onnx", b"hello")):
        (tmp / name).write_bytes(content)
        with pytest.raises(RegistryError, match=rf"{name}: not a valid ONNX model"):
            registry.register(tmp / name, _eval_json(tmp / "f.json", 0.5), RegisterParams())
    import mlflow

    assert mlflow.MlflowClient().search_registered_models() == []


def test_register_refuses_metrics_of_another_model(mlflow_store, model_files):
    import mlflow

    onnx_path, tmp = model_files
    client = mlflow.MlflowClient()
    params = RegisterParams()
    registry.register(onnx_path, _eval_json(tmp / "ok.json", 0.5), params)  # v1 champion
    # A hand-written metrics file (no generator hash) with a score that would win the gate …
    forged = _eval_json(tmp / "forged.json", 0.99, generator=None)
    with pytest.raises(RegistryError, match=r"forged\.json: names no 'generator_hash'"):
        registry.register(onnx_path, forged, params)
    # … or the evaluation of another generator
    other = _eval_json(tmp / "other.json", 0.99, generator="fedcba9876543210")
    with pytest.raises(RegistryError, match=r"metrics of generator fedcba9876543210, but"):
        registry.register(onnx_path, other, params)
    assert _champion(client) == "1" and len(client.search_model_versions(f"name='{NAME}'")) == 1
    # a person may override, with a reason that is recorded on the version
    with pytest.raises(RegistryError, match="--reason"):
        registry.register(onnx_path, other, params, force=True)
    forced = registry.register(onnx_path, other, params, force=True, reason="re-export test")
    tags = client.get_model_version(NAME, forced["version"]).tags
    assert tags["provenance"] == "forced" and tags["provenance.reason"] == "re-export test"
    assert "fedcba9876543210" in tags["provenance.problem"]
    assert client.get_model_version(NAME, "1").tags["generator_hash"] == GEN_HASH


def test_a_null_gate_metric_registers_and_keeps_the_champion_with_the_reason(
    mlflow_store, model_files
):
    import mlflow

    onnx_path, tmp = model_files
    client = mlflow.MlflowClient()
    registry.register(onnx_path, _eval_json(tmp / "a.json", 0.5), RegisterParams())
    # Data without weak faces has no ssim_calibrated: evaluate writes null and says why.
    data = json.loads(_eval_json(tmp / "n.json", None).read_text())
    data["not_computed"] = {"ssim_calibrated": "no weak test faces"}
    (tmp / "n.json").write_text(json.dumps(data))
    rec = registry.register(onnx_path, tmp / "n.json", RegisterParams())
    assert rec["gate"]["decision"] == "kept_champion" and rec["champion_version"] == "1"
    assert "ssim_calibrated' is None (no weak test faces)" in rec["gate"]["reason"]
    assert _champion(client) == "1"
    assert client.get_model_version(NAME, rec["version"]).tags["gate.decision"] == "kept_champion"
    # with no champion at all, a null metric does not make one either
    client.delete_registered_model_alias(NAME, registry.CHAMPION)
    rec = registry.register(onnx_path, tmp / "n.json", RegisterParams())
    assert rec["gate"]["decision"] == "kept_champion" and rec["champion_version"] is None


def test_onnx_metadata_key_is_the_one_export_writes():
    from facecal import export

    assert export.META_GENERATOR_HASH == registry.ONNX_GENERATOR_HASH


# ---------------------------------------------------------------- against a real server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "server-artifacts"),
        "--workers",
        "1",
    ]
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(
                    "mlflow server did not start:\n" + (tmp_path / "server.log").read_text()[-3000:]
                )
            time.sleep(0.5)
        monkeypatch.setenv("FACECAL_TRACKING", "on")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.delenv("FACECAL_PARENT_RUN_ID", raising=False)
        import mlflow

        mlflow.set_tracking_uri(url)
        yield url, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker, by its PID
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_register_and_promote_against_a_tracking_server(mlflow_server, model_files, tmp_path):
    import mlflow

    url, proc = mlflow_server
    onnx_path, tmp = model_files
    params = RegisterParams()
    first = registry.register(onnx_path, _eval_json(tmp / "s1.json", 0.6), params)
    second = registry.register(onnx_path, _eval_json(tmp / "s2.json", 0.4), params)
    assert first["tracking_uri"] == url
    assert (first["gate"]["decision"], second["gate"]["decision"]) == ("promoted", "kept_champion")
    client = mlflow.MlflowClient(url)
    assert _champion(client) == "1"
    assert registry.promote(NAME, "2", params.gate, force=True, reason="server test").promote
    assert _champion(client) == "2"
    # The artifacts went through the server (proxied), not to a local path of this process.
    assert any((tmp_path / "server-artifacts").rglob("*.onnx"))
    assert proc.poll() is None
