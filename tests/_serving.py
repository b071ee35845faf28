"""Shared setup of the export and serving tests: a small randomly initialised generator saved
through the generator contract, gold templates and a pairs index built from synthetic faces,
one export per test process, and a uvicorn server on a free loopback port.

The generator is small (pix2pix, ngf 8: 0.5 M parameters) but its weights are rescaled so its
output spans the whole [0, 1] range — parity on a near-constant 0.5 image would prove little.
"""

from __future__ import annotations

import contextlib
import csv
import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from facecal import geometry

SIZE = 64
GOLD_EMOTIONS = ("anger", "happy", "surprise")
_CACHE: dict[Any, Any] = {}


def synth():
    """The project's synthetic face renderer, or a skip saying why it is missing."""
    try:
        from facecal.data import synth as module
    except ImportError as e:
        pytest.skip(f"facecal.data.synth is not available ({e})")
    return module


def synth_face(
    subject: int, emotion: str, intensity: float, size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 size×size×3 face, its exact 68 points), memoised."""
    key = ("face", subject, emotion, intensity, size)
    if key not in _CACHE:
        s = synth()
        _CACHE[key] = s.render_face(s.SynthConfig(size=size), subject, emotion, intensity)
    return _CACHE[key]


def small_generator(identity: bool = True, arch: str = "pix2pix", seed: int = 0):
    """A generator whose output uses the full tanh range (random, not trained)."""
    import torch
    from torch import nn

    from facecal.gan.models import build_generator

    torch.manual_seed(seed)
    kw = {"ngf": 8} if arch == "pix2pix" else {"width": 4}
    G = build_generator(arch, SIZE, 6 if identity else 3, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan = m.weight[0].numel()
                m.weight.normal_(0.0, 1.0 / fan**0.5, generator=gen)
            elif isinstance(m, nn.BatchNorm2d):
                # Non-trivial running statistics: eval-mode batch norm must be exported as such.
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    return G.eval(), kw


def write_generator(
    root: Path, identity: bool = True, arch: str = "pix2pix", style: str = "edges"
) -> Path:
    from facecal.gan.models import generator_config, save_generator

    G, kw = small_generator(identity, arch)
    return save_generator(G, generator_config(arch, SIZE, style, identity, kw), root / "gan")


def gold_json() -> dict[str, Any]:
    """A gold.json as `facecal calibrate` writes it with its default method (pca): templates =
    canonical mean of three subjects at full intensity, expression directions from intensities
    0.5 and 1 relative to each subject's neutral face."""
    if "gold" not in _CACHE:
        from facecal import calibration as cal
        from facecal.calibrate import CalibrationParams
        from facecal.calibrate import gold_json as to_json

        subjects = range(3)
        neutral = {s: geometry.to_canonical(synth_face(s, "neutral", 1.0)[1])[0] for s in subjects}
        canon, labels, refs, gold_faces, golds = [], [], [], {}, {}
        for e in GOLD_EMOTIONS:
            apex = []
            for s in subjects:
                for a in (0.5, 1.0):
                    c = geometry.to_canonical(synth_face(s, e, a)[1])[0]
                    canon.append(c)
                    labels.append(e)
                    refs.append(neutral[s])
                apex.append(c)
            gold_faces[e] = (np.stack(apex), np.stack([neutral[s] for s in subjects]))
            golds[e] = cal.GoldTemplate(
                e, np.stack(apex).mean(0), [f"synth/s{s}_{e}.png" for s in subjects], "canonical"
            )
        model = cal.expression_model(
            np.stack(canon), labels, np.stack(refs), np.mean(list(neutral.values()), 0), gold_faces
        )
        params = CalibrationParams(method="pca")
        _CACHE["gold"] = json.loads(json.dumps(to_json(golds, params, model)))
    return _CACHE["gold"]


def gold_templates() -> dict[str, np.ndarray]:
    return {e: np.asarray(v["points"]) for e, v in gold_json()["emotions"].items()}


def write_gold(root: Path) -> Path:
    path = root / "gold.json"
    path.write_text(json.dumps(gold_json()))
    return path


def write_pairs(root: Path) -> tuple[Path, list[Path]]:
    """A pairs index whose train split has three aligned neutral faces (and a happy one that
    must not enter the default reference)."""
    from facecal.imageio import save_image

    out = root / "pairs"
    rows, neutral = [], []
    for pid, (subject, emotion, split) in enumerate(
        [
            (0, "neutral", "train"),
            (1, "neutral", "train"),
            (2, "neutral", "train"),
            (0, "happy", "train"),
            (3, "neutral", "test"),
        ]
    ):
        img, pts = synth_face(subject, emotion, 1.0)
        crop = geometry.warp_image(img, geometry.crop_transform(pts, SIZE), SIZE)
        name = f"{split}/PID{pid}_CLEAN1_IID{pid}.jpg"
        save_image(crop, out / name)
        if emotion == "neutral" and split == "train":
            neutral.append(out / name)
        rows.append(
            {
                "pid": pid,
                "split": split,
                "landmarks_file": "",
                "face_file": name,
                "ref_file": "",
                "image": f"s{subject}_{emotion}.png",
                "ref_image": "",
                "subject": f"s{subject}",
                "emotion": emotion,
                "intensity": 1.0,
                "kind": "true",
                "target_emotion": "",
            }
        )
    with open(out / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out, neutral


@dataclass
class Exported:
    root: Path
    gan_dir: Path
    gold_path: Path
    pairs_dir: Path
    neutral_faces: list[Path]
    out_dir: Path
    metrics_path: Path
    metrics: dict[str, Any]
    seconds: float

    @property
    def onnx(self) -> Path:
        return self.out_dir / "generator.onnx"

    @property
    def onnx_fp16(self) -> Path:
        return self.out_dir / "generator_fp16.onnx"


def exported(tmp_path_factory) -> Exported:
    """The identity generator exported once per test process (fp32 + fp16)."""
    if "exported" not in _CACHE:
        from facecal.export import ExportParams, run_export

        root = tmp_path_factory.mktemp("export")
        gan_dir = write_generator(root)
        gold = write_gold(root)
        pairs, neutral = write_pairs(root)
        t0 = time.perf_counter()
        metrics = run_export(
            ExportParams(parity_batch=6),
            gan_dir,
            gold,
            pairs,
            root / "export",
            root / "metrics" / "export.json",
            seed=0,
        )
        _CACHE["exported"] = Exported(
            root,
            gan_dir,
            gold,
            pairs,
            neutral,
            root / "export",
            root / "metrics" / "export.json",
            metrics,
            time.perf_counter() - t0,
        )
    return _CACHE["exported"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, params=None, timeout: float = 30.0):
    """Serve an ASGI app with uvicorn on a free loopback port in a thread, configured as
    `facecal serve` configures it for `params` (connection limits, deadlines); yields its URL."""
    import uvicorn

    from facecal.serving.app import ServeParams, server_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, params or ServeParams(), lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


# httpx keeps an idle connection for 5 s by default, the server's own keep-alive timeout: a request
# sent on it just as the server closes it gets "Server disconnected without sending a response".
# A client must let idle connections go before the server does; the tests' clients do.
CLIENT_KEEPALIVE_S = 0.5


def http_client(url: str, timeout: float = 30.0):
    """An httpx client for a test server that drops idle connections well before the server does."""
    import httpx

    return httpx.Client(
        base_url=url, timeout=timeout, limits=httpx.Limits(keepalive_expiry=CLIENT_KEEPALIVE_S)
    )


def wait_http(url: str, timeout: float, proc=None) -> None:
    """Poll `url` until it answers 200 (or the process dies / time runs out)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")
