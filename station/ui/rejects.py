"""The reject archive as the page reads it: an index of entries, filters, and paths that cannot escape it.

The station's RejectArchive writes ``<root>/<YYYY-MM-DD>/<stem>.{jpg,overlay.jpg,json}``,
the sidecar last, by rename: an entry with a sidecar is complete. The index is
refreshed incrementally (only day folders whose mtime moved are listed again,
only new sidecars are read), so a gallery over ten thousand rejects costs a
few directory listings, not ten thousand file reads, per refresh.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: an entry id is ``<day>/<stem>``, exactly as the archive names them: nothing else is ever opened
ENTRY_ID = re.compile(r"^(\d{4}-\d{2}-\d{2})/([A-Za-z0-9_-]{1,200})$")
DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
IMAGE_SUFFIXES = (".jpg", ".overlay.jpg")
SIDECAR = ".json"


@dataclass
class Reject:
    id: str
    message: dict[str, Any]
    has_image: bool
    has_overlay: bool

    @property
    def label(self) -> str:
        cls = self.message.get("class") or {}
        return str(cls.get("label") or "not inspected")

    @property
    def sort_key(self) -> tuple[str, str]:
        return (str(self.message.get("captured_at") or ""), self.id)

    def card(self) -> dict[str, Any]:
        m = self.message
        anomaly = m.get("anomaly") or {}
        cls = m.get("class") or {}
        return {"id": self.id, "seq": m.get("seq"), "run_id": m.get("run_id"), "frame_id": m.get("frame_id"),
                "captured_at": m.get("captured_at"), "reasons": m.get("reasons") or [], "label": self.label,
                "confidence": cls.get("confidence"), "score": anomaly.get("score"),
                "threshold": anomaly.get("threshold"), "has_image": self.has_image, "has_overlay": self.has_overlay,
                "error": (m.get("error") or {}).get("reason")}


def resolve(root: Path, entry_id: str, suffix: str) -> Path | None:
    """The file of ``entry_id`` with ``suffix`` inside ``root``, or None: never a path outside it.

    Ids are matched against the archive's own naming before any filesystem
    call, so ``..``, absolute paths, NUL bytes and encoded slashes never reach
    ``open``; the resolved path is checked against the root as well, so a
    symlink planted inside the archive cannot lead out of it either.
    """
    if suffix not in (*IMAGE_SUFFIXES, SIDECAR) or not ENTRY_ID.match(entry_id):
        return None
    path = root / (entry_id + suffix)
    try:
        real = path.resolve(strict=True)
        base = root.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not real.is_relative_to(base) or not real.is_file():
        return None
    return real


class RejectIndex:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._entries: dict[str, Reject] = {}
        self._day_mtimes: dict[str, int] = {}
        #: bumped when entries come or go: the gallery refetches when it moves
        self.version = 0
        self.latest: str | None = None

    def refresh(self) -> None:
        try:
            days = {d.name: d for d in os.scandir(self.root) if d.is_dir(follow_symlinks=False) and DAY.match(d.name)}
        except OSError:
            days = {}  # the archive folder is not there (yet): an empty gallery, not an error
        changed = False
        with self._lock:
            for name in [n for n in self._day_mtimes if n not in days]:
                del self._day_mtimes[name]
                for key in [k for k in self._entries if k.startswith(name + "/")]:
                    del self._entries[key]
                changed = True
            for name, entry in days.items():
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                except OSError:
                    continue
                if self._day_mtimes.get(name) == mtime:
                    continue
                changed |= self._scan_day(name)
                self._day_mtimes[name] = mtime
            if changed:
                self.version += 1
                newest = max(self._entries.values(), key=lambda r: r.sort_key, default=None)
                self.latest = newest.id if newest else None

    def _scan_day(self, day: str) -> bool:
        try:
            names = set(os.listdir(self.root / day))
        except OSError:
            return False
        stems = {n[: -len(SIDECAR)] for n in names if n.endswith(SIDECAR) and "." not in n[: -len(SIDECAR)]}
        changed = False
        for key in [k for k in self._entries if k.startswith(day + "/") and k.split("/", 1)[1] not in stems]:
            del self._entries[key]
            changed = True
        for stem in stems:
            key = f"{day}/{stem}"
            if not ENTRY_ID.match(key):
                continue
            old = self._entries.get(key)
            has_image, has_overlay = stem + ".jpg" in names, stem + ".overlay.jpg" in names
            if old is not None:
                old.has_image, old.has_overlay = has_image, has_overlay
                continue
            message = self._read(key)
            if message is not None:
                self._entries[key] = Reject(key, message, has_image, has_overlay)
                changed = True
        return changed

    def _read(self, entry_id: str) -> dict[str, Any] | None:
        path = resolve(self.root, entry_id, SIDECAR)
        if path is None:
            return None
        try:
            message = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None  # removed by retention meanwhile, or not the station's: left out of the gallery
        return message if isinstance(message, dict) else None

    def get(self, entry_id: str) -> Reject | None:
        with self._lock:
            return self._entries.get(entry_id)

    def all(self) -> list[Reject]:
        """Newest first."""
        with self._lock:
            entries = list(self._entries.values())
        return sorted(entries, key=lambda r: r.sort_key, reverse=True)

    def count(self) -> int:
        with self._lock:
            return len(self._entries)


def matches(reject: Reject, review: str | None, label: str | None, reason: str | None, since: str | None,
            until: str | None, review_state: str | None) -> bool:
    """The gallery's filters; times are compared as the messages' fixed-width UTC text."""
    captured = str(reject.message.get("captured_at") or "")
    if label and reject.label != label:
        return False
    if reason and reason not in (reject.message.get("reasons") or []):
        return False
    if since and captured < since:
        return False
    if until and captured >= until:
        return False
    if review_state == "unreviewed":
        return review is None
    if review_state == "reviewed":
        return review is not None
    if review_state in ("confirmed", "false_reject"):
        return review == review_state
    return True
