"""MLflow tracking for pipeline stages.

Every stage wraps its work in ``with stage_run("landmarks", params) as run:`` and logs through
``run``. The stage run is tagged (stage, git commit, data.dvc hash, params hash) and nested under
one *pipeline run*:

* under ``mlflow run .`` the project run (``MLFLOW_RUN_ID``) is the parent;
* ``FACECAL_PARENT_RUN_ID`` names a parent explicitly (``facecal pipeline`` sets it);
* under a plain ``dvc repro`` / ``dvc exp run``, the stages of one DVC process share a parent run
  found by a tag holding that process's id and start time (DVC starts each stage as a child
  process and offers no run id of its own).

Tracking goes to ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<project root>/mlflow.db`` with
artifacts in ``<project root>/mlartifacts``. ``FACECAL_TRACKING=off`` turns it off (the test
suite does this so unit tests never write to a store they did not ask for).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from facecal.config import ParamsError, flatten, params_hash, read_params, to_dict
from facecal.paths import project_root

EXPERIMENT = "facecal"  # default; params.yaml base.tracking.experiment overrides
TAG_STAGE = "facecal.stage"
TAG_KIND = "facecal.kind"
TAG_DATA = "facecal.data_hash"
TAG_PARAMS = "facecal.params_hash"
TAG_PIPELINE_KEY = "facecal.pipeline_key"
TAG_GIT = "mlflow.source.git.commit"


def enabled() -> bool:
    return os.environ.get("FACECAL_TRACKING", "on").strip().lower() not in {
        "0",
        "off",
        "false",
        "no",
    }


def repo_root() -> Path:
    """The real project root, also from inside ``dvc exp run --temp``'s copy under .dvc/tmp/exps
    (so every experiment logs to the one store of the project)."""
    root = project_root()
    for d in (root, *root.parents):
        if d.name == ".dvc":
            return d.parent
    return root


def _settings() -> dict[str, Any]:
    """`base.tracking` of params.yaml: ``experiment`` name and ``uri`` (null = the default)."""
    try:
        return dict((read_params().get("base") or {}).get("tracking") or {})
    except ParamsError:
        return {}


_METRIC_NAME_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")


def metric_name(key: str) -> str:
    """`key` as a name MLflow accepts (alphanumerics and `_-. /:`); `+` of regime names → `_plus_`."""
    return _METRIC_NAME_BAD.sub("_", key.replace("+", "_plus_"))


def experiment_name() -> str:
    return str(_settings().get("experiment") or EXPERIMENT)


def tracking_uri() -> str:
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or _settings().get("uri")
        or f"sqlite:///{repo_root() / 'mlflow.db'}"
    )


def setup() -> str:
    """Point MLflow at the store and make sure experiment `facecal` exists; returns its id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    name = experiment_name()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # A local sqlite store keeps its artifacts beside it (<project root>/mlartifacts by default).
    location = (
        (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
        if uri.startswith("sqlite:///")
        else None
    )
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another stage process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or repo_root(),
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def data_hash(root: Path | None = None) -> str | None:
    """The md5 that `data.dvc` records for `data/` (what the raw dataset was)."""
    path = (root or project_root()) / "data.dvc"
    try:
        outs = yaml.safe_load(path.read_text())["outs"]
        return str(outs[0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return None


class StageRun:
    """What a stage logs to. With tracking off every method does nothing."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def log_params(self, params: Any) -> None:
        if not self.active:
            return
        import mlflow

        flat = flatten(to_dict(params))
        # MLflow caps a param value at 6000 characters.
        mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        import mlflow

        clean = {
            metric_name(k): float(v)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})


@contextlib.contextmanager
def stage_run(
    stage: str, params: Any = None, tags: dict[str, Any] | None = None
) -> Iterator[StageRun]:
    """A tracked run for one pipeline stage (see the module docstring)."""
    if not enabled():
        yield StageRun(None)
        return
    import mlflow

    experiment_id = setup()
    parent = _parent_run_id(experiment_id)
    if parent:
        # A child shows nested in the UI only inside its parent's experiment (`mlflow run .`
        # without --experiment-name puts the project run in "Default").
        experiment_id = mlflow.MlflowClient().get_run(parent).info.experiment_id
    run_tags = {TAG_STAGE: stage, TAG_KIND: "stage", **base_tags()}
    if params is not None:
        run_tags[TAG_PARAMS] = params_hash(params)
    run_tags.update(tags or {})
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=stage,
        parent_run_id=parent,
        tags={k: str(v) for k, v in run_tags.items() if v is not None},
    ) as run:
        tracker = StageRun(run.info.run_id)
        if params is not None:
            tracker.log_params(params)
        yield tracker
    if parent:
        # Keep the pipeline run's end time current; its status says the last stage finished.
        mlflow.MlflowClient().set_terminated(parent, "FINISHED")


def base_tags() -> dict[str, str | None]:
    return {TAG_GIT: git_commit(), TAG_DATA: data_hash()}


def _parent_run_id(experiment_id: str) -> str | None:
    explicit = os.environ.get("FACECAL_PARENT_RUN_ID")
    if explicit:
        return explicit
    # `mlflow run` exports its project run id; starting a run while it is set would *resume*
    # that run instead of nesting under it, so take it out of the environment.
    project_run = os.environ.pop("MLFLOW_RUN_ID", None)
    if project_run:
        os.environ["FACECAL_PARENT_RUN_ID"] = project_run
        return project_run
    key = _dvc_process_key()
    if key is None:
        return None
    return _pipeline_run_for_key(experiment_id, key)


def _pipeline_run_for_key(experiment_id: str, key: str) -> str:
    import mlflow

    client = mlflow.MlflowClient()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_PIPELINE_KEY}` = '{key}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name="pipeline",
        tags={
            TAG_KIND: "pipeline",
            TAG_PIPELINE_KEY: key,
            **{k: v for k, v in base_tags().items() if v},
        },
    )
    return run.info.run_id


@functools.lru_cache(maxsize=1)
def _dvc_process_key() -> str | None:
    """``<pid>-<start ticks>`` of the nearest ancestor `dvc` process (Linux /proc), or None."""
    pid = os.getppid()
    for _ in range(16):
        if pid <= 1:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        words = [Path(w.decode(errors="replace")).name for w in cmdline[:3]]
        if "dvc" in words:
            start_ticks = stat.rsplit(")", 1)[1].split()[19]
            return f"{pid}-{start_ticks}"
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return None


@contextlib.contextmanager
def pipeline_run(name: str = "pipeline") -> Iterator[str | None]:
    """A parent run for everything started inside (``facecal pipeline`` wraps `dvc repro`)."""
    if not enabled():
        yield None
        return
    import mlflow

    experiment_id = setup()
    parent = os.environ.pop("MLFLOW_RUN_ID", None)
    client = mlflow.MlflowClient()
    tags = {TAG_KIND: "pipeline", **{k: v for k, v in base_tags().items() if v}}
    if parent:  # under `mlflow run .` the project run already is the pipeline run
        client.set_tag(parent, TAG_KIND, "pipeline")
        run_id, own = parent, False
    else:
        run_id, own = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id, True
    previous = os.environ.get("FACECAL_PARENT_RUN_ID")
    os.environ["FACECAL_PARENT_RUN_ID"] = run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        if previous is None:
            os.environ.pop("FACECAL_PARENT_RUN_ID", None)
        else:
            os.environ["FACECAL_PARENT_RUN_ID"] = previous
        if own:
            client.set_terminated(run_id, status, end_time=int(time.time() * 1000))
            # A `dvc repro` with nothing to do ran no stage: leave no empty pipeline run behind.
            children = client.search_runs(
                [experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
                max_results=1,
            )
            if status == "FINISHED" and not children:
                client.delete_run(run_id)
        if parent:
            os.environ["MLFLOW_RUN_ID"] = parent
