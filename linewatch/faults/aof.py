"""What Redis's ``appendfsync`` costs the decision service: ``linewatch aof-cost``.

The Redis outage scenario relies on AOF persistence (a restarted Redis keeps every
verdict it acknowledged). How often Redis fsyncs the AOF decides how much a power
cut can lose and how long each verdict write waits. This times the decision
service's real write path — :class:`~linewatch.streams.writer.StreamWriter`, one
Lua script per frame with its verdict, defects and reject — against an embedded
``redis-server`` with AOF on, once per ``appendfsync`` setting, on the disk of the
folder given (run it on the disk Redis will use: a RAM disk fsyncs for free).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import redis
from pydantic import BaseModel, ConfigDict

from linewatch.config import DecisionConfig, RedisConfig
from linewatch.streams.server import EmbeddedRedis
from linewatch.streams.writer import StreamWriter
from linewatch.testing import sample_batch

MODES = ("always", "everysec", "no")


class AofCost(BaseModel):
    """Verdict writes under one ``appendfsync`` setting."""

    model_config = ConfigDict(frozen=True)

    appendfsync: str
    writes: int
    writes_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float


def measure(mode: str, writes: int, folder: Path) -> AofCost:
    """Time ``writes`` verdict writes (every 5th a reject with a defect) with ``mode``."""
    with EmbeddedRedis(folder / mode, aof=True) as server:
        client = redis.Redis.from_url(server.url)
        try:
            client.config_set("appendfsync", mode)
            writer = StreamWriter(client, f"aof-{mode}", RedisConfig(spool_dir=folder / "spool"),
                                  DecisionConfig(heatmaps="off"))
            batches = [sample_batch(seq=i, reject=i % 5 == 0) for i in range(writes)]
            latencies = np.empty(writes)
            started = time.perf_counter()
            for i, batch in enumerate(batches):
                t0 = time.perf_counter()
                writer.write_verdict(batch.verdict, batch.defects, batch.reject)
                latencies[i] = time.perf_counter() - t0
            elapsed = time.perf_counter() - started
            if writer.counters.written != writes:
                raise RuntimeError(f"{writer.counters.written} of {writes} writes reached Redis")
        finally:
            client.close()
    ms = latencies * 1000.0
    return AofCost(
        appendfsync=mode, writes=writes, writes_per_s=round(writes / elapsed, 1),
        p50_ms=round(float(np.percentile(ms, 50)), 3),
        p99_ms=round(float(np.percentile(ms, 99)), 3), max_ms=round(float(ms.max()), 3),
    )


def aof_cost(writes: int, directory: Path, modes: Sequence[str] = MODES) -> list[AofCost]:
    """One :class:`AofCost` per mode, Redis's files in a temporary folder in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="linewatch-aof-", dir=directory) as tmp:
        return [measure(mode, writes, Path(tmp)) for mode in modes]


def aof_table(costs: Sequence[AofCost]) -> str:
    """A Markdown table of the figures."""
    lines = [
        "| appendfsync | writes | writes/s | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
        *(f"| {c.appendfsync} | {c.writes} | {c.writes_per_s:.0f} | {c.p50_ms:.2f} | "
          f"{c.p99_ms:.2f} | {c.max_ms:.2f} |" for c in costs),
    ]
    return "\n".join(lines) + "\n"
