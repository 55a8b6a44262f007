"""``linewatch bench``: the figures' definitions on hand-made verdicts, the written time read
from a real Redis, and one smallest run of the whole benchmark (real model, real line).

No figure's size is asserted: only that every key is there and the values are coherent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from linewatch.bench.floor import measure_floor
from linewatch.bench.hop import measure_hop_ms
from linewatch.bench.model import ModelRow
from linewatch.bench.pipeline import (
    PipelinePlan,
    PipelineRun,
    WrittenVerdict,
    line_config_text,
    read_written,
    summarise_floor,
    summarise_run,
)
from linewatch.bench.report import BenchReport
from linewatch.cli import main
from linewatch.config import SynthSource, load_config
from linewatch.streams.records import StreamKeys, VerdictRecord
from linewatch.streams.server import EmbeddedRedis, free_port

MS = 1_000_000


def _verdict(seq: int, acquired_ms: float | None, infer: tuple[float, float, int] | None,
             decided_ms: float, *, fail_safe: bool = False) -> VerdictRecord:
    return VerdictRecord(
        frame_id=f"cam0:{seq}", camera="cam0", seq=seq, part_id=f"p{seq}",
        verdict="reject" if fail_safe else "pass",
        reason="missed_frame" if acquired_ms is None else ("timeout" if fail_safe else "ok"),
        fail_safe=fail_safe, score=None, model_id=None, threshold=None, threshold_version=None,
        rule="operating_point", n_defects=0,
        ts_acquired_ns=None if acquired_ms is None else int(acquired_ms * MS),
        ts_decided_ns=int(decided_ms * MS),
        latency_ms=None if acquired_ms is None else decided_ms - acquired_ms,
        ts_infer_start_ns=None if infer is None else int(infer[0] * MS),
        ts_infer_end_ns=None if infer is None else int(infer[1] * MS),
        batch_size=None if infer is None else infer[2],
    )


def _plan(**changes: object) -> PipelinePlan:
    values: dict[str, object] = {"fps": 10.0, "seconds": 1.0, "warmup_s": 0.1, "max_batch": 2,
                                 "model": Path("m.lwm")}
    return PipelinePlan.model_validate(values | changes)


def test_summary_splits_latency_into_batch_model_time_and_overhead() -> None:
    written = [
        # warm-up frame (acquired before 0 + 100 ms): not measured
        WrittenVerdict(verdict=_verdict(0, 0, (5, 45, 1), 50), written_ns=51 * MS),
        # a full batch of two (40 ms of model time each, as they waited for the batch)
        WrittenVerdict(verdict=_verdict(1, 100, (110, 150, 2), 155), written_ns=160 * MS),
        WrittenVerdict(verdict=_verdict(2, 105, (110, 150, 2), 155), written_ns=160 * MS),
        # a batch of one (20 ms)
        WrittenVerdict(verdict=_verdict(3, 200, (210, 230, 1), 232), written_ns=240 * MS),
        # a fail-safe reject without a result: latency counts, model time does not
        WrittenVerdict(verdict=_verdict(4, 300, None, 400, fail_safe=True),
                       written_ns=400 * MS),
        # a missed frame (never acquired)
        WrittenVerdict(verdict=_verdict(5, None, None, 450, fail_safe=True),
                       written_ns=450 * MS),
    ]
    run = summarise_run(written, _plan(), cameras=1, scorer="model")

    assert (run.verdicts, run.steady_frames, run.missed, run.fail_safe) == (6, 4, 1, 1)
    assert run.latency_ms is not None
    latencies = [60.0, 55.0, 40.0, 100.0]
    assert run.latency_ms.max == 100.0
    assert run.latency_ms.mean == pytest.approx(sum(latencies) / 4, abs=0.01)
    assert run.latency_ms.p50 == pytest.approx(57.5, abs=0.01)
    assert run.model_ms_mean == pytest.approx((40 + 40 + 20) / 3, abs=1e-3)
    overheads = [60 - 40, 55 - 40, 40 - 20]
    assert run.overhead_ms_mean == pytest.approx(sum(overheads) / 3, abs=1e-3)
    assert run.overhead_ratio == pytest.approx(sum(overheads) / (40 + 40 + 20), abs=1e-3)
    assert run.overhead_stages is not None
    stages = run.overhead_stages
    assert stages.to_model == pytest.approx((10 + 5 + 10) / 3, abs=1e-3)
    assert stages.to_decision == pytest.approx((5 + 5 + 2) / 3, abs=1e-3)
    assert stages.decide_write == pytest.approx((5 + 5 + 8) / 3, abs=1e-3)
    assert stages.to_model + stages.to_decision + stages.decide_write == pytest.approx(
        run.overhead_ms_mean, abs=1e-3)
    assert (run.full_batch_ms, run.full_batch_source) == (40.0, "full_batches")
    assert run.p99_over_batch_time == pytest.approx(run.latency_ms.p99 / 40.0, abs=1e-3)
    assert run.batch_size_mean == pytest.approx((2 + 2 + 1) / 3, abs=0.01)
    assert run.throughput_fps == pytest.approx(3 / 0.240, abs=0.01)  # 4 verdicts, 160..400 ms
    assert run.offered_fps == 10.0 and run.frames == 11  # ceil(10 fps x 1.1 s)


def test_floor_summary_defines_overhead_as_the_line_does() -> None:
    # camera, seq, acquired, model start, model end, decided, written (ns)
    rows = np.array([[0, 0, 0, 1 * MS, 11 * MS, 12 * MS, int(12.5 * MS)],
                     [1, 0, 0, 3 * MS, 13 * MS, int(13.5 * MS), 14 * MS]], np.int64)
    floor = summarise_floor(rows, cameras=2, model_ms=10.0)
    assert (floor.cameras, floor.steady_frames, floor.model_ms) == (2, 2, 10.0)
    assert floor.overhead_ms_mean == pytest.approx(3.25)  # (2.5 + 4.0) / 2
    assert floor.overhead_ratio == pytest.approx(0.325)
    stages = floor.overhead_stages
    assert (stages.to_model, stages.to_decision, stages.decide_write) == pytest.approx(
        (2.0, 0.75, 0.5))
    assert sum((stages.to_model, stages.to_decision, stages.decide_write)) == pytest.approx(
        floor.overhead_ms_mean)


def test_floor_leaves_no_key_behind_and_names_a_process_that_died(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    rows = measure_floor(2, workers=2, fps=20, phase="spread", model_ms=1.0, seconds=0.3,
                         warmup_s=0.1, redis_url=redis_server.url)
    assert rows.shape[1] == 7 and len(rows) > 0
    assert set(rows[:, 0]) <= {0, 1}
    assert np.all(np.diff(rows[:, 2:], axis=1) >= 0)  # acquired <= start <= end <= ... written
    assert redis_client.keys("linewatch:bench-floor:*") == []  # its stream is deleted
    nobody = f"redis://127.0.0.1:{free_port()}/0"  # no server: the decision process fails
    with pytest.raises(RuntimeError, match="floor-decision exited"):
        measure_floor(1, workers=1, fps=20, phase="aligned", model_ms=1.0, seconds=0.1,
                      warmup_s=0.1, redis_url=nobody)


def test_full_batch_time_is_extrapolated_when_no_batch_filled() -> None:
    written = [
        WrittenVerdict(verdict=_verdict(i, 100.0 * i, (100.0 * i + 1, 100.0 * i + 11, 1),
                                        100.0 * i + 12), written_ns=int((100 * i + 13) * MS))
        for i in range(3)
    ]
    run = summarise_run(written, _plan(warmup_s=0.0, max_batch=8), cameras=1, scorer="model")
    assert (run.full_batch_ms, run.full_batch_source) == (80.0, "extrapolated")


def test_written_time_is_the_microsecond_stamp_of_redis(
    redis_client: redis.Redis, line_name: str
) -> None:
    key = StreamKeys(line_name).verdicts
    fields = _verdict(0, 1000, (1001, 1002, 1), 1003).to_fields()
    redis_client.xadd(key, fields | {"ts_written_us": "1003250"}, id="1003-0")  # type: ignore[arg-type]
    (written,) = read_written(redis_client, line_name)
    assert written.written_ns == 1_003_250_000  # not the entry id's whole ms (1003)


def test_older_entries_take_the_entry_id_and_never_precede_the_decision(
    redis_client: redis.Redis, line_name: str
) -> None:
    key = StreamKeys(line_name).verdicts
    late_id = _verdict(0, 1000, (1001, 1002, 1), 1003).to_fields()
    early_id = _verdict(1, 2000, (2001, 2002, 1), 2005.5).to_fields()
    redis_client.xadd(key, late_id, id="1010-0")  # type: ignore[arg-type]
    redis_client.xadd(key, early_id, id="2005-0")  # type: ignore[arg-type]
    written = read_written(redis_client, line_name)
    assert [w.verdict.seq for w in written] == [0, 1]
    assert written[0].written_ns == 1010 * MS
    assert written[1].written_ns == int(2005.5 * MS)  # the id is whole ms; decided came later


TOP_KEYS = {"command", "machine", "seconds", "model", "pipeline"}
MACHINE_KEYS = {"date", "host", "cpu", "cores", "load_average", "python", "torch",
                "torch_threads", "device", "gpu", "linewatch"}
MODEL_KEYS = {"device", "torch_threads", "per_size_models", "models", "warmup", "repeats",
              "memory", "inference", "rows"}
ROW_KEYS = {"frame_size", "model_size", "tiles_per_frame", "batch", "ms_per_batch",
            "ms_per_image", "images_per_s", "backbone_ms_per_batch", "scorer_over_backbone",
            "stages_ms", "peak_memory_mb", "memory_before_mb"}
PIPELINE_KEYS = {"plan", "worker_threads", "log_dir", "hop_ms", "runs", "floor"}
FLOOR_KEYS = {"cameras", "model_ms", "steady_frames", "overhead_ms_mean", "overhead_ratio",
              "overhead_stages"}
RUN_KEYS = {"cameras", "scorer", "offered_fps", "frames", "verdicts", "steady_frames", "missed",
            "fail_safe", "throughput_fps", "latency_ms", "decided_latency_ms", "model_ms_mean",
            "batch_size_mean", "full_batch_ms", "full_batch_source", "overhead_ms_mean",
            "overhead_ratio", "overhead_stages", "p99_over_batch_time"}
LATENCY_KEYS = {"p50", "p99", "max", "mean"}


def _check_keys(raw: dict[str, Any]) -> None:
    assert set(raw) == TOP_KEYS
    assert set(raw["machine"]) == MACHINE_KEYS
    assert set(raw["model"]) == MODEL_KEYS
    assert all(set(row) == ROW_KEYS for row in raw["model"]["rows"])
    assert set(raw["pipeline"]) == PIPELINE_KEYS
    assert all(set(run) == RUN_KEYS for run in raw["pipeline"]["runs"])
    assert all(set(run["latency_ms"]) == LATENCY_KEYS for run in raw["pipeline"]["runs"])
    assert all(set(run) == FLOOR_KEYS for run in raw["pipeline"]["floor"])


def _check_row(row: ModelRow) -> None:
    assert row.tiles_per_frame == (9 if row.frame_size == 128 else 1)  # 128 in 64-tiles, 32 over
    assert row.ms_per_batch > 0 and row.backbone_ms_per_batch > 0
    assert row.ms_per_image == pytest.approx(row.ms_per_batch / row.batch, rel=1e-2)
    assert row.images_per_s == pytest.approx(1000 / row.ms_per_image, rel=1e-2)
    assert row.scorer_over_backbone > 0
    assert set(row.stages_ms) == {"preprocess", "backbone", "heads", "post"}
    assert row.memory_before_mb is not None  # Linux: /proc is there
    assert row.peak_memory_mb >= row.memory_before_mb > 10


def _check_run(run: PipelineRun) -> None:
    assert run.verdicts == run.frames == 15  # ceil(10 fps x 1.5 s)
    assert 0 < run.steady_frames <= 15
    assert run.latency_ms is not None
    assert 0 < run.latency_ms.p50 <= run.latency_ms.p99 <= run.latency_ms.max
    assert run.model_ms_mean is not None and run.model_ms_mean > 0
    assert run.full_batch_source in ("full_batches", "extrapolated")
    assert run.overhead_ratio is not None and run.p99_over_batch_time is not None


def test_smallest_bench_writes_every_figure(
    tmp_path: Path, tiny_line_model: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    code = main([
        "--log-level", "warning", "bench", "--device", "cpu", "--model", str(tiny_line_model[1]),
        "--cache", str(tmp_path / "cache"), "--sizes", "64", "--batches", "1", "2",
        "--tiled-frame", "128", "--repeats", "1", "--warmup", "0", "--cameras", "1",
        "--fps", "10", "--seconds", "1", "--warmup-seconds", "0.5", "--frame-size", "64",
        "--max-batch", "2", "--camera-phase", "aligned", "--json", str(out),
    ])
    assert code == 0
    raw = json.loads(out.read_text())
    _check_keys(raw)
    report = BenchReport.model_validate(raw)
    assert report.machine.cores >= 1 and report.model is not None
    assert report.pipeline is not None
    rows = report.model.rows
    assert [(r.frame_size, r.batch) for r in rows] == [(64, 1), (64, 2), (128, 1)]
    for row in rows:
        _check_row(row)
    runs = report.pipeline.runs
    assert [(r.cameras, r.scorer) for r in runs] == [(1, "model"), (1, "backbone_only")]
    for run in runs:
        _check_run(run)
    printed = capsys.readouterr().out
    assert printed.startswith(f"$ {report.command}\n")
    assert "Model:" in printed and "Pipeline:" in printed and "backbone_only" in printed
    assert report.pipeline.plan.max_batch == 2 and "max_batch 2," in printed
    assert report.pipeline.plan.camera_phase == "aligned" and "(phase aligned)" in printed
    assert "--camera-phase aligned" in report.command
    assert report.pipeline.hop_ms is not None and report.pipeline.hop_ms.p50 > 0
    (floor,) = report.pipeline.floor  # one camera count: one floor run, at its model time
    assert floor.cameras == 1 and floor.model_ms == runs[0].model_ms_mean
    assert floor.steady_frames > 0 and floor.overhead_ms_mean > 0
    assert "Floor:" in printed and "--floor" in report.command


def test_bad_flags_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--only", "model", "--sizes", "100"]) != 0
    assert "--sizes 100" in capsys.readouterr().err
    assert main(["bench", "--model", "missing.lwm"]) != 0
    assert "missing.lwm" in capsys.readouterr().err
    assert main(["bench", "--only", "pipeline", "--max-batch", "0"]) != 0
    assert "--max-batch must be positive, got 0" in capsys.readouterr().err


def test_hop_delays_are_one_per_message_and_positive() -> None:
    delays = measure_hop_ms(messages=5, interval_s=0.001, payload_bytes=1024)
    assert delays.shape == (5,)
    assert np.all(np.isfinite(delays)) and np.all(delays > 0)


@pytest.mark.parametrize(("phase", "expected_ms"), [
    ("free", [None, None, None, None]),
    ("aligned", [0.0, 0.0, 0.0, 0.0]),
    ("spread", [0.0, 25.0, 50.0, 75.0]),  # 10 fps: a 100 ms period shared by 4 cameras
])
def test_camera_phase_sets_each_synth_cameras_phase(
    tmp_path: Path, phase: str, expected_ms: list[float | None]
) -> None:
    plan = _plan(camera_phase=phase)
    config = tmp_path / "line.toml"
    config.write_text(line_config_text(plan, "bench-phase", 4, "model", tmp_path))
    sources = [c.source for c in load_config(config).cameras]
    assert all(isinstance(s, SynthSource) for s in sources)
    assert [s.phase_ms for s in sources if isinstance(s, SynthSource)] == expected_ms
