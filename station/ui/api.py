"""What each page route answers, as JSON: kept apart from the HTTP plumbing so it reads (and tests) plainly."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from station import __version__
from station.contract.timefmt import iso_utc_ceil_ms, parse_instant
from station.core.defect_rule import DEFECT_SUM, TOP_CLASS, DefectRule
from station.ui.live import LiveState
from station.ui.rejects import Reject, RejectIndex, matches
from station.ui.reviews import CONFIRMED, FALSE_REJECT, OUTCOMES, Review, ReviewStore, defect_classes
from station.ui.whatif import Rule, evaluate

MAX_PAGE = 200
REVIEW_STATES = ("unreviewed", "reviewed", *OUTCOMES)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class UiSettings:
    endpoint: str
    archive: Path | None
    reviews: Path | None
    token: str | None


def _float(query: dict[str, str], key: str, required: bool = False) -> float | None:
    text = query.get(key, "").strip()
    if not text:
        if required:
            raise ApiError(400, f"{key}: a number is required")
        return None
    try:
        return float(text)
    except ValueError:
        raise ApiError(400, f"{key}: {text!r} is not a number") from None


def _int(query: dict[str, str], key: str, default: int, lo: int, hi: int) -> int:
    text = query.get(key, "").strip()
    try:
        value = int(text) if text else default
    except ValueError:
        raise ApiError(400, f"{key}: {text!r} is not a whole number") from None
    return max(lo, min(hi, value))


def _instant(query: dict[str, str], key: str) -> str | None:
    text = query.get(key, "").strip()
    if not text:
        return None
    try:
        return iso_utc_ceil_ms(parse_instant(text))
    except ValueError as exc:
        raise ApiError(400, f"{key}: {exc}") from None


class UiApp:
    def __init__(self, settings: UiSettings, live: LiveState, index: RejectIndex | None,
                 store: ReviewStore | None) -> None:
        self.settings = settings
        self.live = live
        self.index = index
        self.store = store
        self._review_counts: tuple[tuple[int, int], dict[str, int]] | None = None

    def _reviews(self) -> dict[str, Review]:
        return self.store.all() if self.store is not None else {}

    def summary(self) -> dict[str, Any]:
        return {**self.live.summary(), "archive": self._archive_state(), "reviews": self._review_state(),
                "version": __version__}

    def _archive_state(self) -> dict[str, Any]:
        if self.index is None:
            return {"enabled": False}
        return {"enabled": True, "count": self.index.count(), "latest": self.index.latest,
                "version": self.index.version}

    def _review_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"enabled": self.store is not None, "writable": self.settings.token is not None}
        if self.store is None or self.index is None:
            return state
        key = (self.index.version, self.store.version)
        if self._review_counts is None or self._review_counts[0] != key:
            reviews = self.store.all()
            counts = Counter(r.outcome for r in reviews.values())
            unreviewed = sum(1 for r in self.index.all() if r.id not in reviews)
            self._review_counts = (key, {"confirmed": counts[CONFIRMED], "false_reject": counts[FALSE_REJECT],
                                         "unreviewed": unreviewed})
        return {**state, **self._review_counts[1]}

    def _select(self, query: dict[str, str]) -> tuple[list[Reject], dict[str, Review], dict[str, Any]]:
        """The archive entries matching the gallery's filters, newest first, with the facets for its menus."""
        if self.index is None:
            raise ApiError(404, "no reject archive: start station ui with --archive DIR")
        review_state = query.get("review") or None
        if review_state is not None and review_state not in REVIEW_STATES:
            raise ApiError(400, f"review: one of {', '.join(REVIEW_STATES)}")
        label, reason = query.get("label") or None, query.get("reason") or None
        since, until = _instant(query, "since"), _instant(query, "until")
        reviews = self._reviews()
        labels: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        selected = []
        for r in self.index.all():
            labels[r.label] += 1
            reasons.update(r.message.get("reasons") or [])
            review = reviews.get(r.id)
            if matches(r, review.outcome if review else None, label, reason, since, until, review_state):
                selected.append(r)
        return selected, reviews, {"labels": dict(sorted(labels.items())), "reasons": dict(sorted(reasons.items()))}

    def rejects(self, query: dict[str, str]) -> dict[str, Any]:
        selected, reviews, facets = self._select(query)
        offset = _int(query, "offset", 0, 0, 10**9)
        limit = _int(query, "limit", 60, 1, MAX_PAGE)
        items = []
        for r in selected[offset: offset + limit]:
            review = reviews.get(r.id)
            items.append({**r.card(), "review": review.as_dict() if review else None})
        return {"total": len(selected), "offset": offset, "items": items, **facets}

    def reject(self, entry_id: str, query: dict[str, str]) -> dict[str, Any]:
        """One reject in full, with its newer and older neighbours under the same filters (for j/k and the queue)."""
        r = self.index.get(entry_id) if self.index is not None else None
        if r is None:
            raise ApiError(404, f"no reject {entry_id} in the archive")
        selected, reviews, _ = self._select(query)
        ids = [s.id for s in selected]
        at = ids.index(entry_id) if entry_id in ids else -1
        newer = ids[at - 1] if at > 0 else None
        older = ids[at + 1] if 0 <= at < len(ids) - 1 else (ids[0] if at < 0 and ids else None)
        review = reviews.get(entry_id)
        return {**r.card(), "message": r.message, "review": review.as_dict() if review else None,
                "classes": defect_classes(r.message), "newer": newer, "older": older,
                "position": at + 1 if at >= 0 else None, "of": len(ids)}

    def review(self, entry_id: str, body: Any) -> dict[str, Any]:
        if self.store is None:
            raise ApiError(403, "reviews are off: start station ui with --reviews FILE")
        r = self.index.get(entry_id) if self.index is not None else None
        if r is None:
            raise ApiError(404, f"no reject {entry_id} in the archive")
        if not isinstance(body, dict):
            raise ApiError(400, 'the body is {"outcome": "confirmed"|"false_reject"|null, "true_class": …}')
        outcome = body.get("outcome")
        if outcome is None:
            self.store.clear(entry_id)
            return {"id": entry_id, "review": None}
        true_class = body.get("true_class")
        try:
            saved = self.store.set(entry_id, str(outcome), true_class if isinstance(true_class, str) else None,
                                   r.message)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        self.live.poke()
        return {"id": entry_id, "review": saved.as_dict()}

    def whatif(self, query: dict[str, str]) -> dict[str, Any]:
        threshold = _float(query, "threshold", required=True)
        confidence = _float(query, "class_confidence")
        if confidence is not None and not 0 < confidence <= 1:
            raise ApiError(400, "class_confidence: between 0 (exclusive) and 1")
        support = _float(query, "classifier_min_anomaly")
        if support is not None and support < 0:
            raise ApiError(400, "classifier_min_anomaly: 0 or more")
        defect_rule = query.get("defect_rule", DEFECT_SUM)
        if defect_rule not in (TOP_CLASS, DEFECT_SUM):
            raise ApiError(400, f"defect_rule: {TOP_CLASS} or {DEFECT_SUM}")
        n = _int(query, "n", 1000, 1, self.live.recent.maxlen or 1)
        assert threshold is not None
        return evaluate(self.live.last_rows(n), self._reviews(),
                        Rule(threshold, confidence, support or 0.0, cast(DefectRule, defect_rule)))
