"""StreamWriter against a real Redis: atomic idempotent frame writes, heatmaps, trimming."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from pydantic import SecretStr

from linewatch.config import DecisionConfig, RedisConfig
from linewatch.errors import ConfigError, LinewatchError
from linewatch.streams.client import redis_client as make_client
from linewatch.streams.records import (
    DefectRecord,
    RejectRecord,
    StreamKeys,
    VerdictRecord,
)
from linewatch.streams.server import EmbeddedRedis
from linewatch.streams.writer import StreamWriter
from linewatch.testing import frame_header, read_records, sample_batch

PNG = b"\x89PNG\r\n\x1a\n-test-"
R = TypeVar("R", VerdictRecord, DefectRecord, RejectRecord)


def _writer(
    client: redis.Redis, line: str, tmp_path: Path, *, heatmaps: str = "redis", **redis_cfg: int
) -> StreamWriter:
    cfg = RedisConfig(spool_dir=tmp_path / "spool", **redis_cfg)
    decision = DecisionConfig(heatmaps=heatmaps, heatmap_dir=tmp_path / "heat")
    return StreamWriter(client, line, cfg, decision)


def _unstamped(records: list[R]) -> list[R]:
    """``records`` without the write time that Redis stamped on them."""
    return [r.model_copy(update={"ts_written_us": None}) for r in records]


def test_every_entry_of_a_frame_carries_when_redis_wrote_it(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    writer = _writer(redis_client, line_name, tmp_path)
    batch = sample_batch("cam0", 4, n_defects=2)
    assert batch.reject is not None
    sent: list[VerdictRecord | RejectRecord | DefectRecord] = [
        batch.verdict, batch.reject, *batch.defects]
    assert all(r.ts_written_us is None for r in sent)
    before_us = time.time_ns() // 1000
    assert writer.write_verdicts([batch]) == [True]
    after_us = time.time_ns() // 1000 + 1  # Redis and this process read the same clock
    stamps = {r.ts_written_us for r in read_records(redis_client, line_name, VerdictRecord)}
    stamps |= {r.ts_written_us for r in read_records(redis_client, line_name, DefectRecord)}
    stamps |= {r.ts_written_us for r in read_records(redis_client, line_name, RejectRecord)}
    assert len(stamps) == 1  # one script, one instant for the frame's records
    stamp = stamps.pop()
    assert stamp is not None and before_us <= stamp <= after_us


def test_a_frame_is_written_once_however_often_it_is_sent(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    writer = _writer(redis_client, line_name, tmp_path)
    batch = sample_batch("cam0", 1, n_defects=2)

    assert writer.write_verdict(batch.verdict, batch.defects, batch.reject) is True
    assert writer.write_verdict(batch.verdict, batch.defects, batch.reject) is False
    again = _writer(redis_client, line_name, tmp_path)  # e.g. a restarted service
    assert again.write_verdict(batch.verdict, batch.defects, batch.reject) is False

    assert _unstamped(read_records(redis_client, line_name, VerdictRecord)) == [batch.verdict]
    assert _unstamped(read_records(redis_client, line_name, RejectRecord)) == [batch.reject]
    assert len(read_records(redis_client, line_name, DefectRecord)) == 2
    assert writer.counters.written == 1 and writer.counters.duplicates == 1
    done = StreamKeys(line_name).done("cam0:1")
    assert 0 < redis_client.ttl(done) <= RedisConfig().dedupe_ttl_s


def test_several_frames_go_in_one_call_in_order_and_duplicates_stay_out(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    writer = _writer(redis_client, line_name, tmp_path)
    first = [sample_batch("cam0", seq, reject=seq % 2 == 0) for seq in range(3)]
    assert writer.write_verdicts(first) == [True, True, True]
    again = [sample_batch("cam0", 1), sample_batch("cam0", 3, n_defects=2)]
    assert writer.write_verdicts(again) == [False, True]
    assert [v.seq for v in read_records(redis_client, line_name, VerdictRecord)] == [0, 1, 2, 3]
    assert [r.seq for r in read_records(redis_client, line_name, RejectRecord)] == [0, 2, 3]
    assert writer.counters.written == 4 and writer.counters.duplicates == 1
    assert writer.write_verdicts([]) == []


def test_a_redis_that_lost_its_scripts_still_gets_the_frames(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    writer = _writer(redis_client, line_name, tmp_path)
    assert writer.write_verdicts([sample_batch("cam0", 0)]) == [True]
    redis_client.script_flush()  # as after a restart without persistence of scripts
    assert writer.write_verdicts([sample_batch("cam0", s) for s in (1, 2)]) == [True, True]
    assert [v.seq for v in read_records(redis_client, line_name, VerdictRecord)] == [0, 1, 2]
    assert writer.counters.spooled == 0


def test_heatmaps_must_match_the_defects(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    writer = _writer(redis_client, line_name, tmp_path)
    batch = sample_batch("cam0", 0, n_defects=2)
    with pytest.raises(ValueError, match="1 heatmaps for 2 defects of cam0:0"):
        writer.write_verdict(batch.verdict, batch.defects, batch.reject, [PNG])


def test_a_pass_verdict_writes_no_reject(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    writer = _writer(redis_client, line_name, tmp_path)
    batch = sample_batch("cam0", 2, reject=False, n_defects=0)
    assert writer.write_verdict(batch.verdict)
    assert _unstamped(read_records(redis_client, line_name, VerdictRecord)) == [batch.verdict]
    assert read_records(redis_client, line_name, RejectRecord) == []


def test_heatmaps_in_redis_expire_and_are_named_by_the_defect(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    writer = _writer(redis_client, line_name, tmp_path, heatmaps="redis")
    batch = sample_batch("cam0", 3, n_defects=2)
    writer.write_verdict(batch.verdict, batch.defects, batch.reject, [PNG + b"0", PNG + b"1"])

    defects = read_records(redis_client, line_name, DefectRecord)
    refs = [d.heatmap_ref for d in defects]
    assert refs == [StreamKeys(line_name).heatmap("cam0:3", i) for i in (0, 1)]
    assert [redis_client.get(r) for r in refs if r] == [PNG + b"0", PNG + b"1"]
    assert refs[0] is not None
    assert 0 < redis_client.ttl(refs[0]) <= DecisionConfig().heatmap_ttl_s


def test_heatmaps_on_disk_and_off(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    on_disk = _writer(redis_client, line_name, tmp_path, heatmaps="disk")
    batch = sample_batch("cam0", 4)
    on_disk.write_verdict(batch.verdict, batch.defects, batch.reject, [PNG])
    off = _writer(redis_client, line_name, tmp_path, heatmaps="off")
    batch5 = sample_batch("cam0", 5)
    off.write_verdict(batch5.verdict, batch5.defects, batch5.reject, [PNG])

    disk_ref, off_ref = (d.heatmap_ref for d in read_records(redis_client, line_name, DefectRecord))
    assert disk_ref is not None and Path(disk_ref).read_bytes() == PNG
    assert off_ref is None
    assert not redis_client.exists(StreamKeys(line_name).heatmap("cam0:4", 0))


def test_streams_are_trimmed_approximately_to_maxlen(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    writer = _writer(redis_client, line_name, tmp_path, verdicts_maxlen=1000)
    for seq in range(2500):
        batch = sample_batch("cam0", seq, reject=False, n_defects=0)
        writer.write_verdict(batch.verdict)
    length = redis_client.xlen(StreamKeys(line_name).verdicts)
    # "~" trims whole radix-tree nodes (100 entries by default): never below maxlen.
    assert 1000 <= length < 1200
    last = read_records(redis_client, line_name, VerdictRecord)[-1]
    assert last.seq == 2499


def test_pending_frames_survive_until_their_verdict(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    writer = _writer(redis_client, line_name, tmp_path)
    headers = [frame_header("cam0", seq, deadline_ms=100 + seq) for seq in (7, 8)]
    for header in headers:
        writer.remember_pending(header)
    assert _writer(redis_client, line_name, tmp_path).load_pending() == headers

    batch = sample_batch("cam0", 7)
    writer.write_verdict(batch.verdict, batch.defects, batch.reject)
    assert writer.load_pending() == headers[1:]


def test_client_logs_in_with_the_configured_acl_user(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    user = f"decide-{line_name}"
    redis_client.acl_setuser(user, enabled=True, passwords=["+s3cret"],
                             keys=[f"linewatch:{line_name}:*"], commands=["+@all"])
    cfg = RedisConfig(username=user, password="s3cret", spool_dir=tmp_path / "spool")
    client = make_client(cfg, redis_server.url)
    batch = sample_batch("cam0", 1)
    assert StreamWriter(client, line_name, cfg).write_verdict(batch.verdict)
    denied = make_client(cfg.model_copy(update={"password": SecretStr("wrong")}), redis_server.url)
    with pytest.raises(redis.AuthenticationError):
        denied.ping()
    client.close()


def test_client_tls_settings_reach_redis_py() -> None:
    cfg = RedisConfig(url="redis://db.example:6380/2", tls=True, tls_ca_certs=Path("ca.pem"),
                      tls_certfile=Path("c.pem"), tls_keyfile=Path("c.key"))
    pool = make_client(cfg).connection_pool
    assert pool.connection_class is redis.SSLConnection
    assert (pool.connection_kwargs["ssl_ca_certs"], pool.connection_kwargs["ssl_keyfile"]) == (
        "ca.pem", "c.key"
    )
    with pytest.raises(ConfigError, match=r"redis\.url"):
        make_client(RedisConfig())


def test_embedded_server_on_a_taken_port_fails_with_redis_own_reason(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    clash = EmbeddedRedis(tmp_path / "clash", port=redis_server.port, startup_timeout_s=5)
    with pytest.raises(LinewatchError, match=r"did not start: .*(in use|bind)"):
        clash.start()
    assert not clash.running
