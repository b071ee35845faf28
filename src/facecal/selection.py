"""Which real faces of the landmark table a regime or the evaluation uses."""

from __future__ import annotations

import pandas as pd

from facecal import tables
from facecal.emotions import NEUTRAL
from facecal.recognition.cnn import ClassifierError


def weak_images(calibrated: pd.DataFrame) -> set[str]:
    """Images of weak faces (a face property; `calibrated.parquet` repeats it per target)."""
    tables.require_columns(calibrated, ["image", "emotion", "weak"], "calibrated.parquet")
    weak = calibrated["weak"].astype(bool) & (calibrated["emotion"] != NEUTRAL)
    return set(calibrated.loc[weak, "image"])


def real_faces(
    table: pd.DataFrame,
    split: str,
    classes: list[str],
    selection: str = "all",
    weak: set[str] | None = None,
) -> pd.DataFrame:
    """Rows of usable real faces of a split: ``all``, or ``low`` = weak faces + neutral ones."""
    tables.require_columns(
        table, ["image", "subject", "emotion", "split", "status", "points"], "landmarks table"
    )
    df = table[
        (table["status"] == "ok") & (table["split"] == split) & table["emotion"].isin(classes)
    ]
    if selection == "low":
        df = df[df["image"].isin(weak or set()) | (df["emotion"] == NEUTRAL)]
    elif selection != "all":
        raise ClassifierError(f"unknown real-face selection {selection!r}")
    return df.sort_values("image", kind="stable").reset_index(drop=True)
