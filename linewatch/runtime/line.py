"""``linewatch run``: every process of a line under one supervisor.

The supervisor starts an embedded Redis when the configuration names none, and
hands its address to the children through ``LINEWATCH_REDIS__URL`` (the same
environment override a user would set), so every process reads one config file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from linewatch.config import LineConfig
from linewatch.errors import ConfigError
from linewatch.log import get_logger
from linewatch.runtime.supervisor import ProcessSpec, Supervisor, linewatch_argv

log = get_logger("line")

STAGE_ACQUIRE, STAGE_DISPATCH, STAGE_INFER, STAGE_DECIDE, STAGE_CONSUMERS = range(5)


def line_processes(
    config_path: Path, config: LineConfig, *, consumers: bool = True
) -> list[ProcessSpec]:
    """The processes of a line, each with the stage it is stopped in."""
    path = str(config_path)
    specs = [
        # auto: a restarted camera continues above every seq it sent before, so its
        # frames never collide with verdicts already written (writes dedupe by frame id).
        ProcessSpec(
            f"acquire-{cam.id}",
            linewatch_argv("acquire", path, "--camera", cam.id, "--start-seq", "auto"),
            STAGE_ACQUIRE,
            notifies_ready=True,
        )
        for cam in config.cameras
    ]
    specs.append(ProcessSpec("dispatch", linewatch_argv("dispatch", path), STAGE_DISPATCH,
                             notifies_ready=True))
    specs += [
        ProcessSpec(f"infer-{i}", linewatch_argv("infer", path, "--worker", str(i)), STAGE_INFER,
                    notifies_ready=True)
        for i in range(config.workers.count)
    ]
    specs.append(ProcessSpec("decide", linewatch_argv("decide", path), STAGE_DECIDE,
                             stop_timeout_s=30.0, notifies_ready=True))
    if consumers:
        specs += [
            ProcessSpec("plc", linewatch_argv("plc", path), STAGE_CONSUMERS),
            ProcessSpec("alarms", linewatch_argv("alarms", path), STAGE_CONSUMERS),
        ]
    return specs


@contextlib.contextmanager
def line_redis(config: LineConfig, data_dir: Path) -> Iterator[str]:
    """The Redis URL the line uses: the configured one, or an embedded server's."""
    if config.redis.url:
        yield config.redis.url
        return
    from linewatch.streams.server import EmbeddedRedis

    with EmbeddedRedis(data_dir, aof=True) as server:
        yield server.url


@dataclass
class LineRunner:
    """Runs a line's supervisor with its Redis; stoppable from a signal handler."""

    config_path: Path
    config: LineConfig
    consumers: bool = True
    log_dir: Path | None = None
    supervisor: Supervisor | None = None
    _stopping: bool = False

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Stop the line front to back."""
        self._stopping = True
        if self.supervisor is not None:
            self.supervisor.stop()

    def run(self) -> dict[str, int]:
        """Start the line and block until stopped; restart counts per process."""
        data_dir = Path(self.config.redis.spool_dir).parent / "redis-data"
        with line_redis(self.config, data_dir) as url:
            specs = line_processes(self.config_path, self.config, consumers=self.consumers)
            self.supervisor = Supervisor(
                specs, env={"LINEWATCH_REDIS__URL": url}, log_dir=self.log_dir
            )
            if self._stopping:
                self.supervisor.stop()
            log.info("line_starting", line=self.config.line, redis=url, processes=len(specs))
            self.supervisor.run()
            if self.supervisor.failed:
                raise ConfigError(f"line {self.config.line} stopped: {self.supervisor.failed}")
            return self.supervisor.restarts
