"""``linewatch bench``: how fast the model is, and what the line adds around it.

Two parts, each usable alone:

- :func:`linewatch.bench.model.run_model_bench` times the scorer per input size and batch
  beside its bare backbone (images/s, ms per image, ``scorer_over_backbone``, memory);
- :func:`linewatch.bench.pipeline.run_pipeline_bench` runs the real line with synthetic
  cameras and splits each frame's latency into model time and the pipeline's overhead.

:func:`run_bench` runs both and returns a :class:`~linewatch.bench.report.BenchReport`;
``bench/README.md`` explains every figure.
"""

from __future__ import annotations

import time
from pathlib import Path

from linewatch.bench.model import ModelBenchPlan, bench_model_file, run_model_bench
from linewatch.bench.pipeline import PipelinePlan, run_pipeline_bench
from linewatch.bench.report import BenchReport, machine_info

__all__ = ["BenchReport", "ModelBenchPlan", "PipelinePlan", "pipeline_model", "run_bench"]


def pipeline_model(frame_size: int, model: Path | None, cache: Path) -> Path:
    """The model file the pipeline runs: ``model``, else the bench model of ``frame_size``."""
    return model if model is not None else bench_model_file(frame_size, cache)


def run_bench(
    model_plan: ModelBenchPlan | None,
    pipeline_plan: PipelinePlan | None,
    *,
    command: str,
    cache: Path,
    log_dir: Path,
    device: str = "auto",
    redis_url: str | None = None,
) -> BenchReport:
    """Run the parts that have a plan; the report records ``command`` and the machine."""
    started = time.monotonic()
    machine = machine_info(device)
    model = run_model_bench(model_plan, cache) if model_plan is not None else None
    pipeline = (
        run_pipeline_bench(pipeline_plan, log_dir, redis_url)
        if pipeline_plan is not None
        else None
    )
    return BenchReport(
        command=command,
        machine=machine,
        seconds=round(time.monotonic() - started, 1),
        model=model,
        pipeline=pipeline,
    )
