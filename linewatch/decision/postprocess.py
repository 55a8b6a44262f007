"""From anomaly maps to defect regions: Gaussian smoothing and connected components.

Method §4: the anomaly map is Gaussian-filtered, then adjacent pixels at or above
the threshold are merged (8-connectivity) into defect regions with a bounding box,
an area and the max/mean anomaly value inside. Map values share the image score's
units, so the image threshold applies to them unchanged.

>>> amap = np.zeros((32, 32), np.float32)
>>> amap[4:10, 4:12] = 2.0          # a 6 x 8 defect
>>> amap[20, 20] = 5.0              # a single hot pixel
>>> [(r.x, r.y, r.w, r.h, r.area) for r in find_regions(amap, threshold=1.0, min_area=4)]
[(4, 4, 8, 6, 48)]
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True, slots=True)
class Region:
    """A connected defect region; coordinates and area in pixels."""

    x: int
    y: int
    w: int
    h: int
    area: int
    max_score: float
    mean_score: float

    def scaled(self, sx: float, sy: float, ox: int = 0, oy: int = 0) -> Region:
        """The region in another pixel grid: ``x' = ox + x * sx``, ``y' = oy + y * sy``."""
        return Region(
            x=ox + int(self.x * sx),
            y=oy + int(self.y * sy),
            w=max(1, round(self.w * sx)),
            h=max(1, round(self.h * sy)),
            area=max(1, round(self.area * sx * sy)),
            max_score=self.max_score,
            mean_score=self.mean_score,
        )


def smooth_maps(maps: np.ndarray, sigma: float, scale: float = 1.0) -> np.ndarray:
    """Gaussian-smooth each map of a (B, H, W) batch, times ``scale``; float32, same shape.

    ``maps`` may be float16 (as maps travel on the wire) or float32. ``sigma`` is in map
    pixels; 0 returns an unsmoothed float32 copy. Borders are reflected so that a defect
    at the edge is not diluted by zeros.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {maps.shape}")
    out = np.empty(maps.shape, np.float32)
    for i in range(maps.shape[0]):
        scaled_map(maps[i], scale, out=out[i])
        _blur(out[i], sigma)
    return out


def scaled_map(amap: np.ndarray, scale: float = 1.0, out: np.ndarray | None = None) -> np.ndarray:
    """``amap`` (H, W; float16 as maps travel on the wire, or float32) times ``scale``, as
    float32, into ``out`` when given."""
    if out is None:
        out = np.empty(amap.shape, np.float32)
    # cv2 converts float16 about 10x faster than numpy's astype does (bench/hot_path.py),
    # which matters at one map per frame.
    cv2.addWeighted(amap, scale, amap, 0.0, 0.0, dst=out, dtype=cv2.CV_32F)
    return out


def smoothed_regions(
    amap: np.ndarray, sigma: float, threshold: float, min_area: int
) -> tuple[np.ndarray, list[Region]]:
    """``amap`` (float32 H x W) smoothed in place, and its regions (see :func:`find_regions`).

    A Gaussian averages, so the smoothed map never rises above the map's own maximum: when
    no pixel reaches ``threshold``, no region can, and the map comes back unsmoothed with
    none. That is a good part, most frames of a line, and the blur is most of the time its
    decision takes (bench/hot_path.py).
    """
    if amap.ndim != 2:
        raise ValueError(f"amap must be (H, W), got shape {amap.shape}")
    if _surely_below(float(amap.max()), threshold):
        return amap, []
    _blur(amap, sigma)
    return amap, find_regions(amap, threshold, min_area)


def _surely_below(peak: float, threshold: float) -> bool:
    # The blur's weights sum to 1 only up to float32 rounding: a peak a hair under the
    # threshold is smoothed and labelled as before, never skipped.
    return peak + 1e-5 * max(abs(peak), abs(threshold)) < threshold


def _blur(amap: np.ndarray, sigma: float) -> None:
    if sigma > 0:
        cv2.GaussianBlur(amap, (0, 0), sigmaX=sigma, sigmaY=sigma, dst=amap,
                         borderType=cv2.BORDER_REFLECT)


def find_regions(amap: np.ndarray, threshold: float, min_area: int) -> list[Region]:
    """Regions of ``amap`` (H, W) at or above ``threshold``, highest ``max_score`` first.

    Pixels touching at an edge or corner (8-connectivity) form one region; regions
    smaller than ``min_area`` pixels are dropped. NaN pixels never belong to a region.
    """
    if amap.ndim != 2:
        raise ValueError(f"amap must be (H, W), got shape {amap.shape}")
    hot = amap >= threshold
    rows = np.flatnonzero(hot.any(axis=1))
    if rows.size == 0:
        return []  # the common case of a good part: no labelling at all
    cols = np.flatnonzero(hot.any(axis=0))
    # Label only the box around the hot pixels: every region lies inside it, and
    # labelling a whole 256 x 256 map costs 10x more than the box of a defect
    # (bench/hot_path.py).
    y0, x0 = int(rows[0]), int(cols[0])
    box = (slice(y0, int(rows[-1]) + 1), slice(x0, int(cols[-1]) + 1))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        hot[box].astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    values_box = amap[box]
    regions = []
    for label in range(1, count):  # 0 is the background
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < min_area:
            continue
        window = (slice(y, y + h), slice(x, x + w))
        values = values_box[window][labels[window] == label]
        regions.append(Region(x0 + x, y0 + y, w, h, area, float(values.max()),
                              float(values.mean(dtype=np.float64))))
    regions.sort(key=lambda r: r.max_score, reverse=True)
    return regions


def render_heatmap(amap: np.ndarray, region: Region, margin: int = 8) -> bytes:
    """A PNG of ``amap`` around ``region`` (plus ``margin`` pixels), colour-mapped.

    Values are scaled from 0 to the region's ``max_score`` (JET colour map: blue low,
    red high) so that the shape of the defect is visible whatever its strength.
    """
    height, width = amap.shape
    y0, y1 = max(region.y - margin, 0), min(region.y + region.h + margin, height)
    x0, x1 = max(region.x - margin, 0), min(region.x + region.w + margin, width)
    crop = np.nan_to_num(amap[y0:y1, x0:x1], nan=0.0, posinf=region.max_score, neginf=0.0)
    top = region.max_score if region.max_score > 0 else 1.0
    grey = np.clip(crop / top * 255.0, 0, 255).astype(np.uint8)
    # Fastest zlib level: these PNGs are small crops, and encoding sits on the verdict path.
    ok, png = cv2.imencode(".png", cv2.applyColorMap(grey, cv2.COLORMAP_JET),
                           [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding of a heatmap failed")
    return png.tobytes()
