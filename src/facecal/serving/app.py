"""`facecal serve`: the generator over HTTP (FastAPI + uvicorn) and a web page for people.

Endpoints (OpenAPI docs at ``/docs``, schema at ``/openapi.json``):

* ``GET /healthz`` — liveness and readiness.
* ``GET /v1/model`` — name, version, alias, active providers, input size, emotions.
* ``POST /v1/generate`` — 68 landmarks (crop pixels, or image pixels plus the image size) →
  PNG face; ``?format=json`` → JSON with the PNG in base64.
* ``POST /v1/generate/batch`` — up to ``max_batch`` such requests in one call.
* ``POST /v1/intensify`` — a face photo + emotion + intensity: dlib landmarks → calibrated
  toward the emotion's gold template (`facecal.calibration.GoldModel`: the method that made
  gold.json — aligned quadratic warp or pca expression direction — blended by intensity) →
  generated face.
* ``POST /v1/classify`` — a face photo (or, with ``frame=crop``, an aligned crop such as a
  generated face) → the served classifier's emotion and every class probability; 404 when the
  server was started without ``--classifier``.
* ``GET /`` — the web page (`static/`).

Concurrent single-face requests are batched (`batching.MicroBatcher`). Every bad request gets
a 4xx JSON answer ``{"error": kind, "detail": …}``: bodies over ``max_body_bytes`` are cut off
while they stream in, bodies not complete ``body_timeout_s`` after the headers get 408,
images over ``max_image_pixels``, ``max_image_side`` or ``max_image_aspect`` are refused from
their header before decoding, landmarks outside a plausible range and batches over
``max_batch`` are refused. Connection limits, header deadlines and the Host allow-list are in
`guard`.

Modules: `settings` (ServeParams), `schemas` (request models), `preparation` (request → model
input), `service` (what handlers share), `routes` (the endpoints), `guard` (connection and
request limits), `cli` (`facecal serve`); this one assembles the app.

Memory: one request holds at most its body (≤ ``max_body_bytes``, about 4× that while JSON and
base64 are parsed), one decoded image (≤ `DECODE_BYTES_PER_PIXEL` × ``max_image_pixels``: the
measured peak of `imageio.read_image`, its resize included, 16-bit and RGBA input too) and, for
/v1/intensify, dlib's detection on the ≤ ``detect_max_side`` copy (`DETECT_BYTES_PER_PIXEL` per
pixel of its upsampled image), and with ``output=photo`` the face region warped at the photo's
resolution (≤ ``max_warp_pixels``, `warp.REGION_BYTES_PER_PIXEL` each) and the photo's PNG —
`settings.request_memory_bound`, ≈ 514 MB with the default params.
Side and aspect limits keep every resize kernel small (a 16 M × 1 picture would need ~0.8 GB of
LANCZOS coefficients); uploads are shrunk inside the decoder (JPEG: at a reduced libjpeg
scale), and at most ``max_decodes`` requests decode at once (the others wait, within
``request_timeout_s``).
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import asynccontextmanager
from typing import Any

from facecal import config
from facecal.errors import FacecalError
from facecal.serving.batching import Overloaded
from facecal.serving.classifier_runtime import ClassifierRuntime
from facecal.serving.cli import add_arguments, return_freed_memory, server_config
from facecal.serving.guard import Guard
from facecal.serving.routes import STATIC, router
from facecal.serving.runtime import GeneratorRuntime
from facecal.serving.service import Service
from facecal.serving.settings import (
    DECODE_BYTES_PER_PIXEL,
    DETECT_BYTES_PER_PIXEL,
    SECTION,
    ServeParams,
    load_params,
    request_memory_bound,
)

__all__ = [
    "DECODE_BYTES_PER_PIXEL",
    "DETECT_BYTES_PER_PIXEL",
    "ServeParams",
    "add_arguments",
    "build",
    "create_app",
    "guard",
    "load_params",
    "main",
    "request_memory_bound",
    "return_freed_memory",
    "server_config",
]


def create_app(
    runtime: GeneratorRuntime,
    params: ServeParams | None = None,
    detector=None,
    classifier: ClassifierRuntime | None = None,
):
    """The FastAPI application around a loaded runtime (and, optionally, a classifier)."""
    from fastapi import FastAPI, Request
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    params = params or ServeParams()
    service = Service(runtime, params, detector, classifier)

    @asynccontextmanager
    async def lifespan(app):
        if service.batcher is not None:
            await service.batcher.start()
        # Load dlib's model in the background: the first /v1/intensify should not pay for it.
        preload = asyncio.get_running_loop().run_in_executor(None, service.detector)
        try:
            yield
        finally:
            if service.batcher is not None:
                await service.batcher.stop()
            preload.cancel()

    app = FastAPI(
        title="facecal generator service",
        version="1",
        description="Landmark-to-face generation from the exported ONNX generator: generate a "
        "face from 68 landmarks, or intensify the expression of an uploaded photo "
        "(dlib landmarks → calibration toward the emotion's gold template → "
        "generated face).",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        errors = []
        for e in exc.errors():
            # Echoing 'input' back would return whole uploads; 'ctx' may hold exceptions.
            item = {k: v for k, v in e.items() if k in ("type", "loc", "msg")}
            errors.append(jsonable_encoder(item))
        return _error(422, "invalid_request", errors)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, "http_error", exc.detail)

    @app.exception_handler(FacecalError)
    async def on_facecal(request: Request, exc: FacecalError):
        status = getattr(exc, "status", 422)
        return _error(status, type(exc).__name__, str(exc))

    @app.exception_handler(Overloaded)
    async def on_overloaded(request: Request, exc: Overloaded):
        return _error(503, "overloaded", str(exc))

    @app.exception_handler(asyncio.TimeoutError)
    async def on_timeout(request: Request, exc: asyncio.TimeoutError):
        return _error(503, "timeout", f"no result within {params.request_timeout_s} s")

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


def build(params: ServeParams, detector=None):
    """Load the model named in `params` and wrap it in the app (with the request guard)."""
    runtime = GeneratorRuntime(params.model, params.runtime_options())
    classifier = (
        ClassifierRuntime(params.classifier, params.runtime_options())
        if params.classifier
        else None
    )
    return guard(create_app(runtime, params, detector, classifier), params), runtime


def main(args) -> int:
    import uvicorn

    params = config.params_from_args(args, ServeParams, SECTION)
    for key in ("model", "classifier", "host", "port", "tensorrt", "fp16", "batching"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(params, key, value)
    return_freed_memory()
    app, runtime = build(params)
    info = runtime.info()
    print(
        f"serve: {info['uri']} ({info['file']}, {info['precision']}) on "
        f"{', '.join(runtime.providers)}; http://{params.host}:{params.port}/",
        file=sys.stderr,
    )
    service = getattr(app, "app", app).state.service
    if service.classifier is not None:
        print(f"serve: classifier {service.classifier.describe()} on /v1/classify", file=sys.stderr)
    uvicorn.Server(server_config(app, params)).run()
    return 0


def guard(app, params: ServeParams) -> Guard:
    return Guard(
        app,
        params.max_body_bytes,
        params.body_timeout_s,
        params.allowed_hosts,
        params.max_concurrency,
    )


def _error(status: int, kind: str, detail: Any):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": kind, "detail": detail}, status_code=status)
