"""Procedural top-down bottle-mouth images in the MVTec AD layout.

The images exist to train and test the models without shipping data, so the
defect must be the only thing that tells the classes apart: every nuisance
(position, size, glass colour, lighting, highlight, blur, noise) is drawn
from the same distributions for every class, before any defect is drawn.
Each image comes from its own generator seeded by (seed, split, class,
index), so changing one count never changes another image. Novel defects
(``--novel``: kinds no class stands for, to test the anomaly check alone) are
drawn on the same bottles from a split of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from station.mvtec import BOTTLE_CLASSES, DEFECT_CLASSES, GOOD, NOVEL, NOVEL_KINDS

CANONICAL_SIZE = 900

# Glass tints (B, G, R gains): clear/grey, green, amber/brown.
_TINTS = np.array([[0.92, 0.95, 0.95], [0.55, 0.85, 0.50], [0.30, 0.55, 0.85]], dtype=np.float32)

# Radial layout of the mouth, as fractions of the outer radius.
_INNER = 0.70  # the opening ends and the inner rim edge begins
_RIM_TOP = 0.78  # the flat top of the rim begins
_OUTER_EDGE = 0.93  # the rounded outer edge begins


@dataclass(frozen=True)
class SynthSummary:
    root: Path
    counts: dict[str, int]


@dataclass(frozen=True)
class _Scene:
    cx: float
    cy: float
    radius: float
    tint: np.ndarray
    gain: float
    gradient_angle: float
    gradient: float
    background: float
    highlight_angle: float
    highlight: float
    blur_sigma: float
    noise_sigma: float
    noise_seed: int


def _draw_scene(rng: np.random.Generator, size: int) -> _Scene:
    s = size / CANONICAL_SIZE
    tint = _TINTS[rng.integers(len(_TINTS))] * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    return _Scene(
        cx=size / 2 + rng.uniform(-25, 25) * s,
        cy=size / 2 + rng.uniform(-25, 25) * s,
        radius=rng.uniform(290, 350) * s,
        tint=tint,
        gain=float(rng.uniform(0.8, 1.15)),
        gradient_angle=float(rng.uniform(0, 2 * np.pi)),
        gradient=float(rng.uniform(0.0, 0.25)),
        background=float(rng.uniform(0.04, 0.14)),
        highlight_angle=float(rng.uniform(0, 2 * np.pi)),
        highlight=float(rng.uniform(0.1, 0.35)),
        blur_sigma=float(rng.uniform(0.6, 1.6)) * s,
        noise_sigma=float(rng.uniform(0.01, 0.03)),
        noise_seed=int(rng.integers(2**62)),
    )


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _smooth_profile(rng: np.random.Generator, n: int, jitter: float) -> np.ndarray:
    """n control values around 1 with a jagged fracture look."""
    return 1.0 + rng.uniform(-jitter, jitter, n)


def _broken_mask(rng: np.random.Generator, r: np.ndarray, theta: np.ndarray, scene: _Scene,
                 half_width_deg: tuple[float, float], depth_frac: tuple[float, float]) -> np.ndarray:
    """Glass missing from the outer edge inward over an angular sector, with a jagged fracture."""
    centre = rng.uniform(-np.pi, np.pi)
    half = np.deg2rad(rng.uniform(*half_width_deg))
    rim = scene.radius * (1.0 - _INNER)
    depth = rim * rng.uniform(*depth_frac)
    d = _wrap(theta - centre) / half  # −1 … 1 across the sector
    knots = np.linspace(-1.0, 1.0, 9)
    edge_jag = np.interp(d, knots, _smooth_profile(rng, 9, 0.35))
    side_jag = np.interp(r / scene.radius, np.linspace(0.6, 1.0, 7), _smooth_profile(rng, 7, 0.25))
    inside = np.abs(d) < side_jag
    shape = np.sqrt(np.clip(1.0 - np.minimum(np.abs(d), 1.0) ** 2, 0.0, 1.0))
    reach = scene.radius * 1.005 - depth * shape * edge_jag
    mask: np.ndarray = inside & (r >= reach) & (r <= scene.radius * 1.01)
    return mask


def _contamination_mask(rng: np.random.Generator, scene: _Scene, size: int) -> np.ndarray:
    """1–4 irregular blobs or a fibre inside the opening or on the inner rim."""
    mask = np.zeros((size, size), np.uint8)
    s = size / CANONICAL_SIZE
    if rng.uniform() < 0.3:  # a fibre: a curved thick line
        n = 8
        angle = rng.uniform(0, 2 * np.pi)
        start_r = rng.uniform(0.0, 0.55) * scene.radius
        x = scene.cx + start_r * np.cos(angle)
        y = scene.cy + start_r * np.sin(angle)
        heading = rng.uniform(0, 2 * np.pi)
        pts = []
        for _ in range(n):
            pts.append((x, y))
            heading += rng.normal(0, 0.5)
            step = rng.uniform(10, 22) * s
            x += step * np.cos(heading)
            y += step * np.sin(heading)
        poly = np.round(np.array(pts)).astype(np.int32)
        cv2.polylines(mask, [poly], False, 255, thickness=max(2, round(rng.uniform(3, 6) * s)))
    else:
        for _ in range(int(rng.integers(1, 5))):
            angle = rng.uniform(0, 2 * np.pi)
            dist = rng.uniform(0.0, _RIM_TOP - 0.02) * scene.radius
            bx = scene.cx + dist * np.cos(angle)
            by = scene.cy + dist * np.sin(angle)
            radius = rng.uniform(8, 35) * s
            k = int(rng.integers(7, 12))
            a = np.sort(rng.uniform(0, 2 * np.pi, k))
            rr = radius * rng.uniform(0.55, 1.0, k)
            poly = np.stack([bx + rr * np.cos(a), by + rr * np.sin(a)], axis=1)
            cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 255)
    return mask > 0


@dataclass(frozen=True)
class _Layers:
    """The defect-free bottle before compositing: polar coordinates and the three layers."""

    r: np.ndarray
    theta: np.ndarray
    u: np.ndarray
    background: np.ndarray
    glass: np.ndarray
    alpha: np.ndarray


def _layers(scene: _Scene, size: int) -> _Layers:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx = xx - scene.cx
    dy = yy - scene.cy
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    u = r / scene.radius

    # Background: dark, with a lighting gradient across the frame.
    ramp = (np.cos(scene.gradient_angle) * (xx - size / 2) + np.sin(scene.gradient_angle) * (yy - size / 2)) / size
    light = 1.0 + scene.gradient * 2 * ramp
    background = scene.background * light

    # Radial brightness profile of the glass.
    opening = 0.16 + 0.32 * np.exp(-((u / 0.38) ** 2))  # light through the bottom, brighter at the centre
    inner_edge = 0.85 * np.exp(-(((u - (_INNER + _RIM_TOP) / 2) / 0.03) ** 2))
    rim_top = 0.55 + 0.08 * np.cos(u * 90)  # fine concentric texture of the rim surface
    outer_edge = 0.80 * np.exp(-(((u - (_OUTER_EDGE + 1.0) / 2) / 0.035) ** 2))
    glass = np.where(u < _INNER, opening, np.where(u < _OUTER_EDGE, rim_top, 0.35))
    glass = glass + np.where(u >= _INNER - 0.03, inner_edge, 0) + np.where(u >= _RIM_TOP, outer_edge, 0)
    spec = scene.highlight * np.exp(-(_wrap(theta - scene.highlight_angle) ** 2) / (2 * 0.35**2))
    glass = glass + np.where((u > _INNER - 0.02) & (u <= 1.0), spec, 0)
    glass = glass * light * scene.gain
    # A soft outer boundary so the mouth is not a perfect aliased disc.
    alpha = np.clip((1.0 - u) * scene.radius / 1.5 + 0.5, 0.0, 1.0)
    return _Layers(r, theta, u, background, glass, alpha)


def _compose(background: np.ndarray, glass: np.ndarray, alpha: np.ndarray, tint: np.ndarray) -> np.ndarray:
    image: np.ndarray = background[..., None] * (1 - alpha[..., None]) + (glass[..., None] * tint) * alpha[..., None]
    return image


def _noise(scene: _Scene, shape: tuple[int, ...]) -> np.ndarray:
    """Sensor noise from the scene's own seed: the same with or without a defect."""
    noise: np.ndarray = np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise_sigma, shape)
    return noise.astype(np.float32)


def _finish(image: np.ndarray, scene: _Scene, noise: np.ndarray | None = None) -> np.ndarray:
    """Optics and sensor: blur, then noise (``noise`` when the caller already drew it for this scene)."""
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), scene.blur_sigma)
    image += _noise(scene, image.shape) if noise is None else noise
    out: np.ndarray = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    return out


def render_bottle(rng: np.random.Generator, defect: str | None, size: int = CANONICAL_SIZE) -> tuple[
    np.ndarray, np.ndarray | None
]:
    """BGR uint8 (size, size, 3) image and, for a defect, its uint8 0/255 mask (size, size)."""
    if defect is not None and defect not in DEFECT_CLASSES:
        raise ValueError(f"unknown defect {defect!r}; expected one of {DEFECT_CLASSES}")
    scene = _draw_scene(rng, size)
    layers = _layers(scene, size)
    r, theta, u = layers.r, layers.theta, layers.u
    background, glass, alpha = layers.background, layers.glass, layers.alpha

    mask: np.ndarray | None = None
    stain: np.ndarray | None = None
    dark = True
    if defect == "broken_large":
        mask = _broken_mask(rng, r, theta, scene, (12.5, 30.0), (0.6, 1.15))
    elif defect == "broken_small":
        mask = _broken_mask(rng, r, theta, scene, (2.0, 6.0), (0.3, 0.6))
    elif defect == "contamination":
        mask = _contamination_mask(rng, scene, size)
        # Foreign matter must contrast with what it lies on (a speck the eye
        # cannot see is no defect to label): dark dirt mostly, sometimes a
        # bright or coloured particle.
        dark = rng.uniform() < 0.7
        stain = (rng.uniform(0.1, 0.4) if dark else rng.uniform(0.25, 0.45)) * np.ones(3, np.float32)
        if not dark:
            stain *= rng.uniform(0.5, 1.0, 3).astype(np.float32)

    if mask is not None and defect != "contamination":
        alpha = np.where(mask, 0.0, alpha)
        # The fracture edge catches the light: a bright seam along the break.
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        seam = ring & ~mask & (u <= 1.0)
        glass = np.where(seam, glass + 0.35, glass)

    image = _compose(background, glass, alpha, scene.tint)
    if stain is not None and mask is not None:
        image[mask] = image[mask] * stain if dark else image[mask] + stain

    out = _finish(image, scene)
    return out, (mask.astype(np.uint8) * 255 if mask is not None else None)


# -- novel defects: kinds the classifier never trains on -------------------------------------------

#: A pixel belongs to a novel defect's mask where the defect moved any channel by more than this many
#: grey levels (of 255): about what the eye sees; the faint blur fringe below it is not marked.
NOVEL_MASK_LEVELS = 8
# A defect drawn where it changes (almost) nothing, e.g. a scratch on a saturated highlight, would be a
# good bottle under a defect's name: such a draw is redrawn.
_NOVEL_MIN_PIXELS = 20
_NOVEL_ATTEMPTS = 8
# Foreign colours (B, G, R) for stains: blue, violet, pink; hues no glass tint has.
_STAIN_COLOURS = np.array([[0.80, 0.30, 0.08], [0.70, 0.15, 0.55], [0.55, 0.25, 0.90]], dtype=np.float32)
# Wrong glass tints: the bottle tints plus cobalt; one far from the bottle's own is taken.
_WRONG_TINTS = np.vstack([_TINTS, np.array([[0.95, 0.60, 0.30]], dtype=np.float32)])


def _on_lip(rng: np.random.Generator, scene: _Scene, u_range: tuple[float, float]) -> tuple[float, float, float]:
    """A point on the rim (x, y) and its angle around the mouth."""
    angle = float(rng.uniform(-np.pi, np.pi))
    dist = float(rng.uniform(*u_range)) * scene.radius
    return scene.cx + dist * np.cos(angle), scene.cy + dist * np.sin(angle), angle


def _rim_band(layers: _Layers) -> np.ndarray:
    """Where glass is: line defects are kept to it, since a crack or scratch cannot float in the opening."""
    band: np.ndarray = ((layers.u >= _INNER + 0.01) & (layers.u <= 0.985)).astype(np.float32)
    return band


def _lines_coverage(polylines: list[np.ndarray], size: int, thickness: int) -> np.ndarray:
    """Anti-aliased coverage (0–1) of polylines, drawn with sub-pixel precision."""
    canvas = np.zeros((size, size), np.uint8)
    shift = 4  # cv2's fixed-point bits: without them a curve is snapped to whole pixels
    pts = [np.round(line * (1 << shift)).astype(np.int32) for line in polylines]
    cv2.polylines(canvas, pts, False, 255, thickness=thickness, lineType=cv2.LINE_AA, shift=shift)
    coverage: np.ndarray = canvas.astype(np.float32) / 255.0
    return coverage


def _window(x: float, y: float, half: float, size: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The pixels within ``half`` of (x, y): their slices and coordinates (a defect is small; the frame is not)."""
    x0, x1 = max(0, int(x - half)), min(size, int(x + half) + 2)
    y0, y1 = max(0, int(y - half)), min(size, int(y + half) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return (slice(y0, y1), slice(x0, x1)), xx, yy


def _blob_coverage(size: int, x: float, y: float, diameter: float, aspect: float,
                   orientation: float, rng: np.random.Generator, softness: float) -> np.ndarray:
    """A soft-edged irregular ellipse: 1 inside, falling to 0 over ``softness`` of its radius."""
    coverage = np.zeros((size, size), np.float32)
    # The wobble reaches 1.36 × the radius, the soft edge another softness / 2 of it.
    window, xx, yy = _window(x, y, diameter / 2 * (1.4 + softness), size)
    dx = xx - x
    dy = yy - y
    c, s_ = np.cos(orientation), np.sin(orientation)
    a = (dx * c + dy * s_) / (diameter / 2)
    b = (-dx * s_ + dy * c) / (diameter / 2 * aspect)
    # A wobbly outline (3 low harmonics), so no two blobs are perfect ellipses.
    phi = np.arctan2(b, a)
    wobble = 1.0 + sum(float(rng.uniform(0, 0.12)) * np.cos(k * phi + float(rng.uniform(0, 2 * np.pi)))
                       for k in (2, 3, 5))
    d = np.sqrt(a * a + b * b) / wobble
    t = np.clip((1.0 - d) / softness + 0.5, 0.0, 1.0)
    coverage[window] = t * t * (3 - 2 * t)  # smoothstep: no hard edge
    return coverage


def _crack(rng: np.random.Generator, image: np.ndarray, layers: _Layers, scene: _Scene) -> np.ndarray:
    """A thin dark curved crack, 1–3 px wide and 40–200 px long, across or along the lip."""
    size = image.shape[0]
    sc = size / CANONICAL_SIZE
    length = rng.uniform(40, 200) * sc
    thickness = max(1, round(int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15])) * sc))
    angle = float(rng.uniform(-np.pi, np.pi))
    dist = rng.uniform(0.76, 0.95) * scene.radius
    lo, hi = (_INNER + 0.02) * scene.radius, 0.98 * scene.radius
    # Walked in polar coordinates, the heading measured from the rim's tangent: a crack starts
    # across the lip and, meeting an edge of the glass, bends along it (no sharp bounce).
    heading = rng.uniform(0.3, 1.5) * rng.choice([-1.0, 1.0]) + (np.pi if rng.uniform() < 0.5 else 0.0)
    step = 3.0 * sc
    pts = []
    for _ in range(int(np.ceil(length / step)) + 1):
        pts.append((scene.cx + dist * np.cos(angle), scene.cy + dist * np.sin(angle)))
        heading += rng.normal(0, 0.15)
        outward = np.sin(heading)
        if (dist - lo < 8 * sc and outward < 0) or (hi - dist < 8 * sc and outward > 0):
            tangent = 0.0 if np.cos(heading) >= 0 else np.pi
            heading = tangent + 0.5 * ((heading - tangent + np.pi) % (2 * np.pi) - np.pi)
        dist = float(np.clip(dist + step * np.sin(heading), lo, hi))
        angle += step * np.cos(heading) / dist
    cover = _lines_coverage([np.array(pts)], size, thickness) * _rim_band(layers)
    depth = rng.uniform(0.55, 0.8)
    out: np.ndarray = image * (1.0 - depth * cover)[..., None]
    return out


def _stain(rng: np.random.Generator, image: np.ndarray, layers: _Layers, scene: _Scene) -> np.ndarray:
    """A soft smudge of a foreign colour, 12–25 px across, on the flat top of the lip."""
    sc = image.shape[0] / CANONICAL_SIZE
    x, y, _ = _on_lip(rng, scene, (_RIM_TOP + 0.02, _OUTER_EDGE - 0.02))
    diameter = rng.uniform(12, 25) * sc
    cover = _blob_coverage(image.shape[0], x, y, diameter, float(rng.uniform(0.6, 1.0)),
                           float(rng.uniform(0, np.pi)), rng, softness=0.5)
    colour = _STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))] * rng.uniform(0.35, 0.6)
    opacity = cover * rng.uniform(0.6, 0.85)
    out: np.ndarray = image * (1.0 - opacity[..., None]) + colour * opacity[..., None]
    return out


def _scratch(rng: np.random.Generator, image: np.ndarray, layers: _Layers, scene: _Scene) -> np.ndarray:
    """A thin bright line, or 2–4 fine parallel ones (a scuff), 15–70 px long on the lip."""
    size = image.shape[0]
    sc = size / CANONICAL_SIZE
    x, y, angle = _on_lip(rng, scene, (_RIM_TOP + 0.01, _OUTER_EDGE - 0.01))
    direction = angle + np.pi / 2 + rng.uniform(-0.8, 0.8)  # mostly along the lip, as handling scuffs run
    along = np.array([np.cos(direction), np.sin(direction)])
    across = np.array([-along[1], along[0]])
    n = 1 if rng.uniform() < 0.4 else int(rng.integers(2, 5))
    spacing = rng.uniform(2.5, 4.5) * sc
    length = rng.uniform(20, 70) * sc
    lines = []
    for k in range(n):
        offset = (k - (n - 1) / 2) * spacing
        start = -length / 2 * rng.uniform(0.7, 1.0)
        end = length / 2 * rng.uniform(0.7, 1.0)
        centre = np.array([x, y]) + offset * across
        lines.append(np.stack([centre + start * along, centre + end * along]))
    cover = _lines_coverage(lines, size, 1) * _rim_band(layers)
    gain = rng.uniform(0.25, 0.45)  # scattered light: whitish, not the glass colour
    out: np.ndarray = image + gain * cover[..., None]
    return out


def _bubble(rng: np.random.Generator, image: np.ndarray, layers: _Layers, scene: _Scene) -> np.ndarray:
    """One or two blisters in the glass: a bright ring round a dark centre, 5–14 px across."""
    sc = image.shape[0] / CANONICAL_SIZE
    x0, y0, _ = _on_lip(rng, scene, (0.76, 0.95))
    window, px, py = _window(x0, y0, 24 * sc, image.shape[0])
    out: np.ndarray = image.copy()
    for k in range(1 if rng.uniform() < 0.6 else 2):
        radius = rng.uniform(2.5, 7.0) * sc
        x = x0 + (rng.uniform(-12, 12) * sc if k else 0.0)
        y = y0 + (rng.uniform(-12, 12) * sc if k else 0.0)
        d = np.sqrt((px - x) ** 2 + (py - y) ** 2)
        ring = np.exp(-(((d - radius) / (0.9 * sc)) ** 2))
        core = np.clip(1.0 - d / (0.8 * radius), 0.0, 1.0) ** 0.5
        dark = rng.uniform(0.35, 0.6)
        out[window] = out[window] * (1.0 - dark * core)[..., None] + rng.uniform(0.25, 0.4) * ring[..., None]
    return out


def _tint(rng: np.random.Generator, image: np.ndarray, layers: _Layers, scene: _Scene) -> np.ndarray:
    """A patch of glass, 25–45 px across, of another tint at the same brightness (e.g. a foreign cullet)."""
    sc = image.shape[0] / CANONICAL_SIZE
    x, y, _ = _on_lip(rng, scene, (0.78, 0.92))
    far = [t for t in _WRONG_TINTS if np.linalg.norm(t - scene.tint) > 0.3]
    wrong = far[int(rng.integers(len(far)))]
    # Same mean gain: the hue is what is wrong, not the brightness.
    ratio = (wrong * (scene.tint.mean() / wrong.mean()) / scene.tint).astype(np.float32)
    cover = _blob_coverage(image.shape[0], x, y, rng.uniform(25, 45) * sc, float(rng.uniform(0.5, 1.0)),
                           float(rng.uniform(0, np.pi)), rng, softness=0.6)
    cover = cover * layers.alpha * rng.uniform(0.8, 1.0)  # glass only: the background keeps its colour
    out: np.ndarray = image * (1.0 + (ratio - 1.0) * cover[..., None])
    return out


_NOVEL_DRAWERS: dict[str, Callable[[np.random.Generator, np.ndarray, _Layers, _Scene], np.ndarray]] = {
    "crack": _crack,
    "stain": _stain,
    "scratch": _scratch,
    "bubble": _bubble,
    "tint": _tint,
}
# Evaluation reads kinds off file names against mvtec.NOVEL_KINDS: a drawer it does not know would go uncounted.
assert tuple(_NOVEL_DRAWERS) == NOVEL_KINDS


def render_novel(rng: np.random.Generator, kind: str, size: int = CANONICAL_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """BGR uint8 image of a bottle with a novel defect of ``kind`` and its uint8 0/255 mask.

    The bottle is the one ``render_bottle`` draws from an equally seeded generator for a good bottle
    (the scene is drawn first, the defect after), so ``render_bottle(same_rng, None)`` is this image
    without the defect. The mask is exactly where the two differ by more than ``NOVEL_MASK_LEVELS``.
    """
    if kind not in _NOVEL_DRAWERS:
        raise ValueError(f"unknown novel defect {kind!r}; expected one of {NOVEL_KINDS}")
    scene = _draw_scene(rng, size)
    layers = _layers(scene, size)
    clean = _compose(layers.background, layers.glass, layers.alpha, scene.tint)
    noise = _noise(scene, clean.shape)
    good = _finish(clean, scene, noise)
    for _ in range(_NOVEL_ATTEMPTS):
        out = _finish(_NOVEL_DRAWERS[kind](rng, clean, layers, scene), scene, noise)
        changed = np.abs(out.astype(np.int16) - good.astype(np.int16)).max(axis=2) > NOVEL_MASK_LEVELS
        if changed.sum() >= _NOVEL_MIN_PIXELS:
            break
    return out, changed.astype(np.uint8) * 255


def _write_png(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cannot write image {path}")


def write_dataset(out: Path, seed: int = 0, train_good: int = 60, test_per_class: int = 15, novel: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> SynthSummary:
    """Write ``out/bottle/{train/good, test/<class>, ground_truth/<defect>}`` in MVTec naming.

    ``novel`` > 0 also writes ``test/novel/<i>_<kind>.png`` and ``ground_truth/novel/<i>_<kind>_mask.png``,
    the kinds of ``NOVEL_KINDS`` in turn. Their generators are seeded (seed, 2, kind, index), a stream no
    other image uses, so asking for novel images changes no other file.
    """
    if train_good < 0 or test_per_class < 0 or novel < 0:
        raise ValueError(f"image counts must not be negative (train_good={train_good}, "
                         f"test_per_class={test_per_class}, novel={novel})")
    root = out / "bottle"
    jobs: list[tuple[int, str, int, Path, Path | None]] = []
    for i in range(train_good):
        jobs.append((0, GOOD, i, root / "train" / GOOD / f"{i:03d}.png", None))
    for cls in BOTTLE_CLASSES:
        for i in range(test_per_class):
            mask_path = root / "ground_truth" / cls / f"{i:03d}_mask.png" if cls != GOOD else None
            jobs.append((1, cls, i, root / "test" / cls / f"{i:03d}.png", mask_path))
    for i in range(novel):
        kind = NOVEL_KINDS[i % len(NOVEL_KINDS)]
        jobs.append((2, kind, i, root / "test" / NOVEL / f"{i:03d}_{kind}.png",
                     root / "ground_truth" / NOVEL / f"{i:03d}_{kind}_mask.png"))
    counts: dict[str, int] = {}
    for done, (split_index, cls, i, path, mask_path) in enumerate(jobs, start=1):
        mask: np.ndarray | None
        if split_index == 2:
            rng = np.random.default_rng([seed, split_index, NOVEL_KINDS.index(cls), i])
            image, mask = render_novel(rng, cls)
            key = f"test/{NOVEL}"
        else:
            rng = np.random.default_rng([seed, split_index, BOTTLE_CLASSES.index(cls), i])
            image, mask = render_bottle(rng, None if cls == GOOD else cls)
            key = f"{path.parent.parent.name}/{cls}"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_png(path, image)
        if mask_path is not None and mask is not None:
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            _write_png(mask_path, mask)
        counts[key] = counts.get(key, 0) + 1
        if progress:
            progress(done, len(jobs))
    return SynthSummary(root, counts)
