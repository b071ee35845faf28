"""Where things live. Stage modules take explicit paths; these are only the defaults."""

from __future__ import annotations

import os
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


# Stage outputs all live outside data/, which data.dvc owns (DVC refuses overlapping outputs).
DATA_DIR = Path("data")
OUTPUTS_DIR = Path("outputs")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
