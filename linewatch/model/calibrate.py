"""Calibration (``linewatch calibrate``): score normalisation and thresholds from ``val``.

1. Per-term normalisation (method.md §3) on the *good* ``val`` images: for every term the
   model can compute, the mean and std of its per-image score (max or top-k mean of the
   smoothed map). The joint map is then ``sum_t w_t (A_t - mean_t) / std_t``.
2. The three threshold rules (method.md §4) on all ``val`` images, good and defective, in
   those normalised units; the fixed operating point (highest precision at recall >= 0.90)
   is the line's default rule.

Both are stored in the model file's metadata; the weights are not touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from linewatch.data.images import read_image
from linewatch.data.mvtec import MVTecDataset, Sample
from linewatch.errors import DataError
from linewatch.log import get_logger
from linewatch.metrics.ranking import auroc
from linewatch.metrics.thresholds import ThresholdSet, fit_thresholds
from linewatch.model.joint import Normalisation, TermNorm
from linewatch.model.modelfile import update_model_meta
from linewatch.model.scorer import Prepared, Scorer

__all__ = ["CalibrationReport", "calibrate", "calibrate_scorer", "fit_normalisation"]

log = get_logger("calibrate")

# A term whose score barely varies over good images would be blown up by 1/std.
_MIN_SCALE = 1e-6


class CalibrationReport(BaseModel):
    """What calibration fitted and how well the val split separates."""

    model_config = ConfigDict(extra="forbid")

    model_path: str
    normalisation: Normalisation
    thresholds: ThresholdSet
    val_auroc: float
    n_good: int
    n_defect: int


def fit_normalisation(scorer: Scorer, batches: Iterable[Prepared], source: str) -> Normalisation:
    """Mean/std of each available term's per-image score over good images."""
    terms = scorer.model.available_terms()
    collected: dict[str, list[np.ndarray]] = {t: [] for t in terms}
    for prep in batches:
        for term, scores in scorer.term_scores(prep, terms).items():
            collected[term].append(scores.float().cpu().numpy())
    fitted: dict[str, TermNorm] = {}
    n = 0
    for term, parts in collected.items():
        values = np.concatenate(parts).astype(np.float64)
        n = len(values)
        if n < 2:
            raise DataError(f"normalisation needs at least 2 good images, got {n}")
        fitted[term] = TermNorm(
            offset=float(values.mean()), scale=max(float(values.std(ddof=1)), _MIN_SCALE)
        )
    return Normalisation(terms=fitted, source=source, n_images=n)


def image_batches(
    scorer: Scorer, samples: Sequence[Sample], batch: int, progress: bool, desc: str
) -> Iterator[Prepared]:
    """Read, pre-process and run the backbone on ``samples``, ``batch`` images at a time."""
    with tqdm(total=len(samples), desc=desc, disable=not progress, unit="img") as bar:
        for start in range(0, len(samples), batch):
            chunk = samples[start : start + batch]
            yield scorer.prepare([read_image(s.path) for s in chunk])
            bar.update(len(chunk))


def joint_scores(scorer: Scorer, batches: Iterable[Prepared]) -> np.ndarray:
    """Normalised joint image scores of every image in ``batches``."""
    parts = [scorer.score_prepared(prep)[1].float().cpu().numpy() for prep in batches]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def calibrate_scorer(
    path: str | Path,
    dataset: MVTecDataset,
    device: str = "auto",
    batch: int = 8,
    progress: bool = True,
    min_recall: float = 0.9,
) -> CalibrationReport:
    """Fit normalisation and thresholds of the model at ``path`` on ``dataset``'s val split."""
    path = Path(path)
    if "val" not in dataset.splits():
        raise DataError(f"{dataset.root}: calibration needs a val split (good and defective)")
    samples = dataset.validate("val")
    good = [s for s in samples if not s.is_defect]
    if not good or len(good) == len(samples):
        raise DataError(f"{dataset.root / 'val'}: calibration needs good and defective images")
    scorer = Scorer.load(path, device)
    norm = fit_normalisation(
        scorer, image_batches(scorer, good, batch, progress, "normalise"), source="val/good"
    )
    scorer.model.norm = norm
    labels = np.array([int(s.is_defect) for s in samples])
    scores = joint_scores(scorer, image_batches(scorer, samples, batch, progress, "calibrate"))
    thresholds = fit_thresholds(labels, scores, min_recall=min_recall)
    update_model_meta(
        path,
        normalisation=norm.model_dump(mode="json"),
        thresholds=thresholds.model_dump(mode="json"),
    )
    report = CalibrationReport(
        model_path=str(path),
        normalisation=norm,
        thresholds=thresholds,
        val_auroc=auroc(labels, scores),
        n_good=len(good),
        n_defect=len(samples) - len(good),
    )
    log.info(
        "calibrated",
        path=str(path),
        val_auroc=round(report.val_auroc, 4),
        operating_point=round(thresholds.operating_point, 4),
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
