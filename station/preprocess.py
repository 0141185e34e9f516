"""THE preprocessing function, shared by training, calibration, evaluation and serving.

A mismatch between training and serving preprocessing is the most common
silent failure of deployed vision models, so there is exactly one path from a
decoded image to the tensors each model sees, and its parameters live in the
bundle manifest.

Rules for images that are not 8-bit BGR (documented in docs/preprocessing.md):
- grayscale → replicated to 3 channels; BGRA → alpha dropped;
- 16-bit → scaled to 8 bit (value >> 8); float images are refused;
- non-square → centre crop to the shorter side (the canonical view is square);
- smaller than ``MIN_SIDE`` pixels → refused (``image_too_small``).
The square crop stands for the canonical 900×900 view: each model's input is
resized from it directly, which is what resizing the 900×900 view would give,
with one resampling instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from station.errors import FrameError

MIN_SIDE = 64

INTERPOLATIONS: dict[str, int] = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


@dataclass(frozen=True)
class InputSpec:
    """How one model's input tensor is made from the canonical view."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "area"


@dataclass(frozen=True)
class PreprocessSpec:
    canonical_size: int
    classifier: InputSpec
    autoencoder: InputSpec


@dataclass
class ModelInputs:
    """Float32 NCHW tensors (batch of one), RGB, normalised per the spec."""

    classifier: np.ndarray
    autoencoder: np.ndarray
    roi: tuple[int, int, int]  # x, y, side of the square crop in the source image


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


def model_input(roi_bgr: np.ndarray, spec: InputSpec) -> np.ndarray:
    interp = INTERPOLATIONS[spec.interpolation]
    resized = cv2.resize(roi_bgr, (spec.size, spec.size), interpolation=interp)
    rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB).astype(np.float32)
    rgb *= 1.0 / 255.0
    rgb -= np.asarray(spec.mean, dtype=np.float32)
    rgb /= np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)[None])


def preprocess(image: np.ndarray, spec: PreprocessSpec) -> ModelInputs:
    """Decoded image (any supported format) → the input tensor of each model."""
    bgr = to_bgr8(image)
    x, y, side = square_roi(bgr)
    roi = bgr[y : y + side, x : x + side]
    return ModelInputs(
        classifier=model_input(roi, spec.classifier),
        autoencoder=model_input(roi, spec.autoencoder),
        roi=(x, y, side),
    )
