"""DecisionService end to end: real PULL socket, real encoded messages, real Redis."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import zmq

from linewatch.config import LineConfig, validate_config
from linewatch.decision.service import DecisionService
from linewatch.streams.client import redis_client as client_for
from linewatch.streams.records import DefectRecord, RejectRecord, StreamKeys, VerdictRecord
from linewatch.streams.server import EmbeddedRedis
from linewatch.testing import frame_header, read_records, redis_server, wait_until
from linewatch.transport.codec import encode_message, encode_result
from linewatch.wire import FrameAnnounce, FrameFailed, FrameHeader, GapNotice, ResultHeader

HOUR_MS = 3_600_000.0


def _config(tmp_path: Path, line: str) -> LineConfig:
    return validate_config({
        "line": line,
        "cameras": [{"id": "cam0", "source": {"kind": "synth"}}],
        "transport": {"results_endpoint": f"ipc://{tmp_path}/results"},
        "decision": {"sigma": 1.0, "min_area": 4, "tick_ms": 5},
        "redis": {"spool_dir": str(tmp_path / "spool")},
    })


def _result(header: FrameHeader, score: float, amap: np.ndarray) -> list[bytes | memoryview]:
    now = time.time_ns()
    result = ResultHeader(
        frame=header, score=score, map_dtype="float16", map_shape=amap.shape,
        model_id="model-a", threshold_version="t1", threshold=1.0, worker="w0",
        ts_infer_start_ns=now, ts_infer_end_ns=now, batch_size=1,
    )
    return encode_result(result, amap.astype(np.float16))


def _defective_map() -> np.ndarray:
    amap = np.zeros((64, 64), np.float32)
    amap[10:20, 30:44] = 2.5
    return amap


class Running:
    """A service on its own thread and a PUSH socket connected to it."""

    def __init__(self, service: DecisionService, endpoint: str) -> None:
        self.service = service
        self.thread = threading.Thread(target=service.run, daemon=True)
        self.thread.start()
        assert service.ready.wait(10), "decision service did not bind"
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(endpoint)

    def send(self, parts: list[bytes | memoryview] | list[bytes]) -> None:
        self.push.send_multipart(parts, copy=False)

    def close(self) -> None:
        self.push.close(linger=2000)
        self.ctx.term()
        self.service.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "decision service did not stop"


@pytest.fixture()
def start(
    tmp_path: Path, redis_client: redis.Redis, line_name: str
) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def _start(**kwargs: object) -> Running:
        cfg = _config(tmp_path, line_name)
        running = Running(DecisionService(cfg, redis_client, **kwargs),  # type: ignore[arg-type]
                          cfg.transport.results_endpoint)
        started.append(running)
        return running

    yield _start
    for running in started:
        if running.thread.is_alive():
            running.close()


def _verdicts(client: redis.Redis, line: str, n: int) -> dict[int, VerdictRecord]:
    def enough() -> list[VerdictRecord]:
        records = read_records(client, line, VerdictRecord)
        return records if len(records) >= n else []

    return {v.seq: v for v in wait_until(enough, what=f"{n} verdicts")}


def test_every_frame_gets_exactly_one_verdict(
    start: Callable[..., Running], redis_client: redis.Redis, line_name: str
) -> None:
    running = start()
    frames = {seq: frame_header("cam0", seq, deadline_ms=HOUR_MS) for seq in range(8)}
    for header in frames.values():
        running.send(encode_message(FrameAnnounce(frame=header)))
    running.send(_result(frames[0], 2.5, _defective_map()))                 # reject
    running.send(_result(frames[1], 0.2, np.full((64, 64), 0.2, np.float32)))  # pass
    running.send(_result(frames[2], 2.5, _defective_map() * math.nan))      # bad result
    running.send(encode_message(FrameFailed(frame=frames[3], reason="worker_lost")))
    running.send(encode_message(GapNotice(camera="cam0", first_seq=8, last_seq=9,
                                          ts_detected_ns=time.time_ns(),
                                          deadline_ns=time.time_ns())))
    running.send(_result(frames[0], 0.1, np.zeros((64, 64), np.float32)))  # duplicate
    running.send([b"not json"])
    # frames 4..7 were announced with an hour to go: no verdict yet.
    verdicts = _verdicts(redis_client, line_name, 6)
    running.close()

    assert sorted(verdicts) == [0, 1, 2, 3, 8, 9]
    v = verdicts
    assert (v[0].verdict, v[0].reason, v[0].fail_safe) == ("reject", "anomaly", False)
    assert v[0].score == 2.5
    assert (v[1].verdict, v[1].reason, v[1].n_defects) == ("pass", "ok", 0)
    assert (v[2].verdict, v[2].reason, v[2].fail_safe) == ("reject", "bad_result", True)
    assert (v[3].verdict, v[3].reason, v[3].fail_safe) == ("reject", "worker_lost", True)
    assert all(v[s].reason == "missed_frame" and v[s].part_id is None for s in (8, 9))
    assert v[0].part_id == frames[0].part_id and v[0].model_id == "model-a"
    assert v[0].latency_ms is not None and v[0].latency_ms >= 0

    (defect,) = read_records(redis_client, line_name, DefectRecord)
    assert (defect.frame_id, defect.x, defect.w) == ("cam0:0", 30, 14)
    assert defect.max_score == pytest.approx(2.5, rel=1e-2)
    assert defect.heatmap_ref is not None and redis_client.exists(defect.heatmap_ref)
    rejects = read_records(redis_client, line_name, RejectRecord)
    assert sorted(r.seq for r in rejects) == [0, 2, 3, 8, 9]
    stats = running.service.stats()
    assert stats["decision_ignored_results"] == 1 and stats["bad_messages"] == 1
    assert stats["pending"] == 4


def test_a_frame_without_result_is_rejected_fail_safe_at_its_deadline(
    start: Callable[..., Running], redis_client: redis.Redis, line_name: str
) -> None:
    running = start()
    late = frame_header("cam0", 1, deadline_ms=50)
    running.send(encode_message(FrameAnnounce(frame=late)))
    (verdict,) = _verdicts(redis_client, line_name, 1).values()
    assert (verdict.seq, verdict.verdict, verdict.reason, verdict.fail_safe) == (
        1, "reject", "timeout", True
    )
    assert verdict.ts_decided_ns > late.deadline_ns
    running.send(_result(late, 0.1, np.zeros((8, 8), np.float32)))  # too late now
    wait_until(lambda: running.service.counters.ignored_results == 1, what="late result seen")
    running.close()
    assert len(read_records(redis_client, line_name, VerdictRecord)) == 1


def test_a_restarted_service_decides_what_its_predecessor_held_and_nothing_twice(
    start: Callable[..., Running], redis_client: redis.Redis, line_name: str
) -> None:
    first = start()
    held = frame_header("cam0", 5, deadline_ms=HOUR_MS)
    done = frame_header("cam0", 6, deadline_ms=HOUR_MS)
    first.send(encode_message(FrameAnnounce(frame=held)))
    first.send(_result(done, 2.0, _defective_map()))
    _verdicts(redis_client, line_name, 1)
    wait_until(lambda: redis_client.hexists(StreamKeys(line_name).pending, held.frame_id),
               what="pending frame saved")
    first.close()

    # The next run starts after the held frame's deadline, and the result for
    # frame 6 is delivered again (e.g. a worker's PUSH queue replayed).
    second = start(clock_ns=lambda: time.time_ns() + 2 * int(HOUR_MS * 1e6))
    second.send(_result(done, 2.0, _defective_map()))
    verdicts = _verdicts(redis_client, line_name, 2)
    wait_until(lambda: second.service.writer.counters.duplicates == 1, what="duplicate refused")
    second.close()

    assert sorted(verdicts) == [5, 6]
    assert (verdicts[5].reason, verdicts[5].fail_safe) == ("timeout", True)
    assert len(read_records(redis_client, line_name, VerdictRecord)) == 2
    assert not redis_client.exists(StreamKeys(line_name).pending)


def test_the_decide_process_writes_verdicts_and_exits_cleanly_on_sigterm(
    tmp_path: Path, redis_server: EmbeddedRedis, redis_client: redis.Redis, line_name: str
) -> None:
    config = tmp_path / "line.toml"
    config.write_text(
        f'line = "{line_name}"\n'
        '[[cameras]]\nid = "cam0"\n[cameras.source]\nkind = "synth"\n'
        f'[transport]\nresults_endpoint = "ipc://{tmp_path}/results"\n'
        f'[redis]\nspool_dir = "{tmp_path}/spool"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.decide", str(config), "--redis-url", redis_server.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        push.connect(f"ipc://{tmp_path}/results")  # queued until the process binds
        push.send_multipart(_result(frame_header("cam0", 0, deadline_ms=HOUR_MS), 2.0,
                                    _defective_map()), copy=False)
        (verdict,) = _verdicts(redis_client, line_name, 1).values()
        assert verdict.verdict == "reject"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
        assert process.returncode == 0, stderr.decode()[-2000:]
    finally:
        push.close(linger=0)
        ctx.term()
        if process.poll() is None:
            process.kill()
            process.wait()


def test_verdicts_decided_while_redis_is_down_arrive_once_it_is_back(
    tmp_path: Path, line_name: str
) -> None:
    cfg = _config(tmp_path, line_name)
    cfg = cfg.model_copy(update={"redis": cfg.redis.model_copy(
        update={"retry_interval_s": 0.05, "retries": 0})})
    with redis_server(tmp_path / "redis", aof=True) as server:
        client = client_for(cfg.redis, server.url)
        running = Running(DecisionService(cfg, client), cfg.transport.results_endpoint)
        try:
            server.stop()
            for seq in range(5):
                header = frame_header("cam0", seq, deadline_ms=HOUR_MS)
                running.send(encode_message(FrameAnnounce(frame=header)))
                running.send(_result(header, 2.0 if seq % 2 else 0.1, _defective_map()))
            writer = running.service.writer
            wait_until(lambda: writer.counters.spooled == 5, what="5 verdicts spooled")
            server.start()
            verdicts = _verdicts(client, line_name, 5)
        finally:
            running.close()
        assert [verdicts[s].verdict for s in range(5)] == ["pass", "reject"] * 2 + ["pass"]
        assert len(read_records(client, line_name, VerdictRecord)) == 5
        assert not writer.spool
        client.close()
