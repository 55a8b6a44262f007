"""CURVE keys for the line's sockets, and the authenticator that admits only our clients.

Every binding process is a CURVE server and holds ``server.key_secret``; every
connecting process is a client and holds ``client.key_secret`` plus the server's
public key. The authenticator admits a client only if its public key is one of the
``*.key`` files in the keys folder other than ``server.key``: a client key can be
revoked by deleting its file (and restarting the binding processes), and a key
pair per camera host (``client-cam1.key`` ...) works the same way as the default one.

Without an authenticator, a CURVE server accepts any client that knows its public
key, so :mod:`linewatch.transport.sockets` refuses to bind with CURVE on a context
that has none (see :func:`start_authenticator`).
"""

from __future__ import annotations

import os
import stat
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from linewatch.errors import ConfigError, LinewatchError
from linewatch.log import get_logger

SERVER = "server"
CLIENT = "client"
ZAP_DOMAIN = "linewatch"

log = get_logger("transport")

_authenticators: weakref.WeakKeyDictionary[zmq.Context[Any], ThreadAuthenticator] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair, both halves Z85-encoded as ZeroMQ expects."""

    public: bytes
    secret: bytes


def key_files(keys_dir: Path, name: str) -> tuple[Path, Path]:
    """``(public, secret)`` file paths of key pair ``name`` in ``keys_dir``."""
    return keys_dir / f"{name}.key", keys_dir / f"{name}.key_secret"


def generate_keys(keys_dir: Path, force: bool = False) -> list[Path]:
    """Write a server and a client key pair into ``keys_dir``; return the files written.

    Secret files are made readable by their owner only. Existing keys are kept
    unless ``force``: overwriting them locks out every process still using them.
    """
    wanted = [p for name in (SERVER, CLIENT) for p in key_files(keys_dir, name)]
    existing = [p for p in wanted if p.exists()]
    if existing and not force:
        raise LinewatchError(f"{existing[0]}: key file exists; use --force to replace the keys")
    if not keys_dir.exists():
        # 0700 so that no one else can read a secret key in the instant before its chmod.
        keys_dir.mkdir(mode=0o700, parents=True)
    for name in (SERVER, CLIENT):
        _, secret = key_files(keys_dir, name)
        secret.unlink(missing_ok=True)  # create_certificates writes with the umask's mode
        zmq.auth.create_certificates(keys_dir, name)
        secret.chmod(0o600)
    log.info("keys_generated", keys_dir=str(keys_dir))
    return wanted


def require_keys_dir(keys_dir: Path | None) -> Path:
    """The configured keys folder; a clear error when CURVE is on without one."""
    if keys_dir is None:
        raise ConfigError(
            "transport.curve.keys_dir: not set, but transport.curve.enabled = true "
            "(create keys with: linewatch keys generate DIR)"
        )
    if not keys_dir.is_dir():
        raise ConfigError(f"transport.curve.keys_dir: {keys_dir} is not a folder")
    return keys_dir


def load_key_pair(keys_dir: Path, name: str) -> KeyPair:
    """Load key pair ``name``; refuses a secret file that others can read."""
    _, secret_file = key_files(keys_dir, name)
    public, secret = _load_certificate(secret_file)
    if secret is None:
        raise ConfigError(f"{secret_file}: no secret-key in this file")
    mode = secret_file.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{secret_file}: secret key is accessible to others (mode {stat.filemode(mode)}); "
            f"run: chmod 600 {secret_file}"
        )
    return KeyPair(public, secret)


def load_server_public_key(keys_dir: Path) -> bytes:
    """The server's public key, which every client needs."""
    public, _ = _load_certificate(key_files(keys_dir, SERVER)[0])
    return public


def allowed_client_keys(keys_dir: Path) -> frozenset[bytes]:
    """Public keys of every client admitted: all ``*.key`` files but the server's."""
    server_public = key_files(keys_dir, SERVER)[0]
    return frozenset(
        _load_certificate(path)[0]
        for path in sorted(keys_dir.glob("*.key"))
        if path.name != server_public.name
    )


def apply_curve_server(sock: zmq.Socket[Any], keys_dir: Path) -> None:
    """Make ``sock`` a CURVE server; its context must run an authenticator."""
    if sock.context not in _authenticators:
        raise LinewatchError(
            "CURVE server socket on a context without an authenticator "
            "(use linewatch.transport.sockets.transport_context)"
        )
    pair = load_key_pair(keys_dir, SERVER)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret)
    sock.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)


def apply_curve_client(sock: zmq.Socket[Any], keys_dir: Path, name: str = CLIENT) -> None:
    """Make ``sock`` a CURVE client with key pair ``name``, trusting only our server."""
    pair = load_key_pair(keys_dir, name)
    sock.setsockopt(zmq.CURVE_SERVERKEY, load_server_public_key(keys_dir))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret)


class _AllowedKeys:
    """ZAP credentials provider: admit a client whose public key is in the set."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self._keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self._keys
        if not allowed:
            log.warning("client_refused", domain=domain, public_key=key.decode(errors="replace"))
        return allowed


def start_authenticator(ctx: zmq.Context[Any], keys_dir: Path) -> ThreadAuthenticator:
    """Run ZAP on ``ctx`` admitting only the client keys in ``keys_dir``.

    Call :func:`stop_authenticator` before terminating the context.
    """
    keys = allowed_client_keys(keys_dir)
    if not keys:
        raise ConfigError(f"{keys_dir}: no client public key (*.key) to admit")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=_AllowedKeys(keys))
    _authenticators[ctx] = auth
    log.info("authenticator_started", keys_dir=str(keys_dir), clients=len(keys))
    return auth


def stop_authenticator(ctx: zmq.Context[Any]) -> None:
    """Stop the authenticator of ``ctx``, if it has one."""
    auth = _authenticators.pop(ctx, None)
    if auth is not None:
        auth.stop()


def _load_certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(os.fspath(path))
    except OSError:
        raise ConfigError(
            f"{path}: no such key file (create keys with: linewatch keys generate DIR)"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not a ZeroMQ certificate: {exc}") from None
