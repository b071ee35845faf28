"""Benchmark: landmark extraction and calibration throughput (a script, not a test).

    python bench/landmarks.py                      # renders a synthetic set into a temp folder
    python bench/landmarks.py --images DIR         # any folder of images (e.g. JAFFE's images/)
    python bench/landmarks.py --images DIR --json bench.json

Landmarks, faces per second:
  (a) the original way: a new Python process per image that loads dlib's model and prints the
      points (a minimal re-creation of facial_landmarks.py, so the baseline is as fast as that
      approach can be), measured on `--original-n` images;
  (b) a bare in-process loop: one LandmarkDetector, decode + detect each image (model load
      included, as the stage includes it);
  (c) the `landmarks` stage (`run_landmarks`: manifest, pool, table, report; no overlays, no
      tracking) with 1 worker and with every core.
Targets: (c, all) ≥ 50× (a); (c, 1 worker) within 10 % of (b); near-linear in workers.

Calibration, faces per second: one batched call over N faces vs a Python loop calling the same
function per face (target ≥ 20×), for the aligned quadratic warp (the library default), the
upstream warp and the pca move.

Timings are wall-clock; run on an otherwise idle machine for figures worth quoting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("FACECAL_TRACKING", "off")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from facecal import calibration as cal  # noqa: E402
from facecal import face_points as fp  # noqa: E402
from facecal import landmarks as lm  # noqa: E402
from facecal.detector import LandmarkDetector, predictor_path  # noqa: E402
from facecal.geometry import to_canonical  # noqa: E402
from facecal.imageio import load_image  # noqa: E402
from facecal.manifest import Row, write_manifest  # noqa: E402
from facecal.tables import points_array, read_table  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm"}

# The original script, minus argument parsing: load the model, detect, print 68 lines.
ORIGINAL = """
import sys, dlib, numpy as np
from PIL import Image
detector = dlib.get_frontal_face_detector()
predictor = dlib.shape_predictor(sys.argv[1])
gray = np.asarray(Image.open(sys.argv[2]).convert("L"))
for rect in detector(gray, 1):
    shape = predictor(gray, rect)
    print("\\n".join(f"{p.x} {p.y}" for p in shape.parts()))
"""


def list_images(folder: Path, limit: int | None) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return files[:limit] if limit else files


def default_images(tmp: Path, subjects: int) -> Path:
    from facecal.data.synth import SynthConfig, render_dataset

    out = tmp / "synth"
    print(f"rendering a synthetic set ({subjects} subjects) into {out} …", file=sys.stderr)
    render_dataset(out, SynthConfig(subjects=subjects), progress=False)
    return out / "images"


def bench_original(images: list[Path]) -> float:
    model = str(predictor_path())
    t = time.perf_counter()
    for img in images:
        subprocess.run(
            [sys.executable, "-c", ORIGINAL, model, str(img)], check=True, capture_output=True
        )
    return len(images) / (time.perf_counter() - t)


def bench_bare(images: list[Path]) -> tuple[float, float]:
    t = time.perf_counter()
    det = LandmarkDetector(upsample=1)
    load_s = time.perf_counter() - t
    for img in images:
        det.detect(load_image(img, mode="L"))
    return len(images) / (time.perf_counter() - t), load_s


def stage_dataset(tmp: Path, folder: Path, images: list[Path]) -> Path:
    data = tmp / "data"
    data.mkdir()
    os.symlink(folder.resolve(), data / "images")
    rows = [
        Row(f"images/{p.relative_to(folder).as_posix()}", f"s{i % 50:02d}", "neutral")
        for i, p in enumerate(images)
    ]
    write_manifest(data, rows)
    return data


def bench_stage(data: Path, tmp: Path, workers: int, n: int) -> tuple[float, Path]:
    out = tmp / f"out{workers}"
    params = lm.LandmarksParams(workers=workers, overlays=0)
    t = time.perf_counter()
    lm.run_landmarks(
        params, data, out, tmp / f"m{workers}.json", tmp / f"plots{workers}", seed=0, progress=False
    )
    return n / (time.perf_counter() - t), out / lm.TABLE


def _rate(fn, n_faces: int, repeat: int = 3) -> float:
    best = min(_timed(fn) for _ in range(repeat))
    return n_faces / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_calibration(points: np.ndarray, n: int, loop_n: int) -> dict[str, dict[str, float]]:
    batch = np.concatenate([points] * -(-n // len(points)))[:n]
    gold = to_canonical(points)[0].mean(0)  # a gold template, canonical frame
    direction = np.zeros((68, 2))
    direction[48:68, 1] = 1.0 / np.sqrt(20)  # a unit mouth-opening direction
    model = cal.ExpressionModel(gold, {"happy": direction}, {"happy": 0.3})
    cases = {
        "aligned": lambda x: cal.calibrate(x, gold, "aligned"),
        "upstream": lambda x: cal.calibrate(x, points[0], "upstream"),
        "pca": lambda x: model.move("happy", x),
    }
    out = {}
    for name, fn in cases.items():
        batched = _rate(lambda: fn(batch), len(batch))
        one = batch[:loop_n]
        looped = _rate(lambda: [fn(p) for p in one], len(one))
        out[name] = {
            "batched_faces_per_s": batched,
            "loop_faces_per_s": looped,
            "speedup": batched / looped,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder of images (searched recursively); default: render a synthetic set",
    )
    ap.add_argument(
        "--subjects",
        type=int,
        default=8,
        help="synthetic subjects when no folder is given (29 images each)",
    )
    ap.add_argument("--limit", type=int, default=None, help="use at most this many images")
    ap.add_argument(
        "--original-n",
        type=int,
        default=8,
        help="images for the process-per-image baseline (slow: ~1 s each)",
    )
    ap.add_argument("--workers", type=int, default=0, help="'all' workers (0 = every core)")
    ap.add_argument("--calib-n", type=int, default=20000, help="faces in the batched calibration")
    ap.add_argument("--calib-loop-n", type=int, default=1000, help="faces in the per-face loop")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="facecal-bench-") as tmp_name:
        tmp = Path(tmp_name)
        folder = args.images or default_images(tmp, args.subjects)
        images = list_images(folder, args.limit)
        if not images:
            print(f"no images under {folder}", file=sys.stderr)
            return 2
        workers = fp.n_workers(args.workers, len(images))
        print(f"{len(images)} images from {folder}; all workers = {workers}", file=sys.stderr)
        data = stage_dataset(tmp, folder, images)

        a = bench_original(images[: args.original_n])
        b, load_s = bench_bare(images)
        c1, table = bench_stage(data, tmp, 1, len(images))
        cn, _ = bench_stage(data, tmp, workers, len(images)) if workers > 1 else (c1, table)
        df = read_table(table)
        ok = df[df["status"] == "ok"]
        calib = (
            bench_calibration(points_array(ok), args.calib_n, args.calib_loop_n) if len(ok) else {}
        )

    res = {
        "images": len(images),
        "workers": workers,
        "detected": int(len(ok)),
        "faces_per_s": {
            "a_original_process_per_image": a,
            "b_bare_loop": b,
            "c_stage_1_worker": c1,
            f"c_stage_{workers}_workers": cn,
        },
        "model_load_s": load_s,
        "ratios": {
            "c_all_over_a": cn / a,
            "c1_over_b": c1 / b,
            "c_all_over_c1": cn / c1,
            "parallel_efficiency": cn / c1 / workers,
        },
        "calibration": calib,
    }
    print(f"landmarks on {len(images)} images ({len(ok)} faces found), faces/s:")
    print(
        f"  (a) original, process per image  {a:8.2f}   (on {min(args.original_n, len(images))} images)"
    )
    print(f"  (b) bare in-process loop         {b:8.2f}   (model load {load_s:.2f} s included)")
    print(f"  (c) stage, 1 worker              {c1:8.2f}")
    print(f"  (c) stage, {workers} workers              {cn:8.2f}")
    print(f"  (c all)/(a) = {cn / a:6.1f}×   target ≥ 50×")
    print(f"  (c 1)/(b)   = {c1 / b:6.3f}    target ≥ 0.90")
    print(
        f"  (c all)/(c 1) = {cn / c1:5.2f} on {workers} workers "
        f"(efficiency {cn / c1 / workers:.0%}; target near-linear)"
    )
    for name, r in calib.items():
        print(
            f"calibration {name:8s}: batched {r['batched_faces_per_s']:10.0f} faces/s, "
            f"loop {r['loop_faces_per_s']:8.0f} faces/s → {r['speedup']:5.1f}×  target ≥ 20×"
        )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
