"""Generator latency: torch eager vs onnxruntime, batch 1 and 32 (target: ORT ≤ 0.7× torch on CPU).

    python bench/onnx.py                          # outputs/gan + outputs/export if present
    python bench/onnx.py --random --threads 2     # a randomly initialised generator of the
                                                  # params.yaml architecture (timing ≠ weights)
    python bench/onnx.py --batches 1 8 32 --min-time 5 --out bench/results/onnx.json

Each ORT CPU row is compared with torch at the same thread count. Both sides run the same thing: uint8 NHWC landmark image (+ reference) in, float [0, 1] NHWC
face out (`facecal.export.serving_module` in torch; the exported graph through
`facecal.serving.runtime.GeneratorRuntime` in onnxruntime), with the same thread count. Prints
median and p90 wall time per batch and CPU time per batch: on a machine shared with other jobs
wall time is inflated by their load, CPU time much less so. With CUDA it adds torch CUDA,
ORT CUDA (IO binding) fp32 and fp16 rows.
"""

from __future__ import annotations

import os
import sys

# This file is named onnx.py: drop its directory from the import path first, or every
# `import onnx` (ours, torch's, onnxruntime's) would import this script instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

PROJECT_GAN = Path("outputs/gan")
PROJECT_ONNX = Path("outputs/export/generator.onnx")


def random_generator(workdir: Path, size: int | None = None) -> Path:
    """A generator with the architecture params.yaml trains (random weights), saved through
    the generator contract."""
    import torch

    from facecal import config
    from facecal.gan.models import build_generator, generator_config, save_generator

    params = config.read_params()
    gan, base = params.get("gan", {}), params.get("base", {})
    arch = gan.get("arch", "pix2pix")
    identity = bool(gan.get("identity", True))
    size = size or int(base.get("image_size", 64))
    if arch in ("pix2pix", "warp_refine"):
        p = gan.get(arch, {})
        kw = {"ngf": int(p.get("ngf", 32)), "dropout": bool(p.get("dropout", False))}
        if arch == "warp_refine":  # a mesh over a face-shaped point set of this frame
            from facecal import geometry
            from facecal.warp_mesh import triangulate

            face = geometry.apply_affine(geometry.canonical_to_crop(size), _canonical_face())
            kw["triangles"] = triangulate(face, size, size).tolist()
    else:
        kw = {"width": int(gan.get("pldt", {}).get("width", 96))}
    torch.manual_seed(0)
    G = build_generator(arch, size, 6 if identity else 3, **kw)
    style = params.get("pairs", {}).get("style", "edges")
    return save_generator(G, generator_config(arch, size, style, identity, kw), workdir / "gan")


def _canonical_face() -> np.ndarray:
    """A 68-point face in the canonical frame: a synthetic neutral face, aligned."""
    from facecal import geometry
    from facecal.data.synth_face import identity

    return geometry.to_canonical(identity(0, 0).points)[0]


def prepare_model(
    gan_dir: Path | None,
    onnx_path: Path | None,
    workdir: Path,
    random: bool = False,
    fp16: bool = False,
) -> tuple[Path, Path, str]:
    """(generator dir, exported .onnx, description): the project's when present, else a random
    generator of the configured architecture, exported here with `facecal.export`."""
    from facecal.export import ExportParams, run_export
    from facecal.imageio import save_image

    what = "trained"
    if gan_dir is None:
        if not random and (PROJECT_GAN / "generator.pt").is_file():
            gan_dir = PROJECT_GAN
        else:
            gan_dir, what = random_generator(workdir), "random"
    if onnx_path is None:
        if gan_dir == PROJECT_GAN and PROJECT_ONNX.is_file():
            return gan_dir, PROJECT_ONNX, what
        ref = workdir / "reference.png"
        cfg = json.loads((gan_dir / "generator.json").read_text())
        size = int(cfg["image_size"])
        face = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        save_image(face, ref)
        spec = str(ref)
        if cfg["arch"] == "warp_refine":  # its reference needs landmarks: a one-face pairs set
            from facecal import geometry
            from facecal.pair_files import POINTS_FILE

            (workdir / "train").mkdir(exist_ok=True)
            save_image(face, workdir / "train" / "PID0_CLEAN1_IID0.jpg")
            (workdir / "index.csv").write_text(
                "pid,split,face_file,emotion,kind\n0,train,train/PID0_CLEAN1_IID0.jpg,neutral,true\n"
            )
            pts = geometry.apply_affine(geometry.canonical_to_crop(size), _canonical_face())
            np.savez(workdir / "train" / POINTS_FILE, pid=[0], target=pts[None], ref=pts[None])
            spec = "train_neutral_mean"
        run_export(
            ExportParams(fp16=fp16, reference=spec, parity_batch=4),
            gan_dir,
            None,
            workdir,
            workdir / "export",
            None,
        )
        onnx_path = workdir / "export" / "generator.onnx"
    return gan_dir, onnx_path, what


def timed(fn, min_time: float, min_runs: int = 5, max_runs: int = 1000) -> dict:
    fn()
    fn()  # warm-up (allocators, kernel selection)
    walls, cpus = [], []
    start = time.perf_counter()
    while len(walls) < min_runs or (
        time.perf_counter() - start < min_time and len(walls) < max_runs
    ):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    walls.sort()
    return {
        "median_ms": 1e3 * statistics.median(walls),
        "p90_ms": 1e3 * walls[int(0.9 * (len(walls) - 1))],
        "cpu_ms": 1e3 * statistics.median(cpus),
        "runs": len(walls),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gan-dir", type=Path, default=None)
    ap.add_argument("--onnx", type=Path, default=None, help="exported generator.onnx")
    ap.add_argument(
        "--random",
        action="store_true",
        help="time a randomly initialised generator of the params.yaml architecture",
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({1, os.cpu_count() or 1}),
        help="torch threads = onnxruntime intra-op threads; each count is a row "
        "(default: 1 and all cores — on a loaded machine OpenMP barriers make "
        "multi-threaded torch pathologically slow, so look at both)",
    )
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)

    import torch

    from facecal import geometry
    from facecal.export import serving_module
    from facecal.gan.models import count_parameters, load_generator, takes_points
    from facecal.serving.runtime import GeneratorRuntime, RuntimeOptions, cuda_driver_present

    cuda = torch.cuda.is_available() and cuda_driver_present()
    with tempfile.TemporaryDirectory() as tmp:
        gan_dir, onnx_path, what = prepare_model(
            args.gan_dir, args.onnx, Path(tmp), args.random, fp16=cuda
        )
        G, cfg = load_generator(gan_dir)
        size, identity = int(cfg["image_size"]), bool(cfg["identity"])
        points = takes_points(cfg["arch"])
        module = serving_module(G, identity, points=points)
        opts = RuntimeOptions(intra_op_threads=max(args.threads), warmup_batches=[])
        runtimes = {"ort_cpu_fp32": None}
        if cuda:
            runtimes = {
                "ort_cuda_fp32": GeneratorRuntime(onnx_path, opts),
                "ort_cuda_fp16": GeneratorRuntime(
                    onnx_path, RuntimeOptions(**{**opts.__dict__, "prefer_fp16": True})
                ),
            }
        # The CPU rows are always there: the acceptance target is about CPU.
        import onnxruntime as ort

        def cpu_session(threads: int):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.log_severity_level = 3
            return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])

        knobs = {k: v for k, v in cfg.get("kwargs", {}).items() if k != "triangles"}
        header = (
            f"generator: {what} {cfg['arch']} {knobs} {size}², identity "
            f"{identity}, {count_parameters(G) / 1e6:.2f} M params; threads "
            f"{args.threads}; onnxruntime {ort.__version__}, torch {torch.__version__}"
        )
        print(header)
        results = {"header": header, "rows": []}
        rng = np.random.default_rng(0)
        for b in args.batches:
            lm = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
            ref = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
            feeds = {"landmarks": lm, **({"reference": ref} if identity else {})}
            tin = [torch.from_numpy(lm)] + ([torch.from_numpy(ref)] if identity else [])
            pts = {}
            if points:  # the reference's and the target's landmarks, jittered apart
                face = geometry.apply_affine(geometry.canonical_to_crop(size), _canonical_face())
                src = (face + rng.normal(0, 0.01 * size, (b, 68, 2))).astype(np.float32)
                dst = (face + rng.normal(0, 0.01 * size, (b, 68, 2))).astype(np.float32)
                pts = {"reference_points": src, "target_points": dst}
                feeds.update(pts)
                tin += [torch.from_numpy(src), torch.from_numpy(dst)]

            def torch_cpu():
                with torch.inference_mode():
                    module(*tin)

            rows = {}
            for th in args.threads:
                torch.set_num_threads(th)
                sess = cpu_session(th)
                rows[f"torch_cpu_t{th}"] = timed(torch_cpu, args.min_time)
                rows[f"ort_cpu_fp32_t{th}"] = timed(
                    lambda: sess.run(["image"], feeds), args.min_time
                )
            torch.set_num_threads(max(args.threads))
            if cuda:
                gm = serving_module(G.to("cuda"), identity, points=points)
                tin_cuda = [t.to("cuda") for t in tin]

                def torch_cuda():
                    with torch.inference_mode():
                        out = gm(*tin_cuda)[0]
                    out.cpu()  # include the copy back, as the service must

                rows["torch_cuda"] = timed(torch_cuda, args.min_time)
                for name, r in runtimes.items():
                    rows[name] = timed(
                        lambda r=r: r.generate(
                            lm, ref if identity else None, output="image", **pts
                        ),
                        args.min_time,
                    )
                G.to("cpu")
            for name, r in rows.items():
                # Each ORT CPU row against torch at the same thread count; the rest against
                # the best torch CPU row.
                if name.startswith("ort_cpu"):
                    base = rows["torch_cpu_" + name.rsplit("_", 1)[1]]
                else:
                    base = min(
                        (v for k, v in rows.items() if k.startswith("torch_cpu")),
                        key=lambda v: v["median_ms"],
                    )
                ratio = r["median_ms"] / base["median_ms"]
                cpu_ratio = r["cpu_ms"] / base["cpu_ms"] if base["cpu_ms"] > 0 else float("nan")
                results["rows"].append(
                    {
                        "batch": b,
                        "backend": name,
                        **r,
                        "ratio_vs_torch_cpu": ratio,
                        "cpu_ratio_vs_torch_cpu": cpu_ratio,
                    }
                )
        print(
            "\n| batch | backend | median ms | p90 ms | CPU ms | img/s | × torch CPU (wall) "
            "| × torch CPU (CPU time) |\n|---|---|---|---|---|---|---|---|"
        )
        for r in results["rows"]:
            print(
                f"| {r['batch']} | {r['backend']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
                f"{r['cpu_ms']:.2f} | {r['batch'] / r['median_ms'] * 1e3:.0f} | "
                f"{r['ratio_vs_torch_cpu']:.2f} | {r['cpu_ratio_vs_torch_cpu']:.2f} |"
            )
        ort_rows = [r for r in results["rows"] if r["backend"].startswith("ort_cpu")]
        ok = all(r["ratio_vs_torch_cpu"] <= 0.7 for r in ort_rows)
        results["target_ort_le_0.7x_torch_cpu"] = ok
        ratios = ", ".join(
            f"b{r['batch']} {r['backend'].rsplit('_', 1)[1]}: {r['ratio_vs_torch_cpu']:.2f}×"
            for r in ort_rows
        )
        print(
            f"\ntarget ORT ≤ 0.7× torch on CPU (median wall): "
            f"{'met' if ok else 'NOT met'} ({ratios})"
        )
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
