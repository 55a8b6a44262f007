"""Ranking, pixel and classification metrics against scikit-learn and slow references."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from linewatch.errors import DataError
from linewatch.metrics import (
    MetricInputError,
    aupro,
    auroc,
    classification,
    classify_at,
    pixel,
    pixel_auroc,
    pr_auc,
    pr_curve,
    ranking,
    region_iou,
    roc_curve,
)

SEEDS = range(12)


def _random_set(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with both classes and scores; odd seeds use few distinct values (many ties)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = rng.integers(0, 2, n)
    labels[:2] = (0, 1)
    rng.shuffle(labels)
    if seed % 2:
        scores = rng.integers(0, int(rng.integers(2, 12)), n).astype(np.float64)
    else:
        scores = rng.normal(labels * 0.7, 1.0, n)
    return labels, scores


@pytest.mark.parametrize("module", [ranking, classification, pixel])
def test_doctests(module: object) -> None:
    result = doctest.testmod(module, raise_on_error=False)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_roc_curve_matches_sklearn(seed: int) -> None:
    labels, scores = _random_set(seed)
    for drop in (True, False):
        ours = roc_curve(labels, scores, drop_intermediate=drop)
        ref = skm.roc_curve(labels, scores, drop_intermediate=drop)
        for a, b in zip(ours, ref, strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_pr_curve_matches_sklearn(seed: int) -> None:
    labels, scores = _random_set(seed)
    ours = pr_curve(labels, scores)
    ref = skm.precision_recall_curve(labels, scores)
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_areas_match_sklearn(seed: int) -> None:
    labels, scores = _random_set(seed)
    assert auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-9)
    ap = skm.average_precision_score(labels, scores)
    assert pr_auc(labels, scores) == pytest.approx(ap, abs=1e-9)


def test_all_tied_scores_give_chance_auroc() -> None:
    labels = np.array([0, 1, 0, 1, 1])
    assert auroc(labels, np.full(5, 0.3)) == 0.5
    assert pr_auc(labels, np.full(5, 0.3)) == pytest.approx(0.6)


def test_ranking_accepts_bool_labels_and_integer_scores() -> None:
    labels = np.array([False, True, False, True])
    assert auroc(labels, np.array([1, 3, 2, 4], dtype=np.uint8)) == 1.0


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], "only good"),
        ([1, 1], [0.1, 0.2], "only defect"),
        ([0, 1], [0.1], "2 labels but 1 scores"),
        ([0, 2], [0.1, 0.2], "0 \\(good\\) or 1"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([], [], "no labels"),
    ],
)
def test_bad_inputs_raise_one_line_errors(labels: list, scores: list, match: str) -> None:
    for fn in (roc_curve, auroc, pr_curve, pr_auc):
        with pytest.raises(MetricInputError, match=match) as info:
            fn(labels, scores)
        assert isinstance(info.value, ValueError) and isinstance(info.value, DataError)
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------- classification


@pytest.mark.parametrize("seed", SEEDS)
def test_classify_at_matches_sklearn(seed: int) -> None:
    labels, scores = _random_set(seed)
    threshold = float(np.median(scores))
    report = classify_at(labels, scores, threshold)
    pred = (scores >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    assert (report.tp, report.fp, report.tn, report.fn) == (tp, fp, tn, fn)
    assert report.precision == pytest.approx(skm.precision_score(labels, pred, zero_division=0))
    assert report.recall == pytest.approx(skm.recall_score(labels, pred, zero_division=0))
    assert report.f1 == pytest.approx(skm.f1_score(labels, pred, zero_division=0))
    assert report.false_alarm_rate == pytest.approx(fp / (fp + tn))


def test_classify_at_defines_empty_ratios_as_zero() -> None:
    # Nothing flagged and no good images: precision and false-alarm rate are 0/0.
    report = classify_at([1, 1], [0.1, 0.2], threshold=0.5)
    assert (report.tp, report.fp, report.tn, report.fn) == (0, 0, 0, 2)
    assert (report.precision, report.recall, report.f1, report.false_alarm_rate) == (0, 0, 0, 0)


def test_classify_at_counts_equal_score_as_defect() -> None:
    report = classify_at([0, 1], [0.5, 0.5], threshold=0.5)
    assert (report.tp, report.fp) == (1, 1)


# ----------------------------------------------------------------------- pixel AUROC


def _random_maps(
    seed: int, n: int = 6, shape: tuple[int, int] = (24, 32)
) -> tuple[np.ndarray, np.ndarray]:
    """Masks with a few blobs and float32 maps; even seeds quantise maps (many ties)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, *shape), dtype=np.uint8)
    for mask in masks[: n - 1]:  # the last image is defect-free
        for _ in range(int(rng.integers(1, 4))):
            y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
            h, w = rng.integers(1, 6, 2)
            mask[y : y + h, x : x + w] = 255
    maps: np.ndarray = (rng.random((n, *shape)) + 0.6 * (masks > 0)).astype(np.float32)
    if seed % 2 == 0:
        maps = np.round(maps * 8) / 8
    return masks, maps


@pytest.mark.parametrize("seed", SEEDS)
def test_pixel_auroc_matches_sklearn(seed: int) -> None:
    masks, maps = _random_maps(seed)
    ref = skm.roc_auc_score((masks > 0).ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(ref, abs=1e-9)
    # The other class is the smaller one when the defects cover most pixels.
    assert pixel_auroc(255 - masks, -maps) == pytest.approx(ref, abs=1e-9)


def test_pixel_auroc_takes_lists_of_different_sizes() -> None:
    rng = np.random.default_rng(3)
    masks = [rng.integers(0, 2, (5, 7)), rng.integers(0, 2, (9, 4))]
    maps: list[np.ndarray] = [rng.random((5, 7)), rng.integers(0, 4, (9, 4)).astype(np.uint8)]
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([m.ravel().astype(np.float64) for m in maps])
    ref = skm.roc_auc_score(flat_masks, flat_maps)
    assert pixel_auroc(masks, maps) == pytest.approx(ref, abs=1e-9)


def test_pixel_metrics_reject_bad_inputs() -> None:
    good = np.zeros((2, 4, 4))
    with pytest.raises(MetricInputError, match="only good"):
        pixel_auroc(good, good)
    with pytest.raises(MetricInputError, match="shape"):
        pixel_auroc([np.ones((4, 4))], [np.ones((4, 5))])
    with pytest.raises(MetricInputError, match="N x H x W stack"):
        pixel_auroc(np.eye(4), np.eye(4))
    with pytest.raises(MetricInputError, match="2 masks but 1 maps"):
        aupro(np.ones((2, 4, 4)), np.ones((1, 4, 4)))
    mask = np.eye(4)
    with pytest.raises(MetricInputError, match="NaN"):
        aupro([mask], [np.full((4, 4), np.nan)])


# ----------------------------------------------------------------------- AUPRO


def _slow_pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve by definition: one pass over all pixels per distinct threshold."""
    regions = []
    for mask, amap in zip(masks, maps, strict=True):
        labels, k = ndimage.label(mask > 0, structure=np.ones((3, 3)))
        regions += [amap[labels == i] for i in range(1, k + 1)]
    good = maps[masks == 0]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(float(np.mean(good >= t)))
        pros.append(float(np.mean([np.mean(r >= t) for r in regions])))
    return np.array(fprs), np.array(pros)


def _slow_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoids segment by segment, the last one cut at ``limit`` by linear interpolation."""
    area = 0.0
    for x0, x1, y0, y1 in zip(x[:-1], x[1:], y[:-1], y[1:], strict=True):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_lim) / 2
    return area / limit


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_matches_slow_reference(seed: int, limit: float) -> None:
    masks, maps = _random_maps(seed)
    fpr, pro = _slow_pro_curve(masks, maps)
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(
        _slow_area(fpr, pro, limit), abs=1e-9
    )


def test_aupro_known_values() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:3, 1:3] = True  # region A, 4 pixels
    mask[6:9, 6:9] = True  # region B, 9 pixels
    assert aupro([mask], [mask.astype(np.float32)]) == 1.0
    assert aupro([mask], [(~mask).astype(np.float32)]) == 0.0
    # A flat map: PRO equals FPR, the area up to 0.3 is 0.3^2 / 2.
    assert aupro([mask], [np.zeros((10, 10))]) == pytest.approx(0.15)
    # Region A found without false alarms, B scored as the good pixels: the curve
    # runs (0, 0) -> (0, 0.5) -> (1, 1), so the area up to 0.3 is 0.3 (0.5 + 0.65) / 2.
    assert aupro([mask], [np.where(mask & (np.arange(10) < 5), 1.0, 0.0)]) == pytest.approx(
        0.575
    )


def test_aupro_counts_regions_not_pixels() -> None:
    # A one-pixel region missed weighs as much as a large region found.
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[0, 0] = 1
    mask[10:20, 10:20] = 1
    amap = np.where(mask, 1.0, 0.5)
    amap[0, 0] = 0.0
    assert aupro([mask], [amap]) == pytest.approx(0.5)
    assert pixel_auroc([mask], [amap]) > 0.99


def test_aupro_uses_eight_connectivity() -> None:
    # Two diagonal pixels are one region (found), a lone pixel another (missed):
    # PRO 0.5 at FPR 0 as MVTec counts; 4-connectivity would make it 2/3.
    mask = np.zeros((6, 6), dtype=np.uint8)
    mask[1, 1] = mask[2, 2] = mask[4, 5] = 1
    amap = np.zeros((6, 6))
    amap[1, 1] = amap[2, 2] = 1.0
    assert aupro([mask], [amap]) == pytest.approx(0.575)


@pytest.mark.parametrize("seed", range(4))
def test_aupro_binned_is_exact_on_a_grid_of_all_values(seed: int) -> None:
    # Maps on 0, 1/16, ..., 1 and 17 thresholds on [0, 1]: every distinct score is an edge.
    masks, maps = _random_maps(seed)
    maps = np.round(np.clip(maps / maps.max(), 0, 1) * 16) / 16
    maps[0, 0, 0], maps[0, 0, 1] = 0.0, 1.0
    assert aupro(masks, maps, num_thresholds=17) == pytest.approx(aupro(masks, maps), abs=1e-12)


def test_aupro_binned_converges_to_exact() -> None:
    masks, maps = _random_maps(1)
    exact = aupro(masks, maps)
    assert aupro(masks, maps, num_thresholds=20000) == pytest.approx(exact, abs=2e-3)


# ----------------------------------------------------------------------- region IoU


def test_region_iou() -> None:
    a = np.zeros((4, 4), dtype=bool)
    b = np.zeros((4, 4), dtype=np.uint8)
    assert region_iou(a, b) == 1.0
    a[0, :2] = True
    assert region_iou(a, b) == 0.0
    b[0, 1:4] = 255
    assert region_iou(a, b) == pytest.approx(1 / 4)
    assert region_iou(a, b) == pytest.approx(skm.jaccard_score(b.ravel() > 0, a.ravel()))
    with pytest.raises(MetricInputError, match="differ"):
        region_iou(a, np.zeros((3, 3)))
