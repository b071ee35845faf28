"""Small constructed inputs for the pipeline's tail (generate → train-cnn → evaluate).

A dataset of drawn faces (`_faces.make_dataset`) with subjects in all three splits, its
landmark table and calibrated table, and a real (small, untrained-but-seeded) identity
generator saved under the generator file contract.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from _faces import calibrated_table, make_dataset
from facecal import tables
from facecal.gan.models import build_generator, generator_config, save_generator

SPLITS = {0: "train", 1: "train", 2: "train", 3: "val", 4: "test", 5: "test"}
EMOTIONS = ("neutral", "happy", "surprise", "anger")
INTENSITIES = (0.25, 0.5, 1.0)


def build_project(
    root: Path, subjects: int = 6, splits: dict[int, str] = SPLITS
) -> dict[str, Path]:
    """data/, outputs/landmarks/landmarks.parquet, outputs/calibrate/calibrated.parquet and
    outputs/gan/ under `root`; returns their paths."""
    root = Path(root)
    data = root / "data"
    lm = make_dataset(
        data, subjects=subjects, emotions=EMOTIONS, intensities=INTENSITIES, splits=splits
    )
    table = root / "outputs/landmarks/landmarks.parquet"
    tables.write_table(lm, table)
    cal = calibrated_table(lm, targets=("happy", "surprise", "anger"))
    # Weak as the calibrate stage defines it: non-neutral and intensity ≤ 0.5.
    cal["weak"] = (cal["emotion"] != "neutral") & (cal["intensity"] <= 0.5)
    calibrated = root / "outputs/calibrate/calibrated.parquet"
    tables.write_table(cal, calibrated)
    gan = root / "outputs/gan"
    torch.manual_seed(0)
    G = build_generator("pix2pix", 64, 6, ngf=8)
    save_generator(G, generator_config("pix2pix", 64, "edges", True, {"ngf": 8}), gan)
    return {"root": root, "data": data, "table": table, "calibrated": calibrated, "gan": gan}


def weak_images(lm: pd.DataFrame) -> set[str]:
    return set(lm.loc[(lm["emotion"] != "neutral") & (lm["intensity"] <= 0.5), "image"])
