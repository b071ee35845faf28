"""Where things live. Stage modules take explicit paths; these are only the defaults."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def project_root() -> Path:
    """The facecal project directory: `$FACECAL_ROOT`, else the nearest parent of the working
    directory that holds `params.yaml` (DVC runs stages from the project root; `dvc exp run
    --temp` from a copy of it), else the working directory."""
    env = os.environ.get("FACECAL_ROOT")
    if env:
        return Path(env).resolve()
    cwd = Path.cwd().resolve()
    for d in (cwd, *cwd.parents):
        if (d / "params.yaml").is_file():
            return d
    return cwd


def with_scripts_on_path(env: dict[str, str]) -> dict[str, str]:
    """`env` with this interpreter's scripts directory first on PATH, as an activated venv has
    it: tools started by name from a child process (`dvc`, the stages' `facecal`, the `uvicorn`
    that `mlflow models serve` execs) are then the ones installed beside this facecal, even when
    it was started by path (`.venv/bin/facecal pipeline`, as `make run` does)."""
    env = dict(env)
    scripts = os.path.dirname(sys.executable)
    path = env.get("PATH", "")
    if scripts not in path.split(os.pathsep):
        env["PATH"] = scripts + os.pathsep + path if path else scripts
    return env


# Stage outputs all live outside data/, which data.dvc owns (DVC refuses overlapping outputs).
DATA_DIR = Path("data")
OUTPUTS_DIR = Path("outputs")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
