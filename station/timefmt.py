"""UTC ISO-8601 timestamps with milliseconds, as in every message."""

from __future__ import annotations

from datetime import datetime, timezone


def iso_utc(epoch_s: float) -> str:
    dt = datetime.fromtimestamp(epoch_s, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
