"""Exceptions a user can act on, each mapped to an exit code at the CLI edge.

Exit codes (README.md, "Layout"; docs/service.md for `station run` under systemd): 0 ok, 2 usage or config
error, 1 runtime failure.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class StationError(Exception):
    """Base class: a failure with a message meant for the operator."""

    exit_code = EXIT_RUNTIME


class ConfigError(StationError):
    """station.yaml (or a command-line value) is missing, malformed or invalid."""

    exit_code = EXIT_USAGE


class BundleError(StationError):
    """A model bundle is missing, incomplete, corrupt or inconsistent."""

    exit_code = EXIT_USAGE


class DatasetError(StationError):
    """A training or evaluation folder is missing or not in the expected layout."""

    exit_code = EXIT_USAGE


class SourceError(StationError):
    """A frame source (folder, camera) cannot be opened or has gone away."""

    exit_code = EXIT_RUNTIME


class BackendError(StationError):
    """An inference backend could not load or run a model."""

    exit_code = EXIT_RUNTIME


class PublishError(StationError):
    """The ZeroMQ endpoint could not be bound or connected."""

    exit_code = EXIT_RUNTIME


class MissingDependencyError(StationError):
    """An optional extra (train, tensorrt, camera) is needed but not installed."""

    exit_code = EXIT_USAGE


class FrameError(Exception):
    """A single frame cannot be inspected; becomes a ``fail`` verdict, never a crash.

    ``reason`` is the verdict reason code (e.g. ``unreadable_image``).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
