"""UTC ISO-8601 timestamps with milliseconds, as in every message."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone


def _iso_ms(utc: datetime) -> str:
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def iso_utc(epoch_s: float) -> str:
    return _iso_ms(datetime.fromtimestamp(epoch_s, tz=timezone.utc))


#: what ``parse_instant`` accepts, for error messages
INSTANT_FORMS = ("2026-12-02T05:00:00Z", "2026-12-02T05:00:00.250+01:00", "2026-12-02 05:00", "2026-12-02")


def parse_instant(text: str) -> datetime:
    """An ISO-8601 date or date-time as an aware UTC datetime; no offset means UTC.

    ValueError, naming the accepted forms, for anything else ("yesterday", "12/02").
    """
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO-8601 time; use e.g. {', '.join(INSTANT_FORMS)} "
                         "(UTC when no offset is given)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def iso_utc_ceil_ms(dt: datetime) -> str:
    """``dt`` in the messages' own form, rounded up to the millisecond.

    Timestamps in messages are fixed-width UTC text with milliseconds, so they
    order as text exactly as they order in time; a bound in the same form
    compares as an instant. Rounding up keeps ``>=`` and ``<`` exact for
    millisecond values: t >= s ⇔ t >= ceil(s), t < u ⇔ t < ceil(u).
    """
    utc = dt.astimezone(timezone.utc)
    whole = utc.replace(microsecond=(utc.microsecond // 1000) * 1000)
    if whole != utc:
        whole += timedelta(milliseconds=1)
    return _iso_ms(whole)


def instant_of(timestamp: str) -> datetime:
    """A message's timestamp (``iso_utc``'s form) as an aware UTC datetime."""
    # Python 3.10 (a Jetson's) does not read a trailing Z.
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).astimezone(timezone.utc)
