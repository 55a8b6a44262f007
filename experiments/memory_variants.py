"""Refit the memory of normal features on other backbone levels or poolings, and compare.

    python experiments/memory_variants.py MODEL DATA --variant base=s4,s8,s16 \
        --variant s16a=s4,s8,s16a,s16 --variant one=s4,s8,s16@1 \
        [--corrupt light:strong snp:0.25] [--copies 1]

The model's memory term (a per-position Gaussian over the standardised backbone levels) does
not depend on the trained networks, so its alternatives can be compared without training:
the frames take the model's own pre-processing, the frozen backbone runs once per image for
every level any variant names, and each variant fits its Gaussian on ``train`` plus
``--copies`` exposure-jittered copies of it (as training does; ``--seed`` draws them), is
calibrated on ``val`` the way ``linewatch calibrate`` does (with the same exposure-jittered
copies of val in the operating point's precision) and scored on ``test``, clean and
under each ``--corrupt`` (seed 0, as ``linewatch evaluate``). A variant is a list of levels
(``s4``, ``s8``, ``s16a``, ``s16``, ``s32``), each pooled into the memory's cells by its mean;
``s4:max`` pools by the maximum, ``s4:std`` adds the within-cell spread as channels.
``...@K`` or ``...@K:F`` fits the memory per ``K`` groups of frame shape that overlap by ``F``
(default: the model's ``memory_shape_groups`` and ``memory_shape_overlap``; ``@1``: one memory).

Prints, per variant: channels, val AUROC, and for test and each corruption the image AUROC,
false alarms and recall at the calibrated operating point; for clean test also the false
alarms at recall 0.90 (a threshold tuned on test: a diagnostic, not an operating point).
The model README's cached-feature rows come from this script.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from linewatch import log
from linewatch.data.corrupt import apply_corruption, parse_corruption
from linewatch.data.images import read_image
from linewatch.data.mvtec import MVTecDataset
from linewatch.metrics.ranking import auroc
from linewatch.model.acceleration import load_served_scorer
from linewatch.model.aspect import memory_groups
from linewatch.model.backbone import FeatureExtractor
from linewatch.model.calibrate import (
    EXPOSURE_COPIES_SEED,
    TermMaps,
    calibrate_maps,
    joint_scores,
)
from linewatch.model.mdaae import NormalMemory, resize_to
from linewatch.model.preprocess import jitter_exposure
from linewatch.model.scorer import Region, Scorer, model_input

_BATCH = 8
_POOLS = ("mean", "max", "std")


@dataclass
class ImageSet:
    """Pooled features (name -> (N, C, h, w) float16) and regions of one set of frames."""

    features: dict[str, Tensor]
    regions: list[Region]
    labels: np.ndarray

    @property
    def aspects(self) -> np.ndarray:
        """Each frame's width / height."""
        return np.array([r.aspect for r in self.regions])


@dataclass(frozen=True)
class Variant:
    """A memory to compare: its levels and poolings, and its groups of frame shape."""

    name: str
    levels: list[tuple[str, str]]
    shape_groups: int | None = None  # None: the model's settings
    shape_overlap: float | None = None


def parse_variant(text: str) -> Variant:
    """``NAME=LEVEL[:POOL],...[@GROUPS[:OVERLAP]]`` as a :class:`Variant`.

    >>> parse_variant("x=s4,s8:std")
    Variant(name='x', levels=[('s4', 'mean'), ('s8', 'std')], shape_groups=None, shape_overlap=None)
    >>> v = parse_variant("g=s4@3:0.2"); v.levels, v.shape_groups, v.shape_overlap
    ([('s4', 'mean')], 3, 0.2)
    """
    usage = f"variant {text!r}: expected NAME=LEVEL[:POOL],...[@GROUPS[:OVERLAP]]"
    name, _, spec = text.partition("=")
    spec, _, grouping = spec.partition("@")
    if not name or not spec:
        raise argparse.ArgumentTypeError(usage)
    parts = []
    for item in spec.split(","):
        level, _, pool = item.partition(":")
        if (pool or "mean") not in _POOLS:
            raise argparse.ArgumentTypeError(f"variant {text!r}: pool must be one of {_POOLS}")
        parts.append((level, pool or "mean"))
    if not grouping:
        return Variant(name, parts)
    groups, _, overlap = grouping.partition(":")
    try:
        return Variant(name, parts, int(groups), float(overlap) if overlap else None)
    except ValueError:
        raise argparse.ArgumentTypeError(usage) from None


def _pooled(feature: Tensor, cells: int, pool: str) -> Tensor:
    if pool != "mean" and feature.shape[-1] < cells:
        raise SystemExit(f"pool {pool!r} needs a level at least as fine as the memory grid")
    if pool == "max":
        return F.adaptive_max_pool2d(feature, cells)
    mean = resize_to(feature, (cells, cells))
    if pool == "std":
        square = resize_to(feature * feature, (cells, cells))
        return (square - mean * mean).clamp_min(0).sqrt()
    return mean


def extract(scorer: Scorer, fx: FeatureExtractor, frames: Sequence[np.ndarray],
            labels: np.ndarray, wanted: set[tuple[str, str]]) -> ImageSet:
    """Every wanted (level, pool) of ``frames`` on the memory grid, through the model's input."""
    cells = scorer.settings.size // scorer.settings.memory_stride
    parts: dict[str, list[Tensor]] = {}
    regions: list[Region] = []
    with torch.inference_mode():
        for start in range(0, len(frames), _BATCH):
            x, batch_regions = model_input(frames[start : start + _BATCH], scorer.settings, "cpu")
            regions += batch_regions
            levels = dict(zip(fx.level_names, fx(x), strict=True))
            for level, pool in wanted:
                parts.setdefault(f"{level}:{pool}", []).append(
                    _pooled(levels[level], cells, pool).half())
    return ImageSet({k: torch.cat(v) for k, v in parts.items()}, regions, labels)


def _variant_features(
    sets: dict[str, ImageSet], levels: list[tuple[str, str]]
) -> dict[str, Tensor]:
    """Each set's features of one variant, every channel standardised by its train statistics."""
    keys = [f"{level}:{pool}" for level, pool in levels]
    train = torch.cat([sets["train"].features[k].float() for k in keys], 1)
    mean = train.mean((0, 2, 3), keepdim=True)
    std = train.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    return {name: (torch.cat([s.features[k].float() for k in keys], 1) - mean) / std
            for name, s in sets.items()}


def _maps(scorer: Scorer, memory: NormalMemory, feats: Tensor, images: ImageSet) -> TermMaps:
    with torch.inference_mode():
        distance = memory.distance(feats, torch.from_numpy(images.aspects))
    return TermMaps({"mem": resize_to(distance, scorer.model.grid)}, images.regions)


def evaluate_variant(scorer: Scorer, sets: dict[str, ImageSet], variant: Variant,
                     fit_on: list[str]) -> list[str]:
    """Fit, calibrate and score one variant; its table cells."""
    feats = _variant_features(sets, variant.levels)
    s = scorer.settings
    groups = memory_groups(
        sets["train"].aspects,
        s.memory_shape_groups if variant.shape_groups is None else variant.shape_groups,
        s.memory_shape_overlap if variant.shape_overlap is None else variant.shape_overlap)
    memory = NormalMemory("gaussian", int(feats["train"].shape[1]))
    memory.fit_gaussian_per_shape([(feats[name], sets[name].aspects) for name in fit_on],
                                  scorer.settings.gauss_eps, groups)
    val = sets["val"]
    copies = [name for name in sets if name.startswith("jitter-val")]

    def drift() -> tuple[np.ndarray, np.ndarray] | None:
        if not copies:
            return None
        scores = [joint_scores(scorer, _maps(scorer, memory, feats[n], sets[n]),
                               scorer.model.weights) for n in copies]
        return np.concatenate([sets[n].labels for n in copies]), np.concatenate(scores)

    norm, thresholds, _, val_auroc, _ = calibrate_maps(
        scorer, _maps(scorer, memory, feats["val"], val), val.labels, drift=drift)
    scorer.model.norm = norm
    scorer.refresh()
    weights = scorer.model.weights
    cells = [f"{int(feats['train'].shape[1])}", f"{len(groups)}", f"{val_auroc:.4f}"]
    for name in [n for n in sets if n not in ("train", "val") and not n.startswith("jitter")]:
        labels = sets[name].labels
        scores = joint_scores(scorer, _maps(scorer, memory, feats[name], sets[name]), weights)
        alarm = scores >= thresholds.operating_point
        cells.append(f"{auroc(labels, scores):.4f} {alarm[labels == 0].mean():.1%} "
                     f"{alarm[labels == 1].mean():.3f}")
        if name == "test":
            found = np.sort(scores[labels == 1])[::-1]
            at_90 = found[int(np.ceil(0.9 * len(found))) - 1]
            cells.append(f"{(scores[labels == 0] >= at_90).mean():.1%}")
    return cells


def main() -> None:
    """Extract once, then fit, calibrate and score every variant; print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a trained model file (.lwm): pre-processing, smoothing")
    parser.add_argument("data", help="data set in MVTec layout with train, val and test")
    parser.add_argument("--variant", type=parse_variant, action="append", required=True,
                        metavar="NAME=LEVEL[:POOL],...[@GROUPS[:OVERLAP]]")
    parser.add_argument("--corrupt", nargs="*", default=[], metavar="KIND")
    parser.add_argument("--copies", type=int, default=1, help="exposure-jittered train copies")
    parser.add_argument("--seed", type=int, default=7, help="seed of the jittered copies")
    parser.add_argument("--log-level", default="warning", help="of the logs on stderr")
    args = parser.parse_args()
    log.configure(args.log_level)
    scorer = load_served_scorer(args.model, "cpu")
    variants: list[Variant] = args.variant
    wanted = {part for v in variants for part in v.levels}
    fx = FeatureExtractor(scorer.settings.backbone, sorted({lv for lv, _ in wanted}))
    dataset = MVTecDataset(args.data)
    frames: dict[str, tuple[list[np.ndarray], np.ndarray]] = {}
    for split in ("train", "val", "test"):
        samples = dataset.validate(split)
        frames[split] = ([read_image(s.path) for s in samples],
                         np.array([int(s.is_defect) for s in samples]))
    train, none = frames["train"][0], np.zeros(len(frames["train"][0]), int)
    rng = np.random.default_rng(args.seed)
    for copy in range(args.copies):
        jittered = jitter_exposure(train, rng, scorer.settings.memory_exposure)
        frames[f"jitter{copy}"] = (jittered, none)
    val_rng = np.random.default_rng(EXPOSURE_COPIES_SEED)
    drift_cfg = scorer.settings.calibration_exposure
    for copy in range(drift_cfg.copies):  # as calibrate draws them: one seed, copy after copy
        frames[f"jitter-val{copy}"] = (jitter_exposure(frames["val"][0], val_rng, drift_cfg),
                                       frames["val"][1])
    for kind in args.corrupt:
        corruption, crng = parse_corruption(kind), np.random.default_rng(0)
        test, labels = frames["test"]
        frames[kind] = ([apply_corruption(f, corruption, crng) for f in test], labels)
    sets = {name: extract(scorer, fx, fr, labels, wanted) for name, (fr, labels) in frames.items()}
    fit_on = ["train", *(f"jitter{c}" for c in range(args.copies))]
    scored = ["test", *args.corrupt]
    print("variant".ljust(20), "channels", "groups", "val_auroc", "  ".join(
        f"{n}(auroc far rec)" + (" far@rec0.90" if n == "test" else "") for n in scored))
    for variant in variants:
        cells = evaluate_variant(scorer, sets, variant, fit_on)
        print(variant.name.ljust(20), "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
