"""Procedural top-down bottle-mouth images in the MVTec AD layout.

The images exist to train and test the models without shipping data, so the
defect must be the only thing that tells the classes apart: every nuisance
(position, size, glass colour, lighting, highlight, blur, noise) is drawn
from the same distributions for every class, before any defect is drawn.
Each image comes from its own generator seeded by (seed, split, class,
index), so changing one count never changes another image. Novel defects
(``--novel``: kinds no class stands for, to test the anomaly check alone) are
drawn on the same bottles from a split of their own.

Styles (``--style``) are families of look: ``ring`` (this module: a ring light
above, a bright lip on black; the default, unchanged since the first figures),
``dome`` and ``backlit`` (station/tools/synth_styles.py). A comma list cycles them:
image i of each folder is drawn in style i mod n. ``synth.json`` beside the
``bottle`` folder says what made the data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from station.core.folders import BOTTLE_CLASSES, DEFECT_CLASSES, GOOD, NOVEL, NOVEL_KINDS
from station.tools.synth_base import CANONICAL_SIZE, INNER_CHIP_SHARE, Layers, wrap
from station.tools.synth_base import INNER as _INNER
from station.tools.synth_base import OUTER_EDGE as _OUTER_EDGE
from station.tools.synth_base import RIM_TOP as _RIM_TOP
from station.tools.synth_base import TINTS as _TINTS
from station.tools.synth_novel import NOVEL_MASK_LEVELS, render_novel_on
from station.tools.synth_styles import LOOK_STYLES, draw_look, render_look, render_look_novel

__all__ = ["CANONICAL_SIZE", "NOVEL_MASK_LEVELS", "STYLES", "SynthSummary", "parse_styles", "render_bottle",
           "render_novel", "scene_of", "write_dataset"]

#: renderer styles, the default first
STYLES = ("ring", *LOOK_STYLES)
SYNTH_JSON = "synth.json"


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

    # The ring style's lip geometry is fixed; the defect drawers read it from any style's scene.
    @property
    def inner(self) -> float:
        return _INNER

    @property
    def rim_top(self) -> float:
        return _RIM_TOP

    @property
    def outer_edge(self) -> float:
        return _OUTER_EDGE


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


def _smooth_profile(rng: np.random.Generator, n: int, jitter: float) -> np.ndarray:
    """n control values around 1 with a jagged fracture look."""
    return 1.0 + rng.uniform(-jitter, jitter, n)


def _broken_mask(rng: np.random.Generator, r: np.ndarray, theta: np.ndarray, scene: _Scene,
                 half_width_deg: tuple[float, float], depth_frac: tuple[float, float],
                 from_inner: bool = False) -> np.ndarray:
    """Glass missing over an angular sector, from the outer edge inward (or from the inner edge
    outward), with a jagged fracture."""
    centre = rng.uniform(-np.pi, np.pi)
    half = np.deg2rad(rng.uniform(*half_width_deg))
    rim = scene.radius * (1.0 - _INNER)
    depth = rim * rng.uniform(*depth_frac)
    d = wrap(theta - centre) / half  # −1 … 1 across the sector
    knots = np.linspace(-1.0, 1.0, 9)
    edge_jag = np.interp(d, knots, _smooth_profile(rng, 9, 0.35))
    side_jag = np.interp(r / scene.radius, np.linspace(0.6, 1.0, 7), _smooth_profile(rng, 7, 0.25))
    inside = np.abs(d) < side_jag
    shape = np.sqrt(np.clip(1.0 - np.minimum(np.abs(d), 1.0) ** 2, 0.0, 1.0))
    if from_inner:
        start = scene.radius * _INNER
        mask: np.ndarray = inside & (r >= start * 0.995) & (r <= start + depth * shape * edge_jag)
        return mask
    reach = scene.radius * 1.005 - depth * shape * edge_jag
    mask = inside & (r >= reach) & (r <= scene.radius * 1.01)
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


def _opening(u: np.ndarray) -> np.ndarray:
    """Light through the bottom, brighter at the centre: what the opening shows at ``u`` outer radii."""
    out: np.ndarray = 0.16 + 0.32 * np.exp(-((u / 0.38) ** 2))
    return out


def _layers(scene: _Scene, size: int) -> Layers:
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
    opening = _opening(u)
    inner_edge = 0.85 * np.exp(-(((u - (_INNER + _RIM_TOP) / 2) / 0.03) ** 2))
    rim_top = 0.55 + 0.08 * np.cos(u * 90)  # fine concentric texture of the rim surface
    outer_edge = 0.80 * np.exp(-(((u - (_OUTER_EDGE + 1.0) / 2) / 0.035) ** 2))
    glass = np.where(u < _INNER, opening, np.where(u < _OUTER_EDGE, rim_top, 0.35))
    glass = glass + np.where(u >= _INNER - 0.03, inner_edge, 0) + np.where(u >= _RIM_TOP, outer_edge, 0)
    spec = scene.highlight * np.exp(-(wrap(theta - scene.highlight_angle) ** 2) / (2 * 0.35**2))
    glass = glass + np.where((u > _INNER - 0.02) & (u <= 1.0), spec, 0)
    glass = glass * light * scene.gain
    # A soft outer boundary so the mouth is not a perfect aliased disc.
    alpha = np.clip((1.0 - u) * scene.radius / 1.5 + 0.5, 0.0, 1.0)
    return Layers(r, theta, u, background, glass, alpha)


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


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown renderer style {style!r}; expected one of {', '.join(STYLES)}")


def scene_of(rng: np.random.Generator, style: str = "ring", size: int = CANONICAL_SIZE) -> tuple[float, float, float]:
    """The mouth (cx, cy, outer radius) that ``render_bottle`` or ``render_novel`` draws from an equally
    seeded generator in ``style``: the scene is drawn first, whatever the defect."""
    _check_style(style)
    scene = _draw_scene(rng, size) if style == "ring" else draw_look(rng, style, size)
    return scene.cx, scene.cy, scene.radius


def render_bottle(rng: np.random.Generator, defect: str | None, size: int = CANONICAL_SIZE,
                  style: str = "ring") -> tuple[np.ndarray, np.ndarray | None]:
    """BGR uint8 (size, size, 3) image and, for a defect, its uint8 0/255 mask (size, size)."""
    if defect is not None and defect not in DEFECT_CLASSES:
        raise ValueError(f"unknown defect {defect!r}; expected one of {DEFECT_CLASSES}")
    _check_style(style)
    if style != "ring":
        return render_look(rng, style, defect, size)
    scene = _draw_scene(rng, size)
    layers = _layers(scene, size)
    r, theta, u = layers.r, layers.theta, layers.u
    background, glass, alpha = layers.background, layers.glass, layers.alpha

    mask: np.ndarray | None = None
    stain: np.ndarray | None = None
    dark = True
    from_inner = False
    if defect == "broken_large":
        mask = _broken_mask(rng, r, theta, scene, (12.5, 30.0), (0.6, 1.15))
    elif defect == "broken_small":
        # As the other styles: some small chips bite out from the inner edge, where the opening shows through.
        from_inner = rng.uniform() < INNER_CHIP_SHARE
        mask = _broken_mask(rng, r, theta, scene, (2.0, 6.0), (0.3, 0.6), from_inner)
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
        if from_inner:
            glass = np.where(mask, _opening(u), glass)
        else:
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


def render_novel(rng: np.random.Generator, kind: str, size: int = CANONICAL_SIZE,
                 style: str = "ring") -> tuple[np.ndarray, np.ndarray]:
    """BGR uint8 image of a bottle with a novel defect of ``kind`` and its uint8 0/255 mask.

    The bottle is the one ``render_bottle`` draws from an equally seeded generator for a good bottle
    in the same style (the scene is drawn first, the defect after), so ``render_bottle(same_rng, None)``
    is this image without the defect. The mask is exactly where the two differ by more than
    ``NOVEL_MASK_LEVELS``.
    """
    _check_style(style)
    if style != "ring":
        return render_look_novel(rng, style, kind, size)
    scene = _draw_scene(rng, size)
    layers = _layers(scene, size)
    clean = _compose(layers.background, layers.glass, layers.alpha, scene.tint)
    noise = _noise(scene, clean.shape)
    return render_novel_on(rng, kind, scene, layers, clean, lambda image: _finish(image, scene, noise))


def parse_styles(text: str) -> tuple[str, ...]:
    """``ring``, ``ring,dome`` or ``all`` → the styles, in the order images cycle through them."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if names == ("all",):
        return STYLES
    if not names:
        raise ValueError(f"no renderer style in {text!r}; expected one or more of {', '.join(STYLES)}, or all")
    for name in names:
        _check_style(name)
    if len(set(names)) != len(names):
        raise ValueError(f"renderer style listed twice in {text!r}")
    return names


def _write_png(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cannot write image {path}")


def write_dataset(out: Path, seed: int = 0, train_good: int = 60, test_per_class: int = 15, novel: int = 0,
                  progress: Callable[[int, int], None] | None = None,
                  styles: tuple[str, ...] = ("ring",)) -> SynthSummary:
    """Write ``out/bottle/{train/good, test/<class>, ground_truth/<defect>}`` in MVTec naming.

    ``novel`` > 0 also writes ``test/novel/<i>_<kind>.png`` and ``ground_truth/novel/<i>_<kind>_mask.png``,
    the kinds of ``NOVEL_KINDS`` in turn. Their generators are seeded (seed, 2, kind, index), a stream no
    other image uses, so asking for novel images changes no other file.

    Image i of each folder is drawn in ``styles[i % len(styles)]``; a ring image's generator is seeded as
    above, another style's with the style's index appended, so the styles draw independent bottles.
    ``out/synth.json`` records the arguments and which style drew which image.
    """
    if train_good < 0 or test_per_class < 0 or novel < 0:
        raise ValueError(f"image counts must not be negative (train_good={train_good}, "
                         f"test_per_class={test_per_class}, novel={novel})")
    if not styles:
        raise ValueError("at least one renderer style is needed")
    for style in styles:
        _check_style(style)
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
    drawn: dict[str, str] = {}
    for done, (split_index, cls, i, path, mask_path) in enumerate(jobs, start=1):
        mask: np.ndarray | None
        style = styles[i % len(styles)]
        stream = [seed, split_index, (NOVEL_KINDS if split_index == 2 else BOTTLE_CLASSES).index(cls), i]
        # Ring images keep the stream they had before there were styles: the same seed, the same files.
        rng = np.random.default_rng(stream if style == "ring" else [*stream, STYLES.index(style)])
        if split_index == 2:
            image, mask = render_novel(rng, cls, style=style)
            key = f"test/{NOVEL}"
        else:
            image, mask = render_bottle(rng, None if cls == GOOD else cls, style=style)
            key = f"{path.parent.parent.name}/{cls}"
        drawn[path.relative_to(root).as_posix()] = style
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_png(path, image)
        if mask_path is not None and mask is not None:
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            _write_png(mask_path, mask)
        counts[key] = counts.get(key, 0) + 1
        if progress:
            progress(done, len(jobs))
    record = {"generator": "station synth", "seed": seed, "styles": list(styles), "train_good": train_good,
              "test_per_class": test_per_class, "novel": novel, "counts": counts, "images": drawn}
    out.mkdir(parents=True, exist_ok=True)
    (out / SYNTH_JSON).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return SynthSummary(root, counts)
