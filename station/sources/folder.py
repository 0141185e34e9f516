"""Folder sources: replay of a recorded folder, and a watched folder for `station run`."""

from __future__ import annotations

import functools
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from watchfiles import Change, watch

from station.core.folders import is_labelled_folder, label_of, list_candidate_files
from station.core.frame import Frame
from station.core.imageio import read_image
from station.errors import FrameError, SourceError
from station.sources import OnOverload, SourceBase

#: How many taken files a watched folder remembers; see WatchedFolderSource.
DEFAULT_REMEMBER = 10_000
#: How often a watched folder is listed in full, in case inotify dropped events; see WatchedFolderSource.
DEFAULT_RESCAN_S = 60.0
#: How long an empty file must hold still before it is taken; see WatchedFolderSource.
EMPTY_SETTLE_S = 2.0

_Signature = tuple[int, int]  # (size, mtime_ns)


def _decode(path: Path, frame: Frame) -> None:
    t0 = time.perf_counter()
    try:
        frame.image = read_image(path)
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
        path=path,
        loader=functools.partial(_decode, path),
    )
    if not lazy:
        frame.load()
    return frame


class FolderReplaySource(SourceBase):
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


class WatchedFolderSource(SourceBase):
    """New files appearing under ``path`` are inspected once each, oldest first.

    Changes come from inotify (``watchfiles``), not from re-walking the tree: the
    cost of a poll no longer grows with the folder. A file is taken once its size
    and modification time have held still for ``poll_interval_s`` with no event on
    it, so a half-written image is not read; writers that can should still write
    to a hidden temporary name and rename (hidden names are ignored). An empty
    file is far more often one a writer has opened and not written yet than a
    finished image, and a writer can be held off the CPU for longer than a poll
    interval right there; so an empty file must hold still for ``EMPTY_SETTLE_S``
    (or the poll interval, if longer). One that stays empty is then taken like
    any other and gets its verdict (an unreadable image).

    Memory is bounded by the backlog, not by the history. What was taken is
    remembered as (path → size, mtime) so that a late event on a file already
    inspected (a chmod by whoever moves it on) does not inspect it twice; an entry
    is forgotten as soon as the file is gone, and at most ``remember`` entries
    are kept, oldest dropped first. The LRU bound is what keeps a folder nobody
    empties from growing the set for years; dropping an old entry is harmless
    because an untouched file raises no event (only a chmod of a file taken more
    than ``remember`` files ago would inspect it again). A file rewritten in place
    (a new size or mtime) is a new image and is inspected again, as is, with
    ``process_existing`` off, a file that was there at start and is rewritten.

    inotify drops events when its kernel queue overflows, and watchfiles does not
    say so; so every ``rescan_s`` (0: never) the folder is listed in full and a
    file no event announced is taken like any other: nothing is lost. A listed
    file counts as new only if it is younger (mtime) than every taken file the
    memory has let go of, so a rescan never takes an old file a second time.
    """

    finite = False

    def __init__(self, path: Path, poll_interval_s: float = 0.2, process_existing: bool = True,
                 on_overload: OnOverload = "wait", remember: int = DEFAULT_REMEMBER,
                 rescan_s: float = DEFAULT_RESCAN_S) -> None:
        if not path.is_dir():
            raise SourceError(f"watched folder {path} does not exist or is not a folder")
        self.path = path
        # A file can wait on disk: by default every one is inspected. ``skip`` is for a folder fed
        # by a live camera, where a verdict that comes late is worth less than a bounded latency.
        self.on_overload = on_overload
        self.poll_interval_s = poll_interval_s
        self.empty_settle_s = max(poll_interval_s, EMPTY_SETTLE_S)
        self.process_existing = process_existing
        self.remember = max(1, remember)
        self.rescan_s = rescan_s
        #: set once inotify watches the folder: from then on no new file goes unseen
        self.watching = threading.Event()
        #: full listings done so far (each after the events of its poll interval were applied)
        self.rescans = 0
        self._seen: OrderedDict[Path, _Signature] = OrderedDict()
        #: a listed file at or below this mtime and not remembered was taken long ago (or, with
        #: process_existing off, was there at start): rescans leave it alone
        self._forgotten_mtime_ns = 0
        #: files seen changing, not taken yet: path → (signature, monotonic time of its last change)
        self._pending: dict[Path, tuple[_Signature, float]] = {}

    def describe(self) -> str:
        return f"watched folder {self.path}"

    @property
    def remembered(self) -> int:
        """How many taken files are remembered (bounded by ``remember``)."""
        return len(self._seen)

    @property
    def waiting(self) -> int:
        """How many files were seen and are not taken yet (the backlog)."""
        return len(self._pending)

    def _hidden(self, p: Path) -> bool:
        try:
            return any(part.startswith(".") for part in p.relative_to(self.path).parts)
        except ValueError:
            return True  # outside the folder: not ours

    def _note(self, p: Path, now: float) -> None:
        """A change on ``p``: (re)start its settling clock, or walk it if it is a new folder."""
        if self._hidden(p):
            return
        try:
            st = p.stat()
        except OSError:
            self._pending.pop(p, None)  # gone again before it settled
            return
        if stat.S_ISDIR(st.st_mode):
            # Files created before inotify watched a new (or moved-in) folder raise no event of their own.
            for child in list_candidate_files(p):
                self._note(child, now)
            return
        if not stat.S_ISREG(st.st_mode):
            return
        sig = (st.st_size, st.st_mtime_ns)
        if self._seen.get(p) == sig:
            return  # an event on the version already inspected
        self._pending[p] = (sig, now)

    def _forget(self, p: Path) -> None:
        self._pending.pop(p, None)
        self._seen.pop(p, None)

    def _apply(self, changes: set[tuple[Change, str]]) -> None:
        now = time.monotonic()
        for change, raw in changes:
            p = Path(raw)
            if change == Change.deleted:
                self._forget(p)
            else:
                self._note(p, now)

    def _take_ready(self) -> list[tuple[Path, _Signature]]:
        """Pending files that held still for a poll interval, oldest first; they leave the backlog."""
        now = time.monotonic()
        ready: list[tuple[Path, _Signature]] = []
        for p, (sig, since) in list(self._pending.items()):
            if now - since < (self.empty_settle_s if sig[0] == 0 else self.poll_interval_s):
                continue
            try:
                st = p.stat()
            except OSError:
                del self._pending[p]
                continue
            current = (st.st_size, st.st_mtime_ns)
            if current == sig:
                ready.append((p, sig))
            else:  # still being written without an event reaching us yet: wait another interval
                self._pending[p] = (current, now)
        for p, _ in ready:
            del self._pending[p]
        ready.sort(key=lambda item: (item[1][1], item[0].name))
        return ready

    def _remember(self, p: Path, sig: _Signature) -> None:
        self._seen[p] = sig
        self._seen.move_to_end(p)
        while len(self._seen) > self.remember:
            _, (_, mtime_ns) = self._seen.popitem(last=False)
            self._forgotten_mtime_ns = max(self._forgotten_mtime_ns, mtime_ns)

    def _rescan(self, now: float) -> None:
        """Take note of files no event announced (an inotify overflow drops them silently)."""
        self.rescans += 1
        for p in self._listing():
            if p in self._pending or p in self._seen:
                continue  # pending, or taken: an event on a new version of it still arrives as usual
            try:
                st = p.stat()
            except OSError:
                continue
            if st.st_mtime_ns > self._forgotten_mtime_ns:
                self._pending[p] = ((st.st_size, st.st_mtime_ns), now)

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        if not self.process_existing:
            # What is there before the watch starts was there at start: a rescan must not take it.
            self._forgotten_mtime_ns = time.time_ns()
        interval_ms = max(1, round(self.poll_interval_s * 1000))
        changes = watch(
            self.path, watch_filter=None, stop_event=stop, recursive=True, ignore_permission_denied=True,
            # step: how long a burst may keep arriving before it is handed over; the timeout
            # brings the loop back while files settle with no further events.
            step=min(50, interval_ms), debounce=max(50, interval_ms), rust_timeout=interval_ms,
            yield_on_timeout=True, raise_interrupt=False,
        )
        seq = 0
        source = f"folder:{self.path}"
        try:
            # The watcher is live once the first batch is back: a file created during the walk
            # below is found by both, and counted once since both land in the same backlog.
            first = self._next_changes(changes)
            if first is None:
                return
            self.watching.set()
            if self.process_existing:
                now = time.monotonic()
                for p in self._listing():
                    self._note(p, now)
            self._apply(first)
            next_rescan = time.monotonic() + self.rescan_s
            while not stop.is_set():
                for p, sig in self._take_ready():
                    if stop.is_set():  # files not taken stay on disk for the next run
                        return
                    self._remember(p, sig)
                    yield load_frame(p, seq, self.path, source, None, lazy=True)
                    seq += 1
                batch = self._next_changes(changes)
                if batch is None:
                    return
                self._apply(batch)
                if self.rescan_s > 0 and time.monotonic() >= next_rescan:
                    self._rescan(time.monotonic())
                    next_rescan = time.monotonic() + self.rescan_s
        finally:
            changes.close()  # releases the inotify watches now, not at garbage collection

    def _listing(self) -> list[Path]:
        try:
            return list_candidate_files(self.path)
        except OSError as exc:
            raise SourceError(f"watched folder {self.path}: {exc}") from exc

    def _next_changes(self, changes: Iterator[set[tuple[Change, str]]]) -> set[tuple[Change, str]] | None:
        """The next batch of changes (empty after a quiet poll interval), or None once stopped."""
        try:
            return next(changes, None)
        except (OSError, RuntimeError) as exc:  # the folder vanished, or inotify ran out of watches
            raise SourceError(f"watched folder {self.path}: {exc}") from exc
