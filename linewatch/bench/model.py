"""Model benchmark: the scorer's speed per input size and batch, beside its bare backbone.

Each row times :meth:`Scorer.score_batch` on uint8 frames (pre-processing, backbone, heads,
maps back to frame size, i.e. everything a worker's model call does) and, on the same
shapes, the frozen backbone's forward pass alone on an already pre-processed tensor. The
ratio of the two (``scorer_over_backbone``) is what the MDAAE / SA-GAN heads and the
post-processing add to a plain feature extractor.

By default every input size is measured with a model *of that size* (the scorer's input
size is fixed per model file): a small model trained for one epoch on a synthetic set,
cached under ``<cache>/bench``. With ``model=FILE`` the one model scores frames of every
size, resized to its own input side; the rows say which (``frame_size`` vs ``model_size``).

A large frame (1024 x 1024) is cut into overlapping tiles of the model's size and scored
as one batch by the worker's own tiling code (:func:`score_tiled`).
"""

from __future__ import annotations

import hashlib
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from linewatch import __version__
from linewatch.config import InferenceOptions, WorkersConfig
from linewatch.errors import LinewatchError, ModelFileError
from linewatch.inference.tiling import cut_tiles, tile_grid
from linewatch.inference.worker import score_tiled
from linewatch.log import get_logger
from linewatch.model.acceleration import apply_options, resolve_backend
from linewatch.model.preprocess import preprocess_batch
from linewatch.model.scorer import ScoreBatch, Scorer

__all__ = [
    "ModelBench",
    "ModelBenchPlan",
    "ModelRow",
    "PeakMemory",
    "bench_frames",
    "bench_model_file",
    "run_model_bench",
]

log = get_logger("bench")

# The synthetic training set of a bench model: enough images to fit the memory term,
# few enough that the 512 model trains in under a minute on a laptop CPU.
_BENCH_GOOD = 8
_BENCH_DEFECTS = 1
_BENCH_SURFACE = "brushed_metal"
TILE_OVERLAP: int = WorkersConfig.model_fields["tile_overlap"].default


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelBenchPlan(_Frozen):
    """What the model benchmark measures."""

    sizes: tuple[int, ...] = Field((128, 256, 512), description="square frame sides")
    batches: tuple[int, ...] = Field((1, 4, 8, 16), description="frames per scorer call")
    tiled_frame: int | None = Field(1024, description="side of the tiled frame; None = skip")
    tile: int = Field(256, description="model size the tiled frame is cut for")
    tiled_batches: tuple[int, ...] = Field((1,), description="tiled frames per call")
    warmup: int = Field(1, ge=0, description="untimed calls before each row")
    repeats: int = Field(3, ge=1, description="timed calls per row; the median is reported")
    device: str = "auto"
    model: Path | None = Field(None, description="one model for every size; None = per size")
    inference: InferenceOptions = Field(
        default_factory=InferenceOptions, description="how the scorers run their backbone"
    )


class ModelRow(_Frozen):
    """One measured shape: ``batch`` frames of ``frame_size`` through a ``model_size`` model."""

    frame_size: int
    model_size: int
    tiles_per_frame: int = Field(description="1 unless the frame is tiled")
    batch: int = Field(description="frames per call (a tiled frame's tiles form one call)")
    ms_per_batch: float = Field(description="median wall time of one score_batch call")
    ms_per_image: float = Field(description="ms_per_batch / batch (per frame when tiled)")
    images_per_s: float = Field(description="1000 / ms_per_image")
    backbone_ms_per_batch: float = Field(
        description="median forward time of the bare backbone on the same (B, 3, S, S) input"
    )
    scorer_over_backbone: float = Field(
        description="median over the timed rounds of scorer time / backbone time (each round "
        "times both, one after the other, so they share the machine's load)"
    )
    stages_ms: dict[str, float] = Field(
        description="mean ms per call in each scorer stage: preprocess, backbone, heads, post"
    )
    peak_memory_mb: float = Field(
        description="CPU: peak RSS of the process during the row; CUDA: max allocated"
    )
    memory_before_mb: float | None = Field(
        description="the same measure when the row started (loaded models, memory the "
        "allocator kept from earlier work); the row's own need is the difference"
    )


class ModelBench(_Frozen):
    """Everything the model benchmark measured."""

    device: str
    torch_threads: int
    per_size_models: bool = Field(description="true: each size measured with its own model")
    models: dict[int, str] = Field(description="model input size -> model file")
    warmup: int
    repeats: int
    memory: Literal["rss_peak", "cuda_max_allocated"]
    inference: InferenceOptions = Field(
        default_factory=InferenceOptions, description="precision, layout, compile of the runs"
    )
    rows: list[ModelRow]


# --------------------------------------------------------------------------- models


def bench_model_file(size: int, cache: Path) -> Path:
    """A model of input ``size`` trained for one epoch on a small synthetic set (cached).

    The file name carries a hash of the settings and linewatch's version, so a change of
    either trains a new one. Written under a temporary name and renamed once calibrated,
    so an interrupted run never leaves a half-made model in the cache.
    """
    from linewatch.data.synth import write_dataset
    from linewatch.model.settings import ModelSettings, TrainSettings
    from linewatch.model.train import train

    settings = ModelSettings(size=size)
    train_settings = TrainSettings(epochs=1, seed=0)
    spec = f"{__version__}|{settings.model_dump_json()}|{train_settings.model_dump_json()}"
    spec += f"|{_BENCH_SURFACE}|{_BENCH_GOOD}|{_BENCH_DEFECTS}"
    key = hashlib.sha256(spec.encode()).hexdigest()[:12]
    root = cache / "bench"
    path = root / f"model-{size}-{key}.lwm"
    if path.exists():
        return path
    data = root / f"data-{size}"
    if not (data / "split.csv").exists():
        log.info("bench_data_writing", path=str(data), size=size)
        write_dataset(data, seed=0, size=size, n_good=_BENCH_GOOD, n_defect=_BENCH_DEFECTS,
                      surface=_BENCH_SURFACE, overwrite=True)
    partial = path.with_name(f"{path.stem}.partial.lwm")
    log.info("bench_model_training", path=str(path), size=size, epochs=1)
    train(data, partial, settings, train_settings, progress=False)
    os.replace(partial, path)
    return path


def bench_frames(size: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` distinct synthetic uint8 frames of ``size`` x ``size`` (good parts)."""
    from linewatch.data.synth import make_image

    rng = np.random.default_rng(seed)
    return [make_image(rng, _BENCH_SURFACE, size, None)[0] for _ in range(count)]


# --------------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak memory between :meth:`reset` and :meth:`read_mb`.

    On CPU the process's peak RSS (``VmHWM``), reset through ``/proc/self/clear_refs``
    (Linux); where that cannot be reset it is the peak since the process started. On CUDA
    the caching allocator's maximum allocated bytes.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind: Literal["rss_peak", "cuda_max_allocated"] = (
            "cuda_max_allocated" if device.type == "cuda" else "rss_peak"
        )

    def reset(self) -> None:
        """Start a new peak."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5 = reset the peak RSS
        except OSError:
            log.debug("peak_rss_not_resettable")

    def read_mb(self) -> float:
        """The peak since :meth:`reset`, MiB."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = _proc_status_mb("VmHWM")
        if peak is None:  # not Linux: the peak since the process started
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        return peak

    def current_mb(self) -> float | None:
        """Memory in use now, MiB (resident set on CPU, allocated on CUDA)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _proc_status_mb("VmRSS")


def _proc_status_mb(field: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` in MiB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _sync(device: torch.device) -> float:
    """``perf_counter`` once the device is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def paired_times_ms(
    fns: Sequence[Callable[[], object]], warmup: int, repeats: int, device: torch.device
) -> list[list[float]]:
    """Wall times in ms of each of ``fns``, called in turn ``repeats`` times after ``warmup``
    rounds; element ``[i][r]`` is ``fns[i]`` in round ``r``.

    Calling them in turn, not one after the other, puts both under the same load, so their
    ratio stays meaningful on a machine other work shares.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = _sync(device)
            fn()
            out.append((_sync(device) - start) * 1000.0)
    return times


def _row(
    scorer: Scorer,
    frames: Sequence[np.ndarray],
    tile: int | None,
    plan: ModelBenchPlan,
    memory: PeakMemory,
) -> ModelRow:
    """Time ``frames`` (tiled when ``tile``) through ``scorer`` and its bare backbone."""
    if scorer.backbone is None:
        raise LinewatchError(f"{scorer.path}: variant {scorer.settings.variant} has no backbone "
                             "to compare with; benchmark a backbone variant (B, D or E)")
    backbone = scorer.backbone
    stages: dict[str, float] = {}
    if tile is None:
        views = list(frames)
        tiles_per_frame = 1

        def call() -> object:
            return scorer.score_batch(frames, stages)
    else:
        grid = tile_grid(frames[0].shape[0], frames[0].shape[1], tile, TILE_OVERLAP)
        views = [t for f in frames for t in cut_tiles(f, grid)]
        tiles_per_frame = len(grid.origins)

        def call() -> object:
            return score_tiled(_StageScorer(scorer, stages), frames, tile, TILE_OVERLAP)

    x = preprocess_batch(views, scorer.preprocess, scorer.device)

    def forward() -> object:
        with torch.inference_mode():
            return backbone(x)

    memory.reset()
    before = memory.current_mb()
    for _ in range(plan.warmup):
        call()
        forward()
    stages.clear()  # stage means cover the timed calls only
    scorer_ms, backbone_ms = paired_times_ms((call, forward), 0, plan.repeats, scorer.device)
    ms = statistics.median(scorer_ms)
    ratio = statistics.median(s / b for s, b in zip(scorer_ms, backbone_ms, strict=True))
    batch = len(frames)
    return ModelRow(
        frame_size=int(frames[0].shape[0]),
        model_size=scorer.size,
        tiles_per_frame=tiles_per_frame,
        batch=batch,
        ms_per_batch=round(ms, 3),
        ms_per_image=round(ms / batch, 3),
        images_per_s=round(1000.0 * batch / ms, 2),
        backbone_ms_per_batch=round(statistics.median(backbone_ms), 3),
        scorer_over_backbone=round(ratio, 3),
        stages_ms={k: round(1000.0 * v / plan.repeats, 3) for k, v in stages.items()},
        peak_memory_mb=round(memory.read_mb(), 1),
        memory_before_mb=None if before is None else round(before, 1),
    )


class _StageScorer:
    """``scorer`` for :func:`score_tiled`, adding its stage timings to ``stages``."""

    def __init__(self, scorer: Scorer, stages: dict[str, float]) -> None:
        self.scorer = scorer
        self.stages = stages
        self.model_id = scorer.model_id
        self.threshold_version = scorer.threshold_version
        self.threshold = scorer.threshold

    def score_batch(self, frames: Sequence[np.ndarray]) -> ScoreBatch:
        return self.scorer.score_batch(frames, self.stages)


def _load_scorers(plan: ModelBenchPlan, cache: Path) -> dict[int, Scorer]:
    """A loaded scorer per model input size the plan needs (one when ``plan.model``), each
    running its backbone with ``plan.inference``."""
    if plan.model is not None:
        loaded = [Scorer.load(plan.model, device=plan.device)]
    else:
        sizes = set(plan.sizes) | ({plan.tile} if plan.tiled_frame else set())
        loaded = [_load_bench_model(size, cache, plan.device) for size in sorted(sizes)]
    for scorer in loaded:
        apply_options(scorer, plan.inference)
    return {scorer.size: scorer for scorer in loaded}


def _load_bench_model(size: int, cache: Path, device: str) -> Scorer:
    """The cached bench model of ``size``, trained again if this linewatch cannot load it."""
    path = bench_model_file(size, cache)
    try:
        return Scorer.load(path, device=device)
    except ModelFileError as exc:  # made by an older model code of the same version
        log.warning("bench_model_stale", path=str(path), error=str(exc))
        path.unlink()
        return Scorer.load(bench_model_file(size, cache), device=device)


def run_model_bench(plan: ModelBenchPlan, cache: Path) -> ModelBench:
    """Measure every (size, batch) of ``plan``, then the tiled frame."""
    scorers = _load_scorers(plan, cache)
    device = next(iter(scorers.values())).device
    memory = PeakMemory(device)

    def scorer_for(size: int) -> Scorer:
        return next(iter(scorers.values())) if plan.model is not None else scorers[size]

    rows: list[ModelRow] = []
    for size in plan.sizes:
        frames = bench_frames(size, max(plan.batches), seed=size)
        for batch in plan.batches:
            rows.append(_row(scorer_for(size), frames[:batch], None, plan, memory))
            log.info("bench_model_row", size=size, batch=batch, ms=rows[-1].ms_per_batch)
    if plan.tiled_frame:
        scorer = scorer_for(plan.tile)
        frames = bench_frames(plan.tiled_frame, max(plan.tiled_batches), seed=plan.tiled_frame)
        for batch in plan.tiled_batches:
            rows.append(_row(scorer, frames[:batch], scorer.size, plan, memory))
            log.info("bench_model_row", size=plan.tiled_frame, batch=batch, tiled=True,
                     ms=rows[-1].ms_per_batch)
    models = {size: str(s.path) for size, s in scorers.items()}
    for scorer in scorers.values():
        scorer.close()
    return ModelBench(
        device=str(device),
        torch_threads=torch.get_num_threads(),
        per_size_models=plan.model is None,
        models=models,
        warmup=plan.warmup,
        repeats=plan.repeats,
        memory=memory.kind,
        inference=resolve_backend(plan.inference, device),
        rows=rows,
    )
