"""`mlflow run . --env-manager local -e <stage>` runs the stage through DVC inside a copy of the
project on a tiny synthetic dataset, and the stage run nests under the MLflow project run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _project import copy_project
from facecal.data.synth import SynthConfig, render_dataset


def test_mlflow_run_of_one_stage(repo_root, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    copy_project(repo_root, proj)
    render_dataset(
        proj / "data", SynthConfig(subjects=3, intensities=(1.0,)), workers=1, progress=False
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(
        os.environ,
        FACECAL_TRACKING="on",
        MLFLOW_TRACKING_URI=uri,
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    env.pop("FACECAL_PARENT_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)  # `mlflow run` refuses it beside --experiment-name
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    done = subprocess.run(
        [
            str(mlflow_cli),
            "run",
            str(proj),
            "-e",
            "landmarks",
            "--env-manager",
            "local",
            "--experiment-name",
            "facecal",
            "-P",
            "set=landmarks.workers=1 landmarks.overlays=3",
        ],
        cwd=proj,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    metrics = json.loads((proj / "metrics" / "landmarks.json").read_text())
    assert metrics["n_rows"] == 3 * 8
    assert (proj / "outputs" / "landmarks" / "landmarks.parquet").is_file()
    # `-P set=…` became DVC experiment overrides of params.yaml, one -S per override (MLflow
    # shell-quotes the value itself: quoted again in MLproject, it split into stage names).
    assert "dvc exp run -S landmarks.workers=1 -S landmarks.overlays=3" in done.stderr + done.stdout

    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("facecal")
    runs = client.search_runs([exp.experiment_id])
    stage = [r for r in runs if r.data.tags.get("facecal.stage") == "landmarks"]
    assert len(stage) == 1
    parent_id = stage[0].data.tags["mlflow.parentRunId"]
    parent = client.get_run(parent_id)
    assert parent.data.tags.get("mlflow.project.entryPoint") == "landmarks"
    assert parent.info.status == "FINISHED"
    assert stage[0].data.metrics["detection_rate"] > 0.5
