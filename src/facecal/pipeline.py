"""`facecal pipeline`: the whole DVC pipeline under one MLflow pipeline run.

Without overrides it is `dvc repro`; with `--set KEY=VALUE` it is `dvc exp run -S KEY=VALUE`
(an experiment DVC records, comparable with `dvc exp show`). Under `mlflow run .` the project run
becomes the pipeline run, so every stage run nests under it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from facecal import tracking
from facecal.config import parse_override
from facecal.paths import with_scripts_on_path


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
    overrides = list(args.overrides) + shlex.split(args.set_list or "")
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
