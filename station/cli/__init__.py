"""The `station` command. Errors a user can act on become one line and an exit code.

Exit codes (station/errors.py): 0 ok, 2 usage or config error (argparse's own
refusals included), 1 runtime failure.

One module per command or small group of commands, each declaring its options
beside its handler: ``register*(sub)`` adds the parser and sets its ``handler``.
Serving commands (run, replay, subscribe) never import torch; `train` does,
lazily, and says which extra to install when it is missing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from station import __version__
from station.cli import bench, bridge, data, evaluate, export, plantsim, replay, run, subscribe, train, ui
from station.errors import EXIT_OK, StationError

if TYPE_CHECKING:
    from station.cli._args import Handler, Subparsers

#: in the order `station --help` lists them
COMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    data.register_synth,
    data.register_perturb,
    train.register_train,
    replay.register,
    evaluate.register_evaluate,
    evaluate.register_calibrate,
    train.register_adapt,
    subscribe.register_subscribe,
    subscribe.register_keys,
    bridge.register_bridge,
    plantsim.register,
    bridge.register_mes_query,
    run.register,
    bench.register_bench,
    bench.register_soak,
    train.register_loso,
    ui.register,
    export.register_export,
    export.register_build_engine,
)

#: commands whose lifecycle log lines would bury their report (bench runs the station several times)
QUIET_COMMANDS = ("bench", "soak")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="station",
        description="Edge inspection station for bottling lines: pass/fail verdicts for every bottle over ZeroMQ.",
    )
    p.add_argument("--version", action="version", version=f"station {__version__}")
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":  # run configures logging from station.yaml's log_level
        from station.service.logsetup import configure_logging

        configure_logging(args.log_level or ("warning" if args.command in QUIET_COMMANDS else "info"))
    handler: Handler = args.handler
    try:
        return handler(args)
    except StationError as exc:
        print(f"station {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"station {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
