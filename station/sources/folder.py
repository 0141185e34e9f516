"""Folder sources: replay of a recorded folder, and a watched folder for `station run`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

from station.core.folders import is_labelled_folder, label_of, list_candidate_files
from station.core.frame import Frame
from station.core.imageio import read_image
from station.errors import FrameError, SourceError
from station.sources import OnOverload


def _decode(frame: Frame) -> None:
    t0 = time.perf_counter()
    try:
        frame.image = read_image(Path(frame.meta["path"]))
    except FrameError as exc:
        frame.error = exc
    frame.latency_ms["decode"] = (time.perf_counter() - t0) * 1e3


def load_frame(path: Path, seq: int, root: Path, source: str, label: str | None, lazy: bool = False) -> Frame:
    """``path`` as a Frame; an unreadable file becomes a Frame carrying the error.

    ``lazy``: decode when the frame is inspected (Frame.load), not now.
    """
    frame = Frame(
        seq=seq,
        frame_id=path.relative_to(root).as_posix(),
        source=source,
        captured_at=time.time(),
        captured_mono=time.monotonic(),
        label=label,
        meta={"path": str(path)},
        loader=_decode,
    )
    if not lazy:
        frame.load()
    return frame


class FolderReplaySource:
    """Every file under ``root`` (recursive, sorted) exactly once, optionally paced at ``rate`` fps."""

    finite = True
    on_overload: OnOverload = "wait"

    def __init__(self, root: Path, classes: tuple[str, ...], rate: float | None = None) -> None:
        if not root.exists():
            raise SourceError(f"replay folder {root} does not exist")
        if not root.is_dir():
            raise SourceError(f"replay source {root} is not a folder")
        self.root = root
        self.files = list_candidate_files(root)
        self.labelled = is_labelled_folder(root, classes)
        self.classes = classes
        self.rate = rate

    def describe(self) -> str:
        kind = "labelled folder" if self.labelled else "folder"
        return f"{kind} {self.root} ({len(self.files)} files)"

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        source = f"replay:{self.root.name}"
        period = 1.0 / self.rate if self.rate else 0.0
        start = time.monotonic()
        for seq, path in enumerate(self.files):
            if stop.is_set():
                return
            if period:
                delay = start + seq * period - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    return
            label = label_of(path, self.root, self.classes) if self.labelled else None
            yield load_frame(path, seq, self.root, source, label, lazy=True)


class WatchedFolderSource:
    """New files appearing under ``path`` are inspected once each, oldest first.

    A file is taken once its size and modification time have held still for
    one poll, so a half-written image is not read; writers that can should
    still write to a hidden temporary name and rename (hidden names are ignored).
    """

    finite = False

    def __init__(self, path: Path, poll_interval_s: float = 0.2, process_existing: bool = True,
                 on_overload: OnOverload = "wait") -> None:
        if not path.is_dir():
            raise SourceError(f"watched folder {path} does not exist or is not a folder")
        self.path = path
        # A file can wait on disk: by default every one is inspected. ``skip`` is for a folder fed
        # by a live camera, where a verdict that comes late is worth less than a bounded latency.
        self.on_overload = on_overload
        self.poll_interval_s = poll_interval_s
        self.process_existing = process_existing
        self._seen: set[Path] = set()

    def describe(self) -> str:
        return f"watched folder {self.path}"

    def _snapshot(self) -> dict[Path, tuple[int, int]]:
        found: dict[Path, tuple[int, int]] = {}
        try:
            for p in list_candidate_files(self.path):
                if p in self._seen:
                    continue
                try:
                    st = p.stat()
                except OSError:
                    continue  # removed between listing and stat
                found[p] = (st.st_size, st.st_mtime_ns)
        except OSError as exc:
            raise SourceError(f"watched folder {self.path}: {exc}") from exc
        return found

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        if not self.process_existing:
            self._seen.update(self._snapshot())
        pending: dict[Path, tuple[int, int]] = {}
        seq = 0
        source = f"folder:{self.path}"
        while not stop.is_set():
            current = self._snapshot()
            ready = sorted(
                (p for p, sig in current.items() if pending.get(p) == sig),
                key=lambda p: (current[p][1], p.name),
            )
            for p in ready:
                if stop.is_set():  # files not taken stay on disk for the next run
                    return
                self._seen.add(p)
                yield load_frame(p, seq, self.path, source, None, lazy=True)
                seq += 1
            pending = {p: sig for p, sig in current.items() if p not in self._seen}
            stop.wait(self.poll_interval_s)
