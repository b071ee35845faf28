"""Latency of `/v1/intensify` by photo size and output (a script, not a test).

    python bench/intensify.py --model outputs/export             # after `make run`
    python bench/intensify.py --model outputs/export --sizes 256 1024 --requests 40

Starts `facecal serve --model MODEL` on a free loopback port and sends one request at a time
(one client: latency, not throughput) of a synthetic face photo rendered at 256² and resized to
each ``--sizes`` side, with ``output=crop`` (the generated aligned face) and ``output=photo``
(the photo at its own resolution with the face warped to the calibrated landmarks). Prints
p50/p99 (ms) per size and output. Goal (issue 12): p50 ≤ 100 ms at 256² on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from facecal.data.synth import SynthConfig, render_face  # noqa: E402
from facecal.imageio import encode_png  # noqa: E402
from serve import Server, free_port  # noqa: E402


def photo(side: int) -> bytes:
    face, _ = render_face(SynthConfig(size=256), 3, "neutral", 0.0)
    img = Image.fromarray(face).resize((side, side), Image.Resampling.LANCZOS)
    return encode_png(np.asarray(img))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True, help="an exported generator (file, folder, URI)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--requests", type=int, default=30)
    args = ap.parse_args()
    import httpx

    port = free_port()
    log = Path(tempfile.mkdtemp()) / "serve.log"
    env = dict(os.environ, FACECAL_TRACKING="off")
    cmd = [sys.executable, "-m", "facecal", "serve", "--model", args.model, "--port", str(port)]
    server = Server("facecal serve", cmd, f"http://127.0.0.1:{port}", "/healthz", env, log)
    try:
        server.wait()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for side in args.sizes:
                data = photo(side)
                for output in ("crop", "photo"):
                    form = {"emotion": "happy", "intensity": "1", "output": output}
                    files = {"image": ("face.png", data, "image/png")}
                    for _ in range(3):  # warm-up: dlib's model, onnxruntime's arenas
                        r = client.post("/v1/intensify", files=files, data=form)
                        r.raise_for_status()
                    times = []
                    for _ in range(args.requests):
                        t = time.perf_counter()
                        r = client.post("/v1/intensify", files=files, data=form)
                        times.append((time.perf_counter() - t) * 1e3)
                        r.raise_for_status()
                    times.sort()
                    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
                    out = Image.open(io.BytesIO(r.content)).size
                    print(
                        f"{side}² output={output:5s}: p50 {statistics.median(times):7.1f} ms, "
                        f"p99 {p99:7.1f} ms (n={len(times)}, answer {out[0]}×{out[1]})",
                        flush=True,
                    )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
