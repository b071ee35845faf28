"""Names of the training-pair files: what the pairs stage writes and the GAN's loader scans.

``PID<p>_CLEAN0_IID<k>.jpg`` (landmark image), ``PID<p>_CLEAN1_IID<k>.jpg`` (face),
``PID<p>_REF_IID<r>.jpg`` (identity reference): the original research loader's names.
"""

from __future__ import annotations

import re

# The original loader's names; also what `facecal train-gan DATADIR …` scans for.
PAIR_FILE = re.compile(
    r"^PID(?P<pid>\d+)_(?P<part>CLEAN0|CLEAN1|REF)_IID(?P<iid>\d+)"
    r"\.(?P<ext>jpg|jpeg|png)$",
    re.IGNORECASE,
)


# Per split folder: the pairs' landmark points in crop pixels (npz: pid, target, ref; N×68×2,
# NaN where a pair has no reference) — what gan.arch warp_refine warps by.
POINTS_FILE = "points.npz"


def pair_name(pid: int, part: str, iid: int) -> str:
    return f"PID{pid}_{part}_IID{iid}.jpg"
