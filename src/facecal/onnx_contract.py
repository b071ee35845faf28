"""The contract of facecal's ONNX files: graph I/O names, metadata keys, the metadata writer,
file facts, sessions and execution providers.

The exports (`facecal.export`: the generator, `facecal.export_classifier`: the expression CNN)
write these files; serving (`facecal.serving`), the registry stages and `facecal classify` read
them through the same names, so a key has one spelling everywhere.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path
from typing import Any

from facecal import config
from facecal.errors import FacecalError

# --------------------------------------------------------------------------- names and keys

# Graph I/O names of the generator: the serving runtime, `mlflow models serve` clients and the
# registry's signature all use these.
INPUT_LANDMARKS = "landmarks"
INPUT_REFERENCE = "reference"
OUTPUT_IMAGE = "image"
OUTPUT_IMAGE_U8 = "image_u8"
# Point architectures (gan.arch warp_refine) also take the reference's and the target's 68
# landmarks (float32 N×68×2, pixels of the S×S crop) and return the generator's parts, so that
# serving can composite at a photo's own resolution: `painted` (float32 N×S×S×3 in [0, 1]) and
# `mask` (float32 N×S×S×1 in [0, 1]; image = mask·warped + (1 − mask)·painted).
INPUT_REFERENCE_POINTS = "reference_points"
INPUT_TARGET_POINTS = "target_points"
OUTPUT_PAINTED = "painted"
OUTPUT_MASK = "mask"
# `gan.models.POINT_ARCHS`, spelled here too: serving reads the contract without importing torch
# (tests/test_warp_refine_serving.py checks that the two agree).
POINT_ARCHS = ("warp_refine",)

META_CONFIG = "facecal.config"
META_GOLD = "facecal.gold"
META_REFERENCE = "facecal.reference_png"
# Point archs: the default reference face's 68 landmarks in crop pixels (JSON list 68×2).
META_REFERENCE_POINTS = "facecal.reference_points"
META_IO = "facecal.io"
META_FORMAT = "facecal.format"
# `gan.models.model_hash` of the exported generator: `facecal evaluate` writes the same hash
# into metrics/eval.json, and `facecal register` accepts only metrics of this model.
META_GENERATOR_HASH = "facecal.generator_hash"
FORMAT_VERSION = "1"

# The classifier's graph I/O names.
INPUT_FACES = "faces"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_LOGITS = "logits"

# The generator's META_FORMAT key (with the classifier's own version) and a kind that tells the
# two exports apart.
META_KIND = "facecal.kind"
KIND = "classifier"
META_CLASSIFIER = "facecal.classifier"
META_CLASSIFIER_HASH = "facecal.classifier_hash"
CLASSIFIER_FORMAT_VERSION = "1"
# Beside classifier.onnx: the torch weights it was exported from (train_cnn's .pt + .json),
# registered with it so that `cnn.init: models:/facecal-classifier@…` can fine-tune from a
# registered classifier. Serving never reads them: it runs the ONNX file.
WEIGHTS_DIR = "torch"
WEIGHTS_FILE = "classifier.pt"
WEIGHTS_ARTIFACT = "classifier_torch"  # … their artifact path in the registering run
TAG_WEIGHTS_SHA256 = "weights_sha256"  # model-version tag: sha256 of WEIGHTS_FILE


class ExportError(FacecalError):
    """The generator, gold file or reference face cannot be exported, or parity failed."""


# --------------------------------------------------------------------------- the files


def base_seed(path: str | Path | None = None) -> int:
    try:
        return int((config.read_params(path).get("base") or {}).get("seed", 0))
    except config.ParamsError:
        return 0


def attach_metadata(path: Path, metadata: dict[str, str], doc: str) -> None:
    """Write facecal's metadata_props into the model file and run the ONNX checker on it.

    Weights stored beside the graph (models over 2 GB) stay where they are: only the graph
    proto is rewritten, and the checker reads the file by path, which handles both layouts.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    keep = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in sorted(metadata.items()):
        model.metadata_props.add(key=key, value=value)
    model.doc_string = doc
    model.producer_name = "facecal"
    # The dynamo exporter records a Python stack trace per node, with this checkout's absolute
    # paths: dropped, so the same weights give the same file from any checkout.
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    tmp = path.with_name(f".tmp-{path.name}")
    onnx.save_model(model, str(tmp))
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except onnx.checker.ValidationError as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{path}: the ONNX checker rejects the exported graph: {e}") from e
    os.replace(tmp, path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an .onnx file, without loading its weights into a session."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def onnx_session(path: Path):
    """A session on the best available provider (CUDA when present; CPU here)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=available_providers(tensorrt=False))


def file_info(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": h.hexdigest()}


# --------------------------------------------------------------------------- providers


TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)
CACHE_ENV = "FACECAL_MODEL_CACHE"


def cuda_driver_present() -> bool:
    """Whether the NVIDIA driver library loads. Without it onnxruntime-gpu would log a loud
    error for every GPU provider before falling back to CPU; with it the session decides."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def available_providers(
    tensorrt: bool = False, trt_cache: str | None = None, trt_fp16: bool = False
) -> list[Any]:
    """Providers to ask for, best first: TensorRT (only if asked), CUDA, CPU."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    gpu = cuda_driver_present()
    out: list[Any] = []
    if tensorrt and gpu and TENSORRT in available:
        opts = {
            "trt_fp16_enable": bool(trt_fp16),
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": trt_cache or str(default_cache_dir() / "tensorrt"),
        }
        out.append((TENSORRT, opts))
    if gpu and CUDA in available:
        out.append((CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}))
    out.append(CPU)
    return out


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "facecal" / "models"


# --------------------------------------------------------------------------- what a file offers


def takes_points(arch: str | None) -> bool:
    """Whether the generator of `arch` takes (reference points, target points)."""
    return arch in POINT_ARCHS


def input_names(identity: bool, arch: str | None = None) -> list[str]:
    """The generator graph's inputs, in order; `arch` (the config's) matters for point archs."""
    if takes_points(arch):
        return [INPUT_LANDMARKS, INPUT_REFERENCE, INPUT_REFERENCE_POINTS, INPUT_TARGET_POINTS]
    return [INPUT_LANDMARKS, INPUT_REFERENCE] if identity else [INPUT_LANDMARKS]


def output_names(arch: str | None = None) -> list[str]:
    """The generator graph's outputs, in order."""
    if takes_points(arch):
        return [OUTPUT_IMAGE, OUTPUT_IMAGE_U8, OUTPUT_PAINTED, OUTPUT_MASK]
    return [OUTPUT_IMAGE, OUTPUT_IMAGE_U8]


def calibratable_emotions(data: dict[str, Any]) -> list[str]:
    """Emotions a face can be calibrated toward with this gold.json (pca needs a direction)."""
    emotions = data.get("emotions", {})
    if data.get("method") == "pca":
        return sorted(e for e, v in emotions.items() if "direction" in v)
    return sorted(emotions)
