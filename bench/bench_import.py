"""Throughput of `facecal data import` and `facecal data validate` on generated sources.

Builds, in a temporary folder, a FER2013-style csv (48×48 grey pixel strings) and an
official-layout CK+ tree (640×490 grey PNG frames with 68-point landmark files), imports each
and validates the result, printing images per second. Nothing here is real face data.

    python bench/bench_import.py                 # 5000 FER rows, 40 CK+ sequences × 15 frames
    python bench/bench_import.py --fer 35887 --ck 327 --frames 18   # about the real sizes
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from facecal.data.importers import import_dataset
from facecal.data.validate import validate_dataset


def make_fer(path: Path, n: int, rng: np.random.Generator) -> None:
    with open(path, "w") as f:
        f.write("emotion,pixels,Usage\n")
        for i in range(n):
            px = " ".join(map(str, rng.integers(0, 256, 48 * 48)))
            f.write(f"{i % 7},{px},Training\n")


def make_ckplus(root: Path, sequences: int, frames: int, rng: np.random.Generator) -> None:
    # Smooth pictures compress like photographs; noise would make PNG decoding unrealistically slow.
    yy, xx = np.mgrid[0:490, 0:640]
    for s in range(sequences):
        subject, seq = f"S{s // 3:03d}", f"{s % 3 + 1:03d}"
        for k in range(1, frames + 1):
            stem = f"{subject}_{seq}_{k:08d}"
            img = ((xx * (1 + k % 5) + yy * (1 + s % 7)) % 256).astype(np.uint8)
            d = root / "cohn-kanade-images" / subject / seq
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{stem}.png")
            d = root / "Landmarks" / subject / seq
            d.mkdir(parents=True, exist_ok=True)
            pts = rng.uniform(100, 400, (68, 2))
            (d / f"{stem}_landmarks.txt").write_text(
                "".join(f"   {x:.7e}   {y:.7e}\n" for x, y in pts)
            )
        d = root / "Emotion" / subject / seq
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{subject}_{seq}_{frames:08d}_emotion.txt").write_text(
            f"   {s % 7 + 1}.0000000e+00\n"
        )


def timed(label: str, n_images: int, fn):
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    print(f"{label:<28} {n_images:>7} images  {dt:7.2f} s  {n_images / dt:8.0f} img/s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fer", type=int, default=5000, help="FER2013 rows")
    parser.add_argument("--ck", type=int, default=40, help="CK+ sequences")
    parser.add_argument("--frames", type=int, default=15, help="frames per CK+ sequence")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_fer(tmp / "fer2013.csv", args.fer, rng)
        make_ckplus(tmp / "ck", args.ck, args.frames, rng)
        r = timed(
            "import fer2013",
            args.fer,
            lambda: import_dataset("fer2013", tmp / "fer2013.csv", tmp / "fer_out", progress=False),
        )
        timed(
            "validate fer2013",
            len(r.rows),
            lambda: validate_dataset(tmp / "fer_out", progress=False),
        )
        n = args.ck * args.frames
        r = timed(
            "import ckplus (all frames)",
            n,
            lambda: import_dataset("ckplus", tmp / "ck", tmp / "ck_out", progress=False),
        )
        timed(
            "validate ckplus", len(r.rows), lambda: validate_dataset(tmp / "ck_out", progress=False)
        )


if __name__ == "__main__":
    main()
