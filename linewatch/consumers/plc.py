"""``linewatch plc``: signals the reject gate once for every reject of the line.

Reads ``linewatch:<line>:rejects`` through the consumer group ``plc.group`` (created
at id 0 if missing, so no reject already written is skipped), signals the gate
through an :class:`~linewatch.consumers.drivers.OutputDriver`, then acknowledges.

Delivery is **at least once**. A reject is acknowledged only after the driver
signalled it, so a crash of the process between the signal and the acknowledgement
signals that part again when the entry is re-read (restart under the same consumer
name) or claimed by another consumer. A second pulse rejects a part twice or one more
part; a lost pulse would pass a bad one, which is the failure a gate must not have.
(A failed acknowledgement alone signals nothing twice: the process remembers what
it signalled until the acknowledgement goes through.) A reject whose signal failed
stays pending and is retried when it is claimed again after ``plc.claim_idle_ms``.

Late rejects: a reject read after its deadline is still signalled (fail-safe) and
logged as ``reject_late`` with how late it is; one more than ``plc.stale_after_s``
past its deadline is logged as ``reject_stale`` and acknowledged without a signal,
because its part left the gate long ago (this also keeps a new group on an old
stream from firing the gate for every reject of the past).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from pydantic import ValidationError

from linewatch.config import LineConfig, PlcConfig
from linewatch.consumers.drivers import DriverError, OutputDriver, make_driver
from linewatch.consumers.group import (
    GroupConsumer,
    GroupReader,
    StreamEntry,
    block_ms_for,
    consumer_name,
)
from linewatch.lifecycle import run_until_signalled
from linewatch.log import get_logger
from linewatch.streams.client import redis_client
from linewatch.streams.records import RejectRecord, StreamKeys

log = get_logger("plc")


@dataclass
class PlcStats:
    """What a PLC consumer did since it started."""

    signalled: int = 0
    late: int = 0
    stale: int = 0
    failed: int = 0
    malformed: int = 0


class PlcConsumer(GroupConsumer):
    """Reads a line's rejects and signals each through ``driver``; see the module docstring.

    ``clock_ns`` (wall clock, ns since epoch) is compared with each reject's deadline.
    """

    def __init__(
        self,
        client: redis.Redis,
        line: str,
        cfg: PlcConfig,
        driver: OutputDriver,
        *,
        block_ms: int = 500,
        retry_interval_s: float = 1.0,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        reader = GroupReader(
            client, [StreamKeys(line).rejects], cfg.group, consumer_name(cfg.consumer),
            start_id="0", block_ms=block_ms, claim_idle_ms=cfg.claim_idle_ms,
        )
        super().__init__(
            reader, claim_interval_s=cfg.claim_interval_s, retry_interval_s=retry_interval_s
        )
        self.cfg = cfg
        self.driver = driver
        self.stats = PlcStats()
        self._clock_ns = clock_ns
        self._signalled_unacked: set[str] = set()

    def handle(self, entry: StreamEntry) -> None:
        """Signal one reject and acknowledge it; a failed signal leaves it pending."""
        try:
            reject = RejectRecord.from_fields(entry.fields)
        except ValidationError as exc:
            # It can never be signalled (which gate? which part?); keeping it pending
            # would only retry it forever.
            log.error("reject_malformed", entry=entry.id, error=str(exc).splitlines()[0])
            self.stats.malformed += 1
            self.reader.ack([entry])
            return
        if not self._due(reject):
            self.reader.ack([entry])
            return
        if entry.id not in self._signalled_unacked:
            try:
                self.driver.act(reject)
            except DriverError as exc:
                log.error("reject_signal_failed", frame_id=reject.frame_id, entry=entry.id,
                          error=str(exc), retry_after_ms=self.cfg.claim_idle_ms)
                self.stats.failed += 1
                return
            self.stats.signalled += 1
            # Until the ack is through: if Redis fails it, the re-read entry is not signalled twice.
            self._signalled_unacked.add(entry.id)
        self.reader.ack([entry])
        self._signalled_unacked.discard(entry.id)

    def _due(self, reject: RejectRecord) -> bool:
        """False for a stale reject (logged); logs a late one, which is still due."""
        late_ms = (self._clock_ns() - reject.deadline_ns) / 1e6
        if late_ms > self.cfg.stale_after_s * 1000.0:
            log.error("reject_stale", frame_id=reject.frame_id, part_id=reject.part_id,
                      camera=reject.camera, late_ms=round(late_ms, 1))
            self.stats.stale += 1
            return False
        if late_ms > 0:
            log.warning("reject_late", frame_id=reject.frame_id, part_id=reject.part_id,
                        camera=reject.camera, late_ms=round(late_ms, 1))
            self.stats.late += 1
        return True

    def close(self) -> None:
        """Release the driver (e.g. the Modbus connection)."""
        self.driver.close()


def run_plc(config: LineConfig, redis_url: str | None = None) -> PlcStats:
    """Run the reject-gate consumer of ``config``'s line until SIGINT/SIGTERM."""
    client = redis_client(config.redis, redis_url)
    consumer = PlcConsumer(
        client, config.line, config.plc, make_driver(config.plc),
        block_ms=block_ms_for(config.redis), retry_interval_s=config.redis.retry_interval_s,
    )
    try:
        run_until_signalled(consumer)
    finally:
        client.close()
    return consumer.stats
