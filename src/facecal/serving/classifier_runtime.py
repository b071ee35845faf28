"""One onnxruntime session for the exported expression classifier (`export_classifier`).

Resolved like the generator (`runtime.resolve`: an .onnx file, a folder holding one, or
``models:/facecal-classifier@champion`` through the registry); providers as the generator's
(CUDA where present, CPU here). Everything it needs — classes, crop size — comes from the file's
``metadata_props``; nothing is unpickled and torch is never imported.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from facecal.onnx_contract import (
    CLASSIFIER_FORMAT_VERSION,
    INPUT_FACES,
    KIND,
    META_CLASSIFIER,
    META_CLASSIFIER_HASH,
    META_FORMAT,
    META_KIND,
    OUTPUT_PROBABILITIES,
    available_providers,
)
from facecal.serving.runtime import (
    InputError,
    ModelLoadError,
    ModelSource,
    RuntimeOptions,
    open_session,
    resolve,
)

# One run's most faces: bounds the session's activation memory whatever a caller hands in.
MAX_RUN = 256


class ClassifierRuntime:
    """The exported classifier behind one onnxruntime session (thread-safe)."""

    def __init__(
        self,
        source: ModelSource | str,
        options: RuntimeOptions | None = None,
        cache_dir: str | None = None,
    ):
        self.options = options or RuntimeOptions()
        self.source = (
            source
            if isinstance(source, ModelSource)
            else resolve(source, cache_dir or self.options.cache_dir)
        )
        path = self.source.path
        self.session = open_session(path, self.options, available_providers())
        self.path = path
        self.providers: list[str] = list(self.session.get_providers())
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get(META_KIND) != KIND or meta.get(META_FORMAT) != CLASSIFIER_FORMAT_VERSION:
            raise ModelLoadError(
                f"{path}: not a facecal classifier export ({META_KIND}="
                f"{meta.get(META_KIND)!r}, {META_FORMAT}={meta.get(META_FORMAT)!r}); "
                f"run `facecal export-cnn`"
            )
        try:
            self.contract: dict[str, Any] = json.loads(meta[META_CLASSIFIER])
            self.classes: list[str] = [str(c) for c in self.contract["classes"]]
            self.image_size = int(self.contract["image_size"])
        except (KeyError, ValueError, TypeError) as e:
            raise ModelLoadError(f"{path}: bad {META_CLASSIFIER} metadata ({e})") from None
        self.classifier_hash = meta.get(META_CLASSIFIER_HASH)
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs != [INPUT_FACES]:
            raise ModelLoadError(f"{path}: graph inputs {inputs}, expected [{INPUT_FACES!r}]")
        self._lock = threading.Lock()
        self.runs = 0
        self.probabilities(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))

    def probabilities(self, faces: np.ndarray) -> np.ndarray:
        """uint8 N×S×S×3 aligned crops → float32 N×C probabilities (class order: `classes`)."""
        a = np.asarray(faces)
        s = self.image_size
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[1:] != (s, s, 3) or a.dtype != np.uint8:
            raise InputError(f"faces: expected uint8 N×{s}×{s}×3, got {a.dtype} {a.shape}")
        if len(a) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        out = [
            self.session.run(
                [OUTPUT_PROBABILITIES], {INPUT_FACES: np.ascontiguousarray(a[i : i + MAX_RUN])}
            )[0]
            for i in range(0, len(a), MAX_RUN)
        ]
        with self._lock:
            self.runs += 1
        return np.concatenate(out)

    def describe(self) -> str:
        s = self.source
        if s.name:
            return f"{s.uri} (v{s.version})"
        return str(s.uri)

    def info(self) -> dict[str, Any]:
        return {
            **self.source.info(self.path),
            "providers": self.providers,
            "classes": self.classes,
            "input_size": [self.image_size, self.image_size],
            "regime": self.contract.get("regime"),
            "seed_index": self.contract.get("seed_index"),
            "classifier_hash": self.classifier_hash,
        }
