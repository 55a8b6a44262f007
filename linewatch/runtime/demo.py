"""``linewatch demo``: the whole line on the embedded default, nothing to configure.

It makes a synthetic data set, trains a small model (cached for the next run),
writes a line configuration, and replays the test images through the real
processes — acquire -> dispatch -> infer x 2 -> decide — into Redis: its own
embedded server, or the one ``REDIS_URL`` names (left running). A status line
shows progress; the summary names the streams to look at.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import numpy as np
import redis
from pydantic import BaseModel

from linewatch import __version__
from linewatch.config import LineConfig, load_config
from linewatch.log import get_logger
from linewatch.streams.records import StreamKeys, VerdictRecord

log = get_logger("demo")

DEMO_LINE = "demo"
DEMO_SIZE = 128
DEMO_SURFACE = "brushed_metal"


class DemoSummary(BaseModel):
    """What ``linewatch demo --json`` writes."""

    frames_acquired: int
    verdicts_written: int
    rejects: int
    fail_safe: int
    latency_ms_p50: float | None
    latency_ms_p99: float | None
    fps: float
    redis_url: str
    streams: list[str]
    model: str


def default_cache_dir() -> Path:
    """Where the demo keeps its data set and model between runs."""
    base = os.environ.get("LINEWATCH_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    return Path(base) / "linewatch" if base else Path.home() / ".cache" / "linewatch"


def prepare_data(cache: Path) -> Path:
    """The demo's synthetic data set, written once."""
    from linewatch.data.synth import write_dataset

    root = cache / f"demo-data-{DEMO_SURFACE}-{DEMO_SIZE}"
    if not (root / "split.csv").exists():
        log.info("demo_data_writing", path=str(root))
        write_dataset(root, seed=0, size=DEMO_SIZE, surface=DEMO_SURFACE, overwrite=True)
    return root


def prepare_model(cache: Path, data: Path, epochs: int) -> Path:
    """A small trained and calibrated model, cached by its settings and linewatch version."""
    from linewatch.model.settings import ModelSettings, TrainSettings
    from linewatch.model.train import train

    settings = ModelSettings(size=DEMO_SIZE)
    train_settings = TrainSettings(epochs=epochs, seed=0)
    key = hashlib.sha256(
        f"{__version__}|{settings.model_dump_json()}|{train_settings.model_dump_json()}".encode()
    ).hexdigest()[:12]
    path = cache / f"demo-model-{key}.lwm"
    if not path.exists():
        log.info("demo_model_training", path=str(path), epochs=epochs)
        train(data, path, settings, train_settings, progress=sys.stderr.isatty())
    return path


def demo_config_text(data: Path, model: Path, frames: int, fps: float, run_dir: Path) -> str:
    """The demo line: one folder camera replaying the test split, two workers, ipc sockets."""
    ipc = run_dir / "ipc"
    return f"""
line = "{DEMO_LINE}"

[[cameras]]
id = "cam0"
deadline_ms = 5000.0
frames = {frames}
[cameras.source]
kind = "folder"
path = "{data}"
split = "test"
fps = {fps}
loop = true


[transport]
frames_endpoint = "ipc://{ipc}-frames"
workers_endpoint = "ipc://{ipc}-workers"
results_endpoint = "ipc://{ipc}-results"

[workers]
count = 2
max_wait_ms = 0.0
device = "auto"

[model]
path = "{model}"

[redis]
spool_dir = "{run_dir / 'spool'}"

[decision]
heatmaps = "redis"
"""


@contextmanager
def demo_redis(data_dir: Path) -> Iterator[str]:
    """``REDIS_URL`` if set (left running), else an embedded server for the demo's lifetime."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    from linewatch.streams.server import EmbeddedRedis

    # Kept in the cache with AOF, so the streams of the last run can be read afterwards.
    with EmbeddedRedis(data_dir, aof=True) as server:
        yield server.url


class VerdictMonitor:
    """Follows the verdict stream from where it stood when the demo started."""

    def __init__(self, client: redis.Redis, line: str) -> None:
        self.client = client
        self.key = StreamKeys(line).verdicts
        last = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrevrange(self.key, count=1))
        self._last_id: bytes | str = last[0][0] if last else "0-0"
        self.verdicts: list[VerdictRecord] = []

    def poll(self) -> int:
        """Read what arrived since the last poll (without blocking); how many arrived."""
        answer = cast(
            list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None,
            self.client.xread({self.key: self._last_id}, count=1000),
        )
        before = len(self.verdicts)
        for _, entries in answer or []:
            for entry_id, fields in entries:
                self._last_id = entry_id
                self.verdicts.append(VerdictRecord.from_fields(fields))
        return len(self.verdicts) - before

    def fps(self) -> float:
        """Verdicts per second between the first and the last verdict (start-up excluded)."""
        if len(self.verdicts) < 2:
            return 0.0
        span_ns = self.verdicts[-1].ts_decided_ns - self.verdicts[0].ts_decided_ns
        return (len(self.verdicts) - 1) / max(span_ns / 1e9, 1e-9)

    def latencies(self) -> np.ndarray:
        """Acquisition-to-verdict latency of every verdict seen, in ms."""
        values = [v.latency_ms for v in self.verdicts if v.latency_ms is not None]
        return np.asarray(values, dtype=np.float64)

    def status_line(self, frames: int) -> str:
        """One line of live figures."""
        lat = self.latencies()
        p50, p99 = (np.percentile(lat, [50, 99]) if lat.size else (float("nan"),) * 2)
        rejects = sum(v.verdict == "reject" for v in self.verdicts)
        return (
            f"verdicts {len(self.verdicts)}/{frames}  "
            f"{self.fps():5.1f} frames/s  "
            f"latency p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  rejects {rejects}"
        )


def run_demo(frames: int, fps: float, epochs: int, timeout_s: float,
             cache: Path | None = None) -> DemoSummary:
    """Run the demo line until ``frames`` verdicts are written (or ``timeout_s``)."""
    from linewatch.runtime.line import LineRunner

    cache = cache or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cache)
    model = prepare_model(cache, data, epochs)
    with tempfile.TemporaryDirectory(prefix="linewatch-demo-") as tmp:
        run_dir = Path(tmp)
        config_path = run_dir / "line.toml"
        config_path.write_text(demo_config_text(data, model, frames, fps, run_dir))
        with demo_redis(cache / "demo-redis") as url:
            os.environ["LINEWATCH_REDIS__URL"] = url
            config = load_config(config_path)
            monitor = VerdictMonitor(redis.Redis.from_url(url), config.line)
            runner = LineRunner(config_path, config, consumers=False)
            thread = threading.Thread(target=runner.run, name="line", daemon=True)
            thread.start()
            try:
                _follow(monitor, frames, timeout_s)
            finally:
                runner.stop()
                thread.join(timeout=120)
            monitor.poll()
            return _summary(monitor, frames, url, config, model)


def _follow(monitor: VerdictMonitor, frames: int, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    interactive = sys.stderr.isatty()
    last_print = 0.0
    while len(monitor.verdicts) < frames and time.monotonic() < end:
        if not monitor.poll():
            time.sleep(0.2)  # the demo's refresh interval, not a synchronisation
        now = time.monotonic()
        if interactive or now - last_print >= 5.0:
            sys.stderr.write(("\r" if interactive else "") + monitor.status_line(frames)
                             + ("" if interactive else "\n"))
            sys.stderr.flush()
            last_print = now
    if interactive:
        sys.stderr.write("\n")
    if len(monitor.verdicts) < frames:
        log.error("demo_incomplete", verdicts=len(monitor.verdicts), frames=frames,
                  timeout_s=timeout_s)


def _summary(monitor: VerdictMonitor, frames: int, url: str, config: LineConfig,
             model: Path) -> DemoSummary:
    lat = monitor.latencies()
    keys = StreamKeys(config.line)
    return DemoSummary(
        frames_acquired=frames,
        verdicts_written=len(monitor.verdicts),
        rejects=sum(v.verdict == "reject" for v in monitor.verdicts),
        fail_safe=sum(v.fail_safe for v in monitor.verdicts),
        latency_ms_p50=float(np.percentile(lat, 50)) if lat.size else None,
        latency_ms_p99=float(np.percentile(lat, 99)) if lat.size else None,
        fps=round(monitor.fps(), 2),
        redis_url=url,
        streams=[keys.verdicts, keys.defects, keys.rejects],
        model=str(model),
    )


def summary_text(summary: DemoSummary) -> str:
    """The human summary printed at the end of the demo."""
    streams = "\n".join(f"  {s}" for s in summary.streams)
    p50 = "n/a" if summary.latency_ms_p50 is None else f"{summary.latency_ms_p50:.1f} ms"
    p99 = "n/a" if summary.latency_ms_p99 is None else f"{summary.latency_ms_p99:.1f} ms"
    return (
        f"frames acquired {summary.frames_acquired}, verdicts written {summary.verdicts_written}, "
        f"rejects {summary.rejects} ({summary.fail_safe} fail-safe)\n"
        f"latency p50 {p50}, p99 {p99}; {summary.fps} frames/s\n"
        f"model {summary.model}\n"
        f"streams on {summary.redis_url}:\n{streams}\n"
    )


def write_summary_json(summary: DemoSummary, path: Path) -> None:
    """``--json OUT``."""
    path.write_text(json.dumps(summary.model_dump(), indent=2) + "\n", encoding="utf-8")
