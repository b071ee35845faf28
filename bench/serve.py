"""Serving throughput: `facecal serve` (with and without request batching) against
`mlflow models serve` of the same registered model, under N concurrent loopback clients.

    python bench/serve.py                          # outputs/export/generator.onnx if present
    python bench/serve.py --random                 # a random generator of the params.yaml arch
    python bench/serve.py --clients 1 8 32 --duration 15 --out bench/results/serve.json
    python bench/serve.py --model-uri models:/facecal-generator@champion   # an existing registry
    python bench/serve.py --random --clients --skip-mlflow --hostile   # only the hostile run

Target: the own service (batching) ≥ 2× the req/s of `mlflow models serve` at an equal or
better p99. Each request asks for one face from 68 landmarks: the own service takes the
landmarks as JSON and answers a PNG; MLflow's `/invocations` takes the rendered landmark image
and reference face as tensors (what its ONNX flavour accepts; the client renders them, outside
the timing) and answers JSON. Both servers are one process with onnxruntime's default threads,
both load the model from the same registry URI (a temporary sqlite store, unless
``--model-uri`` names one). The load generator is one asyncio process on the same machine: on
a machine shared with other jobs all figures are inflated by their load.

``--hostile``: the own service (batching) with 8 normal clients for 20 s, first quiet, then
while a hostile client at another loopback address (127.0.0.2) holds 300 idle sockets open —
reopening each as soon as the server closes it — and the normal clients' req/s and p99 are
printed side by side (plus how many idle sockets were refused or cut off by the header
deadline).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from facecal.paths import with_scripts_on_path

HERE = Path(__file__).resolve().parent


def _bench_onnx():
    """bench/onnx.py (its name shadows the onnx package, so load it by path)."""
    spec = importlib.util.spec_from_file_location("facecal_bench_onnx", HERE / "onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register(onnx_path: Path, name: str, artifacts: Path) -> str:
    """Log + register + alias `champion`, as `facecal register` does; returns the URI."""
    import mlflow

    import onnx
    from facecal.registry_common import model_signature

    # Artifacts beside the temporary store (a sqlite store's default is ./mlruns in the cwd).
    experiment = mlflow.MlflowClient().create_experiment(
        "facecal-bench", artifact_location=artifacts.as_uri()
    )
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="generator",
            registered_model_name=name,
            signature=model_signature(onnx_path),  # every input, whatever the arch
            save_as_external_data=False,
            onnx_execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
            pip_requirements=["onnxruntime-gpu", "onnx", "numpy"],
        )
    mlflow.MlflowClient().set_registered_model_alias(
        name, "champion", info.registered_model_version
    )
    return f"models:/{name}@champion"


class Server:
    def __init__(self, label: str, cmd: list[str], url: str, ready: str, env: dict, log: Path):
        self.label, self.url, self.ready = label, url, ready
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.log = log

    def wait(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited; see {self.log}:\n"
                    f"{self.log.read_text(errors='replace')[-2000:]}"
                )
            try:
                if httpx.get(self.url + self.ready, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.label} did not start within {timeout} s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


async def load(
    url: str, path: str, bodies: list[bytes], clients: int, duration: float, content_type: str
) -> dict:
    """`clients` loops sending requests back to back for `duration` seconds."""
    import httpx

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        stop = time.perf_counter() + duration

        async def worker(k: int):
            nonlocal errors
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await client.post(
                    path, content=bodies[i % len(bodies)], headers={"content-type": content_type}
                )
                await r.aread()
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                i += clients

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    pick = (
        (lambda q: 1e3 * lat[min(len(lat) - 1, int(q * len(lat)))])
        if lat
        else (lambda q: float("nan"))
    )
    return {
        "requests": len(lat),
        "errors": errors,
        "req_per_s": len(lat) / wall,
        "p50_ms": pick(0.5),
        "p99_ms": pick(0.99),
        "mean_ms": 1e3 * statistics.fmean(lat) if lat else float("nan"),
    }


async def idle_flood(
    url: str, sockets: int, stop: asyncio.Event, source: str, retry_s: float
) -> dict:
    """Keep `sockets` connections from `source` open, sending nothing; reopen each one the
    server closes (a refused one after `retry_s`; with `retry_s` 0 each socket is opened once
    and, once closed, stays closed)."""
    host, port = url.rsplit("/", 1)[1].split(":")
    counts = {"opened": 0, "refused": 0, "timed_out": 0, "connect_failed": 0}

    async def one() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(
                    host, int(port), local_addr=(source, 0)
                )
            except OSError:
                counts["connect_failed"] += 1
                await asyncio.sleep(1.0)
                continue
            counts["opened"] += 1
            read = asyncio.ensure_future(reader.read())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            answer = read.result() if read.done() and not read.cancelled() else b""
            read.cancel()
            writer.close()
            if b"too_many_connections" in answer:
                counts["refused"] += 1
                if retry_s > 0:
                    await asyncio.sleep(retry_s)
            elif b"header_timeout" in answer:
                counts["timed_out"] += 1
            if retry_s <= 0:
                await stop.wait()

    tasks = [asyncio.ensure_future(one()) for _ in range(sockets)]
    await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    return counts


async def under_flood(
    url: str,
    path: str,
    bodies: list[bytes],
    clients: int,
    duration: float,
    sockets: int,
    retry_s: float,
) -> tuple[dict, dict]:
    """Normal clients (and a /healthz probe every 0.5 s) while `idle_flood` runs in a process
    of its own (its reconnects must not stall the normal clients' event loop)."""
    import multiprocessing

    import httpx

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    flood = ctx.Process(
        target=_flood_process, args=(url, sockets, retry_s, duration + 2.5, results)
    )
    flood.start()
    stop = asyncio.Event()
    probes: list[tuple[int, float]] = []

    async def probe() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = (await client.get("/healthz")).status_code
                except httpx.HTTPError:
                    status = 0
                probes.append((status, 1e3 * (time.perf_counter() - t0)))
                await asyncio.sleep(0.5)

    await asyncio.sleep(2.0)  # the idle sockets are open before the clients start
    prober = asyncio.ensure_future(probe())
    r = await load(url, path, bodies, clients, duration, "application/json")
    stop.set()
    await prober
    ok = [ms for status, ms in probes if status == 200]
    health = {
        "probes": len(probes),
        "ok": len(ok),
        "max_ms": max(ok) if ok else float("nan"),
    }
    counts = await asyncio.to_thread(results.get, True, 120)
    flood.join(30)
    return r, {**counts, "healthz": health}


def _flood_process(url: str, sockets: int, retry_s: float, seconds: float, results) -> None:
    async def run() -> dict:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        return await idle_flood(url, sockets, stop, "127.0.0.2", retry_s)

    results.put(asyncio.run(run()))


def payloads(onnx_path: Path, n: int = 16) -> tuple[list[bytes], list[bytes]]:
    """(own-service bodies, mlflow bodies) describing the same n faces."""
    from facecal import geometry
    from facecal.data import synth
    from facecal.serving.runtime import GeneratorRuntime

    rt = GeneratorRuntime(onnx_path)
    cfg = synth.SynthConfig(size=128)
    own, theirs = [], []
    for i in range(n):
        _, pts = synth.render_face(cfg, i % 4, ("neutral", "happy", "surprise", "sad")[i % 4], 1.0)
        crop = geometry.apply_affine(geometry.crop_transform(pts, rt.image_size), pts)
        own.append(json.dumps({"landmarks": np.round(crop, 3).tolist()}).encode())
        inputs = {"landmarks": rt.render(crop)[None].tolist()}
        if rt.identity:
            inputs["reference"] = rt.default_reference[None].tolist()
        theirs.append(json.dumps({"inputs": inputs}).encode())
    return own, theirs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", type=Path, default=None, help="exported generator.onnx")
    ap.add_argument(
        "--random",
        action="store_true",
        help="a randomly initialised generator of the params.yaml architecture",
    )
    ap.add_argument(
        "--model-uri",
        default=None,
        help="serve this registered model (MLFLOW_TRACKING_URI) instead of logging "
        "--onnx into a temporary store",
    )
    ap.add_argument("--clients", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--skip-mlflow", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    ap.add_argument(
        "--hostile",
        action="store_true",
        help="also measure 8 clients beside 300 idle sockets (see above)",
    )
    ap.add_argument("--hostile-sockets", type=int, default=300)
    ap.add_argument("--hostile-clients", type=int, default=8)
    ap.add_argument("--hostile-duration", type=float, default=20.0)
    ap.add_argument(
        "--hostile-retry-s",
        type=float,
        default=1.0,
        help="the hostile client reopens a refused socket after this long (0: never reopens)",
    )
    args = ap.parse_args(argv)

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # mlflow models serve execs `uvicorn` by name: this venv's scripts first on PATH.
        env = with_scripts_on_path({**os.environ, "FACECAL_MODEL_CACHE": str(tmp / "cache")})
        if args.model_uri:
            uri = args.model_uri
            from facecal.serving.runtime import resolve

            onnx_path = resolve(uri, tmp / "cache").path
        else:
            _, onnx_path, what = _bench_onnx().prepare_model(None, args.onnx, tmp, args.random)
            print(f"model: {onnx_path} ({what})", file=sys.stderr)
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
            os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
            uri = register(onnx_path, "facecal-generator", tmp / "artifacts")
        own_bodies, mlflow_bodies = payloads(onnx_path)

        servers = []
        for label, extra in (
            (
                "facecal (batching)",
                [
                    "--set",
                    f"max_batch={args.max_batch}",
                    "--set",
                    f"max_wait_ms={args.max_wait_ms}",
                ],
            ),
            ("facecal (no batching)", ["--no-batching"]),
        ):
            port = free_port()
            servers.append(
                (
                    Server(
                        label,
                        [
                            sys.executable,
                            "-m",
                            "facecal",
                            "serve",
                            "--model",
                            uri,
                            "--port",
                            str(port),
                            *extra,
                        ],
                        f"http://127.0.0.1:{port}",
                        "/healthz",
                        env,
                        tmp / f"{len(servers)}.log",
                    ),
                    "/v1/generate",
                    own_bodies,
                )
            )
        if not args.skip_mlflow:
            port = free_port()
            servers.append(
                (
                    Server(
                        "mlflow models serve",
                        [
                            sys.executable,
                            "-m",
                            "mlflow",
                            "models",
                            "serve",
                            "-m",
                            uri,
                            "--env-manager",
                            "local",
                            "-h",
                            "127.0.0.1",
                            "-p",
                            str(port),
                            "-w",
                            "1",
                        ],
                        f"http://127.0.0.1:{port}",
                        "/ping",
                        env,
                        tmp / "mlflow.log",
                    ),
                    "/invocations",
                    mlflow_bodies,
                )
            )
        rows = []
        hostile: dict = {}
        try:
            for server, _, _ in servers:
                server.wait()
            for clients in args.clients:
                for server, path, bodies in servers:
                    # Servers take turns: only one is under load at a time.
                    asyncio.run(
                        load(server.url, path, bodies, min(clients, 4), 1.0, "application/json")
                    )  # warm-up
                    r = asyncio.run(
                        load(server.url, path, bodies, clients, args.duration, "application/json")
                    )
                    rows.append({"server": server.label, "clients": clients, **r})
                    print(
                        f"{server.label:24s} clients {clients:3d}: {r['req_per_s']:8.1f} req/s  "
                        f"p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms  "
                        f"errors {r['errors']}",
                        file=sys.stderr,
                    )
            if args.hostile:
                server, path, bodies = servers[0]  # facecal (batching)
                n, secs = args.hostile_clients, args.hostile_duration
                quiet = asyncio.run(load(server.url, path, bodies, n, secs, "application/json"))
                loud, flood = asyncio.run(
                    under_flood(
                        server.url,
                        path,
                        bodies,
                        n,
                        secs,
                        args.hostile_sockets,
                        args.hostile_retry_s,
                    )
                )
                hostile = {"clients": n, "quiet": quiet, "flood": loud, "idle_sockets": flood}
        finally:
            for server, _, _ in servers:
                server.stop()

    print("\n| server | clients | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['server']} | {r['clients']} | {r['req_per_s']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['errors']} |"
        )
    verdicts = {}
    if not args.skip_mlflow:
        for clients in args.clients:
            own = next(
                r for r in rows if r["server"] == "facecal (batching)" and r["clients"] == clients
            )
            ml = next(
                r for r in rows if r["server"] == "mlflow models serve" and r["clients"] == clients
            )
            speedup = own["req_per_s"] / ml["req_per_s"] if ml["req_per_s"] else float("inf")
            verdicts[clients] = {
                "speedup": speedup,
                "p99_own": own["p99_ms"],
                "p99_mlflow": ml["p99_ms"],
                "met": speedup >= 2.0 and own["p99_ms"] <= ml["p99_ms"],
            }
            print(
                f"clients {clients}: own/mlflow req/s {speedup:.2f}×, p99 {own['p99_ms']:.1f} vs "
                f"{ml['p99_ms']:.1f} ms → target (≥ 2× at ≤ p99) "
                f"{'met' if verdicts[clients]['met'] else 'NOT met'}"
            )
    if hostile:
        q, f, idle = hostile["quiet"], hostile["flood"], hostile["idle_sockets"]
        print(
            f"\nhostile run: {hostile['clients']} clients, {args.hostile_duration:g} s each, "
            f"{args.hostile_sockets} idle sockets from 127.0.0.2 during the second "
            f"(refused ones reopened after {args.hostile_retry_s:g} s; 0 = never)\n"
            "| facecal (batching) | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|"
        )
        for label, r in (("quiet", q), (f"{args.hostile_sockets} idle sockets", f)):
            print(
                f"| {label} | {r['req_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                f"{r['errors']} |"
            )
        h = idle["healthz"]
        print(
            f"idle sockets: {idle['opened']} opened, {idle['refused']} refused at once, "
            f"{idle['timed_out']} closed by the header deadline, "
            f"{idle['connect_failed']} connects failed; /healthz during the flood: "
            f"{h['ok']}/{h['probes']} answered 200, slowest {h['max_ms']:.1f} ms"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"rows": rows, "targets": verdicts, "hostile": hostile}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
