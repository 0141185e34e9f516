"""Option types and option groups that several commands share.

A value the command line refuses ends as argparse's usage error: exit 2 and a
line naming the option, the same code station.yaml's errors get.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from station.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeAlias

    from station.core.backends import BackendSpec
    from station.core.parallelism import Plan

    #: what ``ArgumentParser.add_subparsers`` returns; each command module adds its parsers to it
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
    #: a command's handler, set as the parser's default ``handler``: the parsed options in, the exit code out
    Handler: TypeAlias = Callable[[argparse.Namespace], int]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        # The wording argparse itself gives for type=int, which these types replace.
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def positive_int(text: str) -> int:
    """A count that must be at least 1 (epochs, frames, a port's unit of time)."""
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return value


def non_negative_int(text: str) -> int:
    """A count where 0 means something (none, never, off, all): the option's help says what."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return value


def _counted(rule_name: str, text: str) -> int:
    from station.core import parallelism

    try:
        return parallelism.check(getattr(parallelism, rule_name), _int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def workers_count(text: str) -> int:
    """--workers, by station.yaml's rule for inference.workers (station.core.parallelism.Workers)."""
    return _counted("Workers", text)


def threads_count(text: str) -> int:
    """--threads, by station.yaml's rule for inference.threads (station.core.parallelism.Threads)."""
    return _counted("Threads", text)


def instant(text: str) -> str:
    """An ISO-8601 time as the recorder stores them (UTC, milliseconds), so they compare as instants."""
    from station.contract.timefmt import iso_utc_ceil_ms, parse_instant

    try:
        return iso_utc_ceil_ms(parse_instant(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def db_target(text: str) -> Path | str:
    """A PostgreSQL URL as given, anything else as the SQLite file's path."""
    return text if text.startswith(("postgresql://", "postgres://")) else Path(text)


def add_worker_args(p: argparse.ArgumentParser, threads_help: str) -> None:
    p.add_argument("--workers", type=workers_count, default=0, help="inspection workers (0: one per usable core)")
    p.add_argument("--threads", type=threads_count, default=0, help=threads_help)


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                   help="auto: TensorRT where a GPU and TensorRT are present, else ONNX Runtime (default)")
    p.add_argument("--precision", default="auto", metavar="auto|fp32|fp16|int8|classifier=P,autoencoder=P",
                   help="the models' precision on either backend (default auto: the measured best the bundle has)")


def backend_spec(args: argparse.Namespace, plan: Plan, precision: str | None = None) -> BackendSpec:
    from station.core.backends import BackendSpec

    return BackendSpec(args.backend, threads=plan.threads_per_session, precision=precision or args.precision,
                       slots=plan.workers)


def add_feed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve-server-key", type=Path, default=None, metavar="FILE.key",
                   help="the station's public key: connect with CURVE encryption")
    p.add_argument("--curve-client-key", type=Path, default=None, metavar="FILE.key_secret",
                   help="this client's secret key; its .key must be in the station's allowed_clients")


def client_keys(args: argparse.Namespace) -> Any:
    from station.service.security import ClientKeys

    if (args.curve_server_key is None) != (args.curve_client_key is None):
        raise ConfigError("--curve-server-key and --curve-client-key go together")
    return ClientKeys(args.curve_server_key, args.curve_client_key) if args.curve_server_key else None
