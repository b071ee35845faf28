"""The registered model served two ways: `mlflow models serve` and `facecal serve`, both from
``models:/facecal-generator@champion``, answer the same pixels. The own service runs under an
audit hook that records every unpickling (`pickle.find_class`) and any torch import: it must
see neither.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from _serving import SIZE, exported, free_port, gold_templates, synth_face, wait_http
from facecal import geometry, render
from facecal.imageio import encode_png, load_image
from facecal.serving import runtime as rt

NAME = "facecal-generator"
URI = f"models:/{NAME}@champion"

# An audit hook writing suspicious events to the file named in argv[1]; AUDITED then runs
# `facecal …` with the rest of argv.
HOOK = """
import json, sys
log = open(sys.argv[1], "w", buffering=1)
def hook(event, args):
    if event == "pickle.find_class":
        log.write(json.dumps(["pickle.find_class", str(args[0]), str(args[1])]) + "\\n")
    elif event == "import" and str(args[0]).split(".")[0] in ("torch", "cloudpickle", "dill",
                                                              "joblib"):
        log.write(json.dumps(["import", str(args[0])]) + "\\n")
sys.addaudithook(hook)
"""
AUDITED = (
    HOOK
    + """
from facecal.cli import main
sys.exit(main(sys.argv[2:]))
"""
)


def _register(onnx_path: Path, artifacts: Path) -> str:
    """What `facecal register` does: log with the onnx flavour, register, point an alias."""
    import mlflow
    from mlflow.models import infer_signature

    import onnx

    feeds = {
        "landmarks": np.zeros((1, SIZE, SIZE, 3), np.uint8),
        "reference": np.zeros((1, SIZE, SIZE, 3), np.uint8),
    }
    outputs = {
        "image": np.zeros((1, SIZE, SIZE, 3), np.float32),
        "image_u8": np.zeros((1, SIZE, SIZE, 3), np.uint8),
    }
    # Artifacts in the test's folder (the sqlite store's default would be ./mlruns in the cwd).
    experiment = mlflow.MlflowClient().create_experiment(
        "facecal-test", artifact_location=artifacts.as_uri()
    )
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="generator",
            registered_model_name=NAME,
            signature=infer_signature(feeds, outputs),
            save_as_external_data=False,
            onnx_execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
            pip_requirements=["onnxruntime-gpu", "onnx", "numpy"],
        )
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", version)
    return version


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.mark.slow
def test_mlflow_models_serve_agrees_with_the_own_service(mlflow_store, tmp_path_factory, tmp_path):
    model = exported(tmp_path_factory)
    version = _register(model.onnx, tmp_path / "artifacts")

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_store,
        "FACECAL_MODEL_CACHE": str(tmp_path / "cache"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    env.pop("FACECAL_DEBUG", None)
    mlflow_port, own_port = free_port(), free_port()
    audit = tmp_path / "audit.jsonl"
    procs = [
        _start(
            [
                sys.executable,
                "-m",
                "mlflow",
                "models",
                "serve",
                "-m",
                URI,
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(mlflow_port),
            ],
            env,
            tmp_path / "mlflow-serve.log",
        ),
        _start(
            [
                sys.executable,
                "-c",
                AUDITED,
                str(audit),
                "serve",
                "--model",
                URI,
                "--port",
                str(own_port),
                "--set",
                "max_wait_ms=1",
            ],
            env,
            tmp_path / "facecal-serve.log",
        ),
    ]
    try:
        # Both start at once; while they do, check the registry errors in this process.
        with pytest.raises(rt.ModelLoadError, match="not found in the registry"):
            rt.resolve_registry(f"models:/{NAME}@no-such-alias", tmp_path / "c2")
        mlflow_url, own_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{own_port}"
        try:
            wait_http(own_url + "/healthz", 120, procs[1])
            wait_http(mlflow_url + "/ping", 120, procs[0])
        except RuntimeError:
            for name in ("mlflow-serve.log", "facecal-serve.log"):
                print(name, (tmp_path / name).read_text(errors="replace")[-3000:])
            raise

        info = httpx.get(own_url + "/v1/model").json()
        assert (info["name"], info["version"], info["alias"]) == (NAME, version, "champion")
        cached = list((tmp_path / "cache" / NAME).glob(f"v{version}-*/.facecal-complete"))
        assert len(cached) == 1

        photo, pts = synth_face(7, "neutral", 1.0)
        aligned = geometry.warp_image(photo, geometry.crop_transform(pts, SIZE), SIZE)
        crops = [
            geometry.apply_affine(geometry.canonical_to_crop(SIZE), g)
            for g in gold_templates().values()
        ]
        own = []
        for crop in crops:
            r = httpx.post(
                own_url + "/v1/generate",
                timeout=30,
                json={
                    "landmarks": crop.tolist(),
                    "reference": base64.b64encode(encode_png(aligned)).decode(),
                },
            )
            assert r.status_code == 200, r.text
            own.append(load_image(r.content))
        lm = np.stack([render.render_landmarks(c, SIZE, "edges") for c in crops])
        ref = np.broadcast_to(aligned, lm.shape)
        r = httpx.post(
            mlflow_url + "/invocations",
            timeout=60,
            json={"inputs": {"landmarks": lm.tolist(), "reference": ref.tolist()}},
        )
        assert r.status_code == 200, r.text[:2000]
        theirs = np.asarray(r.json()["predictions"]["image_u8"], np.uint8)
        assert theirs.shape == (len(crops), SIZE, SIZE, 3)
        diff = np.abs(theirs.astype(int) - np.stack(own).astype(int))
        assert diff.max() <= 1, diff.max()
        assert theirs.std() > 10
    finally:
        for p in procs:
            _stop(p)
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert not [e for e in events if e[0] == "pickle.find_class"], events
    assert not [e for e in events if e[0] == "import" and e[1].split(".")[0] == "torch"], events


def test_the_audit_hook_sees_unpickling_and_imports(tmp_path):
    """The control for the test above: the same hook does report both kinds of event (with
    cloudpickle standing in for torch, which takes seconds to import)."""
    log = tmp_path / "audit.jsonl"
    code = (
        HOOK
        + "import pickle, collections, cloudpickle\n"
        + "pickle.loads(pickle.dumps(collections.OrderedDict(a=1)))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(log)], check=True, timeout=120)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert ["pickle.find_class", "collections", "OrderedDict"] in events
    assert ["import", "cloudpickle"] in events
