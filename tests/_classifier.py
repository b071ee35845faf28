"""Shared setup of the classifier-product tests (classify, its ONNX export, /v1/classify): the
synthetic faces run through the real landmarks stage, and a small expression CNN trained on
their aligned crops with the pipeline's own `train_one` and saved with `save_classifier`, so
its predictions vary across faces (a constant model would make agreement tests trivial).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from facecal import tables

SIZE = 64
_CACHE: dict[str, Any] = {}


@dataclass
class TrainedCnn:
    data_dir: Path  # the synth dataset (manifest.csv, images/)
    table: pd.DataFrame  # the landmarks stage's rows with status ok
    crops: np.ndarray  # their aligned crops (faces.crop_faces)
    model_path: Path  # <root>/cnn/real_all.pt (+ .json, models.json)
    meta: dict[str, Any]
    table_path: Path  # the landmarks stage's table


def trained_cnn(data_dir: Path, tmp_path_factory) -> TrainedCnn:
    """Landmarks of `data_dir` by `run_landmarks`, crops, and an 8-epoch width-8 CNN (once per
    test process)."""
    if "cnn" not in _CACHE:
        import torch

        from facecal.classifier import (
            CnnParams,
            class_list,
            crop_faces,
            regime_seed,
            save_classifier,
            train_one,
        )
        from facecal.landmarks import LandmarksParams, run_landmarks
        from facecal.manifest import Report

        root = tmp_path_factory.mktemp("cnn_product")
        run_landmarks(
            LandmarksParams(workers=1, overlays=0),
            data_dir,
            root / "landmarks",
            root / "landmarks.json",
            root / "plots",
            progress=False,
        )
        lm = tables.read_table(root / "landmarks" / "landmarks.parquet")
        ok = lm[lm["status"] == "ok"].sort_values("image").reset_index(drop=True)
        crops, loaded = crop_faces(data_dir, ok, SIZE, Report())
        assert loaded.all()
        classes = class_list(lm, ["anger", "happy", "surprise", "sad"])
        cidx = {c: i for i, c in enumerate(classes)}
        y = ok["emotion"].map(lambda e: cidx.get(e, -1)).to_numpy()
        keep = y >= 0
        params = CnnParams(width=8, epochs=8, patience=8, batch_size=16, lr=0.003, augment=False)
        torch.set_num_threads(1)
        res = train_one(
            crops[keep], y[keep], crops[keep][:16], y[keep][:16], len(classes), params,
            regime_seed(0, "real_all"), desc=None,
        )  # fmt: skip
        meta = {
            "regime": "real_all",
            "seed_index": 0,
            "classes": classes,
            "image_size": SIZE,
            "width": params.width,
            "dropout": params.dropout,
            "input": "RGB aligned crop, uint8/127.5 − 1",
            "mirror": False,
            "fingerprint": "test-fingerprint",
            "val_accuracy": res.val_accuracy,
        }
        path = root / "cnn" / "real_all.pt"
        save_classifier(res.model, meta, path)
        index = {"classes": classes, "seeds": 1, "regimes": {"real_all": [path.name]}}
        (path.parent / "models.json").write_text(json.dumps(index | {"skipped": {}}))
        table = root / "landmarks" / "landmarks.parquet"
        _CACHE["cnn"] = TrainedCnn(data_dir, ok, crops, path, meta, table)
    return _CACHE["cnn"]


def pipeline_predictions(cnn: TrainedCnn) -> tuple[np.ndarray, np.ndarray]:
    """(class index, softmax probabilities) of `recognition.cnn.predict`'s model on the pipeline's
    crops — what evaluate computes for these faces."""
    import torch

    from facecal.recognition.cnn import load_classifier, predict, to_input

    model, meta = load_classifier(cnn.model_path)
    pred, _ = predict(model, cnn.crops, mirror=bool(meta["mirror"]))
    with torch.no_grad():
        probs = torch.softmax(model(to_input(cnn.crops)), 1).numpy()
    return pred, probs


def exported_cnn(cnn: TrainedCnn, tmp_path_factory) -> dict[str, Any]:
    """`run_export_cnn` of the trained model (once per test process): metrics and paths."""
    if "export" not in _CACHE:
        from facecal.export_classifier import ExportCnnParams, run_export_cnn

        root = tmp_path_factory.mktemp("export_cnn")
        metrics = run_export_cnn(
            ExportCnnParams(parity_faces=24),
            cnn.model_path.parent,
            root / "out",
            root / "export_cnn.json",
            cnn.data_dir,
            cnn.table_path,
        )
        _CACHE["export"] = {
            "metrics": metrics,
            "onnx": root / "out" / "classifier.onnx",
            "model_json": root / "out" / "model.json",
            "metrics_path": root / "export_cnn.json",
        }
    return _CACHE["export"]
