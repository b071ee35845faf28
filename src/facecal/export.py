"""Stage `export`: the generator as a self-contained ONNX model for serving.

The graph takes what a client has and returns what it can show, so nothing but the .onnx file
is needed at serving time (no torch, no pickles, no side files):

* inputs ``landmarks`` — uint8 N×H×W×3 landmark image drawn by `facecal.render` in the crop frame
  of `facecal.geometry`; with identity conditioning also ``reference`` — uint8 N×H×W×3 aligned
  crop of the subject's face. The [0, 255] → [−1, 1] scaling, NHWC → NCHW and the channel
  concatenation happen inside the graph.
* outputs ``image`` — float32 N×H×W×3 in [0, 1], and ``image_u8`` — the same rounded to uint8.
* point archs (``warp_refine``, `onnx_contract.POINT_ARCHS`) also take ``reference_points`` and
  ``target_points`` — float32 N×68×2, the reference's own and the target landmarks in pixels of
  the H×W crop — and also return the generator's parts, ``painted`` (float32 N×H×W×3 in [0, 1])
  and ``mask`` (float32 N×H×W×1 in [0, 1]; image = mask·warped + (1 − mask)·painted), so that
  serving can composite them over a full-resolution warp of a photo.
* the batch axis is dynamic; H = W = the generator's image size.

``metadata_props`` carry what serving needs besides the weights: ``facecal.config`` (the
generator.json), ``facecal.gold`` (the gold landmark templates, canonical frame), with identity
``facecal.reference_png`` (a default reference face, base64 PNG, for requests without a photo),
for point archs ``facecal.reference_points`` (that face's landmarks, crop pixels, JSON 68×2),
and ``facecal.io`` (the I/O contract above).

``generator_fp16.onnx`` (for GPUs) computes the network in float16 but keeps the uint8 → float
scaling, the output denormalisation and, with ``fp16_norm_fp32``, every normalisation layer in
float32 — and, for point archs, the warp (a sampling grid in fp16 would be off by a good
fraction of a pixel at 64² and more at larger crops; it has no weights to halve anyway). Its
parity against the fp32 torch model is measured and written to
``metrics/export.json`` next to the fp32 one. Note that onnxruntime's CPU provider runs fp16
convolutions by casting them to fp32, so on a machine without CUDA the fp16 figure measures only
the rounding of weights and of the activations between layers, not fp16 arithmetic.
"""

from __future__ import annotations

import base64
import copy
import csv
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from facecal import config, geometry, render, tracking
from facecal.imageio import encode_png, load_image
from facecal.jsonio import write_json
from facecal.onnx_contract import (
    FORMAT_VERSION,
    INPUT_LANDMARKS,
    INPUT_REFERENCE,
    INPUT_REFERENCE_POINTS,
    INPUT_TARGET_POINTS,
    META_CONFIG,
    META_FORMAT,
    META_GENERATOR_HASH,
    META_GOLD,
    META_IO,
    META_REFERENCE,
    META_REFERENCE_POINTS,
    OUTPUT_IMAGE,
    OUTPUT_IMAGE_U8,
    OUTPUT_MASK,
    ExportError,
    attach_metadata,
    base_seed,
    calibratable_emotions,
    file_info,
    input_names,
    onnx_session,
    output_names,
    takes_points,
)
from facecal.pair_files import POINTS_FILE

SECTION = "export"
GAN_DIR = Path("outputs/gan")
GOLD_PATH = Path("outputs/calibrate/gold.json")
PAIRS_DIR = Path("outputs/pairs")
OUT_DIR = Path("outputs/export")
METRICS_PATH = Path("metrics/export.json")
ONNX_FILE = "generator.onnx"
ONNX_FP16_FILE = "generator_fp16.onnx"
MODEL_JSON = "model.json"


# ONNX protobufs cannot exceed 2 GiB; above that the weights go to a side file.
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2


@dataclass
class ExportParams:
    opset: int = 18
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    fp16: bool = True
    fp16_norm_fp32: bool = True
    parity_atol: float = 1e-4
    fp16_parity_atol: float = 0.02
    parity_batch: int = 8
    reference: str = "train_neutral_mean"

    def __post_init__(self) -> None:
        if self.opset < 18:
            raise ValueError(f"opset must be ≥ 18, got {self.opset}")
        if self.parity_batch < 2:
            # ≥ 2 so the parity batch also exercises the dynamic batch axis.
            raise ValueError(f"parity_batch must be ≥ 2, got {self.parity_batch}")


def load_params(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> ExportParams:
    return config.load_section(ExportParams, SECTION, path, overrides)


# --------------------------------------------------------------------------- graph wrappers


def _torch():
    import torch

    return torch


def serving_module(
    generator, identity: bool, fp16: bool = False, norm_fp32: bool = True, points: bool = False
):
    """`generator` wrapped to take uint8 NHWC images and return (float [0, 1], uint8) NHWC.

    With ``fp16`` the wrapped copy holds float16 weights; the pixel scaling on both ends stays
    in float32 (and the normalisation layers with ``norm_fp32``). With ``points`` (a point
    arch: `generator.parts(x, src, dst)`) it also takes (reference points, target points) in
    crop pixels and also returns (painted in [0, 1], mask in [0, 1]) NHWC; in fp16 the warp and
    the final composition stay in float32.
    """
    torch = _torch()
    from torch import nn

    class KeepFp32(nn.Module):
        """Runs a layer in float32 inside a float16 network: a normalisation layer's statistics
        and ε are the numerically fragile part (variances overflow / vanish in fp16), and so
        are the warp's barycentric coordinates."""

        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner.float()

        def forward(self, x, *rest):
            # Only floating tensors: an absent or integer argument (the warp's triangle choice)
            # passes as it is.
            rest = tuple(r.float() if r is not None and r.is_floating_point() else r for r in rest)
            return self.inner(x.float(), *rest).to(x.dtype)

    net = generator
    if fp16:
        net = copy.deepcopy(generator).half()
        if norm_fp32:
            _replace_norms(net, KeepFp32)
        if points:
            net.warp = KeepFp32(net.warp)
    dtype = torch.float16 if fp16 else torch.float32

    def to_pixels(y):
        img = ((y + 1.0) * 0.5).clamp(0.0, 1.0).permute(0, 2, 3, 1)
        return img, torch.round(img * 255.0).to(torch.uint8)

    def to_input(images):
        x = torch.cat(images, dim=-1) if len(images) > 1 else images[0]
        return (x.permute(0, 3, 1, 2).to(torch.float32) * (2.0 / 255.0) - 1.0).to(dtype)

    def to_net(*images):
        return to_pixels(net(to_input(images)).to(torch.float32))

    def to_net_parts(landmarks, reference, src, dst):
        parts = net.parts(to_input((landmarks, reference)), src.float(), dst.float())
        warped, painted, mask = (t.to(torch.float32) for t in parts)
        # The generator's own composition (WarpRefineGenerator.forward), here in float32.
        img, img_u8 = to_pixels(mask * warped + (1.0 - mask) * painted)
        painted01 = ((painted + 1.0) * 0.5).clamp(0.0, 1.0).permute(0, 2, 3, 1)
        return img, img_u8, painted01, mask.clamp(0.0, 1.0).permute(0, 2, 3, 1)

    class WithReference(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, landmarks, reference):
            return to_net(landmarks, reference)

    class LandmarksOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, landmarks):
            return to_net(landmarks)

    class WithPoints(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, landmarks, reference, reference_points, target_points):
            return to_net_parts(landmarks, reference, reference_points, target_points)

    if points:
        if not identity:
            raise ExportError("a point arch warps a reference face: it needs identity")
        return WithPoints().eval()
    module = WithReference() if identity else LandmarksOnly()
    return module.eval()


def _replace_norms(module, wrapper) -> None:
    from torch import nn

    norms = (
        nn.modules.batchnorm._BatchNorm,
        nn.modules.instancenorm._InstanceNorm,
        nn.GroupNorm,
        nn.LayerNorm,
    )
    for name, child in module.named_children():
        if isinstance(child, norms):
            setattr(module, name, wrapper(child))
        else:
            _replace_norms(child, wrapper)


def export_onnx(
    module,
    example: tuple,
    path: Path,
    identity: bool,
    opset: int,
    exporter: str,
    arch: str | None = None,
) -> dict[str, Any]:
    """Export `module` (from `serving_module`) to `path` as one file (weights inline when they
    fit a protobuf); returns notes on how it was exported. `arch` names the I/O of point archs."""
    torch = _torch()
    names = input_names(identity, arch)
    outputs = output_names(arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )
    external = n_bytes > PROTOBUF_LIMIT
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=65536)
            params = list(__import__("inspect").signature(module.forward).parameters)
            program = torch.onnx.export(
                module,
                example,
                input_names=names,
                output_names=outputs,
                dynamic_shapes={p: {0: batch} for p in params},
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
            if external:  # the weights file is named after the graph file: write in place
                program.save(str(path), external_data=True)
            else:
                tmp = path.with_name(f".tmp-{path.name}")
                program.save(str(tmp), external_data=False)
                os.replace(tmp, path)
        else:
            tmp = path.with_name(f".tmp-{path.name}")
            torch.onnx.export(
                module,
                example,
                str(tmp),
                input_names=names,
                output_names=outputs,
                dynamic_axes={n: {0: "batch"} for n in names + outputs},
                opset_version=opset,
                dynamo=False,
            )
            os.replace(tmp, path)
    return {"exporter": exporter, "external_data": external, "weight_bytes": int(n_bytes)}


# --------------------------------------------------------------------------- inputs of the stage


def _io_spec(name: str, size: int) -> dict[str, Any]:
    """The META_IO entry of one graph input or output."""
    if name in (INPUT_REFERENCE_POINTS, INPUT_TARGET_POINTS):
        return {"dtype": "float32", "shape": ["N", 68, 2], "frame": "crop", "units": "pixels"}
    if name in (INPUT_LANDMARKS, INPUT_REFERENCE, OUTPUT_IMAGE_U8):
        return {
            "dtype": "uint8",
            "shape": ["N", size, size, 3],
            **({"layout": "NHWC"} if name != OUTPUT_IMAGE_U8 else {}),
            "range": [0, 255],
        }
    spec = {
        "dtype": "float32",
        "shape": ["N", size, size, 1 if name == OUTPUT_MASK else 3],
        "range": [0, 1],
    }
    if name == OUTPUT_MASK:
        spec["composite"] = "image = mask·warped + (1 − mask)·painted"
    return spec


def read_gold(path: str | Path) -> dict[str, Any]:
    """gold.json as the serving layer wants it: whatever calibration method made it (quadratic
    templates, or the pca expression model with its directions), in the canonical frame.

    ``upstream`` mode stores raw-pixel gold faces, meaningless for a photo of another size; they
    are brought into the canonical frame with the same rigid-anchor similarity every face gets,
    and served with the aligned quadratic calibration.
    """
    from facecal.calibration import CalibrationError, GoldModel

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: gold templates not found (run `facecal calibrate`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    emotions = data.get("emotions") if isinstance(data, dict) else None
    if not isinstance(emotions, dict) or not emotions:
        raise ExportError(f"{path}: expected an object with a non-empty 'emotions' mapping")
    data = copy.deepcopy(data)
    for emotion, entry in sorted(emotions.items()):
        raw = entry.get("points") if isinstance(entry, dict) else None
        if raw is None:
            raise ExportError(f"{path}: emotions.{emotion}.points: missing")
        try:
            pts = geometry.check_points(raw, f"{path}: emotions.{emotion}.points")
        except geometry.GeometryError as e:
            raise ExportError(str(e)) from None
        if data.get("frame") == "pixels":
            data["emotions"][emotion]["points"] = np.round(
                geometry.to_canonical(pts)[0], 6
            ).tolist()
    if data.get("frame") == "pixels":
        data.update(
            {
                "frame": "canonical",
                "mode": "aligned",
                "method": "quadratic",
                "converted_from": "pixels",
            }
        )
    try:
        GoldModel.from_json(data)
    except CalibrationError as e:
        raise ExportError(f"{path}: {e}") from None
    return data


def reference_face(spec: str, pairs_dir: Path, size: int) -> tuple[np.ndarray, str]:
    """The default reference face for requests without a photo, and where it came from.

    ``train_neutral_mean``: the pixel mean of the aligned neutral train faces of the pairs stage
    (an anonymous average face, so no training subject ships inside the model); when the train
    split has no neutral face, the mean of the train references. Otherwise `spec` is an image
    path, resized to the crop size.
    """
    if spec != "train_neutral_mean":
        img = load_image(spec)
        if img.shape[:2] != (size, size):
            from PIL import Image

            img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.LANCZOS))
        return img, spec
    files, what, _ = _mean_face_files(pairs_dir)
    acc = np.zeros((size, size, 3), np.float64)
    used = 0
    for name in files:
        img = load_image(pairs_dir / name)
        if img.shape != (size, size, 3):
            raise ExportError(
                f"{pairs_dir / name}: {img.shape[1]}×{img.shape[0]} crop, but the "
                f"generator works at {size}×{size}"
            )
        acc += img
        used += 1
    return np.clip(np.rint(acc / used), 0, 255).astype(np.uint8), f"mean of {used} {what}"


def _mean_face_files(pairs_dir: Path) -> tuple[list[str], str, dict[str, tuple[str, str, str]]]:
    """The files `reference_face` averages (sorted), what they are, and per file the
    (split, pid, "target" | "ref") that says where its landmarks are in the split's points.npz."""
    index = pairs_dir / "index.csv"
    try:
        with open(index, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise ExportError(
            f"{index}: pairs index not found; the default reference face is the "
            f"mean aligned train neutral face (run `facecal pairs`, or set "
            f"export.reference to an image path)"
        ) from None
    train = [r for r in rows if r.get("split") == "train"]
    where: dict[str, tuple[str, str, str]] = {}
    for r in train:
        if r.get("emotion") == "neutral" and r.get("kind", "true") == "true" and r.get("face_file"):
            where.setdefault(r["face_file"], ("train", r.get("pid", ""), "target"))
    what = "neutral train faces"
    if not where:
        for r in train:
            if r.get("ref_file"):
                where.setdefault(r["ref_file"], ("train", r.get("pid", ""), "ref"))
        what = "train reference faces"
    if not where:
        raise ExportError(
            f"{index}: no neutral train face and no train reference to average "
            f"for the default reference face"
        )
    return sorted(where), what, where


def reference_points(spec: str, pairs_dir: Path) -> tuple[np.ndarray, str]:
    """The default reference face's 68 landmarks in crop pixels (point archs), and where they
    came from: the mean of the averaged faces' own points (the pairs' points.npz), as the face
    is their pixel mean. For an image `spec` its own points are unknown (finding them would take
    the landmark detector): the mean neutral train points stand in — an aligned crop's
    landmarks sit near them, the alignment being the same."""
    try:
        files, what, where = _mean_face_files(pairs_dir)
    except ExportError as e:
        if spec == "train_neutral_mean":
            raise
        raise ExportError(
            f"{e}. With export.reference = {spec} a point arch still needs that face's "
            f"landmarks: the mean train points of the pairs stage stand in for them"
        ) from None
    tables: dict[str, dict[str, np.ndarray]] = {}
    pts = []
    for name in files:
        split, pid, column = where[name]
        if split not in tables:
            path = pairs_dir / split / POINTS_FILE
            try:
                with np.load(path, allow_pickle=False) as z:
                    tables[split] = {k: np.asarray(z[k]) for k in ("pid", "target", "ref")}
            except FileNotFoundError:
                raise ExportError(
                    f"{path}: landmark points not found; a point arch needs the default "
                    f"reference face's points (re-run `facecal pairs`, which writes them)"
                ) from None
            except (KeyError, ValueError, OSError) as e:
                raise ExportError(f"{path}: not a pairs points file ({e})") from None
        t = tables[split]
        hit = np.nonzero(t["pid"] == int(pid))[0] if pid.isdigit() else np.array([], int)
        if len(hit) == 0:
            raise ExportError(f"{pairs_dir / split / POINTS_FILE}: no points for pair {pid}")
        p = t[column][hit[0]].astype(np.float64)
        if p.shape != (68, 2) or not np.isfinite(p).all():
            raise ExportError(
                f"{pairs_dir / split / POINTS_FILE}: pair {pid}: no finite 68×2 {column} points"
            )
        pts.append(p)
    source = f"mean points of {len(pts)} {what}"
    if spec != "train_neutral_mean":
        source += f" (stand-in: the points of {spec} are unknown)"
    return np.mean(pts, axis=0), source


def parity_batch(
    cfg: dict[str, Any],
    gold: dict[str, Any] | None,
    reference: np.ndarray | None,
    n: int,
    seed: int,
    ref_points: np.ndarray | None = None,
) -> list[np.ndarray]:
    """A fixed, realistic input batch: gold templates jittered under `seed`, rendered in the
    generator's style, plus one all-white and one random-noise image for the extremes.

    Point archs (`ref_points`: the reference face's landmarks, crop pixels) also get the
    reference points for every item and as target points the jittered points each landmark
    image was drawn from (the extremes reuse the first item's); without gold templates the
    targets are the reference's points jittered, so that the warp stays a plausible one.
    """
    size, style = int(cfg["image_size"]), cfg["style"]
    points = takes_points(cfg.get("arch"))
    if points and ref_points is None:
        raise ExportError(f"{cfg['arch']}: the reference face's points are needed for parity")
    rng = np.random.default_rng(seed)
    templates = [
        np.asarray(e["points"], np.float64) for e in (gold or {}).get("emotions", {}).values()
    ]
    m = geometry.canonical_to_crop(size)
    images: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for i in range(n):
        if i == n - 1 and n > 2:
            images.append(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            targets.append(targets[0])
        elif i == n - 2 and n > 2:
            images.append(np.full((size, size, 3), 255, np.uint8))
            targets.append(targets[0])
        else:
            if templates:
                canon = templates[i % len(templates)] + rng.normal(0, 0.03, (68, 2))
                pts = geometry.apply_affine(m, canon)
            elif points:
                pts = np.asarray(ref_points, np.float64) + rng.normal(0, 1.0, (68, 2))
            else:
                pts = rng.uniform(0.15 * size, 0.85 * size, (68, 2))
            images.append(render.render_landmarks(pts, size, style))
            targets.append(pts)
    batch = [np.stack(images)]
    if cfg.get("identity"):
        if reference is None:
            raise ExportError("identity generator: a reference face is needed for the parity batch")
        refs = []
        for i in range(n):
            noise = rng.normal(0, 12 * (i % 3), reference.shape)
            refs.append(np.clip(reference.astype(np.float64) + noise, 0, 255).astype(np.uint8))
        batch.append(np.stack(refs))
    if points:
        src = np.broadcast_to(np.asarray(ref_points, np.float32), (n, 68, 2))
        batch += [np.ascontiguousarray(src), np.stack(targets).astype(np.float32)]
    return batch


def compare(
    session,
    feeds: list[np.ndarray],
    names: list[str],
    expected: np.ndarray,
    atol: float,
    parts: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Parity of `session` against torch's `expected` image; `parts` (point archs: torch's
    ``painted`` and ``mask``) are held to the same tolerance (``<name>_max_abs_diff``)."""
    parts = parts or {}
    got = session.run([OUTPUT_IMAGE, OUTPUT_IMAGE_U8, *parts], dict(zip(names, feeds, strict=True)))
    image, image_u8 = got[0], got[1]
    diff = np.abs(image.astype(np.float64) - expected.astype(np.float64))
    u8_diff = np.abs(image_u8.astype(np.int32) - np.rint(expected * 255).astype(np.int32))
    result = {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_u8_diff": int(u8_diff.max()),
        "atol": atol,
        "passed": bool(diff.max() <= atol),
        "provider": session.get_providers()[0],
        "batch": int(feeds[0].shape[0]),
    }
    for (name, want), value in zip(parts.items(), got[2:], strict=True):
        d = float(np.abs(value.astype(np.float64) - want.astype(np.float64)).max())
        result[f"{name}_max_abs_diff"] = d
        result["passed"] = result["passed"] and d <= atol
    return result


# --------------------------------------------------------------------------- the stage


def run_export(
    params: ExportParams,
    gan_dir: Path = GAN_DIR,
    gold_path: Path | None = GOLD_PATH,
    pairs_dir: Path = PAIRS_DIR,
    out_dir: Path = OUT_DIR,
    metrics_path: Path | None = METRICS_PATH,
    seed: int = 0,
) -> dict[str, Any]:
    """Export `gan_dir`'s generator to `out_dir`; returns the metrics (also written to
    `metrics_path`). Raises `ExportError` when parity fails, after writing the metrics."""
    torch = _torch()
    from facecal.gan.models import count_parameters, load_generator, model_hash

    gan_dir, out_dir = Path(gan_dir), Path(out_dir)
    torch.manual_seed(seed)
    generator, cfg = load_generator(gan_dir)
    gen_hash = model_hash(generator, cfg)  # before anything touches the module
    identity, size = bool(cfg["identity"]), int(cfg["image_size"])
    arch = cfg["arch"]
    points = takes_points(arch)
    if cfg["style"] not in render.STYLES:
        raise ExportError(f"{gan_dir / 'generator.json'}: unknown landmark style {cfg['style']!r}")
    gold = None
    if gold_path is not None and Path(gold_path).exists():
        gold = read_gold(gold_path)
    elif gold_path is not None:
        print(
            f"export: {gold_path} not found; the model will carry no gold templates and "
            f"/v1/intensify will refuse requests",
            file=sys.stderr,
        )
    reference, reference_source = (
        reference_face(params.reference, Path(pairs_dir), size) if identity else (None, None)
    )
    ref_points, ref_points_source = (
        reference_points(params.reference, Path(pairs_dir)) if points else (None, None)
    )

    feeds = parity_batch(cfg, gold, reference, params.parity_batch, seed, ref_points)
    names = input_names(identity, arch)
    outputs = output_names(arch)
    module = serving_module(generator, identity, points=points)
    with torch.no_grad():
        torch_out = [t.numpy() for t in module(*[torch.from_numpy(a) for a in feeds])]
    expected = torch_out[0]
    # Point archs: the parts serving composites with are held to the same tolerance.
    parts = dict(zip(outputs[2:], torch_out[2:], strict=True))

    metadata = {
        META_FORMAT: FORMAT_VERSION,
        META_CONFIG: json.dumps(cfg, sort_keys=True),
        META_GENERATOR_HASH: gen_hash,
        META_IO: json.dumps(
            {
                "inputs": {n: _io_spec(n, size) for n in names},
                "outputs": {n: _io_spec(n, size) for n in outputs},
                "landmarks": {
                    "frame": "crop",
                    "style": cfg["style"],
                    "canonical_to_crop": geometry.canonical_to_crop(size).tolist(),
                },
            },
            sort_keys=True,
        ),
    }
    if gold is not None:
        metadata[META_GOLD] = json.dumps(gold, sort_keys=True)
    if reference is not None:
        metadata[META_REFERENCE] = base64.b64encode(encode_png(reference)).decode("ascii")
    if ref_points is not None:
        metadata[META_REFERENCE_POINTS] = json.dumps(np.round(ref_points, 4).tolist())
    doc = (
        f"facecal landmark-to-face generator ({cfg['arch']}, {size}², style {cfg['style']}, "
        f"identity {identity}). Inputs: {', '.join(names)} uint8 NHWC; outputs: image float32 "
        f"NHWC [0, 1], image_u8 uint8 NHWC."
    )
    if points:
        doc = (
            f"facecal landmark-to-face generator ({arch}, {size}², style {cfg['style']}, "
            f"warp + refine). Inputs: landmarks, reference uint8 NHWC; reference_points, "
            f"target_points float32 N×68×2 crop pixels. Outputs: image float32 NHWC [0, 1], "
            f"image_u8 uint8 NHWC, painted float32 NHWC [0, 1], mask float32 N×{size}×{size}×1 "
            f"[0, 1] (image = mask·warped reference + (1 − mask)·painted)."
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    example = tuple(torch.from_numpy(a[:2]) for a in feeds)
    t0 = time.perf_counter()
    fp32_path = out_dir / ONNX_FILE
    notes = export_onnx(module, example, fp32_path, identity, params.opset, params.exporter, arch)
    attach_metadata(fp32_path, metadata, doc)
    export_seconds = time.perf_counter() - t0
    parity = {
        "fp32": compare(onnx_session(fp32_path), feeds, names, expected, params.parity_atol, parts)
    }

    fp16_path = out_dir / ONNX_FP16_FILE
    if params.fp16:
        module16 = serving_module(
            generator, identity, fp16=True, norm_fp32=params.fp16_norm_fp32, points=points
        )
        export_onnx(module16, example, fp16_path, identity, params.opset, params.exporter, arch)
        attach_metadata(fp16_path, {**metadata, "facecal.precision": "fp16"}, doc + " fp16.")
        parity["fp16"] = compare(
            onnx_session(fp16_path), feeds, names, expected, params.fp16_parity_atol, parts
        )
        # CPU runs fp16 kernels through inserted casts (fp32 arithmetic): say which this was.
        parity["fp16"]["fp16_arithmetic"] = parity["fp16"]["provider"] != "CPUExecutionProvider"
    else:
        fp16_path.unlink(missing_ok=True)

    files = {"fp32": file_info(fp32_path)}
    if params.fp16:
        files["fp16"] = file_info(fp16_path)
    metrics = {
        "parity": parity,
        "passed": all(p["passed"] for p in parity.values()),
        "opset": params.opset,
        "exporter": notes["exporter"],
        "external_data": notes["external_data"],
        "export_seconds": round(export_seconds, 3),
        "parameters": count_parameters(generator),
        "onnx_bytes": files["fp32"]["bytes"],
        **({"onnx_fp16_bytes": files["fp16"]["bytes"]} if params.fp16 else {}),
    }
    model_json = {
        "format": FORMAT_VERSION,
        "config": cfg,
        "generator_hash": metadata[META_GENERATOR_HASH],
        "inputs": names,
        "outputs": outputs,
        "opset": params.opset,
        "exporter": notes["exporter"],
        "files": files,
        "gold_emotions": calibratable_emotions(gold) if gold else [],
        "calibration_method": (gold or {}).get("method", "quadratic") if gold else None,
        "reference": reference_source,
        **({"reference_points": ref_points_source} if points else {}),
        "parity": parity,
        "metadata_keys": sorted(metadata),
    }
    write_json(out_dir / MODEL_JSON, model_json)
    if metrics_path is not None:
        write_json(Path(metrics_path), metrics)
    if not metrics["passed"]:
        failed = {k: v["max_abs_diff"] for k, v in parity.items() if not v["passed"]}
        raise ExportError(
            f"{out_dir}: ONNX output differs from torch beyond the tolerance: "
            f"{failed} (atol fp32 {params.parity_atol}, fp16 "
            f"{params.fp16_parity_atol}); see {metrics_path}"
        )
    return metrics


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument(
        "--gan-dir",
        type=Path,
        default=GAN_DIR,
        help=f"generator.pt + generator.json (default: {GAN_DIR})",
    )
    parser.add_argument(
        "--gold",
        type=Path,
        default=GOLD_PATH,
        help=f"gold templates shipped in the model (default: {GOLD_PATH})",
    )
    parser.add_argument(
        "--pairs-dir",
        type=Path,
        default=PAIRS_DIR,
        help=f"pairs stage output, for the default reference face (default: {PAIRS_DIR})",
    )
    parser.add_argument(
        "--out", type=Path, default=OUT_DIR, help=f"output directory (default: {OUT_DIR})"
    )
    parser.add_argument(
        "--metrics",
        type=Path,
        default=METRICS_PATH,
        help=f"parity report (default: {METRICS_PATH})",
    )
    config.add_params_arguments(parser)


def main(args) -> int:
    params = config.params_from_args(args, ExportParams, SECTION)
    seed = base_seed(getattr(args, "params", None))
    before = args.metrics.stat().st_mtime_ns if args.metrics.exists() else None
    with tracking.stage_run(SECTION, params) as run:
        try:
            metrics = run_export(
                params, args.gan_dir, args.gold, args.pairs_dir, args.out, args.metrics, seed=seed
            )
        finally:
            # A failed parity check still logs its numbers (written before the error).
            if args.metrics.exists() and args.metrics.stat().st_mtime_ns != before:
                run.log_metrics(json.loads(args.metrics.read_text()))
        run.log_artifact(args.out / MODEL_JSON, "export")
    p = metrics["parity"]
    print(
        f"export: {args.out / ONNX_FILE} ({metrics['onnx_bytes'] / 1e6:.1f} MB, opset "
        f"{metrics['opset']}, {metrics['exporter']}), parity max |Δ| fp32 "
        f"{p['fp32']['max_abs_diff']:.2e}"
        + (f", fp16 {p['fp16']['max_abs_diff']:.2e}" if "fp16" in p else "")
    )
    return 0
