"""Who may change anything: nobody without the review token, and never a request from another site.

The page is read-only unless a review token is configured. A review is a
POST carrying the token in a header (``X-Review-Token``), which a form on
another site cannot set, and whose Origin and Sec-Fetch-Site, where the
browser sends them, must name this page's own origin. A token typed into the
page stays in that browser tab (sessionStorage).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from pathlib import Path

from station.errors import ConfigError

TOKEN_HEADER = "X-Review-Token"
MIN_TOKEN_CHARS = 12


def load_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--review-token-file: cannot read {path}: {exc}") from exc
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"--review-token-file: {path} holds {len(token)} characters; use at least "
                          f"{MIN_TOKEN_CHARS} (e.g. openssl rand -hex 16 > {path})")
    return token


def refuse_post(headers: Mapping[str, str], token: str | None) -> str | None:
    """Why this POST is refused, or None when it may go ahead; ``headers`` keyed in lower case."""
    if token is None:
        return "read-only: no review token is configured (station ui --review-token-file)"
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-site request refused (Sec-Fetch-Site: {site})"
    origin = headers.get("origin")
    host = headers.get("host")
    if origin is not None and (host is None or origin not in (f"http://{host}", f"https://{host}")):
        return f"cross-origin request refused (Origin: {origin})"
    if not (headers.get("content-type") or "").startswith("application/json"):
        return "a review is a JSON body (Content-Type: application/json)"
    supplied = headers.get(TOKEN_HEADER.lower()) or ""
    if not hmac.compare_digest(supplied.encode(), token.encode()):
        return "wrong or missing review token"
    return None
