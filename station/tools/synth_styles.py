"""The ``dome`` and ``backlit`` renderer styles of ``station synth`` (``ring`` is station/tools/synth.py's own).

Each style is a family of looks a real station can have, and within it everything a line varies is
drawn per image: glass colour and transparency, the lip's geometry and profile, the highlight,
the background and its texture, vignetting, lighting level, blur, sensor noise and JPEG re-encoding,
position and size. As in the ring style, all of it is drawn before any defect, from the same
distributions for every class, so the defect is the only thing that tells the classes apart; and
the sensor noise comes from the scene's own seed, so a defect changes no pixel away from it.

- ``dome``: diffuse light from a dome above. A soft, low-contrast lip on a grey, blue or green conveyor
  belt with texture and stripes, partly transparent glass showing the belt through it, strong
  vignetting, often JPEG-compressed.
- ``backlit``: a light panel below. The panel and the opening (light through the bottle's bottom, in
  the glass's colour) are bright, the rim is a dark silhouette; a chip shows the light behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from station.tools.synth_base import CANONICAL_SIZE, INNER_CHIP_SHARE, TINTS, Layers, smooth_field, wrap
from station.tools.synth_novel import render_novel_on

#: the styles this module draws; station.tools.synth adds "ring"
LOOK_STYLES = ("dome", "backlit")

# Gray weights (B, G, R), as cv2.cvtColor's: a colour's luminance.
_LUMA = np.array([0.114, 0.587, 0.299], dtype=np.float32)
# Conveyor belts seen under a dome (B, G, R), each of unit luminance: grey, blue, green-grey.
_BELTS = np.array([[1.0, 1.0, 1.0], [1.75, 0.95, 0.55], [0.85, 1.12, 0.80]], dtype=np.float32)


@dataclass(frozen=True)
class Look:
    """Everything one dome or backlit image varies, drawn before any defect."""

    style: str
    cx: float
    cy: float
    radius: float
    inner: float  # the opening ends (fraction of the outer radius)
    rim_top: float  # the flat top of the rim begins
    outer_edge: float  # the rounded outer edge begins
    tint: np.ndarray  # the glass's tint (B, G, R gains), as the ring style draws it
    glass_colour: np.ndarray  # the colour the glass lends what it reflects or transmits
    background_colour: np.ndarray
    background_level: float
    texture_seed: int
    texture: float  # belt or panel non-uniformity
    stripes: float  # belt links
    stripe_period: float
    stripe_angle: float
    vignette: float
    vignette_cx: float
    vignette_cy: float
    gain: float  # lighting level / exposure
    lip_level: float  # dome: brightness of the rim's top; backlit: light the rim transmits
    edge_inner: float  # dome: the edges' extra brightness; backlit: how much darker the edges are
    edge_outer: float
    edge_width: float
    rim_texture: float
    rim_frequency: float
    transparency: float  # dome: how much of the belt shows through the rim
    opening_level: float
    opening_glow: float  # dome: brighter centre; backlit: darker towards the neck's walls
    highlight: float
    highlight_width: float  # radians
    highlight_angle: float
    highlight_u: float
    highlight_du: float
    seam: float  # a break's edge: dome adds this light; backlit multiplies by it
    blur_sigma: float
    noise_sigma: float
    noise_seed: int
    jpeg_quality: int  # 0: no re-encoding


def _luma(colour: np.ndarray) -> float:
    return float(colour @ _LUMA)


def draw_look(rng: np.random.Generator, style: str, size: int) -> Look:
    """One dome or backlit scene; the draws' order is fixed, so a seed is one image."""
    if style not in LOOK_STYLES:
        raise ValueError(f"unknown look style {style!r}; expected one of {LOOK_STYLES}")
    s = size / CANONICAL_SIZE
    back = style == "backlit"
    cx = size / 2 + rng.uniform(-60, 60) * s
    cy = size / 2 + rng.uniform(-60, 60) * s
    radius = rng.uniform(250, 370) * s
    inner = rng.uniform(0.64, 0.74)
    rim_top = inner + rng.uniform(0.05, 0.10)
    outer_edge = rng.uniform(0.90, 0.95)
    tint = (TINTS[rng.integers(len(TINTS))] * rng.uniform(0.9, 1.1, 3)).astype(np.float32)
    # Transmitted light keeps the tint's own gains; reflected light its hue at unit brightness.
    glass_colour = tint if back else (tint / _luma(tint)).astype(np.float32)
    if back:
        background_colour = rng.uniform(0.96, 1.04, 3).astype(np.float32)
        background_level = rng.uniform(0.6, 0.92)
    else:
        background_colour = (_BELTS[rng.integers(len(_BELTS))] * rng.uniform(0.92, 1.08, 3)).astype(np.float32)
        background_level = rng.uniform(0.12, 0.36)
    background_colour = (background_colour / _luma(background_colour)).astype(np.float32)
    texture_seed = int(rng.integers(2**62))
    texture = rng.uniform(0.0, 0.06 if back else 0.12)
    stripes = rng.uniform(0.0, 0.02 if back else 0.07)
    stripe_period = rng.uniform(15, 60) * s
    stripe_angle = rng.uniform(0, np.pi)
    vignette = rng.uniform(0.05, 0.3) if back else rng.uniform(0.25, 0.65)
    vignette_cx = size / 2 + rng.uniform(-0.15, 0.15) * size
    vignette_cy = size / 2 + rng.uniform(-0.15, 0.15) * size
    gain = rng.uniform(0.75, 1.15) if back else rng.uniform(0.6, 1.3)
    # A dome's lip is dimmer against its belt than a ring light's against black, yet still brighter:
    # a station is set up so that the mouth stands out.
    lip_level = rng.uniform(0.04, 0.3) if back else min(0.85, background_level * rng.uniform(2.0, 3.0))
    edge_inner = rng.uniform(0.3, 0.8) if back else rng.uniform(0.03, 0.25)
    edge_outer = rng.uniform(0.3, 0.8) if back else rng.uniform(0.03, 0.2)
    edge_width = rng.uniform(0.02, 0.05) if back else rng.uniform(0.025, 0.06)
    rim_texture = rng.uniform(0.0, 0.15 if back else 0.08)
    rim_frequency = rng.uniform(60, 120)
    transparency = 0.0 if back else rng.uniform(0.1, 0.4)
    opening_level = rng.uniform(0.4, 0.9) if back else rng.uniform(0.05, 0.3)
    opening_glow = rng.uniform(0.2, 0.7) if back else rng.uniform(0.0, 0.25)
    highlight = rng.uniform(0.0, 0.12) if back else rng.uniform(0.0, 0.3)
    highlight_width = rng.uniform(0.2, 1.0)
    highlight_angle = rng.uniform(0, 2 * np.pi)
    highlight_u = rng.uniform(inner + 0.03, 0.97)
    highlight_du = rng.uniform(0.03, 0.12)
    seam = rng.uniform(0.25, 0.6) if back else rng.uniform(0.1, 0.35)
    blur_sigma = rng.uniform(0.8, 2.4) * s
    noise_sigma = rng.uniform(0.005, 0.035)
    noise_seed = int(rng.integers(2**62))
    jpeg_quality = int(rng.integers(55, 96)) if rng.uniform() < 0.6 else 0
    return Look(style, cx, cy, radius, inner, rim_top, outer_edge, tint, glass_colour, background_colour,
                background_level, texture_seed, texture, stripes, stripe_period, stripe_angle, vignette,
                vignette_cx, vignette_cy, gain, lip_level, edge_inner, edge_outer, edge_width, rim_texture,
                rim_frequency, transparency, opening_level, opening_glow, highlight, highlight_width,
                highlight_angle, highlight_u, highlight_du, seam, blur_sigma, noise_sigma, noise_seed, jpeg_quality)


def look_layers(look: Look, size: int) -> Layers:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx = xx - look.cx
    dy = yy - look.cy
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    u = r / look.radius

    field = smooth_field(np.random.default_rng(look.texture_seed), size, 7)
    along = np.cos(look.stripe_angle) * xx + np.sin(look.stripe_angle) * yy
    belt = 1.0 + look.texture * field + look.stripes * np.cos(2 * np.pi * along / look.stripe_period)
    background = (look.background_level * belt)[..., None] * look.background_colour

    edge_i = np.exp(-(((u - look.inner) / look.edge_width) ** 2))
    edge_o = np.exp(-(((u - (look.outer_edge + 1.0) / 2) / look.edge_width) ** 2))
    texture = 1.0 + look.rim_texture * np.cos(u * look.rim_frequency)
    on_rim = (u >= look.inner)[..., None]
    if look.style == "backlit":
        transmit = np.clip(look.lip_level * texture * (1.0 - look.edge_inner * edge_i - look.edge_outer * edge_o),
                           0.01, None)
        through = look.opening_level * (1.0 - look.opening_glow * np.clip(u / look.inner, 0, 1) ** 4)
        rim = background * transmit[..., None] * look.glass_colour
        opening = background * through[..., None] * look.glass_colour
    else:
        reflect = look.lip_level * texture + look.edge_inner * edge_i + look.edge_outer * edge_o
        rim = ((1 - look.transparency) * reflect[..., None] + look.transparency * background) * look.glass_colour
        through = look.opening_level + look.opening_glow * np.exp(-((u / 0.4) ** 2))
        opening = through[..., None] * look.glass_colour
    glass = np.where(on_rim, rim, opening)
    # The specular highlight is the light's own colour (white), not the glass's.
    spec = look.highlight * np.exp(-(wrap(theta - look.highlight_angle) ** 2) / (2 * look.highlight_width**2))
    spec = spec * np.exp(-(((u - look.highlight_u) / look.highlight_du) ** 2))
    glass = glass + np.where((u > look.inner - 0.02) & (u <= 1.0), spec, 0)[..., None]
    alpha = np.clip((1.0 - u) * look.radius / 1.5 + 0.5, 0.0, 1.0)
    return Layers(r, theta, u, background.astype(np.float32), glass.astype(np.float32), alpha, opening)


def compose_look(background: np.ndarray, glass: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    image: np.ndarray = background * (1 - alpha[..., None]) + glass * alpha[..., None]
    return image


def look_noise(look: Look, shape: tuple[int, ...]) -> np.ndarray:
    """Sensor noise from the scene's own seed: the same with or without a defect."""
    noise: np.ndarray = np.random.default_rng(look.noise_seed).normal(0.0, look.noise_sigma, shape)
    return noise.astype(np.float32)


def finish_look(image: np.ndarray, look: Look, noise: np.ndarray) -> np.ndarray:
    """Optics and sensor: lighting level and vignetting, blur, noise, 8 bits, then JPEG re-encoding."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    falloff = ((xx - look.vignette_cx) ** 2 + (yy - look.vignette_cy) ** 2) / (size * size / 2)
    image = image * (look.gain * np.clip(1.0 - look.vignette * falloff, 0.05, 1.0))[..., None]
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), look.blur_sigma) + noise
    out: np.ndarray = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    if look.jpeg_quality:
        ok, data = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, look.jpeg_quality])
        if not ok:
            raise RuntimeError("OpenCV could not JPEG-encode a synthetic image")
        out = np.asarray(cv2.imdecode(data, cv2.IMREAD_COLOR))
    return out


# -- trained defects ---------------------------------------------------------------------------------


def _chip_mask(rng: np.random.Generator, look: Look, layers: Layers, large: bool) -> tuple[np.ndarray, bool]:
    """Glass missing over an angular sector, from the outer edge inward (or, for a small chip, from
    the inner edge outward): V-shaped to flat-bottomed, with a jagged fracture. Also says which edge."""
    r, theta = layers.r, layers.theta
    from_inner = (not large) and rng.uniform() < INNER_CHIP_SHARE
    centre = rng.uniform(-np.pi, np.pi)
    half = np.deg2rad(rng.uniform(10.0, 35.0) if large else rng.uniform(1.5, 7.0))
    rim = look.radius * (1.0 - look.inner)
    depth = rim * (rng.uniform(0.6, 1.2) if large else rng.uniform(0.25, 0.65))
    d = wrap(theta - centre) / half
    knots = int(rng.integers(7, 14))
    jag = rng.uniform(0.15, 0.45)
    edge_jag = np.interp(d, np.linspace(-1.0, 1.0, knots), 1.0 + rng.uniform(-jag, jag, knots))
    side_jag = np.interp(r / look.radius, np.linspace(0.6, 1.0, 7), 1.0 + rng.uniform(-0.25, 0.25, 7))
    inside = np.abs(d) < side_jag
    power = rng.uniform(1.0, 4.0)  # 1: a V-shaped notch; 4: a flat-bottomed bite
    shape = np.sqrt(np.clip(1.0 - np.minimum(np.abs(d), 1.0) ** power, 0.0, 1.0))
    if from_inner:
        start = look.inner * look.radius
        mask: np.ndarray = inside & (r >= start * 0.995) & (r <= start + depth * shape * edge_jag)
    else:
        reach = look.radius * 1.005 - depth * shape * edge_jag
        mask = inside & (r >= reach) & (r <= look.radius * 1.01)
    return mask, from_inner


def _blob(mask: np.ndarray, rng: np.random.Generator, x: float, y: float, radius: float) -> None:
    k = int(rng.integers(6, 13))
    a = np.sort(rng.uniform(0, 2 * np.pi, k))
    rr = radius * rng.uniform(0.5, 1.0, k)
    poly = np.stack([x + rr * np.cos(a), y + rr * np.sin(a)], axis=1)
    cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 255)


def _contamination_mask(rng: np.random.Generator, look: Look, layers: Layers, size: int) -> np.ndarray:
    """Foreign matter anywhere in the mouth, opening or rim: blobs of any size, a fibre, a cluster of
    specks or a broad smear. Only what lies on the bottle is marked (dirt on the belt is no defect)."""
    s = size / CANONICAL_SIZE
    mask = np.zeros((size, size), np.uint8)
    kind = ("blobs", "fibre", "specks", "smear")[int(rng.choice(4, p=[0.4, 0.2, 0.2, 0.2]))]

    def spot() -> tuple[float, float]:
        angle = rng.uniform(0, 2 * np.pi)
        dist = np.sqrt(rng.uniform()) * (look.outer_edge - 0.02) * look.radius  # uniform over the area
        return look.cx + dist * np.cos(angle), look.cy + dist * np.sin(angle)

    if kind == "blobs":
        for _ in range(int(rng.integers(1, 6))):
            x, y = spot()
            _blob(mask, rng, x, y, float(np.exp(rng.uniform(np.log(3.0), np.log(45.0)))) * s)
    elif kind == "fibre":
        x, y = spot()
        heading = rng.uniform(0, 2 * np.pi)
        pts = []
        for _ in range(int(rng.integers(6, 17))):
            pts.append((x, y))
            heading += rng.normal(0, 0.5)
            step = rng.uniform(8, 20) * s
            x, y = x + step * np.cos(heading), y + step * np.sin(heading)
        thickness = max(1, round(rng.uniform(1.5, 6.0) * s))
        cv2.polylines(mask, [np.round(np.array(pts)).astype(np.int32)], False, 255, thickness=thickness)
    elif kind == "specks":
        x0, y0 = spot()
        spread = rng.uniform(20, 70) * s
        for _ in range(int(rng.integers(5, 26))):
            _blob(mask, rng, x0 + rng.normal(0, spread / 2), y0 + rng.normal(0, spread / 2),
                  rng.uniform(1.5, 4.0) * s)
    else:
        x, y = spot()
        _blob(mask, rng, x, y, rng.uniform(30, 80) * s)
    out: np.ndarray = (mask > 0) & (layers.u <= 0.98)
    return out


def _soil(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, look: Look) -> np.ndarray:
    """Foreign matter over ``mask``: dark, bright or coloured by what it lies on, with a texture."""
    under = float((image[mask] @ _LUMA).mean()) if mask.any() else 0.0
    # Matter must contrast with what it lies on (a speck the eye cannot see is no defect to label):
    # dark on bright glass or light, bright on a dark rim or opening.
    dark = rng.uniform() < (0.85 if under > 0.3 else 0.25)
    texture = 1.0 + rng.uniform(0.0, 0.35) * smooth_field(rng, image.shape[0], max(8, image.shape[0] // 8))
    out = image.copy()
    if dark:
        tone = rng.uniform(0.06, 0.45) * np.ones(3, np.float32)
        if rng.uniform() < 0.3:  # rust, soil, mould: a hue of its own
            tone = tone * rng.uniform(0.4, 1.0, 3).astype(np.float32)
        out[mask] = out[mask] * np.clip(tone[None, :] * texture[mask][:, None], 0.0, 1.0)
    else:
        tone = rng.uniform(0.2, 0.45) * (rng.uniform(0.6, 1.0, 3) if rng.uniform() < 0.4 else np.ones(3))
        out[mask] = out[mask] + (tone[None, :] * texture[mask][:, None]).astype(np.float32)
    return out


def render_look(rng: np.random.Generator, style: str, defect: str | None, size: int) -> tuple[
    np.ndarray, np.ndarray | None
]:
    """A dome or backlit bottle (BGR uint8) and, for a defect, its uint8 0/255 mask."""
    look = draw_look(rng, style, size)
    layers = look_layers(look, size)
    glass, alpha = layers.glass, layers.alpha
    mask: np.ndarray | None = None
    if defect in ("broken_large", "broken_small"):
        mask, from_inner = _chip_mask(rng, look, layers, defect == "broken_large")
        if from_inner and layers.opening is not None:
            glass = np.where(mask[..., None], layers.opening, glass)  # seen through the gap: the bottle's inside
        else:
            alpha = np.where(mask, 0.0, alpha)  # seen through the gap: the belt, or the backlight
        k = 2 * int(rng.integers(2, 5)) + 1
        seam = (cv2.dilate(mask.astype(np.uint8), np.ones((k, k), np.uint8)) > 0) & ~mask & (layers.u <= 1.0)
        # The fracture's faces: they catch a dome's light, and turn a backlight's away.
        lit = glass * look.seam if style == "backlit" else glass + look.seam
        glass = np.where(seam[..., None], lit, glass)
    image = compose_look(layers.background, glass, alpha)
    if defect == "contamination":
        soiled = _contamination_mask(rng, look, layers, size)
        for _ in range(4):  # a fibre can wander off the bottle: redrawn, as nothing on it is no defect
            if soiled.sum() >= 9:
                break
            soiled = _contamination_mask(rng, look, layers, size)
        image = _soil(rng, image, soiled, look)
        mask = soiled
    out = finish_look(image, look, look_noise(look, image.shape))
    return out, (mask.astype(np.uint8) * 255 if mask is not None else None)


def render_look_novel(rng: np.random.Generator, style: str, kind: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A dome or backlit bottle with a novel defect of ``kind`` and its mask (see render_novel_on)."""
    look = draw_look(rng, style, size)
    layers = look_layers(look, size)
    clean = compose_look(layers.background, layers.glass, layers.alpha)
    noise = look_noise(look, clean.shape)
    return render_novel_on(rng, kind, look, layers, clean, lambda image: finish_look(image, look, noise))
