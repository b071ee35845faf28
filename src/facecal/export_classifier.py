"""Stage `export_cnn`: the expression CNN as a self-contained ONNX model (classify, serving).

The graph takes what a client has — aligned face crops as the pipeline makes them
(`geometry.crop_transform` + `warp_image`, what `faces.crop_faces` returns) — and returns
what it wants to show:

* input ``faces`` — uint8 N×S×S×3 RGB crops (S = the model's image size, batch axis dynamic);
  the ``uint8 / 127.5 − 1`` scaling and NHWC → NCHW happen inside the graph;
* outputs ``probabilities`` — float32 N×C softmax, and ``logits`` — float32 N×C; for a model
  trained with mirroring, the logits are the mean of the face's and its mirror image's, as
  `recognition.cnn.predict` computes them.

``metadata_props``: ``facecal.kind`` = ``classifier``, ``facecal.classifier`` (classes in
output order, image size, mirror, regime, seed index, training fingerprint, the crop contract),
``facecal.classifier_hash`` (`classifier_hash`: config + every tensor), ``facecal.format``.
The parity check runs the torch model and the ONNX session on the same batch (real val crops
when the landmark table is there, plus smooth random images and the extremes) and fails the
stage beyond ``parity_atol``. Nothing else is needed at serving time and nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facecal import config, tracking
from facecal.errors import FacecalError
from facecal.jsonio import write_json
from facecal.onnx_contract import (
    CLASSIFIER_FORMAT_VERSION,
    INPUT_FACES,
    KIND,
    META_CLASSIFIER,
    META_CLASSIFIER_HASH,
    META_FORMAT,
    META_KIND,
    OUTPUT_LOGITS,
    OUTPUT_PROBABILITIES,
    WEIGHTS_DIR,
    WEIGHTS_FILE,
)

SECTION = "export_cnn"
CNN_DIR = Path("outputs/cnn")
DATA_DIR = Path("data")
TABLE_PATH = Path("outputs/landmarks/landmarks.parquet")
OUT_DIR = Path("outputs/export_cnn")
METRICS_PATH = Path("metrics/export_cnn.json")
ONNX_FILE = "classifier.onnx"
MODEL_JSON = "model.json"


class ExportClassifierError(FacecalError):
    """The classifier cannot be found or exported, or its ONNX output differs from torch."""


class NotTrained(ExportClassifierError):
    """train_cnn skipped the regime (it says why): there is no model to export."""


@dataclass
class ExportCnnParams:
    regime: str = "real_all"
    seed_index: int = 0
    opset: int = 18
    parity_atol: float = 1e-5
    parity_batch: int = 8
    parity_faces: int = 32

    def __post_init__(self) -> None:
        if self.opset < 18:
            raise ValueError(f"opset must be ≥ 18, got {self.opset}")
        if self.seed_index < 0:
            raise ValueError(f"seed_index must be ≥ 0, got {self.seed_index}")
        if self.parity_batch < 2:  # ≥ 2 so parity also exercises the dynamic batch axis
            raise ValueError(f"parity_batch must be ≥ 2, got {self.parity_batch}")
        if self.parity_faces < 0:
            raise ValueError(f"parity_faces must be ≥ 0, got {self.parity_faces}")


def load_params(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> ExportCnnParams:
    return config.load_section(ExportCnnParams, SECTION, path, overrides)


# --------------------------------------------------------------------------- the graph


def serving_module(model, mirror: bool):
    """`model` (an `ExpressionCNN`) wrapped to take uint8 NHWC crops and return
    (probabilities, logits)."""
    import torch
    from torch import nn

    class Served(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, faces):
            # = recognition.cnn.to_input: uint8 / 127.5 − 1, NCHW
            x = faces.permute(0, 3, 1, 2).to(torch.float32).div(127.5).sub(1.0)
            logits = self.net(x)
            if mirror:
                logits = (logits + self.net(x.flip(-1))) / 2
            return torch.softmax(logits, dim=1), logits

    return Served().eval()


def export_onnx(module, example, path: Path, opset: int) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[INPUT_FACES],
            output_names=[OUTPUT_PROBABILITIES, OUTPUT_LOGITS],
            dynamic_shapes={"faces": {0: torch.export.Dim("batch", min=1, max=65536)}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        assert program is not None  # dynamo=True always returns the program
        program.save(str(tmp), external_data=False)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- parity


def parity_inputs(size: int, n: int, seed: int, faces: np.ndarray | None = None) -> np.ndarray:
    """A fixed batch: real crops (if given), smooth random images (face-like statistics: large
    blobs, not per-pixel noise), per-pixel noise, all white and all black."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [] if faces is None else list(faces)
    for i in range(n):
        if i == n - 1:
            images.append(np.zeros((size, size, 3), np.uint8))
        elif i == n - 2:
            images.append(np.full((size, size, 3), 255, np.uint8))
        elif i == n - 3:
            images.append(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        else:
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            big = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
            images.append(np.asarray(big))
    return np.stack(images)


def val_crops(data_dir: Path, table_path: Path, classes: list[str], size: int, n: int):
    """Up to `n` aligned real val faces (the landmark table's order), or None without a table."""
    if n == 0 or not Path(table_path).is_file():
        return None
    from facecal import tables
    from facecal.faces import crop_faces
    from facecal.manifest import Report
    from facecal.selection import real_faces

    rows = real_faces(tables.read_table(table_path), "val", classes).head(n)
    crops, ok = crop_faces(Path(data_dir), rows, size, Report())
    return crops[ok] if ok.any() else None


def compare(session, faces: np.ndarray, probs: np.ndarray, logits: np.ndarray, atol: float):
    got_p, got_l = session.run([OUTPUT_PROBABILITIES, OUTPUT_LOGITS], {INPUT_FACES: faces})
    dp = np.abs(got_p.astype(np.float64) - probs)
    dl = np.abs(got_l.astype(np.float64) - logits)
    same = got_p.argmax(1) == probs.argmax(1)
    # A near-tie may flip within the tolerance; only a clear winner must stay the winner.
    top2 = np.sort(probs, axis=1)[:, -2:] if probs.shape[1] > 1 else np.ones((len(probs), 2))
    clear = (top2[:, 1] - top2[:, 0]) > 2 * atol
    return {
        "max_abs_diff": float(dp.max()),
        "mean_abs_diff": float(dp.mean()),
        "logits_max_abs_diff": float(dl.max()),
        "argmax_agreement": float(same.mean()),
        "atol": atol,
        "passed": bool(dp.max() <= atol and same[clear].all()),
        "provider": session.get_providers()[0],
        "batch": int(len(faces)),
    }


# --------------------------------------------------------------------------- the stage


def model_path(cnn_dir: Path, regime: str, seed_index: int) -> Path:
    """The train_cnn file of `regime`'s training `seed_index` (models.json)."""
    from facecal.recognition.cnn import trained_models

    index = trained_models(cnn_dir)
    files = index["regimes"].get(regime)
    if not files:
        why = index["skipped"].get(regime)
        if why:
            raise NotTrained(f"{cnn_dir}: train_cnn did not train regime {regime!r}: {why}")
        raise ExportClassifierError(
            f"{cnn_dir}: no trained model of regime {regime!r} (run `facecal train-cnn`)"
        )
    if seed_index >= len(files):
        raise ExportClassifierError(
            f"{cnn_dir}: regime {regime!r} has {len(files)} training(s); seed_index "
            f"{seed_index} does not exist"
        )
    return cnn_dir / files[seed_index]


def run_export_cnn(
    params: ExportCnnParams,
    cnn_dir: Path = CNN_DIR,
    out_dir: Path = OUT_DIR,
    metrics_path: Path | None = METRICS_PATH,
    data_dir: Path = DATA_DIR,
    table_path: Path = TABLE_PATH,
    seed: int = 0,
) -> dict[str, Any]:
    """Export one train_cnn model to `out_dir`/classifier.onnx; returns the metrics (also
    written to `metrics_path`). Raises after writing them when parity fails."""
    import torch

    from facecal.onnx_contract import attach_metadata, file_info, onnx_session
    from facecal.recognition.cnn import classifier_hash, load_classifier

    out_dir = Path(out_dir)
    try:
        source = model_path(Path(cnn_dir), params.regime, params.seed_index)
    except NotTrained as e:
        # Data a classifier cannot be trained on (one class): the pipeline still completes,
        # saying why, and nothing stale is left to be served or registered.
        (out_dir / ONNX_FILE).unlink(missing_ok=True)
        shutil.rmtree(out_dir / WEIGHTS_DIR, ignore_errors=True)
        skipped = {"passed": None, "regime": params.regime, "not_exported": str(e)}
        write_json(
            out_dir / MODEL_JSON, {"format": CLASSIFIER_FORMAT_VERSION, "kind": KIND, **skipped}
        )
        if metrics_path is not None:
            write_json(Path(metrics_path), skipped)
        print(f"export-cnn: nothing exported — {e}", file=sys.stderr)
        return skipped
    model, meta = load_classifier(source)
    digest = classifier_hash(model, meta)
    classes, size, mirror = list(meta["classes"]), int(meta["image_size"]), bool(meta["mirror"])
    module = serving_module(model, mirror)

    faces = val_crops(data_dir, table_path, classes, size, params.parity_faces)
    feeds = parity_inputs(size, params.parity_batch, seed, faces)
    with torch.no_grad():
        p, lg = module(torch.from_numpy(feeds))
    probs, logits = p.double().numpy(), lg.double().numpy()

    contract = {
        "classes": classes,
        "image_size": size,
        "mirror": mirror,
        "regime": meta.get("regime", params.regime),
        "seed_index": meta.get("seed_index", params.seed_index),
        "fingerprint": meta.get("fingerprint"),
        "val_accuracy": meta.get("val_accuracy"),
        "source": source.name,
        "input": {
            INPUT_FACES: {
                "dtype": "uint8",
                "shape": ["N", size, size, 3],
                "layout": "NHWC",
                "content": "RGB face crop aligned by facecal.geometry.crop_transform "
                "(dlib 68 points → canonical frame → crop), bicubic warp",
            }
        },
        "outputs": {
            OUTPUT_PROBABILITIES: {"dtype": "float32", "shape": ["N", len(classes)]},
            OUTPUT_LOGITS: {"dtype": "float32", "shape": ["N", len(classes)]},
        },
    }
    metadata = {
        META_FORMAT: CLASSIFIER_FORMAT_VERSION,
        META_KIND: KIND,
        META_CLASSIFIER: json.dumps(contract, sort_keys=True),
        META_CLASSIFIER_HASH: digest,
    }
    doc = (
        f"facecal expression classifier ({contract['regime']}, seed {contract['seed_index']}, "
        f"{size}², classes {', '.join(classes)}). Input: faces uint8 NHWC aligned crops; "
        f"outputs: probabilities, logits float32 N×{len(classes)}."
    )
    path = out_dir / ONNX_FILE
    t0 = time.perf_counter()
    export_onnx(module, torch.from_numpy(feeds[:2]), path, params.opset)
    attach_metadata(path, metadata, doc)
    seconds = time.perf_counter() - t0
    parity = compare(onnx_session(path), feeds, probs, logits, params.parity_atol)
    parity["real_faces"] = 0 if faces is None else int(len(faces))

    copy_weights(source, out_dir / WEIGHTS_DIR)

    info = file_info(path)
    metrics = {
        "parity": parity,
        "passed": parity["passed"],
        "regime": contract["regime"],
        "seed_index": contract["seed_index"],
        "classifier_hash": digest,
        "opset": params.opset,
        "export_seconds": round(seconds, 3),
        "parameters": int(sum(t.numel() for t in model.parameters())),
        "onnx_bytes": info["bytes"],
    }
    write_json(
        out_dir / MODEL_JSON,
        {
            "format": CLASSIFIER_FORMAT_VERSION,
            "kind": KIND,
            "classifier": contract,
            "classifier_hash": digest,
            "file": info,
            "parity": parity,
            "metadata_keys": sorted(metadata),
        },
    )
    if metrics_path is not None:
        write_json(Path(metrics_path), metrics)
    if not parity["passed"]:
        raise ExportClassifierError(
            f"{path}: ONNX output differs from torch: max |Δp| {parity['max_abs_diff']:.3g} "
            f"(atol {params.parity_atol:g}), argmax agreement {parity['argmax_agreement']:.3f}"
        )
    return metrics


def copy_weights(source: Path, folder: Path) -> None:
    """`source` (.pt) and its .json into `folder` as WEIGHTS_FILE (+ .json), each replaced
    atomically (.json last: a reader that finds it finds the weights it describes)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / WEIGHTS_FILE
    for src, dst in ((source, target), (source.with_suffix(".json"), target.with_suffix(".json"))):
        tmp = dst.with_name(f".tmp-{dst.name}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("--cnn-dir", type=Path, default=CNN_DIR, help="train_cnn output folder")
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="raw dataset (parity faces)")
    parser.add_argument("--table", type=Path, default=TABLE_PATH, help="landmark table")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"default: {OUT_DIR}")
    parser.add_argument("--metrics", type=Path, default=METRICS_PATH)
    config.add_params_arguments(parser)


def main(args) -> int:
    from facecal.onnx_contract import base_seed

    params = config.params_from_args(args, ExportCnnParams, SECTION)
    seed = base_seed(getattr(args, "params", None))
    before = args.metrics.stat().st_mtime_ns if args.metrics.exists() else None
    with tracking.stage_run(SECTION, params) as run:
        try:
            metrics = run_export_cnn(
                params, args.cnn_dir, args.out, args.metrics, args.data, args.table, seed
            )
        finally:
            if args.metrics.exists() and args.metrics.stat().st_mtime_ns != before:
                run.log_metrics(json.loads(args.metrics.read_text()))
        run.log_artifact(args.out / MODEL_JSON, "export_cnn")
    if "not_exported" in metrics:
        return 0
    p = metrics["parity"]
    print(
        f"export-cnn: {args.out / ONNX_FILE} ({metrics['regime']} seed {metrics['seed_index']}, "
        f"{metrics['onnx_bytes'] / 1e6:.2f} MB), parity max |Δp| {p['max_abs_diff']:.2e} on "
        f"{p['batch']} faces ({p['real_faces']} real), argmax agreement "
        f"{p['argmax_agreement']:.3f}",
        file=sys.stderr,
    )
    return 0
