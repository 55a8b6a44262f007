"""Evaluation (``linewatch evaluate``): image and pixel metrics, timing, an HTML report.

Scores a split (``test`` by default) with the same :class:`Scorer` the worker uses,
optionally after a test-time corruption (``--corrupt snp:0.25``, ``light:strong``, ...), and
reports ranking metrics (image AUROC, PR-AUC, pixel AUROC, AUPRO), the classification at the
model's stored threshold (the operating point unless another rule is asked for) and the
time per image, split into pre-processing, backbone, heads and post-processing. With
``--scores CSV`` every image's score and verdict is written too, so two runs (clean and
corrupted, or two models) can be compared image by image.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from linewatch.acquisition.exposure import bright_level, clipped_share
from linewatch.data.corrupt import apply_corruption, parse_corruption
from linewatch.data.images import read_image, read_mask
from linewatch.data.mvtec import MVTecDataset, Sample
from linewatch.errors import DataError
from linewatch.log import get_logger
from linewatch.metrics import aupro, auroc, classify_at, pixel_auroc, pr_auc
from linewatch.metrics.thresholds import ThresholdRule, f1_max_threshold
from linewatch.model.acceleration import backend_of, load_served_scorer
from linewatch.model.scorer import Scorer
from linewatch.report import ReportImage, write_report, write_text_atomic
from linewatch.visualize import encode_png, heatmap_overlay

__all__ = ["EvalResult", "evaluate", "evaluate_scorer", "write_scores"]

log = get_logger("evaluate")

# Overlays per report section (worst false alarms, missed defects).
_GALLERY = 6
# AUPRO over every distinct score is exact but sorts tens of millions of pixels; binned
# (as anomalib's default) keeps an evaluation of a few hundred images to seconds.
_AUPRO_BINS = 500


class EvalResult(BaseModel):
    """Figures of one evaluation run (the JSON written by ``--json``)."""

    model_config = ConfigDict(extra="forbid")

    model_path: str
    model_id: str
    variant: str
    split: str
    corrupt: str | None
    n_images: int
    n_good: int
    n_defect: int
    image_auroc: float
    image_pr_auc: float
    pixel_auroc: float | None
    aupro: float | None
    threshold_rule: str
    threshold: float | None
    threshold_version: str | None
    f1: float | None
    precision: float | None
    recall: float | None
    false_alarm_rate: float | None
    best_f1: float
    per_label_auroc: dict[str, float]
    per_label_pixel_auroc: dict[str, float]
    ms_per_image: float
    ms_per_image_stages: dict[str, float]
    backbone_ms_per_image: float
    batch: int
    device: str
    backend: str  # what ran the backbone: ms_per_image is the line's time when it is the line's
    threads: int


class _Collected(BaseModel):
    """Scores, maps and masks of a split, in sample order."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    scores: np.ndarray
    maps: list[np.ndarray]
    masks: list[np.ndarray]
    exposure: list[tuple[float, float]]  # (clipped share, bright level) per frame, if measured
    timings: dict[str, float]
    timed_images: int


def _score_split(
    scorer: Scorer,
    samples: Sequence[Sample],
    batch: int,
    corrupt: str | None,
    seed: int,
    progress: bool,
    measure_exposure: bool = False,
) -> _Collected:
    corruption = parse_corruption(corrupt) if corrupt else None
    rng = np.random.default_rng(seed)
    scores: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    exposure: list[tuple[float, float]] = []
    timings: dict[str, float] = {}
    timed = 0
    with tqdm(total=len(samples), desc="evaluate", unit="img", disable=not progress) as bar:
        for start in range(0, len(samples), batch):
            chunk = samples[start : start + batch]
            frames = [read_image(s.path) for s in chunk]
            for s, f in zip(chunk, frames, strict=True):
                mask = read_mask(s.mask, f.shape) if s.is_defect and s.mask is not None else None
                masks.append(mask if mask is not None else np.zeros(f.shape[:2], bool))
            if corruption is not None:
                frames = [apply_corruption(f, corruption, rng) for f in frames]
            if measure_exposure:  # only the per-image CSV reports it
                exposure += [(clipped_share(f), bright_level(f)) for f in frames]
            # The first batch pays for lazy initialisation (allocator, kernels): not timed.
            stage = timings if start > 0 or len(samples) <= batch else None
            result = scorer.score_batch(frames, stage)
            timed += len(chunk) if stage is not None else 0
            scores.append(result.scores)
            maps.extend(result.maps)
            bar.update(len(chunk))
    return _Collected(
        scores=np.concatenate(scores),
        maps=maps,
        masks=masks,
        exposure=exposure,
        timings=timings,
        timed_images=max(timed, 1),
    )


def _pixel_metrics(
    masks: list[np.ndarray], maps: list[np.ndarray]
) -> tuple[float | None, float | None]:
    if not any(m.any() for m in masks):
        return None, None
    return pixel_auroc(masks, maps), aupro(masks, maps, num_thresholds=_AUPRO_BINS)


def _per_label_pixel(
    samples: Sequence[Sample], masks: list[np.ndarray], maps: list[np.ndarray]
) -> dict[str, float]:
    """Pixel AUROC of each defect type against the pixels of the good images."""
    out: dict[str, float] = {}
    for label in sorted({s.label for s in samples if s.is_defect}):
        pick = [i for i, s in enumerate(samples) if not s.is_defect or s.label == label]
        chosen = [masks[i] for i in pick]
        if any(m.any() for m in chosen) and not all(m.all() for m in chosen):
            out[label] = pixel_auroc(chosen, [maps[i] for i in pick])
    return out


def _per_label(
    samples: Sequence[Sample], labels: np.ndarray, scores: np.ndarray
) -> dict[str, float]:
    out: dict[str, float] = {}
    good = labels == 0
    for label in sorted({s.label for s in samples if s.is_defect}):
        pick = good | np.array([s.label == label for s in samples])
        if good.any():
            out[label] = auroc(labels[pick], scores[pick])
    return out


def evaluate_scorer(
    scorer: Scorer,
    dataset: MVTecDataset,
    split: str = "test",
    corrupt: str | None = None,
    batch: int = 8,
    rule: ThresholdRule = "operating_point",
    seed: int = 0,
    report_dir: str | Path | None = None,
    progress: bool = True,
    scores_csv: str | Path | None = None,
) -> EvalResult:
    """Score ``split`` of ``dataset`` and compute every figure of :class:`EvalResult`.

    ``scores_csv`` (if given) receives one row per image (:func:`write_scores`).
    """
    samples = dataset.validate(split)
    labels = np.array([int(s.is_defect) for s in samples])
    if labels.all() or not labels.any():
        raise DataError(f"{dataset.root / split}: evaluation needs good and defective images")
    got = _score_split(scorer, samples, batch, corrupt, seed, progress, scores_csv is not None)
    pix_auroc, pro = _pixel_metrics(got.masks, got.maps)
    threshold = scorer.threshold(rule) if scorer.thresholds is not None else None
    report = classify_at(labels, got.scores, threshold) if threshold is not None else None
    best = classify_at(labels, got.scores, f1_max_threshold(labels, got.scores))
    stages = {k: 1000.0 * v / got.timed_images for k, v in got.timings.items()}
    result = EvalResult(
        model_path=str(scorer.path),
        model_id=scorer.model_id,
        variant=scorer.settings.variant,
        split=split,
        corrupt=str(parse_corruption(corrupt)) if corrupt else None,
        n_images=len(samples),
        n_good=int((labels == 0).sum()),
        n_defect=int(labels.sum()),
        image_auroc=auroc(labels, got.scores),
        image_pr_auc=pr_auc(labels, got.scores),
        pixel_auroc=pix_auroc,
        aupro=pro,
        threshold_rule=rule,
        threshold=threshold,
        threshold_version=scorer.threshold_version,
        f1=report.f1 if report else None,
        precision=report.precision if report else None,
        recall=report.recall if report else None,
        false_alarm_rate=report.false_alarm_rate if report else None,
        best_f1=best.f1,
        per_label_auroc=_per_label(samples, labels, got.scores),
        per_label_pixel_auroc=_per_label_pixel(samples, got.masks, got.maps),
        ms_per_image=sum(stages.values()),
        ms_per_image_stages=stages,
        backbone_ms_per_image=stages.get("backbone", 0.0),
        batch=batch,
        device=str(scorer.device),
        backend=backend_of(scorer),
        threads=torch.get_num_threads(),
    )
    if report_dir is not None:
        _write_report(Path(report_dir), result, samples, labels, got, threshold)
    if scores_csv is not None:
        write_scores(Path(scores_csv), dataset.root, samples, got.scores, threshold, got.exposure)
    log.info(
        "evaluated",
        split=split,
        corrupt=result.corrupt,
        image_auroc=round(result.image_auroc, 4),
        pixel_auroc=result.pixel_auroc,
        ms_per_image=round(result.ms_per_image, 2),
    )
    return result


def evaluate(
    model: str | Path,
    data: str | Path,
    split: str = "test",
    corrupt: str | None = None,
    batch: int = 8,
    device: str = "auto",
    rule: ThresholdRule = "operating_point",
    seed: int = 0,
    json_out: str | Path | None = None,
    report_dir: str | Path | None = None,
    progress: bool = True,
    scores_csv: str | Path | None = None,
) -> EvalResult:
    """``linewatch evaluate``: load the model, evaluate, write the JSON, the report and the
    per-image scores."""
    if corrupt:
        parse_corruption(corrupt)  # a typo fails before the model is loaded
    dataset = MVTecDataset(data)
    scorer = load_served_scorer(model, device)
    try:
        result = evaluate_scorer(
            scorer, dataset, split, corrupt, batch, rule, seed, report_dir, progress, scores_csv
        )
    finally:
        scorer.close()
    if json_out is not None:
        _write_json(Path(json_out), result.model_dump(mode="json"))
    return result


def write_scores(
    path: Path,
    root: Path,
    samples: Sequence[Sample],
    scores: np.ndarray,
    threshold: float | None,
    exposure: Sequence[tuple[float, float]],
) -> None:
    """One CSV row per image, in split order: ``image`` (relative to the data set),
    ``label``, ``score``, ``alarm`` (1 when the score reaches ``threshold``; empty when the
    model has no threshold), and the exposure of the frame as scored (after ``--corrupt``) as
    the line's acquisition measures it: ``clipped_share`` and ``bright_level``
    (:mod:`linewatch.acquisition.exposure`). Written whole or not at all.
    """
    buffer = io.StringIO()
    rows = csv.writer(buffer, lineterminator="\n")
    rows.writerow(["image", "label", "score", "alarm", "clipped_share", "bright_level"])
    for sample, score, (clipped, bright) in zip(samples, scores, exposure, strict=True):
        alarm = "" if threshold is None else int(float(score) >= threshold)
        rows.writerow([sample.path.relative_to(root).as_posix(), sample.label,
                       f"{float(score):.6g}", alarm, f"{clipped:.4f}", f"{bright:.4f}"])
    write_text_atomic(path, buffer.getvalue())


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")


def _write_report(
    out: Path,
    result: EvalResult,
    samples: Sequence[Sample],
    labels: np.ndarray,
    got: _Collected,
    threshold: float | None,
) -> None:
    """HTML report: curves, figures, the worst false alarms and the missed defects."""
    good = np.flatnonzero(labels == 0)
    bad = np.flatnonzero(labels == 1)
    worst_good = good[np.argsort(-got.scores[good])][:_GALLERY]
    missed = bad[np.argsort(got.scores[bad])][:_GALLERY]
    shown = np.concatenate([worst_good, missed])
    lo = min(float(np.percentile(got.maps[i], 1)) for i in shown)
    hi = max([float(got.maps[i].max()) for i in shown] + ([threshold] if threshold else []))
    overlays: list[ReportImage] = []
    for title, picks in (("worst false alarms", worst_good), ("missed defects", missed)):
        for i in picks:
            s = samples[i]
            overlay = heatmap_overlay(read_image(s.path), got.maps[i], vmin=lo, vmax=hi)
            if got.masks[i].any():
                overlay = _outline(overlay, got.masks[i])
            caption = f"{s.label}/{s.path.name} score {got.scores[i]:.2f}"
            if threshold is not None:
                caption += f" (threshold {threshold:.2f})"
            overlays.append(ReportImage(title=title, caption=caption, png=encode_png(overlay)))
    title = f"linewatch evaluation: {result.variant} on {result.split}"
    if result.corrupt:
        title += f" ({result.corrupt})"
    write_report(out, result.model_dump(mode="json"), labels, got.scores, overlays, title)


def _outline(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The ground-truth outline in white, so a missed defect can be found on the overlay."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = rgb.copy()
    cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    return out
