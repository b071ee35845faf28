"""One onnxruntime session for the exported generator, per process.

* Providers in order TensorRT (opt-in), CUDA, CPU; `GeneratorRuntime.providers` is what the
  session actually runs on (`session.get_providers()`), so a machine without a GPU reports CPU.
* On CUDA, inputs and outputs go through IO binding (one host → device copy in, one out, no
  intermediate numpy conversions inside onnxruntime).
* A model is a path to an .onnx file (or a directory holding one) or a registry URI
  ``models:/<name>@<alias>`` / ``models:/<name>/<version>``: the version is resolved through the
  MLflow registry and its files downloaded once into a local cache keyed by name and version.
* Everything serving needs besides the weights comes from the model's ``metadata_props``
  (`facecal.export`): config, gold templates, default reference face (and, for point archs such
  as warp_refine, its landmarks). Nothing is unpickled — the MLmodel file is YAML, the model is
  protobuf, the reference face is a PNG, its points JSON.
* Point archs (`onnx_contract.POINT_ARCHS`) take the reference's and the target's landmarks in
  crop pixels besides the images, and `generate_parts` returns the generator's painted face and
  mask too, for compositing at a photo's own resolution.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facecal import onnx_contract
from facecal.errors import FacecalError
from facecal.onnx_contract import (
    GPU_PROVIDERS,
    available_providers,
    cuda_driver_present,
    default_cache_dir,
)

COMPLETE_MARKER = ".facecal-complete"


class ModelLoadError(FacecalError):
    """The model path or registry URI cannot be resolved, or the file is not a facecal export."""


class InputError(FacecalError):
    """Inputs of the wrong shape, dtype or range for this model."""


@dataclass
class ModelSource:
    uri: str  # what the user asked for
    path: Path  # the local .onnx file
    name: str | None = None  # registered model name, version and alias (registry URIs)
    version: str | None = None
    alias: str | None = None

    def info(self, loaded: Path) -> dict[str, Any]:
        """Where the model came from, as the runtimes' `info()` starts (`loaded`: the file the
        session runs, which may be the fp16 one beside `path`)."""
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "uri": self.uri,
            "file": loaded.name,
        }


@dataclass
class RuntimeOptions:
    tensorrt: bool = False
    intra_op_threads: int = 0  # 0 = onnxruntime's default (one per core)
    inter_op_threads: int = 0
    allow_spinning: bool = True  # idle onnxruntime threads busy-wait for work
    warmup_batches: list[int] = field(default_factory=lambda: [1])
    prefer_fp16: bool = False  # on a GPU, load generator_fp16.onnx beside the file
    cache_dir: str | None = None


# --------------------------------------------------------------------------- resolving models


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` → (name, alias, None); ``models:/name/3`` → (name, None, "3")."""
    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ModelLoadError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")


def find_onnx(directory: Path) -> Path:
    """The model file inside a directory: the onnx flavour's ``data`` entry of an MLmodel file
    (read as YAML), else the only .onnx file there."""
    import yaml

    mlmodel = directory / "MLmodel"
    if mlmodel.is_file():
        try:
            meta = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
            data = ((meta.get("flavors") or {}).get("onnx") or {}).get("data")
        except (yaml.YAMLError, AttributeError):
            data = None
        if data and (directory / data).is_file():
            return directory / data
    found = sorted(p for p in directory.rglob("*.onnx") if p.is_file())
    fp32 = [p for p in found if not p.name.endswith("_fp16.onnx")]
    if len(fp32) == 1:
        return fp32[0]
    if not found:
        raise ModelLoadError(f"{directory}: no .onnx file inside")
    raise ModelLoadError(f"{directory}: several .onnx files ({[p.name for p in found]}); name one")


def registry_version(uri: str) -> tuple[str, str | None, Any]:
    """(name, alias, MLflow ModelVersion) of a ``models:/`` URI, or a ModelLoadError."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.exceptions import MlflowException

    from facecal import tracking

    name, alias, version = parse_models_uri(uri)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, str(version))
        )
    except MlflowException as e:
        raise ModelLoadError(
            f"{uri}: not found in the registry at {tracking.tracking_uri()} "
            f"({e.message if hasattr(e, 'message') else e})"
        ) from None
    return name, alias, mv


def cached_download(target: Path, fetch: Callable[[Path], Any], info: dict[str, Any]) -> Path:
    """`target`, filled once by ``fetch(folder)``: into a temporary folder beside it, renamed
    into place when complete (a marker holds `info`), so an interrupted or concurrent download
    never leaves a half-filled cache entry."""
    if not (target / COMPLETE_MARKER).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
        try:
            fetch(tmp)
            (tmp / COMPLETE_MARKER).write_text(json.dumps(info) + "\n")
            if (target / COMPLETE_MARKER).is_file():  # another process finished meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            if target.exists():  # an incomplete earlier attempt
                shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            # Renaming onto a folder another process just filled fails (ENOTEMPTY/EEXIST):
            # its complete copy is as good as ours.
            if not (target / COMPLETE_MARKER).is_file():
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def cache_entry(name: str, mv: Any, cache_dir: str | Path | None, suffix: str = "") -> Path:
    """The cache folder of a model version. The key is the name and version plus a hash of the
    version's artifact source, so two tracking stores that both have a version 1 never share a
    cache entry."""
    key = hashlib.sha256(f"{mv.source}|{mv.run_id}".encode()).hexdigest()[:10]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return cache / _safe(name) / f"v{mv.version}-{key}{suffix}"


def resolve_registry(uri: str, cache_dir: str | Path | None = None) -> ModelSource:
    """Resolve a ``models:/`` URI through the MLflow registry and download the version once
    (`cached_download`)."""
    name, alias, mv = registry_version(uri)  # first: it sets MLflow's telemetry switch
    import mlflow

    version = str(mv.version)
    target = cached_download(
        cache_entry(name, mv, cache_dir),
        lambda tmp: mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp)
        ),
        {"name": name, "version": version, "source": mv.source},
    )
    return ModelSource(uri=uri, path=find_onnx(target), name=name, version=version, alias=alias)


def resolve(source: str | Path, cache_dir: str | Path | None = None) -> ModelSource:
    text = str(source)
    if text.startswith("models:/"):
        return resolve_registry(text, cache_dir)
    path = Path(text)
    if path.is_dir():
        path = find_onnx(path)
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: model file not found (an .onnx file, a directory holding "
            f"one, or models:/<name>@<alias>)"
        )
    return ModelSource(uri=text, path=path)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# --------------------------------------------------------------------------- the runtime


def open_session(path: Path, options: RuntimeOptions, providers: list[Any]) -> Any:
    """An onnxruntime session on `path` with `options`' threading (both runtimes load their
    model this way); a ModelLoadError when onnxruntime refuses the file."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(options.intra_op_threads)
    so.inter_op_num_threads = int(options.inter_op_threads)
    so.log_severity_level = 3
    if not options.allow_spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception zoo for bad files
        raise ModelLoadError(f"{path}: onnxruntime cannot load it: {e}") from None


class GeneratorRuntime:
    """The exported generator behind one onnxruntime session (thread-safe)."""

    def __init__(self, source: ModelSource | str | Path, options: RuntimeOptions | None = None):
        self.options = options or RuntimeOptions()
        self.source = (
            source if isinstance(source, ModelSource) else resolve(source, self.options.cache_dir)
        )
        path = self.source.path
        self.gpu = cuda_driver_present()
        fp16 = path.with_name(path.stem + "_fp16.onnx")
        if self.options.prefer_fp16 and self.gpu and fp16.is_file():
            path = fp16
        self.path = path

        requested = available_providers(
            self.options.tensorrt, trt_fp16=path.name.endswith("_fp16.onnx")
        )
        self.session = open_session(path, self.options, requested)
        self.providers: list[str] = list(self.session.get_providers())
        self.io_binding = any(p in GPU_PROVIDERS for p in self.providers)

        meta = self.session.get_modelmeta().custom_metadata_map
        if (
            meta.get(onnx_contract.META_FORMAT) != onnx_contract.FORMAT_VERSION
            or onnx_contract.META_CONFIG not in meta
        ):
            raise ModelLoadError(
                f"{path}: not a facecal export (metadata "
                f"{onnx_contract.META_FORMAT}={meta.get(onnx_contract.META_FORMAT)!r}); "
                f"run `facecal export`"
            )
        self.metadata = meta
        self.config: dict[str, Any] = json.loads(meta[onnx_contract.META_CONFIG])
        self.image_size = int(self.config["image_size"])
        self.style: str = self.config["style"]
        self.identity = bool(self.config["identity"])
        self.precision = meta.get("facecal.precision", "fp32")
        # Calibration toward the gold templates, by whichever method made them (GoldModel).
        self.gold_model = None
        self.emotions: list[str] = []
        if onnx_contract.META_GOLD in meta:
            from facecal.calibration import CalibrationError, GoldModel

            try:
                gold = json.loads(meta[onnx_contract.META_GOLD])
                self.gold_model = GoldModel.from_json(gold)
            except (json.JSONDecodeError, CalibrationError) as e:
                raise ModelLoadError(
                    f"{path}: bad {onnx_contract.META_GOLD} metadata ({e})"
                ) from None
            self.emotions = onnx_contract.calibratable_emotions(gold)
        self.calibration_method = self.gold_model.method if self.gold_model else None
        self.default_reference: np.ndarray | None = None
        if onnx_contract.META_REFERENCE in meta:
            from facecal.imageio import load_image

            self.default_reference = load_image(
                base64.b64decode(meta[onnx_contract.META_REFERENCE])
            )
        self.arch: str | None = self.config.get("arch")
        self.points = onnx_contract.takes_points(self.arch)
        self.default_reference_points: np.ndarray | None = None
        if self.points and onnx_contract.META_REFERENCE_POINTS in meta:
            try:
                ref_pts = np.asarray(
                    json.loads(meta[onnx_contract.META_REFERENCE_POINTS]), np.float32
                )
            except (json.JSONDecodeError, ValueError, TypeError) as e:
                raise ModelLoadError(
                    f"{path}: bad {onnx_contract.META_REFERENCE_POINTS} metadata ({e})"
                ) from None
            if ref_pts.shape != (68, 2) or not np.isfinite(ref_pts).all():
                raise ModelLoadError(
                    f"{path}: {onnx_contract.META_REFERENCE_POINTS} must be 68 finite [x, y] "
                    f"points, got shape {ref_pts.shape}"
                )
            self.default_reference_points = ref_pts

        self.input_names = [i.name for i in self.session.get_inputs()]
        expected = onnx_contract.input_names(self.identity, self.arch)
        if self.input_names != expected:
            raise ModelLoadError(
                f"{path}: graph inputs {self.input_names}, expected {expected} for a "
                f"{self.arch} generator (identity {self.identity})"
            )
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = sorted(set(onnx_contract.output_names(self.arch)) - set(self.output_names))
        if missing:
            raise ModelLoadError(
                f"{path}: graph outputs {self.output_names} lack {missing} (a {self.arch} "
                f"export has {onnx_contract.output_names(self.arch)}); re-run `facecal export`"
            )
        self._lock = threading.Lock()
        self.runs = 0
        t0 = time.perf_counter()
        for n in self.options.warmup_batches:
            if n > 0:
                self._warmup(n)
        self.warmup_seconds = time.perf_counter() - t0

    def _warmup(self, n: int) -> None:
        s = self.image_size
        white = np.full((n, s, s, 3), 255, np.uint8)
        if not self.points:
            self.generate(white)
            return
        ref, pts = self.default_reference, self.default_reference_points
        if ref is None or pts is None:
            # No default to run with: any face and any finite points exercise the same graph.
            ref = np.full((s, s, 3), 128, np.uint8)
            t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
            pts = (s / 2 + s / 4 * np.stack([np.cos(t), np.sin(t)], 1)).astype(np.float32)
        refs = np.broadcast_to(ref, white.shape).copy()
        self.generate_parts(white, refs, pts, pts)

    # ------------------------------------------------------------------ inference

    def _as_uint8(self, images: np.ndarray, what: str) -> np.ndarray:
        a = np.asarray(images)
        s = self.image_size
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[1:] != (s, s, 3):
            raise InputError(f"{what}: expected N×{s}×{s}×3, got {a.shape}")
        if a.dtype == np.uint8:
            return np.ascontiguousarray(a)
        if np.issubdtype(a.dtype, np.floating):
            # Floats are read as [0, 1] pixels (what a float image pipeline holds); the graph's
            # uint8 input makes this exact for any image that came from 8-bit pixels.
            if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise InputError(f"{what}: float pixels must be finite and in [0, 1]")
            return np.rint(a * 255.0).astype(np.uint8)
        raise InputError(f"{what}: expected uint8 or float pixels, got {a.dtype}")

    def _as_points(self, points: np.ndarray, n: int, what: str) -> np.ndarray:
        a = np.asarray(points)
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3 or a.shape[1:] != (68, 2) or not np.issubdtype(a.dtype, np.number):
            raise InputError(f"{what}: expected N×68×2 crop-pixel points, got {a.shape}")
        if a.shape[0] == 1 and n > 1:
            a = np.broadcast_to(a, (n, 68, 2))
        if a.shape[0] != n:
            raise InputError(f"{what}: {a.shape[0]} point sets for {n} landmark images")
        a = np.ascontiguousarray(a, np.float32)
        if not np.isfinite(a).all():
            raise InputError(f"{what}: points must be finite")
        return a

    def _feeds(
        self,
        landmarks: np.ndarray,
        reference: np.ndarray | None,
        reference_points: np.ndarray | None,
        target_points: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        lm = self._as_uint8(landmarks, "landmarks")
        feeds = {self.input_names[0]: lm}
        if self.identity:
            if reference is None:
                if self.default_reference is None:
                    raise InputError("this model needs a reference face and carries no default")
                ref = np.broadcast_to(self.default_reference, lm.shape).copy()
            else:
                ref = self._as_uint8(reference, "reference")
                if ref.shape[0] != lm.shape[0]:
                    raise InputError(
                        f"reference: {ref.shape[0]} images for {lm.shape[0]} landmark images"
                    )
            feeds[self.input_names[1]] = ref
        elif reference is not None:
            raise InputError("this model takes no reference face (identity is off)")
        if not self.points:
            if reference_points is not None or target_points is not None:
                raise InputError(
                    f"this model ({self.arch}) takes no landmark points, only landmark images"
                )
            return feeds
        # A point arch warps the reference from its own landmarks to the target's.
        if target_points is None:
            raise InputError(
                f"target_points: required by this {self.arch} model (the landmarks the "
                f"landmark images were drawn from, N×68×2 crop pixels)"
            )
        if reference_points is None:
            if reference is not None:
                raise InputError(
                    f"reference_points: required by this {self.arch} model with a reference "
                    f"face (that face's own landmarks, N×68×2 crop pixels)"
                )
            if self.default_reference_points is None:
                raise InputError(
                    f"this {self.arch} model carries no default reference points "
                    f"({onnx_contract.META_REFERENCE_POINTS}); send a reference and its points"
                )
            reference_points = self.default_reference_points
        n = lm.shape[0]
        feeds[self.input_names[2]] = self._as_points(reference_points, n, "reference_points")
        feeds[self.input_names[3]] = self._as_points(target_points, n, "target_points")
        return feeds

    def generate(
        self,
        landmarks: np.ndarray,
        reference: np.ndarray | None = None,
        output: str = "image_u8",
        reference_points: np.ndarray | None = None,
        target_points: np.ndarray | None = None,
    ) -> np.ndarray:
        """Landmark images (N×S×S×3, uint8 or float in [0, 1]) → faces N×S×S×3 (uint8, or
        float32 in [0, 1] with ``output="image"``). With identity and no reference, the model's
        default reference face is used for every item.

        Point archs also need `target_points` (the landmarks the images were drawn from) and,
        with a `reference`, `reference_points` (its own landmarks), N×68×2 crop pixels (68×2:
        the same for every item); the default reference comes with its points."""
        feeds = self._feeds(landmarks, reference, reference_points, target_points)
        (result,) = self._run([output], feeds)
        with self._lock:
            self.runs += 1
        return result

    def generate_parts(
        self,
        landmarks: np.ndarray,
        reference: np.ndarray | None = None,
        reference_points: np.ndarray | None = None,
        target_points: np.ndarray | None = None,
        output: str = "image_u8",
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A point arch's (face as `generate` returns it, painted face float32 N×S×S×3 in
        [0, 1], mask float32 N×S×S×1 in [0, 1]) from one run: face = mask·warped reference +
        (1 − mask)·painted, so a caller can composite painted and mask over its own warp."""
        if not self.points:
            raise InputError(
                f"this model ({self.arch}) has no painted/mask outputs; only point archs "
                f"({', '.join(onnx_contract.POINT_ARCHS)}) do"
            )
        feeds = self._feeds(landmarks, reference, reference_points, target_points)
        face, painted, mask = self._run(
            [output, onnx_contract.OUTPUT_PAINTED, onnx_contract.OUTPUT_MASK], feeds
        )
        with self._lock:
            self.runs += 1
        return face, painted, mask

    def _run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.io_binding:
            return list(self.session.run(outputs, feeds))
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for output in outputs:
            binding.bind_output(output, "cpu")  # the result lands in host memory directly
        self.session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())

    # ------------------------------------------------------------------ helpers

    def render(self, points_crop: np.ndarray) -> np.ndarray:
        """The landmark image this model expects for 68 points in crop pixels."""
        from facecal.render import render_landmarks

        style: Any = self.style  # from the model file; the renderer refuses unknown styles
        return render_landmarks(points_crop, self.image_size, style)

    def calibrate(self, points: np.ndarray, emotion: str, alpha: float) -> np.ndarray:
        """Landmarks (68×2 image pixels) moved toward `emotion`'s gold by `alpha` (0…1)."""
        from facecal.calibration import CalibrationError

        if emotion not in self.emotions:
            raise InputError(
                f"emotion: no gold template for {emotion!r} in this model; "
                f"available: {self.emotions}"
            )
        if self.gold_model is None:
            raise InputError("this model carries no gold templates")
        try:
            return self.gold_model.calibrate(points, emotion, alpha)
        except CalibrationError as e:
            raise InputError(f"landmarks cannot be calibrated toward {emotion!r}: {e}") from None

    def info(self) -> dict[str, Any]:
        return {
            **self.source.info(self.path),
            "precision": self.precision,
            "providers": self.providers,
            "io_binding": self.io_binding,
            "input_size": [self.image_size, self.image_size],
            "inputs": self.input_names,
            "style": self.style,
            "identity": self.identity,
            "arch": self.arch,
            "points": self.points,
            "emotions": self.emotions,
            "calibration_method": self.calibration_method,
            "default_reference": self.default_reference is not None,
            **(
                {"default_reference_points": self.default_reference_points is not None}
                if self.points
                else {}
            ),
            "warmup_seconds": round(self.warmup_seconds, 4),
        }
