"""The on-disk spool: order, bound, resume after failure, and a real Redis outage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import redis

from linewatch.config import RedisConfig
from linewatch.streams.client import redis_client as client_for
from linewatch.streams.records import RejectRecord, VerdictRecord
from linewatch.streams.spool import Spool, SpoolItem
from linewatch.streams.writer import StreamWriter
from linewatch.testing import read_records, redis_server, sample_batch


class ListSink:
    """Collects drained items; fails once after ``fail_after`` items when set."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.items: list[SpoolItem] = []
        self.fail_after = fail_after

    def write_spooled(self, item: SpoolItem) -> None:
        if self.fail_after is not None and len(self.items) == self.fail_after:
            self.fail_after = None
            raise ConnectionError("sink down")
        self.items.append(item)


def _batches(n: int, start: int = 0) -> list[SpoolItem]:
    return [sample_batch("cam0", seq, n_defects=seq % 3) for seq in range(start, start + n)]


def test_drain_returns_items_in_order_and_empties_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=2000)  # several segments
    items = _batches(20)
    for item in items:
        assert spool.append([item])
    sink = ListSink()
    assert spool.drain(sink) == 20
    assert sink.items == items
    assert not spool and spool.size_bytes == 0 and list(tmp_path.iterdir()) == []


def test_a_failed_drain_resumes_where_it_stopped_even_after_reopening(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    items = _batches(10)
    spool.append(items)
    sink = ListSink(fail_after=4)
    with pytest.raises(ConnectionError):
        spool.drain(sink)
    reopened = Spool(tmp_path, max_bytes=1 << 20)  # e.g. the process restarted
    assert reopened.size_bytes == spool.size_bytes > 0
    reopened.drain(sink)
    assert sink.items == items


def test_a_full_spool_refuses_and_counts_but_keeps_what_it_has(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=4000)
    accepted = [item for item in _batches(40) if spool.append([item])]
    assert 0 < len(accepted) < 40
    assert spool.counters.refused == 40 - len(accepted)
    assert spool.size_bytes <= 4000
    sink = ListSink()
    spool.drain(sink)
    assert sink.items == accepted


def test_a_torn_last_line_is_skipped_and_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    items = _batches(3)
    spool.append(items)
    segment = next(tmp_path.glob("segment-*.jsonl"))
    with segment.open("ab") as f:
        f.write(b'{"type":"verdict","verd')  # a crash in the middle of an append
    sink = ListSink()
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    reopened.drain(sink)
    assert sink.items == items
    assert reopened.counters.corrupt == 1


def _write(writer: StreamWriter, seqs: range) -> list[bool]:
    results = []
    for seq in seqs:
        batch = sample_batch("cam0", seq, reject=seq % 2 == 0)
        results.append(writer.write_verdict(batch.verdict, batch.defects, batch.reject))
    return results


def test_outage_spools_then_drains_in_order_without_duplicates(
    tmp_path: Path, line_name: str
) -> None:
    cfg = RedisConfig(spool_dir=tmp_path / "spool", retry_interval_s=0.01, retries=0)
    with redis_server(tmp_path / "redis", aof=True) as server:
        client = client_for(cfg, server.url)
        writer = StreamWriter(client, line_name, cfg)
        assert _write(writer, range(0, 5)) == [True] * 5

        server.stop()
        assert _write(writer, range(5, 15)) == [True] * 10  # no exception, all spooled
        assert writer.counters.spooled == 10 and writer.spool

        server.start()  # same port, same data (AOF)
        assert writer.flush()
        assert not writer.spool
        assert _write(writer, range(5, 16)) == [False] * 10 + [True]

        verdicts = read_records(client, line_name, VerdictRecord)
        assert [v.seq for v in verdicts] == list(range(16))
        rejects = read_records(client, line_name, RejectRecord)
        assert [r.seq for r in rejects] == list(range(0, 16, 2))
        client.close()


def test_a_crash_in_the_middle_of_a_drain_duplicates_nothing(
    tmp_path: Path, redis_client: redis.Redis, line_name: str
) -> None:
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir, max_bytes=1 << 20)
    spool.append(_batches(6))
    saved = tmp_path / "saved"
    shutil.copytree(spool_dir, saved)
    cfg = RedisConfig(spool_dir=spool_dir)
    StreamWriter(redis_client, line_name, cfg, spool=spool).flush()

    # As if the process died after writing to Redis but before removing the segment.
    shutil.rmtree(spool_dir)
    shutil.copytree(saved, spool_dir)
    writer = StreamWriter(redis_client, line_name, cfg, spool=Spool(spool_dir, 1 << 20))
    assert writer.flush()
    assert writer.counters.duplicates == 6
    assert [v.seq for v in read_records(redis_client, line_name, VerdictRecord)] == list(range(6))
