"""Columnar stage tables (parquet) with 68-point columns.

A points column holds, per row, 136 floats ``x0, y0, x1, y1, …`` (x = column, y = row, pixels of
the raw image) or null where the row has none. `points_array` turns such a column into an
(N, 68, 2) array; `with_points` does the reverse.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from facecal.errors import FacecalError
from facecal.geometry import N_POINTS


class TableError(FacecalError):
    """A stage table that is missing, unreadable, or lacks a column."""


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Write atomically (tmp + rename) so a killed stage never leaves half a table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".parquet")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_table(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: table not found (run the stage that writes it first)")
    try:
        df = pd.read_parquet(path, columns=columns)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise TableError(f"{path}: cannot read table ({e})") from e
    return df


def require_columns(df: pd.DataFrame, columns: list[str], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TableError(f"{name}: missing column(s) {missing}")


def points_array(df: pd.DataFrame, column: str = "points") -> np.ndarray:
    """(N, 68, 2) float64 from a points column; every row must have points."""
    require_columns(df, [column], "table")
    values = df[column].to_list()
    if any(v is None for v in values):
        raise TableError(
            f"column '{column}': {sum(v is None for v in values)} row(s) have no points"
        )
    if not values:
        return np.zeros((0, N_POINTS, 2))
    arr = np.asarray(np.stack(values), dtype=np.float64)
    if arr.shape[1:] != (2 * N_POINTS,):
        raise TableError(f"column '{column}': rows hold {arr.shape[1:]} values, not {2 * N_POINTS}")
    return arr.reshape(len(values), N_POINTS, 2)


def points_column(points: np.ndarray | list) -> list:
    """A points column: per row a flat float array (views of one float64 buffer when ``points``
    is an array — 8 bytes a value where Python float lists take 32, and FER2013's calibrated
    table holds 53 M of them) or, from a list, a float list or None. Parquet stores both as
    list<double>, byte for byte the same."""
    if isinstance(points, np.ndarray):
        return list(np.ascontiguousarray(points, dtype=np.float64).reshape(len(points), -1))
    return [
        None if p is None else np.asarray(p, dtype=np.float64).reshape(-1).tolist() for p in points
    ]


def with_points(df: pd.DataFrame, column: str, points) -> pd.DataFrame:
    out = df.copy()
    out[column] = points_column(points)
    return out
