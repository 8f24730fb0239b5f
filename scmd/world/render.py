"""Rendering: objects drawn from parts, the four styles, backdrops and nuisances (a Scene -> a PIL image)."""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from scmd.world.spec import (
    _BIN_COLOUR,
    _BIN_PATTERN,
    _CLASS_BIN,
    _ENV_BIN_SHIFT,
    _N,
    CLASSES,
    COLOUR_HUES,
    COLOUR_NAMES,
    EXTRA_CLASSES,
    IMAGE_SIZE,
    PATTERNS,
    RENDER_SIZE,
    RGB,
    SS,
)


def hsv(h_deg: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb((h_deg % 360) / 360.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def backdrop_of(env: str, class_index: int) -> Tuple[str, str]:
    """The (pattern, colour name) that ``env`` associates with class ``class_index``."""
    b = (_CLASS_BIN[class_index] + _ENV_BIN_SHIFT[env]) % len(_CLASS_BIN)
    return PATTERNS[_BIN_PATTERN[b]], COLOUR_NAMES[_BIN_COLOUR[b]]


def hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360
    return min(d, 360 - d)


# ---------------------------------------------------------------------------------------------------------
# Shapes: each class is a list of parts in object coordinates (x right, y down, about [-1, 1]^2)


@dataclass
class Part:
    polys: List[np.ndarray]  # filled polygons, each (k, 2)
    strokes: List[Tuple[np.ndarray, float]]  # open polylines (k, 2) with a width in object units
    colour: str  # a colour role resolved by _resolve_colour


def ell(cx, cy, rx, ry=None, n=22, a0=0.0, a1=2 * math.pi, rot=0.0) -> np.ndarray:
    ry = rx if ry is None else ry
    t = np.linspace(a0, a1, n, endpoint=(a1 - a0) < 2 * math.pi - 1e-6)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(rot), math.sin(rot)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)


def rect(x0, y0, x1, y1) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def poly(*pts) -> np.ndarray:
    return np.array(pts, float)


def P(colour: str, *polys: np.ndarray, strokes: Sequence[Tuple[np.ndarray, float]] = ()) -> Part:
    return Part(list(polys), list(strokes), colour)


def _car(r):
    if r.rand() < 0.5:  # sedan
        body = poly((-1, 0.4), (-1, -0.08), (-0.8, -0.2), (0.8, -0.2), (1, -0.05), (1, 0.4))
        cab = poly((-0.5, -0.2), (-0.3, -0.6), (0.35, -0.6), (0.62, -0.2))
        win = [poly((-0.4, -0.24), (-0.26, -0.52), (0.0, -0.52), (0.0, -0.24)),
               poly((0.06, -0.24), (0.06, -0.52), (0.31, -0.52), (0.5, -0.24))]
    else:  # hatchback / van
        body = poly((-1, 0.4), (-1, -0.15), (0.7, -0.2), (1, -0.02), (1, 0.4))
        cab = poly((-1, -0.15), (-0.9, -0.7), (0.35, -0.7), (0.7, -0.18))
        win = [poly((-0.82, -0.22), (-0.76, -0.6), (-0.15, -0.6), (-0.15, -0.22)),
               poly((-0.08, -0.22), (-0.08, -0.6), (0.3, -0.6), (0.58, -0.22))]
    wheels = [ell(-0.55, 0.42, 0.27), ell(0.55, 0.42, 0.27)]
    return [P("main", cab, body), P("glass", *win), P("dark", *wheels),
            P("grey", ell(-0.55, 0.42, 0.11), ell(0.55, 0.42, 0.11)), P("yellow", ell(0.93, 0.05, 0.07, 0.06))]


def _fish(r):
    h = r.uniform(0.32, 0.48)
    tail = (poly((0.42, 0), (1, -0.5), (0.82, 0), (1, 0.5)) if r.rand() < 0.5
            else poly((0.45, 0), (1, -0.42), (1, 0.42)))
    parts = [P("accent", tail, poly((-0.4, -h + 0.06), (-0.05, -h - 0.28), (0.2, -h + 0.1))),
             P("main", ell(-0.15, 0, 0.7, h))]
    if r.rand() < 0.5:
        parts.append(P("light", strokes=[(poly((-0.1, -h + 0.08), (-0.1, h - 0.08)), 0.08),
                                         (poly((0.18, -h + 0.15), (0.18, h - 0.15)), 0.08)]))
    parts += [P("white", ell(-0.56, -0.08, 0.11)), P("dark", ell(-0.58, -0.08, 0.055))]
    return parts


def _flower(r):
    k = r.randint(5, 9)
    cy, pr = -0.38, r.uniform(0.22, 0.3)
    a0 = r.uniform(0, 2 * math.pi)
    petals = [ell(pr * math.cos(a0 + 2 * math.pi * i / k), cy + pr * math.sin(a0 + 2 * math.pi * i / k),
                  0.24, 0.13, rot=a0 + 2 * math.pi * i / k) for i in range(k)]
    sway = r.uniform(-0.15, 0.15)
    return [P("green", ell(0.22, 0.55, 0.22, 0.09, rot=-0.6),
              strokes=[(poly((0, cy), (sway, 0.35), (0, 1)), 0.09)]),
            P("main", *petals), P(r.choice(["yellow", "dark", "orange"]), ell(0, cy, 0.15))]


def _house(r):
    parts = []
    if r.rand() < 0.6:
        parts.append(P("brown", rect(0.35, -0.78, 0.55, -0.3)))
    parts += [P("main", rect(-0.7, -0.12, 0.7, 0.9)),
              P("roof", poly((-0.95, -0.08), (0, -0.88), (0.95, -0.08))),
              P("brown", rect(-0.15, 0.38, 0.15, 0.9)),
              P("glass", rect(-0.55, 0.08, -0.27, 0.38), rect(0.27, 0.08, 0.55, 0.38))]
    return parts


def _mushroom(r):
    ry = r.uniform(0.55, 0.8)
    cap = np.concatenate([ell(0, 0.05, 0.92, ry, n=24, a0=math.pi, a1=2 * math.pi), poly((0.92, 0.05))])
    parts = [P("cream", poly((-0.22, 0.0), (0.22, 0.0), (0.3, 0.92), (-0.3, 0.92))), P("cap", cap)]
    if r.rand() < 0.6:
        parts.append(P("white", ell(-0.42, -0.2, 0.13), ell(0.05, -0.45, 0.15), ell(0.45, -0.18, 0.11)))
    return parts


def _sailboat(r):
    return [P("dark", strokes=[(poly((0, 0.45), (0, -0.95)), 0.06)]),
            P("sail", poly((0.07, -0.9), (0.07, 0.36), (0.8, 0.36))),
            P("sail", poly((-0.07, -0.7), (-0.07, 0.36), (-0.62, 0.36))),
            P("hull", poly((-0.98, 0.42), (0.98, 0.42), (0.66, 0.85), (-0.66, 0.85)))]


def _traffic_light(r):
    return [P("grey", rect(-0.07, 0.3, 0.07, 1.0)), P("housing", rect(-0.33, -0.98, 0.33, 0.36)),
            P("red", ell(0, -0.7, 0.17)), P("yellow", ell(0, -0.31, 0.17)), P("green", ell(0, 0.08, 0.17))]


def _tree(r):
    trunk = P("brown", poly((-0.13, 1), (-0.1, 0.1), (0.1, 0.1), (0.13, 1)))
    if r.rand() < 0.5:  # round deciduous tree
        c = [ell(0, -0.38, 0.55, 0.5), ell(-0.38, -0.1, 0.36), ell(0.38, -0.1, 0.36), ell(0, -0.72, 0.34)]
        return [trunk, P(r.choice(["green", "green", "autumn"]), *c)]
    tiers = [poly((-0.72, 0.3), (0, -0.3), (0.72, 0.3)), poly((-0.56, -0.05), (0, -0.66), (0.56, -0.05)),
             poly((-0.4, -0.42), (0, -1.0), (0.4, -0.42))]
    return [trunk, P("darkgreen", *tiers)]


def _apple(r):
    return [P("brown", strokes=[(poly((0, -0.55), (0.08, -0.95)), 0.08)]),
            P(r.choice(["red", "red", "green"]), ell(-0.3, 0.1, 0.55, 0.72), ell(0.3, 0.1, 0.55, 0.72)),
            P("green", ell(0.32, -0.78, 0.22, 0.09, rot=-0.5))]


def _arrow(r):
    return [P("main", rect(-1, -0.14, 0.3, 0.14), poly((0.3, -0.5), (1, 0), (0.3, 0.5)))]


def _balloon(r):
    return [P("dark", strokes=[(poly((0, 0.42), (0.12, 0.7), (-0.06, 1.0)), 0.035)]),
            P("main", ell(0, -0.28, 0.6, 0.7), poly((-0.1, 0.48), (0.1, 0.48), (0, 0.38)))]


def _bell(r):
    body = poly((-0.72, 0.55), (-0.5, 0.3), (-0.45, -0.35), (-0.2, -0.7), (0.2, -0.7), (0.45, -0.35),
                (0.5, 0.3), (0.72, 0.55))
    return [P("dark", ell(0, -0.8, 0.12), ell(0, 0.62, 0.15)), P("gold", body)]


def _bottle(r):
    body = poly((-0.35, 1), (-0.35, -0.15), (-0.15, -0.45), (-0.15, -0.85), (0.15, -0.85), (0.15, -0.45),
                (0.35, -0.15), (0.35, 1))
    return [P("main", body), P("white", rect(-0.35, 0.2, 0.35, 0.6)), P("accent", rect(-0.17, -1, 0.17, -0.82))]


def _candle(r):
    return [P("main", rect(-0.25, -0.3, 0.25, 1)), P("dark", strokes=[(poly((0, -0.3), (0, -0.45)), 0.05)]),
            P("yellow", ell(0, -0.66, 0.15, 0.27)), P("orange", ell(0, -0.6, 0.07, 0.13))]


def _clock(r):
    ticks = [rect(-0.05, -0.8, 0.05, -0.65), rect(-0.05, 0.65, 0.05, 0.8), rect(-0.8, -0.05, -0.65, 0.05),
             rect(0.65, -0.05, 0.8, 0.05)]
    a, b = r.uniform(0, 2 * math.pi, 2)
    hands = [(poly((0, 0), (0.6 * math.sin(a), -0.6 * math.cos(a))), 0.07),
             (poly((0, 0), (0.4 * math.sin(b), -0.4 * math.cos(b))), 0.09)]
    return [P("main", ell(0, 0, 1)), P("white", ell(0, 0, 0.86)), P("dark", *ticks, strokes=hands)]


def _cloud(r):
    return [P("cloud", ell(-0.5, 0.15, 0.45, 0.38), ell(0.1, -0.15, 0.52, 0.5), ell(0.58, 0.15, 0.4, 0.35),
              rect(-0.5, 0.1, 0.6, 0.52))]


def _cup(r):
    handle = ell(0.55, 0.05, 0.3, 0.3, n=12, a0=-math.pi / 2, a1=math.pi / 2)
    return [P("main", poly((-0.6, -0.55), (0.6, -0.55), (0.5, 0.75), (-0.5, 0.75)), strokes=[(handle, 0.13)]),
            P("dark", ell(0, -0.55, 0.6, 0.12))]


def _heart(r):
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3 / 17
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 17 + 0.05
    return [P(r.choice(["red", "pink", "main"]), np.stack([x, y], 1))]


def _key(r):
    return [P("gold", ell(-0.6, 0, 0.38), rect(-0.25, -0.08, 0.95, 0.08), rect(0.55, 0.08, 0.66, 0.3),
              rect(0.78, 0.08, 0.88, 0.24)), P("dark", ell(-0.6, 0, 0.14))]


def _kite(r):
    tail = poly((0, 0.55), (0.2, 0.7), (0.0, 0.85), (0.25, 1.0))
    return [P("dark", strokes=[(tail, 0.035)]),
            P("main", poly((0, -1), (0.55, -0.2), (0, 0.55), (-0.55, -0.2))),
            P("dark", strokes=[(poly((0, -1), (0, 0.55)), 0.035), (poly((-0.55, -0.2), (0.55, -0.2)), 0.035)]),
            P("accent", poly((0.1, 0.68), (0.3, 0.62), (0.3, 0.78)), poly((0.06, 0.9), (0.26, 0.84), (0.26, 1.0)))]


def _ladder(r):
    rungs = [(poly((-0.45, y), (0.45, y)), 0.09) for y in np.linspace(-0.75, 0.75, 5)]
    return [P("brown", strokes=[(poly((-0.45, -1), (-0.45, 1)), 0.12), (poly((0.45, -1), (0.45, 1)), 0.12)]
              + rungs)]


def _lightning(r):
    return [P("yellow", poly((0.1, -1), (-0.5, 0.1), (-0.05, 0.1), (-0.28, 1), (0.52, -0.22), (0.06, -0.22),
                             (0.32, -1)))]


def _moon(r):
    outer = ell(0, 0, 0.9, n=26, a0=math.radians(50), a1=math.radians(310))
    inner = ell(0.42, 0, 0.72, n=20, a0=math.radians(265), a1=math.radians(95))[::-1]
    return [P("paleyellow", np.concatenate([outer, inner]))]


def _rocket(r):
    fins = [poly((-0.3, 0.15), (-0.62, 0.75), (-0.3, 0.58)), poly((0.3, 0.15), (0.62, 0.75), (0.3, 0.58))]
    return [P("orange", poly((-0.18, 0.55), (0, 1.0), (0.18, 0.55))), P("red", *fins),
            P("white", poly((0, -1), (0.3, -0.55), (0.3, 0.6), (-0.3, 0.6), (-0.3, -0.55))),
            P("glass", ell(0, -0.28, 0.14))]


def _snowman(r):
    return [P("white", ell(0, 0.5, 0.5), ell(0, -0.16, 0.37), ell(0, -0.64, 0.27)),
            P("dark", rect(-0.2, -1.0, 0.2, -0.8), rect(-0.34, -0.84, 0.34, -0.78), ell(0, -0.1, 0.05),
              ell(0, 0.1, 0.05), ell(-0.1, -0.7, 0.04), ell(0.1, -0.7, 0.04)),
            P("orange", poly((0, -0.64), (0.3, -0.6), (0, -0.56)))]


def _star(r):
    a = np.arange(10) * math.pi / 5 - math.pi / 2
    rad = np.where(np.arange(10) % 2 == 0, 1.0, r.uniform(0.38, 0.48))
    return [P(r.choice(["gold", "yellow", "main"]), np.stack([rad * np.cos(a), rad * np.sin(a) + 0.08], 1))]


def _sun(r):
    k = r.randint(8, 13)
    rays = [(poly((0.62 * math.cos(a), 0.62 * math.sin(a)), (0.98 * math.cos(a), 0.98 * math.sin(a))), 0.09)
            for a in np.arange(k) * 2 * math.pi / k]
    return [P("orange", strokes=rays), P("yellow", ell(0, 0, 0.52))]


def _tent(r):
    return [P("main", poly((-1, 0.8), (0, -0.85), (1, 0.8))), P("dark", poly((-0.25, 0.8), (0, 0.18), (0.25, 0.8)))]


def _umbrella(r):
    canopy = np.concatenate([ell(0, -0.05, 0.95, 0.8, n=24, a0=math.pi, a1=2 * math.pi), poly((0.95, -0.05))])
    hook = ell(-0.14, 0.78, 0.14, 0.14, n=8, a0=0, a1=math.pi)
    return [P("dark", strokes=[(poly((0, -0.05), (0, 0.78)), 0.06), (hook, 0.06),
                               (poly((0, -0.85), (0, -1.0)), 0.06)]), P("main", canopy)]


SHAPES: Dict[str, Callable[[np.random.RandomState], List[Part]]] = {
    "car": _car, "fish": _fish, "flower": _flower, "house": _house, "mushroom": _mushroom,
    "sailboat": _sailboat, "traffic_light": _traffic_light, "tree": _tree,
    "apple": _apple, "arrow": _arrow, "balloon": _balloon, "bell": _bell, "bottle": _bottle,
    "candle": _candle, "clock": _clock, "cloud": _cloud, "cup": _cup, "heart": _heart, "key": _key,
    "kite": _kite, "ladder": _ladder, "lightning": _lightning, "moon": _moon, "rocket": _rocket,
    "snowman": _snowman, "star": _star, "sun": _sun, "tent": _tent, "umbrella": _umbrella,
}
ALL_CLASSES = CLASSES + EXTRA_CLASSES
# classes whose upright pose matters get small rotations; symmetric icons may spin more
_MAX_ROT = {c: 20.0 for c in SHAPES}
_MAX_ROT.update({"arrow": 180.0, "star": 36.0, "sun": 40.0, "clock": 25.0, "key": 90.0, "lightning": 30.0,
                 "fish": 30.0, "car": 12.0, "sailboat": 15.0, "traffic_light": 10.0})


def _resolve_colour(role: str, main_hue: float, accent_hue: float, r: np.random.RandomState) -> RGB:
    j = r.uniform(-1, 1)
    if role == "main":
        return hsv(main_hue, r.uniform(0.55, 0.95), r.uniform(0.6, 0.95))
    if role == "accent":
        return hsv(accent_hue, r.uniform(0.5, 0.9), r.uniform(0.55, 0.95))
    if role == "light":
        return hsv(main_hue, 0.25, 0.97)
    fixed = {
        "dark": (0, 0.0, 0.12 + 0.08 * j), "grey": (0, 0.0, 0.55 + 0.1 * j), "white": (0, 0.02, 0.95),
        "glass": (200 + 10 * j, 0.25, 0.85), "yellow": (52 + 5 * j, 0.85, 0.98), "orange": (28 + 4 * j, 0.9, 0.95),
        "red": (2 + 4 * j, 0.85, 0.85), "pink": (330 + 6 * j, 0.45, 0.95), "green": (115 + 15 * j, 0.7, 0.6 + 0.1 * j),
        "darkgreen": (140 + 10 * j, 0.75, 0.38 + 0.08 * j), "autumn": (25 + 10 * j, 0.85, 0.8),
        "brown": (25 + 6 * j, 0.65, 0.38 + 0.1 * j), "cream": (40, 0.18, 0.93), "gold": (45 + 4 * j, 0.75, 0.85),
        "paleyellow": (55, 0.45, 0.97), "cloud": (210, 0.06 + 0.04 * j, 0.95),
        "cap": ([2, 15, 28][r.randint(3)], 0.8, 0.55 + 0.3 * r.rand()),
        "roof": ([2, 20, 220][r.randint(3)], 0.55 + 0.2 * j, 0.5 + 0.1 * j),
        "sail": (0, 0.0, 0.96) if r.rand() < 0.6 else (accent_hue, 0.7, 0.9),
        "hull": (25, 0.65, 0.4) if r.rand() < 0.5 else (main_hue, 0.7, 0.7),
        "housing": (0, 0.0, 0.15) if r.rand() < 0.7 else (50, 0.85, 0.85),
    }
    h, s, v = fixed[role]
    return hsv(h, s, v)


def colour_name(rgb: RGB) -> str:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    if v < 0.25:
        return "black"
    if s < 0.18:
        return "white" if v > 0.8 else "grey"
    return min(COLOUR_NAMES, key=lambda n: hue_distance(COLOUR_HUES[n], h * 360))


# ---------------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Scene:
    cls: str
    style: str
    pattern: str
    bg_colour: str
    seed: int
    distractors: Sequence[str] = tuple(EXTRA_CLASSES)  # classes allowed as small clutter objects


@dataclass
class _PxPart:
    polys: List[List[Tuple[float, float]]]
    strokes: List[Tuple[List[Tuple[float, float]], float]]
    rgb: RGB


def _place(parts: List[Part], cx, cy, scale, rot_deg, aspect, flip, main_hue, accent_hue, r) -> List[_PxPart]:
    c, s = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
    sx, sy = scale * aspect * (-1 if flip else 1), scale / aspect

    def tf(p: np.ndarray) -> List[Tuple[float, float]]:
        x, y = p[:, 0] * sx, p[:, 1] * sy
        return list(zip((cx + c * x - s * y).tolist(), (cy + s * x + c * y).tolist()))

    return [_PxPart([tf(q) for q in part.polys], [(tf(q), w * scale) for q, w in part.strokes],
                    _resolve_colour(part.colour, main_hue, accent_hue, r)) for part in parts]


def _joint(q) -> Optional[str]:
    return "curve" if len(q) <= 8 else None  # round joints only where corners are sharp (cheaper)


def _mask(part: _PxPart, grow: float = 0.0) -> Tuple[Image.Image, Tuple[int, int, int, int]]:
    """The part's binary mask, cropped to its bounding box (clipped to the canvas), and that box."""
    pad = grow + max([w for _, w in part.strokes], default=0.0) / 2 + 2
    pts = np.concatenate([np.asarray(q) for q in part.polys] + [np.asarray(q) for q, _ in part.strokes])
    x0, y0 = np.floor(pts.min(0) - pad).astype(int).clip(0, _N - 1).tolist()
    x1, y1 = np.ceil(pts.max(0) + pad).astype(int).clip(x0 + 1, _N).tolist()
    m = Image.new("L", (x1 - x0, y1 - y0), 0)
    d = ImageDraw.Draw(m)
    shift = np.array([x0, y0], float)

    def loc(q):
        return [tuple(p) for p in (np.asarray(q) - shift).tolist()]

    for q in part.polys:
        d.polygon(loc(q), fill=255)
        if grow > 0:
            d.line(loc(q + q[:1]), fill=255, width=max(1, int(round(2 * grow))), joint=_joint(q))
    for q, w in part.strokes:
        d.line(loc(q), fill=255, width=max(1, int(round(w + 2 * grow))), joint=_joint(q))
    return m, (x0, y0, x1, y1)


def _union(parts: List[_PxPart]) -> Image.Image:
    u = Image.new("L", (_N, _N), 0)
    for part in parts:
        m, box = _mask(part)
        u.paste(255, box, mask=m)
    return u


def _background(style: str, pattern: str, hue: float, r: np.random.RandomState) -> Image.Image:
    """Backdrop (pattern + hue) rendered in the style's manner."""
    if style == "sketch":  # notebook paper tinted with the hue; the pattern is the paper ruling
        base, ink = hsv(hue, r.uniform(0.1, 0.18), r.uniform(0.93, 0.98)), hsv(hue, 0.35, 0.86)
        if pattern in ("checkered", "striped"):
            ink = hsv(hue, 0.2, 0.92)
        lw = 1
    elif style in ("cartoon", "pixel_art", "mosaic"):
        v = r.uniform(0.75, 0.95)
        base = hsv(hue, r.uniform(0.45, 0.75), v)
        ink = hsv(hue, r.uniform(0.45, 0.8), v - 0.15) if r.rand() < 0.5 else hsv(hue, 0.3, 1.0)
        lw = 3
    elif style == "neon":
        base, ink, lw = hsv(hue, 0.7, 0.18), hsv(hue, 0.7, 0.32), 2
    elif style == "blueprint":
        base, ink, lw = hsv(215 + 10 * r.uniform(-1, 1), 0.8, 0.55), hsv(215, 0.45, 0.8), 1
    elif style == "silhouette":
        base, ink, lw = hsv(hue, r.uniform(0.25, 0.5), 0.95), hsv(hue, 0.45, 0.8), 3
    else:  # photo-like and painterly backgrounds: muted, with texture
        v = r.uniform(0.45, 0.85)
        base = hsv(hue, r.uniform(0.3, 0.6), v)
        ink = hsv(hue + r.uniform(-10, 10), r.uniform(0.3, 0.6), v + r.choice([-0.15, 0.12]))
        lw = 2
    im = Image.new("RGB", (_N, _N), base)
    d = ImageDraw.Draw(im)
    per = int(r.randint(10, 18) * SS * (0.7 if style == "sketch" else 1.0))
    off = r.randint(per)
    lw = lw * SS if style != "sketch" else 1  # paper ruling: faint hairlines
    if pattern == "striped":
        for y in range(off - per, _N, per):
            d.rectangle([0, y, _N, y + (lw if style == "sketch" else per // 2) - 1], fill=ink)
    elif pattern == "checkered":
        cell = per // 2 + SS * 2
        for i, y in enumerate(range(off - 2 * cell, _N, cell)):
            for j, x in enumerate(range(off - 2 * cell, _N, cell)):
                if (i + j) % 2 == 0:
                    d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=ink)
    elif pattern == "dotted":
        rad = max(SS, per // 5) if style != "sketch" else SS
        for i, y in enumerate(range(off - per, _N + per, per // 2 + 2)):
            for x in range(off - per + (per // 2 if i % 2 else 0), _N + per, per):
                d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=ink)
    elif pattern == "grid":
        for t in range(off - per, _N + per, per):
            d.line([(t, 0), (t, _N)], fill=ink, width=lw)
            d.line([(0, t), (_N, t)], fill=ink, width=lw)
    elif pattern == "diagonal":
        sgn = 1 if r.rand() < 0.5 else -1
        w = lw if style == "sketch" else per // 3
        for t in range(off - 2 * _N, 2 * _N, per):
            d.line([(t, 0), (t + sgn * _N, _N)], fill=ink, width=w)
    elif pattern == "wavy":
        xs = np.arange(0, _N + 4, 4)
        amp, k = r.uniform(2, 4) * SS, 2 * math.pi / r.uniform(20, 32) / SS
        w = lw if style == "sketch" else max(lw, per // 4)
        for y0 in range(off - per, _N + per, per):
            d.line(list(zip(xs.tolist(), (y0 + amp * np.sin(k * xs)).tolist())), fill=ink, width=w)
    elif pattern == "brick":
        bh, bw = per * 2 // 3, per * 4 // 3
        for i, y in enumerate(range(off - bh, _N, bh)):
            d.line([(0, y), (_N, y)], fill=ink, width=lw)
            for x in range(off - bw + (bw // 2 if i % 2 else 0), _N, bw):
                d.line([(x, y), (x, y + bh)], fill=ink, width=lw)
    elif style not in ("sketch", "cartoon", "pixel_art", "mosaic", "blueprint"):  # plain: a soft gradient
        g = Image.linear_gradient("L").rotate(float(r.uniform(0, 360))).resize((_N, _N))
        im = Image.composite(Image.new("RGB", (_N, _N), ink), im, g.point(lambda p: p // 3))
    return im


def _lowfreq(r: np.random.RandomState, n: int, cells: int = 6) -> np.ndarray:
    """Smooth random field in [-1, 1], (n, n)."""
    small = Image.fromarray(((r.rand(cells, cells) * 255)).astype(np.uint8), "L")
    return np.asarray(small.resize((n, n), Image.BICUBIC), np.float32) / 127.5 - 1.0


def _draw_object(canvas: Image.Image, parts: List[_PxPart], style: str, r: np.random.RandomState,
                 ink: Optional[Image.Image] = None) -> Image.Image:
    """Draw one object's parts onto canvas (in place) in the given style; returns its union mask."""
    union = Image.new("L", (_N, _N), 0)
    outline_w = r.uniform(2.5, 3.5) * SS / 2
    for part in parts:
        m, box = _mask(part)
        if style in ("cartoon", "pixel_art", "mosaic"):
            mo, box_o = _mask(part, grow=outline_w)
            canvas.paste((15, 15, 15), box_o, mask=mo)
            canvas.paste(part.rgb, box, mask=m)
        elif style in ("sketch", "blueprint", "neon"):
            assert ink is not None
            ink.paste(0, box, mask=m)  # later parts hide earlier lines
            d = ImageDraw.Draw(ink)
            jit = 0.6 * SS if style == "sketch" else 0.2
            width = {"sketch": 3 * SS // 2, "neon": 2 * SS}.get(style, SS)
            val = int(r.uniform(170, 255)) if style == "sketch" else 255
            for q in part.polys:
                for _rep in range(2 if style == "sketch" and r.rand() < 0.6 else 1):
                    pts = np.asarray(q + q[:1]) + r.uniform(-jit, jit, (len(q) + 1, 2))
                    d.line([tuple(p) for p in pts.tolist()], fill=val, width=width, joint=_joint(q))
            for q, w in part.strokes:
                d.line(q, fill=val, width=max(width, int(w)) if style != "neon" else width, joint=_joint(q))
            if style == "sketch" and part.polys and r.rand() < 0.45:  # hatching clipped to the part
                hatch = Image.new("L", m.size, 0)
                hd = ImageDraw.Draw(hatch)
                gap, sgn, (w, h) = r.randint(3, 6) * SS, r.choice([-1, 1]), m.size
                for t in range(-h, w + h, gap):
                    hd.line([(t, 0), (t + sgn * h * 0.7, h)], fill=int(r.uniform(110, 190)), width=1)
                ink.paste(ImageChops.lighter(ink.crop(box), ImageChops.multiply(hatch, m)), box)
            if style == "neon" and part.polys:
                ink.paste(int(r.uniform(0, 40)), box, mask=m)  # faint glow fill
        elif style == "silhouette":
            canvas.paste((20, 20, 25), box, mask=m)
        else:  # photo, painting, watercolor, bw_photo: filled, shaded later
            canvas.paste(part.rgb, box, mask=m)
        union.paste(255, box, mask=m)
    return union


def _random_parts(cls: str, r: np.random.RandomState, scale_range, bg_hue: float, centre=None,
                  ) -> Tuple[List[_PxPart], RGB]:
    shape = SHAPES[cls](r)
    scale = r.uniform(*scale_range) * _N / 2
    if centre is None:
        m = min(0.75 * scale, _N / 2)  # the object may be cut a little by the image border
        centre = (r.uniform(m, _N - m), r.uniform(m, _N - m))
    main_hue = r.uniform(0, 360)
    while hue_distance(main_hue, bg_hue) < 35:  # keep the object visible against its backdrop
        main_hue = r.uniform(0, 360)
    accent_hue = (main_hue + r.uniform(90, 270)) % 360
    rot = r.uniform(-1, 1) * _MAX_ROT[cls]
    aspect = math.exp(r.uniform(-0.2, 0.2))
    parts = _place(shape, centre[0], centre[1], scale, rot, aspect, r.rand() < 0.5, main_hue, accent_hue, r)
    main = next((p.rgb for p in parts if p.polys), parts[0].rgb)
    return parts, main


def render(scene: Scene) -> Tuple[Image.Image, Dict[str, str]]:
    """Render one image (IMAGE_SIZE x IMAGE_SIZE RGB, finished at RENDER_SIZE) and its metadata (for captions)."""
    r = np.random.RandomState(scene.seed)
    style = scene.style
    base_style = {"bw_photo": "photo", "watercolor": "painting"}.get(style, style)
    bg_hue = COLOUR_HUES[scene.bg_colour] + r.uniform(-8, 8)
    canvas = _background(base_style, scene.pattern, bg_hue, r)
    lined = base_style in ("sketch", "blueprint", "neon")
    ink = Image.new("L", (_N, _N), 0) if lined else None

    if base_style in ("photo", "painting"):  # scene clutter: soft translucent blobs
        blobs = canvas.copy()
        d = ImageDraw.Draw(blobs)
        for _ in range(r.randint(2, 6)):
            x, y, w, h = r.uniform(0, _N, 2).tolist() + r.uniform(8, 40, 2).tolist()
            col = hsv(r.uniform(0, 360), r.uniform(0.1, 0.5), r.uniform(0.3, 0.9))
            (d.ellipse if r.rand() < 0.5 else d.rectangle)([x - w, y - h, x + w, y + h], fill=col)
        canvas = Image.blend(canvas, blobs, float(r.uniform(0.15, 0.35)))

    # small distractor objects (other classes) behind the main object
    max_d = 2 if base_style == "photo" else 1
    for _ in range(r.randint(0, max_d + 1)):
        dcls = scene.distractors[r.randint(len(scene.distractors))]
        dparts, _ = _random_parts(dcls, r, (0.12, 0.24), bg_hue)
        _draw_object(canvas, dparts, base_style, r, ink)

    parts, main_rgb = _random_parts(scene.cls, r, (0.5, 0.8), bg_hue)
    if base_style in ("photo", "painting"):  # drop shadow
        union = _union(parts)
        dx, dy = (r.uniform(-1, 1, 2) * 4 * SS).astype(int).tolist()
        shadow = ImageChops.offset(union, dx, dy).filter(ImageFilter.BoxBlur(2 * SS)).point(lambda p: p * 2 // 5)
        canvas.paste((10, 10, 10), mask=shadow)
    union = _draw_object(canvas, parts, base_style, r, ink)

    if r.rand() < 0.2:  # occluder: a plain shape covering part of the object
        bbox = union.getbbox() or (0, 0, _N, _N)
        ox, oy = r.uniform(bbox[0], bbox[2]), (bbox[1] if r.rand() < 0.3 else bbox[3]) + r.uniform(-6, 6) * SS
        size = r.uniform(0.25, 0.45) * max(bbox[2] - bbox[0], bbox[3] - bbox[1])
        shape = ell(ox, oy, size, size * r.uniform(0.5, 1)) if r.rand() < 0.5 else rect(
            ox - size, oy - size * 0.6, ox + size, oy + size * 0.6)
        col = hsv(r.uniform(0, 360), r.uniform(0.1, 0.6), r.uniform(0.3, 0.9))
        occ = _PxPart([[tuple(p) for p in shape.tolist()]], [], col)
        _draw_object(canvas, [occ], base_style, r, ink)

    # ---- finishing at the output resolution
    if lined:
        assert ink is not None
        if base_style == "sketch":
            graphite = hsv(220, r.uniform(0, 0.25), r.uniform(0.08, 0.25))
            canvas.paste(graphite, mask=ink)
        elif base_style == "blueprint":
            canvas.paste((240, 245, 255), mask=ink)
        else:  # neon: bright lines with glow
            glow = ink.filter(ImageFilter.GaussianBlur(3 * SS))
            colour = main_rgb if sum(main_rgb) > 200 else hsv(r.uniform(0, 360), 0.8, 1.0)
            canvas.paste(colour, mask=ImageChops.add(glow, glow))
            canvas.paste(tuple(min(255, c + 90) for c in colour), mask=ink)
    img = canvas.resize((RENDER_SIZE, RENDER_SIZE), Image.BOX)
    n = RENDER_SIZE
    if base_style in ("photo", "painting"):
        a = np.asarray(img, np.float32) / 255.0
        m = np.asarray(union.resize((n, n), Image.BOX), np.float32)[..., None] / 255.0
        ang = r.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n - 0.5
        light = 1.0 + r.uniform(0.25, 0.5) * (math.cos(ang) * xx + math.sin(ang) * yy) * 2
        field = 1.0 + 0.18 * _lowfreq(r, n, 8)
        a = a * (1 - m + m * light[..., None] * field[..., None])  # object shading + texture
        a = a * (1.0 + 0.12 * _lowfreq(r, n, 3)[..., None])  # uneven scene lighting
        if base_style == "painting":
            a = a * r.uniform(0.85, 1.15, 3).astype(np.float32)  # colour cast
            a = a + 0.05 * np.stack([_lowfreq(r, n, 10) for _ in range(3)], -1)  # pigment variation
        img = Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8))
    if base_style == "painting":  # brush strokes take colours from the canvas, then blur
        d = ImageDraw.Draw(img)
        k = r.randint(40, 80)
        xy = r.uniform(0, n, (k, 2))
        cols = np.asarray(img, np.int16)[xy[:, 1].astype(int), xy[:, 0].astype(int)] + r.normal(0, 14, (k, 3))
        cols = np.clip(cols, 0, 255).astype(int).tolist()
        ang, ln, wd = r.uniform(0, math.pi, k), r.uniform(1.5, 3.5, k), r.randint(1, 3, k).tolist()
        dx, dy = (ln * np.cos(ang)).tolist(), (ln * np.sin(ang)).tolist()
        for (x, y), col, ex, ey, w in zip(xy.tolist(), cols, dx, dy, wd):
            d.line([(x - ex, y - ey), (x + ex, y + ey)], fill=tuple(col), width=w)
        img = img.filter(ImageFilter.GaussianBlur(float(r.uniform(0.5, 1.0))))
        if style == "watercolor":
            img = Image.blend(img, Image.new("RGB", img.size, (250, 248, 240)), float(r.uniform(0.3, 0.5)))
    elif base_style == "photo":
        img = img.filter(ImageFilter.GaussianBlur(float(r.uniform(0.0, 0.6))))
    if base_style in ("photo", "sketch", "painting"):  # sensor noise / paper grain
        a = np.asarray(img, np.int16) + r.normal(0, 5 if base_style == "photo" else 3, (n, n, 1 if
                                                                                           base_style == "sketch"
                                                                                           else 3)).round()
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if style == "bw_photo":
        img = img.convert("L").convert("RGB")
    elif style == "pixel_art":
        k = int(r.choice([12, 16, 21]))
        img = img.resize((k, k), Image.BOX).quantize(int(r.randint(6, 16))).convert("RGB").resize((n, n),
                                                                                                 Image.NEAREST)
    elif style == "mosaic":
        img = img.resize((n // 4, n // 4), Image.BOX).resize((n, n), Image.NEAREST)
        d = ImageDraw.Draw(img)
        for t in range(0, n, 4):
            d.line([(t, 0), (t, n)], fill=(60, 60, 60))
            d.line([(0, t), (n, t)], fill=(60, 60, 60))
    if IMAGE_SIZE != RENDER_SIZE:
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    meta = {"cls": scene.cls, "style": style, "pattern": scene.pattern, "bg_colour": scene.bg_colour,
            "obj_colour": colour_name(main_rgb)}
    return img, meta


