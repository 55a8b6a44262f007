"""A Redis that does not answer at all (no refusal) costs the writer one failed try.

The silent server is :func:`linewatch.testing.silent_listener`, a real TCP listener on
127.0.0.1 that never answers; a real Redis on the same port ends the outage.
"""

from __future__ import annotations

from pathlib import Path

from linewatch.config import RedisConfig
from linewatch.streams.client import redis_client as client_for
from linewatch.streams.records import VerdictRecord
from linewatch.streams.server import EmbeddedRedis
from linewatch.streams.writer import StreamWriter
from linewatch.testing import read_records, sample_batch, silent_listener, wait_until


def _write(writer: StreamWriter, seqs: range) -> list[bool]:
    return [writer.write_verdict(b.verdict, b.defects, b.reject)
            for b in (sample_batch("cam0", seq) for seq in seqs)]


def test_a_silent_redis_is_tried_once_then_probed_off_the_callers_thread(
    tmp_path: Path, line_name: str
) -> None:
    cfg = RedisConfig(spool_dir=tmp_path / "spool", socket_timeout_s=0.2, retries=0,
                      retry_interval_s=0.05)
    with silent_listener() as port:
        client = client_for(cfg, f"redis://127.0.0.1:{port}/0")
        writer = StreamWriter(client, line_name, cfg)
        try:
            assert _write(writer, range(0, 1)) == [True]  # spooled after one timeout
            assert writer.counters.redis_errors == 1 and writer.probe.away

            # Several retry intervals pass with PINGs failing on the probe's thread ...
            wait_until(lambda: writer.probe.pings_failed >= 3, what="three failed PINGs")
            assert _write(writer, range(1, 10)) == [True] * 9
            assert not writer.flush(force=False)
            # ... and the writer itself has not tried Redis again.
            assert writer.counters.redis_errors == 1
            assert writer.counters.spooled == 10
        except BaseException:
            writer.close()
            raise
    try:
        with EmbeddedRedis(tmp_path / "redis", port=port):
            wait_until(lambda: not writer.probe.away, what="the probe's PING answered")
            assert _write(writer, range(10, 12)) == [True, True]  # drains the spool first
            assert not writer.spool
            seqs = [v.seq for v in read_records(client, line_name, VerdictRecord)]
            assert seqs == list(range(12))
    finally:
        writer.close()
        client.close()


def test_a_forced_flush_that_reaches_redis_ends_the_outage_without_a_ping(
    tmp_path: Path, line_name: str
) -> None:
    cfg = RedisConfig(spool_dir=tmp_path / "spool", retries=0, retry_interval_s=3600.0)
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = client_for(cfg, server.url)
        writer = StreamWriter(client, line_name, cfg)
        try:
            server.stop()
            assert _write(writer, range(0, 3)) == [True] * 3
            assert writer.probe.away and writer.probe.pings_failed == 0  # no PING for an hour
            server.start()
            assert writer.flush()  # the operator's (or the stop's) forced drain
            assert not writer.probe.away
            assert _write(writer, range(3, 4)) == [True]
            assert writer.counters.written == 4 and not writer.spool
        finally:
            writer.close()
            client.close()
