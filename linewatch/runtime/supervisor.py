"""Starts a line's processes, restarts the ones that crash, and stops them in order.

Shutdown drains the pipeline front to back: acquisition stops first so nothing
new enters, then the dispatcher, the workers and the decision service each get
time to finish what they hold before the next stage is stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from linewatch.lifecycle import READY_FILE_ENV, SUPERVISOR_PID_ENV
from linewatch.log import get_logger

log = get_logger("supervisor")

CONFIG_ERROR_EXIT = 2
"""Exit code of a process that refused its configuration (ConfigError, usage error)."""

_ERROR_PREFIX = "linewatch: error:"  # how the CLI prints a LinewatchError
_ERROR_TAIL_BYTES = 64 * 1024  # the error is at the end of a log that may be large


@dataclass(frozen=True)
class ProcessSpec:
    """One supervised process: a name, its command line, and its shutdown stage.

    Lower stages are stopped first (acquisition 0, dispatcher 1, workers 2, decision 3, ...).
    """

    name: str
    argv: tuple[str, ...]
    stage: int
    stop_timeout_s: float = 10.0
    notifies_ready: bool = False
    """The process calls :func:`linewatch.lifecycle.notify_ready`; the stage upstream
    of it starts only once it has (or ``ready_timeout_s`` has passed)."""


@dataclass
class _Child:
    spec: ProcessSpec
    process: subprocess.Popen[bytes] | None = None
    launched: bool = False
    finished: bool = False
    started_at: float = 0.0
    restarts: int = 0
    next_start_at: float = 0.0
    backoff_s: float = 0.0


@dataclass
class BackoffPolicy:
    """Exponential back-off between restarts, reset once a process has run stably."""

    initial_s: float = 0.5
    maximum_s: float = 30.0
    stable_after_s: float = 60.0

    def next_delay(self, previous_s: float, ran_for_s: float) -> float:
        """Delay before the next start of a process that ran ``ran_for_s`` seconds."""
        if ran_for_s >= self.stable_after_s or previous_s <= 0.0:
            return self.initial_s
        return min(self.maximum_s, previous_s * 2.0)


def linewatch_argv(*args: str) -> tuple[str, ...]:
    """Command line running a ``linewatch`` subcommand with this interpreter."""
    return (sys.executable, "-m", "linewatch", *args)


@dataclass
class Supervisor:
    """Runs :class:`ProcessSpec` children until :meth:`stop` is called.

    A child that exits non-zero (or is killed) is restarted after a back-off; one
    that exits 0 has finished its work (a finite source) and stays down; one that
    exits 2 refused its configuration, and the whole line is stopped (``failed``).
    """

    specs: Sequence[ProcessSpec]
    env: Mapping[str, str] = field(default_factory=dict)
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    poll_s: float = 0.2
    ready_timeout_s: float = 120.0
    log_dir: Path | None = None
    """Write each child's output to ``<log_dir>/<name>.log`` instead of our stderr."""
    failed: str | None = None
    """Why the line stopped by itself (a process's configuration error), else None."""
    _children: list[_Child] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _ready_dir: Path = field(default_factory=Path)

    def __post_init__(self) -> None:
        self._children = [_Child(spec) for spec in self.specs]

    def stop(self) -> None:
        """Ask the supervision loop to shut the line down (signal-safe)."""
        self._stop.set()

    @property
    def restarts(self) -> dict[str, int]:
        """Restart counts per process name."""
        return {c.spec.name: c.restarts for c in self._children}

    def running(self) -> dict[str, int | None]:
        """PID of each process, None while it is down."""
        return {
            c.spec.name: c.process.pid if c.process and c.process.poll() is None else None
            for c in self._children
        }

    def ready(self, name: str) -> bool:
        """True while the current run of process ``name`` is up and has said it serves."""
        for child in self._children:
            if child.spec.name == name:
                alive = child.process is not None and child.process.poll() is None
                return alive and self._ready_file(child).exists()
        raise KeyError(f"no process {name!r} in this line")

    def run(self) -> None:
        """Start the stages back to front, keep them running, stop front to back on :meth:`stop`.

        Starting downstream first means a camera's first frame finds a worker and a
        decision service already serving, instead of waiting out their start-up.
        """
        with tempfile.TemporaryDirectory(prefix="linewatch-ready-") as ready_dir:
            self._ready_dir = Path(ready_dir)
            try:
                for stage in sorted({c.spec.stage for c in self._children}, reverse=True):
                    group = [c for c in self._children if c.spec.stage == stage]
                    for child in group:
                        self._start(child)
                    self._wait_ready(group)
                while not self._stop.wait(self.poll_s):
                    self._check_children()
            finally:
                self._shutdown()

    def _ready_file(self, child: _Child) -> Path:
        return self._ready_dir / f"{child.spec.name}.ready"

    def _wait_ready(self, group: list[_Child]) -> None:
        waiting = [c for c in group if c.spec.notifies_ready]
        end = time.monotonic() + self.ready_timeout_s
        while waiting and not self._stop.is_set():
            waiting = [c for c in waiting if not self._ready_file(c).exists()]
            if time.monotonic() >= end:
                log.warning("process_not_ready", processes=[c.spec.name for c in waiting],
                            waited_s=self.ready_timeout_s)
                return
            self._check_children()
            self._stop.wait(self.poll_s)

    def _start(self, child: _Child) -> None:
        env = {**os.environ, **self.env, READY_FILE_ENV: str(self._ready_file(child)),
               SUPERVISOR_PID_ENV: str(os.getpid())}
        self._ready_file(child).unlink(missing_ok=True)
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with (self.log_dir / f"{child.spec.name}.log").open("ab") as out:
                child.process = subprocess.Popen(child.spec.argv, env=env, stdout=out,
                                                 stderr=subprocess.STDOUT)
        else:
            # Children's stdout carries their exit summaries; keep ours for our own results.
            child.process = subprocess.Popen(child.spec.argv, env=env, stdout=sys.stderr)
        child.launched = True
        child.started_at = time.monotonic()
        log.info("process_started", process=child.spec.name, pid=child.process.pid)

    def _check_children(self) -> None:
        now = time.monotonic()
        for child in self._children:
            if not child.launched:
                continue  # its stage has not been started yet
            proc = child.process
            if proc is not None and proc.poll() == CONFIG_ERROR_EXIT:
                # A configuration error does not heal by restarting: stop the whole line.
                why = self._error_line(child) or f"configuration error (exit {CONFIG_ERROR_EXIT})"
                log.error("process_config_error", process=child.spec.name, error=why)
                self.failed = f"{child.spec.name}: {why}"
                child.process, child.finished = None, True
                self._stop.set()
            elif proc is not None and proc.poll() == 0:
                # A finite source (a folder replayed once) ends with 0: done, not crashed.
                log.info("process_finished", process=child.spec.name)
                child.process, child.finished = None, True
            elif proc is not None and proc.poll() is not None:
                ran_for = now - child.started_at
                child.backoff_s = self.backoff.next_delay(child.backoff_s, ran_for)
                child.next_start_at = now + child.backoff_s
                log.warning(
                    "process_exited", process=child.spec.name, returncode=proc.returncode,
                    ran_s=round(ran_for, 2), restart_in_s=child.backoff_s,
                )
                child.process = None
            if child.process is None and not child.finished and now >= child.next_start_at:
                child.restarts += 1
                self._start(child)

    def _error_line(self, child: _Child) -> str | None:
        """The one-line error a child printed last (``linewatch: error: ...``), if its
        output went to a log file; else it is on our stderr already."""
        if self.log_dir is None:
            return None
        try:
            with (self.log_dir / f"{child.spec.name}.log").open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - _ERROR_TAIL_BYTES))
                text = f.read().decode(errors="replace")
        except OSError:
            return None
        errors = [line for line in text.splitlines() if line.startswith(_ERROR_PREFIX)]
        return errors[-1][len(_ERROR_PREFIX):].strip() if errors else None

    def _shutdown(self) -> None:
        for stage in sorted({c.spec.stage for c in self._children}):
            group = [c for c in self._children if c.spec.stage == stage]
            for child in group:
                if child.process is not None and child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            for child in group:
                self._wait_or_kill(child)
        log.info("line_stopped", restarts=self.restarts)

    def _wait_or_kill(self, child: _Child) -> None:
        if child.process is None:
            return
        try:
            child.process.wait(timeout=child.spec.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.error("process_kill", process=child.spec.name, reason="stop_timeout")
            child.process.kill()
            child.process.wait()
        log.info("process_stopped", process=child.spec.name, returncode=child.process.returncode)
