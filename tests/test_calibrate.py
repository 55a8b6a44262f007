"""Calibration's exposure-jittered copies of val, on a small trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from linewatch.data.images import read_image
from linewatch.data.mvtec import MVTecDataset, Sample
from linewatch.metrics import operating_point_threshold, silverman_bandwidth
from linewatch.model.calibrate import (
    calibrate_maps,
    collect_term_maps,
    exposure_drift_scores,
    image_batches,
    joint_scores,
    smoothing_bandwidth,
)
from linewatch.model.preprocess import ExposureJitter
from linewatch.model.scorer import Scorer


def _val_of(tiny_line_model: tuple[Path, Path]) -> tuple[Scorer, list[Sample], np.ndarray]:
    """The tiny model's scorer, and its data set's val samples and labels."""
    data, model = tiny_line_model
    samples = MVTecDataset(data).validate("val")
    return Scorer.load(model, device="cpu"), samples, np.array([int(s.is_defect) for s in samples])


def test_calibration_scores_each_image_as_the_runtime_scorer_does(
    tiny_line_model: tuple[Path, Path],
) -> None:
    scorer, samples, labels = _val_of(tiny_line_model)
    assert scorer.settings.frame_mean_weight > 0  # the frame's mean is part of both
    maps = collect_term_maps(scorer, image_batches(scorer, samples, 4, False, "calibrate"))
    calibrated = joint_scores(scorer, maps, scorer.model.weights)
    runtime = scorer.score_batch([read_image(s.path) for s in samples]).scores
    np.testing.assert_allclose(calibrated, runtime, atol=1e-4)
    good = runtime[labels == 0]  # normalised units: val's good images centre on 0
    assert abs(float(good.mean())) < 0.25 * float(good.std())


def test_exposure_copies_of_val_are_scored_the_same_way_every_time(
    tiny_line_model: tuple[Path, Path],
) -> None:
    scorer, samples, labels = _val_of(tiny_line_model)
    first = exposure_drift_scores(scorer, samples, labels, batch=4, progress=False)
    again = exposure_drift_scores(scorer, samples, labels, batch=3, progress=False)
    assert first is not None and again is not None
    copies = scorer.settings.calibration_exposure.copies
    assert copies == 2 and first[0].tolist() == labels.tolist() * copies
    np.testing.assert_allclose(first[1], again[1], atol=1e-4)  # fixed draws, any batch size
    clean = scorer.score_batch([read_image(s.path) for s in samples]).scores
    assert np.abs(first[1][: len(samples)] - clean).max() > 1e-3  # jittered, not the originals

    scorer.settings = scorer.settings.model_copy(
        update={"calibration_exposure": ExposureJitter(copies=0)}
    )
    assert exposure_drift_scores(scorer, samples, labels, batch=4, progress=False) is None


def test_drifted_good_images_just_above_the_operating_point_push_it_up(
    tiny_line_model: tuple[Path, Path],
) -> None:
    scorer, samples, labels = _val_of(tiny_line_model)
    maps = collect_term_maps(scorer, image_batches(scorer, samples, 4, False, "val"))
    _, plain, *_ = calibrate_maps(scorer, maps, labels, min_recall=0.5)
    crowd = np.full(50, plain.operating_point + 1e-6)  # 50 drifted goods, each an alarm
    _, drifted, *_ = calibrate_maps(scorer, maps, labels, min_recall=0.5,
                                    drift=lambda: (np.zeros(50, int), crowd))
    assert drifted.operating_point > plain.operating_point
    assert (drifted.f1_max, drifted.youden) == (plain.f1_max, plain.youden)


def test_the_operating_point_smooths_with_the_set_kernel_or_silvermans_rule(
    tiny_line_model: tuple[Path, Path],
) -> None:
    scorer, samples, labels = _val_of(tiny_line_model)
    maps = collect_term_maps(scorer, image_batches(scorer, samples, 4, False, "val"))
    drift = (np.array([0, 0, 1]), np.array([0.5, 1.5, 4.0]))
    found = {}
    for bandwidth in (None, 0.0, 0.7):
        scorer.settings = scorer.settings.model_copy(
            update={"operating_point_bandwidth": bandwidth})
        _, thresholds, *_ = calibrate_maps(scorer, maps, labels, min_recall=0.5,
                                           drift=lambda: drift)
        found[bandwidth] = thresholds.operating_point
    scores = joint_scores(scorer, maps, scorer.model.weights)
    goods = np.concatenate([scores[labels == 0], drift[1][drift[0] == 0]])
    rule = silverman_bandwidth(goods)
    assert smoothing_bandwidth(scorer.settings, labels, scores, drift) == 0.7
    assert rule > 0 and found[None] != found[0.0]  # the kernel changes this set's threshold
    for bandwidth, kernel in ((None, rule), (0.0, 0.0), (0.7, 0.7)):
        expected = operating_point_threshold(labels, scores, 0.5, drift, bandwidth=kernel)
        assert found[bandwidth] == expected
