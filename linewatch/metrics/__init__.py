"""Evaluation metrics and threshold rules: numpy and scipy only, no training framework.

- :mod:`.ranking`: image-level ROC / PR curves, AUROC, average precision.
- :mod:`.pixel`: pixel AUROC, AUPRO (MVTec AD), region IoU.
- :mod:`.classification`: confusion counts and rates at one threshold.
- :mod:`.thresholds`: the three threshold rules and the stored :class:`ThresholdSet`.

A score at or above a threshold means *defect* everywhere; label 1 is defect.
"""

from linewatch.metrics.classification import ClassificationReport, classify_at
from linewatch.metrics.pixel import aupro, pixel_auroc, region_iou
from linewatch.metrics.ranking import MetricInputError, auroc, pr_auc, pr_curve, roc_curve
from linewatch.metrics.thresholds import (
    ThresholdRule,
    ThresholdSet,
    f1_max_threshold,
    fit_thresholds,
    operating_point_threshold,
    silverman_bandwidth,
    youden_threshold,
)

__all__ = [
    "ClassificationReport",
    "MetricInputError",
    "ThresholdRule",
    "ThresholdSet",
    "aupro",
    "auroc",
    "classify_at",
    "f1_max_threshold",
    "fit_thresholds",
    "operating_point_threshold",
    "pixel_auroc",
    "pr_auc",
    "pr_curve",
    "region_iou",
    "roc_curve",
    "silverman_bandwidth",
    "youden_threshold",
]
