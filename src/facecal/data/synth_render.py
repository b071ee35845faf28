"""The synthetic faces' rasteriser: skin, eyes, brows, nose, lips, hair and wrinkles painted
*from the landmarks* (`synth_face`), so the points written beside each image are its exact truth.

Coordinates: the canonical frame of `facecal.geometry` (x right, y down, outer eye corners near
(−1, 0) and (1, 0)); the pose maps it to output pixels (pixel centres at integer coordinates,
dlib's convention). Pixels are painted on a supersampled raster and box-filtered down, so edges
are anti-aliased and soft. `render` draws from the image's generator after `head_pose` did.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from facecal.data.synth_face import Expression, Identity

_SS = 2  # supersampling factor of the raster
# Tuned against dlib's 68-point model (bench/synth.py --parts), as synth_face's proportions.
_BROW_BELOW = 0.5  # mid-brow, this share of the thickness lies below the points


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


def render(
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
