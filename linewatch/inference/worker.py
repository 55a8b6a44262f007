"""The inference worker: frames in from the dispatcher, results out to the decision service.

Lifecycle as in Triton's Python backend: load the scorer once, execute dynamically
batched requests, and swap the model between batches when its file changes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from linewatch.config import LineConfig, ThresholdRule, WorkersConfig
from linewatch.errors import ConfigError, LinewatchError, ModelFileError
from linewatch.inference.batcher import DynamicBatcher
from linewatch.inference.tiling import crop_roi, cut_tiles, stitch_maps, tile_grid
from linewatch.lifecycle import notify_ready
from linewatch.log import get_logger
from linewatch.wire import Frame, FrameHeader, ResultHeader

log = get_logger("infer")


class ScoreBatchLike(Protocol):
    @property
    def scores(self) -> np.ndarray: ...

    @property
    def maps(self) -> list[np.ndarray]: ...


class ScorerLike(Protocol):
    """What the worker needs of a scorer (:class:`linewatch.model.scorer.Scorer`)."""

    @property
    def model_id(self) -> str: ...

    @property
    def threshold_version(self) -> str | None: ...

    def threshold(self, rule: ThresholdRule = ...) -> float: ...

    def score_batch(self, frames: Sequence[np.ndarray]) -> ScoreBatchLike: ...


class LinkLike(Protocol):
    """What the worker needs of its transport link (:class:`WorkerLink`)."""

    def poll(self, timeout_ms: float) -> list[Frame]: ...

    def done(self, frame_ids: list[str]) -> None: ...

    def send_result(self, header: ResultHeader, amap: np.ndarray) -> None: ...

    def send_failed(self, header: FrameHeader, reason: str) -> None: ...


@dataclass(frozen=True)
class ScoredFrame:
    """One frame's score and map at the resolution of what was scored (ROI or frame)."""

    score: float
    amap: np.ndarray


@dataclass
class ModelWatcher:
    """Notices a replaced model file (atomic rename changes its inode / mtime)."""

    path: Path
    check_every_s: float
    _stamp: tuple[int, int, int] | None = None
    _checked_at: float = 0.0

    def __post_init__(self) -> None:
        self._stamp = self._read_stamp()

    def _read_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def changed(self, now: float) -> bool:
        """True once per change of the file, looked at no more often than configured."""
        if now - self._checked_at < self.check_every_s:
            return False
        self._checked_at = now
        stamp = self._read_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        return True


@dataclass
class InferenceWorker:
    """Scores batches of frames and forwards results; one per worker process."""

    config: LineConfig
    worker_id: str
    scorer: ScorerLike
    link: LinkLike
    load_scorer: Callable[[Path], ScorerLike] | None = None  # for hot reload
    index: int = 0
    """Worker index in the line (``linewatch infer --worker``)."""
    max_batch: int | None = None
    """Frames per batch at most (default: ``workers.max_batch`` or its CPU default)."""
    _batcher: DynamicBatcher = field(init=False)
    _watcher: ModelWatcher = field(init=False)
    frames_scored: int = 0
    frames_failed: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        workers = self.config.workers
        limit = self.max_batch or workers.batch_limit("cpu")
        self._batcher = DynamicBatcher(limit, workers.max_wait_ms)
        self._watcher = ModelWatcher(self.config.model.path, self.config.model.reload_check_s)

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Finish the queued frames and leave :meth:`run` (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> dict[str, int]:
        """Poll, batch, score, forward until stopped, then finish what is queued."""
        log.info("worker_started", worker=self.worker_id, model_id=self.scorer.model_id)
        notify_ready()
        while not self._stop.is_set():
            self.step()
        while len(self._batcher):
            self._process(self._batcher.take(time.time_ns(), force=True))
        log.info("worker_stopped", worker=self.worker_id, scored=self.frames_scored,
                 failed=self.frames_failed)
        return {"scored": self.frames_scored, "failed": self.frames_failed}

    def step(self) -> None:
        """One turn of the loop: wait for frames at most until a batch is due."""
        due = self._batcher.due_in_ms(time.time_ns())
        timeout = self.config.transport.heartbeat_ms / 4 if due is None else due
        for frame in self.link.poll(timeout):
            self._batcher.add(frame, time.time_ns())
        batch = self._batcher.take(time.time_ns())
        if batch:
            self._process(batch)
        self._maybe_reload()

    def _process(self, batch: list[Frame]) -> None:
        if not batch:
            return
        started = time.time_ns()
        try:
            scored = self._inject_nonfinite(batch, self._score(batch))
        except Exception as exc:  # a model failure must fail the frames safe, not the line
            log.exception("batch_failed", worker=self.worker_id, size=len(batch), error=str(exc))
            for frame in batch:
                self.link.send_failed(frame.header, "inference_error")
            self.frames_failed += len(batch)
            self.link.done([f.header.frame_id for f in batch])
            return
        ended = time.time_ns()
        self._batcher.observe_batch_time((ended - started) / 1e6)
        threshold = self.scorer.threshold(self.config.decision.rule)
        for frame, result in zip(batch, scored, strict=True):
            header = ResultHeader(
                frame=frame.header, score=result.score, map_dtype="float16",
                map_shape=(int(result.amap.shape[0]), int(result.amap.shape[1])),
                model_id=self.scorer.model_id,
                threshold_version=self.scorer.threshold_version or "none",
                threshold=threshold, worker=self.worker_id, ts_infer_start_ns=started,
                ts_infer_end_ns=ended, batch_size=len(batch),
            )
            self.link.send_result(header, wire_map(result.amap))
        self.frames_scored += len(batch)
        self.link.done([f.header.frame_id for f in batch])

    def _score(self, batch: list[Frame]) -> list[ScoredFrame]:
        workers = self.config.workers
        if workers.inject_delay_ms > 0 and workers.inject_delay_worker in (None, self.index):
            time.sleep(workers.inject_delay_ms / 1000.0)  # fault injection: a slow worker
        views = [crop_roi(f.pixels, workers.roi) for f in batch]
        if workers.tile_size is None:
            out = self.scorer.score_batch(views)
            return [ScoredFrame(float(s), m) for s, m in zip(out.scores, out.maps, strict=True)]
        return self._score_tiled(views, workers.tile_size, workers.tile_overlap)

    def _inject_nonfinite(self, batch: list[Frame], scored: list[ScoredFrame]) -> list[ScoredFrame]:
        """Fault injection (``workers.inject_nonfinite_every``): NaN scores, inf maps."""
        every = self.config.workers.inject_nonfinite_every
        if every is None:
            return scored
        return [
            ScoredFrame(float("nan"), np.full_like(s.amap, np.inf))
            if f.header.seq % every == 0 else s
            for f, s in zip(batch, scored, strict=True)
        ]

    def _score_tiled(self, views: list[np.ndarray], tile: int, overlap: int) -> list[ScoredFrame]:
        return score_tiled(self.scorer, views, tile, overlap)

    def _maybe_reload(self) -> None:
        if self.load_scorer is None or not self._watcher.changed(time.monotonic()):
            return
        try:
            new = self.load_scorer(self.config.model.path)
            new.threshold(self.config.decision.rule)  # an uncalibrated model cannot decide
        except LinewatchError as exc:
            log.error("model_reload_refused", path=str(self.config.model.path), error=str(exc))
            return
        log.info("model_reloaded", old=self.scorer.model_id, new=new.model_id)
        self.scorer = new


def wire_map(amap: np.ndarray) -> np.ndarray:
    """``amap`` as float16, the map's wire dtype (half the bytes of float32)."""
    import torch  # the worker has it loaded; its conversion is vectorised, numpy's is not

    # 30x faster than numpy's astype for a 256 x 256 map (bench/hot_path.py): per frame,
    # on the verdict path.
    half: np.ndarray = torch.from_numpy(np.ascontiguousarray(amap, np.float32)).half().numpy()
    return half


def score_tiled(
    scorer: ScorerLike, views: Sequence[np.ndarray], tile: int, overlap: int
) -> list[ScoredFrame]:
    """Score frames as overlapping tiles in one batch; the frame's score is its tiles' max.

    The maps are stitched back to each frame's size (mean over overlaps).
    """
    grids = [tile_grid(v.shape[0], v.shape[1], tile, overlap) for v in views]
    tiles = [t for v, g in zip(views, grids, strict=True) for t in cut_tiles(v, g)]
    out = scorer.score_batch(tiles)
    results, start = [], 0
    for grid in grids:
        n = len(grid.origins)
        amap = stitch_maps(list(out.maps[start : start + n]), grid)
        results.append(ScoredFrame(float(np.max(out.scores[start : start + n])), amap))
        start += n
    return results


def scorer_loader(config: LineConfig, device: str | None = None) -> Callable[[Path], ScorerLike]:
    """How the line's workers load a model file (``workers.scorer``) on ``device``
    (default ``workers.device``)."""
    from linewatch.model.acceleration import apply_options
    from linewatch.model.scorer import BackboneOnlyScorer, Scorer

    workers = config.workers
    scorer_class = BackboneOnlyScorer if workers.scorer == "backbone_only" else Scorer

    def load(path: Path) -> ScorerLike:
        scorer = scorer_class.load(path, device=device or workers.device)
        apply_options(scorer, workers.inference)  # precision, layout, compile
        return scorer

    return load


def load_line_scorer(config: LineConfig, device: str | None = None) -> ScorerLike:
    """The line's model file loaded as its workers serve it, calibrated for ``decision.rule``.

    Raises :class:`ConfigError` naming ``model.path``: a model file that cannot be
    served (another format version, a checksum mismatch, weights that do not fit,
    not calibrated) does not heal by restarting, so the line stops instead.
    """
    try:
        scorer = scorer_loader(config, device)(config.model.path)
        scorer.threshold(config.decision.rule)  # an uncalibrated model cannot decide
    except ModelFileError as exc:
        raise ConfigError(f"model.path: {exc}") from None
    return scorer


def resolved_batch_limit(workers: WorkersConfig) -> int:
    """``workers.max_batch`` as a worker on this machine resolves it: by the device it runs
    on and what runs its backbone there."""
    from linewatch.model.acceleration import resolve_backend
    from linewatch.model.scorer import resolve_device

    device = resolve_device(workers.device)
    return workers.batch_limit(device.type, resolve_backend(workers.inference, device).backend)


def run_inference_worker(config: LineConfig, index: int) -> dict[str, int]:
    """Load the line's model and serve as worker ``index`` until SIGINT/SIGTERM."""
    import os

    import torch

    from linewatch.lifecycle import run_until_signalled
    from linewatch.transport.worker_link import WorkerLink

    workers = config.workers
    torch.set_num_threads(workers.threads or max(1, (os.cpu_count() or 1) // workers.count))
    if workers.scorer == "backbone_only":
        log.warning("worker_backbone_only", worker=index, note="every part passes; bench only")
    worker_id = f"{config.line}-w{index}"
    scorer = load_line_scorer(config)
    max_batch = resolved_batch_limit(workers)
    with WorkerLink(config.transport, worker_id, max_batch) as link:
        worker = InferenceWorker(config, worker_id, scorer, link,
                                 load_scorer=scorer_loader(config), index=index,
                                 max_batch=max_batch)
        stats: dict[str, int] = run_until_signalled(worker)
    return stats
