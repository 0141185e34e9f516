"""SIGTERM, SIGINT and SIGHUP turned into events, safely however fast they come.

A Python signal handler runs in the main thread between two bytecodes, so it
can interrupt anything the main thread does, including itself. A handler that
calls ``threading.Event.set()`` takes the event's lock: a second signal landing
while the first handler holds it blocks forever on a lock its own thread holds
(seen as a hung ``station run`` after a double SIGTERM). So the handler here
only writes the signal's number to a pipe, a system call with no lock; a
dispatcher thread reads the pipe and does the work (events, logging, reload)
as ordinary code.

- The first SIGTERM or SIGINT sets ``stop``: drain the frames in flight.
- Any later one sets ``finish_now``: frames not yet inspected are accounted
  for as ``skipped`` (reason ``shutdown``), the verdicts already inspected are
  still published.
- SIGHUP calls ``on_hup`` (the daemon's reload), when one is given.

Once a stop signal came, leaving the context ignores further SIGTERM/SIGINT
for the rest of the process: interpreter shutdown puts Python-level handlers
back to the default action, so a late signal would otherwise kill a process
that has already drained and turn its exit 0 into 143.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

import structlog

log = structlog.get_logger("station.signals")

Handler = Callable[[int, FrameType | None], Any] | int | None

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _log_quietly(level: str, event: str, **fields: object) -> None:
    with contextlib.suppress(Exception):
        getattr(log, level)(event, **fields)


class ShutdownSignals:
    """Context manager installing the handlers; ``stop`` and ``finish_now`` are the events to watch."""

    def __init__(self, on_hup: Callable[[], None] | None = None,
                 stop: threading.Event | None = None) -> None:
        self.stop = stop or threading.Event()
        self.finish_now = threading.Event()
        self.on_hup = on_hup
        #: stop signals received (SIGTERM and SIGINT)
        self.received = 0
        self._previous: dict[int, Handler] = {}
        self._read_fd = -1
        self._write_fd = -1
        self._dispatcher: threading.Thread | None = None

    @property
    def signals(self) -> tuple[int, ...]:
        return (*STOP_SIGNALS, signal.SIGHUP) if self.on_hup is not None else STOP_SIGNALS

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        # No locks, no logging, no allocation that matters: this may interrupt itself.
        with contextlib.suppress(OSError):  # a full pipe holds signals enough already
            os.write(self._write_fd, bytes((signum,)))

    def _dispatch(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:  # write end closed: uninstalled
                return
            for signum in data:
                self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        # The event first, the log line after, and a log line that cannot be written (stderr closed
        # under an orphaned process) never kills this thread: a lost SIGTERM would leave a process
        # that only SIGKILL ends.
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            if self.on_hup is not None:
                self.on_hup()
            _log_quietly("info", "reload_requested", signal=name)
            return
        self.received += 1
        if not self.stop.is_set():
            self.stop.set()
            _log_quietly("info", "stop_requested", signal=name, then="draining the frames in flight")
        elif not self.finish_now.is_set():
            self.finish_now.set()
            _log_quietly("warning", "finish_now_requested", signal=name,
                         then="frames not yet inspected are skipped (reason shutdown); inspected ones published")

    def __enter__(self) -> ShutdownSignals:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._dispatcher = threading.Thread(target=self._dispatch, name="signals", daemon=True)
        self._dispatcher.start()
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, _type: type[BaseException] | None, _value: BaseException | None,
                 _tb: TracebackType | None) -> None:
        signalled = self.received > 0
        for signum, previous in self._previous.items():
            if signalled and signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
            else:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        # Handlers are off before the pipe closes, so a late signal never writes to a reused fd.
        os.close(self._write_fd)
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=5)
        os.close(self._read_fd)
