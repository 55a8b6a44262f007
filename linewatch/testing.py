"""Helpers for tests of linewatch and of code built on it: a real Redis, stream readers.

>>> with redis_server() as server:                       # doctest: +SKIP
...     client = redis.Redis.from_url(server.url)
...     read_records(client, "line1", VerdictRecord)
[]
"""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

import redis

from linewatch.streams.records import (
    DefectRecord,
    RejectRecord,
    StreamKeys,
    StreamRecord,
    VerdictBatch,
    VerdictRecord,
)
from linewatch.streams.server import EmbeddedRedis, free_port
from linewatch.wire import FrameHeader

if TYPE_CHECKING:
    from linewatch.runtime.line import LineRunner

__all__ = [
    "frame_header",
    "free_port",
    "read_records",
    "read_stream",
    "redis_server",
    "running_line",
    "sample_batch",
    "silent_listener",
    "tiny_model",
    "wait_until",
]

R = TypeVar("R", bound=StreamRecord)
T = TypeVar("T")


@contextmanager
def redis_server(directory: Path | str | None = None, aof: bool = False) -> Iterator[EmbeddedRedis]:
    """A running embedded Redis on a free 127.0.0.1 port, its data in ``directory``
    (a temporary folder, removed afterwards, when None); stopped on exit."""
    with (
        tempfile.TemporaryDirectory(prefix="linewatch-redis-") as tmp,
        EmbeddedRedis(Path(directory or tmp), aof=aof) as server,
    ):
        yield server


@contextmanager
def silent_listener(port: int = 0) -> Iterator[int]:
    """A TCP port on 127.0.0.1 that takes connections and never answers; yields the port.

    Connections complete in the kernel's backlog and then nothing is read or written, as
    with a server whose host drops packets: a client waits for its timeout instead of
    being refused. ``port`` 0 picks a free one; a given one (a stopped server's) is reused.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        yield int(listener.getsockname()[1])
    finally:
        listener.close()


def read_stream(client: redis.Redis, key: str, record_type: type[R]) -> list[R]:
    """Every entry of stream ``key``, oldest first, parsed as ``record_type``."""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(key))
    return [record_type.from_fields(fields) for _, fields in entries]


def read_records(client: redis.Redis, line: str, record_type: type[R]) -> list[R]:
    """Every record of ``record_type``'s stream of line ``line``, oldest first."""
    return read_stream(client, StreamKeys(line).stream(record_type.stream), record_type)


def wait_until(
    condition: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.01, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    Raises TimeoutError naming ``what`` after ``timeout_s``; a bound, not a timing claim.
    """
    end = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= end:
            raise TimeoutError(f"not reached within {timeout_s} s: {what or condition!r}")
        time.sleep(interval_s)


def frame_header(
    camera: str = "cam0",
    seq: int = 0,
    *,
    part_id: str | None = None,
    shape: tuple[int, int] | tuple[int, int, int] = (64, 64),
    deadline_ms: float = 1000.0,
    ts_acquired_ns: int | None = None,
) -> FrameHeader:
    """A valid uint8 frame header acquired now (or at ``ts_acquired_ns``)."""
    acquired = time.time_ns() if ts_acquired_ns is None else ts_acquired_ns
    return FrameHeader(
        camera=camera,
        seq=seq,
        part_id=part_id or f"{camera}-part-{seq}",
        ts_acquired_ns=acquired,
        deadline_ns=acquired + int(deadline_ms * 1e6),
        dtype="uint8",
        shape=shape,
    )


def sample_batch(
    camera: str = "cam0", seq: int = 0, *, reject: bool = True, n_defects: int = 1
) -> VerdictBatch:
    """A consistent verdict (+ defects, + reject) for one frame, as the decision service
    writes it; for testing stream consumers."""
    now = time.time_ns()
    frame_id, part_id = f"{camera}:{seq}", f"{camera}-part-{seq}"
    score = 1.7 if reject else 0.4
    verdict = VerdictRecord(
        frame_id=frame_id, camera=camera, seq=seq, part_id=part_id,
        verdict="reject" if reject else "pass", reason="anomaly" if reject else "ok",
        fail_safe=False, score=score, model_id="model-test", threshold=1.0,
        threshold_version="t1", rule="operating_point", n_defects=n_defects,
        ts_acquired_ns=now - 5_000_000, ts_decided_ns=now, latency_ms=5.0,
    )
    defects = tuple(
        DefectRecord(
            frame_id=frame_id, camera=camera, seq=seq, part_id=part_id, region=i,
            x=4 * i, y=2, w=8, h=6, area=40, max_score=score, mean_score=score / 2,
            heatmap_ref=None, model_id="model-test", ts_decided_ns=now,
        )
        for i in range(n_defects)
    )
    reject_record = (
        RejectRecord(
            frame_id=frame_id, part_id=part_id, camera=camera, seq=seq, reason="anomaly",
            deadline_ns=now + 1_000_000_000, ts_decided_ns=now,
        )
        if reject
        else None
    )
    return VerdictBatch(verdict, defects, reject_record)


# --------------------------------------------------------------------------- whole lines


def tiny_model(directory: Path | str, *, size: int = 64, epochs: int = 2,
               surface: str = "brushed_metal") -> tuple[Path, Path]:
    """A small synthetic data set and a model trained and calibrated on it, in ``directory``.

    Made once per directory (a second call reuses them). Returns (data set root, model file).
    Seconds on a CPU: for tests of the pipeline, not for measuring the model.
    """
    from linewatch.data.synth import write_dataset
    from linewatch.model.settings import ModelSettings, TrainSettings
    from linewatch.model.train import train

    root = Path(directory)
    data, model = root / "data", root / "model.lwm"
    if not (data / "split.csv").exists():
        write_dataset(data, seed=0, size=size, n_good=30, n_defect=4, surface=surface,
                      overwrite=True)
    if not model.exists():
        train(data, model, ModelSettings(size=size), TrainSettings(epochs=epochs, seed=0),
              progress=False)
    return data, model


@contextmanager
def running_line(config_path: Path | str, redis_url: str, log_dir: Path | str,
                 consumers: bool = False) -> Iterator[LineRunner]:
    """The line of ``config_path`` running (real processes) against ``redis_url``.

    Each process writes its output to ``log_dir/<process>.log``. The line is stopped
    front to back on exit.
    """
    import os
    import threading

    from linewatch.config import load_config
    from linewatch.runtime.line import LineRunner

    previous = os.environ.get("LINEWATCH_REDIS__URL")
    os.environ["LINEWATCH_REDIS__URL"] = redis_url
    try:
        config = load_config(config_path)
        runner = LineRunner(Path(config_path), config, consumers=consumers,
                            log_dir=Path(log_dir))
        thread = threading.Thread(target=runner.run, name="line", daemon=True)
        thread.start()
        try:
            yield runner
        finally:
            runner.stop()
            thread.join(timeout=120)
    finally:
        if previous is None:
            os.environ.pop("LINEWATCH_REDIS__URL", None)
        else:
            os.environ["LINEWATCH_REDIS__URL"] = previous
