"""The team tracking server of `scripts/tracking-server.sh`: a real PostgreSQL cluster and a real
`mlflow server` that proxies artifacts. `facecal register` (the gate), `facecal promote` and
`facecal serve models:/facecal-generator@champion` all go through ``http://``; the registry lives
in PostgreSQL and survives a restart of both; the artifacts land in the server's store only.

Skips, saying why, where PostgreSQL is not installed (`.ci/run` installs Debian's package).
"""

from __future__ import annotations

import base64
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from _serving import SIZE, exported, free_port, gold_templates, synth_face, wait_http
from facecal import geometry, registry, render
from facecal.imageio import encode_png, load_image
from test_mlflow_serve import _start, _stop
from test_registry import _eval_json

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "tracking-server.sh"
NAME = "facecal-generator"
PG_PORT = 5433  # the script's default: only the name of the cluster's Unix socket (no TCP)

pytestmark = pytest.mark.slow


def _postgres_missing() -> str | None:
    """Why a private PostgreSQL cluster cannot run here, or None."""
    if not (glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb")):
        return "PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does it)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root needs runuser to start PostgreSQL as the postgres user"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root needs the 'postgres' user (Debian's postgresql package)"
    return None


@dataclass
class Server:
    home: Path
    env: dict[str, str]
    url: str
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.home / "server.log", "ab")
        self.proc = subprocess.Popen(
            ["bash", str(SCRIPT), "start"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        try:
            wait_http(self.url + "/health", 180, self.proc)
        except RuntimeError:
            print((self.home / "server.log").read_text(errors="replace")[-4000:])
            raise

    def stop(self) -> int | None:
        """SIGTERM to the script: it stops mlflow, then PostgreSQL (what Ctrl-C does)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        rc, self.proc = self.proc.returncode, None
        return rc

    def db(self):
        """A direct connection to the server's database (peer authentication, as the server)."""
        import psycopg2

        return psycopg2.connect(host=str(self.home / "run"), port=PG_PORT, dbname="mlflow")


@pytest.fixture(scope="module")
def tracking_server():
    reason = _postgres_missing()
    if reason:
        pytest.skip(reason)
    # Not under pytest's tmp (mode 700 under /tmp/pytest-of-root): the postgres user must reach
    # it, and the socket path must stay short.
    home = Path(tempfile.mkdtemp(prefix="fc-track-", dir="/tmp"))
    home.chmod(0o755)
    port = free_port()
    env = {
        **os.environ,
        "FACECAL_TRACKING_HOME": str(home),
        "FACECAL_TRACKING_PORT": str(port),
        "FACECAL_TRACKING_WORKERS": "1",
        "MLFLOW": str(Path(sys.executable).with_name("mlflow")),
    }
    env.pop("FACECAL_TRACKING_DB_URI", None)
    server = Server(home, env, f"http://127.0.0.1:{port}")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        # Whatever happened above, leave no PostgreSQL running.
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, timeout=60, check=False)
        shutil.rmtree(home, ignore_errors=True)


def _facecal(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "facecal", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_register_promote_and_serve_through_a_postgres_tracking_server(
    tracking_server, tmp_path_factory, tmp_path
):
    server = tracking_server
    model = exported(tmp_path_factory)
    env = {
        **os.environ,
        "FACECAL_TRACKING": "on",
        "MLFLOW_TRACKING_URI": server.url,
        "FACECAL_MODEL_CACHE": str(tmp_path / "cache"),
    }
    env.pop("FACECAL_PARENT_RUN_ID", None)
    params = str(REPO / "params.yaml")
    # The gate accepts only metrics of the generator the ONNX file holds.
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model.onnx)).metadata_props}
    generator = meta[registry.ONNX_GENERATOR_HASH]

    def register(ssim: float, tag: str) -> dict:
        out = tmp_path / f"registration-{tag}.json"
        done = _facecal(
            [
                "register",
                "--params",
                params,
                "--onnx",
                str(model.onnx),
                "--eval-metrics",
                str(_eval_json(tmp_path / f"eval-{tag}.json", ssim, generator=generator)),
                "--out",
                str(out),
            ],
            env,
            tmp_path,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads(out.read_text())

    first, second = register(0.60, "a"), register(0.50, "b")
    assert (first["version"], second["version"]) == ("1", "2")
    assert first["tracking_uri"] == server.url
    assert first["gate"]["decision"] == "promoted"
    assert second["gate"]["decision"] == "kept_champion"

    refused = _facecal(["promote", "--params", params, "--version", "2"], env, tmp_path)
    assert refused.returncode == 1 and "not promoted" in refused.stdout
    forced = _facecal(
        ["promote", "--params", params, "--version", "2", "--force", "--reason", "team test"],
        env,
        tmp_path,
    )
    assert forced.returncode == 0, forced.stderr[-4000:]

    # What the server stored is in PostgreSQL itself …
    with server.db() as conn, conn.cursor() as cur:
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", [NAME])
        assert dict(cur.fetchall()) == {"champion": 2, "challenger": 2}
        cur.execute(
            "SELECT value FROM model_version_tags WHERE name = %s AND version = 2 AND key = %s",
            [NAME, "promotion.reason"],
        )
        assert cur.fetchall() == [("team test",)]
    conn.close()
    # … and the model files went through the server into its artifact store: the client
    # holds only mlflow-artifacts: URIs, and wrote nothing beside itself.
    import mlflow

    run = mlflow.MlflowClient(server.url).get_run(first["run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert len(list((server.home / "artifacts").rglob("*.onnx"))) == 2
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()

    # A restart of PostgreSQL and mlflow keeps the registry.
    assert server.stop() == 0
    assert not (server.home / "run" / f".s.PGSQL.{PG_PORT}").exists(), "PostgreSQL still runs"
    server.start()

    port = free_port()
    serve = _start(
        [
            sys.executable,
            "-m",
            "facecal",
            "serve",
            "--model",
            f"models:/{NAME}@champion",
            "--port",
            str(port),
            "--set",
            "max_wait_ms=1",
        ],
        env,
        tmp_path / "serve.log",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(url + "/healthz", 120, serve)
        except RuntimeError:
            print((tmp_path / "serve.log").read_text(errors="replace")[-3000:])
            raise
        info = httpx.get(url + "/v1/model").json()
        assert (info["name"], info["version"], info["alias"]) == (NAME, "2", "champion")

        photo, pts = synth_face(3, "neutral", 1.0)
        aligned = geometry.warp_image(photo, geometry.crop_transform(pts, SIZE), SIZE)
        crop = geometry.apply_affine(geometry.canonical_to_crop(SIZE), gold_templates()["happy"])
        r = httpx.post(
            url + "/v1/generate",
            timeout=30,
            json={
                "landmarks": crop.tolist(),
                "reference": base64.b64encode(encode_png(aligned)).decode(),
            },
        )
        assert r.status_code == 200, r.text
        served = load_image(r.content)
    finally:
        _stop(serve)

    # The served pixels are the exported graph's on the same inputs.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model.onnx), providers=["CPUExecutionProvider"])
    lm = render.render_landmarks(crop, SIZE, "edges")[None]
    (ours,) = sess.run(["image_u8"], {"landmarks": lm, "reference": aligned[None]})
    assert served.shape == (SIZE, SIZE, 3)
    assert np.abs(served.astype(int) - ours[0].astype(int)).max() <= 1
    assert served.std() > 10
