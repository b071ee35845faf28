"""The HTTP endpoints, on an APIRouter; each gets the app's `Service` through `Depends`."""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime.
import asyncio
import time
from importlib import resources
from typing import Annotated, Any, Literal, cast

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from facecal.errors import FacecalError
from facecal.imageio import RESPONSE_PNG_LEVEL, encode_png
from facecal.serving.composite import composite_photo
from facecal.serving.preparation import (
    Item,
    TooLarge,
    b64png,
    classify_upload,
    intensify_photo,
    prepare,
    run_items,
)
from facecal.serving.schemas import BatchRequest, GenerateRequest
from facecal.serving.service import Service

STATIC = resources.files("facecal.serving") / "static"

router = APIRouter()


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
Format = Annotated[Literal["png", "json"], Query(description="png (default) or json")]
PNG: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"image/png": {}},
        "description": "the generated face (PNG), or JSON {image: base64 PNG, …} with ?format=json",
    }
}


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(str(STATIC / "index.html"), media_type="text/html")


@router.get("/healthz", summary="liveness and readiness")
async def healthz(service: ServiceDep):
    return {
        "status": "ok",
        "providers": service.runtime.providers,
        "uptime_s": round(time.time() - service.started, 3),
    }


@router.get("/v1/model", summary="the loaded model")
async def model_info(service: ServiceDep):
    params = service.params
    info = service.runtime.info()
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
            "classifier": service.classifier.info() if service.classifier else None,
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


@router.post("/v1/generate", summary="a face from 68 landmarks", responses=PNG)
async def generate(req: GenerateRequest, service: ServiceDep, format: Format = "png"):
    async with service.decode_slot(req.reference is not None):
        item = await run_in_threadpool(prepare, req, service.runtime, service.params)
    face = await service.generate_item(item)
    if format == "png":
        return Response(encode_png(face, RESPONSE_PNG_LEVEL), media_type="image/png")
    return {
        "image": b64png(face),
        "width": int(face.shape[1]),
        "height": int(face.shape[0]),
        "landmarks_crop": np.round(item.crop_points, 3).tolist(),
    }


@router.post("/v1/generate/batch", summary="faces from several landmark sets in one call")
async def generate_batch(req: BatchRequest, service: ServiceDep):
    runtime, params = service.runtime, service.params
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
                    "image": b64png(cast(np.ndarray, face)),  # no item asked for parts
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


@router.post("/v1/intensify", summary="intensify the expression of a face photo", responses=PNG)
async def intensify(
    image: Annotated[UploadFile, File(description="a face photo (PNG/JPEG/…)")],
    emotion: Annotated[str, Form(description="target emotion, e.g. happy")],
    service: ServiceDep,
    intensity: Annotated[
        float,
        Form(
            ge=0.0,
            le=1.0,
            allow_inf_nan=False,
            description="0 = the detected landmarks, 1 = fully calibrated to the gold template",
        ),
    ] = 1.0,
    output: Annotated[
        Literal["crop", "photo"],
        Form(
            description="crop: the generated aligned face crop; photo: the uploaded photo at "
            "its own resolution with the face warped to the calibrated landmarks (geometry "
            "only, no generator — except for a warp_refine model, whose painted face is "
            "blended over the warp where its mask says so; serve.max_warp_pixels bounds the "
            "face region)"
        ),
    ] = "crop",
    format: Format = "png",
):
    data = await image.read()
    async with service.decode_slot():
        result = await run_in_threadpool(intensify_photo, service, data, emotion, intensity, output)
    del data
    photo = result.pop("photo")
    photo_to_crop, region = result.pop("photo_to_crop"), result.pop("region")
    if photo is not None and service.runtime.points:
        # warp_refine: the generator's painted face and mask over the full-resolution warp.
        _, painted, mask = await service.generate_parts(result.pop("item"))
        t0 = time.perf_counter()
        photo = await run_in_threadpool(
            composite_photo, photo, painted, mask, photo_to_crop, region
        )
        result["timings_ms"]["composite"] = round((time.perf_counter() - t0) * 1e3, 2)
    if photo is not None:
        result.pop("item", None)  # pix2pix/pldt: the generator is not needed for the photo
        if format == "png":
            return Response(encode_png(photo, RESPONSE_PNG_LEVEL), media_type="image/png")
        return {"image": b64png(photo), "output": "photo", **result}
    face = await service.generate_item(result.pop("item"))
    if format == "png":
        return Response(encode_png(face, RESPONSE_PNG_LEVEL), media_type="image/png")
    return {"image": b64png(face), **result}


@router.post("/v1/classify", summary="the expression of a face photo (or an aligned crop)")
async def classify(
    image: Annotated[UploadFile, File(description="a face photo, or an aligned face crop")],
    service: ServiceDep,
    frame: Annotated[
        Literal["photo", "crop"],
        Form(
            description="photo: detect and align the largest face as the training faces were; "
            "crop: the image already is an aligned face crop (e.g. a generated face)"
        ),
    ] = "photo",
):
    data = await image.read()
    async with service.decode_slot():
        result = await asyncio.wait_for(
            run_in_threadpool(classify_upload, service, data, frame),
            service.params.request_timeout_s,
        )
    del data
    return result
