"""Which image of the same subject gives an identity generator its reference face.

One rule, used by the pairs stage (training pairs), generate and evaluate (generated faces):

1. the subject's neutral faces, in table order;
2. then its faces of *other* emotions than the face's own, least intense first (unknown
   intensity last);
3. then, only for the rows a caller names (weak faces being pushed toward their own emotion),
   the face itself — or, for a generator that warps its reference (`gan.arch: warp_refine`),
   the face itself *first*: such a generator moves the reference's pixels rather than drawing
   a face, so the person's own face at that moment is its best source (what serving uses too),
   and for a weak face it is not the answer (the answer is the subject's apex).

Never another face of the face's own emotion: every consumer generates a face of that emotion
and compares it with (or trains on) that subject's real faces of it, so a reference showing the
subject's apex of the emotion would let the generator copy the answer. And never the face itself
otherwise: for a training pair or a reconstruction the face *is* the answer.

One exception, for training pairs only (`pairs.weaker_references`): a face may get the subject's
*less intense* faces of its own emotion first (weakest first). That is the task a warp_refine
generator is used for — a weak face warped toward that emotion's apex — so it learns to keep the
expression the weak face already shows and paint only what it lacks; a weaker face is not the
answer (the target is more intense by construction).
"""

from __future__ import annotations

import math
from collections.abc import Collection

import pandas as pd

from facecal.emotions import NEUTRAL


def choose_references(
    faces: pd.DataFrame,
    self_fallback: Collection[int] = (),
    self_first: bool = False,
    weaker_first: bool = False,
) -> dict[int, list[int]]:
    """Reference candidates per face row, best first (the module's rule).

    `faces` has columns subject, emotion, intensity and a unique integer index (table rows);
    rows in `self_fallback` get themselves as the last candidate, or the first with
    `self_first`; with `weaker_first` (training pairs), an expressive face of known intensity
    gets its subject's strictly less intense faces of the same emotion first, weakest first.
    """
    fallback = {int(r) for r in self_fallback}
    out: dict[int, list[int]] = {}
    for _, group in faces.groupby("subject", sort=True):
        inten = group["intensity"].astype(float)
        key = pd.DataFrame(
            {
                "not_neutral": (group["emotion"] != NEUTRAL).astype(int),
                "unknown": inten.isna().astype(int),
                "intensity": inten.fillna(math.inf),
                "row": group.index.to_numpy(),
            },
            index=group.index,
        ).sort_values(["not_neutral", "unknown", "intensity", "row"])
        order = [int(r) for r in key.index]
        emotion_of = group["emotion"].to_dict()
        for row in group.index:
            own = emotion_of[row]
            cands = [
                r for r in order if r != row and (emotion_of[r] == NEUTRAL or emotion_of[r] != own)
            ]
            if weaker_first and own != NEUTRAL and not math.isnan(inten[row]):
                weaker = [
                    r
                    for r in order  # least intense first
                    if emotion_of[r] == own and inten[r] < inten[row]  # NaN compares False
                ]
                cands = [*weaker, *cands]
            if int(row) in fallback:
                cands = [int(row), *cands] if self_first else [*cands, int(row)]
            out[int(row)] = cands
    return out
