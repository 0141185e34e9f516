"""Frame sources. Each yields Frames until exhausted or asked to stop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol

from station.frame import Frame


class Source(Protocol):
    #: True when the source ends by itself (replay); live sources run until stopped.
    finite: bool

    def describe(self) -> str: ...

    def frames(self, stop: threading.Event) -> Iterator[Frame]: ...
