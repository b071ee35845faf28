"""Request → model input: validate landmarks, decode uploads within the limits, align, render
(everything but the generator run), and the generator run for many items."""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from facecal import geometry, onnx_contract
from facecal.errors import FacecalError
from facecal.imageio import (
    RESPONSE_PNG_LEVEL,
    ImageError,
    ImageTooLarge,
    check_size,
    encode_png,
    read_image,
)
from facecal.serving.runtime import GeneratorRuntime, InputError
from facecal.serving.schemas import GenerateRequest
from facecal.serving.settings import ServeParams
from facecal.warp_mesh import face_region, warp_region

if TYPE_CHECKING:
    from facecal.serving.classifier_runtime import ClassifierRuntime


class Service(Protocol):
    """What the handlers here use of `facecal.serving.service.Service` (described, not imported:
    that module imports this one)."""

    runtime: GeneratorRuntime
    params: ServeParams
    classifier: ClassifierRuntime | None

    def detect(self, image: np.ndarray) -> Any: ...


# A landmark may lie outside its picture (a face at the border), but not by more than this many
# picture sizes: anything further is not a face, and would make the renderer draw huge shapes.
LANDMARK_MARGIN = 1.0
ERROR_ECHO_CHARS = 40


class RequestError(FacecalError):
    """A request the service understands but cannot serve (bad landmarks, no face, …)."""

    status = 422


class TooLarge(RequestError):
    status = 413


@dataclass
class Item:
    landmarks: np.ndarray  # S×S×3 uint8 landmark image
    reference: np.ndarray | None  # S×S×3 uint8 aligned reference, or None
    crop_points: np.ndarray  # 68×2 crop pixels (point archs: the target points)
    # Point archs: the reference's own landmarks (68×2 crop pixels); None with the default one.
    reference_points: np.ndarray | None = None
    # Point archs: the batcher returns (face, painted, mask) for this item instead of the face.
    parts: bool = False


# What `run_items` returns per item: the face, or (face, painted, mask) for an item with `parts`.
Generated = np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]


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
    params: ServeParams,
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
    req: GenerateRequest, runtime: GeneratorRuntime, params: ServeParams, where: str = "request"
) -> Item:
    """Validate one GenerateRequest and build the generator's input for it."""
    size = runtime.image_size
    try:
        pts = geometry.check_points(np.asarray(req.landmarks, np.float64), f"{where}.landmarks")
    except geometry.GeometryError as e:
        raise RequestError(str(e)) from None
    reference = reference_points = None
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
        if req.reference_landmarks is not None and (req.reference is None or not runtime.points):
            raise RequestError(
                f"{where}.reference_landmarks: only with a reference photo and a model that "
                f"warps it ({', '.join(onnx_contract.POINT_ARCHS)}; this one: {runtime.arch})"
            )
        if req.reference is not None:
            photo, _ = decode_image(req.reference, f"{where}.reference", params)
            if req.reference_landmarks is None:
                # The photo the landmarks come from: they are its own points (point archs).
                if photo.shape[:2] != (h, w):
                    raise RequestError(
                        f"{where}.reference: photo is {photo.shape[1]}×"
                        f"{photo.shape[0]}, image_size says {w}×{h}"
                    )
                reference_points, m_ref = crop, m
            else:
                # Another photo: aligned by its own points, as training aligned each face.
                field_name = f"{where}.reference_landmarks"
                try:  # check_points names the field itself
                    ref_pts = geometry.check_points(
                        np.asarray(req.reference_landmarks, np.float64), field_name
                    )
                except geometry.GeometryError as e:
                    raise RequestError(str(e)) from None
                check_range(ref_pts, photo.shape[1], photo.shape[0], field_name)
                try:
                    m_ref = geometry.crop_transform(ref_pts, size)
                except geometry.GeometryError as e:
                    raise RequestError(f"{field_name}: {e}") from None
                reference_points = geometry.apply_affine(m_ref, ref_pts)
                _check_crop(reference_points, size, where, "reference_landmarks")
            reference = geometry.warp_image(photo, m_ref, size)
    else:
        if req.image_size is not None:
            raise RequestError(f"{where}.image_size: only meaningful with frame 'image'")
        if req.reference_landmarks is not None:
            raise RequestError(f"{where}.reference_landmarks: only meaningful with frame 'image'")
        crop = pts
        if req.reference is not None:
            if runtime.points:
                raise RequestError(
                    f"{where}.reference: this {runtime.arch} model warps the reference from "
                    f"its own landmarks, which an aligned crop does not come with; send the "
                    f"photo with frame 'image' (its landmarks), or no reference"
                )
            reference, _ = decode_image(
                req.reference, f"{where}.reference", params, resize_to=(size, size)
            )
    _check_crop(crop, size, where)
    return Item(runtime.render(crop), reference, crop, reference_points)


def _check_crop(crop: np.ndarray, size: int, where: str, field: str = "landmarks") -> None:
    """Adversarial anchors can make the alignment wild (huge, or collapsing every point onto
    one): refuse those before drawing or warping."""
    label = f"{where}.{field} (crop frame)"
    try:
        geometry.check_points(crop, label)
    except geometry.GeometryError as e:
        raise RequestError(str(e)) from None
    check_range(crop, size, size, label)


def run_items(runtime: GeneratorRuntime, items: list[Item]) -> list[Generated]:
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
    if not runtime.points:
        out = runtime.generate(lm, ref)
        return list(out)
    src: list[np.ndarray] = []
    for it in items:
        p = it.reference_points if it.reference is not None else runtime.default_reference_points
        if p is None:
            raise InputError(
                "reference_points: a point-arch model needs the reference's own landmarks"
                + (" (the model carries no default)" if it.reference is None else "")
            )
        src.append(p)
    dst = np.stack([it.crop_points for it in items])
    faces, painted, mask = runtime.generate_parts(lm, ref, np.stack(src), dst)
    return [(faces[i], painted[i], mask[i]) if it.parts else faces[i] for i, it in enumerate(items)]


def clip(text: str, limit: int = ERROR_ECHO_CHARS) -> str:
    """`text` quoted for an error message, cut to `limit` characters (never echo an upload)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    """`image` shrunk (LANCZOS, as `decode_image`'s resize) to a longest side of `max_side`."""
    from PIL import Image

    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def b64png(image: np.ndarray) -> str:
    return base64.b64encode(encode_png(image, RESPONSE_PNG_LEVEL)).decode("ascii")


def intensify_photo(
    service: Service, data: bytes, emotion: str, intensity: float, output: str = "crop"
) -> dict[str, Any]:
    """Detect, calibrate, align and render for /v1/intensify (everything but the generator).
    ``output="photo"``: also the photo itself at its own resolution with the face warped to the
    calibrated landmarks (`warp_mesh.warp_region`, geometry only), under ``"photo"``; for a
    point arch (warp_refine) the caller composites the generator's painted face over it
    (`composite.composite_photo`, with ``"photo_to_crop"`` and ``"region"``).

    Point archs: the photo's own crop is the reference, so its reference points are the
    detected landmarks and its target points the calibrated ones (crop pixels)."""
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
    full = None
    if output == "photo":  # one full-resolution decode; dlib gets a shrunk copy of it
        full, (w, h) = decode_image(data, "image", params)
        work = shrink(full, params.detect_max_side)
    else:
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
    item = Item(
        lm_image,
        aligned if runtime.identity else None,
        crop_calibrated,
        crop_detected if runtime.points else None,
    )
    back = 1.0 / scale
    photo = region = None
    # Photo pixels → crop pixels: the crop transform of the (shrunk) detection copy after the
    # shrink's scale.
    photo_to_crop = geometry.compose(m, np.array([[scale, 0.0, 0.0], [0.0, scale, 0.0]]))
    if full is not None:
        region = x0, y0, x1, y1 = face_region(points * back, calibrated * back, w, h)
        if (x1 - x0) * (y1 - y0) > params.max_warp_pixels:
            raise TooLarge(
                f"image: output=photo: the face region is {x1 - x0}×{y1 - y0} pixels, above "
                f"serve.max_warp_pixels ({params.max_warp_pixels}); send a smaller photo or "
                "output=crop"
            )
        photo = warp_region(full, points * back, calibrated * back)
    t4 = time.perf_counter()
    return {
        "photo": photo,
        "item": item,
        "photo_to_crop": photo_to_crop,
        "region": region,
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
            "warp": round((t4 - t3) * 1e3, 2),
        },
    }


class NoClassifier(RequestError):
    """/v1/classify on a server started without --classifier."""

    status = 404


def classify_upload(service: Service, data: bytes, frame: str) -> dict[str, Any]:
    """/v1/classify: the upload's expression probabilities by the served classifier.

    ``photo``: found and aligned as the training faces were — dlib on the grey picture, the
    largest face, `geometry.crop_transform` + `warp_image` of the colour picture at the
    classifier's size (photos larger than ``detect_max_side`` are shrunk first, as for
    /v1/intensify). ``crop``: the upload already is such an aligned crop (a generated face,
    what the gen_* regimes train on), resized bicubically to the classifier's size if needed."""
    from PIL import Image

    classifier = service.classifier
    if classifier is None:
        raise NoClassifier("no classifier is loaded (start the server with --classifier)")
    if not data:
        raise RequestError("image: empty upload")
    size = classifier.image_size
    t0 = time.perf_counter()
    work, (w, h) = decode_image(
        data, "image", service.params, resize_to=service.params.detect_max_side
    )
    t1 = time.perf_counter()
    result: dict[str, Any] = {"frame": frame, "width": int(w), "height": int(h)}
    if frame == "crop":
        if work.shape[0] != work.shape[1]:
            raise RequestError(
                f"image: frame 'crop' expects a square aligned face crop, got "
                f"{work.shape[1]}×{work.shape[0]}"
            )
        crop = work
        if crop.shape[:2] != (size, size):
            im = Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC)
            crop = np.asarray(im)
        t2 = t1
    else:
        grey = np.asarray(Image.fromarray(work).convert("L"))  # training detected on grey
        faces = service.detect(grey)
        t2 = time.perf_counter()
        if not faces:
            raise RequestError(
                "image: no face found (dlib's frontal detector needs a roughly frontal, upright "
                "face; send an aligned crop with frame=crop)"
            )
        face = faces[0]
        try:
            m = geometry.crop_transform(geometry.check_points(face.points), size)
        except geometry.GeometryError as e:
            raise RequestError(f"image: the detected landmarks cannot be aligned ({e})") from None
        crop = geometry.warp_image(work, m, size)
        back = max(w, h) / max(work.shape[:2])
        result.update(faces=len(faces), box=[round(v * back, 2) for v in face.box])
    probs = classifier.probabilities(crop[None])[0].astype(np.float64)
    t3 = time.perf_counter()
    best = int(np.argmax(probs))
    result.update(
        {
            "emotion": classifier.classes[best],
            "confidence": round(float(probs[best]), 6),
            "probabilities": {c: float(p) for c, p in zip(classifier.classes, probs)},
            "classes": classifier.classes,
            "aligned": b64png(crop),
            "timings_ms": {
                "decode": round((t1 - t0) * 1e3, 2),
                "detect_align": round((t2 - t1) * 1e3, 2),
                "classify": round((t3 - t2) * 1e3, 2),
            },
        }
    )
    return result
