"""The whole pipeline on FER2013 under a preset, stage by stage (a script, not a test).

    python bench/fer2013_pipeline.py --workdir /tmp/fer-cpu                     # all 32 k faces
    python bench/fer2013_pipeline.py --workdir /tmp/fer-try --fraction 0.1      # a tenth, same mix

Builds a project folder in ``--workdir`` (this project's params.yaml with ``presets/<--preset>``
applied, exactly what `facecal pipeline --preset` hands to `dvc exp run -S`), imports FER2013
(``--data``: Training + PublicTest; ``--fraction`` draws that share of every usage × class,
seeded) and runs every stage command from landmarks to export-cnn in a fresh process each,
recording wall time and peak RSS per stage (`paper_fer2013.run_stage`). Tracking is off, so the
registry stages are not run. A rerun with the same ``--workdir`` and settings resumes at the
first stage that had not finished (landmarks and train-gan also resume inside the stage from
their own checkpoints). Prints one line per stage and the regimes' accuracy on the test split,
and writes ``--json`` (default ``<workdir>/fer2013_pipeline.json``). The FER2013 pictures stay
in ``--workdir``; nothing is written into this project.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from facecal.config import read_params  # noqa: E402
from facecal.pipeline import with_preset  # noqa: E402
from facecal.stages import STAGE_COMMANDS  # noqa: E402
from paper_fer2013 import run_stage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "fer2013"
# dvc.yaml's stage commands in order, less the registry ones (tracking is off here).
STAGES = tuple(c for c in STAGE_COMMANDS if not c.startswith("register"))


def subset_source(data: Path, out: Path, fraction: float, seed: int) -> int:
    """A FER2013 folder layout (labels.csv + symlinks) with `fraction` of every usage × class."""
    with open(data / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["usage"], r["emotion"]), []).append(r)
    keep = []
    for key in sorted(groups):
        g = groups[key]
        take = sorted(rng.choice(len(g), max(1, round(fraction * len(g))), replace=False))
        keep += [g[i] for i in take]
    out.mkdir(parents=True)
    for r in keep:
        (out / r["file"]).parent.mkdir(parents=True, exist_ok=True)
        (out / r["file"]).symlink_to((data / r["file"]).resolve())
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    return len(keep)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--preset", default="fer2013-cpu")
    p.add_argument("--fraction", type=float, default=1.0, help="share of every usage × class")
    p.add_argument("--seed", type=int, default=0, help="the --fraction draw")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if not (args.data / "labels.csv").is_file():
        print(f"{args.data}: no FER2013 folder (labels.csv) here", file=sys.stderr)
        return 2
    project = args.workdir / "project"
    facecal = str(Path(sys.executable).parent / "facecal")
    out_json = args.json or args.workdir / "fer2013_pipeline.json"
    settings = {"preset": args.preset, "fraction": args.fraction, "seed": args.seed}
    params = with_preset(read_params(ROOT / "params.yaml"), args.preset, ROOT)
    done: dict = {}
    if out_json.is_file():
        prev = json.loads(out_json.read_text())
        if prev.get("settings") == settings and prev.get("params") == params:
            done = prev
            print(f"resuming: {', '.join(done['stages'])} already done", file=sys.stderr)
    if not done:
        if args.workdir.exists():
            shutil.rmtree(args.workdir)
        project.mkdir(parents=True)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        source = args.data
        if args.fraction < 1:
            source = args.workdir / "fer2013-subset"
            subset_source(args.data, source, args.fraction, args.seed)
        t = time.perf_counter()
        with open(project / "run.log", "a") as log:
            subprocess.run(
                [facecal, "data", "import", "fer2013",
                 str(source), "--out", "data", "--quiet"],
                cwd=project, check=True, stdout=log, stderr=log,
                env=dict(os.environ, FACECAL_TRACKING="off"),
            )  # fmt: skip
        done = {
            "settings": settings,
            "params": params,
            "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
            "stages": {"import": {"seconds": round(time.perf_counter() - t, 1)}},
        }
        out_json.write_text(json.dumps(done, indent=2) + "\n")
    for stage in STAGES:
        if stage in done["stages"]:
            continue
        print(f"{stage} …", file=sys.stderr, flush=True)
        with open(project / "run.log", "a") as log:
            done["stages"][stage] = run_stage([facecal, stage], project, log)
        print(f"{stage}: {done['stages'][stage]}", file=sys.stderr, flush=True)
        out_json.write_text(json.dumps(done, indent=2) + "\n")
    ev = json.loads((project / "metrics/eval.json").read_text())
    lm = json.loads((project / "metrics/landmarks.json").read_text())
    done["total_seconds"] = round(sum(s["seconds"] for s in done["stages"].values()), 1)
    done["coverage"] = lm.get("coverage")
    done["split"] = {s: v.get("ok") for s, v in lm.get("split", {}).items()}
    done["regimes"] = {
        r: {k: v.get(k) for k in ("accuracy", "accuracy_lo", "accuracy_hi", "n", "macro_f1")}
        for r, v in ev.get("regimes", {}).items()
    }
    done["psnr_argmax"] = {k: v for k, v in (ev.get("psnr_argmax") or {}).items() if k != "faces"}
    done["machine"]["loadavg_end"] = os.getloadavg()
    out_json.write_text(json.dumps(done, indent=2) + "\n")
    print(
        f"\nstages (wall s, peak RSS MB of the largest process, of all of them), total {done['total_seconds'] / 60:.1f} min:"
    )
    for stage, s in done["stages"].items():
        print(
            f"  {stage:11s} {s['seconds']:8.1f}  {s.get('peak_rss_mb', '')}  {s.get('peak_rss_total_mb', '')}"
        )
    for r, v in done["regimes"].items():
        if v.get("accuracy") is not None:
            print(
                f"  {r}: {v['accuracy']:.3f} [{v['accuracy_lo']:.3f}, {v['accuracy_hi']:.3f}] "
                f"(n={v['n']})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
