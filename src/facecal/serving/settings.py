"""`serve` params (params.yaml section ``serve``) and the memory bound they imply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from facecal import config
from facecal.serving.runtime import RuntimeOptions
from facecal.warp_mesh import REGION_BYTES_PER_PIXEL

SECTION = "serve"
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
# /v1/intensify with output=photo: the PNG of the photo (PIL's RGBX copy and the compressed
# bytes, which for noise reach the raw size) per pixel of the photo.
PHOTO_OUTPUT_BYTES_PER_PIXEL = 8
LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"]


@dataclass
class ServeParams:
    model: str = "models:/facecal-generator@champion"
    classifier: str | None = None  # /v1/classify: an exported classifier (file or models:/ URI)
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
    # output=photo: the face region warped at the photo's resolution may hold at most this
    # many pixels (larger: 413), which bounds its float buffers (REGION_BYTES_PER_PIXEL each).
    max_warp_pixels: int = 2_000_000
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
            "max_warp_pixels",
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
        + REGION_BYTES_PER_PIXEL * params.max_warp_pixels
        + PHOTO_OUTPUT_BYTES_PER_PIXEL * params.max_image_pixels
    )


def load_params(path=None, overrides: dict[str, Any] | None = None) -> ServeParams:
    return config.load_section(ServeParams, SECTION, path, overrides)
