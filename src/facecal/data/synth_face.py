"""The synthetic faces' model: who a subject is and where its 68 points go.

A parametric neutral face per subject (`identity`: jaw, eyes, brows, nose and mouth points in
the canonical frame of `facecal.geometry`, plus its colours and hair), FACS-like action units
that displace the points per emotion (`express`: scaled by intensity, with a per-subject
expression style), and the small similarity jitter that poses the head (`head_pose`). The
pixels are painted from these points by `synth_render`; `synth` writes the dataset.

Randomness: identity from ``SeedSequence(seed, spawn_key=(0, subject))``; `head_pose` takes the
image's generator (`synth` creates it) and draws first from it, before the painter.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from facecal import emotions

_PX_PER_UNIT = 0.19  # canonical unit (half the outer-eye-corner distance) in image sides

# Proportions tuned against dlib's 68-point model (bench/synth.py --parts): where a contour is
# ambiguous (brow ends, jaw ends, eye corners) the design follows the iBUG annotation habit, so
# that dlib's points and the truth agree.
_BROW_H = (0.44, 0.58)  # inner brow point above the eye line
_BROW_ENDS = (0.07, 0.015, 0.0, 0.015, 0.07)  # the brow points' ends sit lower (inner → outer)
_BROW_W = (0.12, 0.2)  # brow thickness
_EYE_OUTER = 0.97  # outer eye corner x
_EYE_INNER = (0.36, 0.47)  # inner eye corner x


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

RECIPES: dict[str, dict[str, float]] = {
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
def identity(seed: int, subject: int) -> Identity:
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
    for emo, recipe in RECIPES.items():
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


def express(ident: Identity, emotion: str, intensity: float) -> Expression:
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
# Pose
# ---------------------------------------------------------------------------------------------


def head_pose(rng: np.random.Generator, size: int) -> np.ndarray:
    roll = math.radians(rng.uniform(-5.0, 5.0))
    scale = size * _PX_PER_UNIT * rng.uniform(0.94, 1.06)
    c, s = math.cos(roll) * scale, math.sin(roll) * scale
    # Face centre (0, 0.45) near the image centre, shifted a few pixels.
    tx = size / 2 - 0.5 + rng.uniform(-0.035, 0.035) * size
    ty = size / 2 - 0.5 + rng.uniform(-0.03, 0.03) * size
    cy = 0.45
    return np.array([[c, -s, tx - (-s * cy)], [s, c, ty - c * cy]])
