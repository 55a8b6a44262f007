"""Image-level ranking metrics: ROC and precision-recall curves and their areas.

Every function sorts the scores once and reads all thresholds off cumulative
counts, so a curve over n images costs O(n log n). Ties are handled as
scikit-learn handles them: images of equal score change class together, at
one threshold, and a curve has one point per distinct score. A score at or
above a threshold means *defect* (label 1).

Both classes must be present; a validation set of good images only has no ROC
curve, and saying so is more useful than returning NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from linewatch.errors import DataError


class MetricInputError(DataError, ValueError):
    """Labels or scores a metric cannot be computed from; the message says why."""


class _ClfCurve(NamedTuple):
    """Cumulative counts at each distinct score, highest score first."""

    tps: np.ndarray
    fps: np.ndarray
    thresholds: np.ndarray


def _binary_inputs(
    labels: ArrayLike, scores: ArrayLike, *, both_classes: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Labels as bool and scores as float64, both 1-D of one length and finite.

    With ``both_classes`` (ranking metrics) a set holding one class is an error.
    """
    y = np.asarray(labels)
    s = np.asarray(scores)
    if y.ndim != 1 or s.ndim != 1:
        raise MetricInputError(
            f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}"
        )
    if y.shape != s.shape:
        raise MetricInputError(f"{y.size} labels but {s.size} scores")
    if y.size == 0:
        raise MetricInputError("no labels and scores given")
    if y.dtype != np.bool_:
        if not np.issubdtype(y.dtype, np.number) or not np.isin(y, (0, 1)).all():
            raise MetricInputError("labels must be 0 (good) or 1 (defect)")
        y = y.astype(np.bool_)
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise MetricInputError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    if not np.isfinite(s).all():
        raise MetricInputError(f"{int(np.count_nonzero(~np.isfinite(s)))} scores are NaN or inf")
    n_defect = int(np.count_nonzero(y))
    if both_classes and n_defect in (0, y.size):
        only = "defect" if n_defect else "good"
        raise MetricInputError(
            f"only {only} samples ({y.size}) given: ranking metrics need good and defect samples"
        )
    return y, s


def _clf_curve(labels: ArrayLike, scores: ArrayLike) -> _ClfCurve:
    """True and false positives when predicting defect at each distinct score (descending)."""
    y, s = _binary_inputs(labels, scores)
    order = np.argsort(s, kind="stable")[::-1]
    s_sorted = s[order]
    # The last index of each run of equal scores: ties switch class together.
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y[order], dtype=np.float64)[last_of_run]
    fps = 1.0 + last_of_run - tps
    return _ClfCurve(tps, fps, s_sorted[last_of_run])


def roc_curve(
    labels: ArrayLike, scores: ArrayLike, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: false and true positive rates at decreasing thresholds.

    Same output as ``sklearn.metrics.roc_curve``: it starts at (0, 0) with an
    ``inf`` threshold, and ``drop_intermediate`` removes points on straight
    segments, which changes no area.

    >>> fpr, tpr, thr = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    >>> fpr.tolist(), tpr.tolist(), thr.tolist()
    ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0], [inf, 0.8, 0.4, 0.35, 0.1])
    """
    tps, fps, thresholds = _clf_curve(labels, scores)
    if drop_intermediate and fps.size > 2:
        # A point is redundant when it lies on a straight segment: the second
        # differences of both counts are zero there.
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    fpr = np.r_[0.0, fps] / fps[-1]
    tpr = np.r_[0.0, tps] / tps[-1]
    return fpr, tpr, np.r_[np.inf, thresholds]


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (ties count one half, as Mann-Whitney's U).

    >>> auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(np.trapezoid(tpr, fpr))


def pr_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve, as ``sklearn.metrics.precision_recall_curve``.

    Returns (precision, recall, thresholds) ordered by increasing threshold;
    precision and recall end with the point (recall 0, precision 1), which has
    no threshold, so they are one longer than ``thresholds``.

    >>> p, r, t = pr_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    >>> p.round(3).tolist(), r.tolist(), t.tolist()
    ([0.5, 0.667, 0.5, 1.0, 1.0], [1.0, 1.0, 0.5, 0.5, 0.0], [0.1, 0.35, 0.4, 0.8])
    """
    tps, fps, thresholds = _clf_curve(labels, scores)
    # Every threshold predicts at least one defect (it is a score), so tps + fps > 0.
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def pr_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision: the step-wise area under the recall-precision curve.

    ``sum_k (R_k - R_{k-1}) P_k``, as ``sklearn.metrics.average_precision_score``;
    no interpolation between points, which would overstate the area.

    >>> round(pr_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), 6)
    0.833333
    """
    precision, recall, _ = pr_curve(labels, scores)
    # -0.0 from rounding is clipped, as sklearn does.
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))
