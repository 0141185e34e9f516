"""The unit of work that flows from a source through the pipeline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from station.errors import FrameError


@dataclass(frozen=True)
class Trigger:
    """What a triggered camera reports with a frame; published as the verdict's ``trigger`` (None: unknown)."""

    block_id: int | None = None
    count: int | None = None
    encoder: int | None = None
    camera_timestamp: int | None = None


@dataclass
class Frame:
    """One captured bottle image.

    A source that cannot decode what it captured still emits a Frame, with
    ``image`` None and ``error`` set, so that the frame gets a ``fail``
    verdict instead of vanishing.
    """

    seq: int
    frame_id: str
    source: str
    captured_at: float  # UTC epoch seconds (wall clock, for messages)
    captured_mono: float  # time.monotonic() at capture, for latencies
    image: np.ndarray | None = None  # BGR uint8, any size; brought to canonical view by preprocess
    label: str | None = None  # ground truth from a labelled replay folder
    error: FrameError | None = None
    #: the file the image is read from (folder sources); None for a camera's frame
    path: Path | None = None
    #: set when the frame carries no image because acquisition dropped it: a ``skipped`` verdict, this reason
    skip_reason: str | None = None
    trigger: Trigger | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    #: decodes the image on first use: a replayed file is read by the capture thread but decoded by
    #: an inspection worker, so decoding spreads over the workers instead of bounding throughput
    loader: Callable[[Frame], None] | None = None

    def load(self) -> None:
        """Run the deferred decode, if any; afterwards ``image`` or ``error`` is set."""
        loader, self.loader = self.loader, None
        if loader is not None:
            loader(self)
