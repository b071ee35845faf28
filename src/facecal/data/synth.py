"""The embedded default dataset: synthetic faces with exact 68-point ground truth.

A fresh machine has no face data, so `facecal data synth --out DIR` renders one. Every face is
built from its landmarks: a parametric neutral face per subject (identity), FACS-like action
units displace the points per emotion (scaled by intensity, with a per-subject expression
style), a small similarity jitter poses the head, and then skin, eyes, brows, nose, lips and
wrinkles are painted *from the same points*, so the 68 points written beside each image are
its exact truth (iBUG order).

Coordinates: faces are designed in the canonical frame of `facecal.geometry` (x right, y down,
outer eye corners near (−1, 0) and (1, 0)); the pose maps them to output pixels (pixel centres
at integer coordinates, dlib's convention). Pixels are painted on a supersampled raster and
box-filtered down, so edges are anti-aliased and soft.

Randomness: identity from ``SeedSequence(seed, spawn_key=(0, subject))``, each image from
``SeedSequence(seed, spawn_key=(1, subject, emotion, intensity))`` — the files do not depend on
the worker count or order, and adding subjects leaves the existing ones unchanged.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from facecal import emotions, manifest
from facecal.errors import FacecalError
from facecal.geometry import nme as _nme
from facecal.imageio import load_image, save_image
from facecal.parallel import worker_pool

if TYPE_CHECKING:
    from facecal.detector import LandmarkDetector

SOURCE = "synthetic"
_SS = 2  # supersampling factor of the raster
_PX_PER_UNIT = 0.19  # canonical unit (half the outer-eye-corner distance) in image sides

# Proportions tuned against dlib's 68-point model (bench/synth.py --parts): where a contour is
# ambiguous (brow ends, jaw ends, eye corners) the design follows the iBUG annotation habit, so
# that dlib's points and the truth agree.
_BROW_H = (0.44, 0.58)  # inner brow point above the eye line
_BROW_ENDS = (0.07, 0.015, 0.0, 0.015, 0.07)  # the brow points' ends sit lower (inner → outer)
_BROW_W = (0.12, 0.2)  # brow thickness
_BROW_BELOW = 0.5  # mid-brow, this share of the thickness lies below the points
_EYE_OUTER = 0.97  # outer eye corner x
_EYE_INNER = (0.36, 0.47)  # inner eye corner x


class SynthError(FacecalError):
    """Bad synthetic-dataset settings or output folder."""


@dataclass(frozen=True)
class SynthConfig:
    subjects: int = 40
    intensities: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    emotions: tuple[str, ...] = emotions.EXPRESSIVE
    size: int = 128  # RGB size×size
    seed: int = 0

    def __post_init__(self):
        if self.subjects < 1:
            raise SynthError(f"subjects: need at least 1, got {self.subjects}")
        if self.size < 48:
            raise SynthError(
                f"size: need at least 48 pixels for a detectable face, got {self.size}"
            )
        for i in self.intensities:
            if not 0.0 < float(i) <= 1.0:
                raise SynthError(f"intensities: {i} is outside (0, 1]")
        if len(set(self.intensities)) != len(self.intensities):
            raise SynthError(f"intensities: duplicates in {self.intensities}")
        if len({round(float(i) * 100) for i in self.intensities}) != len(self.intensities):
            raise SynthError(
                f"intensities: {self.intensities} must differ in percent "
                "(file names carry the intensity in percent)"
            )
        if len(set(self.emotions)) != len(self.emotions):
            raise SynthError(f"emotions: duplicates in {self.emotions}")
        for e in self.emotions:
            if e not in _RECIPES:
                raise SynthError(f"emotions: {e!r} is not one of {list(_RECIPES)}")


# ---------------------------------------------------------------------------------------------
# Identity: the neutral face of a subject
# ---------------------------------------------------------------------------------------------

_SKIN_TONES = np.array(
    [  # light → dark albedo anchors (sRGB), interpolated per subject
        [247, 222, 200],
        [236, 198, 170],
        [224, 178, 144],
        [198, 146, 110],
        [168, 116, 84],
        [132, 88, 62],
        [104, 68, 48],
    ],
    dtype=np.float32,
)
_HAIR_COLOURS = np.array(
    [
        [22, 18, 16],
        [40, 28, 20],
        [70, 46, 30],
        [105, 72, 45],
        [150, 110, 70],
        [196, 160, 105],
        [120, 60, 30],
        [120, 118, 115],
        [60, 58, 56],
    ],
    dtype=np.float32,
)
_IRIS_COLOURS = np.array(
    [
        [60, 38, 24],
        [90, 60, 35],
        [40, 28, 20],
        [70, 100, 120],
        [80, 110, 70],
        [110, 85, 50],
    ],
    dtype=np.float32,
)


@dataclass
class Identity:
    points: np.ndarray  # (68, 2) neutral landmarks, canonical units
    upper_lip: float  # lip thicknesses (for the lip-press action)
    lower_lip: float
    skin: np.ndarray  # RGB albedo
    lip: np.ndarray
    hair: np.ndarray
    brow: np.ndarray
    iris: np.ndarray
    brow_width: float
    hair_style: int  # 0 short, 1 long, 2 receding/very short
    hair_volume: float
    hairline: float
    fringe: float  # how far side hair comes down the temples
    background: np.ndarray  # (2, 3) top and bottom colour
    cloth: np.ndarray
    light: np.ndarray  # unit vector toward the light (x right, y down, z to camera)
    ambient: float
    ears: bool
    gains: dict[str, np.ndarray]  # action unit → (right, left) gain: the expression style
    recipes: dict[str, dict[str, float]]
    age_lines: float  # resting wrinkle visibility
    fields: dict[str, np.ndarray]  # AU → this subject's displacement at unit strength


def _resample_arc(curve: np.ndarray, n: int) -> np.ndarray:
    seg = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(t, s, curve[:, 0]), np.interp(t, s, curve[:, 1])], 1)


def _neutral_points(rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    u = rng.uniform
    p = np.zeros((68, 2))
    # Jaw: a super-ellipse from ear to ear through the chin, tapered toward the chin, then
    # resampled at equal arc length as the iBUG jaw points are.
    jaw_w, y_top, chin_y = u(1.42, 1.66), u(-0.15, 0.05), u(2.18, 2.48)
    expo, taper = u(2.0, 3.2), u(0.02, 0.2)
    phi = np.linspace(0.0, math.pi, 400)
    c, s = np.cos(phi), np.sin(phi)
    t = np.abs(s) ** (2 / expo)
    y = y_top + (chin_y - y_top) * t
    x = (
        -np.sign(c)
        * np.abs(c) ** (2 / expo)
        * jaw_w
        * (1 - taper * ((y - y_top) / (chin_y - y_top)) ** 2)
    )
    p[0:17] = _resample_arc(np.stack([x, y], 1), 17)
    # Eyes (right eye = image left): corners, then lids at thirds.
    outer_x, inner, tilt = _EYE_OUTER, u(*_EYE_INNER), u(-0.03, 0.07)
    up, lo = u(0.085, 0.125), u(0.06, 0.085)
    idx: tuple[int, ...]
    for side, idx in ((-1, (36, 37, 38, 39, 40, 41)), (1, (45, 44, 43, 42, 47, 46))):
        o = np.array([side * outer_x, -tilt])
        i = np.array([side * inner, 0.06 - 0.3 * tilt])
        a, b, cc, d, e, f = idx
        p[a], p[d] = o, i
        for k, frac in ((b, 1 / 3), (cc, 2 / 3)):
            m = o + (i - o) * frac
            p[k] = m + [0, -up * (1.0 if frac > 0.5 else 0.95)]
        for k, frac in ((f, 1 / 3), (e, 2 / 3)):
            m = o + (i - o) * frac
            p[k] = m + [0, lo]
    # Brows: inner → outer, arched, the tail dropping.
    b_in, b_out, b_h = u(0.2, 0.34), u(1.16, 1.34), u(*_BROW_H)
    arch, drop = u(0.04, 0.13), u(0.05, 0.18)
    for side, idx in ((-1, (21, 20, 19, 18, 17)), (1, (22, 23, 24, 25, 26))):
        for j, k in enumerate(idx):
            sj = j / 4
            p[k] = [
                side * (b_in + (b_out - b_in) * sj),
                -(b_h + arch * math.sin(math.pi * sj * 0.85)) + drop * sj**2 + _BROW_ENDS[j],
            ]
    # Nose.
    top, tip = u(-0.07, 0.0), u(0.72, 0.88)
    base, width = tip + u(0.23, 0.31), u(0.23, 0.33)
    for j, k in enumerate((27, 28, 29, 30)):
        p[k] = [0.0, top + (tip - top) * j / 3]
    p[33] = [0, base]
    p[32], p[34] = [-width * 0.5, base - 0.03], [width * 0.5, base - 0.03]
    p[31], p[35] = [-width, base - 0.08], [width, base - 0.08]
    # Mouth.
    my = base + u(0.4, 0.55)
    mw, ut, lt, bow = u(0.5, 0.68), u(0.07, 0.115), u(0.1, 0.16), u(0.01, 0.035)
    outer = {
        48: (-1.0, 0.0),
        49: (-0.6, -0.8),
        50: (-0.25, -1.0),
        51: (0.0, -1.0),
        52: (0.25, -1.0),
        53: (0.6, -0.8),
        54: (1.0, 0.0),
        55: (0.6, 0.8),
        56: (0.27, 1.0),
        57: (0.0, 1.03),
        58: (-0.27, 1.0),
        59: (-0.6, 0.8),
    }
    for k, (fx, fy) in outer.items():
        p[k] = [fx * mw, my + fy * (ut if fy < 0 else lt)]
    p[51, 1] += bow
    inner_pts = {
        60: (-0.82, 0.0),
        61: (-0.33, -0.012),
        62: (0.0, -0.008),
        63: (0.33, -0.012),
        64: (0.82, 0.0),
        65: (0.33, 0.012),
        66: (0.0, 0.008),
        67: (-0.33, 0.012),
    }
    for k, (fx, dy) in inner_pts.items():
        p[k] = [fx * mw, my + dy]
    # A face is never exactly symmetric.
    p += rng.normal(0.0, 0.008, p.shape)
    return p, ut, lt


# Action units (FACS-like). Strength 1 = the apex of that action for an average subject.
_AUS = (
    "AU1",
    "AU2",
    "AU4",
    "AU5",
    "AU6",
    "AU7",
    "AU9",
    "AU10",
    "AU12",
    "AU14",
    "AU15",
    "AU17",
    "AU20",
    "AU23",
    "AU25",
    "AU26",
    "AU43",
)

_RECIPES: dict[str, dict[str, float]] = {
    "anger": {"AU4": 1.0, "AU7": 0.8, "AU23": 1.0, "AU17": 0.4},
    "contempt": {"AU12": 0.6, "AU14": 1.0},  # one corner only (see _UNILATERAL)
    "disgust": {"AU9": 1.0, "AU10": 1.0, "AU4": 0.5, "AU7": 0.3, "AU15": 0.3, "AU17": 0.3},
    "fear": {
        "AU1": 1.0,
        "AU2": 0.6,
        "AU4": 0.6,
        "AU5": 1.0,
        "AU20": 1.0,
        "AU25": 1.0,
        "AU26": 0.15,
    },
    "happy": {"AU6": 1.0, "AU12": 1.0, "AU25": 1.0, "AU10": 0.25},
    "sad": {"AU1": 1.0, "AU4": 0.45, "AU15": 1.0, "AU17": 0.5, "AU43": 0.6},
    "surprise": {"AU1": 1.0, "AU2": 1.0, "AU5": 1.0, "AU26": 1.0, "AU25": 0.3},
}
# Emotions acted on one side: the subject's left (image right) for everyone, so the emotion
# keeps one common direction that a gold template can represent.
_UNILATERAL = {"contempt"}


@functools.lru_cache(maxsize=8)
def _identity(seed: int, subject: int) -> Identity:
    """A subject's look and expression style (cached: a worker renders a subject's faces in a row;
    treat the result as read-only)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, subject)))
    u = rng.uniform
    points, ut, lt = _neutral_points(rng)
    # Skin: a point on the light → dark ramp, slight hue shifts.
    tone = u(0, len(_SKIN_TONES) - 1)
    k = int(min(tone, len(_SKIN_TONES) - 2))
    skin = _SKIN_TONES[k] + (_SKIN_TONES[k + 1] - _SKIN_TONES[k]) * (tone - k)
    skin = np.clip(skin * rng.normal(1.0, 0.03, 3), 0, 255)
    lip = np.clip(skin * np.array([0.86, 0.58, 0.58]) * u(0.85, 1.0) + [18, 0, 4], 0, 255)
    hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * u(0.8, 1.15)
    # Light hair on light skin still needs a visible brow: brows are darker than the hair.
    brow = np.minimum(hair * 0.8, skin * u(0.22, 0.45))
    iris = _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] * u(0.8, 1.2)
    # Background: any hue, but far enough from the skin's brightness for a visible contour.
    skin_l = float(skin @ [0.3, 0.59, 0.11])
    for _ in range(20):
        bg = rng.uniform(20, 235, 3)
        if abs(float(bg @ [0.3, 0.59, 0.11]) - skin_l) > 45:
            break
    background = np.stack([bg * u(0.9, 1.15), bg * u(0.7, 1.0)])
    cloth = rng.uniform(15, 230, 3)
    lx, ly = u(-0.55, 0.55), u(-0.65, -0.15)
    light = np.array([lx, ly, 1.0])
    light /= np.linalg.norm(light)
    gains, recipes = {}, {}
    for au in _AUS:
        g = float(np.clip(rng.lognormal(0.0, 0.2), 0.7, 1.45))
        a = float(np.clip(rng.normal(0.0, 0.12), -0.3, 0.3))
        gains[au] = np.array([g * (1 - a), g * (1 + a)])
    for emo, recipe in _RECIPES.items():
        r = {au: w * float(np.exp(rng.normal(0.0, 0.25))) for au, w in recipe.items()}
        if rng.random() < 0.35:  # a little mixing: some subjects add an unrelated action
            extra = _AUS[rng.integers(len(_AUS))]
            if extra not in r and extra not in ("AU26", "AU25"):
                r[extra] = float(u(0.1, 0.25))
        recipes[emo] = r
    # Contempt comes as a smirk or, for some, with a sneer of the same side's upper lip.
    recipes["contempt"]["AU10"] = recipes["contempt"].get("AU10", 0.0) + float(u(0.0, 0.4))
    return Identity(
        points=points,
        upper_lip=ut,
        lower_lip=lt,
        skin=skin,
        lip=lip,
        hair=hair,
        brow=brow,
        iris=iris,
        brow_width=u(*_BROW_W),
        hair_style=int(rng.choice(3, p=[0.5, 0.35, 0.15])),
        hair_volume=u(0.0, 0.35),
        hairline=u(-1.85, -1.42),
        fringe=u(0.0, 1.0),
        background=background,
        cloth=cloth,
        light=light,
        ambient=u(0.38, 0.55),
        ears=bool(rng.random() < 0.8),
        gains=gains,
        recipes=recipes,
        age_lines=u(0.0, 0.35),
        fields=_styled_fields(points, ut, lt, rng),
    )


def _styled_fields(
    points: np.ndarray, ut: float, lt: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """The action units as this subject performs them: each action's displacement turned by
    a few degrees and scaled by a smooth gain field over the face (a subject may move the top
    of the mouth more than the bottom, or one side more), so two subjects with the same gains
    still move differently, while every action keeps its common direction and smooth shape."""
    fields = _au_fields(points, ut, lt)
    centred = points - points.mean(0)
    for au, f in fields.items():
        a = rng.normal(0.0, math.radians(8))
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        slope = rng.normal(0.0, 0.25, 2)  # log-gain change per canonical unit (x, y)
        gain = np.exp(np.clip(centred @ slope, -0.4, 0.4))[:, None]
        fields[au] = (f @ rot.T) * gain
    return fields


# ---------------------------------------------------------------------------------------------
# Expressions
# ---------------------------------------------------------------------------------------------


def _intensity_response(intensity: float) -> float:
    """How much of the apex a face labelled `intensity` shows: concave, so 0.25 is already a
    visible expression (as in posed data, where onset frames are still expressive)."""
    return float(intensity) ** 0.5


def _au_fields(p: np.ndarray, ut: float, lt: float) -> dict[str, np.ndarray]:
    """Displacement of every point at unit strength of each action unit."""
    f = {au: np.zeros((68, 2)) for au in _AUS}
    brow_r, brow_l = [21, 20, 19, 18, 17], [22, 23, 24, 25, 26]  # inner → outer
    for idx in (brow_r, brow_l):
        for j, k in enumerate(idx):
            s = j / 4
            med = -np.sign(p[k, 0])  # toward the midline
            f["AU1"][k] = [0, -0.24 * (1 - s) ** 1.3 - 0.03]
            f["AU2"][k] = [0, -0.22 * (0.25 + 0.75 * s)]
            f["AU4"][k] = [med * 0.09 * (1 - s), 0.18 * (1 - 0.45 * s)]
            f["AU9"][k] = [med * 0.03 * (1 - s), 0.07 * (1 - 0.6 * s)]
            f["AU5"][k] = [0, -0.03]
            f["AU6"][k] = [0, 0.025 * s]
    upper_lid, lower_lid = [37, 38, 43, 44], [40, 41, 46, 47]
    for k in upper_lid:
        f["AU5"][k] = [0, -0.1]
        f["AU7"][k] = [0, 0.03]
        f["AU4"][k] = [0, 0.015]
        f["AU43"][k] = [0, 0.035]
        f["AU6"][k] = [0, 0.01]
    for k in lower_lid:
        f["AU6"][k] = [0, -0.055]
        f["AU7"][k] = [0, -0.06]
        f["AU9"][k] = [0, -0.02]
        f["AU5"][k] = [0, 0.012]
    for k in (36, 45):
        f["AU6"][k] = [0, -0.012]
    # Nose wrinkle lifts the nose base.
    for k, dy in (
        (29, -0.02),
        (30, -0.035),
        (31, -0.08),
        (32, -0.075),
        (33, -0.07),
        (34, -0.075),
        (35, -0.08),
    ):
        f["AU9"][k] = [np.sign(p[k, 0]) * 0.015 * (k in (31, 35)), dy]
    out = lambda k: np.sign(p[k, 0])  # noqa: E731 — away from the midline
    # Upper lip raise.
    for k, dy in (
        (49, -0.1),
        (50, -0.12),
        (51, -0.12),
        (52, -0.12),
        (53, -0.1),
        (61, -0.1),
        (62, -0.11),
        (63, -0.1),
        (48, -0.02),
        (54, -0.02),
        (60, -0.02),
        (64, -0.02),
    ):
        f["AU10"][k] = [0, dy]
        f["AU9"][k] += [0, dy * 0.45]
    # Lip corner puller (smile): corners up and out, the lips follow.
    for k, dx, dy in (
        (48, 0.15, -0.2),
        (54, 0.15, -0.2),
        (60, 0.14, -0.19),
        (64, 0.14, -0.19),
        (49, 0.08, -0.1),
        (53, 0.08, -0.1),
        (59, 0.08, -0.12),
        (55, 0.08, -0.12),
        (61, 0.05, -0.06),
        (63, 0.05, -0.06),
        (67, 0.05, -0.07),
        (65, 0.05, -0.07),
        (50, 0.02, -0.03),
        (52, 0.02, -0.03),
        (56, 0.03, -0.04),
        (58, 0.03, -0.04),
        (57, 0.0, -0.02),
        (66, 0.0, -0.02),
    ):
        f["AU12"][k] = [out(k) * dx, dy]
    # Dimpler (contempt): the corner tightens and lifts a little.
    for k, dx, dy in (
        (48, 0.06, -0.13),
        (54, 0.06, -0.13),
        (60, 0.055, -0.12),
        (64, 0.055, -0.12),
        (49, 0.025, -0.06),
        (53, 0.025, -0.06),
        (59, 0.025, -0.07),
        (55, 0.025, -0.07),
    ):
        f["AU14"][k] = [out(k) * dx, dy]
    # Lip corner depressor.
    for k, dx, dy in (
        (48, -0.02, 0.16),
        (54, -0.02, 0.16),
        (60, -0.02, 0.15),
        (64, -0.02, 0.15),
        (49, 0.0, 0.06),
        (53, 0.0, 0.06),
        (59, 0.0, 0.07),
        (55, 0.0, 0.07),
        (67, 0.0, 0.03),
        (65, 0.0, 0.03),
    ):
        f["AU15"][k] = [out(k) * dx, dy]
    # Chin raiser pushes the lower lip up.
    for k in (55, 56, 57, 58, 59, 65, 66, 67):
        f["AU17"][k] = [0, -0.05]
    for k in (49, 50, 51, 52, 53, 61, 62, 63):
        f["AU17"][k] = [0, -0.015]
    for k in (7, 8, 9):
        f["AU17"][k] = [0, -0.03]
    # Lip stretcher (fear): corners out, lips flatten.
    for k, dx, dy in (
        (48, 0.2, 0.03),
        (54, 0.2, 0.03),
        (60, 0.19, 0.03),
        (64, 0.19, 0.03),
        (49, 0.11, 0.0),
        (53, 0.11, 0.0),
        (59, 0.11, 0.0),
        (55, 0.11, 0.0),
        (61, 0.05, 0.0),
        (63, 0.05, 0.0),
        (67, 0.05, 0.0),
        (65, 0.05, 0.0),
        (50, 0.03, 0.02),
        (51, 0.0, 0.02),
        (52, 0.03, 0.02),
        (56, 0.03, -0.03),
        (57, 0.0, -0.03),
        (58, 0.03, -0.03),
    ):
        f["AU20"][k] = [out(k) * dx, dy]
    # Lip tightener / presser: the lips thin toward the mouth line, the mouth narrows.
    for k in (49, 50, 51, 52, 53):
        f["AU23"][k] = [0, 0.5 * ut * (0.8 if k in (49, 53) else 1.0)]
    for k in (55, 56, 57, 58, 59):
        f["AU23"][k] = [0, -0.5 * lt * (0.8 if k in (55, 59) else 1.0)]
    for k in (48, 54, 60, 64):
        f["AU23"][k] = [-out(k) * 0.045, 0]
    # Lips part.
    for k, dy in (
        (61, -0.025),
        (62, -0.03),
        (63, -0.025),
        (65, 0.075),
        (66, 0.1),
        (67, 0.075),
        (55, 0.06),
        (56, 0.085),
        (57, 0.09),
        (58, 0.085),
        (59, 0.06),
    ):
        f["AU25"][k] = [0, dy]
    # Jaw drop: the lower lip and chin fall, the jaw lengthens.
    for k, dy in (
        (65, 0.38),
        (66, 0.45),
        (67, 0.38),
        (55, 0.33),
        (56, 0.42),
        (57, 0.45),
        (58, 0.42),
        (59, 0.33),
        (48, 0.1),
        (54, 0.1),
        (60, 0.1),
        (64, 0.1),
        (61, -0.02),
        (62, -0.02),
        (63, -0.02),
    ):
        f["AU26"][k] = [0, dy]
    for k in (48, 54, 60, 64):  # the open mouth rounds: corners come in
        f["AU26"][k, 0] = -out(k) * 0.08
    for j in range(17):
        w = max(0.0, 1 - abs(j - 8) / 6.5) ** 1.3
        f["AU26"][j] = [-np.sign(p[j, 0]) * 0.05 * w * (j != 8), 0.45 * w]
    return f


@dataclass
class Expression:
    points: np.ndarray  # (68, 2) canonical units
    act: dict[str, np.ndarray]  # AU → (right, left) strength actually applied


def _express(ident: Identity, emotion: str, intensity: float) -> Expression:
    base = ident.points
    act = {au: np.zeros(2) for au in _AUS}
    if emotion != emotions.NEUTRAL:
        level = _intensity_response(intensity)
        for au, w in ident.recipes[emotion].items():
            strength = w * level * ident.gains[au]
            if emotion in _UNILATERAL:
                strength = strength * np.array([0.0, 1.0])
            act[au] = act[au] + strength
    fields = ident.fields
    # Per point: blend the right (x < 0) and left (x > 0) strengths smoothly across the midline.
    wl = 1 / (1 + np.exp(-base[:, 0] / 0.12))
    pts = base.copy()
    for au in _AUS:
        s = act[au][0] * (1 - wl) + act[au][1] * wl
        pts += s[:, None] * fields[au]
    # Keep anatomy valid: lids never cross, lips never cross.
    for up, lo in ((37, 41), (38, 40), (43, 47), (44, 46)):
        pts[lo, 1] = max(pts[lo, 1], pts[up, 1] + 0.03)
    for up, lo in ((61, 67), (62, 66), (63, 65)):
        pts[lo, 1] = max(pts[lo, 1], pts[up, 1])
    for o, i in ((50, 61), (51, 62), (52, 63)):
        pts[o, 1] = min(pts[o, 1], pts[i, 1] - 0.02)
    for o, i in ((58, 67), (57, 66), (56, 65)):
        pts[o, 1] = max(pts[o, 1], pts[i, 1] + 0.03)
    return Expression(pts, act)


# ---------------------------------------------------------------------------------------------
# Painting
# ---------------------------------------------------------------------------------------------

_T_CACHE: dict[int, np.ndarray] = {}


def _catmull_rom(pts: np.ndarray, closed: bool = False, n: int = 8) -> np.ndarray:
    """A smooth curve through the points (centripetal-free uniform Catmull–Rom)."""
    pts = np.asarray(pts, dtype=np.float64)
    if closed:
        ext = np.concatenate([pts[-1:], pts, pts[:2]])
    else:
        ext = np.concatenate([2 * pts[:1] - pts[1:2], pts, 2 * pts[-1:] - pts[-2:-1]])
    t = _T_CACHE.get(n)
    if t is None:
        t = _T_CACHE.setdefault(n, np.linspace(0, 1, n, endpoint=False)[None, :, None])
    t2, t3 = t * t, t * t * t
    p0, p1, p2, p3 = (ext[k : len(ext) - 3 + k, None, :] for k in range(4))
    out = 0.5 * (
        2 * p1
        + (p2 - p0) * t
        + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
        + (3 * p1 - p0 - 3 * p2 + p3) * t3
    )
    out = out.reshape(-1, 2)
    if not closed:
        out = np.concatenate([out, pts[-1:]])
    return out


class _Canvas:
    """A supersampled float RGB raster and the pose mapping canonical units onto it."""

    def __init__(self, size: int, pose: np.ndarray):
        self.size = size
        self.big = size * _SS
        self.pose = pose  # canonical → output pixels (2×3)
        self.img = np.zeros((self.big, self.big, 3), np.float32)
        self.origin = (0, 0)  # raster position of img[0, 0]
        self.unit = float(np.hypot(*pose[:, 0])) * _SS  # raster pixels per canonical unit

    def raster(self, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=np.float64)
        return ((q @ self.pose[:, :2].T + self.pose[:, 2]) + 0.5) * _SS - 0.5

    def mask(self, draw_fn, pts_q: np.ndarray, blur: float, margin: float = 0.0):
        """Float mask in a window around `pts_q`: draw_fn(draw, to_window) paints 255s.

        `blur` and `margin` are in canonical units. Returns (mask, (y0, y1, x0, x1)) or None.
        """
        r = self.raster(pts_q)
        pad = (margin + 3 * blur) * self.unit + 3
        x0, y0 = np.floor(r.min(0) - pad).astype(int)
        x1, y1 = np.ceil(r.max(0) + pad).astype(int)
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, self.big), min(y1, self.big)
        if x1 <= x0 or y1 <= y0:
            return None
        im = Image.new("L", (x1 - x0, y1 - y0), 0)
        draw = ImageDraw.Draw(im)
        off = np.array([x0, y0], dtype=np.float64)
        draw_fn(draw, lambda q: (self.raster(q) - off).ravel().tolist())
        if blur > 0:
            im = im.filter(ImageFilter.GaussianBlur(blur * self.unit))
        return np.asarray(im, dtype=np.float32) * (1 / 255), (y0, y1, x0, x1)

    def _view(self, m):
        """The part of `self.img` under mask `m` (absolute raster window) and the mask there."""
        a, (y0, y1, x0, x1) = m
        oy, ox = self.origin
        h, w = self.img.shape[:2]
        Y0, Y1 = max(y0 - oy, 0), min(y1 - oy, h)
        X0, X1 = max(x0 - ox, 0), min(x1 - ox, w)
        if Y1 <= Y0 or X1 <= X0:
            return None, None
        a = a[Y0 + oy - y0 : Y1 + oy - y0, X0 + ox - x0 : X1 + ox - x0]
        return self.img[Y0:Y1, X0:X1], a[..., None]

    def paint(self, m, colour, opacity: float = 1.0) -> None:
        if m is None:
            return
        view, a = self._view(m)
        if view is not None:
            view += (np.asarray(colour, dtype=np.float32) - view) * (a * opacity)

    def shade(self, m, factor: float) -> None:
        """Multiply under the mask: < 1 darkens (creases), > 1 lightens (highlights)."""
        if m is None:
            return
        view, a = self._view(m)
        if view is not None:
            view *= 1 + (factor - 1) * a

    def width(self, w_units: float) -> int:
        return max(1, int(round(w_units * self.unit)))


def _clip(m, by):
    """Mask `m` limited to mask `by` (product over the windows' intersection)."""
    if m is None or by is None:
        return None
    a, (y0, y1, x0, x1) = m
    b, (v0, v1, u0, u1) = by
    Y0, Y1, X0, X1 = max(y0, v0), min(y1, v1), max(x0, u0), min(x1, u1)
    if Y1 <= Y0 or X1 <= X0:
        return None
    return (
        a[Y0 - y0 : Y1 - y0, X0 - x0 : X1 - x0] * b[Y0 - v0 : Y1 - v0, X0 - u0 : X1 - u0],
        (Y0, Y1, X0, X1),
    )


def _poly(points):
    return lambda d, tw: d.polygon(tw(points), fill=255)


def _line(points, w: int):
    return lambda d, tw: d.line(tw(points), fill=255, width=w, joint="curve")


def _ellipse(c, rx, ry, n=40):
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([c[0] + rx * np.cos(t), c[1] + ry * np.sin(t)], 1)


def _band(
    curve: np.ndarray,
    w0: float,
    w1: float,
    offset: float | Callable[[np.ndarray], np.ndarray] = 0.0,
) -> np.ndarray:
    """A tapered stroke around a curve (width w0 at the start, w1 at the end), as a polygon.
    `offset` shifts the stroke along the curve normal (+ = image down for left-to-right)."""
    d = np.gradient(curve, axis=0)
    nrm = np.stack([-d[:, 1], d[:, 0]], 1)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True) + 1e-12
    t = np.linspace(0, 1, len(curve))[:, None]
    w = w0 + (w1 - w0) * t
    shift = offset(t) if callable(offset) else offset
    c = curve + nrm * shift
    return np.concatenate([c + nrm * w / 2, (c - nrm * w / 2)[::-1]])


def _face_outline(p: np.ndarray) -> np.ndarray:
    """Jaw (from the points) closed over the forehead by a half-ellipse."""
    jaw = _catmull_rom(p[0:17], n=6)
    x0, x1 = p[0, 0], p[16, 0]
    cx, half = (x0 + x1) / 2, (x1 - x0) / 2
    y_side = (p[0, 1] + p[16, 1]) / 2
    t = np.linspace(0, math.pi, 40)[1:-1]
    head = np.stack([cx + half * 0.99 * np.cos(t), y_side - (y_side + 2.15) * np.sin(t) ** 0.8], 1)
    return np.concatenate([jaw, head])


def _height_field(u: np.ndarray, v: np.ndarray, p: np.ndarray, act: dict) -> np.ndarray:
    """Relief of the face (canonical units) whose gradient shades the skin."""

    def g(cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
        return np.exp(-((u - cx) ** 2 / (2 * sx * sx) + (v - cy) ** 2 / (2 * sy * sy)))

    w = (p[16, 0] - p[0, 0]) / 2
    chin = p[8, 1]
    h = 1.3 * np.sqrt(np.clip(1 - (u / (w * 1.08)) ** 2 - ((v - 0.3) / (chin - 0.1)) ** 2, 0, 1))
    # Nose: a ridge from the bridge to the tip, the tip and the wings.
    top, tip = p[27], p[30]
    length = max(tip[1] - top[1], 0.3)
    tt = np.clip((v - top[1]) / length, 0, 1)
    cx = top[0] + (tip[0] - top[0]) * tt
    ridge = np.exp(-((u - cx) ** 2) / (2 * (0.085 + 0.06 * tt) ** 2))
    fade = np.clip((p[33, 1] + 0.02 - v) / 0.12, 0, 1) * np.clip((v - top[1] + 0.25) / 0.3, 0, 1)
    h += 0.32 * (0.35 + 0.65 * tt) * ridge * fade
    h += 0.14 * g(tip[0], tip[1] + 0.06, 0.13, 0.11)
    for k in (31, 35):
        h += 0.07 * g(p[k, 0], p[k, 1] - 0.04, 0.09, 0.08)
    # Eye sockets and the brow ridge above them.
    for eye, brow in (((36, 39), (17, 21)), ((42, 45), (22, 26))):
        ex, ey = p[list(eye)].mean(0)
        h -= 0.22 * g(ex, ey - 0.05, 0.3, 0.2)
        bx, by = p[list(brow)].mean(0)
        h += 0.06 * g(bx, by + 0.05, 0.4, 0.12)
    # Cheeks (raised by AU6/AU12), lips, chin.
    lift = float(np.mean(act["AU6"]) + 0.5 * np.mean(act["AU12"]))
    for side in (-1, 1):
        h += (0.16 + 0.08 * lift) * g(side * 0.82, 1.0 - 0.12 * lift, 0.36, 0.3)
    mc = p[48:60].mean(0)
    mw = (p[54, 0] - p[48, 0]) / 2
    h += 0.08 * g(mc[0], mc[1], mw * 0.9, 0.16)
    h += 0.12 * g(p[8, 0], chin - 0.33, 0.33, 0.2)
    return h


def _shading(
    ident: Identity, p: np.ndarray, act: dict, pose: np.ndarray, window
) -> tuple[np.ndarray, np.ndarray]:
    """Lambert shading factor and specular term (0–255) over a raster window.

    The relief is smooth, so it is evaluated on the output-pixel grid and upsampled."""
    y0, y1, x0, x1 = window
    # Output pixels covering the window (one extra on each side for interpolation).
    oy0, ox0 = y0 // _SS - 1, x0 // _SS - 1
    oy1, ox1 = -(-y1 // _SS) + 1, -(-x1 // _SS) + 1
    inv = np.linalg.inv(np.vstack([pose, [0, 0, 1]]))[:2]
    gy, gx = np.mgrid[oy0:oy1, ox0:ox1].astype(np.float64)
    u = inv[0, 0] * gx + inv[0, 1] * gy + inv[0, 2]
    v = inv[1, 0] * gx + inv[1, 1] * gy + inv[1, 2]
    h = _height_field(u, v, p, act)
    px = float(np.hypot(*pose[:, 0]))  # output pixels per unit
    dhy, dhx = np.gradient(h)
    nx, ny = -dhx * px, -dhy * px
    norm = np.sqrt(nx * nx + ny * ny + 1)
    lx, ly, lz = ident.light
    diffuse = np.clip((nx * lx + ny * ly + lz) / norm, 0, 1)
    shade = ident.ambient + (1 - ident.ambient) * diffuse * 1.08
    spec = np.clip((nx * lx * 0.5 + ny * ly * 0.5 + 1) / norm, 0, 1) ** 30 * 14.0

    def up(a):
        # Output pixel (i, j) centre sits at raster (i·SS + (SS−1)/2): align, then crop.
        im = Image.fromarray(a.astype(np.float32), "F")
        w, h = (ox1 - ox0) * _SS, (oy1 - oy0) * _SS
        big = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR), np.float32)
        ry0, rx0 = y0 - oy0 * _SS, x0 - ox0 * _SS
        return big[ry0 : ry0 + (y1 - y0), rx0 : rx0 + (x1 - x0)]

    return up(shade), up(spec)


def _render(
    ident: Identity, expr: Expression, pose: np.ndarray, size: int, rng: np.random.Generator
) -> np.ndarray:
    p, act = expr.points, expr.act
    mean_act = {au: float(np.mean(s)) for au, s in act.items()}
    cv = _Canvas(size, pose)
    big = cv.big

    # Background: a vertical gradient with low-frequency blotches.
    top, bottom = ident.background
    yy = np.linspace(0, 1, big, dtype=np.float32)[:, None, None]
    cv.img[:] = top + (bottom - top) * yy
    blot = Image.fromarray(rng.normal(0, 1, (4, 4)).astype(np.float32), "F").resize(
        (big, big), Image.Resampling.BICUBIC
    )
    cv.img *= (1 + 0.06 * np.asarray(blot, np.float32))[..., None]

    outline = _face_outline(p)
    w_face = (p[16, 0] - p[0, 0]) / 2
    cx = (p[0, 0] + p[16, 0]) / 2
    skin = ident.skin

    # Clothes and neck (behind the face), the neck shadowed under the chin.
    cloth = np.array(
        [
            [-4, 4.5],
            [-4, 3.25],
            [-1.6, 2.85],
            [-0.7, 2.75],
            [0.7, 2.75],
            [1.6, 2.85],
            [4, 3.25],
            [4, 4.5],
        ]
    )
    neck = np.array(
        [
            [cx - 0.72 * w_face, 1.4],
            [cx + 0.72 * w_face, 1.4],
            [cx + 0.78 * w_face, 3.3],
            [cx - 0.78 * w_face, 3.3],
        ]
    )
    cv.paint(cv.mask(_poly(neck), neck, 0.03), skin * 0.78)
    cv.paint(cv.mask(_poly(cloth), cloth, 0.03), ident.cloth)
    chin_shadow = np.concatenate([_catmull_rom(p[4:13], n=4) + [0, 0.05], [[cx, p[8, 1] + 0.45]]])
    cv.shade(cv.mask(_poly(chin_shadow), chin_shadow, 0.12), 0.62)

    # Hair behind the head, ears.
    hair = ident.hair
    if ident.hair_style != 2:
        back = _skull(p, ident, grow=0.04)
        if ident.hair_style == 1:  # long: down to the shoulders behind the face
            back = np.concatenate(
                [
                    back[back[:, 1] < -0.2],
                    [
                        [cx + w_face * (1.15 + 0.4 * ident.hair_volume), 2.9],
                        [cx - w_face * (1.15 + 0.4 * ident.hair_volume), 2.9],
                    ],
                ]
            )
        bm = cv.mask(_poly(back), back, 0.04)
        cv.paint(bm, hair * 0.8)
    if ident.ears and ident.hair_style != 1:
        for side, k in ((-1, 0), (1, 16)):
            ear = _ellipse((p[k, 0] + side * 0.12, p[k, 1] + 0.38), 0.15, 0.36)
            cv.paint(cv.mask(_poly(ear), ear, 0.03), skin * 0.8)
            inner = _ellipse((p[k, 0] + side * 0.13, p[k, 1] + 0.4), 0.06, 0.2)
            cv.shade(cv.mask(_poly(inner), inner, 0.04), 0.75)

    # The face: albedo (skin + features) painted into the face's window, then relief shading.
    face_m = cv.mask(_poly(outline), outline, 0.015)
    fy0, fy1, fx0, fx1 = face_m[1]
    background = cv.img
    cv.img = np.empty((fy1 - fy0, fx1 - fx0, 3), np.float32)
    cv.img[:] = skin
    cv.origin = (fy0, fx0)

    # Rosy cheeks, stronger when raised.
    lift = mean_act["AU6"] + 0.5 * mean_act["AU12"]
    for side in (-1, 1):
        ch = _ellipse((side * 0.85, 1.0 - 0.12 * lift), 0.32, 0.24)
        cv.paint(cv.mask(_poly(ch), ch, 0.15), skin * [1.0, 0.8, 0.8], 0.25 + 0.2 * lift)
    # A soft darkening just inside the contour.
    ring = np.concatenate([outline, outline[:1]])
    cv.shade(cv.mask(_line(ring, cv.width(0.16)), outline, 0.1), 0.78)

    _paint_wrinkles(cv, p, mean_act, act, ident)
    _paint_brows(cv, p, ident)
    _paint_eyes(cv, p, ident)
    _paint_nose(cv, p)
    _paint_mouth(cv, p, ident, act)

    shade, spec = _shading(ident, p, act, pose, (fy0, fy1, fx0, fx1))
    face = cv.img * shade[..., None] + spec[..., None]
    cv.img, cv.origin = background, (0, 0)
    view = cv.img[fy0:fy1, fx0:fx1]
    view += (face - view) * face_m[0][..., None]

    _paint_hair_front(cv, p, ident, rng)

    # Down to output size (box filter = exact pixel-centre mapping), then sensor noise.
    img = cast(
        np.ndarray,
        sum(cv.img[i::_SS, j::_SS] for i in range(_SS) for j in range(_SS)) * (1 / _SS**2),
    )
    img += rng.normal(0.0, 1.2, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _paint_wrinkles(cv: _Canvas, p, a: dict, act: dict, ident: Identity) -> None:
    rest = ident.age_lines
    # Forehead lines when the brows rise (centred when only the inner brows rise).
    raise_ = a["AU1"] * 0.8 + a["AU2"] * 0.7 + a["AU5"] * 0.2
    if raise_ + rest > 0.05:
        by = min(p[17:27, 1].min(), -0.5)
        span = 0.55 + 0.45 * min(1.0, a["AU2"] / (a["AU1"] + 1e-6))
        for j in range(3):
            y = by - 0.17 - 0.13 * j
            xs = np.linspace(-span, span, 9) * (1 - 0.12 * j)
            line = np.stack([xs, y - 0.06 * np.cos(xs / span * 1.3)], 1)
            m = cv.mask(_line(line, cv.width(0.025)), line, 0.015)
            cv.shade(m, 1 - min(0.45, 0.3 * raise_ + 0.12 * rest))
    # Frown lines between the brows.
    frown = a["AU4"] + 0.5 * a["AU9"]
    if frown > 0.03:
        for side in (-1, 1):
            x = (p[21, 0] + p[22, 0]) / 2 + side * 0.07
            yb = (p[21, 1] + p[22, 1]) / 2
            line = np.array([[x + side * 0.02, yb - 0.17], [x, yb + 0.12]])
            m = cv.mask(_line(line, cv.width(0.03)), line, 0.015)
            cv.shade(m, 1 - min(0.5, 0.35 * frown))
    # Nose wrinkles.
    if a["AU9"] > 0.03:
        for side in (-1, 1):
            for j in range(2):
                y = p[28, 1] - 0.04 + 0.1 * j
                line = np.array([[side * 0.05, y], [side * 0.2, y + 0.06]])
                m = cv.mask(_line(line, cv.width(0.025)), line, 0.015)
                cv.shade(m, 1 - min(0.5, 0.4 * a["AU9"]))
    # Nasolabial folds from the nose wings past the mouth corners.
    for side, (nk, mk, sk) in ((0, (31, 48, -1)), (1, (35, 54, 1))):
        depth = (
            0.16
            + 0.2 * rest
            + 0.7 * act["AU12"][side]
            + 0.45 * act["AU10"][side]
            + 0.35 * act["AU9"][side]
            + 0.25 * act["AU14"][side]
            + 0.2 * act["AU20"][side]
        )
        start = p[nk] + [sk * 0.08, -0.04]
        end = p[mk] + [sk * 0.14, 0.18]
        mid = (start + end) / 2 + [sk * 0.1, 0]
        curve = _catmull_rom(np.array([start, mid, end]), n=6)
        m = cv.mask(_line(curve, cv.width(0.04)), curve, 0.03)
        cv.shade(m, 1 - min(0.55, 0.4 * depth))
        hl = curve + [sk * 0.05, 0]
        m = cv.mask(_line(hl, cv.width(0.04)), hl, 0.04)
        cv.shade(m, 1 + min(0.12, 0.1 * depth))
    # Crow's feet (AU6) and the lower-lid bulge (AU6, AU7).
    for side, (corner, lids) in ((0, (36, (41, 40))), (1, (45, (46, 47)))):
        s6 = act["AU6"][side]
        sgn = -1 if side == 0 else 1
        if s6 > 0.05:
            for dy in (-0.06, 0.02, 0.1):
                line = np.array(
                    [p[corner] + [sgn * 0.07, dy * 0.5], p[corner] + [sgn * 0.22, dy * 1.8]]
                )
                m = cv.mask(_line(line, cv.width(0.022)), line, 0.012)
                cv.shade(m, 1 - min(0.4, 0.3 * s6))
        bulge = s6 + act["AU7"][side]
        lid = p[[corner, *lids, 39 if side == 0 else 42]]
        line = _catmull_rom(lid, n=5) + [0, 0.07]
        m = cv.mask(_line(line, cv.width(0.035)), line, 0.025)
        cv.shade(m, 1 - min(0.45, 0.08 + 0.3 * bulge + 0.1 * rest))
    # Chin dimpling.
    if a["AU17"] > 0.05:
        c = p[8] + [0, -0.32]
        e = _ellipse(c, 0.2, 0.1)
        cv.shade(cv.mask(_poly(e), e, 0.06), 1 - min(0.25, 0.2 * a["AU17"]))
    # Contempt's dimple at the lifted corner.
    for side, k in ((0, 48), (1, 54)):
        s = act["AU14"][side]
        if s > 0.05:
            sgn = -1 if side == 0 else 1
            line = _catmull_rom(
                np.array(
                    [
                        p[k] + [sgn * 0.03, -0.12],
                        p[k] + [sgn * 0.08, -0.02],
                        p[k] + [sgn * 0.06, 0.08],
                    ]
                ),
                n=5,
            )
            cv.shade(cv.mask(_line(line, cv.width(0.04)), line, 0.02), 1 - min(0.6, 0.5 * s))


def _paint_brows(cv: _Canvas, p, ident: Identity) -> None:
    w = ident.brow_width
    for idx in ((21, 20, 19, 18, 17), (22, 23, 24, 25, 26)):
        curve = _catmull_rom(p[list(idx)], n=8)
        # The points run along the brow's upper half: the stroke sits mostly below them.
        # (The band's normal points up for the right brow, drawn inner → outer toward −x.)
        sign = -1 if idx[0] == 21 else 1
        band = _band(
            curve,
            w * 1.25,
            w * 0.45,
            offset=lambda t: sign * _BROW_BELOW * w * np.sin(np.pi * t) ** 0.5,  # noqa: B023 (called inside this iteration)
        )
        cv.paint(cv.mask(_poly(band), band, 0.02), ident.brow, 0.92)


def _paint_eyes(cv: _Canvas, p, ident: Identity) -> None:
    for idx in ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47)):
        e = p[list(idx)]
        upper = _catmull_rom(e[[0, 1, 2, 3]], n=8)
        lower = _catmull_rom(e[[3, 4, 5, 0]], n=8)
        opening = np.concatenate([upper, lower[1:-1]])
        centre = e.mean(0)
        width = np.linalg.norm(e[3] - e[0])
        # Lid crease and the shadowed upper lid above the opening.
        crease = upper + [0, -0.1]
        cv.shade(cv.mask(_line(crease, cv.width(0.03)), crease, 0.02), 0.72)
        lid = np.concatenate([upper, crease[::-1]])
        cv.shade(cv.mask(_poly(lid), lid, 0.03), 0.9)
        # Sclera, iris clipped by the lids, pupil, catch-light.
        open_m = cv.mask(_poly(opening), opening, 0.008)
        cv.paint(open_m, [228, 222, 218])
        iris_r = width * 0.23
        ic = centre + [0, 0.005]
        circ = _ellipse(ic, iris_r, iris_r)
        cv.paint(_clip(cv.mask(_poly(circ), circ, 0.01), open_m), ident.iris)
        pup = _ellipse(ic, iris_r * 0.42, iris_r * 0.42)
        cv.paint(_clip(cv.mask(_poly(pup), pup, 0.008), open_m), [12, 10, 10])
        hi = _ellipse(ic + [0.03, -0.03], iris_r * 0.18, iris_r * 0.18)
        cv.paint(_clip(cv.mask(_poly(hi), hi, 0.005), open_m), [250, 250, 250], 0.8)
        # Lash line along the upper lid (thick, dark) running a little past the outer corner
        # (where the points put the corner, not where the tapering white ends), a thin lower lid.
        outer, inner = (e[0], e[3]) if idx[0] == 36 else (e[3], e[0])
        flick = outer + (outer - inner) / max(width, 1e-6) * 0.05 + [0, -0.01]
        lash = np.concatenate([[flick], upper] if idx[0] == 36 else [upper, [flick]])
        cv.paint(cv.mask(_line(lash, cv.width(0.045)), lash, 0.012), [25, 18, 16], 0.9)
        cv.paint(cv.mask(_line(lower, cv.width(0.02)), lower, 0.012), ident.skin * 0.5, 0.6)
        for c, r in ((outer, 0.03), (inner, 0.035)):
            dot = _ellipse(c, r, r * 0.7)
            cv.paint(cv.mask(_poly(dot), dot, 0.012), [60, 35, 35], 0.55)


def _paint_nose(cv: _Canvas, p) -> None:
    for k, j in ((31, 32), (35, 34)):
        c = p[k] * 0.45 + p[j] * 0.55 + [0, -0.025]
        nostril = _ellipse(c, 0.065, 0.035)
        cv.shade(cv.mask(_poly(nostril), nostril, 0.02), 0.35)
        # The crease around the nose wing.
        sgn = np.sign(p[k, 0] - p[33, 0])
        wing = np.array(
            [p[k] + [-sgn * 0.02, 0.02], p[k] + [sgn * 0.04, -0.08], p[k] + [-sgn * 0.03, -0.17]]
        )
        wc = _catmull_rom(wing, n=6)
        cv.shade(cv.mask(_line(wc, cv.width(0.03)), wc, 0.02), 0.7)
    base = _catmull_rom(p[31:36], n=6) + [0, 0.01]
    cv.shade(cv.mask(_line(base, cv.width(0.03)), base, 0.03), 0.82)


def _paint_mouth(cv: _Canvas, p, ident: Identity, act: dict) -> None:
    outer = _catmull_rom(p[48:60], closed=True, n=6)
    inner_up = _catmull_rom(p[[60, 61, 62, 63, 64]], n=6)
    inner_lo = _catmull_rom(p[[64, 65, 66, 67, 60]], n=6)
    inner = np.concatenate([inner_up, inner_lo[1:-1]])
    lip = ident.lip
    cv.paint(cv.mask(_poly(outer), outer, 0.012), lip)
    # Upper lip darker (faces down), lower lip with a highlight.
    upper_lip = np.concatenate([_catmull_rom(p[48:55], n=6), inner_up[::-1]])
    cv.shade(cv.mask(_poly(upper_lip), upper_lip, 0.015), 0.85)
    lo_c = p[[57, 66]].mean(0) + [0, 0.0]
    hl = _ellipse(lo_c, (p[55, 0] - p[59, 0]) * 0.25, 0.025)
    cv.shade(cv.mask(_poly(hl), hl, 0.03), 1.12)
    gap = float(np.mean(p[65:68, 1] - p[[63, 62, 61], 1]))
    if gap > 0.025:
        # Open mouth: dark interior, upper teeth under the upper lip, maybe lower teeth.
        im = cv.mask(_poly(inner), inner, 0.01)
        cv.paint(im, [45, 16, 20])
        teeth_h = min(gap * 0.7, 0.09)
        teeth = np.concatenate([inner_up, inner_up[::-1] + [0, teeth_h]])
        cv.paint(_clip(cv.mask(_poly(teeth), teeth, 0.008), im), [232, 226, 212], 0.95)
        if gap > 0.12:
            lt = min(gap * 0.25, 0.05)
            lteeth = np.concatenate([inner_lo, inner_lo[::-1] + [0, -lt]])
            cv.paint(_clip(cv.mask(_poly(lteeth), lteeth, 0.008), im), [200, 194, 182], 0.8)
    # The line where the lips meet (or the edge of the upper lip when open).
    # It reaches the corners the points mark (the lips taper to nothing before them).
    ends = p[[48, 54]] + (p[[48, 54]] - p[[60, 64]]) * 0.4
    meet = np.concatenate([ends[:1], inner_up, ends[1:]])
    cv.paint(cv.mask(_line(meet, cv.width(0.03)), meet, 0.012), lip * 0.35, 0.85)
    for k in (48, 54):
        corner = _ellipse(p[k], 0.045, 0.03)
        cv.shade(cv.mask(_poly(corner), corner, 0.02), 0.5)


def _skull(p: np.ndarray, ident: Identity, grow: float = 0.0) -> np.ndarray:
    """Outline of the hair volume around the top of the head."""
    w_face = (p[16, 0] - p[0, 0]) / 2
    cx = (p[0, 0] + p[16, 0]) / 2
    vol = ident.hair_volume + grow
    return _ellipse((cx, -0.5 - 0.3 * vol), w_face * (1.04 + 0.4 * vol), 1.72 + 0.55 * vol, n=60)


def _hair_strands(cv: _Canvas, region, shape: np.ndarray, ident: Identity, rng) -> None:
    """Darker and lighter strands combed from the crown, clipped to the hair region."""
    top = shape[np.argmin(shape[:, 1])]
    lo, hi = shape.min(0), shape.max(0)
    t = np.linspace(0, 1, 6)[None, :, None]
    for factor, count in ((0.8, 14), (1.18, 8)):
        start = top + np.stack([rng.normal(0, 0.2, count), np.full(count, 0.05)], 1)
        end = np.stack(
            [rng.uniform(lo[0], hi[0], count), rng.uniform(top[1] + 0.4, hi[1], count)], 1
        )
        mid = (start + end) / 2 + np.stack([rng.normal(0, 0.15, count), np.full(count, -0.2)], 1)
        # Quadratic Bézier strands through (start, mid, end).
        lines = (1 - t) ** 2 * start[:, None] + 2 * (1 - t) * t * mid[:, None] + t**2 * end[:, None]
        w = cv.width(0.03)

        def draw(d, tw, lines=lines, w=w):
            for ln in lines:
                d.line(tw(ln), fill=255, width=w, joint="curve")

        cv.shade(_clip(cv.mask(draw, shape, 0.0), region), factor)


def _paint_hair_front(cv: _Canvas, p, ident: Identity, rng) -> None:
    if ident.hair_style == 2 and ident.fringe < 0.5:
        return
    w_face = (p[16, 0] - p[0, 0]) / 2
    cx = (p[0, 0] + p[16, 0]) / 2
    hl = ident.hairline if ident.hair_style != 2 else ident.hairline - 0.12
    # Hairline: an arch over the forehead, coming down the temples by `fringe`.
    xs = np.linspace(-1.0, 1.0, 25)
    temple = -0.9 + 0.35 * (1 - ident.fringe)
    ys = hl + (temple - hl) * np.abs(xs) ** 3.5
    line = np.stack([cx + xs * w_face * 1.02, ys], 1)
    above = np.concatenate(
        [
            line,
            [
                [cx + w_face * 2, temple],
                [cx + w_face * 2, -3.5],
                [cx - w_face * 2, -3.5],
                [cx - w_face * 2, temple],
            ],
        ]
    )
    skull = _skull(p, ident) if ident.hair_style != 2 else _skull(p, ident, -ident.hair_volume)
    m = _clip(cv.mask(_poly(above), skull, 0.04), cv.mask(_poly(skull), skull, 0.03))
    # Close-cropped hair (style 2) lets the scalp show through.
    cv.paint(m, ident.hair * 1.05, 1.0 if ident.hair_style != 2 else 0.65)
    _hair_strands(cv, m, skull, ident, rng)
    # A little sheen where the light hits the crown.
    sheen = _ellipse((cx - ident.light[0] * 0.6, hl - 0.4), w_face * 0.45, 0.14)
    cv.shade(_clip(cv.mask(_poly(sheen), sheen, 0.12), m), 1.3)


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    subject: int
    emotion: str
    intensity: float
    e_index: int
    i_index: int

    @property
    def name(self) -> str:
        return f"{subject_name(self.subject)}_{self.emotion}_{round(self.intensity * 100):03d}"


def subject_name(i: int) -> str:
    return f"s{i:03d}"


def _items(config: SynthConfig) -> list[_Item]:
    items = []
    for s in range(config.subjects):
        items.append(_Item(s, emotions.NEUTRAL, 0.0, 0, 0))
        for emo in config.emotions:
            for inten in config.intensities:
                # Keys are the emotion's vocabulary index and the intensity in percent, so an
                # image does not change when other emotions or intensities are added.
                items.append(
                    _Item(
                        s,
                        emo,
                        float(inten),
                        emotions.EMOTIONS.index(emo),
                        round(float(inten) * 1000),
                    )
                )
    return items


def _pose(rng: np.random.Generator, size: int) -> np.ndarray:
    roll = math.radians(rng.uniform(-5.0, 5.0))
    scale = size * _PX_PER_UNIT * rng.uniform(0.94, 1.06)
    c, s = math.cos(roll) * scale, math.sin(roll) * scale
    # Face centre (0, 0.45) near the image centre, shifted a few pixels.
    tx = size / 2 - 0.5 + rng.uniform(-0.035, 0.035) * size
    ty = size / 2 - 0.5 + rng.uniform(-0.03, 0.03) * size
    cy = 0.45
    return np.array([[c, -s, tx - (-s * cy)], [s, c, ty - c * cy]])


def render_face(
    config: SynthConfig, subject: int, emotion: str, intensity: float
) -> tuple[np.ndarray, np.ndarray]:
    """One face: uint8 (size, size, 3) pixels and its (68, 2) landmarks in pixels — exactly
    the files `render_dataset` writes for it (neutral ignores `intensity`)."""
    img, pts = _render_item(config, _item(subject, emotion, intensity))
    assert img is not None  # pixels=True renders them
    return img, pts


def face_points(config: SynthConfig, subject: int, emotion: str, intensity: float) -> np.ndarray:
    """The (68, 2) landmarks of `render_face` without painting the pixels (cheap)."""
    return _render_item(config, _item(subject, emotion, intensity), pixels=False)[1]


def _item(subject: int, emotion: str, intensity: float) -> _Item:
    emotion = emotions.normalize_emotion(emotion)
    if emotion == emotions.NEUTRAL:
        return _Item(subject, emotion, 0.0, 0, 0)
    return _Item(
        subject,
        emotion,
        float(intensity),
        emotions.EMOTIONS.index(emotion),
        round(float(intensity) * 1000),
    )


def _render_item(
    config: SynthConfig, item: _Item, pixels: bool = True
) -> tuple[np.ndarray | None, np.ndarray]:
    ident = _identity(config.seed, item.subject)
    rng = np.random.default_rng(
        np.random.SeedSequence(config.seed, spawn_key=(1, item.subject, item.e_index, item.i_index))
    )
    expr = _express(ident, item.emotion, item.intensity)
    pose = _pose(rng, config.size)
    pts = expr.points @ pose[:, :2].T + pose[:, 2]
    img = _render(ident, expr, pose, config.size, rng) if pixels else None
    return img, pts


def _work(args) -> manifest.Row:
    config, item, out_dir = args
    img, pts = _render_item(config, item)
    assert img is not None  # pixels=True renders them
    subj = subject_name(item.subject)
    image = f"images/{subj}/{item.name}.png"
    lmk = f"landmarks/{subj}/{item.name}.txt"
    save_image(img, Path(out_dir) / image)
    manifest.write_landmarks_file(Path(out_dir) / lmk, pts)
    return manifest.Row(image, subj, item.emotion, item.intensity, lmk, SOURCE)


def _workers(workers: int, jobs: int) -> int:
    return max(1, min(workers or os.cpu_count() or 1, jobs))


# Workers are forked where the OS can (facecal.parallel): a spawned worker re-imports the
# caller's main module, which loops forever for a plain script without a `__main__` guard.


_SCRATCH = ".synth-partial"


def render_dataset(
    out_dir: str | Path,
    config: SynthConfig = SynthConfig(),
    workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> list[manifest.Row]:
    """Render the dataset into `out_dir` (manifest.csv, images/, landmarks/). Returns its rows.

    A folder that already holds a dataset is refused unless `overwrite`, which replaces its
    manifest, images/ and landmarks/ (so the folder is exactly the rendered set). Faces are
    rendered into a hidden scratch folder and moved into place when all are done, so an
    interrupted run leaves no half dataset (and the next run starts clean).
    """
    from tqdm import tqdm

    out = Path(out_dir)
    existing = [out / n for n in (manifest.MANIFEST, "images", "landmarks") if (out / n).exists()]
    if existing and not overwrite:
        raise SynthError(
            f"{out}: already holds a dataset ({existing[0].name}); use --overwrite to replace it"
        )
    scratch = out / _SCRATCH
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    items = _items(config)
    jobs = [(config, it, str(scratch)) for it in items]
    n = _workers(workers, len(jobs))
    rows = []
    with tqdm(
        total=len(jobs), desc="synth", unit="img", disable=not progress, file=sys.stderr
    ) as bar:
        if n == 1:
            for job in jobs:
                rows.append(_work(job))
                bar.update()
        else:
            # Chunks of consecutive faces keep a worker on one subject (its identity is cached).
            with worker_pool(n) as pool:
                for row in pool.imap(_work, jobs, chunksize=8):
                    rows.append(row)
                    bar.update()
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in ("images", "landmarks"):
        os.replace(scratch / name, out / name)
    scratch.rmdir()
    manifest.write_manifest(out, rows)
    return rows


# ---------------------------------------------------------------------------------------------
# How well dlib sees the faces
# ---------------------------------------------------------------------------------------------

_DETECTOR: LandmarkDetector | None = None


def _detector_init(upsample: int) -> None:
    global _DETECTOR
    from facecal.detector import LandmarkDetector

    _DETECTOR = LandmarkDetector(upsample=upsample)


def _measure_one(args) -> tuple[str, str, bool, float]:
    image_path, landmarks_path, emotion = args
    truth = manifest.read_landmarks_file(landmarks_path)
    assert _DETECTOR is not None, "worker not initialised by _detector_init"
    faces = _DETECTOR.detect(load_image(image_path))
    cx, cy = truth.mean(0)
    # A detection counts only if its box holds the face (the truth's centroid).
    hits = [f for f in faces if f.box[0] <= cx <= f.box[2] and f.box[1] <= cy <= f.box[3]]
    if not hits:
        return image_path, emotion, False, float("nan")
    return image_path, emotion, True, float(_nme(hits[0].points, truth))


def measure_dlib(
    data_dir: str | Path, upsample: int = 1, workers: int = 0, progress: bool = False
) -> dict:
    """dlib's detection rate and landmark error (NME, inter-ocular) against the ground truth.

    Returns detection_rate, nme_mean, nme_median, nme_p95 (over detected faces), n,
    n_detected, and the same per emotion under "per_emotion".
    """
    from tqdm import tqdm

    data_dir = Path(data_dir)
    rows, report = manifest.read_manifest(data_dir)
    jobs = [
        (str(data_dir / r.image), str(data_dir / r.landmarks), r.emotion)
        for r in rows
        if r.landmarks
    ]
    if not jobs:
        raise SynthError(f"{data_dir}: no rows with ground-truth landmarks to measure")
    n = _workers(workers, len(jobs) // 32 + 1)  # loading dlib costs ~1 s per process
    results = []
    with tqdm(
        total=len(jobs), desc="dlib", unit="img", disable=not progress, file=sys.stderr
    ) as bar:
        if n == 1:
            _detector_init(upsample)
            for j in jobs:
                results.append(_measure_one(j))
                bar.update()
        else:
            with worker_pool(n, initializer=_detector_init, initargs=(upsample,)) as pool:
                for r in pool.imap(_measure_one, jobs, chunksize=16):
                    results.append(r)
                    bar.update()

    def summary(res) -> dict:
        errs = np.array([r[3] for r in res if r[2]])
        return {
            "n": len(res),
            "n_detected": int(len(errs)),
            "detection_rate": len(errs) / len(res) if res else float("nan"),
            "nme_mean": float(errs.mean()) if len(errs) else float("nan"),
            "nme_median": float(np.median(errs)) if len(errs) else float("nan"),
            "nme_p95": float(np.percentile(errs, 95)) if len(errs) else float("nan"),
        }

    out = summary(results)
    out["per_emotion"] = {
        e: summary([r for r in results if r[1] == e]) for e in sorted({r[1] for r in results})
    }
    out["missed"] = sorted(Path(r[0]).relative_to(data_dir).as_posix() for r in results if not r[2])
    out["skipped_rows"] = len(report)
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthConfig()
    parser.add_argument(
        "--out", type=Path, default=Path("data"), help="dataset folder to create (default: data)"
    )
    parser.add_argument(
        "--subjects",
        type=int,
        default=d.subjects,
        help=f"number of identities (default {d.subjects})",
    )
    parser.add_argument(
        "--size", type=int, default=d.size, help=f"image side in pixels (default {d.size})"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed (default 0)")
    parser.add_argument(
        "--workers", type=int, default=0, help="processes (default 0 = one per CPU core)"
    )
    parser.add_argument(
        "--no-measure",
        action="store_true",
        help="skip measuring dlib's detection rate and NME afterwards",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a dataset already in --out"
    )


def main(args: argparse.Namespace) -> int:
    config = SynthConfig(subjects=args.subjects, size=args.size, seed=args.seed)
    t0 = time.perf_counter()
    rows = render_dataset(args.out, config, workers=args.workers, overwrite=args.overwrite)
    dt = time.perf_counter() - t0
    print(
        f"rendered {len(rows)} faces of {config.subjects} subjects ({config.size}×{config.size}) "
        f"into {args.out} in {dt:.1f} s"
    )
    if not args.no_measure:
        m = measure_dlib(args.out, upsample=1, workers=args.workers, progress=True)
        print(
            f"dlib (HOG, upsample 1): detection rate {m['detection_rate']:.3f} "
            f"({m['n_detected']}/{m['n']}), NME mean {m['nme_mean']:.4f}, "
            f"median {m['nme_median']:.4f}, p95 {m['nme_p95']:.4f}"
        )
        for emo, s in m["per_emotion"].items():
            print(f"  {emo:9s} detected {s['detection_rate']:.3f}  NME {s['nme_mean']:.4f}")
    return 0
