"""Stage `register_cnn`: the exported expression CNN in the MLflow registry as
``facecal-classifier``, with its own gate.

The same policy as the generator's (`registry_common.gate_decision`,
`registry_common.current_champion`, the same tags): the new version becomes `challenger`; `champion` moves only if the gate metric —
by default ``regimes.real_all.accuracy`` of metrics/eval.json, the exported model's own test
accuracy (seed 0 of the regime, = `export_cnn.seed_index` 0) — beats the champion's by
``min_delta`` on the same ``eval_set_hash``. The gate metric must belong to the regime the ONNX
file holds (a real_low accuracy cannot vouch for a real_all model). `facecal promote-cnn`
promotes by hand (gate, or ``--force --reason``).

Provenance: metrics/eval.json names the evaluation set but not the classifier's weights, so the
link between the two files is DVC's (both derive from outputs/cnn); the version is tagged with
the file's ``classifier_hash``, regime, seed index and training fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facecal import registry_common, tracking
from facecal.config import load_section, params_from_args
from facecal.jsonio import write_json
from facecal.onnx_contract import (
    KIND,
    META_CLASSIFIER,
    META_CLASSIFIER_HASH,
    META_KIND,
    TAG_WEIGHTS_SHA256,
    WEIGHTS_ARTIFACT,
    WEIGHTS_DIR,
    WEIGHTS_FILE,
)
from facecal.registry_common import CHALLENGER, RegistryError

SECTION = "register_cnn"
DEFAULT_ONNX = "outputs/export_cnn/classifier.onnx"
DEFAULT_OUT = "outputs/register_cnn/registration.json"
REGIME_METRIC = re.compile(r"^regimes\.(?P<regime>[^.]+)\.")


@dataclass
class RegisterCnnParams:
    model_name: str = "facecal-classifier"
    gate: registry_common.GateParams = field(
        default_factory=lambda: registry_common.GateParams(metric="regimes.real_all.accuracy")
    )


def check_weights_match(weights: Path, digest: str, onnx_path: Path) -> None:
    """The torch weights registered beside an ONNX classifier must be the network it was
    exported from: a fine-tuning from the registry would otherwise start from another model."""
    from facecal.recognition.cnn import classifier_hash, load_classifier

    model, meta = load_classifier(weights)
    actual = classifier_hash(model, meta)
    if actual != digest:
        raise RegistryError(
            f"{weights}: these torch weights (classifier_hash {actual}) are not the network "
            f"{onnx_path} was exported from ({digest or 'no classifier_hash'}); "
            "re-run `facecal export-cnn`"
        )


def classifier_contract(model: Any, onnx_path: Path) -> tuple[dict[str, Any], str]:
    """The `facecal.classifier` metadata and hash of an ONNX model, or a RegistryError when the
    file is not a classifier export (e.g. the generator)."""
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get(META_KIND) != KIND or META_CLASSIFIER not in meta:
        raise RegistryError(
            f"{onnx_path}: not a facecal classifier export ({META_KIND}="
            f"{meta.get(META_KIND)!r}); run `facecal export-cnn`"
        )
    try:
        contract = json.loads(meta[META_CLASSIFIER])
    except json.JSONDecodeError as e:
        raise RegistryError(f"{onnx_path}: bad {META_CLASSIFIER} metadata ({e})") from None
    return contract, meta.get(META_CLASSIFIER_HASH, "")


def check_gate_regime(contract: dict[str, Any], gate: registry_common.GateParams, onnx_path: Path):
    """A per-regime gate metric must be the exported regime's, and plain ``accuracy`` (seed 0's
    number) must gate the seed-0 model."""
    m = REGIME_METRIC.match(gate.metric)
    if m is None:
        return
    regime = contract.get("regime")
    if m["regime"] != regime:
        raise RegistryError(
            f"gate metric {gate.metric!r} is regime {m['regime']!r}'s, but {onnx_path} holds "
            f"a {regime!r} model (set register_cnn.gate.metric to regimes.{regime}.…)"
        )
    if not gate.metric.endswith(("_mean", "_min", "_max", "_sd")) and contract.get("seed_index"):
        raise RegistryError(
            f"gate metric {gate.metric!r} is seed 0's number, but {onnx_path} holds training "
            f"{contract['seed_index']} (export seed_index 0, or gate on …accuracy_mean)"
        )


def register_classifier(
    onnx_path: str | Path,
    eval_metrics_path: str | Path,
    params: RegisterCnnParams,
    out_path: str | Path | None = None,
) -> dict[str, Any]:
    """Log + register the ONNX classifier, set `challenger`, run the gate for `champion`."""
    if not tracking.enabled():
        raise RegistryError("registering needs MLflow tracking, but FACECAL_TRACKING is off")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        export_json = onnx_path.with_name("model.json")
        why = None
        if export_json.is_file():
            why = json.loads(export_json.read_text()).get("not_exported")
        if why:  # export_cnn had nothing to export (train_cnn skipped the regime)
            record = {"model_name": params.model_name, "registered": False, "reason": why}
            _write(out_path, record)
            print(f"register-cnn: nothing registered — {why}")
            return record
        raise RegistryError(f"{onnx_path}: ONNX classifier not found (run `facecal export-cnn`)")
    model = registry_common.load_onnx(onnx_path)
    contract, digest = classifier_contract(model, onnx_path)
    check_gate_regime(contract, params.gate, onnx_path)
    metrics = registry_common.read_eval_metrics(eval_metrics_path)
    candidate = registry_common.candidate_from_metrics(metrics, params.gate, str(eval_metrics_path))
    # The torch weights beside the ONNX file (export_cnn copies them there): a registered
    # classifier can then initialise a fine-tuning (`cnn.init: models:/…`).
    weights = onnx_path.parent / WEIGHTS_DIR
    weights_tags, extra = {}, {}
    if (weights / WEIGHTS_FILE).is_file():
        check_weights_match(weights / WEIGHTS_FILE, digest, onnx_path)
        digest_pt = hashlib.sha256((weights / WEIGHTS_FILE).read_bytes()).hexdigest()
        weights_tags, extra = {TAG_WEIGHTS_SHA256: digest_pt}, {WEIGHTS_ARTIFACT: weights}
    registration = registry_common.register_onnx(
        model,
        onnx_path,
        stage=SECTION,
        params=params,
        artifact="classifier",
        metrics=metrics,
        candidate=candidate,
        version_tags={
            "classifier_hash": digest or "unknown",
            "regime": str(contract.get("regime")),
            "seed_index": str(contract.get("seed_index")),
            "fingerprint": str(contract.get("fingerprint")),
            "classes": ",".join(contract.get("classes", [])),
            **weights_tags,
        },
        extra_artifacts=extra,
    )
    record = registration.record(
        {"registered": True}, classifier_hash=digest, regime=contract.get("regime")
    )
    _write(out_path, record)
    return record


def _write(out_path: str | Path | None, record: dict[str, Any]) -> None:
    if out_path is None:
        return
    write_json(out_path, record, sort_keys=False)


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    registry_common.add_registration_arguments(parser, DEFAULT_ONNX, DEFAULT_OUT, "classifier")


def main(args) -> int:
    params = params_from_args(args, RegisterCnnParams, SECTION)
    record = register_classifier(args.onnx, args.eval_metrics, params, args.out)
    if record["registered"]:
        g = record["gate"]
        print(
            f"registered {record['model_name']} v{record['version']} (alias {CHALLENGER}); "
            f"gate on {g['metric']}: {g['decision']} — {g['reason']}"
        )
    return 0


def add_promote_arguments(parser) -> None:
    registry_common.add_promote_arguments(parser)


def main_promote(args) -> int:
    params = load_section(RegisterCnnParams, SECTION, args.params)
    name = args.model_name or params.model_name
    decision = registry_common.promote(
        name, args.version, params.gate, force=args.force, reason=args.reason
    )
    state = "now champion" if decision.promote else "not promoted"
    print(f"{name} v{args.version}: {state} — {decision.reason}")
    return 0 if decision.promote else 1
