"""`station perturb`: copy an image folder as a drifted line would show it.

A line drifts: the camera mount moves (bottles off centre), the bottle sits
higher or lower (a different scale), the lamp ages (gain), the camera's
settings change (gamma), a gateway recompresses (JPEG). The tool copies a
folder, MVTec layout or any other, applying such a drift to every image, so
that the models can be measured on it and the station's drift watch tested.

- Each image gets its own parameters from a generator seeded by (``--seed``,
  the image's path in the folder): the same command gives the same files, and
  adding or removing an image changes no other.
- A mask (``ground_truth/<class>/<name>_mask.png``) gets the geometric part of
  its image's transform, nearest-neighbour, so it still covers the defect.
- Exposed borders repeat the image's edge pixels (the background), never black
  bars, which the mouth finder or the models could take for something.
- Files keep their names and formats; a ``.png`` re-encoded with ``--jpeg``
  carries the JPEG artifacts in a lossless file. Files that are not images,
  or not decodable, are copied unchanged (replay must still see them).
- ``OUT/.perturb.json`` records the settings and every image's parameters
  (hidden: replay skips it).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from station.core.folders import IMAGE_SUFFIXES
from station.errors import ConfigError, DatasetError

RECORD = ".perturb.json"
GROUND_TRUTH = "ground_truth"
MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class PerturbSpec:
    seed: int = 0
    #: off centre by up to this fraction of the image's shorter side, uniform over the disc
    offset: float = 0.0
    #: every image off centre by exactly this fraction, towards ``offset_angle``; None: ``offset`` applies
    offset_fixed: float | None = None
    #: degrees, image coordinates (0: to the right, 90: down)
    offset_angle: float = 0.0
    scale: float = 0.0  # ×(1 ± scale) about the image centre
    gain: float = 0.0  # intensities ×(1 ± gain)
    gamma: float = 0.0  # intensities^(1 ± gamma)
    jpeg: int | None = None  # re-encode at this JPEG quality

    def validate(self) -> None:
        checks: list[tuple[str, float, float, float]] = [
            ("--offset", self.offset, 0.0, 0.5), ("--scale", self.scale, 0.0, 0.5),
            ("--gain", self.gain, 0.0, 0.99), ("--gamma", self.gamma, 0.0, 0.99),
        ]
        if self.offset_fixed is not None:
            checks.append(("--offset-fixed", self.offset_fixed, 0.0, 0.5))
        for name, value, lo, hi in checks:
            if not (lo <= value <= hi) or math.isnan(value):
                raise ConfigError(f"{name} {value:g} is outside {lo:g}…{hi:g}")
        if self.offset_fixed is not None and self.offset > 0:
            raise ConfigError("--offset (random up to F) and --offset-fixed (exactly F) exclude each other")
        if self.jpeg is not None and not 1 <= self.jpeg <= 100:
            raise ConfigError(f"--jpeg {self.jpeg} is outside 1…100")


@dataclass(frozen=True)
class ImageDrift:
    """One image's draw: where it moved (fractions of the shorter side), and how it changed."""

    dx: float
    dy: float
    scale: float
    gain: float
    gamma: float


def draw(spec: PerturbSpec, key: str) -> ImageDrift:
    """The parameters of the image with ``key`` (its path below the root, no suffix), seeded by both."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    # Every value is drawn whatever is switched on, so turning one knob never moves another's draw.
    u = np.random.default_rng([spec.seed, digest]).uniform(size=5)
    if spec.offset_fixed is not None:
        radius, angle = spec.offset_fixed, math.radians(spec.offset_angle)
    else:
        radius, angle = spec.offset * math.sqrt(u[0]), 2 * math.pi * u[1]  # uniform over the disc
    return ImageDrift(
        dx=radius * math.cos(angle),
        dy=radius * math.sin(angle),
        scale=1.0 + spec.scale * (2 * u[2] - 1),
        gain=1.0 + spec.gain * (2 * u[3] - 1),
        gamma=1.0 + spec.gamma * (2 * u[4] - 1),
    )


def _matrix(d: ImageDrift, shape: tuple[int, ...]) -> np.ndarray:
    h, w = shape[:2]
    side = min(h, w)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return np.array([[d.scale, 0.0, (1 - d.scale) * cx + d.dx * side],
                     [0.0, d.scale, (1 - d.scale) * cy + d.dy * side]], dtype=np.float64)


def apply_image(image: np.ndarray, d: ImageDrift, jpeg: int | None, name: str) -> np.ndarray:
    """Geometry, then lamp gain, then gamma, then JPEG; the dtype and channels are kept."""
    if image.dtype not in (np.uint8, np.uint16):
        raise DatasetError(f"{name}: pixel type {image.dtype} is not 8- or 16-bit")
    h, w = image.shape[:2]
    # Replicated edges: the exposed border continues the background instead of a black bar.
    moved = cv2.warpAffine(image, _matrix(d, image.shape), (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
    top = float(np.iinfo(image.dtype).max)
    colour = moved[..., :3] if moved.ndim == 3 else moved  # an alpha channel is not light
    f = np.clip(colour.astype(np.float32) / top * d.gain, 0.0, 1.0) ** d.gamma
    out = moved.copy()
    if out.ndim == 3:
        out[..., :3] = np.round(f * top).astype(image.dtype)
    else:
        out = np.round(f * top).astype(image.dtype)
    if jpeg is not None:
        if out.dtype != np.uint8:
            raise DatasetError(f"{name}: --jpeg needs 8-bit images, this one is {out.dtype}")
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, jpeg])
        if not ok:
            raise DatasetError(f"{name}: JPEG encoding failed")
        flags = cv2.IMREAD_GRAYSCALE if out.ndim == 2 else cv2.IMREAD_COLOR
        decoded = cv2.imdecode(buf, flags)
        if decoded is None:
            raise DatasetError(f"{name}: JPEG decoding failed")
        if out.ndim == 3 and out.shape[2] == 4:  # JPEG has no alpha: keep the original's
            decoded = np.dstack([decoded, out[..., 3]])
        out = np.asarray(decoded)
    return np.asarray(out)


def apply_mask(mask: np.ndarray, d: ImageDrift) -> np.ndarray:
    """The image's geometry, nearest-neighbour; what moves in from outside is no defect (0)."""
    h, w = mask.shape[:2]
    return np.asarray(cv2.warpAffine(mask, _matrix(d, mask.shape), (w, h), flags=cv2.INTER_NEAREST,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=0))


def image_key(rel: Path) -> str:
    """The key an image's parameters are drawn under; a mask gets its image's key."""
    parts = list(rel.with_suffix("").parts)
    if parts and parts[0] == GROUND_TRUTH and parts[-1].endswith(MASK_SUFFIX):
        parts[0] = "test"
        parts[-1] = parts[-1][: -len(MASK_SUFFIX)]
    return "/".join(parts)


def _is_mask(rel: Path) -> bool:
    return bool(rel.parts) and rel.parts[0] == GROUND_TRUTH and rel.stem.endswith(MASK_SUFFIX)


@dataclass
class PerturbSummary:
    images: int
    masks: int
    copied: int  # not images, or not decodable: copied as they were


def perturb_folder(src: Path, out: Path, spec: PerturbSpec,
                   progress: Callable[[int, int], None] | None = None) -> PerturbSummary:
    spec.validate()
    if not src.is_dir():
        raise DatasetError(f"--data {src} does not exist or is not a folder")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new folder")
    if out.resolve().is_relative_to(src.resolve()):
        raise ConfigError(f"--out {out} is inside --data {src}")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    record: dict[str, Any] = {"settings": asdict(spec), "source": str(src.resolve()), "files": {}}
    summary = PerturbSummary(0, 0, 0)
    for done, path in enumerate(files, start=1):
        rel = path.relative_to(src)
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        image = None
        if path.suffix.lower() in IMAGE_SUFFIXES:
            image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None:
            shutil.copy2(path, target)
            summary.copied += 1
        else:
            d = draw(spec, image_key(rel))
            if _is_mask(rel):
                result, summary.masks = apply_mask(image, d), summary.masks + 1
            else:
                result, summary.images = apply_image(image, d, spec.jpeg, str(rel)), summary.images + 1
                record["files"][rel.as_posix()] = {k: round(v, 6) for k, v in asdict(d).items()}
            ok, buf = cv2.imencode(path.suffix, result)
            if not ok:
                raise DatasetError(f"{target}: cannot encode as {path.suffix}")
            try:
                target.write_bytes(buf.tobytes())
            except OSError as exc:
                raise DatasetError(f"cannot write {target}: {exc.strerror or exc}") from exc
        if progress:
            progress(done, len(files))
    (out / RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return summary
