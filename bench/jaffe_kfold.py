"""JAFFE, leave one subject out: the real-face regimes from scratch and fine-tuned (a script).

    python bench/jaffe_kfold.py --workdir /tmp/jaffe --init ~/fer2013.pt --init-convs 3

Imports JAFFE (``--data``, default ../shared/data/jaffe) into ``--workdir``, runs the
`landmarks` and `calibrate` stages there (this project's params.yaml), then the k-fold protocol
of `facecal evaluate` (`facecal.crossval.run_kfold`: every subject tested once, fold f+1 as
early-stopping faces, the rest training) for the real regimes with three networks:

* ``compact`` — train_cnn's default CNN from scratch (RGB 64²);
* ``vgg`` — the FER2013 recognizer's network (`cnn.arch: vgg`) from scratch;
* ``vgg+init`` — the same initialised from ``--init`` (a recognizer trained on FER2013's
  Training usage by bench/fer2013_recognizer.py --model-out) and fine-tuned (`cnn.init`).

Each over ``--seeds`` seeds (the fold deal and every training draw from it): pooled accuracy
with a Wilson interval per seed, and mean ± sd over seeds. Nothing is written into the
project; JAFFE stays in ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("FACECAL_TRACKING", "off")

from facecal import tables  # noqa: E402
from facecal.config import load_section  # noqa: E402
from facecal.crossval import run_kfold  # noqa: E402
from facecal.manifest import Report  # noqa: E402
from facecal.recognition.fit import CnnParams  # noqa: E402
from facecal.selection import weak_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "jaffe"


def prepare(args) -> Path:
    """JAFFE imported, landmarked and calibrated in ``--workdir`` (reused when already there)."""
    w = args.workdir
    if (w / "outputs/calibrate/calibrated.parquet").is_file():
        return w
    w.mkdir(parents=True, exist_ok=True)
    (w / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = dict(os.environ, FACECAL_ROOT=str(w), FACECAL_TRACKING="off", DVC_NO_ANALYTICS="1")
    facecal = str(Path(sys.executable).parent / "facecal")
    for cmd in (
        [facecal, "data", "import", "jaffe", str(args.data), "--out", "data", "--quiet"],
        [facecal, "landmarks"],
        [facecal, "calibrate"],
    ):
        subprocess.run(cmd, cwd=w, env=env, check=True, stdout=subprocess.DEVNULL)
    return w


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--init", type=Path, default=None, help="FER2013 recognizer to fine-tune")
    p.add_argument("--init-widths", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--init-convs", type=int, default=2)
    p.add_argument("--folds", type=int, default=0, help="0 = leave one subject out")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument(
        "--first-seed", type=int, default=0, help="seeds first-seed … first-seed+seeds−1"
    )
    p.add_argument("--regimes", nargs="+", default=["real_all"])
    p.add_argument("--nets", nargs="+", default=["compact", "vgg", "vgg+init"])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if not (args.data / "labels.csv").is_file():
        print(f"{args.data}: no JAFFE folder (labels.csv) here", file=sys.stderr)
        return 2
    w = prepare(args)
    table = tables.read_table(w / "outputs/landmarks/landmarks.parquet")
    weak = weak_images(tables.read_table(w / "outputs/calibrate/calibrated.parquet"))
    base = load_section(CnnParams, "cnn", w / "params.yaml")
    classes = ["neutral", "anger", "disgust", "fear", "happy", "sad", "surprise"]
    vgg = {"arch": "vgg", "vgg_widths": args.init_widths, "vgg_convs": args.init_convs}
    nets = {"compact": {}, "vgg": vgg}
    if args.init:
        nets["vgg+init"] = {**vgg, "init": str(args.init)}
    out: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "results": {}}
    for name, over in [(n, nets[n]) for n in args.nets if n in nets]:
        cnn = CnnParams(**{**base.__dict__, **over, "seeds": 1})
        for regime in args.regimes:
            accs, runs = [], []
            t = time.perf_counter()
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                r = run_kfold(
                    table,
                    weak,
                    classes,
                    w / "data",
                    64,
                    cnn,
                    args.folds,
                    seed,
                    0.95,
                    [regime],
                    Report(),
                )["regimes"][regime]
                accs.append(r["accuracy"])
                runs.append(
                    {k: r[k] for k in ("accuracy", "accuracy_lo", "accuracy_hi", "n", "macro_f1")}
                )
            d = {
                "mean": float(np.mean(accs)),
                "sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                "seeds": runs,
                "seconds": round(time.perf_counter() - t, 1),
            }
            out["results"][f"{name}/{regime}"] = d
            cis = ", ".join(
                f"{x['accuracy']:.3f} [{x['accuracy_lo']:.3f}, {x['accuracy_hi']:.3f}]"
                for x in runs
            )
            print(
                f"{name:9s} {regime:9s} mean {d['mean']:.3f} ± {d['sd']:.3f}  ({cis})  n={runs[0]['n']}  {d['seconds']} s",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
