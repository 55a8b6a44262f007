"""Fault injection with real processes and a real Redis: every acquired frame still ends as
exactly one verdict, with a reason, in order.

The line scenarios are those of ``linewatch faults`` (:mod:`linewatch.faults`): each
starts a small line (a 64-pixel tiny model, two workers, one camera), injects its
fault mid-stream, and checks the invariant and what that fault must show. The other
tests pin down the fixes the scenarios led to, fuzz the wire decoders, and check the
security defaults.
"""

from __future__ import annotations

import ast
import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from linewatch.config import LineConfig, PlcConfig, RedisConfig, TransportConfig
from linewatch.consumers.drivers import LogDriver
from linewatch.consumers.plc import PlcConsumer
from linewatch.decision.tracker import FrameTracker
from linewatch.errors import WireError
from linewatch.faults.harness import acquired_seqs
from linewatch.faults.invariant import tally
from linewatch.faults.report import fault_table
from linewatch.faults.result import FaultResult, Setup
from linewatch.faults.scenarios import run_scenario, scenario_names
from linewatch.faults.wire_fuzz import fuzz, mutate, valid_messages
from linewatch.runtime.supervisor import ProcessSpec, Supervisor
from linewatch.streams.client import redis_client
from linewatch.streams.records import StreamKeys
from linewatch.streams.server import EmbeddedRedis
from linewatch.streams.writer import StreamWriter
from linewatch.testing import frame_header, sample_batch, wait_until
from linewatch.transport.codec import (
    decode_camera_message,
    decode_decision_message,
    decode_frame,
    decode_result,
    encode_frame,
    encode_result,
)
from linewatch.transport.dispatcher import Dispatcher
from linewatch.transport.sockets import transport_context
from linewatch.wire import FrameAnnounce, ResultHeader

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory,
          tiny_line_model: tuple[Path, Path]) -> Setup:
    """One work folder for every scenario of this module, and the session's tiny model."""
    data, model = tiny_line_model
    return Setup(tmp_path_factory.mktemp("faults"), model, data)


def _run(name: str, setup: Setup) -> FaultResult:
    result = run_scenario(name, setup)
    assert result.ok, f"{name}: " + "; ".join(result.problems)
    return result


# --------------------------------------------------------------------------- the scenarios


def test_killed_worker_frames_move_on_and_it_comes_back(setup: Setup) -> None:
    result = _run("worker_killed", setup)
    assert result.tally is not None and result.tally.holds
    assert result.details["restarts"] >= 1
    assert result.details["scored_after_restart"] > 0


def test_killed_decision_service_loses_and_repeats_no_verdict(setup: Setup) -> None:
    result = _run("decision_killed", setup)
    assert result.tally is not None
    assert (result.tally.lost, result.tally.duplicated, result.tally.out_of_order) == (0, 0, 0)
    assert result.details["reannounced"] > 0


def test_redis_outage_is_spooled_and_the_gate_gets_every_reject(setup: Setup) -> None:
    result = _run("redis_outage", setup)
    assert result.tally is not None and result.tally.holds
    assert result.details["gate_signals"] == result.details["rejects"] > 0


def test_a_silent_redis_is_tried_once_and_no_frame_is_late(setup: Setup) -> None:
    result = _run("redis_silent", setup)
    assert result.tally is not None and result.tally.holds
    assert result.details["redis_tries"] == 1


def test_lost_camera_raises_alarms_and_reconnects(setup: Setup) -> None:
    result = _run("camera_lost", setup)
    assert result.details["alarms"][:2] == ["camera_lost", "camera_reconnected"]


def test_an_overexposed_camera_is_reported_and_its_recovery_too(setup: Setup) -> None:
    result = _run("overexposed_camera", setup)
    assert result.details["alarms"] == ["overexposed", "exposure_ok"]


def test_an_underexposed_camera_is_reported_and_its_recovery_too(setup: Setup) -> None:
    result = _run("underexposed_camera", setup)
    assert result.details["alarms"] == ["underexposed", "exposure_ok"]


def test_slow_worker_never_lets_a_frame_pass_its_deadline_unsafely(setup: Setup) -> None:
    result = _run("slow_worker", setup)
    scored_slow, scored_fast = result.details["scored"]
    assert scored_fast > scored_slow


def test_corrupt_images_become_missed_frame_verdicts(setup: Setup) -> None:
    result = _run("corrupt_images", setup)
    assert result.tally is not None
    assert result.tally.reasons.get("missed_frame") == len(result.details["bad_files"])


def test_nonfinite_scores_are_rejected_fail_safe(setup: Setup) -> None:
    result = _run("nonfinite_scores", setup)
    assert result.tally is not None and result.tally.reasons.get("bad_result", 0) > 0


def test_bad_model_files_are_refused_with_one_line(setup: Setup) -> None:
    result = _run("bad_model_file", setup)
    assert all("model.path" in e for e in result.details["errors"])


def test_bad_configuration_never_starts_half_a_line(setup: Setup) -> None:
    _run("bad_config", setup)


def test_every_scenario_has_a_test() -> None:
    tested = {n for n in scenario_names() if f'"{n}"' in Path(__file__).read_text()}
    assert tested == set(scenario_names())


# --------------------------------------------------------------------------- the invariant


def test_tally_counts_every_breach() -> None:
    good = [sample_batch(seq=s, reject=s == 2) for s in range(4)]
    verdicts = [b.verdict for b in good]
    rejects = [b.reject for b in good if b.reject is not None]
    assert tally(range(4), verdicts, rejects).holds

    broken = tally(range(5), [verdicts[1], verdicts[0], verdicts[0], verdicts[3]], [])
    assert (broken.lost, broken.duplicated, broken.out_of_order) == (2, 1, 2)
    assert not broken.holds and len(broken.breaches()) == 3
    stray = tally([0], [verdicts[0], verdicts[2]], rejects + rejects)
    assert (stray.unexpected, stray.reject_mismatch) == (1, 1)


def test_acquired_seqs_come_from_each_runs_start_and_stop() -> None:
    log = "\n".join([
        "2026 [info] acquire_started camera=cam0 endpoint=x next_seq=10",
        "2026 [info] acquire_stopped camera=cam0 frames=3 next_seq=13",
        "2026 [info] acquire_started camera=cam0 next_seq=500",  # a run killed: unknown
        "2026 [info] acquire_started camera=cam0 next_seq=900",
        "2026 [info] acquire_stopped camera=cam0 next_seq=902",
    ])
    assert acquired_seqs(log) == [10, 11, 12, 900, 901]


def test_fault_table_reports_failures() -> None:
    failed = FaultResult(name="x", fault="f", behaviour="b", tally=None, recover_s=1.25,
                         problems=["3 frame(s) lost"])
    row = fault_table([failed]).splitlines()[2]
    assert "1.2 s" in row and "FAILED: 3 frame(s) lost" in row


# --------------------------------------------------------------------------- fixes it led to


def test_a_result_that_overtakes_its_announcement_waits_for_lower_seqs() -> None:
    tracker = FrameTracker(announce_wait_ns=10**9)
    low, high = frame_header("cam0", 1, ts_acquired_ns=0), frame_header("cam0", 2, ts_acquired_ns=0)
    assert tracker.complete(high.frame_id)  # its result came first
    tracker.await_announcement(high, now_ns=0)
    assert tracker.lowest_pending_seq("cam0") == 2  # held: seq 1 may be on its way
    assert tracker.announce(low)
    assert not tracker.announce(high)  # ends the wait; not pending again
    assert tracker.lowest_pending_seq("cam0") == 1
    assert tracker.complete(low.frame_id)
    assert tracker.lowest_pending_seq("cam0") is None


def test_an_announcement_that_never_comes_stops_the_wait_in_time() -> None:
    tracker = FrameTracker(announce_wait_ns=500)
    header = frame_header("cam0", 4, ts_acquired_ns=0, deadline_ms=1000.0)
    tracker.complete(header.frame_id)
    tracker.await_announcement(header, now_ns=100)
    assert tracker.expire(now_ns=550) == [] and tracker.lowest_pending_seq("cam0") == 4
    assert tracker.expire(now_ns=700) == []  # no timeout verdict: it was decided
    assert tracker.lowest_pending_seq("cam0") is None


def test_an_announcement_of_a_written_frame_is_recognised(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    writer = StreamWriter(redis_client, line_name, RedisConfig(spool_dir=tmp_path / "spool"))
    batch = sample_batch("cam0", 3)
    assert writer.remember_pending(frame_header("cam0", 4))
    assert writer.write_verdict(batch.verdict, batch.defects, batch.reject)
    assert not writer.remember_pending(frame_header("cam0", 3))
    assert redis_client.hkeys(StreamKeys(line_name).pending) == [b"cam0:4"]


def test_dispatcher_announces_again_to_a_decision_that_reconnects(tmp_path: Path) -> None:
    cfg = TransportConfig(
        frames_endpoint=f"ipc://{tmp_path}/frames", workers_endpoint=f"ipc://{tmp_path}/workers",
        results_endpoint=f"ipc://{tmp_path}/results", linger_ms=0,
    )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with transport_context(cfg) as dctx:
        dispatcher = Dispatcher(cfg, dctx)
        camera = ctx.socket(zmq.PUSH)
        camera.connect(cfg.frames_endpoint)
        try:
            announced = _decision_run(ctx, dispatcher, cfg, camera, sends=3)
            again = _decision_run(ctx, dispatcher, cfg, camera, sends=0)
        finally:
            camera.close(linger=0)
            dispatcher.close()
    ctx.term()
    assert announced == [0, 1, 2]
    assert again == [0, 1, 2]  # the first decision died with them: announced again
    assert dispatcher.stats.reannounced == 3


def _decision_run(ctx: zmq.Context[zmq.Socket[bytes]], dispatcher: Dispatcher,
                  cfg: TransportConfig, camera: zmq.Socket[bytes], sends: int) -> list[int]:
    """Bind a decision socket, send ``sends`` frames, collect announcements, close it."""
    decision = ctx.socket(zmq.PULL)
    decision.bind(cfg.results_endpoint)
    seen: list[int] = []
    try:
        for seq in range(sends):
            header = frame_header("cam0", seq, shape=(4, 4))
            camera.send_multipart(encode_frame(header, np.zeros((4, 4), np.uint8)))

        def collect() -> bool:
            dispatcher.step(10)
            while decision.poll(0):
                message, _ = decode_decision_message(decision.recv_multipart())
                if isinstance(message, FrameAnnounce):
                    seen.append(message.frame.seq)
            return len(seen) >= 3

        wait_until(collect, timeout_s=20, what="announcements")
    finally:
        decision.close(linger=0)
    for _ in range(20):  # let the dispatcher see the disconnection
        dispatcher.step(10)
    return seen


ERROR_CHILD = "import sys; print('linewatch: error: model.path: m.lwm: checksum mismatch'); " \
    "sys.exit(2)"


def test_a_process_refusing_its_configuration_stops_the_line_with_its_error(
    tmp_path: Path,
) -> None:
    import sys

    supervisor = Supervisor([ProcessSpec("infer-0", (sys.executable, "-c", ERROR_CHILD), 2)],
                            log_dir=tmp_path, poll_s=0.02)
    thread = threading.Thread(target=supervisor.run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert supervisor.failed == "infer-0: model.path: m.lwm: checksum mismatch"
    assert supervisor.restarts == {"infer-0": 0}


# --------------------------------------------------------------------------- bad input: the wire


def test_wire_fuzz_scenario_finds_no_crash(setup: Setup) -> None:
    result = _run("wire_fuzz", setup)
    assert result.details["crashes"] == 0 and result.details["outcomes"]["bad_json"] > 0


def _frame_parts() -> list[bytes]:
    header = frame_header("cam0", 3, shape=(8, 8))
    return [bytes(p) for p in encode_frame(header, np.arange(64, dtype=np.uint8).reshape(8, 8))]


def _result_parts() -> list[bytes]:
    result = ResultHeader(
        frame=frame_header("cam0", 3), score=0.5, map_dtype="float16", map_shape=(4, 4),
        model_id="m", threshold_version="t", threshold=1.0, worker="w", ts_infer_start_ns=1,
        ts_infer_end_ns=2, batch_size=1,
    )
    return [bytes(p) for p in encode_result(result, np.zeros((4, 4), np.float16))]


@settings(max_examples=200, deadline=None)
@given(part=st.integers(0, 1), data=st.data())
def test_any_truncation_of_a_frame_or_result_is_refused(part: int, data: st.DataObject) -> None:
    for parts, decode in ((_frame_parts(), decode_frame), (_result_parts(), decode_result)):
        cut = data.draw(st.integers(0, len(parts[part]) - 1))
        truncated = [*parts[:part], parts[part][:cut], *parts[part + 1:]]
        with pytest.raises(WireError):
            decode(truncated)


@settings(max_examples=200, deadline=None)
@given(version=st.one_of(st.integers(), st.text(max_size=4), st.none(), st.floats()))
@example(version=1.0)  # equal to 1 in Python: once passed the version check
@example(version=True)
def test_any_other_wire_version_is_refused(version: object) -> None:
    header = json.loads(_frame_parts()[0])
    if version == 1 and not isinstance(version, bool | float):
        return  # the one version this linewatch speaks
    header["v"] = version
    with pytest.raises(WireError):
        decode_camera_message([json.dumps(header).encode(), _frame_parts()[1]])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), rounds=st.integers(1, 3))
def test_stacked_random_corruptions_never_crash_a_decoder(seed: int, rounds: int) -> None:
    rng = np.random.default_rng(seed)
    for _, parts, decode in valid_messages():
        corrupted = parts
        for _ in range(rounds):
            corrupted = mutate(corrupted, rng)
        with contextlib.suppress(WireError):  # refused is fine; any other error is not
            decode(corrupted)


def test_fuzz_is_reproducible() -> None:
    assert fuzz(500, seed=3) == fuzz(500, seed=3)


# --------------------------------------------------------------------------- security


def _python_sources() -> Iterator[Path]:
    yield from sorted((ROOT / "linewatch").rglob("*.py"))


def test_no_pickle_anywhere() -> None:
    """No pickle, no torch.load without weights_only=True, no np.load with allow_pickle."""
    found = []
    for path in _python_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib") for n in names):
                    found.append(f"{where}: imports pickle")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                kwargs = {k.arg: k.value for k in node.keywords}
                name = node.func.attr
                if name == "load" and _owner(node.func) == "torch" and not _is_true(
                        kwargs.get("weights_only")):
                    found.append(f"{where}: torch.load without weights_only=True")
                if name == "load" and _owner(node.func) in ("np", "numpy") and _is_true(
                        kwargs.get("allow_pickle")):
                    found.append(f"{where}: np.load(allow_pickle=True)")
    assert not found


def _owner(func: ast.Attribute) -> str:
    return func.value.id if isinstance(func.value, ast.Name) else ""


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_every_default_bind_is_local() -> None:
    config = LineConfig.model_validate({"cameras": [{"id": "c", "source": {"kind": "synth"}}]})
    assert all(e.startswith("tcp://127.0.0.1:") for e in config.transport.endpoints())
    assert config.plc.modbus.host == "127.0.0.1"
    with pytest.raises(ValueError, match="curve"):
        TransportConfig(frames_endpoint="tcp://0.0.0.0:5555")
    conf = (ROOT / "deploy" / "redis.conf").read_text()
    assert "\nbind 127.0.0.1" in conf and "\nappendonly yes" in conf


def test_shipped_redis_acl_lets_each_process_do_its_work_and_no_more(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    users = _apply_acl(redis_client, line_name)
    try:
        decide = _acl_client(redis_server, users["decide"], tmp_path)
        writer = StreamWriter(decide, line_name, RedisConfig(spool_dir=tmp_path / "spool"))
        assert writer.remember_pending(frame_header("cam0", 2))
        batch = sample_batch("cam0", 1)
        assert writer.write_verdict(batch.verdict, batch.defects, batch.reject, (b"png",))
        assert [h.seq for h in writer.load_pending()] == [2]
        assert writer.counters.spooled == 0 and writer.counters.redis_errors == 0

        plc = _acl_client(redis_server, users["plc"], tmp_path)
        consumer = PlcConsumer(plc, line_name, PlcConfig(consumer="gate"), LogDriver(),
                               block_ms=10)
        consumer.poll()
        assert consumer.stats.signalled == 1

        alarms = _acl_client(redis_server, users["alarms"], tmp_path)
        keys = StreamKeys(line_name)
        alarms.xgroup_create(keys.verdicts, "alarms", id="0")
        read: Any = alarms.xreadgroup("alarms", "a", {keys.verdicts: ">"})
        entry_id = read[0][1][0][0]
        with alarms.pipeline(transaction=True) as pipe:  # as AlarmsConsumer writes and acks
            pipe.xadd(keys.alarms, {"kind": "test"})
            pipe.xack(keys.verdicts, "alarms", entry_id)
            pipe.execute()

        with pytest.raises(redis.exceptions.NoPermissionError):
            plc.xadd(keys.rejects, {"forged": "1"})
        with pytest.raises(redis.exceptions.NoPermissionError):
            decide.get("linewatch:another-line:done:x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            alarms.xadd(keys.rejects, {"forged": "1"})
        for client in (decide, plc, alarms):
            client.close()
    finally:
        for user in users.values():
            redis_client.acl_deluser(user)


def _apply_acl(client: redis.Redis, line: str) -> dict[str, str]:
    """The users of deploy/linewatch.acl for ``line`` (named ``<user>-<line>``)."""
    users = {}
    for raw in (ROOT / "deploy" / "linewatch.acl").read_text().splitlines():
        words = raw.split("#", 1)[0].split()
        if len(words) < 3 or words[0] != "user" or words[1] == "default":
            continue  # the default user stays on: the test's own client needs it
        name = f"{words[1]}-{line}"
        rules = [">pw" if w.startswith(">") else w.replace(":line1:", f":{line}:")
                 for w in words[2:]]
        client.execute_command("ACL", "SETUSER", name, "reset", *rules)
        users[words[1]] = name
    assert {"decide", "plc", "alarms"} <= users.keys()
    return users


def _acl_client(server: EmbeddedRedis, user: str, tmp_path: Path) -> redis.Redis:
    cfg = RedisConfig(username=user, password="pw", spool_dir=tmp_path / "spool", retries=0)
    return redis_client(cfg, server.url)


def test_aof_cost_command_measures_every_setting(tmp_path: Path) -> None:
    from linewatch.faults.aof import aof_cost, aof_table

    costs = aof_cost(20, tmp_path)
    assert [c.appendfsync for c in costs] == ["always", "everysec", "no"]
    assert all(c.writes == 20 and c.writes_per_s > 0 for c in costs)
    assert aof_table(costs).count("\n") == 5


def test_faults_command_lists_and_refuses_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    from linewatch.cli import main

    assert main(["faults", "--list"]) == 0
    assert capsys.readouterr().out.split()[0] == "worker_killed"
    assert main(["faults", "--only", "nosuch"]) == 1
    assert "nosuch" in capsys.readouterr().err
