"""Novel defects: kinds the classifier never trains on, drawn on a finished bottle of any style.

Each drawer takes the bottle's defect-free composite (float BGR) and returns it with the defect;
``render_novel_on`` marks as the mask exactly the pixels the defect moved by more than
``NOVEL_MASK_LEVELS`` in the final 8-bit image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from station.core.folders import NOVEL_KINDS
from station.tools.synth_base import CANONICAL_SIZE, TINTS, Layers, SceneLike, blob_coverage, lines_coverage, window

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
_WRONG_TINTS = np.vstack([TINTS, np.array([[0.95, 0.60, 0.30]], dtype=np.float32)])


def _on_lip(rng: np.random.Generator, scene: SceneLike, u_range: tuple[float, float]) -> tuple[float, float, float]:
    """A point on the rim (x, y) and its angle around the mouth."""
    angle = float(rng.uniform(-np.pi, np.pi))
    dist = float(rng.uniform(*u_range)) * scene.radius
    return scene.cx + dist * np.cos(angle), scene.cy + dist * np.sin(angle), angle


def _rim_band(layers: Layers, scene: SceneLike) -> np.ndarray:
    """Where glass is: line defects are kept to it, since a crack or scratch cannot float in the opening."""
    band: np.ndarray = ((layers.u >= scene.inner + 0.01) & (layers.u <= 0.985)).astype(np.float32)
    return band
def _crack(rng: np.random.Generator, image: np.ndarray, layers: Layers, scene: SceneLike) -> np.ndarray:
    """A thin dark curved crack, 1–3 px wide and 40–200 px long, across or along the lip."""
    size = image.shape[0]
    sc = size / CANONICAL_SIZE
    length = rng.uniform(40, 200) * sc
    thickness = max(1, round(int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15])) * sc))
    angle = float(rng.uniform(-np.pi, np.pi))
    dist = rng.uniform(0.76, 0.95) * scene.radius
    lo, hi = (scene.inner + 0.02) * scene.radius, 0.98 * scene.radius
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
    cover = lines_coverage([np.array(pts)], size, thickness) * _rim_band(layers, scene)
    depth = rng.uniform(0.55, 0.8)
    out: np.ndarray = image * (1.0 - depth * cover)[..., None]
    return out


def _stain(rng: np.random.Generator, image: np.ndarray, layers: Layers, scene: SceneLike) -> np.ndarray:
    """A soft smudge of a foreign colour, 12–25 px across, on the flat top of the lip."""
    sc = image.shape[0] / CANONICAL_SIZE
    x, y, _ = _on_lip(rng, scene, (scene.rim_top + 0.02, scene.outer_edge - 0.02))
    diameter = rng.uniform(12, 25) * sc
    cover = blob_coverage(image.shape[0], x, y, diameter, float(rng.uniform(0.6, 1.0)),
                           float(rng.uniform(0, np.pi)), rng, softness=0.5)
    colour = _STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))] * rng.uniform(0.35, 0.6)
    opacity = cover * rng.uniform(0.6, 0.85)
    out: np.ndarray = image * (1.0 - opacity[..., None]) + colour * opacity[..., None]
    return out


def _scratch(rng: np.random.Generator, image: np.ndarray, layers: Layers, scene: SceneLike) -> np.ndarray:
    """A thin bright line, or 2–4 fine parallel ones (a scuff), 15–70 px long on the lip."""
    size = image.shape[0]
    sc = size / CANONICAL_SIZE
    x, y, angle = _on_lip(rng, scene, (scene.rim_top + 0.01, scene.outer_edge - 0.01))
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
    cover = lines_coverage(lines, size, 1) * _rim_band(layers, scene)
    gain = rng.uniform(0.25, 0.45)  # scattered light: whitish, not the glass colour
    out: np.ndarray = image + gain * cover[..., None]
    return out


def _bubble(rng: np.random.Generator, image: np.ndarray, layers: Layers, scene: SceneLike) -> np.ndarray:
    """One or two blisters in the glass: a bright ring round a dark centre, 5–14 px across."""
    sc = image.shape[0] / CANONICAL_SIZE
    x0, y0, _ = _on_lip(rng, scene, (0.76, 0.95))
    win, px, py = window(x0, y0, 24 * sc, image.shape[0])
    out: np.ndarray = image.copy()
    for k in range(1 if rng.uniform() < 0.6 else 2):
        radius = rng.uniform(2.5, 7.0) * sc
        x = x0 + (rng.uniform(-12, 12) * sc if k else 0.0)
        y = y0 + (rng.uniform(-12, 12) * sc if k else 0.0)
        d = np.sqrt((px - x) ** 2 + (py - y) ** 2)
        ring = np.exp(-(((d - radius) / (0.9 * sc)) ** 2))
        core = np.clip(1.0 - d / (0.8 * radius), 0.0, 1.0) ** 0.5
        dark = rng.uniform(0.35, 0.6)
        out[win] = out[win] * (1.0 - dark * core)[..., None] + rng.uniform(0.25, 0.4) * ring[..., None]
    return out


def _tint(rng: np.random.Generator, image: np.ndarray, layers: Layers, scene: SceneLike) -> np.ndarray:
    """A patch of glass, 25–45 px across, of another tint at the same brightness (e.g. a foreign cullet)."""
    sc = image.shape[0] / CANONICAL_SIZE
    x, y, _ = _on_lip(rng, scene, (0.78, 0.92))
    far = [t for t in _WRONG_TINTS if np.linalg.norm(t - scene.tint) > 0.3]
    wrong = far[int(rng.integers(len(far)))]
    # Same mean gain: the hue is what is wrong, not the brightness.
    ratio = (wrong * (scene.tint.mean() / wrong.mean()) / scene.tint).astype(np.float32)
    cover = blob_coverage(image.shape[0], x, y, rng.uniform(25, 45) * sc, float(rng.uniform(0.5, 1.0)),
                           float(rng.uniform(0, np.pi)), rng, softness=0.6)
    cover = cover * layers.alpha * rng.uniform(0.8, 1.0)  # glass only: the background keeps its colour
    out: np.ndarray = image * (1.0 + (ratio - 1.0) * cover[..., None])
    return out


_NOVEL_DRAWERS: dict[str, Callable[[np.random.Generator, np.ndarray, Layers, SceneLike], np.ndarray]] = {
    "crack": _crack,
    "stain": _stain,
    "scratch": _scratch,
    "bubble": _bubble,
    "tint": _tint,
}
# Evaluation reads kinds off file names against mvtec.NOVEL_KINDS: a drawer it does not know would go uncounted.
assert tuple(_NOVEL_DRAWERS) == NOVEL_KINDS


def render_novel_on(rng: np.random.Generator, kind: str, scene: SceneLike, layers: Layers, clean: np.ndarray,
                    finish: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``clean`` (the defect-free composite) with a novel defect of ``kind``, finished, and its 0/255 mask.

    ``finish`` must add the same noise each call, so that the image differs from ``finish(clean)``
    only where the defect is; the mask is exactly where they differ by more than ``NOVEL_MASK_LEVELS``.
    """
    if kind not in _NOVEL_DRAWERS:
        raise ValueError(f"unknown novel defect {kind!r}; expected one of {NOVEL_KINDS}")
    good = finish(clean)
    for _ in range(_NOVEL_ATTEMPTS):
        out = finish(_NOVEL_DRAWERS[kind](rng, clean, layers, scene))
        changed = np.abs(out.astype(np.int16) - good.astype(np.int16)).max(axis=2) > NOVEL_MASK_LEVELS
        if changed.sum() >= _NOVEL_MIN_PIXELS:
            break
    return out, changed.astype(np.uint8) * 255
