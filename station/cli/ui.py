"""`station ui`: the operator's web page; station/ui/cli.py parses its words, so no other command imports the UI."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from station.cli._args import Subparsers


def register(sub: Subparsers) -> None:
    ui = sub.add_parser("ui", help="the operator's web page; `station ui export`: reviewed rejects for training",
                        add_help=False, prefix_chars="+")
    ui.add_argument("ui_args", nargs=argparse.REMAINDER, metavar="ARGS", help="see `station ui --help`")
    ui.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from station.ui.cli import main as ui_main

    return ui_main(args.ui_args)
