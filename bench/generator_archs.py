"""Generator architectures compared over seeds on one workspace (a script, not a test).

    python bench/generator_archs.py --workdir /tmp/fc_final --seeds 0 1 --json archs.json
    python bench/generator_archs.py --workdir /tmp/jaffe_gan --jaffe ../shared/data/jaffe
    python bench/generator_archs.py --workdir W --archs warp_refine \
        --variant weaker:gan.arch=warp_refine,pairs.weaker_references=true   # a params variant

``--workdir`` is a facecal workspace (its own params.yaml and data/); with ``--jaffe`` it is
first filled with JAFFE and run up to `train_cnn` (the judge of `evaluate` is that run's
``real_all`` CNN, trained on real faces only, so it is the same for every generator compared).
Then, for every ``--archs`` (and ``--variant NAME:key=value,…``: any dotted params, values read
as YAML) × ``--seeds``, the workspace's params.yaml gets ``gan.arch`` (or the variant's
settings) and ``base.seed``, and `pairs`, `train_gan`, `generate` and `evaluate` run in it; each run's
metrics/eval.json, metrics/gan.json and sweep are kept under ``WORKDIR/archs/<arch>_s<seed>``
(a finished run is not run again: delete its folder to redo it). The table: per set
(calibrated = the generator, warp_calibrated = pure warp, copy_reference, real_weak) SSIM, PSNR,
L1 to the subject's own apex, Fréchet distance in the judge's feature space, dlib NME to the
target points and the judge's accuracy, each as mean ± sd over seeds, plus the paired SSIM
differences (generator − warp, generator − copy) per seed with their intervals.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SETS = ("calibrated", "uncalibrated", "warp_calibrated", "copy_reference", "real_weak")
QUALITY = ("ssim", "psnr", "l1", "fd", "judge_accuracy")


def _env(workdir: Path) -> dict[str, str]:
    return dict(
        os.environ,
        FACECAL_ROOT=str(workdir),
        FACECAL_TRACKING="off",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
    )


def _facecal(workdir: Path, *args: str) -> None:
    exe = str(Path(sys.executable).parent / "facecal")
    subprocess.run([exe, *args], cwd=workdir, env=_env(workdir), check=True)


def prepare_jaffe(workdir: Path, data: Path) -> None:
    """JAFFE imported and run up to train_cnn in `workdir` (kept when already there)."""
    if (workdir / "outputs/cnn").is_dir():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "params.yaml").is_file():
        shutil.copy(ROOT / "params.yaml", workdir / "params.yaml")
    if not (workdir / "data").is_dir():
        _facecal(workdir, "data", "import", "jaffe", str(data), "--out", "data", "--quiet")
    for stage in ("landmarks", "calibrate", "pairs", "train-gan", "generate", "train-cnn"):
        _facecal(workdir, stage)


def set_params(path: Path, original: str, settings: dict[str, object], seed: int) -> None:
    """params.yaml = the workspace's own (`original`) + `settings` + the seed: a variant's
    settings never leak into the next run."""
    params = yaml.safe_load(original)
    for key, value in {**settings, "base.seed": seed}.items():
        *parents, leaf = key.split(".")
        node = params
        for k in parents:
            node = node[k]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """``NAME:key=value,key=value`` → (NAME, {key: YAML value})."""
    name, _, body = text.partition(":")
    settings = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        settings[key.strip()] = yaml.safe_load(value)
    if not name or not settings:
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value[,key=value…]")
    return name, settings


def run_one(
    workdir: Path, original: str, settings: dict[str, object], seed: int, out: Path
) -> dict:
    if (out / "eval.json").is_file():
        return json.loads((out / "eval.json").read_text())
    set_params(workdir / "params.yaml", original, settings, seed)
    _facecal(workdir, "pairs")  # a variant may change them; quick either way
    t0 = time.perf_counter()
    _facecal(workdir, "train-gan")
    t_gan = time.perf_counter() - t0
    _facecal(workdir, "generate")
    _facecal(workdir, "evaluate")
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(workdir / "metrics/gan.json", tmp / "gan.json")
    shutil.copy(workdir / "plots/generate/sweep.png", tmp / "sweep.png")
    ev = json.loads((workdir / "metrics/eval.json").read_text())
    ev["bench_train_gan_seconds"] = t_gan
    ev["bench_settings"] = settings
    (tmp / "eval.json").write_text(json.dumps(ev, indent=1))
    tmp.replace(out)
    return ev


def summarise(runs: dict[tuple[str, int], dict]) -> dict:
    archs = sorted({a for a, _ in runs})
    table: dict = {}
    for arch in archs:
        evs = [ev for (a, _), ev in sorted(runs.items()) if a == arch]
        row: dict = {"seeds": len(evs)}
        for name in SETS:
            for key in QUALITY:
                v = [ev["quality"][name].get(key) for ev in evs]
                v = [x for x in v if x is not None]
                if v:
                    row[f"{name}.{key}"] = [
                        float(np.mean(v)),
                        float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                    ]
            nme = [ev.get("landmarks", {}).get(name, {}).get("nme") for ev in evs]
            nme = [x for x in nme if x is not None]
            if nme:
                row[f"{name}.nme"] = [
                    float(np.mean(nme)),
                    float(np.std(nme, ddof=1)) if len(nme) > 1 else 0.0,
                ]
        for b in ("warp_calibrated", "copy_reference", "uncalibrated"):
            key = f"ssim_calibrated_minus_{b}"
            row[key] = [[ev[key]["diff"], ev[key]["lo"], ev[key]["hi"]] for ev in evs if key in ev]
        row["train_gan_seconds"] = [ev.get("bench_train_gan_seconds") for ev in evs]
        table[arch] = row
    return table


def print_table(table: dict) -> None:
    def ms(v):
        return f"{v[0]:.3f} ± {v[1]:.3f}" if v else "—"

    for arch, row in table.items():
        print(f"\n## {arch} ({row['seeds']} seeds)")
        print("| set | SSIM | PSNR | L1 | FD | judge | dlib NME |")
        print("|---|---|---|---|---|---|---|")
        for name in SETS:
            cells = [ms(row.get(f"{name}.{k}")) for k in (*QUALITY, "nme")]
            print(f"| {name} | " + " | ".join(cells) + " |")
        for b in ("warp_calibrated", "copy_reference", "uncalibrated"):
            per = row[f"ssim_calibrated_minus_{b}"]
            print(
                f"SSIM generator − {b}, per seed: "
                + ", ".join(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in per)
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--jaffe", type=Path, default=None, help="fill the workdir with JAFFE first")
    p.add_argument("--archs", nargs="+", default=["pix2pix", "warp_refine"])
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,… (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    w = a.workdir.resolve()
    if a.jaffe is not None:
        if not (a.jaffe / "labels.csv").is_file():
            print(f"{a.jaffe}: no JAFFE folder (labels.csv) here", file=sys.stderr)
            return 2
        prepare_jaffe(w, a.jaffe.resolve())
    if not (w / "outputs/pairs/train/points.npz").is_file():  # pairs of older code
        _facecal(w, "pairs")
    original = (w / "params.yaml").read_text()
    runs = {}
    variants = [(arch, {"gan.arch": arch}) for arch in a.archs]
    variants += [parse_variant(v) for v in a.variant]
    try:
        for seed in a.seeds:
            for name, settings in variants:
                runs[(name, seed)] = run_one(
                    w, original, settings, seed, w / "archs" / f"{name}_s{seed}"
                )
    finally:
        (w / "params.yaml").write_text(original)
    table = summarise(runs)
    print_table(table)
    if a.json:
        a.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
