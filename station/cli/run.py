"""`station run`: the station as a long-running service (station/service/runner.py builds and closes it)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from station.cli._args import Subparsers


def register(sub: Subparsers) -> None:
    n = sub.add_parser("run", help="run the station as a long-running service")
    n.add_argument("--config", type=Path, required=True, help="station.yaml")
    n.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from station.service.runner import run_station

    return run_station(args.config, args.log_level)
