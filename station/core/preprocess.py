"""THE preprocessing function, shared by training, calibration, evaluation and serving.

A mismatch between training and serving preprocessing is the most common
silent failure of deployed vision models, so there is exactly one path from a
decoded image to the tensors each model sees, and its parameters live in the
bundle manifest. The rules are documented in docs/preprocessing.md:

1. Any decoded image → 8-bit BGR (gray replicated, alpha dropped, 16-bit
   scaled; float refused); the canonical view is its centred square.
2. Locate the bottle mouth: the outer rim circle (Otsu threshold of a
   downscaled gray view, largest blob, its enclosing circle). Front lighting
   (ring or dome light above) makes the lip the bright blob, back lighting
   (a panel below) the dark one; ``lighting: auto`` tells them apart per frame.
3. Unwrap the mouth to polar coordinates around that centre, out to
   ``radius_margin`` × the rim radius: rows are angles, columns radii. A
   rotated bottle is then a circular shift of rows, a differently sized or
   placed bottle the same picture, and rim chips and specks stay large
   enough to see in a small tensor.
4. Per model: RGB, scale to [0, 1], subtract mean, divide by std, NCHW.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from station.errors import FrameError

MIN_SIDE = 64
#: the polar view reaches this multiple of the located rim radius (what `station train` records as
#: view.radius_margin; a bundle is always served with its own)
RADIUS_MARGIN = 1.08
_LOCATE_SIDE = 225  # the gray view the mouth is located in (4× below canonical 900)
NO_BOTTLE = "no_bottle_found"


@dataclass(frozen=True)
class Normalisation:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


Sampling = Literal["area", "area-block"]
#: "front": light from above (ring or dome), a bright lip on a darker background; "back": light from
#: below, a dark rim on a bright background (and a bright opening); "auto": decided per frame
Lighting = Literal["front", "back", "auto"]
LIGHTINGS: tuple[Lighting, ...] = ("front", "back", "auto")


@dataclass(frozen=True)
class PreprocessSpec:
    canonical_size: int
    angle_bins: int  # polar rows
    radius_bins: int  # polar columns, from the centre out to radius_margin × rim radius
    radius_margin: float
    min_radius_fraction: float  # a located rim radius outside these fractions of the square's
    max_radius_fraction: float  # side is no bottle mouth: the frame fails with no_bottle_found
    classifier: Normalisation
    autoencoder: Normalisation
    #: "area-block": the mouth located on every 4th pixel, the polar view read bilinearly from
    #: whole-block averages. "area": the earlier, slower sampling (fractional INTER_AREA,
    #: cv2.warpPolar), kept so a bundle trained with it is served with it: an autoencoder scores
    #: good bottles higher on the sampling it was not trained on, enough to cross its threshold
    #: (docs/preprocessing.md has both samplings, their cost and the figures).
    sampling: Sampling = "area-block"
    #: how the mouth is lit (Lighting); bundles from before there was a choice are "front"
    lighting: Lighting = "front"


@dataclass(frozen=True)
class Mouth:
    """The located rim circle in canonical-view pixels."""

    cx: float
    cy: float
    radius: float
    #: the lighting it was located under: "front" or "back" (what "auto" decided)
    lighting: Lighting = "front"


@dataclass
class ModelInputs:
    """Float32 NCHW tensors (batch of one), RGB polar view, normalised per model."""

    classifier: np.ndarray
    autoencoder: np.ndarray
    mouth: Mouth
    roi: tuple[int, int, int]  # x, y, side of the square crop in the source image
    #: (angle_bins, radius_bins) polar samples outside the view (filled in, never scored); None: all seen
    unseen: np.ndarray | None = None


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """Bring any decoded image to 3-channel 8-bit BGR, or refuse it with a reason."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise FrameError("unsupported_image", f"pixel type {image.dtype} is not 8- or 16-bit integer")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise FrameError("unsupported_image", f"image shape {image.shape} is not gray, BGR or BGRA")


def square_roi(image: np.ndarray) -> tuple[int, int, int]:
    """Centre square crop (x, y, side): the region that becomes the canonical view."""
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise FrameError("image_too_small", f"image is {w}×{h}, smaller than {MIN_SIDE} px")
    side = min(h, w)
    return (w - side) // 2, (h - side) // 2, side


def canonical_view(image: np.ndarray, canonical_size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Decoded image → canonical square BGR view (canonical_size²) and the crop it came from."""
    bgr = to_bgr8(image)
    x, y, side = square_roi(bgr)
    roi = bgr[y : y + side, x : x + side]
    if side != canonical_size:
        interp = cv2.INTER_AREA if side > canonical_size else cv2.INTER_LINEAR
        roi = cv2.resize(roi, (canonical_size, canonical_size), interpolation=interp)
    return roi, (x, y, side)


def _fitted_circle(points: np.ndarray) -> tuple[float, float, float]:
    """The least-squares circle (cx, cy, r) through (n, 2) points (Kåsa's algebraic fit)."""
    x, y = points[:, 0], points[:, 1]
    (a, b, c), *_ = np.linalg.lstsq(np.column_stack([x, y, np.ones_like(x)]), x * x + y * y, rcond=None)
    cx, cy = a / 2, b / 2
    return float(cx), float(cy), float(np.sqrt(max(c + cx * cx + cy * cy, 0.0)))


def _cut_rim_circle(contour: np.ndarray, side: int) -> tuple[float, float, float] | None:
    """The rim's circle from the part of its outline the frame holds, or None if too little of it.

    The enclosing circle of a blob the frame's edge cuts off is the cut blob's, smaller and pulled
    inwards, so the polar view would unwrap the wrong circle. A circle fitted to the outline off the
    edge is the rim's. Points well inside the fit (a missing piece of rim) are dropped and the circle
    fitted again, so a chip does not pull it in either.
    """
    points = contour.reshape(-1, 2).astype(np.float64)
    points = points[((points > 0) & (points < side - 1)).all(axis=1)]
    for _ in range(3):
        if len(points) < 12:
            return None
        cx, cy, r = _fitted_circle(points)
        distance = np.hypot(points[:, 0] - cx, points[:, 1] - cy)
        outer = distance > r - max(2.0, 0.02 * r)
        if outer.all():
            break
        points = points[outer]
    return cx, cy, r


def _rim_circle(mask: np.ndarray) -> tuple[float, float, float] | None:
    """The enclosing circle (cx, cy, r) of the largest blob of ``mask``, after closing small gaps;
    for a blob the frame's edge cuts, the circle fitted to the rest of its outline."""
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    side = mask.shape[0]
    if largest.min() <= 0 or largest.max() >= side - 1:
        cut = _cut_rim_circle(largest, side)
        if cut is not None:
            return cut
    (cx, cy), r = cv2.minEnclosingCircle(largest)
    return float(cx), float(cy), float(r)


def _border_is_bright(bright: np.ndarray) -> bool:
    """Whether most of the frame's outermost pixels are on the bright side of the threshold.

    The border is background in any usable frame (the mouth is at most 0.6 × the view wide and
    centred): bright there means light from below. Counting 4 × 225 pixels costs microseconds.
    """
    n = bright.shape[0]
    border = (np.count_nonzero(bright[0]) + np.count_nonzero(bright[-1]) + np.count_nonzero(bright[1:-1, 0])
              + np.count_nonzero(bright[1:-1, -1]))
    return bool(2 * border > 4 * n - 4)


_BLOB = {"front": "bright lip on a dark background", "back": "dark rim on a bright background"}


def locate_mouth(view: np.ndarray, spec: PreprocessSpec) -> Mouth:
    """The rim's enclosing circle: robust to a missing piece of rim and to specks inside.

    One Otsu threshold splits the small gray view into bright and dark; the mouth is the largest
    bright blob under front lighting, the largest dark one under back lighting (its outer contour is
    the rim's, whatever the opening inside looks like). ``auto`` tries first the polarity the frame's
    border suggests (bright border: backlit), then the other if that gives no plausible rim.
    """
    size = view.shape[0]
    scale = size / _LOCATE_SIDE
    if spec.sampling == "area":
        gray = cv2.resize(cv2.cvtColor(view, cv2.COLOR_BGR2GRAY), (_LOCATE_SIDE, _LOCATE_SIDE),
                          interpolation=cv2.INTER_AREA)
        offset = (scale - 1) / 2  # pixel i of the small view is the mean of a block centred there
    else:
        # Every 4th pixel, then blurred: the rim is hundreds of pixels across, so sampling instead
        # of averaging loses nothing the blur does not restore, and reads a sixteenth of the view
        # (averaging all of it was most of the cost of locating the mouth: docs/performance.md).
        gray = cv2.cvtColor(cv2.resize(view, (_LOCATE_SIDE, _LOCATE_SIDE), interpolation=cv2.INTER_NEAREST),
                            cv2.COLOR_BGR2GRAY)
        offset = 0.0  # INTER_NEAREST reads source pixel scale·i for pixel i
    gray = cv2.GaussianBlur(gray, (5, 5), 0)
    _, bright = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    backlit_border = _border_is_bright(bright)
    tries: tuple[Lighting, ...]
    if spec.lighting == "auto":
        tries = ("back", "front") if backlit_border else ("front", "back")
    else:
        tries = (spec.lighting,)
    lo, hi = spec.min_radius_fraction * size, spec.max_radius_fraction * size
    found: list[tuple[Lighting, float | None]] = []
    for lighting in tries:
        circle = _rim_circle(bright if lighting == "front" else cv2.bitwise_not(bright))
        if circle is not None and lo <= circle[2] * scale <= hi:
            cx, cy, r = circle
            return Mouth(cx * scale + offset, cy * scale + offset, r * scale, lighting)
        found.append((lighting, None if circle is None else circle[2] * scale))
    other_fits = False
    if spec.lighting != "auto":  # the error path only: would the other lighting have found a mouth?
        other = _rim_circle(cv2.bitwise_not(bright) if spec.lighting == "front" else bright)
        other_fits = other is not None and lo <= other[2] * scale <= hi
    raise FrameError(NO_BOTTLE, _no_mouth(found, lo, hi, size, spec.lighting, other_fits))


def _no_mouth(found: list[tuple[Lighting, float | None]], lo: float, hi: float, size: int, wanted: Lighting,
              other_fits: bool) -> str:
    """Why no mouth was found, in the terms of the view's lighting setting."""
    expected = f"the expected {lo:.0f}–{hi:.0f} px of the {size} px view"
    if wanted == "auto":
        parts = [f"as a {_BLOB[lighting]}, " + ("no blob" if r is None else f"rim radius {r:.0f} px")
                 for lighting, r in found]
        return f"no bottle mouth under either lighting ({'; '.join(parts)}; expected {lo:.0f}–{hi:.0f} px " \
               f"of the {size} px view)"
    lighting, radius = found[0]
    if radius is None:
        detail = ("no bright bottle mouth against the background" if lighting == "front"
                  else "no dark bottle rim against a bright background")
    else:
        detail = f"located rim radius {radius:.0f} px is outside {expected}"
    if other_fits:
        # The commonest cause: a frame lit the other way than the bundle was trained for.
        other = "a backlit frame (bright background)" if lighting == "front" else "a front-lit frame (dark background)"
        detail += f"; it looks like {other}, and view.lighting is {lighting}"
    return detail


@functools.lru_cache(maxsize=8)
def _polar_rays(angle_bins: int, radius_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(angle_bins, radius_bins) x and y offsets of each polar sample for a unit outer radius.

    Row i is the angle 2π·i/angle_bins and column j the radius j/radius_bins, as
    cv2.warpPolar samples them; kept once per shape, so a frame only scales and shifts them.
    """
    angles = np.arange(angle_bins, dtype=np.float64)[:, None] * (2 * np.pi / angle_bins)
    radii = np.arange(radius_bins, dtype=np.float64)[None, :] / radius_bins
    dx, dy = (np.cos(angles) * radii).astype(np.float32), (np.sin(angles) * radii).astype(np.float32)
    dx.setflags(write=False)
    dy.setflags(write=False)
    return dx, dy


def _block(outer: float, spec: PreprocessSpec) -> int:
    """The side k of the blocks the square around a mouth of ``outer`` radius is averaged in.

    Rounded up: the averaging must span a whole bin, or the noise of the glass aliases into the
    view (rounded down, good bottles' anomaly scores grew a tail that defects start at).
    """
    return max(1, int(np.ceil(outer / spec.radius_bins)))


def polar_view(view: np.ndarray, mouth: Mouth, spec: PreprocessSpec) -> np.ndarray:
    """(angle_bins, radius_bins, 3) BGR uint8 unwrapping of the mouth.

    The square around the mouth is first shrunk by the whole factor that
    leaves at most one pixel per radius bin, averaging each k × k block
    (INTER_AREA at an integer factor, OpenCV's fast path), so the polar samples
    do not alias; then each sample is read bilinearly at its precomputed
    offset (cv2.remap). Only the square around the mouth is touched
    (2.8 → 1.5 ms per frame here against the "area" sampling, whose fractional
    INTER_AREA shrink is OpenCV's slow path and whose cv2.warpPolar rebuilds its
    sampling map each call).
    """
    if spec.sampling == "area":
        return _polar_view_area(view, mouth, spec)
    outer = mouth.radius * spec.radius_margin
    k = _block(outer, spec)
    size_y, size_x = view.shape[:2]
    x0 = max(0, int(np.floor(mouth.cx - outer)) - k)
    y0 = max(0, int(np.floor(mouth.cy - outer)) - k)
    x1 = min(size_x, int(np.ceil(mouth.cx + outer)) + k + 1)
    y1 = min(size_y, int(np.ceil(mouth.cy + outer)) + k + 1)
    # Whole blocks only; where the square meets the image's edge this drops under k pixels there,
    # which then read as outside the image (black), as the rest of the outside does.
    w, h = (x1 - x0) // k * k, (y1 - y0) // k * k
    crop = view[y0 : y0 + h, x0 : x0 + w]
    small = cv2.resize(crop, (w // k, h // k), interpolation=cv2.INTER_AREA) if k > 1 else crop
    dx, dy = _polar_rays(spec.angle_bins, spec.radius_bins)
    r = np.float32(outer / k)
    map_x = dx * r + np.float32((mouth.cx - x0 + 0.5) / k - 0.5)
    map_y = dy * r + np.float32((mouth.cy - y0 + 0.5) / k - 0.5)
    return np.asarray(cv2.remap(small, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                borderValue=(0, 0, 0)))


def _polar_view_area(view: np.ndarray, mouth: Mouth, spec: PreprocessSpec) -> np.ndarray:
    """The "area" sampling: the square shrunk so one radius bin is one pixel, then cv2.warpPolar."""
    outer = mouth.radius * spec.radius_margin
    f = spec.radius_bins / outer
    size = view.shape[0]
    x0 = max(0, int(np.floor(mouth.cx - outer)) - 1)
    y0 = max(0, int(np.floor(mouth.cy - outer)) - 1)
    x1 = min(size, int(np.ceil(mouth.cx + outer)) + 2)
    y1 = min(size, int(np.ceil(mouth.cy + outer)) + 2)
    crop = view[y0:y1, x0:x1]
    small_w = max(1, round((x1 - x0) * f))
    small_h = max(1, round((y1 - y0) * f))
    small = cv2.resize(crop, (small_w, small_h), interpolation=cv2.INTER_AREA)
    fx, fy = small_w / (x1 - x0), small_h / (y1 - y0)
    centre = ((mouth.cx - x0 + 0.5) * fx - 0.5, (mouth.cy - y0 + 0.5) * fy - 0.5)
    polar = cv2.warpPolar(
        small, (spec.radius_bins, spec.angle_bins), centre, outer * (fx + fy) / 2,
        cv2.INTER_LINEAR + cv2.WARP_FILL_OUTLIERS,
    )
    return np.asarray(polar)


def unseen_samples(view_shape: tuple[int, ...], mouth: Mouth, spec: PreprocessSpec) -> np.ndarray | None:
    """(angle_bins, radius_bins) bool: the polar samples the camera did not see, or None when it saw all.

    A bottle off centre can take the mouth's surroundings, or the rim itself, past the frame's edge.
    What lies there reads as black (and as a blend with black for a block's width inside the edge), which
    on a bright background, a backlit line's, is an anomaly as large as a broken rim.
    """
    outer = mouth.radius * spec.radius_margin
    # The width the area-block shrink and the bilinear read blend across, and a pixel more.
    edge = 2 * _block(outer, spec) + 1
    h, w = view_shape[:2]
    if (mouth.cx - outer >= edge and mouth.cy - outer >= edge
            and mouth.cx + outer <= w - 1 - edge and mouth.cy + outer <= h - 1 - edge):
        return None
    dx, dy = _polar_rays(spec.angle_bins, spec.radius_bins)
    x, y = mouth.cx + dx * outer, mouth.cy + dy * outer
    unseen = (x < edge) | (y < edge) | (x > w - 1 - edge) | (y > h - 1 - edge)
    return unseen if unseen.any() else None


def fill_unseen(polar_bgr: np.ndarray, unseen: np.ndarray) -> np.ndarray:
    """Each unseen sample takes the median of the seen ones at its radius: what this mouth shows there."""
    filled = polar_bgr.copy()
    for j in np.flatnonzero(unseen.any(axis=0)):
        seen = ~unseen[:, j]
        if seen.any():
            filled[unseen[:, j], j] = np.median(polar_bgr[seen, j], axis=0)
    return filled


def normalise(polar_bgr: np.ndarray, norm: Normalisation) -> np.ndarray:
    """(1, 3, H, W) float32 RGB: (pixel / 255 − mean) / std, as one multiply-add per channel."""
    rgb = cv2.cvtColor(polar_bgr, cv2.COLOR_BGR2RGB).transpose(2, 0, 1).astype(np.float32, order="C")
    std = np.asarray(norm.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std)).reshape(3, 1, 1)
    offset = (-np.asarray(norm.mean, dtype=np.float32) / std).reshape(3, 1, 1)
    rgb *= scale
    rgb += offset
    return rgb[None]


def preprocess(image: np.ndarray, spec: PreprocessSpec) -> ModelInputs:
    """Decoded image (any supported format) → the input tensor of each model."""
    view, roi = canonical_view(image, spec.canonical_size)
    mouth = locate_mouth(view, spec)
    polar = polar_view(view, mouth, spec)
    unseen = unseen_samples(view.shape, mouth, spec)
    if unseen is not None:
        polar = fill_unseen(polar, unseen)
    return ModelInputs(
        classifier=normalise(polar, spec.classifier),
        autoencoder=normalise(polar, spec.autoencoder),
        mouth=mouth,
        roi=roi,
        unseen=unseen,
    )


def agreed_lighting(found: Iterable[Lighting]) -> Lighting:
    """The one lighting every frame was located under, or ``auto`` when they differ (or there are none)."""
    kinds = set(found)
    return kinds.pop() if len(kinds) == 1 else "auto"
