"""Reading Redis streams through a consumer group, at least once, and running until signalled.

A consumer reads new entries (``XREADGROUP >``), handles each and acknowledges it
(``XACK``). An entry read but never acknowledged — its consumer crashed, or handling
failed — stays in the group's pending list. On start and after losing Redis a
consumer re-reads its own pending entries (same consumer name, so no wait), and
every ``claim_interval`` it takes over entries any consumer has left pending for
``claim_idle_ms`` (``XAUTOCLAIM``), its own failed ones included, so a failed entry
is retried.

If the group is gone (a Redis restarted without persistence, a deleted stream) the
reader creates it again and carries on.
"""

from __future__ import annotations

import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from linewatch.config import RedisConfig
from linewatch.log import get_logger

log = get_logger("consumer_group")


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One stream entry as delivered to this consumer.

    ``fields`` is empty when the entry was trimmed from the stream while pending.
    """

    stream: str
    id: str
    fields: dict[bytes, bytes]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _by_stream(response: Any) -> Iterator[tuple[str, list[Any]]]:
    """(stream, entries) pairs of an XREADGROUP reply in either RESP2 or RESP3 shape."""
    if not response:
        return
    pairs = response.items() if isinstance(response, dict) else response
    for stream, entries in pairs:
        # RESP3 wraps each stream's entries in one more list.
        if entries and isinstance(entries[0], list):
            entries = entries[0]
        yield _text(stream), entries


def _entries(stream: str, raw: Iterable[Any]) -> tuple[list[StreamEntry], int]:
    """Entries of one stream, and how many were reported gone (no id, Redis < 7)."""
    entries, gone = [], 0
    for entry_id, fields in raw:
        if entry_id is None:
            gone += 1
            continue
        entries.append(StreamEntry(stream, _text(entry_id), dict(fields or {})))
    return entries, gone


def consumer_name(configured: str | None) -> str:
    """The consumer's name in its group: as configured, else the host name.

    A stable name lets a restarted consumer re-read its own pending entries at once.
    """
    return configured or socket.gethostname()


def block_ms_for(redis_cfg: RedisConfig) -> int:
    """How long XREADGROUP may wait: well inside the client's socket timeout."""
    return max(10, int(min(500.0, redis_cfg.socket_timeout_s * 500.0)))


class GroupReader:
    """Reads ``streams`` as ``consumer`` of ``group``; see the module docstring.

    ``start_id`` is where a newly created group starts: ``"0"`` delivers everything
    already in the stream, ``"$"`` only what is written afterwards.
    """

    def __init__(
        self,
        client: redis.Redis,
        streams: Sequence[str],
        group: str,
        consumer: str,
        *,
        start_id: str = "0",
        count: int = 100,
        block_ms: int = 500,
        claim_idle_ms: int = 5000,
    ) -> None:
        if not streams:
            raise ValueError("a group reader needs at least one stream")
        self.client = client
        self.streams = list(streams)
        self.group = group
        self.consumer = consumer
        self.start_id = start_id
        self.count = count
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms

    def ensure_groups(self) -> None:
        """Create the group on every stream (and the stream itself) where it is missing."""
        for stream in self.streams:
            try:
                self.client.xgroup_create(stream, self.group, id=self.start_id, mkstream=True)
                log.info("group_created", stream=stream, group=self.group, start=self.start_id)
            except redis.ResponseError as exc:
                if not str(exc).startswith("BUSYGROUP"):
                    raise

    def read_new(self) -> list[StreamEntry]:
        """Entries never delivered to the group; waits up to ``block_ms`` for the first."""
        response = self._retry_nogroup(
            self.client.xreadgroup, self.group, self.consumer,
            dict.fromkeys(self.streams, ">"), count=self.count, block=self.block_ms,
        )
        return self._parse_read(response)

    def read_own_pending(self) -> list[StreamEntry]:
        """Every entry delivered to this consumer name and not acknowledged (e.g. before a
        restart), oldest first."""
        result: list[StreamEntry] = []
        after = dict.fromkeys(self.streams, "0")
        while after:
            response = self._retry_nogroup(
                self.client.xreadgroup, self.group, self.consumer, after, count=self.count
            )
            batch = self._parse_read(response)
            result += batch
            # A stream is done once it returns fewer than `count`; else go on after its last.
            next_after = {}
            for stream in after:
                ours = [e for e in batch if e.stream == stream]
                if len(ours) >= self.count:
                    next_after[stream] = ours[-1].id
            after = next_after
        return result

    def claim_stale(self) -> list[StreamEntry]:
        """Take over every entry pending longer than ``claim_idle_ms`` in the group."""
        result: list[StreamEntry] = []
        for stream in self.streams:
            cursor = "0-0"
            while True:
                reply = self._retry_nogroup(
                    self.client.xautoclaim, stream, self.group, self.consumer,
                    self.claim_idle_ms, cursor, count=self.count,
                )
                entries, gone = _entries(stream, reply[1])
                if gone:
                    # Redis < 7 reports trimmed pending entries without their id; Redis 7
                    # drops them from the pending list itself.
                    log.warning("pending_entries_gone", stream=stream, count=gone)
                result += entries
                cursor = _text(reply[0])
                if cursor == "0-0":
                    break
        if result:
            log.info("entries_claimed", count=len(result), consumer=self.consumer)
        return result

    def ack(self, entries: Iterable[StreamEntry]) -> None:
        """Acknowledge ``entries``: they leave the group's pending list."""
        by_stream: dict[str, list[str]] = {}
        for entry in entries:
            by_stream.setdefault(entry.stream, []).append(entry.id)
        for stream, ids in by_stream.items():
            self.client.xack(stream, self.group, *ids)

    def _parse_read(self, response: Any) -> list[StreamEntry]:
        result: list[StreamEntry] = []
        for stream, raw in _by_stream(response):
            entries, _ = _entries(stream, raw)
            result += entries
        return result

    def _retry_nogroup(self, command: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a group command; if the group is gone, create it again and run it once more."""
        try:
            return command(*args, **kwargs)
        except redis.ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
            log.warning("group_missing_recreating", group=self.group, error=str(exc))
            self.ensure_groups()
            return command(*args, **kwargs)


class GroupConsumer(ABC):
    """The loop of a stream consumer: join the group, recover what is pending, read, handle.

    Subclasses implement :meth:`handle` (and acknowledge what they handled). While
    Redis is unreachable the loop logs it and tries again every ``retry_interval_s``;
    it never exits for that.
    """

    def __init__(
        self,
        reader: GroupReader,
        *,
        claim_interval_s: float,
        retry_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reader = reader
        self.claim_interval_s = claim_interval_s
        self.retry_interval_s = retry_interval_s
        self._clock = clock
        self._stop = threading.Event()
        self._joined = False
        self._next_claim = 0.0

    @abstractmethod
    def handle(self, entry: StreamEntry) -> None:
        """Handle one entry: acknowledge it when done, or leave it unacknowledged to have it
        retried (claimed again after ``claim_idle_ms``)."""

    def close(self) -> None:  # noqa: B027 - an optional hook, empty unless overridden
        """Release what the consumer holds; called once when :meth:`run` returns."""

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the entry in hand (signal-safe)."""
        self._stop.set()

    def run(self) -> None:
        """Poll until :meth:`stop`; entries not handled by then stay pending for a restart."""
        log.info("consumer_started", group=self.reader.group, consumer=self.reader.consumer,
                 streams=self.reader.streams)
        try:
            while not self._stop.is_set():
                try:
                    self.poll()
                except redis.RedisError as exc:
                    log.warning("redis_unavailable", error=str(exc), retry_s=self.retry_interval_s)
                    # Join again: the group may be gone (Redis restarted empty), and the
                    # rest of the interrupted batch is re-read, in order, as our own pending.
                    self._joined = False
                    self._stop.wait(self.retry_interval_s)
        finally:
            self.close()
            log.info("consumer_stopped", consumer=self.reader.consumer)

    def poll(self) -> int:
        """One round: join and recover (first time), claim stale entries when due, read new
        ones (waiting up to ``block_ms``); returns how many entries were handled."""
        handled = 0
        if not self._joined:
            self.reader.ensure_groups()
            handled += self._handle_all(self.reader.read_own_pending())
            self._joined = True
        if self._clock() >= self._next_claim:
            handled += self._handle_all(self.reader.claim_stale())
            self._next_claim = self._clock() + self.claim_interval_s
        if not self._stop.is_set():
            handled += self._handle_all(self.reader.read_new())
        return handled

    def _handle_all(self, entries: list[StreamEntry]) -> int:
        done = 0
        for entry in entries:
            if self._stop.is_set():
                break  # the rest stay pending: re-read on restart or claimed by another
            self.handle(entry)
            done += 1
        return done
