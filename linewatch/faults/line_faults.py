"""Faults injected into a running line: processes killed, Redis away, a camera
unplugged, a slow worker, corrupt images, non-finite scores.

Every scenario runs a finite camera through a :class:`~linewatch.faults.harness.FaultLine`
(real processes, real Redis), injects its fault mid-stream, waits (bounded) for the
line to write every verdict, stops the line and checks
:func:`~linewatch.faults.invariant.tally`, plus what this fault in particular must
show (a restart, a spool drained, an alarm).
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from linewatch.data.images import read_image, write_image
from linewatch.faults.harness import CAMERA, FaultLine, LineSpec
from linewatch.faults.invariant import Tally, tally
from linewatch.faults.result import FaultResult, Setup
from linewatch.model.preprocess import ExposureJitter, jitter_exposure
from linewatch.streams.records import VerdictRecord
from linewatch.testing import silent_listener

STREAM_TIMEOUT_S = 60.0
"""How long a scenario waits for all its verdicts: a bound for a loaded machine."""

_SYNTH = {"kind": "synth", "size": 64, "defect_ratio": 0.1}


# --------------------------------------------------------------------------- helpers


def _spec(setup: Setup, name: str, **fields: Any) -> LineSpec:
    return LineSpec(line=f"{setup.line}-{name}", model=setup.model, **fields)


def _finish(fl: FaultLine, expected: int) -> tuple[Tally, list[VerdictRecord]]:
    """Wait for ``expected`` verdicts, stop the line (drained), and tally what was written."""
    fl.wait_verdicts(expected, STREAM_TIMEOUT_S)
    fl.stop_line()
    verdicts = fl.verdicts()
    return tally(fl.acquired_seqs(), verdicts, fl.rejects()), verdicts


def _problems(t: Tally, expected: int, checks: dict[str, bool]) -> list[str]:
    problems = t.breaches()
    if t.frames_in != expected:
        problems.append(f"acquisition numbered {t.frames_in} frames, not {expected}")
    problems += [what for what, ok in checks.items() if not ok]
    return problems


def _last_int(text: str, pattern: str) -> int | None:
    """The last integer a regex with one group matched in ``text``."""
    found = re.findall(pattern, text)
    return int(found[-1]) if found else None


def _scored_by_last_run(fl: FaultLine, process: str) -> int | None:
    """Frames the last run of an inference worker scored (its exit summary)."""
    return _last_int(fl.log_text(process), r"worker \d+: (\d+) scored")


# --------------------------------------------------------------------------- 1. worker killed


def worker_killed(setup: Setup) -> FaultResult:
    """``kill -9`` of an inference worker while it holds frames.

    Worker 0 is slowed (``workers.inject_delay_ms``) so that it holds a batch most of
    the time, and it is killed while it sleeps on one: the frames it held must be
    re-dispatched (or fail safe), the supervisor must restart it, and the new run
    must score frames again.
    """
    frames = 160  # the stream outlasts a slow restart, so the new run gets frames
    spec = _spec(setup, "worker", frames=frames, deadline_ms=8000.0,
                 source={**_SYNTH, "fps": 10.0},
                 workers={"inject_delay_ms": 500.0, "inject_delay_worker": 0})
    with FaultLine(spec, setup.folder("worker_killed")) as fl:
        fl.wait_verdicts(5, STREAM_TIMEOUT_S)
        old = fl.wait_serving("infer-0")
        asleep = fl.wait_sleeping("infer-0", timeout_s=10.0)  # in its delay, holding a batch
        killed_at = fl.kill("infer-0")
        back_at = fl.wait_restarted("infer-0", old)
        t, _ = _finish(fl, frames)
        dispatch = fl.log_text("dispatch")
        restarts = fl.restarts().get("infer-0", 0)
        scored_after = _scored_by_last_run(fl, "infer-0")
    held = _last_int(dispatch, r"worker_lost\b.*?\bin_flight=(\d+)") or 0
    redispatched = _last_int(dispatch, r"redispatched=(\d+)") or 0
    lost_workers = _last_int(dispatch, r"workers_lost=(\d+)") or 0
    problems = _problems(t, frames, {
        "the supervisor did not restart the worker": restarts >= 1,
        "the dispatcher never declared the killed worker lost": lost_workers >= 1,
        "the worker was killed holding a batch, but the dispatcher saw no frame at it":
            held >= 1 or not asleep,
        "the restarted worker scored nothing (throughput did not recover)":
            (scored_after or 0) > 0,
    })
    return FaultResult(
        name="worker_killed", fault="kill -9 of inference worker 0 holding frames",
        behaviour=(f"dispatcher lost it holding {held} frame(s), re-dispatched "
                   f"{redispatched}; restarted, scored {scored_after} after"),
        tally=t, recover_s=round(back_at - killed_at, 2), problems=problems,
        details={"held_at_kill": held, "redispatched": redispatched, "restarts": restarts,
                 "scored_after_restart": scored_after},
    )


# --------------------------------------------------------------------------- 2. decision killed


DECISION_STALL_S = 1.5


def decision_killed(setup: Setup) -> FaultResult:
    """The decision service stalls (SIGSTOP) mid-stream, then is killed (``kill -9``).

    While it is stopped, announcements and results pile up in its socket queues:
    everything it had received dies with it. Its successor must still write one
    verdict for every frame, in order: frames its predecessor noted in Redis, frames
    the dispatcher announces again, results still queued for it.
    """
    frames = 120
    spec = _spec(setup, "decide", frames=frames, deadline_ms=5000.0,
                 source={**_SYNTH, "fps": 10.0, "defect_ratio": 0.3})
    with FaultLine(spec, setup.folder("decision_killed")) as fl:
        fl.wait_verdicts(20, STREAM_TIMEOUT_S)
        old = fl.wait_serving("decide")
        fl.kill("decide", signal.SIGSTOP)
        time.sleep(DECISION_STALL_S)  # the stall: messages queue up for the stopped process
        killed_at = fl.kill("decide")
        back_at = fl.wait_restarted("decide", old)
        t, _ = _finish(fl, frames)
        decide = fl.log_text("decide")
        dispatch = fl.log_text("dispatch")
        restarts = fl.restarts().get("decide", 0)
    restored = _last_int(decide, r"pending_frames_restored\b.*?\bframes=(\d+)") or 0
    reannounced = _last_int(dispatch, r"decision_reconnected\b.*?\breannounced=(\d+)") or 0
    problems = _problems(t, frames, {
        "the supervisor did not restart the decision service": restarts >= 1,
    })
    return FaultResult(
        name="decision_killed",
        fault=f"decision service stopped {DECISION_STALL_S} s mid-stream, then kill -9",
        behaviour=(f"restarted; took over {restored} pending frame(s) from Redis, "
                   f"{reannounced} announced again; {t.fail_safe} fail-safe"),
        tally=t, recover_s=round(back_at - killed_at, 2), problems=problems,
        details={"restored_pending": restored, "reannounced": reannounced,
                 "restarts": restarts},
    )


# --------------------------------------------------------------------------- 3. redis outage

REDIS_OUTAGE_S = 10.0


@dataclass(frozen=True)
class _Outage:
    """How decision's spool fared while Redis was away."""

    spooled: bool
    drained: bool
    away_s: float
    recover_s: float | None  # Redis back to the spool drained; None if it never drained


def _take_redis_away(fl: FaultLine, seconds: float, silent: bool = False) -> _Outage:
    """Stop Redis for ``seconds`` (``silent``: a listener that never answers holds its port
    meanwhile), start it again, and wait (bounded) for decision's spool to drain."""
    spool = fl.config_path.parent / "spool" / fl.spec.line

    def spooling() -> bool:
        return any(spool.glob("segment-*.jsonl"))

    port = fl.redis.port
    fl.redis.stop()
    with silent_listener(port) if silent else contextlib.nullcontext():
        away_at = time.monotonic()
        spooled = fl.poll(spooling, seconds, "records spooled")
        time.sleep(max(0.0, away_at + seconds - time.monotonic()))  # the outage
    fl.redis.start()
    back_at = time.monotonic()
    drained = fl.poll(lambda: not spooling(), STREAM_TIMEOUT_S, "spool drained")
    recover_s = round(time.monotonic() - back_at, 2) if drained else None
    return _Outage(spooled, drained, round(back_at - away_at, 2), recover_s)


def redis_outage(setup: Setup) -> FaultResult:
    """Redis stops for 10 s mid-stream and comes back (AOF: nothing written is lost)."""
    frames = 200
    spec = _spec(setup, "redis", frames=frames, deadline_ms=5000.0,
                 source={**_SYNTH, "fps": 10.0, "defect_ratio": 0.3})
    with FaultLine(spec, setup.folder("redis_outage"), consumers=True) as fl:
        fl.wait_verdicts(20, STREAM_TIMEOUT_S)
        outage = _take_redis_away(fl, REDIS_OUTAGE_S)
        fl.wait_verdicts(frames, STREAM_TIMEOUT_S)
        gate = fl.poll(lambda: _group_caught_up(fl, "plc"), STREAM_TIMEOUT_S, "plc caught up")
        t, _ = _finish(fl, frames)
        signals = fl.log_text("plc").count("reject_signal")
        rejects = len(fl.rejects())
    problems = _problems(t, frames, {
        "nothing was spooled while Redis was away": outage.spooled,
        "the spool was not drained after Redis returned": outage.drained,
        "the plc consumer did not read and acknowledge every reject": gate,
        f"the gate was signalled {signals} times for {rejects} rejects": signals == rejects,
    })
    return FaultResult(
        name="redis_outage", fault=f"Redis stopped for {REDIS_OUTAGE_S:.0f} s mid-stream",
        behaviour=(f"decision spooled to disk, drained in order on return; "
                   f"plc signalled {signals}/{rejects} rejects"),
        tally=t, recover_s=outage.recover_s,
        problems=problems, details={"outage_s": outage.away_s,
                                    "gate_signals": signals, "rejects": rejects},
    )


REDIS_SILENT_S = 10.0


def redis_silent(setup: Setup) -> FaultResult:
    """Redis's port stops answering for 10 s (a listener that never replies: no refusal,
    each command waits for its timeout), then Redis is back.

    Decision must try the silent server once, spool, and leave the asking to its probe:
    one failed write, not one per retry interval, and no frame late for its deadline.
    """
    frames = 200
    timeout_s = 0.5
    spec = _spec(setup, "silent", frames=frames, deadline_ms=5000.0,
                 source={**_SYNTH, "fps": 10.0, "defect_ratio": 0.3},
                 redis={"socket_timeout_s": timeout_s, "retries": 1})
    with FaultLine(spec, setup.folder("redis_silent")) as fl:
        fl.wait_verdicts(20, STREAM_TIMEOUT_S)
        outage = _take_redis_away(fl, REDIS_SILENT_S, silent=True)
        t, verdicts = _finish(fl, frames)
        tries = _last_int(fl.log_text("decide"), r"writer_redis_errors=(\d+)")
    late = max((v.latency_ms or 0.0 for v in verdicts), default=0.0)
    # A frame decided after more than one command timeout waited for a try of Redis.
    stalled = sum((v.latency_ms or 0.0) > 1000.0 * timeout_s for v in verdicts)
    problems = _problems(t, frames, {
        "nothing was spooled while Redis was silent": outage.spooled,
        "the spool was not drained after Redis returned": outage.drained,
        f"decision tried the silent Redis {tries} times, not once": tries == 1,
        "a frame was rejected fail-safe while Redis was silent": t.fail_safe == 0,
    })
    return FaultResult(
        name="redis_silent",
        fault=f"Redis's port silent (no answer, no refusal) for {REDIS_SILENT_S:.0f} s",
        behaviour=(f"decision tried it {tries} time(s), then spooled while a probe PINGed; "
                   f"{stalled} frame(s) decided after > {timeout_s:g} s (slowest {late:.0f} ms); "
                   "drained in order on return"),
        tally=t, recover_s=outage.recover_s,
        problems=problems, details={"silent_s": outage.away_s,
                                    "redis_tries": tries, "stalled_decisions": stalled,
                                    "max_decided_latency_ms": late},
    )


def _group_caught_up(fl: FaultLine, group: str) -> bool:
    """True when consumer group ``group`` read every reject and acknowledged each."""
    import redis as redis_lib

    key = f"linewatch:{fl.spec.line}:rejects"
    try:
        groups = fl.client.xinfo_groups(key)
        last = fl.client.xrevrange(key, count=1)
    except redis_lib.RedisError:
        return False
    info = next((g for g in groups if _text(g["name"]) == group), None)
    if info is None:
        return False
    newest = _text(last[0][0]) if last else "0-0"
    return int(info["pending"]) == 0 and _text(info["last-delivered-id"]) == newest


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- 4. camera lost


def camera_lost(setup: Setup) -> FaultResult:
    """The camera goes away for 4 s and returns (synth source, fault-injection setting)."""
    frames = 80
    spec = _spec(setup, "camera", frames=frames, deadline_ms=5000.0,
                 source={**_SYNTH, "fps": 10.0, "inject_loss_after": 30, "inject_loss_s": 4.0})
    with FaultLine(spec, setup.folder("camera_lost")) as fl:
        t, _ = _finish(fl, frames)
        alarms = [a for a in fl.alarms() if a.camera == CAMERA]
        acquire = fl.log_text(f"acquire-{CAMERA}")
    kinds = [a.kind for a in alarms]
    lost = next((a for a in alarms if a.kind == "camera_lost"), None)
    back = next((a for a in alarms if a.kind == "camera_reconnected"), None)
    reconnects = _last_int(acquire, r"acquire_stopped\b.*?\breconnects=(\d+)") or 0
    problems = _problems(t, frames, {
        "acquisition did not report the camera lost": "camera_lost" in acquire,
        "acquisition did not reconnect": reconnects >= 1,
        "no camera_lost alarm was written": lost is not None,
        "no camera_reconnected alarm after the camera_lost one":
            lost is not None and back is not None and back.ts_ns > lost.ts_ns,
    })
    recover = (back.ts_ns - lost.ts_ns) / 1e9 if lost is not None and back is not None else None
    return FaultResult(
        name="camera_lost", fault="camera unplugged for 4 s after 30 frames (synth injection)",
        behaviour=f"acquisition reconnected {reconnects}x; alarms: {', '.join(kinds) or 'none'}",
        tally=t, recover_s=None if recover is None else round(recover, 2), problems=problems,
        details={"alarms": kinds, "reconnects": reconnects},
    )


# --------------------------------------------------------------------------- 5. slow worker


def slow_worker(setup: Setup) -> FaultResult:
    """Worker 0 takes longer than the deadline for every batch; worker 1 is healthy."""
    frames = 80
    deadline_ms = 1000.0
    spec = _spec(setup, "slow", frames=frames, deadline_ms=deadline_ms,
                 source={**_SYNTH, "fps": 10.0},
                 workers={"inject_delay_ms": 1500.0, "inject_delay_worker": 0})
    with FaultLine(spec, setup.folder("slow_worker")) as fl:
        t, verdicts = _finish(fl, frames)
        scored = [_scored_by_last_run(fl, f"infer-{i}") or 0 for i in (0, 1)]
    late_unsafe = [v.seq for v in verdicts
                   if not v.fail_safe and (v.latency_ms or 0.0) > deadline_ms]
    problems = _problems(t, frames, {
        f"verdicts past the deadline without fail-safe: {late_unsafe[:5]}": not late_unsafe,
        f"the healthy worker did not take the load (scored {scored[1]} vs {scored[0]})":
            scored[1] > scored[0],
    })
    return FaultResult(
        name="slow_worker", fault="worker 0 sleeps 1.5 s per batch, deadline 1 s",
        behaviour=(f"worker 1 scored {scored[1]}, worker 0 {scored[0]}; "
                   f"{t.fail_safe} frame(s) failed safe"),
        tally=t, recover_s=None, problems=problems,
        details={"scored": scored, "fail_safe": t.fail_safe},
    )


# --------------------------------------------------------------------------- 6. bad input


def corrupt_images(setup: Setup) -> FaultResult:
    """A folder replay with truncated, garbage and empty image files among good ones."""
    work = setup.folder("corrupt_images")
    folder = work / "images"
    bad = write_corrupt_folder(setup.data, folder, good=12)
    frames = len(list(folder.iterdir()))
    spec = _spec(setup, "images", frames=frames, deadline_ms=5000.0,
                 source={"kind": "folder", "path": str(folder), "fps": 20.0})
    with FaultLine(spec, work) as fl:
        t, verdicts = _finish(fl, frames)
    missed = {v.part_id or str(v.seq) for v in verdicts if v.reason == "missed_frame"}
    problems = _problems(t, frames, {
        f"{len(missed)} missed-frame verdicts for {len(bad)} unreadable files":
            len(missed) == len(bad),
    })
    return FaultResult(
        name="corrupt_images", fault=f"{len(bad)} corrupt/truncated/empty files in a replay",
        behaviour=f"each unreadable file became a fail-safe missed_frame verdict ({len(missed)})",
        tally=t, recover_s=None, problems=problems, details={"bad_files": bad},
    )


def overexposed_camera(setup: Setup) -> FaultResult:
    """The lamp of a folder replay is turned up for its middle third, then down again."""
    return _exposure_change(setup, "overexposed_camera", "overexposed", gain=1.6,
                            fault="at 1.6x gain, clipped at white")


def underexposed_camera(setup: Setup) -> FaultResult:
    """The lamp of a folder replay dims to a fifth for its middle third, then comes back."""
    return _exposure_change(setup, "underexposed_camera", "underexposed", gain=0.2,
                            fault="at 0.2x gain (a failing lamp)")


def _exposure_change(
    setup: Setup, name: str, alarm: Literal["overexposed", "underexposed"], gain: float,
    fault: str,
) -> FaultResult:
    work = setup.folder(name)
    folder = work / "images"
    frames = write_exposure_folder(setup.data, folder, each=8, gain=gain)
    watch = {"overexposure" if alarm == "overexposed" else "underexposure": {"frames": 3}}
    spec = _spec(setup, name.split("_")[0], frames=frames, deadline_ms=5000.0,
                 source={"kind": "folder", "path": str(folder), "fps": 20.0}, **watch)
    with FaultLine(spec, work) as fl:
        t, _ = _finish(fl, frames)
        kinds = [a.kind for a in fl.alarms() if a.camera == CAMERA]
    problems = _problems(t, frames, {
        f"alarms {kinds}, not {alarm} then exposure_ok": kinds == [alarm, "exposure_ok"],
    })
    return FaultResult(
        name=name,
        fault=f"{frames // 3} of {frames} frames {fault}",
        behaviour=f"alarms: {', '.join(kinds) or 'none'}; every frame still got its verdict",
        tally=t, recover_s=None, problems=problems, details={"alarms": kinds},
    )


def write_exposure_folder(data: Path, folder: Path, each: int, gain: float) -> int:
    """``each`` images of a data set's test/good split (repeated if it holds fewer), the
    same at ``gain`` clipped at the sensor's range, then the same as they are; returns the
    file count."""
    paths = sorted((data / "test" / "good").glob("*.png"))
    images = [read_image(paths[i % len(paths)]) for i in range(each)]
    lamp = ExposureJitter(gain=(gain, gain), offset=(0.0, 0.0))
    changed = jitter_exposure(images, np.random.default_rng(0), lamp)
    for i, (image, other) in enumerate(zip(images, changed, strict=True)):
        write_image(folder / f"{i:02d}_normal.png", image)
        write_image(folder / f"{each + i:02d}_lamp.png", other)
        write_image(folder / f"{2 * each + i:02d}_normal_again.png", image)
    return 3 * each


def write_corrupt_folder(data: Path, folder: Path, good: int) -> list[str]:
    """``good`` images of a data set's test split, then a truncated, a garbage and an empty
    file, interleaved; returns the names of the bad ones."""
    images = sorted((data / "test" / "good").glob("*.png"))[:good]
    folder.mkdir(parents=True)
    blob = images[0].read_bytes()
    bad = {
        "03_truncated.png": blob[: len(blob) // 2],
        "06_garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "09_empty.png": b"",
    }
    for i, image in enumerate(images):
        (folder / f"{i:02d}_good.png").write_bytes(image.read_bytes())
    for name, content in bad.items():
        (folder / name).write_bytes(content)
    return sorted(bad)


def nonfinite_scores(setup: Setup) -> FaultResult:
    """Every 4th frame scores NaN with an inf map (``workers.inject_nonfinite_every``)."""
    frames, every = 40, 4
    spec = _spec(setup, "nan", frames=frames, deadline_ms=5000.0,
                 source={**_SYNTH, "fps": 20.0}, workers={"inject_nonfinite_every": every})
    with FaultLine(spec, setup.folder("nonfinite_scores")) as fl:
        t, verdicts = _finish(fl, frames)
    poisoned = [v for v in verdicts if v.seq % every == 0]
    wrong = [v.seq for v in poisoned if not (v.fail_safe and v.reason == "bad_result")]
    healthy_failed = [v.seq for v in verdicts if v.seq % every and v.fail_safe]
    problems = _problems(t, frames, {
        f"NaN results not rejected as bad_result: {wrong[:5]}": not wrong,
        f"healthy frames failed safe: {healthy_failed[:5]}": not healthy_failed,
    })
    return FaultResult(
        name="nonfinite_scores", fault=f"NaN score / inf map for every {every}th frame",
        behaviour=f"{len(poisoned)} fail-safe bad_result rejects, the others scored",
        tally=t, recover_s=None, problems=problems,
    )
