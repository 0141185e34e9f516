"""`station plantsim`: a load test of the recorder (and an MQTT bridge) with simulated stations."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from station.cli._args import positive_float, positive_int
from station.errors import EXIT_OK, EXIT_RUNTIME, ConfigError

if TYPE_CHECKING:
    from station.cli._args import Subparsers


def register(sub: Subparsers) -> None:
    ps = sub.add_parser("plantsim", help="load test: simulated stations into one PostgreSQL recorder (and MQTT)")
    ps.add_argument("--db", required=True, help="postgresql://… (the recorder's database)")
    ps.add_argument("--broker", default=None, metavar="URL", help="also run an MQTT bridge to mqtt://host:port")
    ps.add_argument("--stations", type=positive_int, default=20)
    ps.add_argument("--rate", type=positive_float, default=60.0, help="verdicts per second per station")
    ps.add_argument("--count", type=positive_int, default=600, help="verdicts per station")
    ps.add_argument("--json", action="store_true", help="print the report as one JSON object too")
    ps.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from station.bridges.mes_pg import is_pg_url
    from station.tools.plantsim import plantsim

    if not is_pg_url(args.db):
        raise ConfigError(f"--db {args.db!r}: plantsim needs a postgresql://… URL")
    report = plantsim(args.stations, args.rate, args.count, args.db, args.broker, sys.stderr)
    if args.json:
        print(json.dumps(report))
    ok = report["rows_written"] == report["published"] and report["gaps"] == 0
    return EXIT_OK if ok else EXIT_RUNTIME
