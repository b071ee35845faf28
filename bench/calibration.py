"""Every calibration method on real neutral→apex pairs of held-out subjects: one table.

For each method (upstream quadratic, aligned quadratic, pca, learned) the `calibrate` stage runs
on a landmark table; the table is `metrics/calibrate.json`'s ``neutral_apex`` figure of the
held-out (val + test) subjects: every neutral face calibrated toward emotion E, mean NME to the
same person's most intense face of E, after / before (< 1 = closer to the apex). Cells are
"ratio (n)"; n = neutral→apex pairs. The gold templates and models use train subjects only.

Landmark tables come from the stages themselves, in a scratch folder:

    facecal data synth --out /tmp/cal/synth
    facecal data import jaffe ../shared/data/jaffe --out /tmp/cal/jaffe
    facecal landmarks --data /tmp/cal/synth --out /tmp/cal/synth-lm \\
        --metrics /tmp/cal/synth-lm/m.json --plots /tmp/cal/synth-lm/plots   # same for jaffe
    python bench/calibration.py /tmp/cal/synth-lm/landmarks.parquet
    python bench/calibration.py /tmp/cal/synth-lm/landmarks.parquet --points truth
    python bench/calibration.py /tmp/cal/jaffe-lm/landmarks.parquet

``--points truth`` evaluates on the ground-truth landmarks a synthetic table carries (exact
expression geometry, no detector noise) instead of the dlib points the pipeline uses.
``--seeds 0 1 2 3 4`` re-draws the subject split (`landmarks.assign_splits`, the stage's own
fractions) under each seed and reports every cell as mean ± sd over the seeds: with a few
held-out subjects, one split is not enough to rank methods that are close.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("FACECAL_TRACKING", "off")  # a benchmark leaves no MLflow runs behind

import numpy as np  # noqa: E402

from facecal import calibrate as stage  # noqa: E402
from facecal import config  # noqa: E402
from facecal import landmarks as lm  # noqa: E402
from facecal.emotions import EMOTIONS, NEUTRAL  # noqa: E402
from facecal.tables import read_table, write_table  # noqa: E402

METHODS = {
    "upstream quadratic": {"mode": "upstream", "method": "quadratic"},
    "aligned quadratic": {"mode": "aligned", "method": "quadratic"},
    "pca": {"mode": "aligned", "method": "pca"},
    "learned": {"mode": "aligned", "method": "learned"},
}


def run_methods(table: Path, params_file: Path | None, work: Path) -> dict[str, dict[str, Any]]:
    base = config.read_params(params_file).get(stage.SECTION) or {}
    emotions = stage.base_emotions(params_file)
    out = {}
    for name, overrides in METHODS.items():
        params = config.from_dict(
            stage.CalibrationParams, {**base, **overrides, "overlays": 0}, stage.SECTION
        )
        d = work / name.replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        out[name] = stage.run_calibrate(
            params, table, work, d, d / "metrics.json", d / "plots", emotions=emotions
        )
    return out


def _ratio(m: dict[str, Any], emotion: str | None, split: str) -> tuple[float, int] | None:
    if emotion is None:
        r = m["neutral_apex"][split]
    else:
        r = m["per_emotion"].get(emotion, {}).get("neutral_apex", {}).get(split)
    if not r or not r["n"] or r.get("ratio") is None:
        return None
    return float(r["ratio"]), int(r["n"])


def _cell(values: list[tuple[float, int] | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "–"
    ratios = np.array([r for r, _ in got])
    n = int(np.mean([k for _, k in got]).round())
    if len(got) == 1:
        return f"{ratios[0]:.2f} ({n})"
    return f"{ratios.mean():.2f} ± {ratios.std(ddof=1):.2f} ({n})"


def table_markdown(runs: list[dict[str, dict[str, Any]]], split: str = "heldout") -> str:
    """Rows = methods, columns = emotions and overall; cells over `runs` (one per seed)."""
    methods = list(runs[0])
    emotions = [
        e
        for e in EMOTIONS
        if e != NEUTRAL and any(_ratio(r[m], e, split) for r in runs for m in methods)
    ]
    lines = [
        "| method | " + " | ".join(emotions) + " | overall |",
        "|---|" + "---|" * (len(emotions) + 1),
    ]
    for name in methods:
        cells = [_cell([_ratio(r[name], e, split) for r in runs]) for e in emotions + [None]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    before = [r[methods[0]]["neutral_apex"][split]["before"] for r in runs]
    lines.append(f"\nNME before (neutral vs own apex, overall): {np.mean(before):.4f}")
    return "\n".join(lines)


def resplit(table: Path, seed: int, params_file: Path | None, out: Path) -> Path:
    """The table with its subject split re-drawn under `seed` (the landmarks stage's rule)."""
    section = config.read_params(params_file).get("landmarks") or {}
    df = read_table(table)
    splits = lm.assign_splits(
        df["subject"].astype(str),
        seed,
        float(section.get("val_fraction", 0.15)),
        float(section.get("test_fraction", 0.2)),
    )
    df["split"] = df["subject"].astype(str).map(splits)
    write_table(df, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", type=Path, help="landmark table (landmarks.parquet)")
    ap.add_argument(
        "--points",
        choices=("pipeline", "truth"),
        default="pipeline",
        help="the table's points (dlib, as the pipeline) or its ground truth (synthetic)",
    )
    ap.add_argument("--params", type=Path, default=None, help="params file (default params.yaml)")
    ap.add_argument("--split", choices=("heldout", "train"), default="heldout")
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="re-draw the subject split under each seed (default: the table's own split)",
    )
    args = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-calibration-") as tmp:
        work = Path(tmp)
        table = args.table
        if args.points == "truth":
            df = read_table(table)
            df = df[df["gt_points"].notna()].copy()
            if df.empty:
                print(f"{table}: no ground-truth points", file=sys.stderr)
                return 2
            df["points"], df["status"] = df["gt_points"], "ok"
            table = work / "truth.parquet"
            write_table(df, table)
        for seed in args.seeds if args.seeds is not None else [None]:
            t = (
                table
                if seed is None
                else resplit(table, seed, args.params, work / f"s{seed}.parquet")
            )
            runs.append(run_methods(t, args.params, work / f"run{seed}"))
    seeds = "the table's split" if args.seeds is None else f"splits of seeds {args.seeds}"
    print(
        f"\n{args.table} ({args.points} points, {seeds}), {args.split} subjects, "
        "neutral→apex NME after/before:\n"
    )
    print(table_markdown(runs, args.split))
    if len(runs) > 1:  # paired by split: the same held-out subjects for every method
        for name in runs[0]:
            per_run = [_ratio(r[name], None, args.split) for r in runs]
            print(
                f"{name}, overall per split: "
                + " ".join(f"{v[0]:.3f}" if v else "–" for v in per_run)
            )
    for i, run in enumerate(runs):
        m = run.get("learned", {})
        chosen = ", ".join(
            f"{e} r{v['rank']}" + (f"/λ{v['ridge']:g}" if v["rank"] else "")
            for e, v in m.get("learned", {}).items()
        )
        print(f"learned, run {i}: rank/ridge chosen by subject CV: {chosen}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
