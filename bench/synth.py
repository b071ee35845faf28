"""Speed and quality of `facecal data synth`: render a set, then measure dlib on it.

Prints the render time (target: the default 1160 faces well under a minute on 2 cores), the
single-process cost per face, dlib's detection rate and NME against the exact truth, per
emotion, and where the error sits (per facial part). Run it on a quiet machine for timings.

    python bench/synth.py                          # default set (40 subjects), seed 0
    python bench/synth.py --seeds 0 1 2 --workers 2
    python bench/synth.py --subjects 10 --keep /tmp/synth   # keep the images to look at
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from facecal import geometry, manifest
from facecal.data import synth


def per_face_cost(config: synth.SynthConfig, n: int = 40) -> tuple[float, float]:
    """(pixels, points only) CPU seconds per face in this process."""
    emos = ("neutral",) + config.emotions
    t = time.process_time()
    for k in range(n):
        synth.render_face(config, k % 5, emos[k % len(emos)], 1.0)
    pixels = (time.process_time() - t) / n
    t = time.process_time()
    for k in range(n):
        synth.face_points(config, k % 5, emos[k % len(emos)], 1.0)
    return pixels, (time.process_time() - t) / n


def part_errors(data_dir: Path, every: int = 4) -> dict[str, float]:
    """Mean dlib error per facial part (inter-ocular units) on every `every`-th face."""
    from facecal.detector import LandmarkDetector
    from facecal.imageio import load_image

    det = LandmarkDetector(upsample=1)
    rows, _ = manifest.read_manifest(data_dir)
    errs = []
    for r in rows[::every]:
        truth = manifest.read_landmarks_file(data_dir / r.landmarks)
        faces = det.detect(load_image(data_dir / r.image))
        if faces:
            errs.append(
                np.linalg.norm(faces[0].points - truth, axis=1) / geometry.interocular(truth)
            )
    e = np.mean(errs, axis=0)
    return {name: float(e[list(idx)].mean()) for name, idx in geometry.PARTS.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=synth.SynthConfig.subjects)
    ap.add_argument("--size", type=int, default=synth.SynthConfig.size)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--workers", type=int, default=0, help="0 = one per CPU core")
    ap.add_argument(
        "--keep", type=Path, help="render into this folder (kept) instead of a temp one"
    )
    ap.add_argument("--parts", action="store_true", help="also print the error per facial part")
    args = ap.parse_args()

    for seed in args.seeds:
        config = synth.SynthConfig(subjects=args.subjects, size=args.size, seed=seed)
        pixels, points = per_face_cost(config)
        with tempfile.TemporaryDirectory() as tmp:
            out = (args.keep / f"seed{seed}") if args.keep else Path(tmp) / "synth"
            if out.exists():
                shutil.rmtree(out)
            t = time.perf_counter()
            rows = synth.render_dataset(out, config, workers=args.workers, progress=False)
            render_s = time.perf_counter() - t
            t = time.perf_counter()
            m = synth.measure_dlib(out, upsample=1, workers=args.workers)
            measure_s = time.perf_counter() - t
            print(
                f"seed {seed}: {len(rows)} faces {args.size}² rendered in {render_s:.1f} s "
                f"({pixels * 1e3:.1f} ms CPU per face, {points * 1e3:.2f} ms for points only); "
                f"dlib measured in {measure_s:.1f} s"
            )
            print(
                f"  detection {m['detection_rate']:.4f} ({m['n_detected']}/{m['n']}), "
                f"NME mean {m['nme_mean']:.4f} median {m['nme_median']:.4f} "
                f"p95 {m['nme_p95']:.4f}"
            )
            for emo, s in m["per_emotion"].items():
                print(f"    {emo:9s} detection {s['detection_rate']:.3f}  NME {s['nme_mean']:.4f}")
            if m["missed"]:
                print(f"  missed: {', '.join(m['missed'][:10])}")
            if args.parts:
                for part, e in part_errors(out).items():
                    print(f"    {part:12s} {e:.4f}")


if __name__ == "__main__":
    main()
