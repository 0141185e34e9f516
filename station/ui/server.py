"""The HTTP side: standard library ThreadingHTTPServer, static files from the package, JSON, SSE and images.

Why the standard library: the page needs a dozen routes, server-sent events
and static files; a framework would add a dependency to install, audit and
patch on every plant PC for none of that. One thread per connection; the
number of live event streams is capped, and every socket has a timeout, so a
browser that stops reading costs one thread for at most SOCKET_TIMEOUT_S.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import structlog

from station.errors import StationError
from station.ui.api import ApiError, UiApp
from station.ui.guard import refuse_post
from station.ui.images import Thumbnails
from station.ui.rejects import IMAGE_SUFFIXES, resolve

log = structlog.get_logger("station.ui")

SOCKET_TIMEOUT_S = 30
MAX_EVENT_STREAMS = 32
MAX_BODY_BYTES = 4096
#: at most this many event-stream messages a second per browser: a burst of verdicts is batched
EVENT_MIN_GAP_S = 0.2
#: and at least one a second, so a silent station shows as silent
EVENT_MAX_GAP_S = 1.0
SECURITY_HEADERS = {
    # Everything the page uses is served from here: no CDN, font or script from elsewhere can load.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


def load_static() -> dict[str, tuple[bytes, str]]:
    """The page's files, read once from the package: only these names can ever be served as static."""
    files: dict[str, tuple[bytes, str]] = {}
    for item in resources.files("station.ui").joinpath("static").iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in CONTENT_TYPES:
            files[item.name] = (item.read_bytes(), CONTENT_TYPES[suffix])
    return files


class UiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: UiApp) -> None:
        self.app = app
        self.static = load_static()
        self.thumbs = Thumbnails()
        self.streams = threading.BoundedSemaphore(MAX_EVENT_STREAMS)
        self.stopping = threading.Event()
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    server: UiServer
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S
    server_version = "station-ui"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http", peer=self.client_address[0], request=format % args)

    # -- responses -------------------------------------------------------------

    def _head(self, status: int, content_type: str, length: int | None, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", cache)
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str, cache: str = "no-store") -> None:
        self._head(status, content_type, len(body), cache)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value: Any, status: int = 200) -> None:
        self._send(status, json.dumps(value, separators=(",", ":")).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    # -- routing -------------------------------------------------------------

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = dict(parse_qsl(parts.query))
        app = self.server.app
        try:
            if path in ("/", "/index.html"):
                self._static("index.html")
            elif path.startswith("/static/"):
                self._static(path[len("/static/"):])
            elif path.startswith("/archive/"):
                self._image(path[len("/archive/"):], "thumb" in query)
            elif path == "/api/events":
                self._events()
            elif path == "/api/summary":
                self._json(app.summary())
            elif path == "/api/verdicts":
                self._json(app.live.last_rows(min(500, max(1, int(query.get("n", "50") or 50)))))
            elif path == "/api/rejects":
                self._json(app.rejects(query))
            elif path.startswith("/api/rejects/"):
                self._json(app.reject(path[len("/api/rejects/"):], query))
            elif path == "/api/whatif":
                self._json(app.whatif(query))
            else:
                self._error(404, "not found")
        except ApiError as exc:
            self._error(exc.status, str(exc))
        except ValueError as exc:
            self._error(400, str(exc))
        except StationError as exc:  # the reviews file cannot be read: the page shows why
            self._error(500, str(exc))

    def do_POST(self) -> None:
        path = unquote(urlsplit(self.path).path)
        headers = {key.lower(): value for key, value in self.headers.items()}
        refused = refuse_post(headers, self.server.app.settings.token)
        length_text = self.headers.get("Content-Length") or "0"
        length = int(length_text) if length_text.isdigit() else MAX_BODY_BYTES + 1
        if refused is None and not path.startswith("/api/reviews/"):
            refused = "not found"
        if refused is not None or not 0 < length <= MAX_BODY_BYTES:
            self.close_connection = True  # the body, if any, is not read
            status = 404 if refused == "not found" else 403 if refused else 413 if length else 411
            self._error(status, refused or "a review is a small JSON body")
            return
        try:
            body = json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            self._error(400, "the body is not JSON")
            return
        try:
            result = self.server.app.review(path[len("/api/reviews/"):], body)
        except ApiError as exc:
            self._error(exc.status, str(exc))
            return
        except StationError as exc:  # the reviews file could not be written: the page must say it was not saved
            log.error("review_not_saved", error=str(exc))
            self._error(500, str(exc))
            return
        log.info("review", peer=self.client_address[0], **(result.get("review") or {"entry_id": result["id"]}))
        self._json(result)

    # -- bodies ----------------------------------------------------------------

    def _static(self, name: str) -> None:
        found = self.server.static.get(name)
        if found is None:
            self._error(404, "not found")
            return
        self._send(200, found[0], found[1], cache="no-cache")

    def _image(self, rest: str, thumb: bool) -> None:
        """``<day>/<stem>.jpg`` or ``.overlay.jpg`` inside the archive; anything else is 404."""
        index = self.server.app.index
        suffix = next((s for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True) if rest.endswith(s)), None)
        path = resolve(index.root, rest[: -len(suffix)], suffix) if index is not None and suffix else None
        data = None
        if path is not None:
            try:
                data = self.server.thumbs.get(path) if thumb else path.read_bytes()
            except OSError:
                data = None  # pruned between the check and the read
        if data is None:
            self._error(404, "not found")
            return
        self._send(200, data, "image/jpeg", cache="private, max-age=86400")

    def _events(self) -> None:
        """Server-sent events: the summary and the new verdicts, batched, at least once a second."""
        server = self.server
        if self.command == "HEAD":
            self._head(200, "text/event-stream", 0)
            return
        if not server.streams.acquire(blocking=False):
            self._error(503, f"too many open pages (at most {MAX_EVENT_STREAMS})")
            return
        try:
            self.close_connection = True
            self._head(200, "text/event-stream", None)
            live = server.app.live
            cursor = max(0, live.total - 50)
            seen = -1
            while not server.stopping.is_set():
                with live.cond:
                    if live.version == seen and not server.stopping.is_set():
                        live.cond.wait(EVENT_MAX_GAP_S)
                    seen = live.version
                rows, cursor = live.rows_since(cursor)
                payload = json.dumps({"summary": server.app.summary(), "verdicts": rows}, separators=(",", ":"))
                self.wfile.write(f"event: state\ndata: {payload}\n\n".encode())
                self.wfile.flush()
                time.sleep(EVENT_MIN_GAP_S)
        except OSError:
            pass  # the browser went away (closed, reloaded, timed out): nothing to clean up
        finally:
            server.streams.release()
