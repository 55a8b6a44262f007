"""Region-of-interest crop and tiling of large frames, with the anomaly map stitched back.

Large frames are cut into overlapping square tiles that are scored as one batch;
their maps are blended back (mean over overlaps) into one map of the frame's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from linewatch.config import RoiConfig
from linewatch.errors import LinewatchError


def crop_roi(pixels: np.ndarray, roi: RoiConfig | None) -> np.ndarray:
    """The ROI view of a frame (no copy); the whole frame when no ROI is set."""
    if roi is None:
        return pixels
    height, width = pixels.shape[:2]
    if roi.x + roi.width > width or roi.y + roi.height > height:
        raise LinewatchError(
            f"workers.roi {roi.x},{roi.y} {roi.width}x{roi.height} "
            f"exceeds the frame {width}x{height}"
        )
    return pixels[roi.y : roi.y + roi.height, roi.x : roi.x + roi.width]


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one frame lie: top-left corners and the tile side."""

    height: int
    width: int
    tile: int
    origins: tuple[tuple[int, int], ...]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> TileGrid:
    """Overlapping tiles covering the frame; the last row/column is pulled flush to the edge."""
    if tile <= overlap:
        raise LinewatchError(f"workers.tile_size {tile} must exceed tile_overlap {overlap}")
    step = tile - overlap
    ys = _starts(height, tile, step)
    xs = _starts(width, tile, step)
    return TileGrid(height, width, tile, tuple((y, x) for y in ys for x in xs))


def _starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def cut_tiles(pixels: np.ndarray, grid: TileGrid) -> list[np.ndarray]:
    """The tiles of a frame as views, in grid order."""
    return [pixels[y : y + grid.tile, x : x + grid.tile] for y, x in grid.origins]


def stitch_maps(maps: list[np.ndarray], grid: TileGrid) -> np.ndarray:
    """Blend tile maps back into one frame-sized map (mean where tiles overlap)."""
    total = np.zeros((grid.height, grid.width), np.float32)
    count = np.zeros((grid.height, grid.width), np.float32)
    for (y, x), tile_map in zip(grid.origins, maps, strict=True):
        h, w = tile_map.shape
        total[y : y + h, x : x + w] += tile_map
        count[y : y + h, x : x + w] += 1.0
    return total / np.maximum(count, 1.0)
