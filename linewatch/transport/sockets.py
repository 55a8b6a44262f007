"""The one way the line makes a ZeroMQ socket: bounded queues, bounded linger, CURVE.

Every process opens its context with :func:`transport_context` (which runs the
CURVE authenticator when CURVE is on) and makes each socket with
:func:`make_socket`. High-water marks bound every queue, so a slow stage pushes
back on the one before it instead of growing memory; a bounded linger lets a
closing socket flush what it holds without hanging shutdown on a dead peer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import zmq

from linewatch.config import TransportConfig, endpoint_is_local
from linewatch.errors import ConfigError, LinewatchError
from linewatch.log import get_logger
from linewatch.transport import security

Context = zmq.Context[zmq.Socket[bytes]]
Socket = zmq.Socket[bytes]

SocketKind = Literal["push", "pull", "router", "dealer"]
Mode = Literal["bind", "connect"]

_TYPES: dict[SocketKind, int] = {
    "push": zmq.PUSH,
    "pull": zmq.PULL,
    "router": zmq.ROUTER,
    "dealer": zmq.DEALER,
}

log = get_logger("transport")


@contextmanager
def transport_context(cfg: TransportConfig) -> Iterator[Context]:
    """A context for this process; with CURVE on, its authenticator runs while it is open.

    On exit, sockets still open are closed with the configured linger.
    """
    ctx: Context = zmq.Context()
    try:
        if cfg.curve.enabled:
            security.start_authenticator(ctx, security.require_keys_dir(cfg.curve.keys_dir))
        yield ctx
    finally:
        security.stop_authenticator(ctx)
        ctx.destroy(linger=cfg.linger_ms)


def make_socket(
    ctx: Context,
    kind: SocketKind,
    cfg: TransportConfig,
    bind_or_connect: Mode,
    endpoint: str,
    role: str,
) -> Socket:
    """A socket of ``kind`` bound or connected to ``endpoint``, named ``role`` in errors.

    Binding processes are CURVE servers and connecting ones clients. A socket off
    127.0.0.1/ipc without CURVE is refused, whatever the configuration says.
    """
    if not cfg.curve.enabled and not endpoint_is_local(endpoint):
        raise ConfigError(
            f"{role}: refusing to {bind_or_connect} {endpoint} without CURVE "
            "(set transport.curve.enabled = true, or use 127.0.0.1 / ipc)"
        )
    sock: Socket = ctx.socket(_TYPES[kind])
    try:
        _configure(sock, cfg, bind_or_connect)
        if bind_or_connect == "bind":
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise LinewatchError(f"{role}: cannot {bind_or_connect} {endpoint}: {exc}") from None
    except BaseException:
        sock.close(linger=0)
        raise
    log.debug(
        "socket_ready", role=role, kind=kind, mode=bind_or_connect,
        endpoint=bound_endpoint(sock) if bind_or_connect == "bind" else endpoint,
        curve=cfg.curve.enabled,
    )
    return sock


def bound_endpoint(sock: Socket) -> str:
    """The address a socket is bound to (resolves ``tcp://127.0.0.1:*`` to the port)."""
    endpoint: Any = sock.getsockopt(zmq.LAST_ENDPOINT)
    return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)


def _configure(sock: Socket, cfg: TransportConfig, bind_or_connect: Mode) -> None:
    sock.setsockopt(zmq.SNDHWM, cfg.high_water_mark)
    sock.setsockopt(zmq.RCVHWM, cfg.high_water_mark)
    sock.setsockopt(zmq.LINGER, cfg.linger_ms)
    if not cfg.curve.enabled:
        return
    keys_dir = security.require_keys_dir(cfg.curve.keys_dir)
    if bind_or_connect == "bind":
        security.apply_curve_server(sock, keys_dir)
    else:
        security.apply_curve_client(sock, keys_dir)
