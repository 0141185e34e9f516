"""The reject archive: for each failed bottle, its image, an anomaly overlay and a JSON sidecar.

Written by its own thread from a bounded queue, so a slow disk delays the
archive, never a verdict; when the queue is full the entry is dropped and
counted. Retention keeps the archive within ``max_count`` entries,
``max_bytes`` and ``max_age_days``, oldest first, and it never writes while the
filesystem has less than ``min_free_bytes`` free: an archive must not be what
fills a station's disk.

Layout: ``<path>/<YYYY-MM-DD>/<time>_<seq>_<frame>.{jpg,overlay.jpg,json}``.
The sidecar is the published verdict message and is written last, by rename,
so an entry with a sidecar is complete.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from station.core.atomic import write_bytes_atomic
from station.core.decide import FAIL
from station.core.overlay import anomaly_overlay, cartesian_map
from station.core.preprocess import canonical_view
from station.core.verdict import Verdict
from station.errors import ConfigError, FrameError
from station.service.config import ArchiveConfig

log = structlog.get_logger("station.archive")

SIDECAR = ".json"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")  # no dots: everything after the first dot is the suffix
_STOP = object()
#: retention also runs while idle, so the age limit holds on a quiet line
IDLE_PRUNE_S = 60.0


@dataclass
class Entry:
    stem: Path  # path without suffix; files are stem + suffixes
    created: float  # epoch seconds
    files: list[Path] = field(default_factory=list)
    size: int = 0


@dataclass
class ArchiveStats:
    archived: int = 0
    dropped_queue_full: int = 0
    skipped_low_disk: int = 0
    write_errors: int = 0
    pruned: int = 0


class RejectArchive:
    """A verdict sink that keeps the evidence of every failed bottle on disk, within its limits.

    Contract: called from the publishing thread with each verdict and its published message; it
    never blocks nor raises there (a full queue drops the entry and counts it in ``stats``). Only
    ``fail`` verdicts are archived. Files are written by the archive's own thread, each by rename, the
    sidecar last; retention (count, bytes, age) and the free-space floor hold after every write and
    while idle. ``start`` before the first verdict, ``close`` after the last: it writes what is
    queued, then stops. Constructing it indexes what earlier runs left and sweeps half-written files.
    """

    def __init__(self, config: ArchiveConfig, canonical_size: int, radius_margin: float) -> None:
        if config.path is None:
            raise ConfigError("archive.path: required to archive rejects")
        self.root = config.path
        self.config = config
        self.canonical_size = canonical_size
        self.radius_margin = radius_margin
        self.stats = ArchiveStats()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.queue_size)
        self._entries: deque[Entry] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"archive.path: cannot write to {self.root}: {exc.strerror or exc}") from exc
        self._scan()
        self._thread = threading.Thread(target=self._run, name="archive", daemon=True)

    # -- index ------------------------------------------------------------

    def _scan(self) -> None:
        """Index what earlier runs left, oldest first, and drop half-written entries."""
        groups: dict[Path, Entry] = {}
        for path in self.root.glob("*/*"):
            if not path.is_file():
                continue
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write interrupted by a crash
                continue
            stem = path.parent / path.name.split(".", 1)[0]
            st = path.stat()
            entry = groups.setdefault(stem, Entry(stem, st.st_mtime))
            entry.files.append(path)
            entry.size += st.st_size
            entry.created = min(entry.created, st.st_mtime)
        for entry in sorted(groups.values(), key=lambda e: (e.created, e.stem.name)):
            self._entries.append(entry)
            self._bytes += entry.size

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            s = self.stats
            return {"files": len(self._entries), "bytes": self._bytes, "queue": self._queue.qsize(),
                    "archived": s.archived, "dropped": s.dropped_queue_full, "skipped_low_disk": s.skipped_low_disk,
                    "write_errors": s.write_errors, "pruned": s.pruned}

    # -- sink interface (called from the publishing thread) ----------------

    def start(self) -> None:
        self._thread.start()

    def __call__(self, verdict: Verdict, message: dict[str, Any]) -> None:
        if verdict.verdict != FAIL:
            return
        try:
            self._queue.put_nowait((verdict, message))
        except queue.Full:
            with self._lock:
                self.stats.dropped_queue_full += 1
            log.warning("archive_queue_full", frame_id=verdict.frame.frame_id, seq=message.get("seq"))

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (a stopping station still archives its last rejects), then stop."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    # -- writer thread ----------------------------------------------------

    def _run(self) -> None:
        last_prune = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=IDLE_PRUNE_S)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if item is not None:
                try:
                    self._write(*item)
                except Exception as exc:  # a full or failing disk must not stop the archive thread
                    with self._lock:
                        self.stats.write_errors += 1
                    log.error("archive_write_failed", error=str(exc), path=str(self.root))
            if item is None or time.monotonic() - last_prune > IDLE_PRUNE_S:
                self.prune()
                last_prune = time.monotonic()

    def _free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def _write(self, verdict: Verdict, message: dict[str, Any]) -> None:
        self.prune()
        free = self._free_bytes()
        if free < self.config.min_free_bytes:
            with self._lock:
                self.stats.skipped_low_disk += 1
            log.warning("archive_low_disk", free_bytes=free, min_free_bytes=self.config.min_free_bytes)
            return
        now = time.time()
        day = self.root / time.strftime("%Y-%m-%d", time.gmtime(now))
        day.mkdir(exist_ok=True)
        frame = verdict.frame
        name = f"{time.strftime('%H%M%S', time.gmtime(now))}_{message.get('seq', 0):08d}_{frame.frame_id}"
        stem = day / _UNSAFE.sub("_", name)[:160]
        entry = Entry(stem, now)
        view = None
        if frame.image is not None:
            try:
                view, _ = canonical_view(frame.image, self.canonical_size)
            except FrameError:  # the reason it failed (too small, unsupported): the sidecar says so
                view = None
        if view is not None:
            self._put(entry, ".jpg", _jpeg(view))
            scores = verdict.scores
            if scores is not None and verdict.threshold is not None:
                amap = cartesian_map(scores.anomaly_map, scores.mouth, self.radius_margin,
                                     self.canonical_size, self.canonical_size)
                self._put(entry, ".overlay.jpg", _jpeg(anomaly_overlay(view, amap, verdict.threshold)))
        self._put(entry, SIDECAR, json.dumps(message, indent=1).encode())
        with self._lock:
            self._entries.append(entry)
            self._bytes += entry.size
            self.stats.archived += 1
        self.prune()

    def _put(self, entry: Entry, suffix: str, data: bytes) -> None:
        path = entry.stem.with_name(entry.stem.name + suffix)
        write_bytes_atomic(path, data)  # no fsync: per frame, and _scan sweeps what a crash leaves
        entry.files.append(path)
        entry.size += len(data)

    def prune(self) -> None:
        """Remove the oldest entries until count, bytes and age are within their limits."""
        c = self.config
        oldest_allowed = time.time() - c.max_age_days * 86400
        while True:
            with self._lock:
                if not self._entries:
                    return
                e = self._entries[0]
                over = (len(self._entries) > c.max_count or self._bytes > c.max_bytes
                        or e.created < oldest_allowed)
                if not over:
                    return
                self._entries.popleft()
                self._bytes -= e.size
                self.stats.pruned += 1
            for path in e.files:
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # only succeeds once the day's folder is empty
                e.stem.parent.rmdir()


def _jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise OSError("JPEG encoding failed")
    return bytes(buf)
