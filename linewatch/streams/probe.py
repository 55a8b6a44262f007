"""Whether Redis answers again, asked on a thread of its own while it is away.

A command to a Redis that does not answer (host down, packets dropped: nothing refuses the
connection) blocks for ``redis.socket_timeout_s`` on every try and retry. On the decision
service's loop that is a stall in which no frame is decided, repeated on every retry of
the outage. So once a write has failed, the writer spools without trying Redis, and a
:class:`RedisProbe` sends a PING every ``redis.retry_interval_s`` on its own thread; the
writer tries Redis again once that PING has been answered.
"""

from __future__ import annotations

import threading

import redis

from linewatch.log import get_logger

log = get_logger("redis_probe")


class RedisProbe:
    """PINGs ``client`` every ``interval_s`` from :meth:`redis_failed` until it answers.

    The client is shared with the writer: redis-py clients are thread-safe, and the PING
    takes its own connection from the pool. A PING waits like any command (timeout and
    retries), so Redis is seen back at most that wait plus ``interval_s`` after it answers.
    """

    def __init__(self, client: redis.Redis, interval_s: float) -> None:
        self._client = client
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._away = False
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self.pings_failed = 0

    @property
    def away(self) -> bool:
        """True from :meth:`redis_failed` until a PING has been answered."""
        return self._away

    def redis_failed(self) -> None:
        """A command failed: PING Redis on the probe's thread until it answers."""
        with self._lock:
            self._away = True
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name="redis-probe",
                                                daemon=True)
                self._thread.start()

    def redis_answered(self) -> None:
        """A command succeeded (a forced drain, say): Redis is back without a PING."""
        with self._lock:
            self._away = False

    def close(self) -> None:
        """Stop probing; a PING under way ends at its timeout, and the thread with it."""
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(self._interval_s):
            with self._lock:
                if not self._away:  # the writer reached Redis meanwhile
                    self._thread = None
                    return
            try:
                self._client.ping()
            except redis.RedisError as exc:
                self.pings_failed += 1
                log.debug("redis_ping_failed", error=str(exc), failed=self.pings_failed)
                continue
            with self._lock:
                # Under the lock: a failure reported now starts a new thread, not this one.
                self._away = False
                self._thread = None
            log.info("redis_answered", pings_failed=self.pings_failed)
            return
        with self._lock:
            self._thread = None
