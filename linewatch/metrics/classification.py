"""Image-level classification at a fixed threshold: counts, precision, recall, F1.

A score at or above the threshold means *defect*. Ratios whose denominator is
zero are defined as 0.0 (no predicted defects gives precision 0.0, no good
images gives a false-alarm rate of 0.0), so a report never holds NaN.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field

from linewatch.metrics.ranking import MetricInputError, _binary_inputs


class ClassificationReport(BaseModel):
    """Confusion counts and rates at one threshold (score >= threshold = defect)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float
    precision: float = Field(ge=0.0, le=1.0, description="TP / (TP + FP); 0.0 when nothing flagged")
    recall: float = Field(ge=0.0, le=1.0, description="TP / (TP + FN); 0.0 without defects")
    f1: float = Field(ge=0.0, le=1.0, description="2TP / (2TP + FP + FN); 0.0 when all are 0")
    false_alarm_rate: float = Field(
        ge=0.0, le=1.0, description="FP / (FP + TN); 0.0 without good images"
    )
    tp: int = Field(ge=0)
    fp: int = Field(ge=0)
    tn: int = Field(ge=0)
    fn: int = Field(ge=0)


def _at_or_above_counts(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many ``scores`` lie at or above each threshold: one sort, one binary search."""
    # Scores below a threshold are left of its 'left' insertion point.
    below = np.searchsorted(np.sort(scores), thresholds, side="left")
    counts: np.ndarray = scores.size - below
    return counts


def _confusion_counts(
    y: np.ndarray, s: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(TP, FP, TN, FN) at each threshold, vectorised."""
    tp = _at_or_above_counts(s[y], thresholds)
    fp = _at_or_above_counts(s[~y], thresholds)
    return tp, fp, int((~y).sum()) - fp, int(y.sum()) - tp


def _ratio(num: ArrayLike, den: ArrayLike) -> np.ndarray:
    """num / den elementwise, 0.0 where den is 0."""
    n = np.asarray(num, dtype=np.float64)
    d = np.asarray(den, dtype=np.float64)
    return np.divide(n, d, out=np.zeros(np.broadcast_shapes(n.shape, d.shape)), where=d > 0)


def classify_at(labels: ArrayLike, scores: ArrayLike, threshold: float) -> ClassificationReport:
    """Confusion counts and rates when scores >= ``threshold`` are called defects.

    >>> r = classify_at([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], threshold=0.35)
    >>> (r.tp, r.fp, r.tn, r.fn), round(r.precision, 3), r.recall, r.false_alarm_rate
    ((2, 1, 1, 0), 0.667, 1.0, 0.5)
    """
    if not np.isfinite(threshold):
        raise MetricInputError(f"threshold must be finite, got {threshold}")
    y, s = _binary_inputs(labels, scores, both_classes=False)
    tp, fp, tn, fn = (int(c[0]) for c in _confusion_counts(y, s, np.array([threshold])))
    return ClassificationReport(
        threshold=float(threshold),
        precision=float(_ratio(tp, tp + fp)),
        recall=float(_ratio(tp, tp + fn)),
        f1=float(_ratio(2 * tp, 2 * tp + fp + fn)),
        false_alarm_rate=float(_ratio(fp, fp + tn)),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
    )
