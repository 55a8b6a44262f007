"""Shared fixtures: one real Redis server for the whole test session, a ZeroMQ receiver."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import structlog
import zmq
from hypothesis import settings

from linewatch.streams.server import EmbeddedRedis
from linewatch.testing import redis_server as _redis_server
from linewatch.testing import tiny_model

# Property tests never fail on time (machines differ), and in CI they draw the same
# examples every run, so a red CI is reproducible.
settings.register_profile("linewatch", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "linewatch")


@pytest.fixture(autouse=True)
def _default_logging() -> Iterator[None]:
    """Undo a test's ``configure()`` (the CLI sets the global log level), so the next
    test's log capture sees what it expects whatever ran before it."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A real redis-server (embedded binary) on a free 127.0.0.1 port, for every test.

    Tests share it, so each writes under its own line name (``line_name``). A test that
    stops the server must start its own with :func:`linewatch.testing.redis_server`.
    """
    with _redis_server() as server:
        yield server


@pytest.fixture()
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A bytes client of the session server."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture()
def pull() -> Iterator[tuple[zmq.Socket[bytes], str]]:
    """A PULL socket on a free 127.0.0.1 port and its endpoint: where an acquisition
    process under test sends its frames and notices."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close(linger=0)
    ctx.term()


@pytest.fixture()
def line_name() -> str:
    """A line name no other test uses, so stream keys never collide."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def tiny_line_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A synthetic data set and a small model trained and calibrated on it (once per session)."""
    return tiny_model(tmp_path_factory.mktemp("tiny-model"))
