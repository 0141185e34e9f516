"""`station ui …`: its arguments and its process (the stream pump, the archive indexer, the HTTP server).

station/cli.py hands over the words after ``ui`` unparsed, so the station's
own commands never import this package.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Sequence
from pathlib import Path

import structlog

from station.bridges.feed import VerdictFeed
from station.errors import EXIT_OK, ConfigError, StationError
from station.service.security import ClientKeys
from station.service.signals import ShutdownSignals
from station.ui.api import UiApp, UiSettings
from station.ui.guard import load_token
from station.ui.live import LiveState
from station.ui.rejects import RejectIndex
from station.ui.reviews import ReviewStore

log = structlog.get_logger("station.ui")

#: how often the archive folder is looked at for new rejects (a reject shows within about this)
INDEX_INTERVAL_S = 0.5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="station ui", description="The operator's web page: live counters, rejects "
                                "with their evidence, review, what-if, trends (docs/ui.md).")
    p.add_argument("--connect", required=True, metavar="ENDPOINT", help="the station's verdict endpoint")
    p.add_argument("--station-id", default=None, help="only this station (default: all on the endpoint)")
    p.add_argument("--archive", type=Path, default=None, metavar="DIR", help="the station's archive.path (read only)")
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="where the page is served (default 127.0.0.1:8080; 0.0.0.0:8080 for the plant network)")
    p.add_argument("--reviews", type=Path, default=None, metavar="FILE",
                   help="SQLite file of reviews (created if missing); without it the page shows no reviews")
    p.add_argument("--review-token-file", type=Path, default=None, metavar="FILE",
                   help="file holding the token a reviewer types into the page; without it the page is read-only")
    p.add_argument("--recent", type=int, default=20_000, metavar="N",
                   help="verdicts kept in memory for the list and the what-if (default 20000)")
    p.add_argument("--curve-server-key", type=Path, default=None, metavar="FILE.key",
                   help="the station's public key: connect with CURVE encryption")
    p.add_argument("--curve-client-key", type=Path, default=None, metavar="FILE.key_secret",
                   help="this client's secret key; its .key must be in the station's allowed_clients")
    return p


def build_export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="station ui export", description="Reviewed rejects as an MVTec AD folder: "
                                "false rejects → train/good (or test/good), confirmed → test/<class>.")
    p.add_argument("--reviews", type=Path, required=True, metavar="FILE")
    p.add_argument("--archive", type=Path, required=True, metavar="DIR")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="a new folder; station train --data DIR")
    p.add_argument("--good-to", choices=["train", "test"], default="train",
                   help="where false rejects go: train/good (default; also for station calibrate --good) or test/good")
    return p


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen: {text!r} is not HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or "0.0.0.0", int(port)


def main(argv: Sequence[str]) -> int:
    words = list(argv)
    if words[:1] == ["export"]:
        from station.ui.export import run_export

        return run_export(build_export_parser().parse_args(words[1:]))
    return serve(build_parser().parse_args(words))


def _client_keys(args: argparse.Namespace) -> ClientKeys | None:
    if (args.curve_server_key is None) != (args.curve_client_key is None):
        raise ConfigError("--curve-server-key and --curve-client-key go together")
    return ClientKeys(args.curve_server_key, args.curve_client_key) if args.curve_server_key else None


def serve(args: argparse.Namespace) -> int:
    from station.ui.server import UiServer

    address = parse_listen(args.listen)
    if args.recent < 100:
        raise ConfigError("--recent: at least 100")
    token = load_token(args.review_token_file)
    if token is not None and args.reviews is None:
        raise ConfigError("--review-token-file needs --reviews FILE: the reviews have to be kept somewhere")
    if args.archive is not None and args.archive.exists() and not args.archive.is_dir():
        raise ConfigError(f"--archive: {args.archive} is not a folder (the station's archive.path)")
    if args.archive is not None and not args.archive.exists():
        # The station creates it with its first reject; the gallery fills once it does.
        log.warning("archive_missing", archive=str(args.archive))
    store = ReviewStore(args.reviews) if args.reviews is not None else None
    live = LiveState(args.connect, recent_max=args.recent)
    index = RejectIndex(args.archive) if args.archive is not None else None
    if index is not None:
        index.refresh()  # before the first request, so a page opened at start sees the whole gallery
    app = UiApp(UiSettings(args.connect, args.archive, args.reviews, token), live, index, store)
    feed = VerdictFeed(args.connect, station=args.station_id, curve=_client_keys(args))
    try:
        server = UiServer(address, app)
    except OSError as exc:
        feed.close()
        raise StationError(f"--listen {args.listen}: cannot serve there: {exc.strerror or exc}") from exc
    with ShutdownSignals() as signals:
        workers = [threading.Thread(target=_pump, args=(feed, live, signals.stop), name="ui-feed", daemon=True),
                   threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="ui-http",
                                    daemon=True)]
        if index is not None:
            workers.append(threading.Thread(target=_index, args=(index, live, signals.stop), name="ui-archive",
                                            daemon=True))
        for worker in workers:
            worker.start()
        host, port = server.server_address[:2]
        log.info("ui_started", url=f"http://{host!s}:{port}/", connect=args.connect,
                 archive=str(args.archive) if args.archive else None, reviews=str(args.reviews) if store else None,
                 review=token is not None)
        signals.stop.wait()
        server.stopping.set()
        with live.cond:
            live.cond.notify_all()
        server.shutdown()
        server.server_close()
        workers[0].join(2)
    feed.close()
    if store is not None:
        store.close()
    log.info("ui_stopped")
    return EXIT_OK


def _pump(feed: VerdictFeed, live: LiveState, stop: threading.Event) -> None:
    """The verdict stream into the live state; gaps and restarts as the bridges see them."""
    while not stop.is_set():
        before = feed.tracker.missed
        try:
            event = feed.next(0.2)
            if event is None:
                continue
            for note in event.notes:
                log.warning("stream", note=note)
            live.apply(event, missed=feed.tracker.missed - before)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # A malformed message (not the station's, or a newer schema) is skipped, never the end of the page.
            log.warning("message_ignored", error=str(exc))


def _index(index: RejectIndex, live: LiveState, stop: threading.Event) -> None:
    while not stop.is_set():
        before = index.version
        try:
            index.refresh()
        except Exception as exc:  # a failing disk must not end the page; the gallery shows what it had
            log.error("archive_index_failed", error=str(exc), archive=str(index.root))
        if index.version != before:
            live.poke()
        stop.wait(INDEX_INTERVAL_S)
