"""Frame sources. Each yields Frames until exhausted or asked to stop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Literal, Protocol

from station.core.frame import Frame

#: what a source does while inspection is busy (see Source.on_overload)
OnOverload = Literal["wait", "skip"]


class Source(Protocol):
    #: True when the source ends by itself (replay); live sources run until stopped.
    finite: bool
    #: When inspection is busy: ``wait`` holds the source back (files can wait, every one is inspected);
    #: ``skip`` gives the frame a ``skipped`` verdict (a live camera, where a late verdict is useless).
    on_overload: OnOverload

    def describe(self) -> str: ...

    def frames(self, stop: threading.Event) -> Iterator[Frame]: ...

    @property
    def degraded(self) -> bool:
        """True while the source runs without its input (a camera being reconnected): the state says so."""
        ...

    def health_snapshot(self) -> dict[str, object] | None:
        """The heartbeat's ``camera`` object; None for a source that has no device to report on."""
        ...


class SourceBase:
    """Defaults for what only a device-backed source has to report: never degraded, no health."""

    @property
    def degraded(self) -> bool:
        return False

    def health_snapshot(self) -> dict[str, object] | None:
        return None
