"""What every renderer style of ``station synth`` shares: the mouth's geometry, layers and drawing helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

CANONICAL_SIZE = 900

# Glass tints (B, G, R gains): clear/grey, green, amber/brown.
TINTS = np.array([[0.92, 0.95, 0.95], [0.55, 0.85, 0.50], [0.30, 0.55, 0.85]], dtype=np.float32)

# Radial layout of the ring style's mouth, as fractions of the outer radius (other styles draw their own).
INNER = 0.70  # the opening ends and the inner rim edge begins
RIM_TOP = 0.78  # the flat top of the rim begins
OUTER_EDGE = 0.93  # the rounded outer edge begins
#: the share of small chips that bite out from the inner edge rather than in from the outer one (every style)
INNER_CHIP_SHARE = 0.3


class SceneLike(Protocol):
    """What defect drawers need to know of a scene, whatever style drew it."""

    @property
    def cx(self) -> float: ...
    @property
    def cy(self) -> float: ...
    @property
    def radius(self) -> float: ...
    @property
    def tint(self) -> np.ndarray: ...
    @property
    def inner(self) -> float: ...
    @property
    def rim_top(self) -> float: ...
    @property
    def outer_edge(self) -> float: ...


@dataclass(frozen=True)
class Layers:
    """The defect-free bottle before compositing: polar coordinates and the layers.

    The ring style keeps gray ``background`` and ``glass`` (tinted when composed); the other styles
    make them BGR, with ``opening``: what is seen through glass missing at the inner edge.
    """

    r: np.ndarray
    theta: np.ndarray
    u: np.ndarray
    background: np.ndarray
    glass: np.ndarray
    alpha: np.ndarray
    opening: np.ndarray | None = None


def wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def lines_coverage(polylines: list[np.ndarray], size: int, thickness: int) -> np.ndarray:
    """Anti-aliased coverage (0–1) of polylines, drawn with sub-pixel precision."""
    canvas = np.zeros((size, size), np.uint8)
    shift = 4  # cv2's fixed-point bits: without them a curve is snapped to whole pixels
    pts = [np.round(line * (1 << shift)).astype(np.int32) for line in polylines]
    cv2.polylines(canvas, pts, False, 255, thickness=thickness, lineType=cv2.LINE_AA, shift=shift)
    coverage: np.ndarray = canvas.astype(np.float32) / 255.0
    return coverage


def window(x: float, y: float, half: float, size: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The pixels within ``half`` of (x, y): their slices and coordinates (a defect is small; the frame is not)."""
    x0, x1 = max(0, int(x - half)), min(size, int(x + half) + 2)
    y0, y1 = max(0, int(y - half)), min(size, int(y + half) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return (slice(y0, y1), slice(x0, x1)), xx, yy


def blob_coverage(size: int, x: float, y: float, diameter: float, aspect: float,
                  orientation: float, rng: np.random.Generator, softness: float) -> np.ndarray:
    """A soft-edged irregular ellipse: 1 inside, falling to 0 over ``softness`` of its radius."""
    coverage = np.zeros((size, size), np.float32)
    # The wobble reaches 1.36 × the radius, the soft edge another softness / 2 of it.
    win, xx, yy = window(x, y, diameter / 2 * (1.4 + softness), size)
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
    coverage[win] = t * t * (3 - 2 * t)  # smoothstep: no hard edge
    return coverage


def smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field in −1…1 over the frame: ``cells`` × ``cells`` random values, upsampled."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    field: np.ndarray = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    out: np.ndarray = np.clip(field, -1.0, 1.0)
    return out
