"""Archive images for the browser: the full canonical view, or a small thumbnail for the gallery.

A gallery of sixty 900×900 JPEGs is ten megabytes; thumbnails are made once
per image and kept in a small LRU, so a phone on the plant Wi-Fi can page
through rejects.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

THUMB_PX = 240
CACHE_ENTRIES = 600


class Thumbnails:
    def __init__(self, size: int = THUMB_PX, entries: int = CACHE_ENTRIES) -> None:
        self.size = size
        self.entries = entries
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def get(self, path: Path) -> bytes | None:
        """A JPEG thumbnail of ``path`` (already resolved inside the archive), None if it cannot be read."""
        try:
            key = (str(path), path.stat().st_mtime_ns)
        except OSError:
            return None
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            return None
        scale = self.size / max(image.shape[:2])
        small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
        ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])
        if not ok:
            return None
        data = np.asarray(buf).tobytes()
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.entries:
                self._cache.popitem(last=False)
        return data
