"""Time the tail of the pipeline — `facecal generate`, `train-cnn`, `evaluate` — on a project
whose earlier stages have run (data/, outputs/landmarks, outputs/calibrate, outputs/gan).

    python bench/tail.py                      # in the project root, after `dvc repro train_gan`
    python bench/tail.py --project /tmp/proj --stages train-cnn

Each stage runs as the CLI does (tracking off), into a scratch copy of its outputs
(``--scratch``, default a temporary folder), so the project's own outputs are not touched. Prints
wall-clock and CPU seconds per stage (CPU time of the stage and its worker processes) and the
headline numbers: train-cnn's per-regime val accuracy, evaluate's real_all test accuracy.

Wall-clock figures on a machine shared with other jobs are inflated by their load; CPU seconds
much less so. The target on 2 idle cores: all five CNN regimes of the synthetic default
(~1160 faces) in 2–3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], cwd: Path) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    env = dict(os.environ, FACECAL_TRACKING="off")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, default=Path("."))
    ap.add_argument("--scratch", type=Path, default=None)
    ap.add_argument(
        "--stages",
        nargs="+",
        default=["generate", "train-cnn", "evaluate"],
        choices=["generate", "train-cnn", "evaluate"],
    )
    args = ap.parse_args()
    root = args.project.resolve()
    scratch = (args.scratch or Path(tempfile.mkdtemp(prefix="facecal-tail-"))).resolve()
    gen = root / "outputs/generate" if "generate" not in args.stages else scratch / "generate"
    cnn = root / "outputs/cnn" if "train-cnn" not in args.stages else scratch / "cnn"
    commands = {
        "generate": [
            "facecal",
            "generate",
            "--out",
            str(scratch / "generate"),
            "--plots",
            str(scratch / "plots/generate"),
        ],
        "train-cnn": [
            "facecal",
            "train-cnn",
            "--generated",
            str(gen),
            "--out",
            str(scratch / "cnn"),
            "--plots",
            str(scratch / "plots/cnn"),
            "--metrics",
            str(scratch / "cnn.json"),
        ],
        "evaluate": [
            "facecal",
            "evaluate",
            "--generated",
            str(gen),
            "--cnn",
            str(cnn),
            "--metrics",
            str(scratch / "eval.json"),
            "--report",
            str(scratch / "report.md"),
            "--plots",
            str(scratch / "plots/evaluate"),
        ],
    }
    print(
        f"project {root}, scratch {scratch}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    for stage in args.stages:
        wall, cpu = run(commands[stage], root)
        line = f"{stage:10s} wall {wall:7.1f} s   cpu {cpu:7.1f} s"
        if stage == "train-cnn":
            m = json.loads((scratch / "cnn.json").read_text())
            line += "   val accuracy " + ", ".join(
                f"{r} {v['val_accuracy']:.3f}" for r, v in m.items() if isinstance(v, dict)
            )
        if stage == "evaluate":
            m = json.loads((scratch / "eval.json").read_text())
            ra = m["regimes"].get("real_all", {})
            line += (
                f"   real_all test accuracy {ra.get('accuracy', float('nan')):.3f} "
                f"({ra.get('correct')}/{ra.get('n')})"
            )
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
