"""The MLflow model registry: register the ONNX generator, move aliases through a metric gate.

`facecal register` (DVC stage `register`) logs `outputs/export/generator.onnx` with the
`mlflow.onnx` flavour, registers it as `facecal-generator`, points alias `challenger` at the new
version, and moves `champion` only if the gate passes: the candidate beats the champion on the
gate metric by `min_delta`, both measured on the same evaluation set (the `eval_set_hash` that
`facecal evaluate` writes). A person overrides the gate with `facecal promote --force --reason`.
Every decision and its numbers are written on the version as tags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facecal import tracking
from facecal.config import load_section, params_from_args
from facecal.jsonio import write_json
from facecal.registry_common import (
    CHALLENGER,
    GateParams,
    RegistryError,
    add_registration_arguments,
    candidate_from_metrics,
    load_onnx,
    promote,
    read_eval_metrics,
    register_onnx,
)
from facecal.registry_common import (
    CHAMPION as CHAMPION,  # the alias the gate moves, as callers read it here
)
from facecal.registry_common import (
    add_promote_arguments as add_promote_arguments,  # `facecal promote` (cli.COMMANDS)
)

# The generator the metrics were computed for (metrics/eval.json) and the one an ONNX file holds
# (its metadata, = facecal.onnx_contract.META_GENERATOR_HASH): they must be equal to register.
GENERATOR_HASH_KEY = "generator_hash"
ONNX_GENERATOR_HASH = "facecal.generator_hash"
TAG_GENERATOR_HASH = "generator_hash"


@dataclass
class RegisterParams:
    model_name: str = "facecal-generator"
    gate: GateParams = field(default_factory=GateParams)


def check_provenance(
    model: Any, metrics: dict[str, Any], onnx_path: Path, metrics_path: str | Path
) -> str:
    """The generator hash both files name; a RegistryError if they do not name the same one
    (metrics of another model, hand-written metrics, a model exported by something else)."""
    meta = {p.key: p.value for p in model.metadata_props}
    model_hash, metrics_hash = meta.get(ONNX_GENERATOR_HASH), metrics.get(GENERATOR_HASH_KEY)
    bypass = "; `facecal register --force --reason …` registers it anyway (tagged)"
    if not model_hash:
        raise RegistryError(
            f"{onnx_path}: carries no {ONNX_GENERATOR_HASH} (not written by `facecal "
            f"export`), so no metrics can be shown to belong to it{bypass}"
        )
    if not metrics_hash:
        raise RegistryError(
            f"{metrics_path}: names no '{GENERATOR_HASH_KEY}': cannot tell which generator "
            f"these metrics were computed for (re-run `facecal evaluate`){bypass}"
        )
    if str(metrics_hash) != model_hash:
        raise RegistryError(
            f"{metrics_path}: metrics of generator {metrics_hash}, but {onnx_path} holds "
            f"generator {model_hash} — evaluate this model (`facecal evaluate`, then export)"
            f"{bypass}"
        )
    return model_hash


def register(
    onnx_path: str | Path,
    eval_metrics_path: str | Path,
    params: RegisterParams,
    out_path: str | Path | None = None,
    force: bool = False,
    reason: str | None = None,
) -> dict[str, Any]:
    """Log + register the ONNX generator, set `challenger`, run the gate for `champion`.
    The metrics must be the evaluation of this very generator (`check_provenance`); `force`
    (with a `reason`, tagged on the version) registers it without that proof."""
    if not tracking.enabled():
        raise RegistryError("registering needs MLflow tracking, but FACECAL_TRACKING is off")
    if force and not (reason and reason.strip()):
        raise RegistryError("--force needs --reason: forced registrations are recorded with why")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise RegistryError(f"{onnx_path}: ONNX model not found (run `facecal export`)")
    model = load_onnx(onnx_path)
    metrics = read_eval_metrics(eval_metrics_path)
    candidate = candidate_from_metrics(metrics, params.gate, str(eval_metrics_path))
    provenance: dict[str, str] = {}
    try:
        provenance[TAG_GENERATOR_HASH] = check_provenance(
            model, metrics, onnx_path, eval_metrics_path
        )
    except RegistryError as e:
        if not force:
            raise
        provenance.update(
            {
                "provenance": "forced",
                "provenance.reason": (reason or "").strip(),
                "provenance.problem": str(e)[:5000],
            }
        )
    registration = register_onnx(
        model,
        onnx_path,
        stage="register",
        params=params,
        artifact="generator",
        metrics=metrics,
        candidate=candidate,
        version_tags=provenance,
    )
    record = registration.record()
    if out_path is not None:
        write_json(out_path, record, sort_keys=False)
    return record


# ---------------------------------------------------------------- CLI
def add_register_arguments(parser) -> None:
    add_registration_arguments(
        parser, "outputs/export/generator.onnx", "outputs/register/registration.json", "model"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="register even if the metrics do not name this model's generator (needs --reason)",
    )
    parser.add_argument("--reason", default=None, help="why --force (recorded on the version)")


def main_register(args) -> int:
    params = params_from_args(args, RegisterParams, "register")
    record = register(
        args.onnx, args.eval_metrics, params, args.out, force=args.force, reason=args.reason
    )
    g = record["gate"]
    print(
        f"registered {record['model_name']} v{record['version']} (alias {CHALLENGER}); "
        f"gate on {g['metric']}: {g['decision']} — {g['reason']}"
    )
    return 0


def main_promote(args) -> int:
    params = load_section(RegisterParams, "register", args.params)
    name = args.model_name or params.model_name
    decision = promote(name, args.version, params.gate, force=args.force, reason=args.reason)
    state = "now champion" if decision.promote else "not promoted"
    print(f"{name} v{args.version}: {state} — {decision.reason}")
    return 0 if decision.promote else 1
