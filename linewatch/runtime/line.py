"""``linewatch run``: every process of a line under one supervisor.

The supervisor starts an embedded Redis when the configuration names none, and
hands its address to the children through ``LINEWATCH_REDIS__URL`` (the same
environment override a user would set), so every process reads one config file.

Before any process starts, :func:`preflight` checks what the processes would
otherwise find out one by one, after the others are up: the model file (loaded as
a worker loads it: format, version, checksum, weights, a threshold for the line's
rule) and the workers' device, each camera's source (producer file, folder of
images), the CURVE keys, the socket and spool folders. A bad configuration
therefore never starts half a line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from linewatch.config import (
    FolderSource,
    GenicamSource,
    LineConfig,
    SynthSource,
)
from linewatch.errors import ConfigError, LinewatchError
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


def preflight(config: LineConfig) -> None:
    """Check everything the line's processes need before starting any of them.

    Raises :class:`ConfigError` with one line listing every problem found, each
    naming its configuration key.
    """
    problems = [
        *_model_problems(config),
        *_camera_problems(config),
        *_transport_problems(config),
        *_folder_problems(config),
    ]
    if problems:
        raise ConfigError(f"line {config.line} not started: {'; '.join(problems)}")


def _model_problems(config: LineConfig) -> list[str]:
    """The model file as the workers will load it (on the CPU here), and their device."""
    from linewatch.inference.worker import load_line_scorer
    from linewatch.model.scorer import resolve_device

    problems = []
    try:
        resolve_device(config.workers.device)
    except LinewatchError as exc:
        problems.append(f"workers.device: {exc}")
    try:
        load_line_scorer(config, device="cpu")  # format, version, checksum, weights, threshold
    except LinewatchError as exc:
        problems.append(str(exc))
    return problems


def _camera_problems(config: LineConfig) -> list[str]:
    from linewatch.acquisition.folder import list_images
    from linewatch.data.synth import SURFACES

    problems = []
    for i, camera in enumerate(config.cameras):
        key, source = f"cameras[{i}] ({camera.id}).source", camera.source
        if isinstance(source, GenicamSource) and not source.cti.is_file():
            problems.append(f"{key}.cti: {source.cti}: no such GenTL producer file")
        elif isinstance(source, FolderSource):
            try:
                list_images(source.path, source.split)
            except LinewatchError as exc:
                problems.append(f"{key}.path: {exc}")
        elif isinstance(source, SynthSource) and source.surface not in SURFACES:
            problems.append(f"{key}.surface: unknown {source.surface!r} "
                            f"(one of {', '.join(SURFACES)})")
    return problems


def _transport_problems(config: LineConfig) -> list[str]:
    from linewatch.transport import security

    transport = config.transport
    problems = []
    for endpoint in transport.endpoints():
        if endpoint.startswith("ipc://") and not Path(endpoint[6:]).parent.is_dir():
            problems.append(f"transport: {endpoint}: folder {Path(endpoint[6:]).parent} "
                            "does not exist")
    if transport.curve.enabled:
        try:
            keys_dir = security.require_keys_dir(transport.curve.keys_dir)
            # One host runs both ends of every socket: it needs both key pairs.
            security.load_key_pair(keys_dir, security.SERVER)
            security.load_key_pair(keys_dir, security.CLIENT)
        except LinewatchError as exc:
            problems.append(f"transport.curve: {exc}")
    return problems


def _folder_problems(config: LineConfig) -> list[str]:
    folders = {"redis.spool_dir": config.redis.spool_dir}
    if config.decision.heatmaps == "disk":
        folders["decision.heatmap_dir"] = config.decision.heatmap_dir
    problems = []
    for key, folder in folders.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problems.append(f"{key}: cannot create {folder}: {exc.strerror or exc}")
    return problems


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
        """Check the configuration (:func:`preflight`), start the line and block until
        stopped; restart counts per process."""
        preflight(self.config)
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
