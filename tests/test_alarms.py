"""Alarm rules fed constructed verdicts at explicit times; the consumer on a real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from linewatch.config import AlarmsConfig, RedisConfig
from linewatch.consumers.alarms import NS, AlarmRules, AlarmsConsumer
from linewatch.consumers.group import StreamEntry
from linewatch.streams.records import AlarmRecord, DefectRecord, StreamKeys, VerdictRecord
from linewatch.streams.server import EmbeddedRedis
from linewatch.streams.writer import StreamWriter
from linewatch.testing import read_records, wait_until

CFG = AlarmsConfig(
    cooldown_s=100.0,
    reject_rate_window_s=60.0, reject_rate_limit=0.2, reject_rate_min_parts=20,
    repeat_window_s=60.0, repeat_radius_px=10.0, repeat_count=3,
    silence_s=30.0, fail_safe_cooldown_s=60.0,
    drift_reference_parts=100, drift_recent_parts=50, drift_check_every=10,
    drift_ks_limit=0.3, drift_p_limit=0.01,
)


def verdict(
    seq: int, t_s: float, *, camera: str = "cam0", reject: bool = False, score: float = 0.4,
    fail_safe: str | None = None, model_id: str = "m1",
) -> VerdictRecord:
    """A verdict decided at ``t_s`` seconds; ``fail_safe`` is the fail-safe reason."""
    rejected = reject or fail_safe is not None
    return VerdictRecord(
        frame_id=f"{camera}:{seq}", camera=camera, seq=seq, part_id=f"P{seq}",
        verdict="reject" if rejected else "pass",
        reason=fail_safe or ("anomaly" if reject else "ok"), fail_safe=fail_safe is not None,
        score=None if fail_safe else score, model_id=None if fail_safe else model_id,
        threshold=1.0, threshold_version="t1", rule="operating_point",
        n_defects=1 if reject else 0, ts_acquired_ns=int(t_s * NS) - 1000,
        ts_decided_ns=int(t_s * NS), latency_ms=0.001,
    )


def defect(seq: int, t_s: float, x: int, y: int, *, camera: str = "cam0", region: int = 0,
           ) -> DefectRecord:
    """A 10 x 10 defect region at (x, y) of frame ``seq``, decided at ``t_s`` seconds."""
    return DefectRecord(
        frame_id=f"{camera}:{seq}", camera=camera, seq=seq, part_id=f"P{seq}", region=region,
        x=x, y=y, w=10, h=10, area=100, max_score=2.0, mean_score=1.5, heatmap_ref=None,
        model_id="m1", ts_decided_ns=int(t_s * NS),
    )


def kinds(alarms: list[AlarmRecord]) -> list[str]:
    return [a.kind for a in alarms]


def normal_run(rules: AlarmRules, seconds: int, start_seq: int = 0, seed: int = 0,
               ) -> list[AlarmRecord]:
    """Two cameras, 2 parts/s each, 5 % rejects with a defect at a random place, steady
    scores; the clock ticks every second."""
    rng = np.random.default_rng(seed)
    alarms: list[AlarmRecord] = []
    seq = start_seq
    for second in range(seconds):
        for half in (0.0, 0.5):
            for camera in ("cam0", "cam1"):
                t = second + half
                reject = (seq // 2) % 20 == 0
                score = 1.5 if reject else float(rng.normal(0.4, 0.05))
                alarms += rules.update(verdict(seq, t, camera=camera, reject=reject, score=score))
                if reject:
                    x, y = (int(v) for v in rng.integers(0, 500, 2))
                    alarms += rules.update_defect(defect(seq, t, x, y, camera=camera))
                seq += 1
        alarms += rules.tick(int((second + 1) * NS))
    return alarms


def test_a_normal_line_raises_no_alarm() -> None:
    rules = AlarmRules(CFG, ["cam0", "cam1"], start_ns=0)
    assert normal_run(rules, seconds=300) == []


def test_reject_rate_above_the_limit_alarms_once_per_cooldown() -> None:
    rules = AlarmRules(CFG, ["cam0"], start_ns=0)
    alarms: list[AlarmRecord] = []
    for seq in range(300):  # one part every 0.5 s, every other one rejected: 50 %
        alarms += rules.update(verdict(seq, seq * 0.5, reject=seq % 2 == 1))
    rate = [a for a in alarms if a.kind == "reject_rate"]
    # min_parts = 20: first at the 20th part (t = 9.5 s); the next after 100 s cooldown.
    assert [a.ts_ns for a in rate] == [int(9.5 * NS), int(109.5 * NS)]
    details = json.loads(rate[0].details_json)
    assert (details["parts"], details["rejects"], rate[0].camera) == (20, 10, "cam0")


def test_reject_rate_counts_only_the_window() -> None:
    rules = AlarmRules(CFG, ["cam0"], start_ns=0)
    alarms: list[AlarmRecord] = []
    for seq in range(10):  # a burst of rejects, then a minute later only good parts
        alarms += rules.update(verdict(seq, seq * 0.1, reject=True))
    for seq in range(10, 60):
        alarms += rules.update(verdict(seq, 70.0 + seq, reject=False))
    assert "reject_rate" not in kinds(alarms)


def test_repeated_defect_at_one_place_alarms_scattered_ones_do_not() -> None:
    rules = AlarmRules(CFG, ["cam0"], start_ns=0)
    scattered = [rules.update_defect(defect(i, i, 50 * i, 40)) for i in range(6)]
    assert all(a == [] for a in scattered)
    # Two regions of one frame near each other count as one part.
    assert rules.update_defect(defect(10, 10, 200, 200, region=0)) == []
    assert rules.update_defect(defect(10, 10, 204, 203, region=1)) == []
    assert rules.update_defect(defect(11, 11, 197, 205)) == []
    (alarm,) = rules.update_defect(defect(12, 12, 202, 198))
    assert (alarm.kind, alarm.camera) == ("repeated_defect", "cam0")
    assert json.loads(alarm.details_json)["frame_ids"] == ["cam0:10", "cam0:11", "cam0:12"]


def test_repeated_defect_outside_the_window_does_not_count() -> None:
    rules = AlarmRules(CFG, ["cam0"], start_ns=0)
    alarms = [rules.update_defect(defect(i, 61.0 * i, 100, 100)) for i in range(5)]
    assert all(a == [] for a in alarms)


def test_silent_camera_alarms_once_and_resumes() -> None:
    rules = AlarmRules(CFG, ["cam0", "cam1"], start_ns=0)
    alarms: list[AlarmRecord] = []
    for second in range(1, 60):
        alarms += rules.update(verdict(second, second - 0.5, camera="cam0"))
        alarms += rules.tick(second * NS)
    (silent,) = alarms
    assert (silent.kind, silent.camera, silent.severity) == ("camera_silent", "cam1", "critical")
    assert silent.ts_ns == 30 * NS
    (resumed,) = rules.update(verdict(100, 60.0, camera="cam1"))
    assert (resumed.kind, resumed.camera) == ("camera_resumed", "cam1")
    # A camera first seen in a verdict is watched from then on.
    rules.update(verdict(1, 61.0, camera="cam9"))
    assert [a.camera for a in rules.tick(95 * NS)] == ["cam0", "cam1", "cam9"]


def test_fail_safe_rejects_alarm_at_once_then_as_a_count() -> None:
    rules = AlarmRules(CFG, ["cam0"], start_ns=0)
    (first,) = rules.update(verdict(1, 1.0, fail_safe="timeout"))
    assert (first.kind, first.severity) == ("fail_safe_reject", "critical")
    assert rules.update(verdict(2, 2.0, fail_safe="timeout")) == []
    assert rules.update(verdict(3, 3.0, fail_safe="worker_lost")) == []
    assert rules.tick(30 * NS) == []  # still within the 60 s cooldown
    silent, held = rules.tick(61 * NS)  # (and cam0 has been silent since)
    assert (held.kind, silent.kind) == ("fail_safe_reject", "camera_silent")
    assert json.loads(held.details_json)["reasons"] == {"timeout": 1, "worker_lost": 1}
    assert rules.tick(200 * NS) == []  # nothing more held


def passing(rules: AlarmRules, scores: np.ndarray, start_seq: int, model_id: str = "m1",
            ) -> list[AlarmRecord]:
    alarms: list[AlarmRecord] = []
    for i, score in enumerate(scores):
        seq = start_seq + i
        alarms += rules.update(verdict(seq, seq * 0.5, score=float(score), model_id=model_id))
    return alarms


def test_score_drift_of_passing_parts_alarms() -> None:
    rng = np.random.default_rng(1)
    rules = AlarmRules(CFG, ["cam0"], start_ns=0)
    assert passing(rules, rng.normal(0.4, 0.05, 150), 0) == []  # reference, then same
    alarms = passing(rules, rng.normal(0.55, 0.05, 60), 150)
    (drift,) = [a for a in alarms if a.kind == "score_drift"]
    details = json.loads(drift.details_json)
    # Raised while the window still mixes old and new scores: the mean has moved up.
    assert details["ks"] >= CFG.drift_ks_limit and details["mean_shift_sd"] > 1


def test_a_new_model_starts_a_new_drift_reference() -> None:
    rng = np.random.default_rng(2)
    rules = AlarmRules(CFG, ["cam0"], start_ns=0)
    passing(rules, rng.normal(0.4, 0.05, 150), 0)
    # Another model scores on its own scale: no drift against the old model's scores.
    alarms = passing(rules, rng.normal(0.7, 0.05, 200), 150, model_id="m2")
    assert "score_drift" not in kinds(alarms)


# --------------------------------------------------------------------------- consumer


@pytest.fixture()
def writer(redis_client: redis.Redis, line_name: str, tmp_path: Path) -> StreamWriter:
    return StreamWriter(redis_client, line_name, RedisConfig(spool_dir=tmp_path / "spool"))


@pytest.fixture()
def consumer(redis_client: redis.Redis, line_name: str) -> Iterator[AlarmsConsumer]:
    """An alarms consumer running in a thread, joined to its group."""
    running = AlarmsConsumer(redis_client, line_name, CFG, ["cam0"], block_ms=20)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    keys = StreamKeys(line_name)
    wait_until(lambda: all(redis_client.exists(k) for k in (keys.verdicts, keys.defects)),
               what="groups made")
    yield running
    running.stop()
    thread.join(10)
    assert not thread.is_alive()


def now_s() -> float:
    return time.time()


def test_consumer_writes_alarms_and_acks_everything(
    consumer: AlarmsConsumer, writer: StreamWriter, redis_client: redis.Redis, line_name: str
) -> None:
    t0 = now_s()
    assert writer.write_verdict(verdict(0, t0, fail_safe="timeout"))
    for seq in (1, 2, 3):
        v = verdict(seq, t0 + seq, reject=True, score=1.5)
        assert writer.write_verdict(v, [defect(seq, t0 + seq, 300, 120)])
    wait_until(lambda: len(read_records(redis_client, line_name, AlarmRecord)) >= 2,
               what="two alarms written")
    alarms = read_records(redis_client, line_name, AlarmRecord)
    assert sorted(kinds(alarms)) == ["fail_safe_reject", "repeated_defect"]
    keys = StreamKeys(line_name)
    wait_until(lambda: all(
        redis_client.xpending(k, CFG.group)["pending"] == 0 for k in (keys.verdicts, keys.defects)
    ), what="all entries acked")
    assert (consumer.stats.verdicts, consumer.stats.defects) == (4, 3)


def test_redelivered_entry_is_acked_without_repeating_its_alarm(
    redis_client: redis.Redis, line_name: str
) -> None:
    keys = StreamKeys(line_name)
    running = AlarmsConsumer(redis_client, line_name, CFG, ["cam0"], block_ms=20)
    running.poll()  # joins the group at the end of the streams
    fields = verdict(0, now_s(), fail_safe="timeout").to_fields()
    entry_id = redis_client.xadd(keys.verdicts, fields)  # type: ignore[arg-type]
    running.poll()
    encoded = {k.encode(): v.encode() for k, v in fields.items()}
    entry = StreamEntry(keys.verdicts, entry_id.decode(), encoded)  # type: ignore[union-attr]
    running.handle(entry)  # as after an outage: delivered a second time
    assert running.stats.redelivered == 1
    assert kinds(read_records(redis_client, line_name, AlarmRecord)) == ["fail_safe_reject"]


def test_silence_is_checked_by_the_consumer_clock(
    redis_client: redis.Redis, line_name: str
) -> None:
    clock = [1_000 * NS]
    running = AlarmsConsumer(redis_client, line_name, CFG, ["cam0"], block_ms=20,
                             clock_ns=lambda: clock[0])
    running.poll()
    assert read_records(redis_client, line_name, AlarmRecord) == []
    clock[0] += 31 * NS
    running.poll()
    (alarm,) = read_records(redis_client, line_name, AlarmRecord)
    assert (alarm.kind, alarm.camera) == ("camera_silent", "cam0")


def test_alarms_command_runs_until_sigterm(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, writer: StreamWriter,
    line_name: str, tmp_path: Path,
) -> None:
    config = tmp_path / "line.toml"
    config.write_text(
        f'line = "{line_name}"\n[[cameras]]\nid = "cam0"\n[cameras.source]\nkind = "synth"\n'
    )
    repo = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "linewatch", "alarms", str(config), "--redis-url",
         redis_server.url],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        keys = StreamKeys(line_name)
        wait_until(lambda: redis_client.exists(keys.defects), timeout_s=20, what="groups made")
        writer.write_verdict(verdict(0, now_s(), fail_safe="worker_lost"))
        wait_until(lambda: read_records(redis_client, line_name, AlarmRecord), timeout_s=20,
                   what="alarm written")
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert "1 alarm(s) from 1 verdict(s)" in stdout
