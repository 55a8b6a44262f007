"""Groups of frame shape (aspect ratio = width / height).

Frames of every shape are stretched to the square model input, so a narrow frame's texture
is stretched more than a square one's and the per-position statistics see them differently.
Two parts of the model take that into account: calibration centres the joint score per group
(:class:`linewatch.model.joint.ShapeGroups`), and the memory of normal features is fitted per
group (:func:`memory_groups`). Both split the aspects with :func:`split_aspects`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_IMAGES_PER_MEMORY_GROUP = 100
"""A group of the memory owns at least this many training images: its Gaussian has a
covariance per position over ~176 channels, and fewer images leave it mostly the ridge."""


def split_aspects(aspects: np.ndarray, k: int) -> np.ndarray | None:
    """``k - 1`` edges near the quantiles of ``aspects``, each halfway between two distinct
    values, so that frames of one shape always share a group; None if there are not enough
    distinct values.

    >>> split_aspects(np.array([0.5, 0.5, 1.0, 2.0]), 2).tolist()
    [0.75]
    >>> split_aspects(np.ones(10), 2) is None
    True
    """
    values = np.sort(aspects)
    starts = np.flatnonzero(np.diff(values) > 0) + 1  # where each next distinct value starts
    if len(starts) < k - 1:
        return None
    targets = np.arange(1, k) * len(values) / k
    cuts = np.unique([starts[np.argmin(np.abs(starts - t))] for t in targets])
    if len(cuts) != k - 1:
        return None
    return np.asarray((values[cuts - 1] + values[cuts]) / 2.0)


@dataclass(frozen=True)
class MemoryGroups:
    """Which training views each group's memory is fitted on, and which group scores a frame.

    A frame is scored by group ``bisect_right(edges, aspect)``; group ``g`` is fitted on the
    views whose aspect lies in ``windows[g]`` (its own frames plus the neighbours' nearest).
    """

    edges: tuple[float, ...]
    windows: tuple[tuple[float, float], ...]

    @classmethod
    def single(cls) -> MemoryGroups:
        """One memory for every shape."""
        return cls((), ((-math.inf, math.inf),))

    def __len__(self) -> int:
        return len(self.windows)

    def members(self, aspects: np.ndarray, group: int) -> np.ndarray:
        """Boolean mask of the views of ``aspects`` that group ``group`` is fitted on."""
        low, high = self.windows[group]
        return (aspects >= low) & (aspects <= high)


def memory_groups(aspects: np.ndarray, groups: int, overlap: float,
                  min_images: int = MIN_IMAGES_PER_MEMORY_GROUP) -> MemoryGroups:
    """At most ``groups`` memory groups for training frames of ``aspects``.

    Split near quantiles (:func:`split_aspects`); each group is also fitted on the nearest
    ``overlap`` x N frames beyond each of its edges, so a frame near an edge is judged by
    statistics that have seen its shape. Fewer groups while one would own fewer than
    ``min_images`` frames (a covariance per position needs many); one group for one shape.

    >>> g = memory_groups(np.repeat([0.5, 1.0, 2.0], 100), 3, 0.1, 50)
    >>> g.edges, g.windows[1]
    ((0.75, 1.5), (0.5, 2.0))
    >>> len(memory_groups(np.repeat([0.5, 1.0], 40), 3, 0.1, 50))
    1
    """
    values = np.sort(np.asarray(aspects, dtype=np.float64))
    n, spill = len(values), round(overlap * len(values))
    for k in range(min(groups, n // max(min_images, 1)), 1, -1):
        edges = split_aspects(values, k)
        if edges is None:
            continue
        ends = np.searchsorted(values, edges, side="right")  # first frame above each edge
        if np.diff(np.concatenate([[0], ends, [n]])).min() < min_images:
            continue
        windows = []
        for g in range(k):
            low = -math.inf if g == 0 else float(values[max(ends[g - 1] - spill, 0)])
            high = math.inf if g == k - 1 else float(values[min(ends[g] - 1 + spill, n - 1)])
            windows.append((low, high))
        return MemoryGroups(tuple(float(e) for e in edges), tuple(windows))
    return MemoryGroups.single()
