"""Pipeline benchmark: the real line (synth cameras -> ZeroMQ -> workers -> decision ->
Redis) at a set frame rate, with the model and with the bare backbone in its place.

Definitions (per frame, over the steady part of a run):

- **written time**: when the frame's verdict entry was added to the verdicts stream: the
  entry's ``ts_written_us`` (the Redis server's clock in microseconds, stamped by the
  writer's script). Entries without it (older writers) fall back to the entry id's
  millisecond, never taken as earlier than ``ts_decided_ns``; that floor made the written
  time up to 1 ms early. A reject record is written by the same Lua script as its verdict,
  so for rejected parts this is also when the reject gate can see it.
- **latency** = written time - ``ts_acquired_ns`` (the camera's read, before any copy).
- **model time** = ``ts_infer_end_ns - ts_infer_start_ns`` of the batch the frame was
  scored in: a frame waits for its whole batch, so the whole batch's time is its model time.
- **overhead** = latency - model time: acquisition to dispatch, the wire, waiting for a
  batch and for a free worker, decision (smoothing, regions, heatmaps), the per-camera
  reorder stage, and the Redis write.
- ``overhead_ratio`` = mean(overhead) / mean(model time), over frames that were scored.
- **overhead stages** (means, ms), which add up to the overhead: ``to_model`` = infer start -
  acquired (acquisition to dispatcher to worker over ZeroMQ, waiting for a batch and for a
  free worker); ``to_decision`` = decided - infer end (the result's way to the decision
  service and its wait there); ``decide_write`` = written time - decided (smoothing,
  regions, heatmaps, the per-camera reorder stage and the Redis write).
- **full-batch time**: the median model time of batches of ``max_batch`` frames seen in
  the run; when none filled up (light load), median(model time / batch size) x max_batch,
  and ``full_batch_source`` says ``extrapolated``.
- ``p99_over_batch_time`` = p99 latency / full-batch time.
- **steady part**: frames acquired ``warmup_s`` or later after the run's first frame;
  the first frames pay for first calls into the model and into Redis.
- **throughput**: steady verdicts per second of written time, (n - 1) / (last - first).

The same run with ``workers.scorer = "backbone_only"`` (pre-processing and backbone only,
every part passes) shows what the line costs around a model of nearly no head cost.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, cast

import numpy as np
import redis
from pydantic import BaseModel, ConfigDict, Field

from linewatch.bench.floor import FloorPhase, measure_floor
from linewatch.bench.hop import measure_hop_ms
from linewatch.config import WorkersConfig, load_config
from linewatch.errors import LinewatchError
from linewatch.log import get_logger
from linewatch.runtime.line import LineRunner, preflight
from linewatch.streams.records import StreamKeys, VerdictRecord
from linewatch.testing import redis_server, running_line, wait_until

__all__ = [
    "CameraPhase",
    "LatencyStats",
    "OverheadStages",
    "PipelineBench",
    "PipelinePlan",
    "PipelineRun",
    "ScorerKind",
    "WrittenVerdict",
    "line_config_text",
    "run_pipeline_bench",
    "summarise_run",
]

log = get_logger("bench")

ScorerKind = Literal["model", "backbone_only"]
CameraPhase = Literal["free", "aligned", "spread"]
_STARTUP_BOUND_S = 180.0  # a bound on starting the line on a slow machine, not a claim


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PipelinePlan(_Frozen):
    """What the pipeline benchmark runs."""

    cameras: tuple[int, ...] = Field((1, 2, 4), description="camera counts, one run each")
    scorers: tuple[ScorerKind, ...] = ("model", "backbone_only")
    fps: float = Field(10.0, gt=0, description="frames per second per camera")
    camera_phase: CameraPhase = Field(
        "aligned", description="free: each camera paced from its own start (phases by chance); "
        "aligned: every camera reads at the same instants (one trigger); spread: camera i "
        "i/(cameras x fps) after camera 0"
    )
    seconds: float = Field(6.0, gt=0, description="steady part of each run")
    warmup_s: float = Field(2.0, ge=0, description="first part of each run, not measured")
    frame_size: int = Field(256, ge=32, description="side of the square synth frames")
    workers: int = Field(2, ge=1)
    max_batch: int | None = Field(None, ge=1, description="default: the line's (workers.max_batch)")
    max_wait_ms: float = Field(0.0, ge=0)
    deadline_ms: float = Field(
        5000.0, gt=0, description="verdict deadline; a frame past it is a fail-safe reject"
    )
    device: str = "auto"
    model: Path
    floor: bool = Field(
        True, description="per camera count, also run the line's processes with no code in "
        "them (linewatch.bench.floor), workers holding a CPU for the model run's mean model "
        "time: the overhead this machine allows (not run for camera_phase free)"
    )

    @property
    def batch_limit(self) -> int:
        """Frames per batch at most, as the line's workers resolve it on this machine."""
        from linewatch.inference.worker import resolved_batch_limit

        return resolved_batch_limit(WorkersConfig.model_validate(
            {"max_batch": self.max_batch, "device": self.device}))

    @property
    def floor_phase(self) -> FloorPhase:
        """The floor's camera phase: the run's, with ``free`` (never floored) as aligned."""
        return "spread" if self.camera_phase == "spread" else "aligned"

    @property
    def frames_per_camera(self) -> int:
        """Frames each camera sends in one run (warm-up and steady part)."""
        return math.ceil(self.fps * (self.warmup_s + self.seconds))


class LatencyStats(_Frozen):
    """Milliseconds."""

    p50: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, values_ms: np.ndarray) -> LatencyStats | None:
        """Stats of ``values_ms``; None when empty."""
        if values_ms.size == 0:
            return None
        p50, p99 = np.percentile(values_ms, [50, 99])
        return cls(p50=round(float(p50), 2), p99=round(float(p99), 2),
                   max=round(float(values_ms.max()), 2), mean=round(float(values_ms.mean()), 2))


class OverheadStages(_Frozen):
    """Where the overhead goes: means in ms over the scored steady frames."""

    to_model: float = Field(description="acquired to infer start: wire, dispatch, batching")
    to_decision: float = Field(description="infer end to decided: result wire, decision queue")
    decide_write: float = Field(description="decided to written: post-processing, order, Redis")


class PipelineRun(_Frozen):
    """One run of the line: ``cameras`` cameras, scored by ``scorer``."""

    cameras: int
    scorer: ScorerKind
    offered_fps: float = Field(description="cameras x fps")
    frames: int = Field(description="frames the cameras were asked to send")
    verdicts: int = Field(description="verdicts written (one per frame, missed ones included)")
    steady_frames: int = Field(description="acquired frames in the steady part")
    missed: int = Field(description="missed_frame verdicts (never acquired)")
    fail_safe: int = Field(description="fail-safe rejects among the steady frames")
    throughput_fps: float | None = Field(description="steady verdicts per second written")
    latency_ms: LatencyStats | None = Field(description="acquisition to verdict in Redis")
    decided_latency_ms: LatencyStats | None = Field(
        description="acquisition to decision (the record's latency_ms), for comparison"
    )
    model_ms_mean: float | None = Field(description="mean model time per frame (its batch's)")
    batch_size_mean: float | None = Field(description="mean batch size seen by the frames")
    full_batch_ms: float | None = Field(description="one full batch's model time")
    full_batch_source: Literal["full_batches", "extrapolated"] | None
    overhead_ms_mean: float | None = Field(description="mean of latency - model time")
    overhead_ratio: float | None = Field(description="mean overhead / mean model time")
    overhead_stages: OverheadStages | None = Field(description="the overhead by stage")
    p99_over_batch_time: float | None = Field(description="p99 latency / full-batch time")


class FloorRun(_Frozen):
    """The line's processes with no code in them (:mod:`linewatch.bench.floor`), one run."""

    cameras: int
    model_ms: float = Field(description="CPU time each worker held per frame")
    steady_frames: int
    overhead_ms_mean: float = Field(description="mean of latency - model time")
    overhead_ratio: float = Field(description="mean overhead / mean model time")
    overhead_stages: OverheadStages


class PipelineBench(_Frozen):
    """Everything the pipeline benchmark measured."""

    plan: PipelinePlan
    worker_threads: int = Field(description="torch threads per worker (workers.threads auto)")
    log_dir: str = Field(description="where each run's process logs are")
    hop_ms: LatencyStats | None = Field(
        description="one ZeroMQ message between two processes on this machine (ipc, 64 KiB, "
        "every 20 ms): the floor under each of a frame's three process hops"
    )
    runs: list[PipelineRun]
    floor: list[FloorRun] = Field(
        default_factory=list, description="the floor per camera count, as plan.floor asks"
    )


# --------------------------------------------------------------------------- analysis


class WrittenVerdict(_Frozen):
    """A verdict and when Redis added it to the stream (ns since epoch)."""

    verdict: VerdictRecord
    written_ns: int


def entry_time_ns(entry_id: bytes | str) -> int:
    """The ms part of a stream entry id (``<ms>-<seq>``), in ns."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0]) * 1_000_000


def read_written(client: redis.Redis, line: str) -> list[WrittenVerdict]:
    """Every verdict of ``line`` with its written time."""
    entries = cast(
        list[tuple[bytes, dict[bytes, bytes]]], client.xrange(StreamKeys(line).verdicts)
    )
    out = []
    for entry_id, fields in entries:
        verdict = VerdictRecord.from_fields(fields)
        if verdict.ts_written_us is not None:
            written = verdict.ts_written_us * 1000
        else:  # an older writer's entry: the ms id is floored
            written = max(entry_time_ns(entry_id), verdict.ts_decided_ns)
        out.append(WrittenVerdict(verdict=verdict, written_ns=written))
    return out


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def _full_batch_ms(
    batches: dict[tuple[int, int, int], None], max_batch: int
) -> tuple[float | None, Literal["full_batches", "extrapolated"] | None]:
    durations = [(end - start) / 1e6 for start, end, _ in batches]
    full = [d for d, (_, _, size) in zip(durations, batches, strict=True) if size >= max_batch]
    if full:
        return float(np.median(full)), "full_batches"
    if durations:
        per_frame = [d / size for d, (_, _, size) in zip(durations, batches, strict=True)]
        return float(np.median(per_frame)) * max_batch, "extrapolated"
    return None, None


def summarise_run(
    written: Sequence[WrittenVerdict], plan: PipelinePlan, cameras: int, scorer: ScorerKind
) -> PipelineRun:
    """The figures of one run from its verdicts (see the module docstring)."""
    acquired = [w for w in written if w.verdict.ts_acquired_ns is not None]
    start = min((cast(int, w.verdict.ts_acquired_ns) for w in acquired), default=0)
    cutoff = start + int(plan.warmup_s * 1e9)
    steady = [w for w in acquired if cast(int, w.verdict.ts_acquired_ns) >= cutoff]
    latency = np.array([(w.written_ns - cast(int, w.verdict.ts_acquired_ns)) / 1e6
                        for w in steady])
    decided = np.array([w.verdict.latency_ms for w in steady if w.verdict.latency_ms is not None])
    scored = [w for w in steady
              if w.verdict.ts_infer_start_ns is not None and w.verdict.ts_infer_end_ns is not None]
    model = np.array([(cast(int, w.verdict.ts_infer_end_ns)
                       - cast(int, w.verdict.ts_infer_start_ns)) / 1e6 for w in scored])
    scored_latency = np.array([(w.written_ns - cast(int, w.verdict.ts_acquired_ns)) / 1e6
                               for w in scored])
    # dict keys keep one entry per batch (its frames share start, end and size), in order
    batches = {(cast(int, w.verdict.ts_infer_start_ns), cast(int, w.verdict.ts_infer_end_ns),
                w.verdict.batch_size or 1): None for w in scored}
    full_ms, full_source = _full_batch_ms(batches, plan.batch_limit)
    overhead = scored_latency - model
    stages = _overhead_stages(scored)
    stats = LatencyStats.of(latency)
    span_s = (max(w.written_ns for w in steady) - min(w.written_ns for w in steady)) / 1e9 \
        if len(steady) > 1 else 0.0
    return PipelineRun(
        cameras=cameras,
        scorer=scorer,
        offered_fps=cameras * plan.fps,
        frames=cameras * plan.frames_per_camera,
        verdicts=len(written),
        steady_frames=len(steady),
        missed=sum(w.verdict.reason == "missed_frame" for w in written),
        fail_safe=sum(w.verdict.fail_safe for w in steady),
        throughput_fps=_round((len(steady) - 1) / span_s, 2) if span_s > 0 else None,
        latency_ms=stats,
        decided_latency_ms=LatencyStats.of(decided),
        model_ms_mean=_round(float(model.mean())) if model.size else None,
        batch_size_mean=_round(float(np.mean([w.verdict.batch_size or 1 for w in scored])), 2)
        if scored else None,
        full_batch_ms=_round(full_ms),
        full_batch_source=full_source,
        overhead_ms_mean=_round(float(overhead.mean())) if overhead.size else None,
        overhead_ratio=_round(float(overhead.mean() / model.mean()))
        if model.size and model.mean() > 0 else None,
        overhead_stages=stages,
        p99_over_batch_time=_round(stats.p99 / full_ms) if stats and full_ms else None,
    )


def _overhead_stages(scored: Sequence[WrittenVerdict]) -> OverheadStages | None:
    if not scored:
        return None
    ns = np.array([(cast(int, w.verdict.ts_acquired_ns), cast(int, w.verdict.ts_infer_start_ns),
                    cast(int, w.verdict.ts_infer_end_ns), w.verdict.ts_decided_ns, w.written_ns)
                   for w in scored], dtype=np.int64)
    return stages_of(ns)


def stages_of(ns: np.ndarray) -> OverheadStages:
    """Mean stages of frames given as rows of (acquired, model start, model end, decided,
    written) ns: the one definition the line's runs and the floor's share."""
    acquired, start, end, decided, written = (ns[:, i].astype(np.float64) / 1e6
                                              for i in range(5))
    return OverheadStages(to_model=round(float((start - acquired).mean()), 3),
                          to_decision=round(float((decided - end).mean()), 3),
                          decide_write=round(float((written - decided).mean()), 3))


def summarise_floor(rows: np.ndarray, cameras: int, model_ms: float) -> FloorRun:
    """The figures of a floor run from :func:`~linewatch.bench.floor.measure_floor`'s rows,
    defined as :func:`summarise_run` defines the line's."""
    ns = rows[:, 2:7]
    model = (ns[:, 2] - ns[:, 1]) / 1e6
    overhead = (ns[:, 4] - ns[:, 0]) / 1e6 - model
    return FloorRun(
        cameras=cameras, model_ms=round(model_ms, 3), steady_frames=len(rows),
        overhead_ms_mean=round(float(overhead.mean()), 3),
        overhead_ratio=round(float(overhead.mean() / model.mean()), 3),
        overhead_stages=stages_of(ns),
    )


# --------------------------------------------------------------------------- running


def line_config_text(plan: PipelinePlan, line: str, cameras: int, scorer: ScorerKind,
                     run_dir: Path) -> str:
    """The benchmark line: ``cameras`` synth cameras, ipc sockets in ``run_dir``."""
    camera_blocks = "".join(
        f"""
[[cameras]]
id = "cam{i}"
deadline_ms = {plan.deadline_ms}
frames = {plan.frames_per_camera}
[cameras.source]
kind = "synth"
fps = {plan.fps}
size = {plan.frame_size}
seed = {i}
{_phase_line(plan, i, cameras)}"""
        for i in range(cameras)
    )
    return f"""line = "{line}"
{camera_blocks}
[transport]
frames_endpoint = "ipc://{run_dir}/frames"
workers_endpoint = "ipc://{run_dir}/workers"
results_endpoint = "ipc://{run_dir}/results"

[workers]
count = {plan.workers}
max_batch = {plan.batch_limit}
max_wait_ms = {plan.max_wait_ms}
device = "{plan.device}"
scorer = "{scorer}"

[model]
path = "{plan.model}"

[redis]
spool_dir = "{run_dir}/spool"

[decision]
heatmaps = "redis"
"""


def _phase_line(plan: PipelinePlan, camera: int, cameras: int) -> str:
    """``phase_ms = ...`` of camera ``camera`` for ``plan.camera_phase`` (empty when free)."""
    if plan.camera_phase == "free":
        return ""
    share = 0.0 if plan.camera_phase == "aligned" else camera / cameras
    return f"phase_ms = {share * 1000.0 / plan.fps}\n"


def _run_line(plan: PipelinePlan, redis_url: str, cameras: int, scorer: ScorerKind,
              log_dir: Path) -> PipelineRun:
    line = f"bench-{cameras}cam-{scorer.replace('_', '-')}-{os.getpid()}"
    expected = cameras * plan.frames_per_camera
    # ipc paths must stay short (about 100 bytes), so the sockets live in /tmp
    with (redis.Redis.from_url(redis_url) as client,
          tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp):
        client.delete(StreamKeys(line).verdicts)
        config = Path(tmp) / "line.toml"
        config.write_text(line_config_text(plan, line, cameras, scorer, Path(tmp)),
                          encoding="utf-8")
        preflight(load_config(config))  # a bad model file: one line now, not a timeout later
        log.info("bench_line_starting", line=line, cameras=cameras, scorer=scorer,
                 frames=expected)
        with running_line(config, redis_url, log_dir) as runner:
            _wait_for_verdicts(client, line, expected, runner, plan, log_dir)
        written = read_written(client, line)
    run = summarise_run(written, plan, cameras, scorer)
    log.info("bench_line_done", line=line, p99_ms=run.latency_ms.p99 if run.latency_ms else None,
             throughput=run.throughput_fps, overhead_ratio=run.overhead_ratio)
    return run


def _wait_for_verdicts(client: redis.Redis, line: str, expected: int, runner: LineRunner,
                       plan: PipelinePlan, log_dir: Path) -> None:
    """Until ``expected`` verdicts are written; a stopped or stuck line is a one-line error."""
    key = StreamKeys(line).verdicts
    bound = _STARTUP_BOUND_S + plan.warmup_s + plan.seconds + plan.deadline_ms / 1000.0
    try:
        wait_until(lambda: _line_stopped(runner) or cast(int, client.xlen(key)) >= expected,
                   timeout_s=bound, interval_s=0.25, what=f"{expected} verdicts of {line}")
    except TimeoutError:
        raise LinewatchError(
            f"bench line {line}: {client.xlen(key)} of {expected} verdicts after {bound:.0f} s; "
            f"see the process logs in {log_dir}"
        ) from None
    stopped = _line_stopped(runner)
    if stopped:
        raise LinewatchError(f"bench line {line} stopped: {stopped}; logs in {log_dir}")


def _line_stopped(runner: LineRunner) -> str | None:
    """Why the line's supervisor gave up (a process refused its configuration), if it did."""
    return runner.supervisor.failed if runner.supervisor is not None else None


def run_pipeline_bench(plan: PipelinePlan, log_dir: Path,
                       redis_url: str | None = None) -> PipelineBench:
    """Run the line once per camera count and scorer; against ``redis_url`` or an
    embedded Redis started for the benchmark. Process logs go to ``log_dir/<run>/``."""
    runs: list[PipelineRun] = []
    floor: list[FloorRun] = []
    hop = LatencyStats.of(measure_hop_ms())
    with _redis(redis_url) as url:
        for cameras in plan.cameras:
            these = [_run_line(plan, url, cameras, scorer, log_dir / f"{cameras}cam-{scorer}")
                     for scorer in plan.scorers]
            runs += these
            model_ms = these[0].model_ms_mean if these else None  # the first scorer's
            if plan.floor and plan.camera_phase != "free" and model_ms:
                floor.append(_run_floor(plan, url, cameras, model_ms))
    threads = max(1, (os.cpu_count() or 1) // plan.workers)
    return PipelineBench(plan=plan, worker_threads=threads, log_dir=str(log_dir), hop_ms=hop,
                         runs=runs, floor=floor)


def _run_floor(plan: PipelinePlan, redis_url: str, cameras: int, model_ms: float) -> FloorRun:
    log.info("floor_run_started", cameras=cameras, model_ms=model_ms, phase=plan.floor_phase)
    rows = measure_floor(cameras, workers=plan.workers, fps=plan.fps, phase=plan.floor_phase,
                         model_ms=model_ms, seconds=plan.seconds, warmup_s=plan.warmup_s,
                         redis_url=redis_url)
    return summarise_floor(rows, cameras, model_ms)


def _redis(url: str | None) -> contextlib.AbstractContextManager[str]:
    if url is not None:
        return contextlib.nullcontext(url)
    return _embedded_url()


@contextlib.contextmanager
def _embedded_url() -> Iterator[str]:
    with redis_server() as server:
        yield server.url
