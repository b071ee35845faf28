"""Classifier throughput: `facecal classify` (faces/s on CPU) and `POST /v1/classify` of
`facecal serve --classifier` (req/s, p50, p99 under N concurrent loopback clients).

    python bench/classify.py                                   # random default-size CNN
    python bench/classify.py --model outputs/cnn/real_all.pt   # a trained one (+ its ONNX export)
    python bench/classify.py --faces 200 --size 256 --clients 1 8 --duration 10 --out r.json

Faces are the embedded synthetic renderer's (`facecal.data.synth`), `--size`² PNG files
written once. `classify` is timed end to end through `classify.classify_files` (decode + dlib
detection + landmarks on the grey image, alignment, model) for the torch file and the ONNX
export, with 1 and 2 detection processes; "model only" is the network on ready crops. The
service is one `facecal serve` process (a random generator beside the classifier) and the load
generator one asyncio process on the same machine: on a machine shared with other jobs every
figure is inflated by their load.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from facecal.paths import with_scripts_on_path

HERE = Path(__file__).resolve().parent
# bench/onnx.py would shadow the onnx package that the exporter imports.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != str(HERE)]


def _bench(name: str):
    """A sibling bench module, loaded by path (bench/onnx.py shadows the onnx package)."""
    spec = importlib.util.spec_from_file_location(f"facecal_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare_classifier(model: Path | None, workdir: Path) -> tuple[Path, Path, str]:
    """(.pt, exported .onnx, description): `model` (a train_cnn .pt), else a randomly
    initialised network of the params.yaml architecture (width 16, 64², 8 classes)."""
    import torch

    from facecal.emotions import EMOTIONS
    from facecal.export_classifier import ExportCnnParams, run_export_cnn
    from facecal.recognition.cnn import ExpressionCNN, save_classifier

    cnn_dir = workdir / "cnn"
    cnn_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        torch.manual_seed(0)
        classes = list(EMOTIONS)
        net = ExpressionCNN(len(classes), 16, 0.3, 64).eval()
        meta = {
            "regime": "real_all",
            "seed_index": 0,
            "classes": classes,
            "image_size": 64,
            "width": 16,
            "dropout": 0.3,
            "mirror": False,
        }
        pt, what = cnn_dir / "real_all.pt", "random (width 16, 64², 8 classes)"
        save_classifier(net, meta, pt)
    else:
        pt, what = cnn_dir / "real_all.pt", f"{model}"
        pt.write_bytes(Path(model).read_bytes())
        pt.with_suffix(".json").write_bytes(Path(model).with_suffix(".json").read_bytes())
    (cnn_dir / "models.json").write_text(json.dumps({"regimes": {"real_all": [pt.name]}}))
    run_export_cnn(ExportCnnParams(parity_faces=0), cnn_dir, workdir / "export_cnn", None)
    return pt, workdir / "export_cnn" / "classifier.onnx", what


def write_faces(folder: Path, n: int, size: int) -> list[Path]:
    from facecal.data import synth
    from facecal.imageio import save_image

    cfg = synth.SynthConfig(size=size)
    emotions = ("neutral", "happy", "surprise", "sad", "anger", "fear", "disgust")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img, _ = synth.render_face(cfg, i % 12, emotions[i % len(emotions)], 1.0)
        path = folder / f"face{i:04d}.png"
        save_image(img, path)
        out.append(path)
    return out


def bench_classify(files: list[Path], pt: Path, onnx: Path, workers: list[int]) -> list[dict]:
    from facecal.classify import TorchRecognizer, classify_files, load_recognizer
    from facecal.manifest import Report

    rows = []
    for label, recognizer in (
        ("torch .pt", TorchRecognizer(pt)),
        ("onnx", load_recognizer(str(onnx))),
    ):
        for w in workers:
            report = Report()
            list(classify_files(recognizer, files[:4], Report(), workers=1, progress=False))
            t0 = time.perf_counter()
            n = sum(1 for _ in classify_files(recognizer, files, report, workers=w, progress=False))
            wall = time.perf_counter() - t0
            rows.append(
                {
                    "what": f"classify, {label}, {w} detection process(es)",
                    "faces": n,
                    "skipped": len(report),
                    "seconds": round(wall, 3),
                    "faces_per_s": round(n / wall, 2),
                }
            )
            print(rows[-1], file=sys.stderr)
        # The network alone, on ready crops (what the detection leaves of the budget).
        crops = np.random.default_rng(0).integers(0, 256, (512, 64, 64, 3), dtype=np.uint8)
        recognizer.probabilities(crops[:64])
        t0 = time.perf_counter()
        for i in range(0, len(crops), 64):
            recognizer.probabilities(crops[i : i + 64])
        wall = time.perf_counter() - t0
        rows.append({"what": f"model only, {label}, batch 64", "faces_per_s": round(512 / wall, 1)})
        print(rows[-1], file=sys.stderr)
    return rows


def multipart(image: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = "facecalbench7f3a"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="f.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    return b"".join(
        parts
    ) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def bench_serve(files: list[Path], onnx: Path, workdir: Path, clients: list[int], duration: float):
    serve = _bench("serve")
    _, generator, _ = _bench("onnx").prepare_model(None, None, workdir / "gen", True)
    env = with_scripts_on_path({**os.environ, "FACECAL_TRACKING": "off"})
    port = serve.free_port()
    server = serve.Server(
        "facecal serve --classifier",
        [sys.executable, "-m", "facecal", "serve", "--model", str(generator), "--classifier",
         str(onnx), "--port", str(port)],
        f"http://127.0.0.1:{port}", "/healthz", env, workdir / "serve.log",
    )  # fmt: skip
    from facecal.imageio import encode_png, load_image

    photos = [multipart(p.read_bytes(), {"frame": "photo"}) for p in files[:16]]
    crop_png = [
        multipart(encode_png(load_image(p)[32:96, 32:96]), {"frame": "crop"}) for p in files[:16]
    ]
    rows = []
    try:
        server.wait()
        for label, bodies in (("photo", photos), ("crop", crop_png)):
            ctype = bodies[0][1]
            for c in clients:
                r = asyncio.run(
                    serve.load(
                        server.url, "/v1/classify", [b for b, _ in bodies], c, duration, ctype
                    )
                )
                r = {"what": f"/v1/classify frame={label}", "clients": c, **r}
                rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()})
                print(rows[-1], file=sys.stderr)
    finally:
        server.stop()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="a train_cnn .pt (default: random)")
    ap.add_argument("--faces", type=int, default=200)
    ap.add_argument("--size", type=int, default=128, help="side of the synthetic photos")
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--clients", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per serve measurement")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("FACECAL_TRACKING", "off")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pt, onnx, what = prepare_classifier(args.model, tmp)
        files = write_faces(tmp / "faces", args.faces, args.size)
        print(f"classifier: {what}; {len(files)} faces of {args.size}²", file=sys.stderr)
        result = {
            "classifier": what,
            "faces": len(files),
            "size": args.size,
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
            "classify": bench_classify(files, pt, onnx, args.workers),
        }
        if not args.skip_serve:
            result["serve"] = bench_serve(files, onnx, tmp, args.clients, args.duration)
        result["load_avg_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
