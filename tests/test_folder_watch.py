"""The watched-folder source on its own: inotify-driven, memory bounded by the backlog, not by history."""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import station.sources
from station.core.frame import Frame
from station.sources.folder import WatchedFolderSource

SOURCES = os.path.dirname(station.sources.__file__)


def _held_by_the_source() -> int:
    """Bytes allocated, and still held, by lines of station/sources/ (what tracemalloc traced since it started)."""
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, f"{SOURCES}/*")])
    return sum(stat.size for stat in snapshot.statistics("filename"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Running:
    """The source's frames() consumed in a thread, as the daemon's capture thread does."""

    def __init__(self, source: WatchedFolderSource) -> None:
        self.source = source
        self.stop = threading.Event()
        self.frames: list[Frame] = []
        self.got = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for frame in self.source.frames(self.stop):
            with self.got:
                self.frames.append(frame)
                self.got.notify_all()

    def wait_for(self, n: int, timeout: float = 20) -> list[str]:
        with self.got:
            assert self.got.wait_for(lambda: len(self.frames) >= n, timeout), f"{len(self.frames)} of {n} frames"
            return [f.frame_id for f in self.frames]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "frames() did not end on stop"


def _until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _watching(run: _Running) -> None:
    assert run.source.watching.wait(10), "the source never started watching"


def _rescans_pass(source: WatchedFolderSource, n: int) -> None:
    """``n`` more full listings: events and rescans in between have been applied."""
    target = source.rescans + n
    _until(lambda: source.rescans >= target, f"{n} rescans")


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Path, _Running]]:
    folder = tmp_path / "incoming"
    folder.mkdir()
    run = _Running(WatchedFolderSource(folder, poll_interval_s=0.03, remember=100, rescan_s=0.05))
    try:
        _watching(run)
        yield folder, run
    finally:
        run.close()


def test_each_file_once_renames_and_subfolders_seen_hidden_ignored(running: tuple[Path, _Running]) -> None:
    folder, run = running
    (folder / ".a.tmp").write_bytes(b"a")
    (folder / ".a.tmp").rename(folder / "a.png")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.png").write_bytes(b"b")  # may land before inotify watches sub/: found by the walk
    (folder / ".hidden.png").write_bytes(b"h")
    assert sorted(run.wait_for(2)) == ["a.png", "sub/b.png"]
    os.chmod(folder / "a.png", 0o600)  # an event on a file already taken, same content: not inspected again
    _rescans_pass(run.source, 3)
    assert len(run.frames) == 2


def test_a_partial_file_is_taken_only_once_it_holds_still(running: tuple[Path, _Running]) -> None:
    folder, run = running
    with open(folder / "slow.png", "wb") as f:
        for _ in range(8):  # writes 20 ms apart: shorter than the 30 ms settle time each
            f.write(b"x" * 100)
            f.flush()
            time.sleep(0.02)
    run.wait_for(1)
    _rescans_pass(run.source, 3)
    assert [f.frame_id for f in run.frames] == ["slow.png"]
    assert (folder / "slow.png").stat().st_size == 800
    assert run.frames[0].path == folder / "slow.png"


def test_an_empty_file_waits_for_its_writer_and_one_left_empty_is_still_taken(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    source = WatchedFolderSource(folder, poll_interval_s=0.03, rescan_s=0.05)
    source.empty_settle_s = 0.6  # EMPTY_SETTLE_S, shortened for the test; still 20 poll intervals
    run = _Running(source)
    try:
        _watching(run)
        # A writer that opened the file and was held off the CPU for ten poll intervals before writing:
        # taken at once it would be inspected twice, empty then whole (the CI flake of the 20 000-file test).
        with open(folder / "held.png", "wb") as f:
            time.sleep(0.3)
            f.write(b"image")
        left = folder / "left-empty.png"
        left.touch()
        t0 = time.monotonic()
        assert run.wait_for(1) == ["held.png"]
        assert run.wait_for(2) == ["held.png", "left-empty.png"]  # nothing is lost: it gets its (error) verdict
        assert time.monotonic() - t0 >= 0.6 - 0.05
        _rescans_pass(run.source, 3)
        assert len(run.frames) == 2
        run.frames[1].load()
        assert run.frames[1].error is not None
    finally:
        run.close()


def test_a_taken_file_is_forgotten_once_gone_and_a_rewrite_is_a_new_image(running: tuple[Path, _Running]) -> None:
    folder, run = running
    (folder / "a.png").write_bytes(b"first")
    run.wait_for(1)
    assert run.source.remembered == 1
    (folder / "a.png").unlink()
    _until(lambda: run.source.remembered == 0, "the deleted file to be forgotten")
    (folder / "a.png").write_bytes(b"second, longer")  # the same name again: a new image, inspected
    assert run.wait_for(2) == ["a.png", "a.png"]


def test_existing_files_are_skipped_when_asked_and_stop_leaves_the_rest(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "old.png").write_bytes(b"old")
    run = _Running(WatchedFolderSource(folder, poll_interval_s=0.03, process_existing=False, rescan_s=0.05))
    try:
        _watching(run)
        (folder / "new.png").write_bytes(b"new")
        assert run.wait_for(1) == ["new.png"]
        _rescans_pass(run.source, 3)
        assert len(run.frames) == 1
    finally:
        run.close()
    assert sorted(p.name for p in folder.iterdir()) == ["new.png", "old.png"]


@pytest.mark.slow
def test_twenty_thousand_files_through_a_watched_folder_with_flat_memory(tmp_path: Path) -> None:
    """20 000 small files, written in batches while the source runs: every one taken once, memory flat.

    The files stay on disk (nobody empties the folder): only the LRU bound keeps what is remembered flat.
    """
    folder = tmp_path / "incoming"
    folder.mkdir()
    total, batch, remember = 20_000, 500, 1_000
    source = WatchedFolderSource(folder, poll_interval_s=0.02, remember=remember)
    stop = threading.Event()
    taken = 0
    consumed = threading.Condition()
    errors: list[BaseException] = []

    def write_batches() -> None:
        try:
            for b in range(total // batch):
                need = (b - 1) * batch

                def caught_up(need: int = need) -> bool:
                    return taken >= need or stop.is_set()

                with consumed:  # keep at most one batch ahead, as a camera at line rate would
                    consumed.wait_for(caught_up, 30)
                for i in range(b * batch, (b + 1) * batch):
                    (folder / f"{i:05d}.png").write_bytes(b"%d" % i)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    writer = threading.Thread(target=write_batches, daemon=True)
    watchdog = threading.Timer(90, stop.set)
    watchdog.start()
    hits = bytearray(total)  # preallocated: the test's own bookkeeping must not grow either
    max_remembered = max_waiting = 0
    rss_mid = python_mid = 0
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        frames = source.frames(stop)
        writer.start()
        for frame in frames:
            hits[int(frame.frame_id[:5])] += 1
            with consumed:
                taken += 1
                consumed.notify_all()
            max_remembered = max(max_remembered, source.remembered)
            max_waiting = max(max_waiting, source.waiting)
            if taken == total // 4:
                rss_mid = _rss_bytes()
                python_mid = _held_by_the_source()
            if taken == total:
                break
        rss_end = _rss_bytes()
        python_end = _held_by_the_source()
    finally:
        stop.set()
        watchdog.cancel()
        writer.join(10)
        tracemalloc.stop()
    elapsed = time.monotonic() - t0
    assert not errors, errors
    assert taken == total and hits == bytearray([1]) * total, f"{taken} frames, {hits.count(1)} once, {elapsed:.1f} s"
    assert max_remembered == remember  # reached and never exceeded; without the bound it would be 20 000
    assert max_waiting <= 2 * batch  # the backlog is what was written and not yet taken, nothing more
    # The last three quarters of the run add nothing held by the source's code: a set of 15 000 more paths
    # would be about 2 MiB here. RSS is the whole test worker's (other tests' threads, the allocator's arenas),
    # so it only guards against a gross leak outside Python, as in the inotify watcher.
    grown = python_end - python_mid
    assert grown < 256 * 2**10, f"the source's allocations grew by {grown / 2**10:.0f} KiB"
    assert rss_end - rss_mid < 32 * 2**20, f"RSS grew by {(rss_end - rss_mid) / 2**20:.1f} MiB"


class _Deaf(WatchedFolderSource):
    """Loses every inotify event after the first batch, as an overflowed kernel queue loses them."""

    def _apply(self, changes: Any) -> None:
        return None


def _drop(folder: Path, name: str, mtime_ns: int | None = None) -> None:
    hidden = folder / f".{name}"
    hidden.write_bytes(b"x")
    if mtime_ns is not None:
        os.utime(hidden, ns=(mtime_ns, mtime_ns))
    hidden.rename(folder / name)


def test_files_whose_events_were_lost_are_still_taken_once_by_the_rescan(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    run = _Running(_Deaf(folder, poll_interval_s=0.03, rescan_s=0.2))
    try:
        _watching(run)  # from now on no event reaches the source
        for i in range(30):
            _drop(folder, f"{i:03d}.png")
        taken = run.wait_for(30, timeout=20)
        _rescans_pass(run.source, 3)  # more rescans: nothing is taken twice
        assert sorted(taken) == [f"{i:03d}.png" for i in range(30)]
        assert len(run.frames) == 30
    finally:
        run.close()


def test_a_rescan_does_not_take_again_what_the_memory_has_let_go(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    source = WatchedFolderSource(folder, poll_interval_s=0.03, remember=5, rescan_s=0.1)
    run = _Running(source)
    try:
        _watching(run)
        start = time.time_ns()
        for i in range(20):
            _drop(folder, f"{i:03d}.png", mtime_ns=start + i * 1_000_000)  # distinct, as a camera's images
        run.wait_for(20)
        assert source.remembered == 5
        _rescans_pass(source, 10)  # ten rescans over 20 files on disk, 15 of them forgotten
        assert len(run.frames) == 20
        _drop(folder, "new.png", mtime_ns=start + 21 * 1_000_000)
        assert run.wait_for(21)[-1] == "new.png"
    finally:
        run.close()


def test_with_process_existing_off_a_rescan_leaves_what_was_there_at_start(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i in range(5):
        _drop(folder, f"old{i}.png")
    run = _Running(WatchedFolderSource(folder, poll_interval_s=0.03, process_existing=False, rescan_s=0.1))
    try:
        _watching(run)
        _drop(folder, "new.png")
        assert run.wait_for(1) == ["new.png"]
        _rescans_pass(run.source, 5)
        assert [f.frame_id for f in run.frames] == ["new.png"]
    finally:
        run.close()
