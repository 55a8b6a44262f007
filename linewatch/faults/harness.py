"""A whole line with real processes and its own Redis, for injecting faults into it.

:class:`FaultLine` writes a small line configuration (ipc sockets in its work
folder, a finite camera), starts its own embedded Redis (AOF on, so it can be
stopped and started again without losing what was written) and the line under
the supervisor, as ``linewatch run`` does. Scenarios then kill processes, stop
Redis or slow a worker, and read back what the line wrote.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import redis

from linewatch.config import load_config
from linewatch.runtime.line import LineRunner, preflight
from linewatch.streams.records import AlarmRecord, RejectRecord, VerdictRecord
from linewatch.streams.server import EmbeddedRedis
from linewatch.testing import read_records, running_line, wait_until

TomlValue = str | int | float | bool
Table = Mapping[str, TomlValue]

CAMERA = "cam0"
"""The one camera of every fault line."""

_NEXT_SEQ = re.compile(r"\b(acquire_started|acquire_stopped)\b.*?\bnext_seq=(\d+)")


def toml_value(value: TomlValue) -> str:
    """One TOML scalar (strings quoted with JSON escapes, which TOML accepts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def toml_table(name: str, values: Table) -> str:
    """``[name]`` and its ``key = value`` lines."""
    lines = [f"[{name}]", *(f"{k} = {toml_value(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class LineSpec:
    """What a fault line runs: one camera's source and frame count, and overrides per section.

    Every table maps keys of that section of the line configuration to values; they
    are written over small defaults (2 workers, batches of 4, one torch thread each).
    """

    line: str
    model: Path
    source: Table
    frames: int
    deadline_ms: float = 5000.0
    overexposure: Table = field(default_factory=dict)
    underexposure: Table = field(default_factory=dict)
    workers: Table = field(default_factory=dict)
    transport: Table = field(default_factory=dict)
    decision: Table = field(default_factory=dict)
    redis: Table = field(default_factory=dict)
    plc: Table = field(default_factory=dict)

    def toml(self, work: Path) -> str:
        """The configuration text, with sockets and spool in ``work``."""
        camera: dict[str, TomlValue] = {
            "id": CAMERA, "frames": self.frames, "deadline_ms": self.deadline_ms,
        }
        transport = {
            "frames_endpoint": f"ipc://{work}/frames",
            "workers_endpoint": f"ipc://{work}/workers",
            "results_endpoint": f"ipc://{work}/results",
            **self.transport,
        }
        workers = {"count": 2, "max_batch": 4, "max_wait_ms": 5.0, "device": "cpu",
                   "threads": 1, **self.workers}
        redis_cfg = {"spool_dir": str(work / "spool"), "retry_interval_s": 0.5, **self.redis}
        plc = {"consumer": "gate", "claim_idle_ms": 1000, "claim_interval_s": 1.0, **self.plc}
        return "".join([
            f"line = {toml_value(self.line)}\n\n[[cameras]]\n",
            *(f"{k} = {toml_value(v)}\n" for k, v in camera.items()),
            toml_table("cameras.source", self.source),
            toml_table("cameras.overexposure", self.overexposure) if self.overexposure else "",
            toml_table("cameras.underexposure", self.underexposure) if self.underexposure else "",
            toml_table("transport", transport),
            toml_table("workers", workers),
            toml_table("model", {"path": str(self.model)}),
            toml_table("decision", {"heatmaps": "off", **self.decision}),
            toml_table("redis", redis_cfg),
            toml_table("plc", plc),
        ])


def write_config(spec: LineSpec, work: Path) -> Path:
    """Write ``spec``'s configuration to ``work/line.toml``."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / "line.toml"
    path.write_text(spec.toml(work), encoding="utf-8")
    return path


class FaultLine:
    """A running line of ``spec`` in ``work``, with its own Redis; a context manager.

    ``consumers`` also starts the plc and alarms consumers. On exit the line is
    stopped front to back (every stage drains), then Redis.
    """

    def __init__(self, spec: LineSpec, work: Path, *, consumers: bool = False) -> None:
        self.spec = spec
        self.work = work
        self.logs = work / "logs"
        self.config_path = write_config(spec, work)
        self.redis = EmbeddedRedis(work / "redis", aof=True)
        self.consumers = consumers
        self.runner: LineRunner | None = None
        self._client: redis.Redis | None = None
        self._redis_stack = ExitStack()
        self._line_stack = ExitStack()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        # Here, not only in the line's thread: a refused configuration fails the scenario
        # at once, instead of after the waits for processes that never start.
        preflight(load_config(self.config_path))
        with ExitStack() as stack:
            stack.enter_context(self.redis)
            self._client = redis.Redis.from_url(self.redis.url, socket_timeout=5.0)
            stack.callback(self._client.close)
            self._redis_stack = stack.pop_all()
        try:
            with ExitStack() as stack:
                self.runner = stack.enter_context(
                    running_line(self.config_path, self.redis.url, self.logs,
                                 consumers=self.consumers)
                )
                self._line_stack = stack.pop_all()
        except BaseException:
            self._redis_stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop_line()
        finally:
            self._redis_stack.close()

    def stop_line(self) -> None:
        """Stop the processes (front to back, each stage drained); Redis stays up."""
        self._line_stack.close()

    # ------------------------------------------------------------------ processes

    def pid(self, process: str) -> int | None:
        """PID of ``process`` (``infer-0``, ``decide``, ...), None while it is down."""
        sup = self.runner.supervisor if self.runner is not None else None
        return None if sup is None else sup.running().get(process)

    def ready(self, process: str) -> bool:
        """True once ``process`` (its current run) said it serves."""
        sup = self.runner.supervisor if self.runner is not None else None
        return sup is not None and sup.ready(process)

    def wait_serving(self, process: str, timeout_s: float = 120.0) -> int:
        """Wait until ``process`` runs and serves; its PID."""
        def serving() -> int | None:
            return self.pid(process) if self.ready(process) else None

        # wait_until returns only a truthy value: a PID.
        return cast(int, wait_until(serving, timeout_s=timeout_s, interval_s=0.05,
                                    what=f"{process} serving"))

    def wait_sleeping(self, process: str, timeout_s: float) -> bool:
        """Wait until the main thread of ``process`` sleeps (``time.sleep``: an injected
        delay); False if not seen within ``timeout_s`` or where Linux's
        ``/proc/<pid>/wchan`` does not tell."""
        def asleep() -> bool:
            pid = self.pid(process)
            try:
                return pid is not None and "nanosleep" in Path(f"/proc/{pid}/wchan").read_text()
            except OSError:
                return False

        return self.poll(asleep, timeout_s, f"{process} asleep")

    def kill(self, process: str, signum: int = signal.SIGKILL) -> float:
        """``kill -9`` (or ``signum``) the current run of ``process``; the monotonic time."""
        pid = self.wait_serving(process)
        os.kill(pid, signum)
        return time.monotonic()

    def wait_restarted(self, process: str, old_pid: int, timeout_s: float = 120.0) -> float:
        """Wait until a new run of ``process`` serves; the monotonic time it was seen."""
        wait_until(lambda: self.ready(process) and self.pid(process) not in (None, old_pid),
                   timeout_s=timeout_s, interval_s=0.05, what=f"{process} restarted")
        return time.monotonic()

    def restarts(self) -> dict[str, int]:
        """Restart counts per process so far."""
        sup = self.runner.supervisor if self.runner is not None else None
        return {} if sup is None else sup.restarts

    def log_text(self, process: str) -> str:
        """Everything ``process`` wrote so far (all its runs)."""
        path = self.logs / f"{process}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    # ------------------------------------------------------------------ what the line wrote

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            raise RuntimeError("the fault line is not running")
        return self._client

    def verdicts(self) -> list[VerdictRecord]:
        """Every verdict written so far, in stream order."""
        return read_records(self.client, self.spec.line, VerdictRecord)

    def rejects(self) -> list[RejectRecord]:
        """Every reject written so far, in stream order."""
        return read_records(self.client, self.spec.line, RejectRecord)

    def alarms(self) -> list[AlarmRecord]:
        """Every alarm written so far, in stream order."""
        return read_records(self.client, self.spec.line, AlarmRecord)

    def wait_verdicts(self, count: int, timeout_s: float) -> list[VerdictRecord]:
        """Wait (bounded) until at least ``count`` verdicts are written; what there is then.

        Returns what was written when the time is up rather than raising, so that a
        scenario reports the frames it lost instead of a timeout.
        """
        end = time.monotonic() + timeout_s
        while True:
            try:
                verdicts = self.verdicts()
            except redis.ConnectionError:
                verdicts = []
            if len(verdicts) >= count or time.monotonic() >= end:
                return verdicts
            time.sleep(0.2)  # polling interval of a bounded wait

    def acquired_seqs(self) -> list[int]:
        """Every seq the camera's acquisition numbered, from its start and stop events.

        Each run logs the first seq it will use (``acquire_started``) and the next one
        it would have used (``acquire_stopped``); every seq in between was acquired
        (a frame sent, or a gap notice for a frame that could not be).
        """
        return acquired_seqs(self.log_text(f"acquire-{CAMERA}"))

    def poll(self, condition: Callable[[], Any], timeout_s: float, what: str) -> bool:
        """True once ``condition`` holds, False after ``timeout_s`` (never raises)."""
        try:
            wait_until(condition, timeout_s=timeout_s, interval_s=0.05, what=what)
        except TimeoutError:
            return False
        return True


def acquired_seqs(log_text: str) -> list[int]:
    """Seqs of every acquisition run in an acquisition log (see :meth:`FaultLine.acquired_seqs`).

    A run without a stop event (killed) is left out: what it acquired is unknown.
    """
    seqs: list[int] = []
    start: int | None = None
    for event, value in _events(log_text):
        if event == "acquire_started":
            start = value
        elif start is not None:
            seqs.extend(range(start, value))
            start = None
    return seqs


def _events(text: str) -> Iterator[tuple[str, int]]:
    for line in text.splitlines():
        match = _NEXT_SEQ.search(line)
        if match:
            yield match.group(1), int(match.group(2))
