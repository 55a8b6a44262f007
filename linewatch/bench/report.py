"""The benchmark's report: the machine and settings, a readable table, and JSON.

The JSON is :class:`BenchReport` dumped as is; every figure is defined in the field
descriptions of :mod:`linewatch.bench.model` and :mod:`linewatch.bench.pipeline`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from linewatch import __version__
from linewatch.bench.model import ModelBench, ModelRow
from linewatch.bench.pipeline import LatencyStats, OverheadStages, PipelineBench, PipelineRun

__all__ = ["BenchReport", "MachineInfo", "format_report", "machine_info", "write_json"]


class MachineInfo(BaseModel):
    """Where and with what the benchmark ran."""

    model_config = ConfigDict(extra="forbid")

    date: str = Field(description="start, ISO 8601 UTC")
    host: str
    cpu: str
    cores: int = Field(description="logical cores the OS reports")
    load_average: tuple[float, float, float] = Field(
        description="1/5/15-minute load average at the start: other work on the machine"
    )
    python: str
    torch: str
    torch_threads: int = Field(description="intra-op threads of the benchmark process")
    device: str = Field(description="the device asked for, and what it resolved to")
    gpu: str | None
    linewatch: str


class BenchReport(BaseModel):
    """What ``linewatch bench --json`` writes."""

    model_config = ConfigDict(extra="forbid")

    command: str
    machine: MachineInfo
    seconds: float = Field(description="wall time of the whole benchmark")
    model: ModelBench | None
    pipeline: PipelineBench | None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> MachineInfo:
    """The machine and software as they are now; ``device`` as given (auto/cpu/cuda)."""
    resolved = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) \
        else "cpu"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return MachineInfo(
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        host=platform.node(),
        cpu=_cpu_name(),
        cores=os.cpu_count() or 1,
        load_average=(round(load[0], 2), round(load[1], 2), round(load[2], 2)),
        python=platform.python_version(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        device=f"{device} -> {resolved}",
        gpu=torch.cuda.get_device_name() if resolved == "cuda" else None,
        linewatch=__version__,
    )


def write_json(report: BenchReport, path: Path) -> None:
    """``--json OUT``."""
    path.write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n",
                    encoding="utf-8")


# --------------------------------------------------------------------------- table


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned columns, the first left-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _threads(n: int) -> str:
    return f"{n} torch thread" + ("" if n == 1 else "s")


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _model_lines(bench: ModelBench) -> list[str]:
    which = "a model trained per input size" if bench.per_size_models else \
        "one model; frames resized to its input size"
    memory = "peak RSS" if bench.memory == "rss_peak" else "max CUDA allocated"
    head = (f"Model: {bench.device}, {_threads(bench.torch_threads)}, median of "
            f"{bench.repeats} after {bench.warmup} warm-up; {which}; memory = {memory}")
    header = ["frame", "model", "tiles", "batch", "ms/batch", "ms/image", "images/s",
              "backbone ms", "scorer/backbone", "mem MB (before)"]
    rows = [_model_row(r) for r in bench.rows]
    return [head, *_table(header, rows)]


def _model_row(r: ModelRow) -> list[str]:
    return [f"{r.frame_size}x{r.frame_size}", str(r.model_size), str(r.tiles_per_frame),
            str(r.batch), _num(r.ms_per_batch), _num(r.ms_per_image), _num(r.images_per_s),
            _num(r.backbone_ms_per_batch), _num(r.scorer_over_backbone, 2),
            f"{_num(r.peak_memory_mb, 0)} ({_num(r.memory_before_mb, 0)})"]


def _pipeline_lines(bench: PipelineBench) -> list[str]:
    p = bench.plan
    head = (f"Pipeline: {p.frame_size}x{p.frame_size} synth frames at {p.fps:g} fps per camera "
            f"(phase {p.camera_phase}), "
            f"{p.workers} workers x {_threads(bench.worker_threads)}, max_batch {p.batch_limit}, "
            f"max_wait {p.max_wait_ms:g} ms; {p.seconds:g} s measured after {p.warmup_s:g} s "
            f"warm-up; latency = acquisition to verdict in Redis")
    header = ["cams", "scorer", "offered/s", "verdicts/s", "p50 ms", "p99 ms", "max ms",
              "model ms", "batch", "full batch ms", "overhead ms", "in/out/write ms",
              "overhead/model", "p99/batch", "fail-safe"]
    rows = [_pipeline_row(r) for r in bench.runs]
    hop = bench.hop_ms
    floor = ([] if hop is None else
             [f"ZeroMQ hop between two processes here (ipc, 64 KiB, every 20 ms): p50 "
              f"{hop.p50:.2f} ms, p99 {hop.p99:.2f} ms; a frame makes three (camera, "
              f"dispatcher, worker, decision)"])
    return [head, *floor, *_table(header, rows), *_floor_lines(bench)]


def _floor_lines(bench: PipelineBench) -> list[str]:
    if not bench.floor:
        return []
    head = (f"Floor: the same processes with no code in them (linewatch.bench.floor: cameras "
            f"{bench.plan.floor_phase}, a broker, {bench.plan.workers} workers holding a CPU for "
            f"the run's model time, decision writing to the same Redis); the overhead this "
            "machine allows")
    header = ["cams", "model ms", "overhead ms", "in/out/write ms", "overhead/model"]
    rows = [[str(f.cameras), _num(f.model_ms), _num(f.overhead_ms_mean),
             _stages(f.overhead_stages), _num(f.overhead_ratio, 2)] for f in bench.floor]
    return [head, *_table(header, rows)]


def _pipeline_row(r: PipelineRun) -> list[str]:
    lat = r.latency_ms or LatencyStats(p50=float("nan"), p99=float("nan"), max=float("nan"),
                                       mean=float("nan"))
    full = _num(r.full_batch_ms) + ("*" if r.full_batch_source == "extrapolated" else "")
    return [str(r.cameras), r.scorer, _num(r.offered_fps), _num(r.throughput_fps),
            _num(lat.p50), _num(lat.p99), _num(lat.max), _num(r.model_ms_mean),
            _num(r.batch_size_mean), full, _num(r.overhead_ms_mean), _stages(r.overhead_stages),
            _num(r.overhead_ratio, 2), _num(r.p99_over_batch_time, 2),
            f"{r.fail_safe}/{r.steady_frames}"]


def _stages(stages: OverheadStages | None) -> str:
    if stages is None:
        return "-"
    return "/".join(_num(v) for v in (stages.to_model, stages.to_decision, stages.decide_write))


def format_report(report: BenchReport) -> str:
    """The human-readable report: command, machine, then one table per part."""
    m = report.machine
    lines = [
        f"$ {report.command}",
        f"{m.date}  {m.host}  {m.cpu}, {m.cores} cores, load {m.load_average[0]:.2f} "
        f"{m.load_average[1]:.2f} {m.load_average[2]:.2f}",
        f"linewatch {m.linewatch}, torch {m.torch}, {_threads(m.torch_threads)}, "
        f"python {m.python}, device {m.device}" + (f" ({m.gpu})" if m.gpu else ""),
    ]
    if report.model is not None:
        lines += ["", *_model_lines(report.model)]
    if report.pipeline is not None:
        lines += ["", *_pipeline_lines(report.pipeline)]
        if any(r.full_batch_source == "extrapolated" for r in report.pipeline.runs):
            lines.append("* no full batch formed: per-frame model time x max_batch")
    lines += ["", f"finished in {report.seconds:.0f} s"]
    return "\n".join(lines) + "\n"
