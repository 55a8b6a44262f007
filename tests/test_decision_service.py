"""DecisionService end to end: real PULL socket, real encoded messages, real Redis."""

from __future__ import annotations

import json
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
from linewatch.streams.records import (
    AlarmRecord,
    DefectRecord,
    RejectRecord,
    StreamKeys,
    VerdictRecord,
)
from linewatch.streams.server import EmbeddedRedis
from linewatch.testing import frame_header, read_records, redis_server, wait_until
from linewatch.transport.codec import encode_message, encode_result
from linewatch.wire import (
    CameraStatus,
    FrameAnnounce,
    FrameFailed,
    FrameHeader,
    GapNotice,
    ResultHeader,
)

HOUR_MS = 3_600_000.0
HOUR_NS = int(HOUR_MS * 1e6)


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


class Clock:
    """Wall clock plus an offset a test moves forward, to pass deadlines on cue."""

    def __init__(self) -> None:
        self.offset_ns = 0

    def __call__(self) -> int:
        return time.time_ns() + self.offset_ns


def _order(client: redis.Redis, line: str, camera: str = "cam0") -> list[int]:
    """Seqs of ``camera`` in the verdict stream, in stream order."""
    return [v.seq for v in read_records(client, line, VerdictRecord) if v.camera == camera]


def _verdicts(client: redis.Redis, line: str, n: int) -> dict[int, VerdictRecord]:
    def enough() -> list[VerdictRecord]:
        records = read_records(client, line, VerdictRecord)
        return records if len(records) >= n else []

    return {v.seq: v for v in wait_until(enough, what=f"{n} verdicts")}


def test_every_frame_gets_exactly_one_verdict(
    start: Callable[..., Running], redis_client: redis.Redis, line_name: str
) -> None:
    running = start()
    frames = {seq: frame_header("cam0", seq, deadline_ms=HOUR_MS) for seq in (0, 1, 2, 3, 6, 7)}
    for header in frames.values():
        running.send(encode_message(FrameAnnounce(frame=header)))
    running.send(_result(frames[0], 2.5, _defective_map()))                 # reject
    running.send(_result(frames[1], 0.2, np.full((64, 64), 0.2, np.float32)))  # pass
    running.send(_result(frames[2], 2.5, _defective_map() * math.nan))      # bad result
    running.send(encode_message(FrameFailed(frame=frames[3], reason="worker_lost")))
    running.send(encode_message(GapNotice(camera="cam0", first_seq=4, last_seq=5,
                                          ts_detected_ns=time.time_ns(),
                                          deadline_ns=time.time_ns())))
    running.send(_result(frames[0], 0.1, np.zeros((64, 64), np.float32)))  # duplicate
    running.send([b"not json"])
    # frames 6 and 7 were announced with an hour to go: no verdict yet.
    verdicts = _verdicts(redis_client, line_name, 6)
    running.close()

    assert sorted(verdicts) == [0, 1, 2, 3, 4, 5]
    v = verdicts
    assert (v[0].verdict, v[0].reason, v[0].fail_safe) == ("reject", "anomaly", False)
    assert v[0].score == 2.5
    assert (v[1].verdict, v[1].reason, v[1].n_defects) == ("pass", "ok", 0)
    assert (v[2].verdict, v[2].reason, v[2].fail_safe) == ("reject", "bad_result", True)
    assert (v[3].verdict, v[3].reason, v[3].fail_safe) == ("reject", "worker_lost", True)
    assert all(v[s].reason == "missed_frame" and v[s].part_id is None for s in (4, 5))
    assert v[0].part_id == frames[0].part_id and v[0].model_id == "model-a"
    assert v[0].latency_ms is not None and v[0].latency_ms >= 0

    (defect,) = read_records(redis_client, line_name, DefectRecord)
    assert (defect.frame_id, defect.x, defect.w) == ("cam0:0", 30, 14)
    assert defect.max_score == pytest.approx(2.5, rel=1e-2)
    assert defect.heatmap_ref is not None and redis_client.exists(defect.heatmap_ref)
    rejects = read_records(redis_client, line_name, RejectRecord)
    assert [r.seq for r in rejects] == [0, 2, 3, 4, 5]
    stats = running.service.stats()
    assert stats["decision_ignored_results"] == 1 and stats["bad_messages"] == 1
    assert stats["pending"] == 2 and stats["held"] == 0


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
    held = frame_header("cam0", 6, deadline_ms=HOUR_MS)
    done = frame_header("cam0", 5, deadline_ms=HOUR_MS)
    first.send(encode_message(FrameAnnounce(frame=held)))
    first.send(_result(done, 2.0, _defective_map()))
    _verdicts(redis_client, line_name, 1)
    wait_until(lambda: redis_client.hexists(StreamKeys(line_name).pending, held.frame_id),
               what="pending frame saved")
    first.close()

    # The next run starts after the held frame's deadline, and the result for
    # frame 5 is delivered again (e.g. a worker's PUSH queue replayed).
    second = start(clock_ns=lambda: time.time_ns() + 2 * HOUR_NS)
    second.send(_result(done, 2.0, _defective_map()))
    verdicts = _verdicts(redis_client, line_name, 2)
    wait_until(lambda: second.service.writer.counters.duplicates == 1, what="duplicate refused")
    second.close()

    assert sorted(verdicts) == [5, 6]
    assert (verdicts[6].reason, verdicts[6].fail_safe) == ("timeout", True)
    assert [v.seq for v in read_records(redis_client, line_name, VerdictRecord)] == [5, 6]
    assert not redis_client.exists(StreamKeys(line_name).pending)


def test_results_arriving_shuffled_are_written_in_seq_order(
    start: Callable[..., Running], redis_client: redis.Redis, line_name: str
) -> None:
    running = start()
    frames = [frame_header("cam0", seq, deadline_ms=HOUR_MS) for seq in range(10)]
    for header in frames:
        running.send(encode_message(FrameAnnounce(frame=header)))
    for seq in [7, 2, 9, 0, 5, 1, 8, 3, 6, 4]:
        score = 2.5 if seq % 3 == 0 else 0.2
        running.send(_result(frames[seq], score, _defective_map() * (score / 2.5)))
    _verdicts(redis_client, line_name, 10)
    running.close()

    assert _order(redis_client, line_name) == list(range(10))
    rejects = read_records(redis_client, line_name, RejectRecord)
    assert [r.seq for r in rejects] == [0, 3, 6, 9]
    assert running.service.stats()["order_held"] >= 1


def test_a_frame_without_result_holds_later_ones_until_its_deadline(
    start: Callable[..., Running], redis_client: redis.Redis, line_name: str
) -> None:
    clock = Clock()
    running = start(clock_ns=clock)
    silent = frame_header("cam0", 0, deadline_ms=60_000)
    later = [frame_header("cam0", seq, deadline_ms=HOUR_MS) for seq in (1, 2, 3)]
    for header in [silent, *later]:
        running.send(encode_message(FrameAnnounce(frame=header)))
    for header in later:
        running.send(_result(header, 0.2, np.zeros((64, 64), np.float32)))
    wait_until(lambda: running.service.counters.results == 3, what="3 results decided")
    assert read_records(redis_client, line_name, VerdictRecord) == []  # all wait for seq 0

    clock.offset_ns = 2 * 60_000 * 1_000_000  # seq 0's deadline passes
    _verdicts(redis_client, line_name, 4)
    running.close()

    verdicts = read_records(redis_client, line_name, VerdictRecord)
    assert [(v.seq, v.reason) for v in verdicts] == [
        (0, "timeout"), (1, "ok"), (2, "ok"), (3, "ok")
    ]
    assert running.service.stats()["order_held"] == 3


def test_cameras_are_ordered_independently(
    start: Callable[..., Running], redis_client: redis.Redis, line_name: str
) -> None:
    running = start()
    cam0 = [frame_header("cam0", seq, deadline_ms=HOUR_MS) for seq in (0, 1)]
    cam1 = [frame_header("cam1", seq, deadline_ms=HOUR_MS) for seq in (0, 1)]
    for header in cam0 + cam1:
        running.send(encode_message(FrameAnnounce(frame=header)))
    quiet = np.zeros((64, 64), np.float32)
    running.send(_result(cam0[1], 0.2, quiet))              # waits for cam0:0
    running.send(_result(cam1[1], 0.2, quiet))
    running.send(_result(cam1[0], 0.2, quiet))
    wait_until(lambda: _order(redis_client, line_name, "cam1") == [0, 1], what="cam1 written")
    assert _order(redis_client, line_name, "cam0") == []
    running.send(_result(cam0[0], 0.2, quiet))
    _verdicts(redis_client, line_name, 4)
    running.close()
    assert _order(redis_client, line_name, "cam0") == [0, 1]


def test_missed_frames_fill_their_seqs_in_order(
    start: Callable[..., Running], redis_client: redis.Redis, line_name: str
) -> None:
    running = start()
    first, last = (frame_header("cam0", seq, deadline_ms=HOUR_MS) for seq in (10, 13))
    for header in (first, last):
        running.send(encode_message(FrameAnnounce(frame=header)))
    running.send(_result(last, 2.5, _defective_map()))
    now = time.time_ns()
    running.send(encode_message(GapNotice(camera="cam0", first_seq=11, last_seq=12,
                                          ts_detected_ns=now, deadline_ns=now + HOUR_NS)))
    wait_until(lambda: running.service.counters.missed == 2, what="gap decided")
    running.send(_result(first, 0.2, np.zeros((64, 64), np.float32)))
    _verdicts(redis_client, line_name, 4)
    running.close()

    verdicts = read_records(redis_client, line_name, VerdictRecord)
    assert [(v.seq, v.reason) for v in verdicts] == [
        (10, "ok"), (11, "missed_frame"), (12, "missed_frame"), (13, "anomaly")
    ]
    assert [r.seq for r in read_records(redis_client, line_name, RejectRecord)] == [11, 12, 13]


def test_a_restarted_service_orders_its_results_after_the_frames_it_restored(
    start: Callable[..., Running], redis_client: redis.Redis, line_name: str
) -> None:
    frames = [frame_header("cam0", seq, deadline_ms=HOUR_MS) for seq in (1, 2, 3)]
    first = start()
    for header in frames:
        first.send(encode_message(FrameAnnounce(frame=header)))
    first.send(_result(frames[0], 0.2, np.zeros((64, 64), np.float32)))
    _verdicts(redis_client, line_name, 1)
    pending = StreamKeys(line_name).pending
    wait_until(lambda: redis_client.hlen(pending) == 2, what="frames 2 and 3 saved as pending")
    first.close()  # nothing held: 2 and 3 stay pending for the next run

    second = start()
    second.send(_result(frames[2], 2.5, _defective_map()))  # waits for restored seq 2
    wait_until(lambda: second.service.counters.results == 1, what="seq 3 decided")
    assert _order(redis_client, line_name) == [1]
    second.send(_result(frames[1], 0.2, np.zeros((64, 64), np.float32)))
    _verdicts(redis_client, line_name, 3)
    second.close()

    assert _order(redis_client, line_name) == [1, 2, 3]
    assert not redis_client.exists(pending)


def test_a_stop_rejects_frames_pending_below_held_ones_and_writes_in_order(
    start: Callable[..., Running], redis_client: redis.Redis, line_name: str
) -> None:
    frames = [frame_header("cam0", seq, deadline_ms=HOUR_MS) for seq in (1, 2, 3, 4)]
    first = start()
    for header in frames:
        first.send(encode_message(FrameAnnounce(frame=header)))
    first.send(_result(frames[2], 0.2, np.zeros((64, 64), np.float32)))  # held behind 1, 2
    wait_until(lambda: first.service.counters.results == 1, what="seq 3 decided")
    first.close()

    verdicts = read_records(redis_client, line_name, VerdictRecord)
    assert [(v.seq, v.reason) for v in verdicts] == [
        (1, "decision_stopped"), (2, "decision_stopped"), (3, "ok")
    ]
    assert all(v.fail_safe for v in verdicts[:2])
    assert redis_client.hkeys(StreamKeys(line_name).pending) == [b"cam0:4"]

    # The successor gets seq 1's result again: already decided, no second verdict.
    second = start()
    second.send(_result(frames[0], 0.2, np.zeros((64, 64), np.float32)))
    wait_until(lambda: second.service.writer.counters.duplicates == 1, what="duplicate refused")
    second.send(_result(frames[3], 0.2, np.zeros((64, 64), np.float32)))
    _verdicts(redis_client, line_name, 4)
    second.close()
    assert _order(redis_client, line_name) == [1, 2, 3, 4]


def _handle_statuses(running: Running, statuses: list[CameraStatus]) -> None:
    """Send camera statuses to the running service, wait until it handled them all, stop it."""
    for status in statuses:
        running.send(encode_message(status))
    wait_until(lambda: running.service.counters.camera_status == len(statuses),
               what=f"{len(statuses)} statuses handled")
    running.close()


def test_a_lost_camera_raises_one_alarm(
    start: Callable[..., Running], redis_client: redis.Redis, line_name: str
) -> None:
    seen: list[CameraStatus] = []
    running = start(on_camera_status=seen.append)
    now = time.time_ns()
    lost = CameraStatus(camera="cam0", state="lost", detail="device removed", ts_ns=now)
    _handle_statuses(running, [
        CameraStatus(camera="cam0", state="connected", ts_ns=now - 1),
        lost,
        lost,  # delivered twice: still one alarm
        CameraStatus(camera="cam0", state="reconnected", ts_ns=now + 1),
    ])

    alarms = read_records(redis_client, line_name, AlarmRecord)
    assert [(a.kind, a.severity, a.camera) for a in alarms] == [
        ("camera_lost", "critical", "cam0"), ("camera_reconnected", "info", "cam0")
    ]
    assert alarms[0].ts_ns == now and "device removed" in alarms[0].message
    assert json.loads(alarms[0].details_json) == {"state": "lost", "detail": "device removed"}
    assert running.service.counters.alarms == 2 and len(seen) == 4


def test_an_overexposed_camera_raises_a_warning_and_its_recovery_a_note(
    start: Callable[..., Running], redis_client: redis.Redis, line_name: str
) -> None:
    running = start()
    now = time.time_ns()
    _handle_statuses(running, [
        CameraStatus(camera="cam1", state="overexposed",
                     detail="31% of the frame at its brightest value", ts_ns=now),
        CameraStatus(camera="cam1", state="exposure_ok", ts_ns=now + 1),
    ])

    alarms = read_records(redis_client, line_name, AlarmRecord)
    assert [(a.kind, a.severity, a.camera) for a in alarms] == [
        ("overexposed", "warning", "cam1"), ("exposure_ok", "info", "cam1")
    ]
    assert "31% of the frame" in alarms[0].message


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
            running.send(encode_message(CameraStatus(camera="cam0", state="lost",
                                                     ts_ns=time.time_ns())))
            writer = running.service.writer
            wait_until(lambda: writer.counters.spooled == 6, what="5 verdicts, 1 alarm spooled")
            server.start()
            verdicts = _verdicts(client, line_name, 5)
            wait_until(lambda: read_records(client, line_name, AlarmRecord), what="alarm")
        finally:
            running.close()
        assert [verdicts[s].verdict for s in range(5)] == ["pass", "reject"] * 2 + ["pass"]
        assert _order(client, line_name) == list(range(5))
        assert [a.kind for a in read_records(client, line_name, AlarmRecord)] == ["camera_lost"]
        assert not writer.spool
        client.close()
