"""CURVE encryption and a ZAP allow-list of client keys for the station's ZeroMQ endpoint.

Keys are ZeroMQ certificate files (``zmq.auth`` format): ``NAME.key`` holds the
public key and may be handed out; ``NAME.key_secret`` holds both and stays on
its machine. The station serves with its secret key; a bridge connects with its
own secret key and the station's public key. The station admits only clients
whose public key file is in ``allowed_clients`` (ZAP, run by pyzmq's
ThreadAuthenticator); any other subscriber, or one without CURVE, receives
nothing at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from station.errors import ConfigError, MissingDependencyError


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise MissingDependencyError("this libzmq was built without CURVE (libsodium); install pyzmq's wheel")


def generate_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """Write ``folder/name.key`` (public) and ``folder/name.key_secret`` (mode 0600); never overwrite."""
    _require_curve()
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise ConfigError(f"{path} exists; remove it first if you mean to replace that key")
    folder.mkdir(parents=True, exist_ok=True)
    made_public, made_secret = zmq.auth.create_certificates(folder, name)
    os.chmod(made_secret, 0o600)
    return Path(made_public), Path(made_secret)


def _load(path: Path, key: str, need_secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise ConfigError(f"{key}: key file {path} does not exist")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: {path} is not a ZeroMQ key file: {exc}") from exc
    if need_secret and secret is None:
        raise ConfigError(f"{key}: {path} holds no secret key (use the .key_secret file)")
    return public, secret


@dataclass(frozen=True)
class ServerKeys:
    secret_key: Path  # the station's NAME.key_secret
    allowed_clients: Path  # folder of the clients' NAME.key files


@dataclass(frozen=True)
class ClientKeys:
    server_key: Path  # the station's NAME.key
    client_secret_key: Path  # this client's NAME.key_secret


def _allowed(folder: Path, key: str) -> list[Path]:
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is not a folder of client .key files")
    return sorted(folder.glob("*.key"))


class CurveServer:
    """Serves ``socket`` encrypted, admitting only the allow-listed client keys; stop() at close."""

    def __init__(self, keys: ServerKeys, context: zmq.Context[Any], key_prefix: str = "publish.curve") -> None:
        _require_curve()
        self.public, self._secret = _load(keys.secret_key, f"{key_prefix}.secret_key", need_secret=True)
        self.allowed = _allowed(keys.allowed_clients, f"{key_prefix}.allowed_clients")
        self._auth = ThreadAuthenticator(context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(keys.allowed_clients))

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Before bind."""
        socket.curve_secretkey = self._secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def stop(self) -> None:
        self._auth.stop()


def apply_client(socket: zmq.Socket[Any], keys: ClientKeys) -> None:
    """Before connect."""
    _require_curve()
    server_public, _ = _load(keys.server_key, "--curve-server-key", need_secret=False)
    public, secret = _load(keys.client_secret_key, "--curve-client-key", need_secret=True)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = server_public
