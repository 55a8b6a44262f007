"""Threshold rules against brute-force searches, and the stored ThresholdSet."""

from __future__ import annotations

import doctest
import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from linewatch.metrics import (
    ClassificationReport,
    MetricInputError,
    ThresholdSet,
    classify_at,
    f1_max_threshold,
    fit_thresholds,
    operating_point_threshold,
    silverman_bandwidth,
    youden_threshold,
)
from linewatch.metrics import thresholds as thresholds_module

SEEDS = range(16)


def _random_set(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Both classes; odd seeds draw few distinct scores, so many thresholds tie."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 120))
    labels = rng.integers(0, 2, n)
    labels[:2] = (0, 1)
    if seed % 2:
        scores = rng.integers(0, int(rng.integers(2, 9)), n) * 0.5 - 1.0
    else:
        scores = rng.normal(labels * 1.5, 1.0, n) * 40.0 + 100.0
    return labels, scores


def _brute_force(
    labels: np.ndarray, scores: np.ndarray, candidates: list[float], criterion: str
) -> float:
    """The candidate whose report is best by (criterion, recall, threshold), one at a time."""
    best: tuple[float, float, float] | None = None
    for t in candidates:
        report = classify_at(labels, scores, t)
        key = (_criterion(report, criterion), report.recall, t)
        if best is None or key > best:
            best = key
    assert best is not None
    return best[2]


def _criterion(report: ClassificationReport, name: str) -> float:
    if name == "youden":
        return report.recall - report.false_alarm_rate
    return float(getattr(report, name))


def test_doctests() -> None:
    result = doctest.testmod(thresholds_module, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_f1_max_equals_brute_force_over_the_grid(seed: int) -> None:
    labels, scores = _random_set(seed)
    lo, hi = scores.min(), scores.max()
    grid = [float(lo + (k * 0.01) * (hi - lo)) for k in range(101)]
    expected = _brute_force(labels, scores, grid, "f1")
    assert f1_max_threshold(labels, scores) == expected
    # The threshold is in score units: applied to the raw scores it gives that F1.
    best_f1 = max(classify_at(labels, scores, t).f1 for t in grid)
    assert classify_at(labels, scores, f1_max_threshold(labels, scores)).f1 == best_f1


@pytest.mark.parametrize("seed", SEEDS)
def test_youden_equals_brute_force_over_distinct_scores(seed: int) -> None:
    labels, scores = _random_set(seed)
    expected = _brute_force(labels, scores, sorted(set(scores.tolist())), "youden")
    assert youden_threshold(labels, scores) == expected


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("min_recall", [0.5, 0.9, 1.0])
def test_operating_point_equals_brute_force(seed: int, min_recall: float) -> None:
    labels, scores = _random_set(seed)
    candidates = [
        t
        for t in sorted(set(scores.tolist()))
        if classify_at(labels, scores, t).recall >= min_recall
    ]
    expected = _brute_force(labels, scores, candidates, "precision")
    found = operating_point_threshold(labels, scores, min_recall)
    assert found == expected
    assert classify_at(labels, scores, found).recall >= min_recall


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("min_recall", [0.5, 0.9])
def test_drift_counts_in_the_operating_points_precision_not_in_its_recall(
    seed: int, min_recall: float
) -> None:
    labels, scores = _random_set(seed)
    drift_labels, drift_scores = _random_set(seed + 100)
    best: tuple[float, float, float] | None = None
    for t in sorted(set(scores.tolist()) | set(drift_scores.tolist())):
        own = classify_at(labels, scores, t)
        if own.recall < min_recall:
            continue
        drifted = classify_at(drift_labels, drift_scores, t)
        tp, fp = own.tp + drifted.tp, own.fp + drifted.fp
        key = (tp / (tp + fp) if tp + fp else 0.0, own.recall, t)
        best = key if best is None or key > best else best
    assert best is not None
    found = operating_point_threshold(labels, scores, min_recall, (drift_labels, drift_scores))
    assert found == best[2]
    assert classify_at(labels, scores, found).recall >= min_recall


def test_drift_in_a_gap_of_the_set_moves_the_operating_point_up() -> None:
    # The set alone puts the threshold at the bottom of a gap between good images (0.2 and
    # 0.9): at 0.3 its precision is highest. A drifted good image at 0.35 sits in that gap.
    labels, scores = [0, 1, 1, 1, 1, 0], [0.2, 0.3, 0.4, 0.5, 0.6, 0.9]
    assert operating_point_threshold(labels, scores, 0.5) == 0.3
    assert operating_point_threshold(labels, scores, 0.5, ([0], [0.35])) == 0.4
    fitted = fit_thresholds(labels, scores, 0.5, drift=([0], [0.35]))
    plain = fit_thresholds(labels, scores, 0.5)
    assert fitted.operating_point == 0.4 != plain.operating_point
    assert (fitted.f1_max, fitted.youden) == (plain.f1_max, plain.youden)
    assert (fitted.n_good, fitted.n_defect) == (2, 4)  # the set itself, not its drifted copies


def _smoothed_precision_brute_force(
    labels: np.ndarray,
    scores: np.ndarray,
    drift: tuple[np.ndarray, np.ndarray],
    min_recall: float,
    bandwidth: float,
) -> float:
    """Best (kernel-smoothed precision, counted recall, threshold), one threshold at a time."""
    pooled_labels = np.concatenate([labels, drift[0]]).astype(bool)
    pooled = np.concatenate([scores, drift[1]])
    best: tuple[float, float, float] | None = None
    for t in sorted(set(pooled.tolist())):
        recall = classify_at(labels, scores, t).recall
        if recall < min_recall:
            continue
        # P(score + kernel noise >= t), one image at a time, with the standard library's erf.
        above = [0.5 * (1 + math.erf((x - t) / (bandwidth * math.sqrt(2)))) for x in pooled]
        tp = sum(a for a, d in zip(above, pooled_labels, strict=True) if d)
        fp = sum(a for a, d in zip(above, pooled_labels, strict=True) if not d)
        key = (tp / (tp + fp), recall, t)
        best = key if best is None or key > best else best
    assert best is not None
    return best[2]


@pytest.mark.parametrize("seed", [s for s in SEEDS if s % 2 == 0])
def test_smoothed_operating_point_equals_brute_force(seed: int) -> None:
    labels, scores = _random_set(seed)
    drift = _random_set(seed + 100)
    bandwidth = float(np.std(scores)) * 0.2
    expected = _smoothed_precision_brute_force(labels, scores, drift, 0.9, bandwidth)
    found = operating_point_threshold(labels, scores, 0.9, drift, bandwidth=bandwidth)
    assert found == pytest.approx(expected)
    assert classify_at(labels, scores, found).recall >= 0.9


@pytest.mark.parametrize("block", [1, 7, 1000])
def test_smoothed_counts_come_out_the_same_in_blocks_of_any_size(
    block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    labels, scores = _random_set(2)
    drift = _random_set(102)
    whole = operating_point_threshold(labels, scores, 0.9, drift, bandwidth=5.0)
    monkeypatch.setattr(thresholds_module, "_SMOOTHING_BLOCK", block)  # kernel values at once
    assert operating_point_threshold(labels, scores, 0.9, drift, bandwidth=5.0) == whole


@pytest.mark.parametrize("seed", [s for s in SEEDS if s % 2 == 0])
def test_a_kernel_narrower_than_every_gap_counts(seed: int) -> None:
    labels, scores = _random_set(seed)  # continuous scores: gaps far wider than 1e-9
    assert operating_point_threshold(labels, scores, 0.9, bandwidth=1e-9) == (
        operating_point_threshold(labels, scores, 0.9)
    )


def test_smoothing_lifts_the_threshold_out_of_the_bottom_of_a_gap() -> None:
    # Good images spread around 0, defects around 5, and one good image at 2.9 that a small
    # set leaves alone below a gap. Counted, the precision is highest just above it (3.0:
    # every defect above, one good fewer); the smoothed tails put the threshold higher,
    # where val's recall still meets the bound.
    goods = [-1.0, -0.5, 0.0, 0.2, 0.5, 1.0, 1.5, 2.9]
    defects = [3.0, 3.4, 3.8, 4.2, 4.6, 5.0, 5.4, 5.8, 6.2, 6.6]
    labels = [0] * len(goods) + [1] * len(defects)
    counted = operating_point_threshold(labels, goods + defects, 0.8)
    smoothed = operating_point_threshold(labels, goods + defects, 0.8, bandwidth=0.5)
    assert counted == 3.0
    assert smoothed > 3.0
    assert classify_at(labels, goods + defects, smoothed).recall >= 0.8


@pytest.mark.parametrize("bandwidth", [-0.1, float("nan"), float("inf")])
def test_bandwidth_must_be_finite_and_not_negative(bandwidth: float) -> None:
    with pytest.raises(MetricInputError, match="bandwidth"):
        operating_point_threshold([0, 1], [0.1, 0.9], 0.9, bandwidth=bandwidth)


def test_silverman_bandwidth_follows_the_scale_of_the_scores() -> None:
    x = np.random.default_rng(0).normal(size=500)
    h = silverman_bandwidth(x)
    iqr = np.subtract(*np.percentile(x, [75, 25]))
    assert h == pytest.approx(0.9 * min(x.std(), iqr / 1.34) * 500 ** -0.2)
    assert silverman_bandwidth(3.0 * x + 7.0) == pytest.approx(3.0 * h)
    assert silverman_bandwidth(np.full(10, 2.5)) == 0.0
    assert silverman_bandwidth([1.0]) == 0.0


def test_operating_point_prefers_higher_recall_then_higher_threshold() -> None:
    # Thresholds 0.2 and 0.4 both give precision 1.0; 0.2 has the higher recall.
    labels = [0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.4, 0.6, 0.8]
    assert operating_point_threshold(labels, scores, min_recall=0.5) == 0.2


def test_f1_max_step_and_constant_scores() -> None:
    labels, scores = [0, 0, 1, 1], [0.0, 1.0, 3.0, 4.0]
    # Grid 0, 0.5, 1 over [0, 4]: thresholds 0, 2, 4; F1 is best at 2.
    assert f1_max_threshold(labels, scores, step=0.5) == 2.0
    assert f1_max_threshold([0, 1], [0.3, 0.3]) == 0.3
    with pytest.raises(MetricInputError, match="step"):
        f1_max_threshold(labels, scores, step=0.0)


def test_rules_need_both_classes() -> None:
    for rule in (f1_max_threshold, youden_threshold, operating_point_threshold, fit_thresholds):
        with pytest.raises(MetricInputError, match="only good"):
            rule([0, 0], [0.1, 0.2])


def test_fit_thresholds_and_json_round_trip() -> None:
    labels, scores = _random_set(4)
    fitted = fit_thresholds(labels, scores, min_recall=0.8)
    assert fitted.operating_point == operating_point_threshold(labels, scores, 0.8)
    assert fitted.f1_max == f1_max_threshold(labels, scores)
    assert fitted.youden == youden_threshold(labels, scores)
    assert (fitted.n_good, fitted.n_defect) == (int(np.sum(labels == 0)), int(np.sum(labels)))
    for rule in ("operating_point", "f1_max", "youden"):
        assert fitted.for_rule(rule) == getattr(fitted, rule)
    assert ThresholdSet.model_validate_json(fitted.model_dump_json()) == fitted


def test_version_is_a_content_hash() -> None:
    a = fit_thresholds([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    b = fit_thresholds([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    c = fit_thresholds([0, 0, 1, 1], [0.1, 0.2, 0.6, 0.9])
    assert a.version == b.version != c.version
    assert len(a.version) == 12 and int(a.version, 16) >= 0


def test_hand_edited_threshold_with_stale_version_is_rejected() -> None:
    stored = json.loads(fit_thresholds([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9]).model_dump_json())
    stored["operating_point"] = 0.5
    with pytest.raises(ValidationError, match="does not match"):
        ThresholdSet.model_validate(stored)
    del stored["version"]
    assert ThresholdSet.model_validate(stored).operating_point == 0.5


def test_threshold_set_rejects_non_finite() -> None:
    with pytest.raises(ValidationError, match="finite"):
        ThresholdSet(
            operating_point=float("inf"), f1_max=0.5, youden=0.5, min_recall=0.9,
            n_good=1, n_defect=1,
        )
