"""`facecal pipeline`: the whole DVC pipeline under one MLflow pipeline run.

Without overrides it is `dvc repro`; with `--set KEY=VALUE` it is `dvc exp run -S KEY=VALUE`
(an experiment DVC records, comparable with `dvc exp show`). `--preset NAME` adds the overrides
of `presets/NAME.yaml` (a partial params.yaml: a setting for a dataset or a time budget), before
any `--set`. Under `mlflow run .` the project run becomes the pipeline run, so every stage run
nests under it.
"""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from facecal import tracking
from facecal.config import ParamsError, parse_override, read_params, set_dotted
from facecal.paths import project_root, with_scripts_on_path

PRESETS_DIR = "presets"


def preset_path(name: str, root: Path | None = None) -> Path:
    """A preset file: `name` itself where it is a file, else `presets/<name>.yaml` of the project."""
    path = Path(name)
    if path.is_file():
        return path
    root = root or project_root()
    path = root / PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (root / PRESETS_DIR).glob("*.yaml"))
        raise ParamsError(
            f"preset {name!r}: no file {path} (presets: {', '.join(known) or 'none'})"
        )
    return path


def _value_text(value: Any) -> str:
    """A value as `dvc exp run -S` (Hydra's override grammar) and YAML both read it."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    plain = isinstance(value, str) and value.replace("_", "").replace("-", "").isalnum()
    if isinstance(value, str) and not (plain and yaml.safe_load(value) == value):
        return "'" + value.replace("'", "\\'") + "'"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def preset_overrides(
    name: str, params: dict[str, Any] | None = None, root: Path | None = None
) -> list[str]:
    """`--set` strings of a preset, every key checked against the project's params.yaml (a typo
    fails here, naming the key and the preset file). A mapping in the preset recurses into a
    mapping of params.yaml; where params.yaml holds an empty one (`split_rename: {}`) it is set
    whole (``++``: Hydra's set-or-add)."""
    path = preset_path(name, root)
    try:
        preset = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(preset, dict):
        raise ParamsError(f"{path}: expected a mapping of params sections")
    params = read_params() if params is None else params
    out: list[str] = []

    def walk(over: dict[str, Any], base: dict[str, Any], prefix: str) -> None:
        for key, value in over.items():
            dotted = f"{prefix}{key}"
            if key not in base:
                raise ParamsError(f"{path}: {dotted} is not a key of params.yaml")
            if isinstance(value, dict) and isinstance(base[key], dict) and base[key]:
                walk(value, base[key], dotted + ".")
            elif isinstance(value, dict):
                out.append(f"++{dotted}={_value_text(value)}")
            else:
                out.append(f"{dotted}={_value_text(value)}")

    walk(preset, params, "")
    return out


def with_preset(params: dict[str, Any], name: str, root: Path | None = None) -> dict[str, Any]:
    """`params` with a preset's overrides applied: the params.yaml `dvc exp run` would run."""
    out = copy.deepcopy(params)
    for text in preset_overrides(name, params, root):
        key, value = parse_override(text.removeprefix("++"))
        set_dotted(out, key.split("."), value)
    return out


def dvc_command(
    overrides: list[str], targets: list[str], single_item: bool = False, force: bool = False
) -> list[str]:
    for o in overrides:
        parse_override(o)  # fail early, naming the bad override
    cmd = ["dvc", "exp", "run"] if overrides else ["dvc", "repro"]
    for o in overrides:
        cmd += ["-S", o]
    if single_item:
        cmd.append("--single-item")
    if force:
        cmd.append("--force")
    return cmd + targets


def child_env() -> dict[str, str]:
    """The environment of `dvc` and its stage commands."""
    return with_scripts_on_path(dict(os.environ, DVC_NO_ANALYTICS="1"))


def add_arguments(parser) -> None:
    parser.add_argument("targets", nargs="*", help="stages to reproduce (default: all)")
    parser.add_argument(
        "--preset",
        default="",
        metavar="NAME|FILE",
        help="overrides of presets/NAME.yaml (e.g. fer2013-cpu), run as a DVC experiment",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="param override, run as a DVC experiment (repeatable)",
    )
    parser.add_argument(
        "--set-list",
        default="",
        metavar="'K=V K=V'",
        help="several overrides in one string (what MLproject passes)",
    )
    parser.add_argument(
        "--single-item", action="store_true", help="only the named stages, not what they depend on"
    )
    parser.add_argument("--force", action="store_true", help="run stages even if unchanged")


def main(args) -> int:
    preset = preset_overrides(args.preset) if args.preset else []
    overrides = preset + list(args.overrides) + shlex.split(args.set_list or "")
    cmd = dvc_command(overrides, list(args.targets), args.single_item, args.force)
    with tracking.pipeline_run() as run_id:
        if run_id:
            print(f"pipeline run {run_id} ({tracking.tracking_uri()})", file=sys.stderr)
        print("+ " + shlex.join(cmd), file=sys.stderr)
        # DVC and its stages inherit FACECAL_PARENT_RUN_ID: every stage nests under this run.
        rc = subprocess.call(cmd, env=child_env())
        if rc != 0:
            raise SystemExit(rc)
    return 0
