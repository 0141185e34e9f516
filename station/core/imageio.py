"""Reading image files into BGR arrays, with a specific reason for each failure."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from station.errors import FrameError

UNREADABLE = "unreadable_image"


def read_image(path: Path) -> np.ndarray:
    """Decode ``path`` as stored (any depth, any channel count).

    Raises FrameError(``unreadable_image``) naming the cause; conversion to the
    canonical 8-bit BGR view is preprocess's job, so that every source gets the
    same rules.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FrameError(UNREADABLE, f"{path}: cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise FrameError(UNREADABLE, f"{path}: file is empty")
    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FrameError(UNREADABLE, f"{path}: not a decodable image ({len(data)} bytes)")
    return np.asarray(image)
