"""The three threshold rules of method.md section 4, and the set they make.

Each rule is fitted on a validation set holding good (label 0) and defective
(label 1) images and returns a threshold in the units of the scores; a score
at or above the threshold means *defect*. The fitted thresholds are data: a
:class:`ThresholdSet` is stored as JSON next to the model and carries a
content hash (``version``) that results cite, so a verdict can be traced to
the thresholds that made it.

Ties between candidate thresholds are broken the same way by every rule:
the best criterion first, then the higher recall (a missed defect costs more
than a false alarm), then the higher threshold.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from scipy.special import ndtr

from linewatch.metrics.classification import _at_or_above_counts, _confusion_counts, _ratio
from linewatch.metrics.ranking import MetricInputError, _binary_inputs

ThresholdRule = Literal["operating_point", "f1_max", "youden"]
# Kernel evaluations held at once when smoothing counts (8 MB of float64).
_SMOOTHING_BLOCK = 1 << 20


def _best(criterion: np.ndarray, recall: np.ndarray, thresholds: np.ndarray) -> float:
    """The threshold maximising (criterion, recall, threshold) lexicographically."""
    # lexsort sorts by its last key first, so the last index is the maximum.
    return float(thresholds[np.lexsort((thresholds, recall, criterion))[-1]])


def f1_max_threshold(labels: ArrayLike, scores: ArrayLike, step: float = 0.01) -> float:
    """The threshold of maximal F1 on a grid of the min-max normalised score.

    The grid ``0, step, 2 step, ... <= 1`` over ``(s - min) / (max - min)`` of
    the given scores is mapped back to score units, ``min + g (max - min)``, and
    F1 is evaluated at those thresholds, so the result reproduces the F1 found
    when applied to the raw scores.

    >>> f1_max_threshold([0, 0, 0, 1, 1], [0.0, 1.0, 2.0, 8.0, 10.0], step=0.25)
    7.5
    """
    if not 0.0 < step <= 1.0:
        raise MetricInputError(f"step must be in (0, 1], got {step}")
    y, s = _binary_inputs(labels, scores)
    lo, hi = float(s.min()), float(s.max())
    # Integer multiples, not a running sum: 0.01 added 100 times misses 1.0.
    grid = np.arange(int(np.floor(1.0 / step + 1e-9)) + 1) * step
    thresholds = lo + grid * (hi - lo)
    tp, fp, _, fn = _confusion_counts(y, s, thresholds)
    return _best(_ratio(2 * tp, 2 * tp + fp + fn), _ratio(tp, tp + fn), thresholds)


def youden_threshold(labels: ArrayLike, scores: ArrayLike) -> float:
    """The distinct score maximising Youden's J = sensitivity + specificity - 1 = TPR - FPR.

    >>> youden_threshold([0, 0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4, 0.5])
    0.3
    """
    y, s = _binary_inputs(labels, scores)
    thresholds = np.unique(s)
    tp, fp, tn, fn = _confusion_counts(y, s, thresholds)
    tpr = _ratio(tp, tp + fn)
    return _best(tpr - _ratio(fp, fp + tn), tpr, thresholds)


def silverman_bandwidth(scores: ArrayLike) -> float:
    """Silverman's rule of thumb for a Gaussian kernel over ``scores``:
    ``0.9 min(std, IQR / 1.34) n^(-1/5)``; 0.0 when the scores do not spread.

    >>> round(silverman_bandwidth(np.arange(100.0)), 3)
    10.343
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size < 2:
        return 0.0
    q75, q25 = np.percentile(s, [75, 25])
    spread = min(float(s.std()), float(q75 - q25) / 1.34) or float(s.std())
    return 0.9 * spread * s.size ** -0.2


def _at_or_above(scores: np.ndarray, thresholds: np.ndarray, bandwidth: float) -> np.ndarray:
    """How many ``scores`` lie at or above each threshold: counted, or with ``bandwidth`` > 0
    each score spread by a Gaussian kernel of that width (a smooth count)."""
    if bandwidth <= 0.0:
        return _at_or_above_counts(scores, thresholds)
    # A block of thresholds at a time: a val set of thousands of images and its copies
    # would otherwise make a thresholds x scores matrix of gigabytes.
    rows = max(1, _SMOOTHING_BLOCK // max(scores.size, 1))
    counts = np.empty(thresholds.size)
    for start in range(0, thresholds.size, rows):
        block = thresholds[start : start + rows, None]
        counts[start : start + rows] = ndtr((scores[None, :] - block) / bandwidth).sum(axis=1)
    return counts


def operating_point_threshold(
    labels: ArrayLike,
    scores: ArrayLike,
    min_recall: float = 0.9,
    drift: tuple[ArrayLike, ArrayLike] | None = None,
    bandwidth: float = 0.0,
) -> float:
    """The highest-precision distinct score whose recall is at least ``min_recall``.

    ``drift`` (labels, scores) adds images seen under other conditions (e.g. exposure-
    jittered copies of the same set): they count in the precision, so a threshold that only
    looks clean because the set is small and clean pays for the false alarms drift brings,
    and their scores are candidates too. The recall stays that of ``labels``/``scores``.

    ``bandwidth`` > 0 estimates the precision from Gaussian-kernel-smoothed counts of good
    and defective scores (see :func:`silverman_bandwidth`) instead of counting them. Counted,
    the precision falls with every defect lost between two good scores and jumps at each
    good one, so its maximum sits just above some good image, at the bottom of a gap that a
    small set leaves by chance; smoothed, it follows the tails of the two score
    distributions. Candidates and recall are counted either way.

    Ties in precision go to the higher recall, then to the higher threshold.
    The lowest score always qualifies (recall 1), so a threshold always exists.

    >>> operating_point_threshold([0, 1, 0, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.5], min_recall=0.6)
    0.4
    >>> good_defects = ([0, 1, 1, 1, 1, 0], [0.2, 0.3, 0.4, 0.5, 0.6, 0.9])
    >>> operating_point_threshold(*good_defects, min_recall=0.5)
    0.3
    >>> operating_point_threshold(*good_defects, min_recall=0.5, drift=([0], [0.35]))
    0.4
    >>> one_good = ([0, 1, 1, 1, 1], [0.2, 0.3, 0.4, 0.5, 0.6])
    >>> operating_point_threshold(*one_good, min_recall=0.5)  # just above the good image
    0.3
    >>> operating_point_threshold(*one_good, min_recall=0.5, bandwidth=0.1)
    0.5
    """
    if not 0.0 < min_recall <= 1.0:
        raise MetricInputError(f"min_recall must be in (0, 1], got {min_recall}")
    if not (np.isfinite(bandwidth) and bandwidth >= 0.0):
        raise MetricInputError(f"bandwidth must be finite and >= 0, got {bandwidth}")
    y, s = _binary_inputs(labels, scores)
    good, defect = s[~y], s[y]
    if drift is not None:
        dy, ds = _binary_inputs(*drift, both_classes=False)
        good, defect = np.concatenate([good, ds[~dy]]), np.concatenate([defect, ds[dy]])
    thresholds = np.unique(np.concatenate([good, defect]))
    recall = _ratio(_at_or_above(s[y], thresholds, 0.0), int(y.sum()))
    ok = recall >= min_recall
    thresholds, recall = thresholds[ok], recall[ok]
    tp = _at_or_above(defect, thresholds, bandwidth)
    fp = _at_or_above(good, thresholds, bandwidth)
    return _best(_ratio(tp, tp + fp), recall, thresholds)


def _content_hash(fields: dict[str, float | int]) -> str:
    """First 12 hex digits of the SHA-256 of the fields as canonical JSON."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


class ThresholdSet(BaseModel):
    """The fitted thresholds of one model on one validation set, stored as data.

    ``version`` is a hash of the other fields. Leave it out to have it
    computed; a stored version that no longer matches the values (a hand-edited
    file) is an error, because results would cite thresholds that were not used.

    >>> t = ThresholdSet(operating_point=0.6, f1_max=0.55, youden=0.5, min_recall=0.9,
    ...                  n_good=40, n_defect=10)
    >>> t.for_rule("f1_max"), len(t.version)
    (0.55, 12)
    >>> ThresholdSet.model_validate_json(t.model_dump_json()) == t
    True
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    operating_point: float = Field(description="highest precision at recall >= min_recall")
    f1_max: float = Field(description="maximal F1 on the 0.01 grid of the normalised score")
    youden: float = Field(description="maximal TPR - FPR")
    min_recall: float = Field(gt=0.0, le=1.0)
    n_good: int = Field(ge=1, description="good images of the validation set")
    n_defect: int = Field(ge=1, description="defective images of the validation set")
    version: str = Field("", validate_default=True, description="content hash, computed if empty")

    @field_validator("operating_point", "f1_max", "youden")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not np.isfinite(value):
            raise ValueError(f"a threshold must be finite, got {value}")
        return value

    @field_validator("version")
    @classmethod
    def _version_matches(cls, value: str, info: ValidationInfo) -> str:
        # Fields validate in declaration order, so info.data holds the others
        # unless one of them failed (then that error is reported instead).
        names = ("operating_point", "f1_max", "youden", "min_recall", "n_good", "n_defect")
        if not all(name in info.data for name in names):
            return value
        expected = _content_hash({name: info.data[name] for name in names})
        if value and value != expected:
            raise ValueError(
                f"version {value!r} does not match the thresholds (expected {expected!r}); "
                "remove the version to recompute it"
            )
        return expected

    def for_rule(self, rule: ThresholdRule) -> float:
        """The threshold of one rule, by name."""
        value: float = getattr(self, rule)
        return value


def fit_thresholds(
    labels: ArrayLike,
    scores: ArrayLike,
    min_recall: float = 0.9,
    drift: tuple[ArrayLike, ArrayLike] | None = None,
    bandwidth: float = 0.0,
) -> ThresholdSet:
    """Fit all three rules on one validation set; ``drift`` (labels, scores of the same
    images under other conditions) and ``bandwidth`` (its smoothing) concern the operating
    point's precision only (:func:`operating_point_threshold`). ``n_good`` and ``n_defect``
    count the set itself.

    >>> ts = fit_thresholds([0, 0, 0, 1, 1], [0.0, 1.0, 2.0, 8.0, 10.0])
    >>> ts.operating_point, ts.youden, ts.n_good, ts.n_defect
    (8.0, 8.0, 3, 2)
    """
    y, s = _binary_inputs(labels, scores)
    return ThresholdSet(
        operating_point=operating_point_threshold(y, s, min_recall, drift, bandwidth),
        f1_max=f1_max_threshold(y, s),
        youden=youden_threshold(y, s),
        min_recall=min_recall,
        n_good=int(np.count_nonzero(~y)),
        n_defect=int(np.count_nonzero(y)),
    )
