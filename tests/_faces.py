"""Tiny drawn faces with exact 68-point landmarks, for the pairs and GAN tests.

Not the project's synthetic dataset (`facecal.data.synth`): just enough face — skin, hair,
eyes, brows, nose, lips placed on the 68 points — that crops, landmark images and a GAN
overfit can be checked in a second, with subject identity (tone, hair, shape) and expression
(mouth, brows) that differ visibly.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

SIZE = 128


def template() -> np.ndarray:
    """A neutral frontal face in a 128² image, iBUG order."""
    p = np.zeros((68, 2))
    for i in range(17):  # jaw: left ear → chin → right ear
        phi = math.pi * i / 16
        p[i] = (64 - 40 * math.cos(phi), 58 + 54 * math.sin(phi))
    p[17:22] = [(38, 42), (43, 39), (49, 38), (55, 39), (59, 41)]
    p[22:27] = [(128 - x, y) for x, y in p[17:22][::-1]]
    p[27:31] = [(64, 50), (64, 57), (64, 64), (64, 71)]
    p[31:36] = [(57, 76), (60, 77), (64, 78), (68, 77), (71, 76)]
    p[36:42] = [(39, 50), (44, 47), (50, 47), (55, 50), (50, 53), (44, 53)]
    p[42:48] = [(73, 50), (78, 47), (84, 47), (89, 50), (84, 53), (78, 53)]
    p[48:60] = [
        (51, 91),
        (55, 88),
        (60, 86),
        (64, 87),
        (68, 86),
        (73, 88),
        (77, 91),
        (73, 95),
        (68, 97),
        (64, 97.5),
        (60, 97),
        (55, 95),
    ]
    p[60:68] = [(53, 91), (60, 90), (64, 90.5), (68, 90), (75, 91), (68, 92), (64, 92.5), (60, 92)]
    return p


def expression(points: np.ndarray, emotion: str, a: float) -> np.ndarray:
    """Move the points toward `emotion` with intensity a ∈ [0, 1]."""
    p = points.copy()
    if emotion == "happy":
        p[[48, 60]] += (-4 * a, -5 * a)
        p[[54, 64]] += (4 * a, -5 * a)
        p[[55, 56, 57, 58, 59]] += (0, 3 * a)
        p[[65, 66, 67]] += (0, 4 * a)
    elif emotion == "surprise":
        p[list(range(56, 59)) + [65, 66, 67]] += (0, 12 * a)
        p[[55, 59]] += (0, 8 * a)
        p[17:27] += (0, -6 * a)
        p[[37, 38, 43, 44]] += (0, -2 * a)
    elif emotion == "anger":
        p[[21, 22]] += (0, 6 * a)
        p[[20, 23]] += (0, 4 * a)
        p[[48, 60]] += (3 * a, 0)
        p[[54, 64]] += (-3 * a, 0)
    elif emotion == "sad":
        p[[48, 60, 54, 64]] += (0, 5 * a)
        p[[21, 22]] += (0, -4 * a)
    return p


def subject_style(k: int) -> dict:
    rng = np.random.default_rng(1000 + k)
    return {
        "skin": tuple(int(v) for v in rng.integers([150, 100, 70], [250, 200, 170])),
        "hair": tuple(int(v) for v in rng.integers(0, 120, 3)),
        "bg": tuple(int(v) for v in rng.integers(60, 200, 3)),
        "width": float(rng.uniform(0.9, 1.1)),
        "angle": float(rng.uniform(-0.12, 0.12)),
        "shift": rng.uniform(-4, 4, 2),
    }


def place(points: np.ndarray, style: dict) -> np.ndarray:
    """The subject's face shape and head pose."""
    c = np.array([64.0, 64.0])
    q = points - c
    q[:, 0] *= style["width"]
    ca, sa = math.cos(style["angle"]), math.sin(style["angle"])
    q = q @ np.array([[ca, sa], [-sa, ca]])
    return q + c + style["shift"]


def draw_face(points: np.ndarray, style: dict) -> np.ndarray:
    im = Image.new("RGB", (SIZE, SIZE), style["bg"])
    d = ImageDraw.Draw(im)
    jaw = [tuple(v) for v in points[0:17]]
    top = [
        tuple(points[26] + (4, -14)),
        tuple((points[19] + points[24]) / 2 + (0, -24)),
        tuple(points[17] + (-4, -14)),
    ]
    d.polygon(jaw + top, fill=style["skin"])
    d.chord(
        [points[17][0] - 10, points[19][1] - 40, points[26][0] + 10, points[19][1] - 2],
        180,
        360,
        fill=style["hair"],
    )
    for part in (range(17, 22), range(22, 27)):
        d.line([tuple(points[i]) for i in part], fill=style["hair"], width=3)
    for part in (range(36, 42), range(42, 48)):
        eye = points[list(part)]
        d.polygon([tuple(v) for v in eye], fill=(250, 250, 250))
        cx, cy = eye.mean(0)
        d.ellipse([cx - 2.5, cy - 2.5, cx + 2.5, cy + 2.5], fill=(30, 20, 10))
    d.line([tuple(points[i]) for i in range(27, 31)], fill=(120, 70, 50), width=2)
    d.line([tuple(points[i]) for i in range(31, 36)], fill=(120, 70, 50), width=2)
    d.polygon([tuple(points[i]) for i in range(48, 60)], fill=(190, 60, 60))
    d.polygon([tuple(points[i]) for i in range(60, 68)], fill=(60, 10, 10))
    return np.asarray(im)


EMOTIONS = ("neutral", "happy", "surprise", "anger")


def make_dataset(
    root: Path, subjects: int = 4, emotions=EMOTIONS, intensities=(0.5, 1.0), splits=None
) -> pd.DataFrame:
    """Write images under root/images and return a landmark table (architecture.md columns)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(subjects):
        style = subject_style(s)
        split = (splits or {}).get(s, "train" if s < subjects - 1 else "val")
        for e in emotions:
            for a in (0.0,) if e == "neutral" else intensities:
                pts = place(expression(template(), e, a), style)
                rel = f"images/s{s}_{e}_{int(a * 100)}.png"
                Image.fromarray(draw_face(pts, style)).save(root / rel)
                rows.append(
                    {
                        "image": rel,
                        "subject": f"s{s}",
                        "emotion": e,
                        "source": "test",
                        "intensity": a,
                        "split": split,
                        "status": "ok",
                        "n_faces": 1,
                        "box": None,
                        "points": pts.reshape(-1).tolist(),
                        "points_source": "ground_truth",
                        "gt_points": pts.reshape(-1).tolist(),
                        "nme": float("nan"),
                        "width": SIZE,
                        "height": SIZE,
                    }
                )
    return pd.DataFrame(rows)


def calibrated_table(landmarks: pd.DataFrame, targets=("happy", "surprise")) -> pd.DataFrame:
    """A calibrated table (architecture.md columns) whose 'calibration' is the drawn
    expression itself, so the expected landmark image of every pair is known."""
    rows = []
    for _, r in landmarks[landmarks["status"] == "ok"].iterrows():
        pts = np.asarray(r["points"]).reshape(68, 2)
        for t in targets:
            cal = pts + (expression(template(), t, 1.0) - template())
            rows.append(
                {
                    "image": r["image"],
                    "subject": r["subject"],
                    "emotion": r["emotion"],
                    "intensity": r["intensity"],
                    "split": r["split"],
                    "target_emotion": t,
                    "weak": True,
                    "points": pts.reshape(-1).tolist(),
                    "calibrated": cal.reshape(-1).tolist(),
                    "par_x": [0.0] * 6,
                    "par_y": [0.0] * 6,
                    "rms_before": 0.0,
                    "rms_after": 0.0,
                }
            )
    return pd.DataFrame(rows)


def make_pairs(root: Path, n: int = 8, size: int = 64) -> Path:
    """`n` (≤ 10) training pairs with references, written by the real pairs stage; returns
    the folder of PID…_CLEAN0/CLEAN1/REF files."""
    from facecal import tables
    from facecal.pairs import BaseParams, PairsParams, run_pairs

    root = Path(root)
    lm = make_dataset(
        root / "ds",
        subjects=2,
        emotions=("neutral", "happy", "surprise"),
        intensities=(1.0, 0.5),
        splits={0: "train", 1: "train"},
    ).iloc[:n]
    tables.write_table(lm, root / "lm.parquet")
    run_pairs(
        PairsParams(),
        BaseParams(image_size=size),
        root / "ds",
        root / "lm.parquet",
        root / "none",
        root / "pairs",
        root / "plots",
        progress=False,
    )
    return root / "pairs" / "train"


def subject_without_neutral(split: str = "train") -> pd.DataFrame:
    """Landmark rows that poison the identity-reference choice: subject a has no neutral face,
    and by intensity alone its weak anger face (row 0) would reference its anger apex (row 1);
    its happy face (row 2) has unknown intensity."""
    return pd.DataFrame(
        {
            "image": ["a_weak_anger.png", "a_apex_anger.png", "a_happy.png"],
            "subject": ["a"] * 3,
            "emotion": ["anger", "anger", "happy"],
            "intensity": [0.2, 1.0, np.nan],
            "split": [split] * 3,
            "status": ["ok"] * 3,
            "points": [list(np.arange(136.0))] * 3,
        }
    )
