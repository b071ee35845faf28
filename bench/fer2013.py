"""Benchmark and measurement on FER2013 (a script, not a test; the data never leaves ../shared).

    python bench/fer2013.py crop                 # the crop-box policy's quality, padding grid
    python bench/fer2013.py stage                # import + landmarks stage: wall time, peak RSS
    python bench/fer2013.py stage --usage Training,PublicTest --workers 2   # all 32 k faces

`crop`: on FER2013 PublicTest (``--folder``), dlib (HOG, upsample 1) is run once per image;
on the crops it detects, the crop-box policy (`landmarks.fit_crop`) is scored against dlib's
points (inter-ocular NME) for each padding of a grid and each number of refits; on tight
synthetic crops (`landmarks.face_crop` of `data synth` faces, several framings) both dlib's
points and the policy's are scored against the ground truth. Prints one line per setting and
the best padding (lowest mean NME vs dlib).

`stage`: `facecal data import fer2013` of ``--src`` (default ../shared/data/fer2013) into a
temp folder, then the `landmarks` stage (`run_landmarks`, overlays off, tracking off) in a
child process; prints wall time and peak RSS (the child's ru_maxrss, workers included) of each,
the coverage and the crop-box counts from metrics/landmarks.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("FACECAL_TRACKING", "off")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from facecal import face_points as fp  # noqa: E402
from facecal import landmarks as lm  # noqa: E402
from facecal.detector import LandmarkDetector  # noqa: E402
from facecal.geometry import nme  # noqa: E402
from facecal.imageio import load_image  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013"
SIDES = (-0.02, -0.04, -0.06)
TOPS = (-0.03, -0.06, -0.09, -0.12, -0.15)
BOTTOMS = (0.0, -0.02, -0.04)
FRAMINGS = ((-0.1, 0.0), (0.0, 0.0), (0.0, 0.1), (0.2, 0.1))  # face_crop (margin, lift)


def _stats(e: list[float]) -> str:
    a = np.asarray(e)
    return f"mean {a.mean():.4f} median {np.median(a):.4f} p90 {np.percentile(a, 90):.4f}"


def crop(args: argparse.Namespace) -> dict:
    det = LandmarkDetector(upsample=1)
    files = sorted(Path(args.folder).rglob("*.jpg"))
    if args.limit:
        files = files[:: max(1, len(files) // args.limit)][: args.limit]
    imgs, ref = [], []
    for f in files:
        img = load_image(f, mode="L")
        faces = det.detect(img)
        if len(faces) == 1:
            imgs.append(img)
            ref.append(faces[0].points)
    print(f"FER2013 {args.folder}: dlib finds one face in {len(imgs)}/{len(files)} crops")
    out: dict = {"n": len(files), "n_detected": len(imgs), "fer": {}, "synthetic": {}}
    best = None
    for refine in args.refine:
        for side, top, bottom in itertools.product(args.sides, args.tops, args.bottoms):
            pad = (side, top, side, bottom)
            e = [float(nme(fp.fit_crop(det, im, pad, refine)[1], r)) for im, r in zip(imgs, ref)]
            key = f"refine={refine} padding={list(pad)}"
            out["fer"][key] = float(np.mean(e))
            print(f"  {key}: NME vs dlib {_stats(e)}", flush=True)
            if best is None or np.mean(e) < best[0]:
                best = (float(np.mean(e)), refine, pad)
    assert best is not None
    print(f"best: refine {best[1]}, padding {list(best[2])}, mean NME vs dlib {best[0]:.4f}")
    out["best"] = {"refine": best[1], "padding": list(best[2]), "nme_vs_dlib": best[0]}

    from facecal.data.synth import SynthConfig, render_face

    cfg = SynthConfig(subjects=args.subjects)
    faces0 = [
        render_face(cfg, s, e, 1.0)
        for s in range(args.subjects)
        for e in ("neutral", "happy", "surprise", "anger", "sad", "fear", "disgust")
    ]
    for margin, lift in FRAMINGS:
        crops = [lm.face_crop(img, pts, 48, margin, lift) for img, pts in faces0]
        found, e_dlib, e_pol, e_pol_missed = 0, [], [], []
        for c, truth in crops:
            pol = float(nme(fp.fit_crop(det, c, best[2], best[1])[1], truth))
            e_pol.append(pol)
            faces = det.detect(c)
            if faces:
                found += 1
                e_dlib.append(float(nme(faces[0].points, truth)))
            else:
                e_pol_missed.append(pol)
        key = f"margin={margin} lift={lift}"
        out["synthetic"][key] = {
            "detection_rate": found / len(crops),
            "dlib": float(np.mean(e_dlib)) if e_dlib else None,
            "crop_box": float(np.mean(e_pol)),
            "crop_box_where_dlib_missed": float(np.mean(e_pol_missed)) if e_pol_missed else None,
        }
        print(f"  synthetic {key}: {out['synthetic'][key]}", flush=True)
    return out


def stage(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-fer2013-"))
    data = tmp / "data"
    usage = ["--usage", args.usage] if args.usage else []
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "facecal", "data", "import", "fer2013", str(args.src),
         "--out", str(data), "--quiet", *usage],
        check=True,
    )  # fmt: skip
    t_import = time.perf_counter() - t0
    rss_import = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    code = (
        "import sys; from pathlib import Path; from facecal import landmarks as lm; "
        "p = lm.LandmarksParams(workers=int(sys.argv[2]), overlays=0); "
        "d = Path(sys.argv[1]); "
        "lm.run_landmarks(p, d / 'data', d / 'out', d / 'landmarks.json', d / 'plots', "
        "progress=True)"
    )
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp), str(args.workers)])
    # ru_maxrss of the waited-for child tree; the pool's workers are its children.
    _, status, usage_info = os.wait4(child.pid, 0)
    t_stage = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"landmarks stage failed (status {status})")
    metrics = json.loads((tmp / "landmarks.json").read_text())
    out = {
        "rows": metrics["n_rows"],
        "import_s": round(t_import, 1),
        "import_peak_rss_mb": round(rss_import),
        "landmarks_s": round(t_stage, 1),
        "landmarks_peak_rss_mb": round(usage_info.ru_maxrss / 1024),
        "coverage": metrics["coverage"],
        "n_dlib": metrics["n_dlib"],
        "n_crop_fallback": metrics["n_crop_fallback"],
        "crop_vs_dlib_nme": metrics["crop_vs_dlib_nme"],
        "status": metrics["status"],
    }
    print(json.dumps(out, indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(tmp)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("crop", help="crop-box policy: padding grid, NME vs dlib and truth")
    c.add_argument("--folder", type=Path, default=SHARED / "publictest")
    c.add_argument("--limit", type=int, default=0, help="use every k-th image, about this many")
    c.add_argument("--refine", type=int, nargs="+", default=[0, 2])
    c.add_argument("--subjects", type=int, default=10)
    c.add_argument("--sides", type=float, nargs="+", default=SIDES, help="left = right padding")
    c.add_argument("--tops", type=float, nargs="+", default=TOPS)
    c.add_argument("--bottoms", type=float, nargs="+", default=BOTTOMS)
    s = sub.add_parser("stage", help="import + landmarks stage: wall time and peak RSS")
    s.add_argument("--src", type=Path, default=SHARED)
    s.add_argument("--usage", default="PublicTest", help="FER2013 usages to import")
    s.add_argument("--workers", type=int, default=0)
    s.add_argument("--keep", action="store_true", help="keep the temp folder")
    for p in (c, s):
        p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if not (SHARED / "labels.csv").is_file() and args.what == "stage" and args.src == SHARED:
        raise SystemExit(f"FER2013 not found at {SHARED}")
    result = crop(args) if args.what == "crop" else stage(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
