"""`station subscribe` (one line per verdict from a station) and `station keys` (CURVE keys for its endpoint)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from station.cli._args import add_feed_args, client_keys, non_negative_int, positive_float
from station.errors import EXIT_OK

if TYPE_CHECKING:
    from station.cli._args import Subparsers


def register_subscribe(sub: Subparsers) -> None:
    c = sub.add_parser("subscribe", help="print one line per verdict from a station")
    c.add_argument("--connect", required=True, metavar="ENDPOINT")
    c.add_argument("--station-id", default=None, help="only this station (default: all)")
    c.add_argument("--count", type=non_negative_int, default=0, help="exit after N verdicts (0: never)")
    c.add_argument("--timeout", type=positive_float, default=None, help="exit after S seconds of silence")
    c.add_argument("--exit-on-stop", action="store_true", help="exit when the station reports it stopped")
    c.add_argument("--json", action="store_true", help="print each verdict as its JSON message")
    add_feed_args(c)
    c.set_defaults(handler=handle_subscribe)


def format_verdict_line(m: dict[str, Any]) -> str:
    verdict = str(m.get("verdict", "?")).upper()
    head = f"#{m.get('seq', '?'):<5} {verdict:<7}"
    total = m.get("latency_ms", {}).get("total")
    tail = f"{m.get('frame_id', '')}" + (f"  {total:.1f} ms" if isinstance(total, (int, float)) else "")
    if m.get("error"):
        err = m["error"]
        return f"{head} error {err.get('reason')}: {err.get('detail')}  [{tail}]"
    if verdict == "SKIPPED":
        return f"{head} {','.join(m.get('reasons', []))}  {tail}"
    cls = m.get("class") or {}
    an = m.get("anomaly") or {}
    reasons = ",".join(m.get("reasons", []))
    truth = m.get("truth")
    return (
        f"{head} {cls.get('label', '?'):<14} {cls.get('confidence', 0):.2f}  "
        f"anomaly {an.get('score', 0):.4f}/{an.get('threshold', 0):.4f}"
        + (f"  [{reasons}]" if reasons else "")
        + (f"  truth={truth}" if truth else "")
        + f"  {tail}"
    )


def handle_subscribe(args: argparse.Namespace) -> int:
    from station.bridges.feed import VerdictFeed
    from station.service.signals import ShutdownSignals

    feed = VerdictFeed(args.connect, station=args.station_id, curve=client_keys(args))
    tracker = feed.tracker
    outcome: dict[str, int] = {}
    with ShutdownSignals() as signals:
        try:
            _subscribe_loop(args, feed, signals.stop, outcome)
        finally:
            feed.close()
    parts = ", ".join(f"{k} {v}" for k, v in sorted(outcome.items()))
    print(f"subscribe: {sum(outcome.values())} verdicts ({parts}); {tracker.gaps} gaps, {tracker.missed} missed",
          file=sys.stderr, flush=True)
    return EXIT_OK


def _subscribe_loop(args: argparse.Namespace, feed: Any, stop: threading.Event, outcome: dict[str, int]) -> None:
    """Print verdicts until stopped, the count is reached, the station stops (--exit-on-stop) or silence."""
    tracker = feed.tracker
    received = 0
    while not stop.is_set():
        event = feed.next(args.timeout if args.timeout else 0.5)
        if event is None:
            if args.timeout:
                print(f"subscribe: no message for {args.timeout:g} s, exiting", file=sys.stderr)
                return
            continue
        for note in event.notes:
            print(f"subscribe: warning: {note}", file=sys.stderr, flush=True)
        m = event.message
        if event.kind == "heartbeat":
            stopped = m.get("state") == "stopped" and m.get("run_id") == tracker.run_id
            if args.exit_on_stop and stopped and m.get("next_seq") == tracker.expected:
                return
            continue
        if event.kind == "welcome":
            print(f"subscribe: connected to {m.get('station')} run {m.get('run_id')}, state {m.get('state')}, "
                  f"next seq {m.get('next_seq')}", file=sys.stderr, flush=True)
            continue
        received += 1
        outcome[m.get("verdict", "?")] = outcome.get(m.get("verdict", "?"), 0) + 1
        line = json.dumps(m, ensure_ascii=False) if args.json else format_verdict_line(m)
        print(line, flush=True)
        if args.count and received >= args.count:
            return


def register_keys(sub: Subparsers) -> None:
    keys = sub.add_parser("keys", help="CURVE keys for the verdict endpoint (docs/integration.md)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kg = keys_sub.add_parser("generate", help="write OUT/NAME.key (public) and OUT/NAME.key_secret (secret, 0600)")
    kg.add_argument("--out", type=Path, required=True, help="folder for the key files")
    kg.add_argument("--name", required=True, help="e.g. station-line1, or the bridge's host name")
    keys.set_defaults(handler=handle_keys)


def handle_keys(args: argparse.Namespace) -> int:
    from station.service.security import generate_keys

    public, secret = generate_keys(args.out, args.name)
    print(f"public key (hand out; clients' go in the station's allowed_clients folder): {public}")
    print(f"secret key (keep on this machine, mode 0600): {secret}")
    return EXIT_OK
