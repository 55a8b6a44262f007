"""An on-disk spool that holds stream records while Redis is unreachable.

Records are appended as JSON lines to numbered segment files and fsynced once per
append, so a power cut loses at most the append in progress. The spool is bounded
by ``max_bytes``: when full it refuses new records, logging an error and counting
every refusal, never dropping silently. :meth:`Spool.drain` hands the records back,
oldest first, to a sink (the :class:`~linewatch.streams.writer.StreamWriter`); the
position reached is saved when the sink fails, and verdict writes are idempotent, so
a crash in the middle of a drain neither loses nor duplicates a verdict.

One spool belongs to one writer in one thread; it is not safe for concurrent use.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from linewatch.log import get_logger
from linewatch.streams.records import (
    AlarmRecord,
    DefectRecord,
    RejectRecord,
    VerdictBatch,
    VerdictRecord,
)

log = get_logger("spool")

# A frame's records, or an alarm of the decision service (camera status).
SpoolItem = VerdictBatch | AlarmRecord

_SEGMENT_GLOB = "segment-*.jsonl"
_REFUSAL_LOG_EVERY = 100  # a full spool refuses every record; log the first and every 100th


class SpoolSink(Protocol):
    """Where drained records go; raises (e.g. redis.ConnectionError) when it cannot take one."""

    def write_spooled(self, item: SpoolItem) -> None: ...


@dataclass
class SpoolCounters:
    """Totals since the spool was opened."""

    appended: int = 0
    refused: int = 0
    drained: int = 0
    corrupt: int = 0


class Spool:
    """Bounded, append-only JSON-lines spool in ``directory`` (created on first use)."""

    def __init__(self, directory: Path | str, max_bytes: int, segment_bytes: int = 8 << 20) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.counters = SpoolCounters()
        self._active: Path | None = None  # the segment appends go to; sealed by drain()
        self._bytes = sum(self._unread_bytes(p) for p in self._segments())
        if self._bytes:
            log.warning("spool_found", directory=str(self.directory), bytes=self._bytes)

    # ------------------------------------------------------------------ state

    @property
    def size_bytes(self) -> int:
        """Bytes of records waiting to be drained."""
        return self._bytes

    def __bool__(self) -> bool:
        """True while records wait to be drained."""
        return self._bytes > 0

    def _segments(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob(_SEGMENT_GLOB))

    @staticmethod
    def _pos_file(segment: Path) -> Path:
        return segment.with_suffix(".pos")

    def _read_pos(self, segment: Path) -> int:
        try:
            return int(self._pos_file(segment).read_text())
        except (OSError, ValueError):
            return 0

    def _unread_bytes(self, segment: Path) -> int:
        return max(segment.stat().st_size - self._read_pos(segment), 0)

    # ------------------------------------------------------------------ append

    def append(self, items: Sequence[SpoolItem]) -> bool:
        """Append ``items`` durably (one fsync); False, logged and counted, if the spool is full."""
        data = "".join(encode_item(item) + "\n" for item in items).encode("utf-8")
        if self._bytes + len(data) > self.max_bytes:
            self.counters.refused += len(items)
            if (self.counters.refused - len(items)) % _REFUSAL_LOG_EVERY == 0:
                log.error(
                    "spool_full_records_refused",
                    directory=str(self.directory),
                    max_bytes=self.max_bytes,
                    refused_total=self.counters.refused,
                )
            return False
        segment = self._segment_for_append()
        with segment.open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._bytes += len(data)
        self.counters.appended += len(items)
        return True

    def _segment_for_append(self) -> Path:
        if self._active is None or self._active.stat().st_size >= self.segment_bytes:
            self.directory.mkdir(parents=True, exist_ok=True)
            segments = self._segments()
            number = int(segments[-1].stem.split("-")[1]) + 1 if segments else 1
            self._active = self.directory / f"segment-{number:012d}.jsonl"
            self._active.touch()
            _fsync_dir(self.directory)
        return self._active

    # ------------------------------------------------------------------ drain

    def drain(self, sink: SpoolSink) -> int:
        """Write every spooled record to ``sink`` in order; returns how many were written.

        If ``sink`` raises, the position reached is saved and the error propagates;
        the next drain resumes there.
        """
        self._active = None  # later appends start a new segment, after what is drained now
        written = 0
        for segment in self._segments():
            written += self._drain_segment(segment, sink)
        if written:
            log.info("spool_drained", records=written, left_bytes=self._bytes)
        return written

    def _drain_segment(self, segment: Path, sink: SpoolSink) -> int:
        pos = self._read_pos(segment)
        written = 0
        try:
            for line, end in _lines_from(segment, pos):
                item = self._decode(segment, line)
                if item is not None:
                    sink.write_spooled(item)
                    written += 1
                    self.counters.drained += 1
                self._bytes -= end - pos
                pos = end
        finally:
            if pos < segment.stat().st_size:
                self._pos_file(segment).write_text(str(pos))
        self._pos_file(segment).unlink(missing_ok=True)
        segment.unlink()
        return written

    def _decode(self, segment: Path, line: bytes) -> SpoolItem | None:
        try:
            return decode_item(line)
        except (ValueError, KeyError, TypeError) as exc:
            # Only a crash during an append leaves a torn line; keep going after it.
            self.counters.corrupt += 1
            log.error("spool_line_corrupt", segment=str(segment), error=str(exc)[:200])
            return None


def _lines_from(segment: Path, pos: int) -> Iterator[tuple[bytes, int]]:
    """Lines of ``segment`` from byte ``pos``, each with the offset just after it."""
    with segment.open("rb") as f:
        f.seek(pos)
        for line in f:
            pos += len(line)
            if line.strip():
                yield line, pos


def _fsync_dir(directory: Path) -> None:
    # A new segment's directory entry must survive a power cut too.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- encoding


def encode_item(item: SpoolItem) -> str:
    """One spool line (JSON, no newline); records are kept as their flat stream fields."""
    if isinstance(item, AlarmRecord):
        return json.dumps({"type": "alarm", "alarm": item.to_fields()}, separators=(",", ":"))
    payload: dict[str, Any] = {
        "type": "verdict",
        "verdict": item.verdict.to_fields(),
        "defects": [d.to_fields() for d in item.defects],
        "reject": item.reject.to_fields() if item.reject is not None else None,
        "heatmaps": [base64.b64encode(h).decode("ascii") for h in item.heatmaps],
    }
    return json.dumps(payload, separators=(",", ":"))


def decode_item(line: str | bytes) -> SpoolItem:
    """Parse one spool line; raises ValueError (or KeyError/TypeError) if it is not one."""
    payload = json.loads(line)
    if payload["type"] == "alarm":
        return AlarmRecord.from_fields(payload["alarm"])
    if payload["type"] != "verdict":
        raise ValueError(f"unknown spool item type {payload['type']!r}")
    reject = payload["reject"]
    return VerdictBatch(
        verdict=VerdictRecord.from_fields(payload["verdict"]),
        defects=tuple(DefectRecord.from_fields(d) for d in payload["defects"]),
        reject=RejectRecord.from_fields(reject) if reject is not None else None,
        heatmaps=tuple(base64.b64decode(h, validate=True) for h in payload["heatmaps"]),
    )
