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
* ``GET /`` — the web page (`static/`).

Concurrent single-face requests are batched (`batching.MicroBatcher`). Every bad request gets
a 4xx JSON answer ``{"error": kind, "detail": …}``: bodies over ``max_body_bytes`` are cut off
while they stream in, bodies not complete ``body_timeout_s`` after the headers get 408,
images over ``max_image_pixels``, ``max_image_side`` or ``max_image_aspect`` are refused from
their header before decoding, landmarks outside a plausible range and batches over
``max_batch`` are refused. Connection limits, header deadlines and the Host allow-list are in
`guard`.

Memory: one request holds at most its body (≤ ``max_body_bytes``, about 4× that while JSON and
base64 are parsed), one decoded image (≤ `DECODE_BYTES_PER_PIXEL` × ``max_image_pixels``: the
measured peak of `imageio.read_image`, its resize included, 16-bit and RGBA input too) and, for
/v1/intensify, dlib's detection on the ≤ ``detect_max_side`` copy (`DETECT_BYTES_PER_PIXEL` per
pixel of its upsampled image) — `request_memory_bound`, ≈ 260 MB with the default params.
Side and aspect limits keep every resize kernel small (a 16 M × 1 picture would need ~0.8 GB of
LANCZOS coefficients); uploads are shrunk inside the decoder (JPEG: at a reduced libjpeg
scale), and at most ``max_decodes`` requests decode at once (the others wait, within
``request_timeout_s``).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime,
# and some of them name objects local to `create_app`.
import asyncio
import base64
import binascii
import json
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from facecal import config, geometry
from facecal.errors import FacecalError
from facecal.imageio import ImageError, ImageTooLarge, check_size, encode_png, read_image
from facecal.serving.batching import MicroBatcher, Overloaded
from facecal.serving.guard import ConnectionLimits, Guard, guarded_protocol
from facecal.serving.runtime import GeneratorRuntime, InputError, RuntimeOptions

SECTION = "serve"
# A landmark may lie outside its picture (a face at the border), but not by more than this many
# picture sizes: anything further is not a face, and would make the renderer draw huge shapes.
LANDMARK_MARGIN = 1.0
MAX_IMAGE_SIDE = 20_000
# Peak bytes per pixel of one decode (`imageio.read_image`: PIL's 4-byte RGBX, its bytes export,
# our copy; 16-bit and RGBA input a little more): measured 6.4–10.1; the bound is asserted in
# tests/test_serving_hostile.py.
DECODE_BYTES_PER_PIXEL = 12
# dlib's HOG pyramid per pixel of the (upsampled) detection image: measured 5.6.
DETECT_BYTES_PER_PIXEL = 8
# The body while it is parsed: raw bytes, the JSON string of a base64 reference, its decoded
# bytes, and Starlette's copy.
BODY_COPIES = 4
LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"]
ERROR_ECHO_CHARS = 40


@dataclass
class ServeParams:
    model: str = "models:/facecal-generator@champion"
    host: str = "127.0.0.1"
    port: int = 8000
    tensorrt: bool = False
    fp16: bool = False
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    ort_spinning: bool = False
    warmup_batches: list[int] = field(default_factory=lambda: [1])
    batching: bool = True
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_inflight: int = 2
    max_queue: int = 1024
    max_concurrency: int = 256
    max_connections: int = 512
    max_connections_per_client: int = 32
    header_timeout_s: float = 10.0
    keepalive_timeout_s: int = 5  # uvicorn takes whole seconds
    allowed_hosts: list[str] = field(default_factory=lambda: list(LOOPBACK_NAMES))
    max_body_bytes: int = 8_000_000
    body_timeout_s: float = 30.0
    max_image_pixels: int = 16_000_000
    max_image_side: int = 8192
    max_image_aspect: float = 8.0
    max_decodes: int = 2
    detect_max_side: int = 1024
    detector_upsample: int = 1
    request_timeout_s: float = 30.0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_batch",
            "max_inflight",
            "max_queue",
            "max_concurrency",
            "max_connections",
            "max_connections_per_client",
            "max_body_bytes",
            "max_image_pixels",
            "max_image_side",
            "max_decodes",
            "detect_max_side",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be ≥ 0, got {self.max_wait_ms}")
        for name in (
            "request_timeout_s",
            "body_timeout_s",
            "header_timeout_s",
            "keepalive_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_image_aspect < 1:
            raise ValueError(f"max_image_aspect must be ≥ 1, got {self.max_image_aspect}")
        if not self.allowed_hosts:
            raise ValueError("allowed_hosts is empty: no request could be served ('*' = any)")

    def runtime_options(self) -> RuntimeOptions:
        return RuntimeOptions(
            tensorrt=self.tensorrt,
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            allow_spinning=self.ort_spinning,
            warmup_batches=list(self.warmup_batches),
            prefer_fp16=self.fp16,
            cache_dir=self.cache_dir,
        )


def request_memory_bound(params: ServeParams) -> int:
    """Bytes one request may hold at its peak (see the module docstring)."""
    detect_side = params.detect_max_side * 2**params.detector_upsample
    return (
        BODY_COPIES * params.max_body_bytes
        + DECODE_BYTES_PER_PIXEL * params.max_image_pixels
        + DETECT_BYTES_PER_PIXEL * detect_side**2
    )


def load_params(path=None, overrides: dict[str, Any] | None = None) -> ServeParams:
    return config.load_section(ServeParams, SECTION, path, overrides)


class RequestError(FacecalError):
    """A request the service understands but cannot serve (bad landmarks, no face, …)."""

    status = 422


class TooLarge(RequestError):
    status = 413


# --------------------------------------------------------------------------- request schemas


Coord = Annotated[float, Field(allow_inf_nan=False)]
Point = Annotated[list[Coord], Field(min_length=2, max_length=2)]


class GenerateRequest(BaseModel):
    """68 landmarks (iBUG order, x = column, y = row) of one face."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": []})
    landmarks: Annotated[
        list[Point], Field(min_length=68, max_length=68, description="68 [x, y] points")
    ]
    frame: Literal["crop", "image"] = Field(
        "crop",
        description="crop: pixels of the model's aligned face crop (see "
        "/v1/model input_size); image: pixels of a photo of size "
        "image_size, aligned here exactly as the training faces were",
    )
    image_size: (
        Annotated[
            list[Annotated[int, Field(ge=1, le=MAX_IMAGE_SIDE)]],
            Field(min_length=2, max_length=2),
        ]
        | None
    ) = Field(None, description="[width, height] of the photo (frame 'image' only)")
    reference: str | None = Field(
        None,
        description="identity models: base64 PNG/JPEG of the subject's face — the "
        "aligned crop (frame 'crop') or the photo the landmarks come "
        "from (frame 'image'); default: the model's average face",
    )


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: Annotated[list[GenerateRequest], Field(min_length=1)]


# --------------------------------------------------------------------------- request → model input


@dataclass
class Item:
    landmarks: np.ndarray  # S×S×3 uint8 landmark image
    reference: np.ndarray | None  # S×S×3 uint8 aligned reference, or None
    crop_points: np.ndarray  # 68×2 crop pixels


def check_range(points: np.ndarray, width: float, height: float, what: str) -> None:
    lo = -LANDMARK_MARGIN * np.array([width, height])
    hi = (1 + LANDMARK_MARGIN) * np.array([width, height])
    bad = np.nonzero(((points < lo) | (points > hi)).any(-1))[0]
    if len(bad):
        raise RequestError(
            f"{what}: point {int(bad[0])} {points[bad[0]].tolist()} lies outside "
            f"x ∈ [{lo[0]:g}, {hi[0]:g}], y ∈ [{lo[1]:g}, {hi[1]:g}]"
        )


def decode_image(
    data: str | bytes,
    what: str,
    params: "ServeParams",
    resize_to: int | tuple[int, int] | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """(upright RGB pixels, full-resolution (width, height)) of an upload, within the limits
    (`resize_to` as in `imageio.read_image`)."""
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{what}: not valid base64") from None
    try:
        picture = read_image(
            data,
            "RGB",
            params.max_image_pixels,
            max_side=params.max_image_side,
            max_aspect=params.max_image_aspect,
            resize_to=resize_to,
        )
    except ImageError as e:
        big = isinstance(e, ImageTooLarge) or "too large" in e.reason
        raise (TooLarge if big else RequestError)(f"{what}: {e.reason}") from None
    return picture.pixels, (picture.width, picture.height)


def prepare(
    req: GenerateRequest, runtime: GeneratorRuntime, params: "ServeParams", where: str = "request"
) -> Item:
    """Validate one GenerateRequest and build the generator's input for it."""
    size = runtime.image_size
    try:
        pts = geometry.check_points(np.asarray(req.landmarks, np.float64), f"{where}.landmarks")
    except geometry.GeometryError as e:
        raise RequestError(str(e)) from None
    reference = None
    if req.reference is not None and not runtime.identity:
        raise RequestError(f"{where}.reference: this model takes no reference face")
    if req.frame == "image":
        if req.image_size is None:
            raise RequestError(f"{where}.image_size: required with frame 'image'")
        w, h = req.image_size
        try:
            check_size(
                f"{where}.image_size",
                w,
                h,
                params.max_image_pixels,
                params.max_image_side,
                params.max_image_aspect,
            )
        except ImageTooLarge as e:
            raise TooLarge(str(e)) from None
        check_range(pts, w, h, f"{where}.landmarks")
        try:
            m = geometry.crop_transform(pts, size)
        except geometry.GeometryError as e:
            raise RequestError(f"{where}.landmarks: {e}") from None
        crop = geometry.apply_affine(m, pts)
        _check_crop(crop, size, where)  # before warping anything with `m`
        if req.reference is not None:
            photo, _ = decode_image(req.reference, f"{where}.reference", params)
            if photo.shape[:2] != (h, w):
                raise RequestError(
                    f"{where}.reference: photo is {photo.shape[1]}×"
                    f"{photo.shape[0]}, image_size says {w}×{h}"
                )
            reference = geometry.warp_image(photo, m, size)
    else:
        if req.image_size is not None:
            raise RequestError(f"{where}.image_size: only meaningful with frame 'image'")
        crop = pts
        if req.reference is not None:
            reference, _ = decode_image(
                req.reference, f"{where}.reference", params, resize_to=(size, size)
            )
    _check_crop(crop, size, where)
    return Item(runtime.render(crop), reference, crop)


def _check_crop(crop: np.ndarray, size: int, where: str) -> None:
    """Adversarial anchors can make the alignment wild (huge, or collapsing every point onto
    one): refuse those before drawing or warping."""
    try:
        geometry.check_points(crop, f"{where}.landmarks (crop frame)")
    except geometry.GeometryError as e:
        raise RequestError(str(e)) from None
    check_range(crop, size, size, f"{where}.landmarks (crop frame)")


def run_items(runtime: GeneratorRuntime, items: list[Item]) -> list[np.ndarray]:
    """One generator run for many items (the batcher's worker)."""
    lm = np.stack([it.landmarks for it in items])
    ref = None
    if runtime.identity:
        default = runtime.default_reference
        refs: list[np.ndarray] = []
        for it in items:
            r = it.reference if it.reference is not None else default
            if r is None:
                raise InputError("this model needs a reference face and carries no default")
            refs.append(r)
        ref = np.stack(refs)
    out = runtime.generate(lm, ref)
    return list(out)


def clip(text: str, limit: int = ERROR_ECHO_CHARS) -> str:
    """`text` quoted for an error message, cut to `limit` characters (never echo an upload)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def b64png(image: np.ndarray) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


# --------------------------------------------------------------------------- the service


class Service:
    """Everything a request handler needs: runtime, batcher, detector, limits."""

    def __init__(self, runtime: GeneratorRuntime, params: ServeParams, detector=None):
        self.runtime = runtime
        self.params = params
        self.batcher = (
            MicroBatcher(
                lambda items: run_items(runtime, list(items)),
                params.max_batch,
                params.max_wait_ms / 1000.0,
                params.max_queue,
                params.max_inflight,
            )
            if params.batching and params.max_batch > 1
            else None
        )
        self._detector = detector
        self._detector_lock = threading.Lock()
        self._decodes = asyncio.Semaphore(params.max_decodes)
        self.started = time.time()

    @asynccontextmanager
    async def decode_slot(self, needed: bool = True):
        """One of ``max_decodes`` slots for work that decodes an upload (others wait, up to
        ``request_timeout_s``: then 503 like any request the model cannot answer in time)."""
        if not needed:
            yield
            return
        await asyncio.wait_for(self._decodes.acquire(), self.params.request_timeout_s)
        try:
            yield
        finally:
            self._decodes.release()

    def detector(self):
        with self._detector_lock:
            if self._detector is None:
                from facecal.detector import LandmarkDetector

                self._detector = LandmarkDetector(self.params.detector_upsample)
            return self._detector

    def detect(self, image: np.ndarray):
        det = self.detector()
        with self._detector_lock:  # dlib objects are not documented as thread-safe
            return det.detect(image)

    async def generate_item(self, item: Item) -> np.ndarray:
        timeout = self.params.request_timeout_s
        if self.batcher is not None:
            return await asyncio.wait_for(self.batcher.submit(item), timeout)
        return await asyncio.wait_for(
            asyncio.to_thread(lambda: run_items(self.runtime, [item])[0]), timeout
        )


def _error(status: int, kind: str, detail: Any):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": kind, "detail": detail}, status_code=status)


class BodyLimit:
    """ASGI middleware: refuses bodies over `max_bytes` (by Content-Length up front, and by
    counting while they stream in, so chunked uploads cannot bypass it) with 413 JSON, and
    bodies that stall for `timeout_s` (a client that declared more than it sends) with 408."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 10.0):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0 or declared > self.max_bytes:
                return await self._refuse(send, declared)
        state = {"received": 0, "started": False, "refused": False, "body_done": False}

        async def limited_receive():
            if state["body_done"]:
                return await receive()  # e.g. Starlette listening for a disconnect
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                if not state["started"]:
                    await self._refuse(send, state["received"], timeout=True)
                    state["refused"] = True
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                state["body_done"] = not message.get("more_body", False)
                if state["received"] > self.max_bytes:
                    if not state["started"]:
                        await self._refuse(send, state["received"])
                        state["refused"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["refused"]:
                return  # we already answered; drop what the app says after the disconnect
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["refused"]:
                raise

    async def _refuse(self, send, size: int, timeout: bool = False) -> None:
        if timeout:
            status, kind = 408, "body_timeout"
            detail = f"request body stalled: nothing received for {self.timeout_s:g} s"
        elif size >= 0:
            status, kind = 413, "body_too_large"
            detail = f"request body of {size} bytes exceeds the limit of {self.max_bytes}"
        else:
            status, kind, detail = 400, "bad_request", "invalid Content-Length"
        body = json.dumps({"error": kind, "detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_app(runtime: GeneratorRuntime, params: ServeParams | None = None, detector=None):
    """The FastAPI application around a loaded runtime."""
    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    params = params or ServeParams()
    service = Service(runtime, params, detector)

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

    static = resources.files("facecal.serving") / "static"

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/healthz", summary="liveness and readiness")
    async def healthz():
        return {
            "status": "ok",
            "providers": runtime.providers,
            "uptime_s": round(time.time() - service.started, 3),
        }

    @app.get("/v1/model", summary="the loaded model")
    async def model_info():
        info = runtime.info()
        stats = service.batcher.stats if service.batcher else None
        info.update(
            {
                "batching": {
                    "enabled": service.batcher is not None,
                    "max_batch": params.max_batch,
                    "max_wait_ms": params.max_wait_ms,
                    "batches": stats.batches if stats else 0,
                    "items": stats.items if stats else 0,
                    "largest_batch": stats.max_seen if stats else 0,
                },
                "limits": {
                    "max_body_bytes": params.max_body_bytes,
                    "max_image_pixels": params.max_image_pixels,
                    "max_image_side": params.max_image_side,
                    "max_image_aspect": params.max_image_aspect,
                    "max_batch": params.max_batch,
                },
            }
        )
        return info

    png: dict[int | str, dict[str, Any]] = {
        200: {
            "content": {"image/png": {}},
            "description": "the generated face (PNG), or "
            "JSON {image: base64 PNG, …} with ?format=json",
        }
    }
    Format = Annotated[Literal["png", "json"], Query(description="png (default) or json")]

    @app.post("/v1/generate", summary="a face from 68 landmarks", responses=png)
    async def generate(req: GenerateRequest, format: Format = "png"):
        async with service.decode_slot(req.reference is not None):
            item = await run_in_threadpool(prepare, req, runtime, params)
        face = await service.generate_item(item)
        if format == "png":
            return Response(encode_png(face), media_type="image/png")
        return {
            "image": b64png(face),
            "width": int(face.shape[1]),
            "height": int(face.shape[0]),
            "landmarks_crop": np.round(item.crop_points, 3).tolist(),
        }

    @app.post("/v1/generate/batch", summary="faces from several landmark sets in one call")
    async def generate_batch(req: BatchRequest):
        if len(req.items) > params.max_batch:
            raise TooLarge(f"items: {len(req.items)} faces exceed max_batch {params.max_batch}")

        def work():
            results: list[dict[str, Any]] = [{} for _ in req.items]
            good: list[tuple[int, Item]] = []
            for i, r in enumerate(req.items):
                try:
                    good.append((i, prepare(r, runtime, params, f"items[{i}]")))
                except FacecalError as e:  # one bad item never costs the others their result
                    results[i] = {"error": type(e).__name__, "detail": str(e)}
            if good:
                faces = run_items(runtime, [it for _, it in good])
                for (i, it), face in zip(good, faces):
                    results[i] = {
                        "image": b64png(face),
                        "landmarks_crop": np.round(it.crop_points, 3).tolist(),
                    }
            return results

        async with service.decode_slot(any(r.reference is not None for r in req.items)):
            results = await asyncio.wait_for(run_in_threadpool(work), params.request_timeout_s)
        return {
            "results": results,
            "count": len(results),
            "failed": sum(1 for r in results if "error" in r),
        }

    @app.post("/v1/intensify", summary="intensify the expression of a face photo", responses=png)
    async def intensify(
        image: Annotated[UploadFile, File(description="a face photo (PNG/JPEG/…)")],
        emotion: Annotated[str, Form(description="target emotion, e.g. happy")],
        intensity: Annotated[
            float,
            Form(
                ge=0.0,
                le=1.0,
                allow_inf_nan=False,
                description="0 = the detected landmarks, 1 = fully calibrated to the gold template",
            ),
        ] = 1.0,
        format: Format = "png",
    ):
        data = await image.read()
        async with service.decode_slot():
            result = await run_in_threadpool(intensify_photo, service, data, emotion, intensity)
        del data
        face = await service.generate_item(result.pop("item"))
        if format == "png":
            return Response(encode_png(face), media_type="image/png")
        return {"image": b64png(face), **result}

    return app


def intensify_photo(
    service: Service, data: bytes, emotion: str, intensity: float
) -> dict[str, Any]:
    """Detect, calibrate, align and render for /v1/intensify (everything but the generator)."""
    from facecal.emotions import UnknownEmotion, normalize_emotion

    runtime, params = service.runtime, service.params
    t0 = time.perf_counter()
    try:
        emotion = normalize_emotion(emotion)
    except UnknownEmotion:
        raise RequestError(
            f"emotion: unknown emotion label {clip(emotion)}; available: {runtime.emotions}"
        ) from None
    if emotion not in runtime.emotions:
        raise RequestError(
            f"emotion: no gold template for {emotion!r} in this model; "
            f"available: {runtime.emotions}"
        )
    if not data:
        raise RequestError("image: empty upload")
    # Detect on a bounded copy: dlib's time grows with pixels, and the crop is tiny anyway (a
    # JPEG is decoded at the libjpeg scale just above that copy's size).
    work, (w, h) = decode_image(data, "image", params, resize_to=params.detect_max_side)
    scale = min(1.0, params.detect_max_side / max(h, w))
    t1 = time.perf_counter()
    faces = service.detect(work)
    t2 = time.perf_counter()
    if not faces:
        raise RequestError(
            "image: no face found (dlib's frontal detector needs a roughly frontal, upright face)"
        )
    face = faces[0]
    points = face.points
    try:
        # The subject's own neutral shape is unknown here: pca measures from the mean neutral.
        calibrated = runtime.calibrate(points, emotion, float(intensity))
        m = geometry.crop_transform(points, runtime.image_size)
    except (InputError, geometry.GeometryError) as e:
        raise RequestError(f"image: the detected landmarks cannot be calibrated ({e})") from None
    crop_detected = geometry.apply_affine(m, points)
    crop_calibrated = geometry.apply_affine(m, calibrated)
    size = runtime.image_size
    check_range(crop_calibrated, size, size, "calibrated landmarks (crop frame)")
    lm_image = runtime.render(crop_calibrated)
    aligned = geometry.warp_image(work, m, size)
    t3 = time.perf_counter()
    item = Item(lm_image, aligned if runtime.identity else None, crop_calibrated)
    back = 1.0 / scale
    return {
        "item": item,
        "emotion": emotion,
        "intensity": float(intensity),
        "width": int(w),
        "height": int(h),
        "faces": len(faces),
        "box": [round(v * back, 2) for v in face.box],
        "detected": np.round(points * back, 3).tolist(),
        "calibrated": np.round(calibrated * back, 3).tolist(),
        "crop": {
            "size": size,
            "detected": np.round(crop_detected, 3).tolist(),
            "calibrated": np.round(crop_calibrated, 3).tolist(),
        },
        "aligned": b64png(aligned),
        "landmark_image": b64png(lm_image),
        "timings_ms": {
            "decode": round((t1 - t0) * 1e3, 2),
            "detect": round((t2 - t1) * 1e3, 2),
            "calibrate_render": round((t3 - t2) * 1e3, 2),
        },
    }


def build(params: ServeParams, detector=None):
    """Load the model named in `params` and wrap it in the app (with the request guard)."""
    runtime = GeneratorRuntime(params.model, params.runtime_options())
    return guard(create_app(runtime, params, detector), params), runtime


def guard(app, params: ServeParams) -> Guard:
    return Guard(
        app,
        params.max_body_bytes,
        params.body_timeout_s,
        params.allowed_hosts,
        params.max_concurrency,
    )


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


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="an .onnx file, a directory holding one, or models:/<name>@<alias> "
        "(default: serve.model in params.yaml)",
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


def main(args) -> int:
    import uvicorn

    params = config.params_from_args(args, ServeParams, SECTION)
    for key in ("model", "host", "port", "tensorrt", "fp16", "batching"):
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
    uvicorn.Server(server_config(app, params)).run()
    return 0
