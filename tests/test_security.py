"""CURVE keys, the authenticator, and the socket factory's refusals, with real sockets."""

from __future__ import annotations

import contextlib
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from linewatch.cli import main as cli_main
from linewatch.config import CurveConfig, TransportConfig
from linewatch.errors import ConfigError, LinewatchError
from linewatch.transport.codec import decode_decision_message, encode_frame
from linewatch.transport.dispatcher import Dispatcher
from linewatch.transport.security import (
    allowed_client_keys,
    generate_keys,
    key_files,
    load_key_pair,
)
from linewatch.transport.sockets import (
    Context,
    bound_endpoint,
    make_socket,
    transport_context,
)
from linewatch.transport.worker_link import WorkerLink
from linewatch.wire import DecisionMessage, Frame, FrameAnnounce, FrameHeader, ResultHeader

ANY_PORT = "tcp://127.0.0.1:*"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    keys_dir = tmp_path / "keys"
    generate_keys(keys_dir)
    return keys_dir


def curve_cfg(keys_dir: Path | None, **endpoints: str) -> TransportConfig:
    return TransportConfig(curve=CurveConfig(enabled=True, keys_dir=keys_dir), **endpoints)


@pytest.fixture
def plain_ctx() -> Iterator[Context]:
    ctx: Context = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_generate_keys_writes_private_secrets_and_refuses_to_overwrite(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    written = generate_keys(keys_dir)
    assert sorted(p.name for p in written) == [
        "client.key", "client.key_secret", "server.key", "server.key_secret",
    ]
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    for name in ("server", "client"):
        assert stat.S_IMODE(key_files(keys_dir, name)[1].stat().st_mode) == 0o600
    before = load_key_pair(keys_dir, "server")

    with pytest.raises(LinewatchError, match=r"server\.key: key file exists; use --force"):
        generate_keys(keys_dir)
    assert load_key_pair(keys_dir, "server") == before
    generate_keys(keys_dir, force=True)
    assert load_key_pair(keys_dir, "server") != before


def test_keys_generate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys_dir = tmp_path / "k"
    assert cli_main(["keys", "generate", str(keys_dir)]) == 0
    assert str(keys_dir / "server.key_secret") in capsys.readouterr().out
    assert cli_main(["keys", "generate", str(keys_dir)]) == 1
    assert "key file exists; use --force" in capsys.readouterr().err
    assert cli_main(["keys", "generate", str(keys_dir), "--force"]) == 0


def test_secret_key_readable_by_others_is_refused(keys: Path) -> None:
    secret = key_files(keys, "client")[1]
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=r"client\.key_secret: secret key is accessible"):
        load_key_pair(keys, "client")


def test_missing_key_files_and_keys_dir_are_named(tmp_path: Path, plain_ctx: Context) -> None:
    with pytest.raises(ConfigError, match=r"keys_dir: not set"), transport_context(curve_cfg(None)):
        pass
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = curve_cfg(empty)
    with pytest.raises(ConfigError, match=r"client\.key_secret: no such key file"):
        make_socket(plain_ctx, "push", cfg, "connect", "tcp://127.0.0.1:5999", "test.client")


def test_allowed_clients_are_every_public_key_but_the_servers(keys: Path) -> None:
    generate_keys(keys / "cam1")
    (keys / "cam1" / "client.key").rename(keys / "client-cam1.key")
    allowed = allowed_client_keys(keys)
    assert load_key_pair(keys, "client").public in allowed
    assert load_key_pair(keys, "server").public not in allowed
    assert len(allowed) == 2


def test_make_socket_refuses_exposed_endpoints_without_curve(plain_ctx: Context) -> None:
    cfg = TransportConfig()
    for mode in ("bind", "connect"):
        with pytest.raises(ConfigError, match=r"test\.role: refusing to .* without CURVE"):
            make_socket(plain_ctx, "pull", cfg, mode, "tcp://192.0.2.7:5555", "test.role")


def test_curve_server_needs_an_authenticator(keys: Path, plain_ctx: Context) -> None:
    with pytest.raises(LinewatchError, match="without an authenticator"):
        make_socket(plain_ctx, "pull", curve_cfg(keys), "bind", ANY_PORT, "test.server")


def test_only_clients_with_our_keys_get_through(keys: Path, tmp_path: Path) -> None:
    cfg = curve_cfg(keys)
    with transport_context(cfg) as server_ctx:
        server = make_socket(server_ctx, "pull", cfg, "bind", ANY_PORT, "test.server")
        endpoint = bound_endpoint(server)
        monitor = server.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        client_ctx: Context = zmq.Context()
        try:
            # No CURVE at all, and CURVE with a key pair the server does not know.
            plain = client_ctx.socket(zmq.PUSH)
            plain.connect(endpoint)
            with contextlib.suppress(zmq.Again):  # refused before queueing is fine too
                plain.send(b"plain", zmq.NOBLOCK)
            stranger_dir = tmp_path / "stranger"
            generate_keys(stranger_dir)
            (stranger_dir / "server.key").write_bytes((keys / "server.key").read_bytes())
            stranger = make_socket(client_ctx, "push", curve_cfg(stranger_dir), "connect",
                                   endpoint, "test.stranger")
            with contextlib.suppress(zmq.Again):
                stranger.send(b"stranger", zmq.NOBLOCK)
            good = make_socket(client_ctx, "push", cfg, "connect", endpoint, "test.client")
            good.send(b"good")

            # The authenticator turned the stranger away (it asked; it did not just time out).
            assert monitor.poll(10_000), "no client was refused by the authenticator"
            event = recv_monitor_message(monitor)
            assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
            assert server.poll(10_000), "the client with our keys got nothing through"
            assert server.recv() == b"good"
            # The others had as long as the good client and more: nothing came from them.
            assert not server.poll(1000)
        finally:
            client_ctx.destroy(linger=0)
            server.disable_monitor()
            monitor.close(linger=0)


def test_a_line_under_curve_moves_frames_end_to_end(keys: Path) -> None:
    cfg = curve_cfg(keys, frames_endpoint=ANY_PORT, workers_endpoint=ANY_PORT)
    with transport_context(cfg) as ctx:
        decision = make_socket(ctx, "pull", cfg, "bind", ANY_PORT, "test.decision")
        cfg = cfg.model_copy(update={"results_endpoint": bound_endpoint(decision)})
        dispatcher = Dispatcher(cfg, ctx)
        cfg = cfg.model_copy(update={"frames_endpoint": dispatcher.frames_endpoint,
                                     "workers_endpoint": dispatcher.workers_endpoint})
        camera = make_socket(ctx, "push", cfg, "connect", cfg.frames_endpoint, "test.camera")
        header = FrameHeader(camera="cam0", seq=7, part_id="p", ts_acquired_ns=time.time_ns(),
                             deadline_ns=time.time_ns() + 60 * 10**9, dtype="uint8",
                             shape=(4, 4))
        camera.send_multipart(encode_frame(header, np.full((4, 4), 7, np.uint8)), copy=False)
        with WorkerLink(cfg, "w0", max_batch=1, ctx=ctx) as link:
            got: list[Frame] = []
            give_up = time.monotonic() + 15
            while not got:
                assert time.monotonic() < give_up, "no frame reached the worker"
                dispatcher.step(5)
                got = link.poll(5)
            result = ResultHeader(
                frame=got[0].header, score=0.1, map_dtype="uint8", map_shape=(1, 1),
                model_id="m", threshold_version="t", threshold=1.0, worker="w0",
                ts_infer_start_ns=0, ts_infer_end_ns=0, batch_size=1,
            )
            link.send_result(result, got[0].pixels[:1, :1].copy())
            messages: list[tuple[DecisionMessage, np.ndarray | None]] = []
            while len(messages) < 2:
                assert decision.poll(15_000), "decision got nothing"
                messages.append(decode_decision_message(decision.recv_multipart(copy=False)))
        # The announcement and the result travel on different connections (the dispatcher's
        # and the worker's), so either may arrive first; decision accepts both orders.
        announced = [m for m in messages if isinstance(m[0], FrameAnnounce)]
        results = [m for m in messages if isinstance(m[0], ResultHeader)]
        assert [m[0] for m in announced] == [FrameAnnounce(frame=header)]
        assert [m[0] for m in results] == [result]
        stored_map = results[0][1]
        assert stored_map is not None and int(stored_map[0, 0]) == 7
        dispatcher.close()
