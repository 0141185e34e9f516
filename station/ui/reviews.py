"""Reviews of rejects, in SQLite: each one a single committed transaction, so a crash keeps all or nothing.

One row per archive entry: ``confirmed`` (a real defect, with its true class)
or ``false_reject`` (a good bottle the station rejected). The verdict message
is stored with the review, so the what-if and the export still know the
bottle's scores after the archive's retention has removed its files.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from station.contract.timefmt import iso_utc
from station.core.folders import DEFECT_CLASSES, GOOD, NOVEL
from station.errors import ConfigError, StationError

CONFIRMED = "confirmed"
FALSE_REJECT = "false_reject"
OUTCOMES = (CONFIRMED, FALSE_REJECT)

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS reviews (
    entry_id TEXT PRIMARY KEY,
    outcome TEXT NOT NULL CHECK (outcome IN ('confirmed', 'false_reject')),
    true_class TEXT,
    station TEXT,
    run_id TEXT,
    seq INTEGER,
    frame_id TEXT,
    reviewed_at TEXT NOT NULL,
    message TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Review:
    entry_id: str
    outcome: str
    true_class: str | None
    reviewed_at: str
    message: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"entry_id": self.entry_id, "outcome": self.outcome, "true_class": self.true_class,
                "reviewed_at": self.reviewed_at}


def defect_classes(message: dict[str, Any]) -> list[str]:
    """What a confirmed reject may be: the bundle's defect classes (from its scores), or ``novel``."""
    scores = (message.get("class") or {}).get("scores") or {}
    classes = [c for c in scores if c != GOOD] or list(DEFECT_CLASSES)
    return [*classes, NOVEL]


class ReviewStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._cache: dict[str, Review] | None = None
        self.version = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # A review is a person's judgement: it is on disk when the page says it is saved.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA_SQL)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"--reviews: cannot open {path} as SQLite: {exc}") from exc

    def set(self, entry_id: str, outcome: str, true_class: str | None, message: dict[str, Any]) -> Review:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        if outcome == CONFIRMED:
            allowed = defect_classes(message)
            if true_class not in allowed:
                raise ValueError(f"a confirmed reject needs its true class, one of {', '.join(allowed)}")
        else:
            true_class = None
        review = Review(entry_id, outcome, true_class, iso_utc(time.time()), message)
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO reviews VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (entry_id) DO UPDATE SET "
                    "outcome = excluded.outcome, true_class = excluded.true_class, "
                    "reviewed_at = excluded.reviewed_at, message = excluded.message",
                    (entry_id, outcome, true_class, message.get("station"), message.get("run_id"),
                     message.get("seq"), message.get("frame_id"), review.reviewed_at,
                     json.dumps(message, separators=(",", ":"))))
            except sqlite3.Error as exc:
                raise StationError(f"--reviews {self.path}: cannot save the review of {entry_id}: {exc}") from exc
            self._invalidate()
        return review

    def clear(self, entry_id: str) -> None:
        with self._lock:
            try:
                self._db.execute("DELETE FROM reviews WHERE entry_id = ?", (entry_id,))
            except sqlite3.Error as exc:
                raise StationError(f"--reviews {self.path}: cannot clear the review of {entry_id}: {exc}") from exc
            self._invalidate()

    def _invalidate(self) -> None:
        self._cache = None
        self.version += 1

    def all(self) -> dict[str, Review]:
        with self._lock:
            if self._cache is None:
                try:
                    rows = self._db.execute(
                        "SELECT entry_id, outcome, true_class, reviewed_at, message FROM reviews").fetchall()
                except sqlite3.Error as exc:
                    raise StationError(f"--reviews {self.path}: cannot read reviews: {exc}") from exc
                self._cache = {r[0]: Review(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows}
            return self._cache

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_existing(path: Path) -> ReviewStore:
    """For the export: the file must already hold reviews, not be created empty by a typo."""
    if not path.is_file():
        raise ConfigError(f"--reviews: {path} does not exist (station ui --reviews writes it)")
    return ReviewStore(path)
