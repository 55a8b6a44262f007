"""The inference worker with a real scorer, a real dispatcher and real sockets.

The worker's loop is driven step by step (``InferenceWorker.step``) so the test
decides when things happen; nothing depends on timing.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from linewatch.config import LineConfig, validate_config
from linewatch.inference.worker import InferenceWorker, wire_map
from linewatch.model.modelfile import read_model_meta, update_model_meta
from linewatch.model.scorer import Scorer
from linewatch.testing import frame_header
from linewatch.transport.codec import decode_decision_message, encode_frame
from linewatch.transport.dispatcher import Dispatcher
from linewatch.transport.sockets import Context, make_socket, transport_context
from linewatch.transport.worker_link import WorkerLink
from linewatch.wire import FrameFailed, ResultHeader

WAIT_S = 60.0  # a bound for a loaded machine, not a speed claim


def _config(tmp_path: Path, model: Path, **workers: object) -> LineConfig:
    return validate_config({
        "line": "wtest",
        "cameras": [{"id": "cam0", "source": {"kind": "synth"}}],
        "transport": {
            "frames_endpoint": f"ipc://{tmp_path}/frames",
            "workers_endpoint": f"ipc://{tmp_path}/workers",
            "results_endpoint": f"ipc://{tmp_path}/results",
        },
        "workers": {"max_batch": 4, "max_wait_ms": 1.0, "device": "cpu", **workers},
        "model": {"path": str(model), "reload_check_s": 0.01},
    })


class Rig:
    """Camera socket -> dispatcher -> worker -> decision socket, all stepped by the test."""

    def __init__(self, ctx: Context, cfg: LineConfig) -> None:
        t = cfg.transport
        self.decision = make_socket(ctx, "pull", t, "bind", t.results_endpoint, "test.decision")
        self.dispatcher = Dispatcher(t, ctx)
        self.camera = make_socket(ctx, "push", t, "connect", t.frames_endpoint, "test.camera")
        self.link = WorkerLink(t, "w0", cfg.workers.batch_limit("cpu"), ctx=ctx)
        self.worker = InferenceWorker(
            cfg, "w0", Scorer.load(cfg.model.path, "cpu"), self.link,
            load_scorer=lambda p: Scorer.load(p, "cpu"),
        )
        self.outcomes: list[tuple[ResultHeader | FrameFailed, np.ndarray | None]] = []
        self.seq = 0

    def send(self, pixels: np.ndarray) -> None:
        header = frame_header("cam0", self.seq, shape=pixels.shape, deadline_ms=60_000)
        self.seq += 1
        self.camera.send_multipart(encode_frame(header, pixels), copy=False)

    def run_until(self, count: int) -> None:
        give_up = time.monotonic() + WAIT_S
        while len(self.outcomes) < count:
            assert time.monotonic() < give_up, f"gave up waiting for {count} outcomes"
            self.dispatcher.step(2)
            self.worker.step()
            while self.decision.poll(0):
                message, amap = decode_decision_message(self.decision.recv_multipart(copy=False))
                if isinstance(message, ResultHeader | FrameFailed):
                    self.outcomes.append((message, amap))

    def close(self) -> None:
        self.link.close()
        self.dispatcher.close()
        self.camera.close(linger=0)
        self.decision.close(linger=0)


RigFactory = Callable[[LineConfig], Rig]


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[RigFactory]:
    rigs: list[Rig] = []
    with transport_context(_config(tmp_path, tmp_path / "m.lwm").transport) as ctx:
        def make(cfg: LineConfig) -> Rig:
            rigs.append(Rig(ctx, cfg))
            return rigs[-1]
        yield make
        for rig in rigs:
            rig.close()


def _model_id(rig: Rig, index: int) -> str:
    result = rig.outcomes[index][0]
    assert isinstance(result, ResultHeader), result
    return result.model_id


def _model_copy(tiny_line_model: tuple[Path, Path], tmp_path: Path) -> Path:
    model = tmp_path / "model.lwm"
    shutil.copy(tiny_line_model[1], model)
    return model


def test_results_carry_model_threshold_and_a_frame_sized_map(
    tmp_path: Path, tiny_line_model: tuple[Path, Path], rig_factory: RigFactory
) -> None:
    cfg = _config(tmp_path, _model_copy(tiny_line_model, tmp_path))
    rig = rig_factory(cfg)
    rng = np.random.default_rng(0)
    for shape in [(64, 64), (48, 80), (64, 64, 3)]:
        rig.send(rng.integers(0, 255, shape, dtype=np.uint8))
    rig.run_until(3)
    scorer = Scorer.load(cfg.model.path, "cpu")
    for result, amap in rig.outcomes:
        assert isinstance(result, ResultHeader)
        assert result.model_id == scorer.model_id
        assert result.threshold == scorer.threshold("operating_point")
        assert amap is not None and amap.shape == result.frame.shape[:2]
        assert np.isfinite(result.score)


def test_large_frames_are_tiled_and_stitched_to_the_frame_size(
    tmp_path: Path, tiny_line_model: tuple[Path, Path], rig_factory: RigFactory
) -> None:
    cfg = _config(tmp_path, _model_copy(tiny_line_model, tmp_path), tile_size=64, tile_overlap=16)
    rig = rig_factory(cfg)
    rig.send(np.random.default_rng(1).integers(0, 255, (150, 200), dtype=np.uint8))
    rig.run_until(1)
    result, amap = rig.outcomes[0]
    assert isinstance(result, ResultHeader)
    assert amap is not None and amap.shape == (150, 200)


def test_a_new_model_file_is_swapped_in_between_batches(
    tmp_path: Path, tiny_line_model: tuple[Path, Path], rig_factory: RigFactory
) -> None:
    model = _model_copy(tiny_line_model, tmp_path)
    rig = rig_factory(_config(tmp_path, model))
    frame = np.full((64, 64), 128, np.uint8)
    rig.send(frame)
    rig.run_until(1)
    first_id = _model_id(rig, 0)
    # Any change to the file changes its checksum and so its model id.
    config = read_model_meta(model).config
    update_model_meta(model, config={**config, "note": "recalibrated"})
    rig.send(frame)
    rig.run_until(2)
    assert _model_id(rig, 1) != first_id
    assert _model_id(rig, 1) == Scorer.load(model, "cpu").model_id


def test_a_broken_model_file_is_refused_and_the_old_model_keeps_scoring(
    tmp_path: Path, tiny_line_model: tuple[Path, Path], rig_factory: RigFactory
) -> None:
    model = _model_copy(tiny_line_model, tmp_path)
    rig = rig_factory(_config(tmp_path, model))
    frame = np.full((64, 64), 128, np.uint8)
    rig.send(frame)
    rig.run_until(1)
    first_id = _model_id(rig, 0)
    broken = tmp_path / "broken.lwm"
    broken.write_bytes(model.read_bytes()[:-100])
    broken.replace(model)
    rig.send(frame)
    rig.run_until(2)
    assert _model_id(rig, 1) == first_id


def test_wire_maps_are_float16_like_numpys_conversion_overflow_included() -> None:
    amap = np.random.default_rng(0).normal(0.0, 3.0, (37, 41)).astype(np.float32)
    amap[0, 0], amap[1, 1], amap[2, 2] = 1e6, np.nan, -np.inf  # 1e6 overflows float16
    half = wire_map(amap[:, ::1])
    assert half.dtype == np.float16 and half.shape == amap.shape
    with np.errstate(over="ignore"):
        expected = amap.astype(np.float16)
    np.testing.assert_array_equal(half, expected)
