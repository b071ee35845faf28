"""Stage runs: tags, nesting under a pipeline run (explicit, `mlflow run`, and plain `dvc repro`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

from facecal import tracking


@dataclass
class _P:
    epochs: int = 3


def _runs(uri):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("facecal")
    return client.search_runs([exp.experiment_id]) if exp else []


def test_tracking_off_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FACECAL_TRACKING", "off")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'x.db'}")
    with tracking.stage_run("s", _P()) as run:
        run.log_metrics({"a": 1.0})
        assert not run.active
    assert not (tmp_path / "x.db").exists()


def test_stage_run_logs_params_metrics_tags(mlflow_store, tmp_path):
    (tmp_path / "art.txt").write_text("hi")
    with tracking.stage_run("landmarks", _P(epochs=5)) as run:
        run.log_metrics({"detection": {"rate": 0.97}, "skip": "text"})
        run.log_metrics({"loss": 0.5}, step=3)
        run.log_artifact(tmp_path / "art.txt", "reports")
    (r,) = _runs(mlflow_store)
    assert r.data.params == {"epochs": "5"}
    assert r.data.metrics == {"detection.rate": 0.97, "loss": 0.5}
    assert r.data.tags[tracking.TAG_STAGE] == "landmarks"
    assert r.data.tags[tracking.TAG_PARAMS] == tracking.params_hash(_P(epochs=5))
    assert r.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert (tmp_path / "mlartifacts").exists()


def test_stages_nest_under_an_explicit_pipeline_run(mlflow_store, monkeypatch):
    with tracking.pipeline_run() as parent:
        with tracking.stage_run("a"):
            pass
        with tracking.stage_run("b"):
            pass
    runs = {r.info.run_name: r for r in _runs(mlflow_store)}
    assert runs["pipeline"].info.run_id == parent
    assert runs["pipeline"].info.status == "FINISHED"
    assert runs["a"].data.tags["mlflow.parentRunId"] == parent
    assert runs["b"].data.tags["mlflow.parentRunId"] == parent


def test_pipeline_run_without_stages_leaves_no_empty_run(mlflow_store):
    with tracking.pipeline_run():
        pass
    assert _runs(mlflow_store) == []


def test_mlflow_project_run_becomes_the_parent_and_is_not_resumed(mlflow_store, monkeypatch):
    import mlflow

    exp = tracking.setup()
    project = mlflow.MlflowClient().create_run(exp, run_name="project").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", project)
    with tracking.stage_run("a") as run:
        assert run.run_id != project
    child = mlflow.MlflowClient().get_run(run.run_id)
    assert child.data.tags["mlflow.parentRunId"] == project


def test_plain_dvc_repro_nests_all_stages_under_one_pipeline_run(mlflow_store, tmp_path):
    """DVC starts each stage as its own process; they still share one pipeline run."""
    proj = tmp_path / "proj"
    proj.mkdir()
    stage = textwrap.dedent("""
        import sys
        from facecal import tracking
        with tracking.stage_run(sys.argv[1]) as run:
            run.log_metrics({"x": 1.0})
        open(sys.argv[1] + ".out", "w").write("done")
    """)
    (proj / "stage.py").write_text(stage)
    (proj / "params.yaml").write_text("base: {seed: 0}\n")
    py = sys.executable
    (proj / "dvc.yaml").write_text(
        textwrap.dedent(f"""
        stages:
          one:
            cmd: {py} stage.py one
            deps: [stage.py]
            outs: [one.out]
          two:
            cmd: {py} stage.py two
            deps: [one.out]
            outs: [two.out]
    """)
    )
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env.pop("FACECAL_PARENT_RUN_ID", None)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "-q"]):
        subprocess.run(cmd, cwd=proj, env=env, check=True, capture_output=True)
    runs = {r.info.run_name: r for r in _runs(mlflow_store)}
    assert set(runs) == {"one", "two", "pipeline"}
    parent = runs["pipeline"].info.run_id
    assert runs["one"].data.tags["mlflow.parentRunId"] == parent
    assert runs["two"].data.tags["mlflow.parentRunId"] == parent
    assert runs["pipeline"].data.tags[tracking.TAG_KIND] == "pipeline"


def test_experiment_copy_logs_to_the_project_store(tmp_path, monkeypatch):
    """`dvc exp run --temp` runs in .dvc/tmp/exps/…: the store stays the project's."""
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpabc"
    copy.mkdir(parents=True)
    (copy / "params.yaml").write_text("base: {}\n")
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FACECAL_ROOT", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'proj' / 'mlflow.db'}"


def test_metric_names_are_made_acceptable_to_mlflow():
    from facecal.tracking import metric_name

    assert (
        metric_name("regimes.real_low+gen_calibrated.accuracy")
        == "regimes.real_low_plus_gen_calibrated.accuracy"
    )
    assert metric_name("ok_name-1.2/x y:z") == "ok_name-1.2/x y:z"
    assert metric_name("a(b)") == "a_b_"
