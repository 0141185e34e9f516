"""How many inspection workers, and how many threads each model session gets.

Measured on the 2-core CI machine (station bench): the two small models gain
little from intra-op threads (9.3 ms per frame with 1 thread, 8.3 ms with 2)
but scale across frames (129 frames/s from 2 threads of 1, against 120 from
one of 2). So by default a station runs one worker per usable core, each
session single-threaded, and OpenCV's own thread pool is switched off so the
workers do not fight it for the same cores.

``Workers`` and ``Threads`` are the one statement of what a count may be:
station.yaml's ``inference`` section and the command line's ``--workers`` and
``--threads`` both validate with them, so a value one refuses the other does too,
in the same words.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

#: inspection workers; 0: one per usable core
Workers = Annotated[int, Field(ge=0, le=64)]
#: intra-op threads of each model session; 0: the cores shared out among the workers
Threads = Annotated[int, Field(ge=0, le=256)]


@cache
def _adapter(rule: Any) -> TypeAdapter[int]:
    return TypeAdapter(rule)


def check(rule: Any, value: int) -> int:
    """``value`` if ``rule`` (Workers or Threads) allows it, else ValueError in the config's words."""
    try:
        return _adapter(rule).validate_python(value, strict=True)
    except ValidationError as exc:
        raise ValueError("; ".join(err["msg"] for err in exc.errors())) from None


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))  # honours taskset and systemd CPUAffinity
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Plan:
    workers: int
    threads_per_session: int


def plan(workers: int = 0, threads: int = 0) -> Plan:
    """``workers`` 0: one per usable core; ``threads`` 0: the cores shared out among the workers.

    Out-of-range counts raise ValueError: a negative one used to mean "all cores" here while
    station.yaml refused it.
    """
    workers, threads = check(Workers, workers), check(Threads, threads)
    cores = usable_cores()
    w = workers if workers > 0 else cores
    t = threads if threads > 0 else max(1, cores // w)
    return Plan(w, t)


def apply(p: Plan) -> None:
    """Process-wide: with several workers, OpenCV runs each call on the calling worker's core."""
    import cv2  # here, not at the top: the command line imports the rules above to parse its options

    if p.workers > 1:
        cv2.setNumThreads(1)
