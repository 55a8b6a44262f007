"""The whole line with real processes: camera -> ZeroMQ -> 2 workers -> decision -> Redis.

Each test writes a line configuration, starts it with the supervisor (as
``linewatch run`` does) and reads the verdicts back from a real Redis.
"""

from __future__ import annotations

from pathlib import Path

import redis
import zmq

from linewatch.acquisition.genicam import viky_cti_path
from linewatch.streams.records import VerdictRecord
from linewatch.streams.server import EmbeddedRedis
from linewatch.testing import read_records, running_line, wait_until

LINE_TIMEOUT_S = 240.0  # a bound for slow CI machines, not a speed claim


def _line_toml(tmp: Path, line: str, model: Path, camera: str, frames: int,
               deadline_ms: float = 20000.0) -> Path:
    path = tmp / "line.toml"
    path.write_text(
        f"""
line = "{line}"

[[cameras]]
id = "cam0"
frames = {frames}
deadline_ms = {deadline_ms}
[cameras.source]
{camera}

[transport]
frames_endpoint = "ipc://{tmp}/frames"
workers_endpoint = "ipc://{tmp}/workers"
results_endpoint = "ipc://{tmp}/results"

[workers]
count = 2
max_batch = 4
max_wait_ms = 5.0
device = "cpu"
threads = 1

[model]
path = "{model}"

[redis]
spool_dir = "{tmp}/spool"
""",
        encoding="utf-8",
    )
    return path


def _verdicts(client: redis.Redis, line: str, count: int) -> list[VerdictRecord]:
    wait_until(lambda: len(read_records(client, line, VerdictRecord)) >= count,
               timeout_s=LINE_TIMEOUT_S, interval_s=0.2, what=f"{count} verdicts")
    return read_records(client, line, VerdictRecord)


def test_genicam_frames_through_two_workers_end_as_one_verdict_each_in_order(
    tmp_path: Path, redis_server: EmbeddedRedis, redis_client: redis.Redis, line_name: str,
    tiny_line_model: tuple[Path, Path],
) -> None:
    frames = 24
    camera = f'kind = "genicam"\ncti = "{viky_cti_path()}"\nserial_number = "0"'
    config = _line_toml(tmp_path, line_name, tiny_line_model[1], camera, frames)
    with running_line(config, redis_server.url, tmp_path / "logs"):
        verdicts = _verdicts(redis_client, line_name, frames)
    verdicts = read_records(redis_client, line_name, VerdictRecord)
    seqs = [v.seq for v in verdicts]
    assert len(verdicts) == frames
    assert len(set(seqs)) == frames
    assert seqs == sorted(seqs)
    assert seqs == list(range(seqs[0], seqs[0] + frames))
    assert all(v.camera == "cam0" and v.model_id for v in verdicts)
    assert not any(v.fail_safe for v in verdicts)
    workers = (tmp_path / "logs" / "infer-0.log").read_text() + (
        tmp_path / "logs" / "infer-1.log").read_text()
    assert "worker 0:" in workers and "worker 1:" in workers


def test_folder_replay_rejects_defects_and_passes_good_parts(
    tmp_path: Path, redis_server: EmbeddedRedis, redis_client: redis.Redis, line_name: str,
    tiny_line_model: tuple[Path, Path],
) -> None:
    data, model = tiny_line_model
    images = sorted(p for p in (data / "test").rglob("*.png"))
    camera = f'kind = "folder"\npath = "{data}"\nsplit = "test"\nfps = 50.0'
    config = _line_toml(tmp_path, line_name, model, camera, len(images))
    with running_line(config, redis_server.url, tmp_path / "logs"):
        verdicts = _verdicts(redis_client, line_name, len(images))
    good = [v for v in verdicts if v.part_id and v.part_id.startswith("good/")]
    defective = [v for v in verdicts if v.part_id and not v.part_id.startswith("good/")]
    assert len(good) + len(defective) == len(images)
    rejected = sum(v.verdict == "reject" for v in defective) / len(defective)
    passed = sum(v.verdict == "pass" for v in good) / len(good)
    assert rejected >= 0.8, f"only {rejected:.0%} of defective parts rejected"
    assert passed >= 0.8, f"only {passed:.0%} of good parts passed"


def test_malformed_messages_are_counted_and_the_line_keeps_running(
    tmp_path: Path, redis_server: EmbeddedRedis, redis_client: redis.Redis, line_name: str,
    tiny_line_model: tuple[Path, Path],
) -> None:
    frames = 20
    camera = 'kind = "synth"\nfps = 20.0\nsize = 64'
    config = _line_toml(tmp_path, line_name, tiny_line_model[1], camera, frames)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    try:
        with running_line(config, redis_server.url, tmp_path / "logs"):
            _verdicts(redis_client, line_name, 1)
            push.connect(f"ipc://{tmp_path}/frames")
            for parts in ([b"not json"], [b'{"kind": "frame", "v": 99}', b"x"],
                          [b'{"kind":"frame"}', b"", b"extra"]):
                push.send_multipart(parts)
            verdicts = _verdicts(redis_client, line_name, frames)
    finally:
        push.close()
        ctx.term()
    assert len(verdicts) == frames
    assert "bad_message" in (tmp_path / "logs" / "dispatch.log").read_text()
