"""Pixel-level metrics: pixel AUROC, AUPRO (MVTec AD) and region IoU.

Maps and masks come as a stack (N x H x W array) or a sequence of H x W
arrays; each map has the shape of its mask (resize maps before scoring).
A mask pixel is *defect* where it is non-zero. A data set of 500 maps of
256 x 256 is 33 M pixels, so nothing here sorts or copies all of them in
float64: pixel AUROC sorts only the smaller class, AUPRO only the pixels
above its integration limit (or bins them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from scipy import ndimage

from linewatch.metrics.ranking import MetricInputError

MapStack = np.ndarray | Sequence[np.ndarray]

# 8-connectivity, as MVTec's evaluation code labels ground-truth regions.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _pairs(masks: MapStack, maps: MapStack) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(defect mask as bool, map) per image, checked for shape, dtype and finiteness."""
    for name, stack in (("masks", masks), ("maps", maps)):
        if isinstance(stack, np.ndarray) and stack.ndim != 3:
            raise MetricInputError(
                f"{name} must be an N x H x W stack or a list of H x W arrays, "
                f"got an array of shape {stack.shape}"
            )
    if len(masks) != len(maps):
        raise MetricInputError(f"{len(masks)} masks but {len(maps)} maps")
    if len(masks) == 0:
        raise MetricInputError("no masks and maps given")
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        m, a = np.asarray(mask), np.asarray(amap)
        if m.ndim != 2 or m.shape != a.shape:
            raise MetricInputError(
                f"image {i}: mask {m.shape} and map {a.shape} must be one H x W shape"
            )
        if not np.issubdtype(a.dtype, np.integer) and not np.issubdtype(a.dtype, np.floating):
            raise MetricInputError(f"image {i}: map dtype {a.dtype} is not a real number type")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise MetricInputError(f"image {i}: map holds NaN or inf")
        yield m != 0, a


def _class_sizes(masks: MapStack, maps: MapStack) -> tuple[int, int, np.dtype]:
    """(defect pixels, good pixels, a dtype holding every map exactly)."""
    n_defect = n_good = 0
    dtypes = []
    for m, a in _pairs(masks, maps):
        k = int(np.count_nonzero(m))
        n_defect, n_good = n_defect + k, n_good + m.size - k
        dtypes.append(a.dtype)
    if n_defect == 0 or n_good == 0:
        only = "defect" if n_defect else "good"
        raise MetricInputError(f"masks hold only {only} pixels: pixel metrics need both")
    return n_defect, n_good, np.result_type(*dtypes)


def pixel_auroc(masks: MapStack, maps: MapStack) -> float:
    """AUROC of all pixels of all maps pooled, exact with ties counting one half.

    Computed as Mann-Whitney's U: the smaller class is sorted once and every
    pixel of the other class is located in it by binary search, image by
    image. Equal to ``sklearn.metrics.roc_auc_score`` on the flattened pixels.

    >>> mask = np.array([[0, 0], [1, 1]])
    >>> pixel_auroc([mask], [np.array([[0.1, 0.5], [0.5, 0.9]])])
    0.875
    """
    n_defect, n_good, dtype = _class_sizes(masks, maps)
    sort_defects = n_defect <= n_good
    small = np.sort(
        np.concatenate([a[m if sort_defects else ~m] for m, a in _pairs(masks, maps)]).astype(
            dtype, copy=False
        )
    )
    # For each pixel of the other class: (#sorted below it) + (#sorted at or below it),
    # which is twice its count of pairs it wins, ties one half. Integers: exact.
    rank_sum = 0
    for m, a in _pairs(masks, maps):
        other = a[~m if sort_defects else m].astype(dtype, copy=False)
        rank_sum += int(np.searchsorted(small, other, side="left").sum(dtype=np.int64))
        rank_sum += int(np.searchsorted(small, other, side="right").sum(dtype=np.int64))
    # U: (defect, good) pairs with the defect scored higher, ties one half.
    u = n_defect * n_good - rank_sum / 2 if sort_defects else rank_sum / 2
    return float(u / (n_defect * n_good))


def region_iou(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
    """Intersection over union of predicted and true defect pixels (non-zero = defect).

    Both empty is a correct "no defect", so it scores 1.0.

    >>> region_iou(np.array([[1, 1, 0]]), np.array([[0, 1, 1]]))
    0.3333333333333333
    """
    pred, true = np.asarray(pred_mask) != 0, np.asarray(true_mask) != 0
    if pred.shape != true.shape:
        raise MetricInputError(f"predicted mask {pred.shape} and true mask {true.shape} differ")
    union = int(np.count_nonzero(pred | true))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred & true)) / union


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per pixel ``1 / (size of its ground-truth region)``, 0 on good pixels; region count.

    Summed over the pixels scoring above a threshold, this is the sum over
    regions of the fraction of each region found: the numerator of PRO.
    """
    labels, n_regions = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=n_regions + 1)
    inverse = np.zeros(n_regions + 1)
    inverse[1:] = 1.0 / sizes[1:]
    return inverse[labels], n_regions


def _fpr_floor(masks: MapStack, maps: MapStack, fpr_limit: float, n_good: int) -> float:
    """A score whose FPR (good pixels at or above it) is at least ``fpr_limit``.

    Pixels below it cannot change the PRO curve up to ``fpr_limit``.
    """
    good = np.concatenate([a[~m].ravel() for m, a in _pairs(masks, maps)])
    # One extra pixel guards against rounding in fpr_limit * n_good.
    k = min(n_good, int(np.ceil(fpr_limit * n_good)) + 1)
    return float(np.partition(good, n_good - k)[n_good - k])


def _pro_curve_exact(
    masks: MapStack, maps: MapStack, floor: float, n_good: int
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score >= ``floor``, highest score first, from (0, 0)."""
    scores, good, overlap = [], [], []
    n_regions = 0
    for m, a in _pairs(masks, maps):
        weights, k = _region_weights(m)
        n_regions += k
        keep = a >= floor
        scores.append(a[keep])
        good.append(~m[keep])
        overlap.append(weights[keep])
    s = np.concatenate(scores)
    order = np.argsort(s, kind="stable")[::-1]
    s = s[order]
    # The last pixel of each run of equal scores: ties cross a threshold together.
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    fpr = np.cumsum(np.concatenate(good)[order], dtype=np.int64)[last_of_run] / n_good
    pro = np.cumsum(np.concatenate(overlap)[order])[last_of_run] / n_regions
    return np.r_[0.0, fpr], np.r_[0.0, np.minimum(pro, 1.0)]


def _pro_curve_binned(
    masks: MapStack, maps: MapStack, num_thresholds: int, n_good: int
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at ``num_thresholds`` thresholds evenly spaced over the score range.

    Image by image, so memory does not grow with the data set.
    """
    lo = min(float(a.min()) for _, a in _pairs(masks, maps))
    hi = max(float(a.max()) for _, a in _pairs(masks, maps))
    edges = np.linspace(lo, hi, num_thresholds)
    good = np.zeros(num_thresholds)
    overlap = np.zeros(num_thresholds)
    n_regions = 0
    for m, a in _pairs(masks, maps):
        weights, k = _region_weights(m)
        n_regions += k
        # Bin j holds the pixels at or above edge j and below edge j + 1.
        bins = np.searchsorted(edges, a.ravel(), side="right") - 1
        good += np.bincount(bins, weights=~m.ravel(), minlength=num_thresholds)
        overlap += np.bincount(bins, weights=weights.ravel(), minlength=num_thresholds)
    # At edge j, the pixels of bins j and above are called defect; highest edge first.
    fpr = np.cumsum(good[::-1]) / n_good
    pro = np.cumsum(overlap[::-1]) / n_regions
    return np.r_[0.0, fpr], np.r_[0.0, np.minimum(pro, 1.0)]


def _area_until(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) for x in [0, x_max]; x ascending and reaching x_max.

    y at x_max is interpolated between its neighbours, as MVTec's ``trapezoid``.
    """
    ins = int(np.searchsorted(x, x_max, side="right"))
    area = float(np.sum(0.5 * (y[1:ins] + y[: ins - 1]) * np.diff(x[:ins])))
    if x[ins - 1] < x_max:
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        area += float(0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1]))
    return area


def aupro(
    masks: MapStack,
    maps: MapStack,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by it (MVTec AD).

    Ground-truth regions are the 8-connected components of each mask. At a
    threshold t, PRO is the mean over all regions of the data set of the
    fraction of the region's pixels scoring >= t; FPR is the fraction of all
    defect-free pixels scoring >= t. The curve runs over every distinct score
    (``num_thresholds=None``, as MVTec's evaluation code) or over
    ``num_thresholds`` evenly spaced thresholds (bounded memory, as anomalib's
    binned mode), and is integrated with the trapezoidal rule.

    >>> mask = np.zeros((4, 4), dtype=np.uint8); mask[:2, :2] = 1
    >>> aupro([mask], [mask.astype(float)])
    1.0
    >>> round(aupro([mask], [np.ones((4, 4))]), 6)  # a flat map: PRO = FPR, area 0.3^2 / 2
    0.15
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise MetricInputError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds is not None and num_thresholds < 2:
        raise MetricInputError(f"num_thresholds must be at least 2, got {num_thresholds}")
    _, n_good, _ = _class_sizes(masks, maps)
    if num_thresholds is None:
        floor = _fpr_floor(masks, maps, fpr_limit, n_good)
        fpr, pro = _pro_curve_exact(masks, maps, floor, n_good)
    else:
        fpr, pro = _pro_curve_binned(masks, maps, num_thresholds, n_good)
    return float(_area_until(fpr, pro, fpr_limit) / fpr_limit)
