"""Calibration (``linewatch calibrate``): normalisation, term weights and thresholds from ``val``.

One pass of the networks over ``val`` gives every term's map for every image; then

1. per-term normalisation (method.md §3) on the *good* ``val`` images: for each term the
   model can compute, the mean and std of its per-image score (max or top-k mean of the
   smoothed map), so the joint map is ``sum_t w_t (A_t - mean_t) / std_t``;
2. the term weights "set on validation data" (method.md §3): a small grid search over the
   terms the settings weight (each weight in {0, 1/4, 1/2, 1}, the largest 1) for the val
   image AUROC, conservative about weak terms and small gains (see :func:`search_weights`);
3. the three threshold rules (method.md §4) on all ``val`` images in those normalised units;
   the fixed operating point (highest precision at recall >= 0.90) is the line's default.
   Its precision also counts ``calibration_exposure.copies`` exposure-jittered copies of
   each val image (their recall does not count): a small clean val set leaves gaps between
   its good images' scores, and the rule would otherwise put the threshold at the bottom
   of such a gap, just above a good image, where a drifting exposure finds false alarms.
   For the same reason the precision is estimated from kernel-smoothed counts of the good
   and defective scores (``operating_point_bandwidth``; Silverman's rule by default), so
   it follows the tails of the two score distributions rather than the chance positions
   of single good images (:func:`linewatch.metrics.thresholds.operating_point_threshold`).

All three are stored in the model file's metadata; the weights of the networks are not
touched.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from tqdm import tqdm

from linewatch.data.images import read_image
from linewatch.data.mvtec import MVTecDataset, Sample
from linewatch.errors import DataError
from linewatch.log import get_logger
from linewatch.metrics.ranking import auroc, pr_auc
from linewatch.metrics.thresholds import ThresholdSet, fit_thresholds, silverman_bandwidth
from linewatch.model.acceleration import load_served_scorer
from linewatch.model.aspect import split_aspects
from linewatch.model.joint import Normalisation, ShapeGroups, TermNorm, raise_by_frame_mean
from linewatch.model.modelfile import update_model_meta
from linewatch.model.preprocess import jitter_exposure
from linewatch.model.scorer import Prepared, Region, Scorer, crop_reduce, shape_standardised
from linewatch.model.settings import ModelSettings, ScoreWeights

__all__ = [
    "AUROC_TOLERANCE",
    "EXPOSURE_COPIES_SEED",
    "TERM_FLOOR",
    "WEIGHT_GRID",
    "CalibrationReport",
    "TermMaps",
    "calibrate",
    "calibrate_scorer",
    "collect_term_maps",
    "exposure_drift_scores",
    "fit_normalisation",
    "search_weights",
    "smoothing_bandwidth",
]

log = get_logger("calibrate")

# A term whose score barely varies over good images would be blown up by 1/std.
_MIN_SCALE = 1e-6
# Good val images a group of frame shapes needs for its median and MAD to mean something.
MIN_GOODS_PER_SHAPE_GROUP = 20
# Candidate weights of each term in the search; the largest weight is always 1 (scale-free).
WEIGHT_GRID = (0.0, 0.25, 0.5, 1.0)
# A term must separate val this well on its own to take part in the weight search.
TERM_FLOOR = 0.75
# Combinations this close to the best val AUROC count as equal; the simplest one wins.
AUROC_TOLERANCE = 0.005
_CHUNK = 64
# Seed of the exposure-jittered val copies: fixed, so a calibration can be repeated exactly.
EXPOSURE_COPIES_SEED = 20261129


class CalibrationReport(BaseModel):
    """What calibration fitted and how well the val split separates."""

    model_config = ConfigDict(extra="forbid")

    model_path: str
    normalisation: Normalisation
    thresholds: ThresholdSet
    val_auroc: float
    val_pr_auc: float
    term_auroc: dict[str, float]
    n_good: int
    n_defect: int
    exposure_copies: int = Field(
        description="exposure-jittered copies of each val image in the operating point's precision"
    )


@dataclass
class TermMaps:
    """Every term's (position-normalised, unsmoothed) map of a set of images, on the CPU."""

    maps: dict[str, Tensor]
    regions: list[Region]

    def chunks(self) -> Iterator[tuple[dict[str, Tensor], list[Region]]]:
        """The maps in chunks, to bound the memory of smoothing at input resolution."""
        n = len(self.regions)
        for start in range(0, n, _CHUNK):
            stop = min(start + _CHUNK, n)
            yield {t: m[start:stop] for t, m in self.maps.items()}, self.regions[start:stop]

    def select(self, rows: np.ndarray) -> TermMaps:
        """The images at ``rows``."""
        idx = np.flatnonzero(rows)
        maps = {t: m[torch.from_numpy(idx)] for t, m in self.maps.items()}
        return TermMaps(maps, [self.regions[i] for i in idx])


def collect_term_maps(scorer: Scorer, batches: Iterable[Prepared]) -> TermMaps:
    """Run the networks once over ``batches`` and keep every available term's map."""
    model = scorer.model
    terms = model.available_terms()
    parts: dict[str, list[Tensor]] = {t: [] for t in terms}
    regions: list[Region] = []
    with torch.inference_mode():
        for prep in batches:
            raw = model.term_maps(model(prep.x, prep.feats, terms, prep.aspects), terms)
            for t in terms:
                parts[t].append(raw[t].float().cpu())
            regions += prep.regions
    if not regions:
        raise DataError("calibration got no images")
    return TermMaps({t: torch.cat(p) for t, p in parts.items()}, regions)


def _term_scores(scorer: Scorer, maps: TermMaps, term: str) -> np.ndarray:
    s = scorer.settings
    out = [
        crop_reduce(
            raise_by_frame_mean(scorer.model.smooth(m[term]), regions, s.frame_mean_weight),
            regions, s.reduce, s.topk_fraction,
        )
        for m, regions in maps.chunks()
    ]
    return torch.cat(out).numpy()


def _normalisation_from(scorer: Scorer, good: TermMaps, source: str) -> Normalisation:
    n = len(good.regions)
    if n < 2:
        raise DataError(f"normalisation needs at least 2 good images, got {n}")
    fitted = {}
    for term in good.maps:
        values = _term_scores(scorer, good, term).astype(np.float64)
        fitted[term] = TermNorm(
            offset=float(values.mean()), scale=max(float(values.std(ddof=1)), _MIN_SCALE)
        )
    return Normalisation(terms=fitted, source=source, n_images=n)


def fit_normalisation(scorer: Scorer, batches: Iterable[Prepared], source: str) -> Normalisation:
    """Mean/std of each available term's per-image score over good images ``batches``."""
    return _normalisation_from(scorer, collect_term_maps(scorer, batches), source)


def joint_scores(scorer: Scorer, maps: TermMaps, weights: ScoreWeights) -> np.ndarray:
    """Image scores of the joint map with ``weights`` (the model's normalisation in force)."""
    s = scorer.settings
    out = []
    with torch.inference_mode():
        for m, regions in maps.chunks():
            joint = shape_standardised(scorer.model.joint_map(m, regions, weights), regions,
                                       scorer.model.norm)
            out.append(crop_reduce(joint, regions, s.reduce, s.topk_fraction))
    return torch.cat(out).numpy()


def _candidates(terms: Sequence[str]) -> Iterator[ScoreWeights]:
    for combo in itertools.product(WEIGHT_GRID, repeat=len(terms)):
        if max(combo) == 1.0:
            yield ScoreWeights(**dict(zip(terms, combo, strict=True)))


def search_weights(
    scorer: Scorer, maps: TermMaps, labels: np.ndarray, term_auroc: dict[str, float]
) -> tuple[ScoreWeights, float, float]:
    """Term weights from the validation set, chosen conservatively.

    A few hundred val images cannot tell apart combinations that differ by a few thousandths
    of AUROC, and a near-chance term always finds *some* weight that helps on val by luck
    (measured: a pixel term of val AUROC 0.56 won +0.003 on val and cost -0.017 on test). So:
    terms whose own val AUROC is below :data:`TERM_FLOOR` are left out (the best single term
    is kept if none passes), and among the combinations within :data:`AUROC_TOLERANCE` of the
    best val AUROC the one with the fewest terms wins (then the higher AUROC, then PR-AUC).
    Returns the weights and their val AUROC and PR-AUC.
    """
    allowed = [t for t in scorer.model.settings.weights.active() if t in maps.maps]
    if not allowed:
        raise DataError("no weighted score term is available to calibrate")
    strong = [t for t in allowed if term_auroc[t] >= TERM_FLOOR]
    if not strong:
        strong = [max(allowed, key=lambda t: term_auroc[t])]
    results = []
    for weights in _candidates(strong):
        scores = joint_scores(scorer, maps, weights)
        results.append((auroc(labels, scores), pr_auc(labels, scores), weights))
    best = max(r[0] for r in results)
    near = [r for r in results if r[0] >= best - AUROC_TOLERANCE]
    chosen = min(near, key=lambda r: (len(r[2].active()), -r[0], -r[1]))
    return chosen[2], chosen[0], chosen[1]


def image_batches(
    scorer: Scorer,
    samples: Sequence[Sample],
    batch: int,
    progress: bool,
    desc: str,
    alter: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
) -> Iterator[Prepared]:
    """Read, pre-process and run the backbone on ``samples``, ``batch`` images at a time;
    ``alter`` (if given) changes each chunk of images first (e.g. jitters their exposure)."""
    with tqdm(total=len(samples), desc=desc, disable=not progress, unit="img") as bar:
        for start in range(0, len(samples), batch):
            chunk = samples[start : start + batch]
            images = [read_image(s.path) for s in chunk]
            yield scorer.prepare(alter(images) if alter is not None else images)
            bar.update(len(chunk))


def exposure_drift_scores(
    scorer: Scorer, samples: Sequence[Sample], labels: np.ndarray, batch: int, progress: bool
) -> tuple[np.ndarray, np.ndarray] | None:
    """Labels and joint scores of ``settings.calibration_exposure.copies`` exposure-jittered
    copies of ``samples``, under the scorer's normalisation in force; None with 0 copies.

    The draws come from a fixed seed, so calibrating a model twice gives the same thresholds.
    One copy's maps are held at a time.
    """
    cfg = scorer.settings.calibration_exposure
    if cfg.copies == 0:
        return None
    weights = scorer.model.norm.weights
    if weights is None:
        raise DataError("exposure drift scores need a calibrated normalisation")
    rng = np.random.default_rng(EXPOSURE_COPIES_SEED)
    scores = []
    for copy in range(cfg.copies):
        batches = image_batches(scorer, samples, batch, progress, f"exposure copy {copy + 1}",
                                alter=lambda images: jitter_exposure(images, rng, cfg))
        scores.append(joint_scores(scorer, collect_term_maps(scorer, batches), weights))
    return np.tile(labels, cfg.copies), np.concatenate(scores)


def calibrate_maps(
    scorer: Scorer,
    maps: TermMaps,
    labels: np.ndarray,
    min_recall: float = 0.9,
    drift: Callable[[], tuple[np.ndarray, np.ndarray] | None] | None = None,
) -> tuple[Normalisation, ThresholdSet, dict[str, float], float, float]:
    """Normalisation, weights and thresholds from the term maps of a labelled val set.

    ``drift`` gives labels and scores of the same images under other conditions once the
    scorer holds the fitted normalisation (:func:`exposure_drift_scores`); they join the
    operating point's precision.
    """
    good = labels == 0
    norm = _normalisation_from(scorer, maps.select(good), source="val/good")
    scorer.model.norm = norm
    term_auroc = {
        t: auroc(labels, joint_scores(scorer, maps, ScoreWeights(**{t: 1.0}))) for t in maps.maps
    }
    weights, val_auroc, val_pr_auc = search_weights(scorer, maps, labels, term_auroc)
    norm = norm.model_copy(update={"weights": weights})
    scorer.model.norm = norm
    scorer.refresh()
    scores = joint_scores(scorer, maps, weights)
    aspects = np.array([r.aspect for r in maps.regions])
    groups = fit_shape_groups(scores[good], aspects[good], scorer.settings.shape_groups)
    if groups is not None:
        norm = norm.model_copy(update={"shape_groups": groups})
        scorer.model.norm = norm
        scores = joint_scores(scorer, maps, weights)
        val_auroc, val_pr_auc = auroc(labels, scores), pr_auc(labels, scores)
    drifted = drift() if drift is not None else None
    bandwidth = smoothing_bandwidth(scorer.settings, labels, scores, drifted)
    thresholds = fit_thresholds(labels, scores, min_recall=min_recall, drift=drifted,
                                bandwidth=bandwidth)
    log.info("operating_point_fitted", operating_point=round(thresholds.operating_point, 4),
             bandwidth=round(bandwidth, 4), drift_images=0 if drifted is None else len(drifted[0]))
    return norm, thresholds, term_auroc, val_auroc, val_pr_auc


def smoothing_bandwidth(
    settings: ModelSettings,
    labels: np.ndarray,
    scores: np.ndarray,
    drift: tuple[np.ndarray, np.ndarray] | None,
) -> float:
    """The kernel width of the operating point's precision: ``operating_point_bandwidth``,
    or when that is None Silverman's rule on the good scores of val and its ``drift`` copies."""
    if settings.operating_point_bandwidth is not None:
        return settings.operating_point_bandwidth
    good = [scores[labels == 0]]
    if drift is not None:
        good.append(drift[1][drift[0] == 0])
    return silverman_bandwidth(np.concatenate(good))


def fit_shape_groups(scores: np.ndarray, aspects: np.ndarray, groups: int) -> ShapeGroups | None:
    """Median of good images' joint ``scores`` per group of frame ``aspects``, and the MAD
    of the scores so centred.

    At most ``groups`` groups, split near quantiles of ``aspects``; fewer while a group would
    hold under :data:`MIN_GOODS_PER_SHAPE_GROUP` images or there are not that many distinct
    aspects; None when one group is all there is (then nothing changes).

    >>> rng = np.random.default_rng(0)
    >>> aspects = np.repeat([0.5, 1.5], 30)
    >>> scores = np.concatenate([rng.normal(2.0, 1.0, 30), rng.normal(0.0, 1.0, 30)])
    >>> fitted = fit_shape_groups(scores, aspects, 2)
    >>> fitted.edges, [round(c) for c in fitted.centre]
    ([1.0], [2, 0])
    >>> fit_shape_groups(scores, np.ones(60), 2) is None  # one shape: one group
    True
    """
    for k in range(min(groups, len(scores) // MIN_GOODS_PER_SHAPE_GROUP), 1, -1):
        edges = split_aspects(aspects, k)
        if edges is None:
            continue
        members = np.searchsorted(edges, aspects, side="right")  # as ShapeGroups.group
        if np.bincount(members, minlength=k).min() < MIN_GOODS_PER_SHAPE_GROUP:
            continue
        centre = [float(np.median(scores[members == g])) for g in range(k)]
        centred = scores - np.asarray(centre)[members]
        scale = max(1.4826 * float(np.median(np.abs(centred))), _MIN_SCALE)
        return ShapeGroups(edges=[float(e) for e in edges], centre=centre, scale=scale)
    return None


def calibrate_scorer(
    path: str | Path,
    dataset: MVTecDataset,
    device: str = "auto",
    batch: int = 8,
    progress: bool = True,
    min_recall: float = 0.9,
) -> CalibrationReport:
    """Fit normalisation, weights and thresholds of the model at ``path`` on ``val``."""
    path = Path(path)
    if "val" not in dataset.splits():
        raise DataError(f"{dataset.root}: calibration needs a val split (good and defective)")
    samples = dataset.validate("val")
    labels = np.array([int(s.is_defect) for s in samples])
    if labels.all() or not labels.any():
        raise DataError(f"{dataset.root / 'val'}: calibration needs good and defective images")
    scorer = load_served_scorer(path, device)
    maps = collect_term_maps(scorer, image_batches(scorer, samples, batch, progress, "calibrate"))
    norm, thresholds, term_auroc, val_auroc, val_pr_auc = calibrate_maps(
        scorer, maps, labels, min_recall,
        drift=lambda: exposure_drift_scores(scorer, samples, labels, batch, progress),
    )
    update_model_meta(
        path,
        normalisation=norm.model_dump(mode="json"),
        thresholds=thresholds.model_dump(mode="json"),
    )
    report = CalibrationReport(
        model_path=str(path),
        normalisation=norm,
        thresholds=thresholds,
        val_auroc=val_auroc,
        val_pr_auc=val_pr_auc,
        term_auroc=term_auroc,
        n_good=int((labels == 0).sum()),
        n_defect=int(labels.sum()),
        exposure_copies=scorer.settings.calibration_exposure.copies,
    )
    log.info(
        "calibrated",
        path=str(path),
        val_auroc=round(val_auroc, 4),
        weights=norm.weights.model_dump() if norm.weights else None,
        term_auroc={t: round(v, 4) for t, v in term_auroc.items()},
        operating_point=round(thresholds.operating_point, 4),
        exposure_copies=report.exposure_copies,
        version=thresholds.version,
    )
    return report


def calibrate(
    path: str | Path,
    data: str | Path,
    device: str = "auto",
    batch: int = 8,
    progress: bool = True,
) -> CalibrationReport:
    """``linewatch calibrate MODEL DATA``: see the module docstring."""
    return calibrate_scorer(path, MVTecDataset(data), device, batch, progress)
