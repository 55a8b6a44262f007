"""Dynamic batching policy and tiling: pure logic with explicit time."""

from __future__ import annotations

import numpy as np
import pytest

from linewatch.config import RoiConfig, WorkersConfig
from linewatch.errors import LinewatchError
from linewatch.inference.batcher import DynamicBatcher
from linewatch.inference.tiling import crop_roi, cut_tiles, stitch_maps, tile_grid
from linewatch.wire import Frame, FrameHeader

MS = 1_000_000


def _frame(seq: int, deadline_ns: int) -> Frame:
    header = FrameHeader(
        camera="c", seq=seq, part_id=str(seq), ts_acquired_ns=0, deadline_ns=deadline_ns,
        dtype="uint8", shape=(4, 4),
    )
    return Frame(header, np.zeros((4, 4), np.uint8))


def test_full_batch_is_released_at_once() -> None:
    batcher = DynamicBatcher(max_batch=3, max_wait_ms=100)
    for seq in range(4):
        batcher.add(_frame(seq, 10_000 * MS), now_ns=0)
    batch = batcher.take(now_ns=0)
    assert [f.header.seq for f in batch] == [0, 1, 2]
    assert len(batcher) == 1


def test_partial_batch_waits_until_max_wait() -> None:
    batcher = DynamicBatcher(max_batch=8, max_wait_ms=10, batch_time_ms=1)
    batcher.add(_frame(0, 10_000 * MS), now_ns=0)
    assert batcher.take(now_ns=5 * MS) == []
    assert batcher.due_in_ms(5 * MS) == pytest.approx(5.0)
    assert len(batcher.take(now_ns=10 * MS)) == 1


def test_deadline_releases_before_max_wait() -> None:
    batcher = DynamicBatcher(max_batch=8, max_wait_ms=1000, batch_time_ms=20)
    batcher.add(_frame(0, 100 * MS), now_ns=0)
    # Due at deadline - 1.5 x batch time = 70 ms, long before max_wait.
    assert batcher.take(now_ns=60 * MS) == []
    assert len(batcher.take(now_ns=70 * MS)) == 1


def test_empty_batcher_has_nothing_due() -> None:
    batcher = DynamicBatcher(max_batch=2, max_wait_ms=1)
    assert batcher.due_in_ms(0) is None
    assert batcher.take(0, force=True) == []


def test_batch_limit_defaults_to_what_pays_for_the_backend() -> None:
    assert WorkersConfig().batch_limit("cpu", "torch") == 1
    assert WorkersConfig().batch_limit("cpu", "onnxruntime") == 4
    assert WorkersConfig().batch_limit("cuda", "torch") == 8
    assert WorkersConfig(max_batch=2).batch_limit("cpu", "onnxruntime") == 2
    assert WorkersConfig(max_batch=2).batch_limit("cuda") == 2


def test_tiles_cover_frame_and_stitch_back() -> None:
    frame = np.arange(300 * 520, dtype=np.float32).reshape(300, 520)
    grid = tile_grid(300, 520, tile=128, overlap=32)
    tiles = cut_tiles(frame, grid)
    assert all(t.shape == (128, 128) for t in tiles)
    stitched = stitch_maps([t.astype(np.float32) for t in tiles], grid)
    np.testing.assert_array_equal(stitched, frame)


def test_small_frame_is_one_tile() -> None:
    grid = tile_grid(100, 90, tile=128, overlap=16)
    assert grid.origins == ((0, 0),)


def test_tile_must_exceed_overlap() -> None:
    with pytest.raises(LinewatchError, match="tile_overlap"):
        tile_grid(500, 500, tile=32, overlap=32)


def test_roi_crop_and_bounds() -> None:
    frame = np.arange(100).reshape(10, 10)
    view = crop_roi(frame, RoiConfig(x=2, y=3, width=4, height=5))
    assert view.shape == (5, 4) and view[0, 0] == 32
    with pytest.raises(LinewatchError, match="exceeds the frame"):
        crop_roi(frame, RoiConfig(x=8, y=0, width=4, height=2))
