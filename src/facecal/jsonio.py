"""The one writer of facecal's JSON files (metrics, stage outputs, model metadata).

Atomic (a temp file beside the target, then `os.replace`), so a crash never leaves half a file
that DVC or the next stage would read. NaN policy: a non-finite float (NaN, ±inf) is written as
``null`` — ``json.dumps`` would otherwise write ``NaN``, which is not JSON.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (dicts, lists and tuples walked)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, sort_keys: bool = True) -> str:
    """The text `write_json` writes: indented, keys sorted (unless told), a final newline."""
    return json.dumps(finite(obj), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n"


def write_json(path: str | Path, obj: Any, sort_keys: bool = True) -> None:
    """Write `obj` to `path` atomically (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        tmp.write_text(dumps(obj, sort_keys), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
