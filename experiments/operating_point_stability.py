"""The operating point counted and kernel-smoothed, and how much each moves over resamples of val.

    python experiments/operating_point_stability.py MODEL DATA [--boot 200] [--seed 0]

The operating point is the highest-precision threshold whose recall on ``val`` is at least
the model's ``min_recall``; its precision also counts ``calibration_exposure.copies``
exposure-jittered copies of every val image (:mod:`linewatch.model.calibrate`). This
scores val and those copies once, with the model's stored normalisation, then fits the
operating point with the precision counted (``operating_point_bandwidth`` 0) and smoothed
(Silverman's rule on the good scores, and half and twice that), on val itself and on
``--boot`` bootstrap resamples of val's images (each image with its copies). Prints each
rule's threshold on val, the bootstrap mean and standard deviation, and how far the
threshold lies above the nearest good score below it. Only val is read: nothing here
looks at test.
"""

from __future__ import annotations

import argparse

import numpy as np

from linewatch import log
from linewatch.data.mvtec import MVTecDataset
from linewatch.metrics import operating_point_threshold, silverman_bandwidth
from linewatch.model.acceleration import load_served_scorer
from linewatch.model.calibrate import (
    collect_term_maps,
    exposure_drift_scores,
    image_batches,
    joint_scores,
)

_BATCH = 8


def margin_above_good(threshold: float, good: np.ndarray) -> float:
    """How far ``threshold`` lies above the highest good score below it (inf if none)."""
    below = good[good < threshold]
    return float(threshold - below.max()) if below.size else float("inf")


def main() -> None:
    """Score val and its copies once, then fit and resample each rule; print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a trained and calibrated model file (.lwm)")
    parser.add_argument("data", help="data set in MVTec layout with a val split")
    parser.add_argument("--boot", type=int, default=200, help="bootstrap resamples of val")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resamples")
    parser.add_argument("--log-level", default="warning", help="of the logs on stderr")
    args = parser.parse_args()
    log.configure(args.log_level)
    scorer = load_served_scorer(args.model, "cpu")
    weights, stored = scorer.model.norm.weights, scorer.thresholds
    if weights is None or stored is None:
        parser.error(f"{args.model}: not calibrated; run `linewatch calibrate` first")
    samples = MVTecDataset(args.data).validate("val")
    labels = np.array([int(s.is_defect) for s in samples])
    maps = collect_term_maps(scorer, image_batches(scorer, samples, _BATCH, True, "val"))
    scores = joint_scores(scorer, maps, weights)
    drifted = exposure_drift_scores(scorer, samples, labels, _BATCH, True)
    drift_labels, drift_scores = drifted if drifted is not None else (labels[:0], scores[:0])
    copies = len(drift_labels) // len(labels)
    good = np.concatenate([scores[labels == 0], drift_scores[drift_labels == 0]])
    rule = silverman_bandwidth(good)
    rng = np.random.default_rng(args.seed)
    resamples = [rng.integers(0, len(labels), len(labels)) for _ in range(args.boot)]
    print(f"{len(labels)} val images, {copies} copies each; Silverman's bandwidth {rule:.3f}")
    print("bandwidth  threshold  above the nearest good  bootstrap mean  std")
    for bandwidth in (0.0, rule / 2, rule, 2 * rule):
        found = operating_point_threshold(labels, scores, stored.min_recall,
                                          (drift_labels, drift_scores), bandwidth)
        boot = []
        for rows in resamples:
            copy_rows = (rows[None, :] + len(labels) * np.arange(copies)[:, None]).ravel()
            boot.append(operating_point_threshold(
                labels[rows], scores[rows], stored.min_recall,
                (drift_labels[copy_rows], drift_scores[copy_rows]), bandwidth))
        print(f"{bandwidth:9.3f}  {found:9.3f}  {margin_above_good(found, good):22.3f}  "
              f"{np.mean(boot):14.3f}  {np.std(boot):.3f}", flush=True)


if __name__ == "__main__":
    main()
