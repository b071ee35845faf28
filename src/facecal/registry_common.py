"""What the two registry stages share: the promotion gate, version tags, the MLflow client,
promotion by hand.

`facecal register` (the generator, `facecal.registry`) and `facecal register-cnn` (the
classifier, `facecal.register_classifier`) register different ONNX files under different names
with the same policy: `challenger` points at the newest version and `champion` moves only when
`gate_decision` says so (or a person forces it, with a reason); every decision is written on the
version as tags.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from facecal import tracking
from facecal.config import add_params_arguments, flatten
from facecal.errors import FacecalError

CHAMPION = "champion"
CHALLENGER = "challenger"
EVAL_SET_KEY = "eval_set_hash"
# Version tags (strings): what the gate and people read back.
TAG_EVAL_SET = "eval_set_hash"
TAG_GATE_METRIC = "gate.metric"
TAG_GATE_VALUE = "gate.value"
TAG_DECISION = "gate.decision"
TAG_REASON = "gate.reason"
TAG_CHAMPION_VERSION = "gate.champion_version"
TAG_CHAMPION_VALUE = "gate.champion_value"


class RegistryError(FacecalError):
    pass


@dataclass
class GateParams:
    metric: str = "ssim_calibrated"
    direction: Literal["maximize", "minimize"] = "maximize"
    min_delta: float = 0.0


@dataclass
class Candidate:
    version: str | None
    value: float
    eval_set: str
    note: str = ""  # why the value is missing, when it is


@dataclass
class GateDecision:
    promote: bool
    reason: str
    metric: str
    candidate: float
    champion: float | None = None
    champion_version: str | None = None

    @property
    def label(self) -> str:
        return "promoted" if self.promote else "kept_champion"


def gate_decision(
    candidate: Candidate, champion: Candidate | None, gate: GateParams
) -> GateDecision:
    """Whether `candidate` replaces `champion` (pure: no MLflow; the whole policy is here)."""
    base: dict[str, Any] = dict(metric=gate.metric, candidate=candidate.value)
    if champion is not None:
        base.update(champion=champion.value, champion_version=champion.version)
    if not math.isfinite(candidate.value):
        why = f"candidate {gate.metric} is not finite ({candidate.value})"
        return GateDecision(False, f"{why}: {candidate.note}" if candidate.note else why, **base)
    if champion is None:
        return GateDecision(
            True, "no champion yet: the first gated version becomes champion", **base
        )
    if champion.eval_set != candidate.eval_set:
        return GateDecision(
            False,
            f"evaluation sets differ (champion v{champion.version}: {champion.eval_set}, "
            f"candidate: {candidate.eval_set}); numbers are not comparable — re-evaluate "
            f"the champion on this set or promote by hand with --force",
            **base,
        )
    sign = 1.0 if gate.direction == "maximize" else -1.0
    gain = sign * (candidate.value - champion.value)
    verb = "higher" if gate.direction == "maximize" else "lower"
    if gain > gate.min_delta:
        return GateDecision(
            True,
            f"{gate.metric} {candidate.value:.6g} is {verb} than champion "
            f"v{champion.version}'s {champion.value:.6g} by {gain:.3g} "
            f"(> min_delta {gate.min_delta:g})",
            **base,
        )
    return GateDecision(
        False,
        f"{gate.metric} {candidate.value:.6g} does not beat champion "
        f"v{champion.version}'s {champion.value:.6g} by more than "
        f"min_delta {gate.min_delta:g} ({verb} is better)",
        **base,
    )


def read_eval_metrics(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(
            f"{path}: evaluation metrics not found (run `facecal evaluate`)"
        ) from None
    except json.JSONDecodeError as e:
        raise RegistryError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a JSON object of metrics, got {type(data).__name__}")
    return flatten(data)


def candidate_from_metrics(metrics: dict[str, Any], gate: GateParams, source: str) -> Candidate:
    if gate.metric not in metrics:
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        raise RegistryError(
            f"{source}: gate metric '{gate.metric}' not found; available: {numeric[:40]}"
        )
    if EVAL_SET_KEY not in metrics:
        raise RegistryError(
            f"{source}: no '{EVAL_SET_KEY}': cannot tell which evaluation set the numbers come from"
        )
    value = metrics[gate.metric]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        # e.g. ssim_calibrated is null for data without weak faces (nothing to calibrate): the
        # version is registered, and the gate keeps the champion, saying why.
        why = metrics.get(f"not_computed.{gate.metric}")
        note = (
            f"{source}: gate metric '{gate.metric}' is {value!r}"
            + (f" ({why})" if why else "")
            + "; the champion stays — gate on another metric (register.gate.metric) "
            "or promote by hand"
        )
        return Candidate(None, math.nan, str(metrics[EVAL_SET_KEY]), note)
    return Candidate(None, float(value), str(metrics[EVAL_SET_KEY]))


def load_onnx(path: Path) -> Any:
    """The ONNX model in `path` (weights included); anything else is a RegistryError naming
    the file, not a protobuf traceback."""
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # DecodeError, ValidationError, OSError, …: all mean "not a model"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise RegistryError(
            f"{path}: not a valid ONNX model ({type(e).__name__}{': ' + first if first else ''})"
        ) from None
    if not model.graph.node:  # random bytes can parse as an empty protobuf message
        raise RegistryError(f"{path}: not a valid ONNX model (no graph)")
    return model


def mlflow_client():
    tracking.setup()
    import mlflow

    return mlflow.MlflowClient()


def version_candidate(client, name: str, version: str, gate: GateParams) -> Candidate:
    """A registered version's gate metric (from its source run) and evaluation set (its tag)."""
    mv = client.get_model_version(name, version)
    eval_set = (mv.tags or {}).get(TAG_EVAL_SET)
    value = None
    if mv.run_id:
        value = client.get_run(mv.run_id).data.metrics.get(tracking.metric_name(gate.metric))
    if value is None and (mv.tags or {}).get(TAG_GATE_METRIC) == gate.metric:
        value = float(mv.tags[TAG_GATE_VALUE])
    if value is None or eval_set is None:
        raise RegistryError(
            f"{name} v{version}: has no recorded '{gate.metric}' or evaluation "
            f"set; it cannot be compared by the gate"
        )
    return Candidate(str(version), float(value), eval_set)


def current_champion(client, name: str, gate: GateParams) -> Candidate | None:
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return version_candidate(client, name, str(mv.version), gate)


def tag_decision(client, name: str, version: str, decision: GateDecision) -> None:
    tags = {
        TAG_GATE_METRIC: decision.metric,
        TAG_GATE_VALUE: f"{decision.candidate:.10g}",
        TAG_DECISION: decision.label,
        TAG_REASON: decision.reason[:5000],
    }
    if decision.champion_version is not None:
        tags[TAG_CHAMPION_VERSION] = decision.champion_version
        tags[TAG_CHAMPION_VALUE] = f"{decision.champion:.10g}"
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)


def model_signature(onnx_path: Path):
    """Input/output schema from running the model once on zeros (so `mlflow models serve`
    validates requests)."""
    import numpy as np
    import onnxruntime as ort
    from mlflow.models import infer_signature

    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own zoo (Fail, InvalidGraph, …)
        raise RegistryError(f"{onnx_path}: onnxruntime cannot load it ({e})"[:500]) from None
    dtypes = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32, "tensor(float16)": np.float16}
    feeds = {}
    for inp in sess.get_inputs():
        shape = [1 if not isinstance(d, int) else d for d in inp.shape]
        feeds[inp.name] = np.zeros(shape, dtype=dtypes.get(inp.type, np.float32))
    outputs = sess.run(None, feeds)
    out_names = [o.name for o in sess.get_outputs()]
    return infer_signature(feeds, dict(zip(out_names, outputs)) if len(outputs) > 1 else outputs[0])


@dataclass
class Registration:
    """A version `register_onnx` logged and registered, and the gate's decision on it."""

    name: str
    version: str
    run_id: str | None
    decision: GateDecision

    def record(self, head: dict[str, Any] | None = None, **details: Any) -> dict[str, Any]:
        """What a register stage writes: `head` right after the name, `details` before the
        gate (the stages' registration.json files keep their key order)."""
        promoted = self.decision.promote
        return {
            "model_name": self.name,
            **(head or {}),
            "version": self.version,
            "model_uri": f"models:/{self.name}/{self.version}",
            "run_id": self.run_id,
            "tracking_uri": tracking.tracking_uri(),
            **details,
            "champion_version": self.version if promoted else self.decision.champion_version,
            "gate": asdict(self.decision) | {"decision": self.decision.label},
        }


def register_onnx(
    model: Any,
    onnx_path: Path,
    *,
    stage: str,
    params: Any,
    artifact: str,
    metrics: dict[str, Any],
    candidate: Candidate,
    version_tags: dict[str, str],
    extra_artifacts: dict[str, Path] | None = None,
) -> Registration:
    """The steps both register stages share: log `model` (artifact `artifact`) in the `stage` run
    and register it as ``params.model_name``; tag the version (evaluation set, commit, data, run,
    then `version_tags`); point `challenger` at it and let the gate (``params.gate``) move
    `champion`. `extra_artifacts` (artifact path → local folder) are logged in the same run."""
    signature = model_signature(onnx_path)

    import mlflow
    import onnxruntime as ort

    import onnx

    client = mlflow_client()
    name = params.model_name
    with tracking.stage_run(stage, params) as run:
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.set_tags({TAG_EVAL_SET: candidate.eval_set})
        info = mlflow.onnx.log_model(
            model,
            name=artifact,
            registered_model_name=name,
            signature=signature,
            onnx_execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
            pip_requirements=[
                f"onnxruntime-gpu=={ort.__version__}",
                f"onnx=={onnx.__version__}",
                "numpy",
            ],
            save_as_external_data=False,
        )
        for artifact_path, folder in (extra_artifacts or {}).items():
            run.log_artifact(folder, artifact_path)
        version = str(info.registered_model_version)
        base = tracking.base_tags()
        tags = {
            TAG_EVAL_SET: candidate.eval_set,
            "git_commit": base.get(tracking.TAG_GIT) or "unknown",
            "data_hash": base.get(tracking.TAG_DATA) or "unknown",
            "run_id": run.run_id or "",
            **version_tags,
        }
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        client.set_registered_model_alias(name, CHALLENGER, version)
        champion = current_champion(client, name, params.gate)
        decision = gate_decision(candidate, champion, params.gate)
        tag_decision(client, name, version, decision)
        if decision.promote:
            client.set_registered_model_alias(name, CHAMPION, version)
        run.set_tags({TAG_DECISION: decision.label})
        run.log_metrics({"gate_promoted": float(decision.promote)})
    return Registration(name, version, run.run_id, decision)


def promote(
    name: str, version: str, gate: GateParams, force: bool = False, reason: str | None = None
) -> GateDecision:
    """A person's promotion of `version` to champion: through the gate, or forced with a reason."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    version = str(version)
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"{name} has no version {version}") from None
    if force:
        if not reason or not reason.strip():
            raise RegistryError("--force needs --reason: forced promotions are recorded with why")
        champion = None
        try:
            champion = str(client.get_model_version_by_alias(name, CHAMPION).version)
        except MlflowException:
            pass
        decision = GateDecision(
            True, f"forced by hand: {reason.strip()}", gate.metric, math.nan, None, champion
        )
        client.set_registered_model_alias(name, CHAMPION, version)
        tags = {
            "promotion": "forced",
            "promotion.reason": reason.strip(),
            "promotion.by": _who(),
            "promotion.at": _now(),
            "promotion.previous_champion": champion or "none",
        }
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        return decision
    candidate = version_candidate(client, name, version, gate)
    current = current_champion(client, name, gate)
    if current is not None and current.version == version:
        return GateDecision(
            False,
            f"v{version} already is the champion",
            gate.metric,
            candidate.value,
            current.value,
            current.version,
        )
    decision = gate_decision(candidate, current, gate)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
        for k, v in {"promotion": "gate", "promotion.by": _who(), "promotion.at": _now()}.items():
            client.set_model_version_tag(name, version, k, v)
    return decision


def _who() -> str:
    try:
        return os.environ.get("FACECAL_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def add_registration_arguments(parser, onnx: str, out: str, what: str) -> None:
    """The arguments both register stages take: params, the ONNX file, the metrics, the record."""
    add_params_arguments(parser)
    parser.add_argument("--onnx", default=onnx, help=f"{what} to register")
    parser.add_argument(
        "--eval-metrics",
        default="metrics/eval.json",
        help="evaluation metrics holding the gate metric and eval_set_hash",
    )
    parser.add_argument("--out", default=out, help="where to record what was registered")


def add_promote_arguments(parser) -> None:
    parser.add_argument("--version", required=True, help="registered version to promote")
    parser.add_argument(
        "--force",
        action="store_true",
        help="promote even if the gate refuses (needs --reason; tagged)",
    )
    parser.add_argument("--reason", default=None, help="why (recorded on the version)")
    parser.add_argument("--model-name", default=None, help="default: register.model_name")
    parser.add_argument("--params", default=None, metavar="FILE", help="params file")


# --------------------------------------------------------------------------- registered weights


def registered_classifier_weights(
    uri: str, cache_dir: str | Path | None = None
) -> tuple[Path, str]:
    """(local .pt path, version) of the torch weights registered with the classifier version
    `uri` names (register_cnn logs them beside the ONNX file); downloaded once into the model
    cache and checked against the version's sha256 tag."""
    import hashlib

    from facecal.onnx_contract import TAG_WEIGHTS_SHA256, WEIGHTS_ARTIFACT, WEIGHTS_FILE
    from facecal.serving.runtime import cache_entry, cached_download, registry_version

    name, _, mv = registry_version(uri)  # before importing mlflow: it sets the telemetry switch
    import mlflow
    from mlflow.exceptions import MlflowException

    expected = (mv.tags or {}).get(TAG_WEIGHTS_SHA256)
    if not expected:
        raise RegistryError(
            f"{uri}: version {mv.version} was registered without its torch weights "
            f"(registered before export_cnn kept them: re-run export-cnn and register-cnn)"
        )
    try:
        folder = cached_download(
            cache_entry(name, mv, cache_dir, "-torch"),
            lambda tmp: mlflow.artifacts.download_artifacts(
                run_id=mv.run_id, artifact_path=WEIGHTS_ARTIFACT, dst_path=str(tmp)
            ),
            {"name": name, "version": str(mv.version), "run_id": mv.run_id},
        )
    except MlflowException as e:
        raise RegistryError(f"{uri}: its torch weights could not be downloaded ({e})") from None
    path = folder / WEIGHTS_ARTIFACT / WEIGHTS_FILE
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != expected:
        shutil.rmtree(folder, ignore_errors=True)  # the next run downloads it again
        raise RegistryError(
            f"{uri}: the downloaded weights ({path}) do not match the version's "
            f"{TAG_WEIGHTS_SHA256} tag (cache entry removed)"
        )
    return path, str(mv.version)
