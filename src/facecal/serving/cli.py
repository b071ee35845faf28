"""`facecal serve` on the command line: its flags, and uvicorn configured with our connection
guard (`guard.guarded_protocol`); `app.main` runs it (params and flags → model → uvicorn)."""

from __future__ import annotations

from typing import Any

from facecal import config
from facecal.serving.guard import ConnectionLimits, guarded_protocol
from facecal.serving.settings import ServeParams


def return_freed_memory() -> None:
    """Make glibc give image-sized buffers back to the system when they are freed.

    Its adaptive mmap threshold grows to 32 MB after the first large free, and from then on
    decoded pictures are carved from per-thread heaps that stay resident after the request
    (measured: the peak of one 4 MP upload went from ~30 to ~52 MB). A fixed 1 MB threshold
    keeps the process's memory at what the live requests hold. No-op off glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def server_config(app, params: ServeParams, **kwargs: Any):
    """The uvicorn configuration that enforces the connection limits of `params`: our guarded
    h11 protocol (see `guard`) instead of uvicorn's ``limit_concurrency``, which would answer
    every request 503 while idle sockets hold the connection slots."""
    import uvicorn

    limits = ConnectionLimits(
        params.header_timeout_s, params.max_connections, params.max_connections_per_client
    )
    kwargs.setdefault("log_level", "warning")
    return uvicorn.Config(
        app,
        host=params.host,
        port=params.port,
        http=guarded_protocol(limits),
        ws="none",
        timeout_keep_alive=params.keepalive_timeout_s,
        limit_concurrency=None,
        **kwargs,
    )


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="an .onnx file, a directory holding one, or models:/<name>@<alias> "
        "(default: serve.model in params.yaml)",
    )
    parser.add_argument(
        "--classifier",
        default=None,
        help="also serve /v1/classify with an exported classifier: classifier.onnx, its folder, "
        "or models:/facecal-classifier@champion (default: serve.classifier in params.yaml)",
    )
    parser.add_argument(
        "--host", default=None, help="bind address (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument(
        "--tensorrt",
        action="store_true",
        default=None,
        help="try onnxruntime's TensorRT provider first (GPU machines)",
    )
    parser.add_argument(
        "--fp16",
        action="store_true",
        default=None,
        help="on a GPU, serve generator_fp16.onnx from beside the model file",
    )
    parser.add_argument(
        "--no-batching",
        dest="batching",
        action="store_false",
        default=None,
        help="run every request on its own (no micro-batching)",
    )
    config.add_params_arguments(parser)
