"""`station bridge KIND` (the verdict stream to PLC and MES) and `station mes-query` (the recorder's database)."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from station.cli._args import (
    add_feed_args,
    client_keys,
    db_target,
    instant,
    non_negative_int,
    positive_float,
    positive_int,
)
from station.errors import EXIT_OK, ConfigError, MissingDependencyError

if TYPE_CHECKING:
    from station.cli._args import Subparsers

#: the module each bridge needs beyond the serving dependencies (all in the bridges extra)
BRIDGE_EXTRA = {"opcua": "asyncua", "modbus": "pymodbus", "mes": None, "mqtt": "paho"}


def register_bridge(sub: Subparsers) -> None:
    bridge = sub.add_parser("bridge", help="reference bridges from the verdict stream to PLC and MES")
    bridges = bridge.add_subparsers(dest="bridge", required=True, metavar="KIND")
    ou = bridges.add_parser("opcua", help="OPC UA server: last verdict, seq, WS Pack counters, a reject pulse")
    ou.add_argument("--listen", default="opc.tcp://0.0.0.0:4840/station/", help="the server's endpoint URL")
    ou.add_argument("--reject-pulse-ms", type=non_negative_int, default=500,
                    help="how long RejectPulse stays true (0: no pulse)")
    mb = bridges.add_parser("modbus", help="Modbus TCP server: reject coil, vision handshake, counter registers")
    mb.add_argument("--listen", default="0.0.0.0:5020", metavar="HOST:PORT")
    mb.add_argument("--unit", type=non_negative_int, default=1,
                    help="Modbus unit (slave) id (0: answer every unit id)")
    me = bridges.add_parser("mes", help="append every verdict to SQLite or PostgreSQL, with gaps recorded")
    me.add_argument("--db", type=db_target, required=True,
                    help="SQLite file (created if missing) or postgresql://user@host/db (schema created)")
    me.add_argument("--spool", type=Path, default=None, metavar="DIR",
                    help="PostgreSQL only: hold verdicts here while the database is unreachable")
    me.add_argument("--spool-max-mb", type=positive_float, default=1024.0, metavar="N",
                    help="spool bound; a full spool stops the recorder with an error naming the file")
    me.add_argument("--metrics", default=None, metavar="HOST:PORT",
                    help="PostgreSQL only: serve Prometheus metrics (degraded, rows, lag, spool bytes)")
    me.add_argument("--retention-days", type=positive_int, default=None,
                    help="PostgreSQL with TimescaleDB only: drop verdict chunks older than this")
    mt = bridges.add_parser("mqtt", help="verdicts and station state to an MQTT broker: plain JSON or Sparkplug B")
    mt.add_argument("--broker", required=True, metavar="URL", help="mqtt://host:port, or mqtts://host:port for TLS")
    mt.add_argument("--mode", choices=["json", "sparkplug"], default="json")
    mt.add_argument("--prefix", default="station", help="json mode: topics are PREFIX/<station>/verdict|state")
    mt.add_argument("--group", default="bottling", help="sparkplug mode: the Sparkplug group id")
    mt.add_argument("--node", default=socket.gethostname(), help="sparkplug mode: the edge node id (the bridge)")
    mt.add_argument("--client-id", default=None, help="MQTT client id (default: station-bridge-NODE)")
    mt.add_argument("--username", default=None)
    mt.add_argument("--password-file", type=Path, default=None, help="file holding the password (not on argv)")
    mt.add_argument("--tls-ca", type=Path, default=None, help="CA bundle that signed the broker's certificate")
    mt.add_argument("--tls-cert", type=Path, default=None, help="client certificate, for brokers that ask for one")
    mt.add_argument("--tls-key", type=Path, default=None)
    mt.add_argument("--keepalive", type=positive_int, default=15, help="seconds; the will fires after 1.5x")
    for bp in (ou, mb, me, mt):
        many = bp in (me, mt)
        bp.add_argument("--connect", required=True, metavar="ENDPOINT", action="append" if many else "store",
                        help="the station's verdict endpoint" + (" (repeat for several stations)" if many else ""))
        bp.add_argument("--station-id", default=None, help="only this station (default: all)")
        add_feed_args(bp)
    bridge.set_defaults(handler=handle_bridge)


def handle_bridge(args: argparse.Namespace) -> int:
    import importlib
    import importlib.util

    from station.bridges.feed import VerdictFeed
    from station.service.signals import ShutdownSignals

    needed = BRIDGE_EXTRA[args.bridge]
    if needed is not None and importlib.util.find_spec(needed) is None:
        raise MissingDependencyError(f"the {args.bridge} bridge needs {needed}: pip install 'station[bridges]'")
    module = importlib.import_module(f"station.bridges.{args.bridge}")
    feed: VerdictFeed
    if args.bridge in ("mes", "mqtt"):
        from station.bridges.mes_recorder import MultiFeed

        if args.bridge == "mes" and isinstance(args.db, str):
            module = importlib.import_module("station.bridges.mes_recorder")
        elif args.bridge == "mes" and (args.spool is not None or args.metrics is not None):
            raise ConfigError("--spool and --metrics need --db postgresql://…; the SQLite file is local")
        endpoints: list[str] = args.connect
        args.connect = endpoints[0] if len(endpoints) == 1 else endpoints
        feed = MultiFeed(endpoints, station=args.station_id, curve=client_keys(args))
    else:
        feed = VerdictFeed(args.connect, station=args.station_id, curve=client_keys(args))
    options = _bridge_options(args, module.__name__)
    with ShutdownSignals() as signals:
        try:
            rc: int = module.run(options, feed, signals.stop)
        finally:
            feed.close()
    return rc


def _bridge_options(args: argparse.Namespace, module: str) -> object:
    """The typed options of the bridge in ``module`` (station.bridges.<kind>), from its command line."""
    if module == "station.bridges.opcua":
        from station.bridges.opcua import OpcuaOptions

        return OpcuaOptions(listen=args.listen, reject_pulse_ms=args.reject_pulse_ms, connect=args.connect)
    if module == "station.bridges.modbus":
        from station.bridges.modbus import ModbusOptions

        return ModbusOptions(listen=args.listen, unit=args.unit, connect=args.connect)
    if module == "station.bridges.mqtt":
        from station.bridges.mqtt import MqttOptions

        return MqttOptions(broker=args.broker, mode=args.mode, prefix=args.prefix, group=args.group, node=args.node,
                           client_id=args.client_id, username=args.username, password_file=args.password_file,
                           tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                           keepalive=args.keepalive, connect=args.connect)
    if module == "station.bridges.mes_recorder":
        from station.bridges.mes_recorder import PgRecorderOptions

        return PgRecorderOptions(db=args.db, spool=args.spool, spool_max_mb=args.spool_max_mb, metrics=args.metrics,
                                 retention_days=args.retention_days, connect=args.connect)
    from station.bridges.mes import MesOptions

    return MesOptions(db=args.db, connect=args.connect)


def register_mes_query(sub: Subparsers) -> None:
    mq = sub.add_parser("mes-query", help="query the MES recorder's database: verdicts, counts, gaps")
    mq.add_argument("--db", type=db_target, required=True, help="SQLite file or postgresql://… URL")
    mq.add_argument("--verdict", choices=["pass", "fail", "skipped"], default=None)
    mq.add_argument("--since", type=instant, default=None, metavar="ISO8601",
                    help="captured at or after this time (any ISO-8601 offset; none means UTC)")
    mq.add_argument("--until", type=instant, default=None, metavar="ISO8601",
                    help="captured before this time (any ISO-8601 offset; none means UTC)")
    mq.add_argument("--run-id", default=None)
    mq.add_argument("--gaps", action="store_true", help="list the recorded gaps instead of verdicts")
    mq.add_argument("--summary", action="store_true", help="counts by run and verdict instead of verdicts")
    mq.add_argument("--limit", type=non_negative_int, default=0, help="at most N rows (0: all)")
    mq.add_argument("--json", action="store_true", help="one JSON object per line")
    mq.set_defaults(handler=handle_mes_query)


def handle_mes_query(args: argparse.Namespace) -> int:
    from station.bridges.mes import QueryOptions, query

    options = QueryOptions(db=args.db, verdict=args.verdict, since=args.since, until=args.until, run_id=args.run_id,
                           gaps=args.gaps, summary=args.summary, limit=args.limit, json=args.json)
    if isinstance(args.db, str):
        from station.bridges.mes_pg import query_rows

        rows = query_rows(args.db, options)
        for d in rows:
            print(json.dumps(d) if args.json else "  ".join("" if v is None else str(v) for v in d.values()))
        print(f"mes-query: {len(rows)} rows", file=sys.stderr)
        return EXIT_OK
    return query(options)
