"""Per-frame costs on the verdict path, one operation at a time: what the code comments in
linewatch/inference/worker.py, linewatch/decision/postprocess.py and pyproject.toml cite.

    python bench/hot_path.py [--repeats 2000]

Prints the median microseconds per call of each way of doing one step, for a 256 x 256
anomaly map (the size the line's workers send), in this process, one thread.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch
from redis._parsers.encoders import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer

from linewatch.decision.postprocess import (
    find_regions,
    render_heatmap,
    scaled_map,
    smooth_maps,
    smoothed_regions,
)


def _us(call: Callable[[], object], repeats: int) -> float:
    rounds = [timeit.timeit(call, number=repeats) / repeats for _ in range(5)]
    return float(np.median(rounds)) * 1e6


def _frame_write_args() -> list[Any]:
    """An EVALSHA of one frame's write as the stream writer sends it (about 40 arguments)."""
    fields = [f"value-{i}" for i in range(56)]
    return ["EVALSHA", "0" * 40, 5, *[f"linewatch:line:key{i}" for i in range(5)], *fields]


def main() -> None:
    """Time each step and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2000, help="calls per timing round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    # A good part's texture of scores plus one defect of 20 x 30 pixels above the threshold.
    amap: np.ndarray = cv2.GaussianBlur(rng.random((256, 256), np.float32), (0, 0), 4.0)
    amap[100:120, 60:90] += np.float32(1.0)
    half = amap.astype(np.float16)
    threshold = 1.0
    hot = (amap >= threshold).astype(np.uint8)
    region = find_regions(amap, threshold, 1)[0]
    encode = Encoder("utf-8", "strict", False).encode
    write = _frame_write_args()
    steps: list[tuple[str, Callable[[], object]]] = [
        ("map float32 -> float16, numpy astype", lambda: amap.astype(np.float16)),
        ("map float32 -> float16, torch (worker)", lambda: torch.from_numpy(amap).half()),
        ("map float16 -> float32, numpy astype", lambda: half.astype(np.float32)),
        ("map float16 -> float32, cv2.addWeighted (decision's scaled_map)",
         lambda: scaled_map(half)),
        ("map float16 -> float32 + blur, smooth_maps (decision)",
         lambda: smooth_maps(half[None], 4.0)),
        ("Gaussian blur sigma 4 alone", lambda: cv2.GaussianBlur(amap, (0, 0), 4.0)),
        ("connected components, whole map",
         lambda: cv2.connectedComponentsWithStats(hot, connectivity=8)),
        ("find_regions (labels the hot pixels' box only)",
         lambda: find_regions(amap, threshold, 1)),
        ("find_regions, nothing above threshold", lambda: find_regions(amap, 10.0, 1)),
        ("a good part's map: blur + regions",
         lambda: find_regions(smooth_maps(amap[None], 4.0)[0], 10.0, 1)),
        ("a good part's map: smoothed_regions (no blur under the threshold; decision)",
         lambda: smoothed_regions(amap.copy(), 4.0, 10.0, 1)),
        ("a defective part's map: smoothed_regions",
         lambda: smoothed_regions(amap.copy(), 4.0, threshold, 1)),
        ("heatmap PNG of one region", lambda: render_heatmap(amap, region)),
        ("redis-py pack of a frame write, pure Python",
         lambda: PythonRespSerializer(6000, encode).pack(*write)),
        ("redis-py pack of a frame write, hiredis", lambda: HiredisRespSerializer().pack(*write)),
    ]
    width = max(len(name) for name, _ in steps)
    print(f"{'step':<{width}}  us/call (median of 5 x {args.repeats})")
    for name, call in steps:
        print(f"{name:<{width}}  {_us(call, args.repeats):8.1f}")


if __name__ == "__main__":
    main()
