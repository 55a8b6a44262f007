"""The runtime scorer: camera frames in, image scores and anomaly maps out.

The lifecycle follows Triton's Python backend: :meth:`Scorer.load` (initialize),
:meth:`Scorer.score_batch` (execute, on a dynamically batched list of frames, one result per
frame) and :meth:`Scorer.close` (finalize). The batcher lives elsewhere (the worker)::

    scorer = Scorer.load("line.lwm", device="auto")
    batch = scorer.score_batch(frames)          # uint8/uint16, gray/RGB, any sizes
    defect = batch.scores >= scorer.threshold("operating_point")

Maps come back at each frame's own resolution, in the same normalised units as the scores:
the score is the max (or top-k mean) of the Gaussian-smoothed joint map inside the frame's
area of the model input, so thresholding a map with the image threshold shows the pixels that
made the verdict. (The map is resized to the frame with bilinear interpolation, which never
exceeds the model-resolution values, so ``map.max() <= score``, equal up to interpolation.)
The map is first raised by a share of its own mean over the judged pixels
(``frame_mean_weight``), so a change spread over the surface counts beyond its peak.

An image's score does not depend on its batch: pre-processing works per image, the networks
use no batch statistics, and the memory-bank search runs image by image.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from linewatch.errors import ConfigError, ModelFileError
from linewatch.log import get_logger
from linewatch.metrics.thresholds import ThresholdRule, ThresholdSet
from linewatch.model.backbone import FeatureExtractor
from linewatch.model.joint import JointModel, Normalisation, judged_pixels, reduce_map
from linewatch.model.modelfile import ModelMeta, load_model_file, model_id, read_model_meta
from linewatch.model.preprocess import PreprocessConfig, content_box, preprocess_batch
from linewatch.model.settings import ModelSettings, model_settings_from_dict

__all__ = [
    "BackboneOnlyScorer",
    "Prepared",
    "ScoreBatch",
    "Scorer",
    "build_backbone",
    "preprocess_config",
    "resolve_device",
    "standardise_intensity",
    "untruncated_moments",
]

log = get_logger("scorer")

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ScoreBatch:
    """Scores (B,) float32 and one float32 map per frame at that frame's (H, W)."""

    scores: np.ndarray
    maps: list[np.ndarray]


@dataclass(frozen=True)
class Region:
    """Where a frame lies in the model input and which of its pixels can be judged.

    ``box`` is ``(top, left, height, width)`` in model-input pixels, ``shape`` the frame's own
    ``(H, W)``; ``blind`` (bool, box-sized, None = none) marks pixels clipped at the sensor's
    range plus a margin: a saturated or black plateau has no texture to judge, so it neither
    raises nor carries the score.
    """

    box: Box
    shape: tuple[int, int]
    blind: np.ndarray | None = None

    @property
    def aspect(self) -> float:
        """The frame's width / height (before it was fitted to the square input)."""
        return self.shape[1] / self.shape[0]


@dataclass
class Prepared:
    """A batch ready for the heads: model input, backbone features and where each frame lies."""

    x: Tensor
    feats: list[Tensor] | None
    regions: list[Region]

    @property
    def aspects(self) -> Tensor:
        """Each frame's width / height (B,), which picks the memory's group of frame shape."""
        return torch.tensor([r.aspect for r in self.regions], dtype=torch.float64)


def resolve_device(choice: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a one-line error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA device is available")
    if choice not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {choice!r}; expected auto, cpu or cuda")
    return torch.device(choice)


def preprocess_config(settings: ModelSettings) -> PreprocessConfig:
    """The pre-processing of a model: training, evaluation and the worker all use this one."""
    return PreprocessConfig.for_backbone(
        settings.backbone,
        size=settings.size,
        keep_aspect=settings.keep_aspect,
        illumination=settings.illumination,
    )


def remove_impulses(frame: np.ndarray) -> np.ndarray:
    """``frame`` with isolated extreme pixels replaced by the mean of their clean neighbours.

    Candidates are pixels at the frame's minimum or maximum value (salt-and-pepper noise, dead
    and hot pixels). A candidate is an *impulse* when at least half of its 8 neighbours are
    not candidates; it is replaced by their mean when it differs from it by more than a tenth
    of the frame's range. Leaving the other impulses out of that mean is what keeps a 25 %
    salt-and-pepper frame usable; a second pass takes the impulses whose neighbourhood was too
    noisy the first time. Candidates inside a clipped *area* (an over-exposed plateau) have
    candidate neighbours and stay as they are, so clipping is left for :func:`clipped_mask`.

    >>> f = np.full((5, 5), 100, np.uint8); f[2, 2] = 255; f[2, 3] = 0
    >>> remove_impulses(f)[2, 1:4].tolist()
    [100, 100, 100]
    >>> g = np.full((6, 6), 100, np.uint8); g[:3] = 255
    >>> bool((remove_impulses(g)[:3] == 255).all())
    True
    """
    if frame.dtype not in (np.uint8, np.uint16) or (frame.ndim != 2 and frame.shape[2] != 3):
        return frame  # float frames come from augmentation of clean training images
    out = frame
    for _ in range(2):
        out = _impulse_pass(out, frame.min(), frame.max())
    return out


def _impulse_pass(frame: np.ndarray, lo: Any, hi: Any) -> np.ndarray:
    if hi - lo < 2:
        return frame
    extreme = (frame == lo) | (frame == hi)
    if extreme.ndim == 3:
        extreme = extreme.any(axis=2, keepdims=True).repeat(frame.shape[2], axis=2)
    if not extreme.any():
        return frame
    x = frame.astype(np.float32)
    clean = (~extreme).astype(np.float32)
    total = cv2.boxFilter(x * clean, -1, (3, 3), normalize=False, borderType=cv2.BORDER_REFLECT)
    count = cv2.boxFilter(clean, -1, (3, 3), normalize=False, borderType=cv2.BORDER_REFLECT)
    mean = total / np.maximum(count, 1.0)
    hit = extreme & (count >= 4.0) & (np.abs(x - mean) > float(hi - lo) / 10.0)
    if not hit.any():
        return frame
    out = frame.copy()
    out[hit] = np.rint(mean[hit]).astype(frame.dtype)
    return out


def model_input(
    frames: Sequence[np.ndarray], settings: ModelSettings, device: torch.device | str
) -> tuple[Tensor, list[Region]]:
    """Frames -> normalised model input and their regions: the one path that training,
    calibration, evaluation and the worker all take.

    Impulse filter (if on), then the regions (clipped plateaus found after the impulses are
    gone), intensity standardisation (if on), then :func:`preprocess_batch`.
    """
    if settings.impulse_filter:
        frames = [remove_impulses(f) for f in frames]
    clipped = [clipped_mask(f) if settings.mask_clipped else None for f in frames]
    regions = frame_regions(frames, settings, clipped)
    if settings.intensity != "none":
        truncated = settings.intensity == "standardise_truncated"
        frames = [
            standardise_intensity(f, c, truncated=truncated)
            for f, c in zip(frames, clipped, strict=True)
        ]
    return preprocess_batch(frames, preprocess_config(settings), device), regions


# Target statistics of :func:`standardise_intensity`, on the [0, 1] scale: mid-grey with room
# for about three standard deviations either way before clipping.
_TARGET_MEAN = 0.45
_TARGET_STD = 0.12


def standardise_intensity(
    frame: np.ndarray, clipped: np.ndarray | None = None, *, truncated: bool = False
) -> np.ndarray:
    """``frame`` as float32 in [0, 1] with a fixed mean and std (per frame, all channels).

    A global gain and offset of the lighting cancel out; what remains is the surface's
    relative texture, which is what the model judges. The statistics leave out ``clipped``
    pixels (bool H x W), whose values say nothing about the gain.

    Left out, those pixels still bias what is left: a frame clipped at white keeps only its
    darker part, whose mean is lower and whose spread is narrower than the frame's, so its
    texture would come out with too much contrast (1.7 x with half the frame clipped, for
    normally distributed intensities). ``truncated`` estimates the whole frame's mean and
    std from the unclipped pixels instead (:func:`untruncated_moments`).

    >>> f = np.array([[10, 20], [30, 40]], np.uint8)
    >>> g = standardise_intensity((f * 2 + 7).astype(np.uint8))
    >>> bool(np.allclose(standardise_intensity(f), g, atol=1e-6))
    True
    """
    if frame.dtype in (np.uint8, np.uint16):
        x = frame.astype(np.float32) / float(np.iinfo(frame.dtype).max)
    else:
        x = frame.astype(np.float32, copy=False)
    plateau = clipped if clipped is not None and clipped.any() and not clipped.all() else None
    seen = x[~plateau] if plateau is not None else x
    mean = float(seen.mean())
    std = float(seen.std())
    if truncated and plateau is not None:
        gray = x.mean(axis=2) if x.ndim == 3 else x
        bright = float(np.count_nonzero(plateau & (gray > mean))) / plateau.size
        dark = float(np.count_nonzero(plateau)) / plateau.size - bright
        mean, std = untruncated_moments(mean, std, dark, bright)
    z = (x - mean) / max(std, 1e-4)
    return np.clip(_TARGET_MEAN + _TARGET_STD * z, 0.0, 1.0).astype(np.float32)


# Beyond this share clipped on one side the few pixels left say too little about the
# frame's spread; the correction stops growing there (std x 2.4 at 90 % clipped at white).
_MAX_TRUNCATION = 0.9
_NORMAL = NormalDist()


def untruncated_moments(
    mean: float, std: float, dark: float, bright: float
) -> tuple[float, float]:
    """Mean and std of a frame from those of its unclipped pixels, ``dark`` and ``bright``
    being the shares of the frame clipped at black and at white.

    The intensities are taken as normally distributed, so the unclipped pixels follow a
    normal distribution truncated below its ``dark`` and above its ``1 - bright``
    quantile, whose moments are known in closed form. With nothing clipped they are the
    frame's own:

    >>> untruncated_moments(0.4, 0.1, 0.0, 0.0)
    (0.4, 0.1)
    >>> m, s = untruncated_moments(0.4, 0.1, 0.0, 0.5)  # half the frame clipped at white
    >>> round(m, 3), round(s, 3)
    (0.532, 0.166)
    """
    dark = min(max(dark, 0.0), _MAX_TRUNCATION)
    bright = min(max(bright, 0.0), _MAX_TRUNCATION)
    if dark + bright > _MAX_TRUNCATION:
        scale = _MAX_TRUNCATION / (dark + bright)
        dark, bright = dark * scale, bright * scale
    pdf_low, edge_low = _cut(dark, dark)
    pdf_high, edge_high = _cut(bright, 1.0 - bright)
    kept = 1.0 - dark - bright
    # Mean and variance of a standard normal truncated between the two cuts.
    shift = (pdf_low - pdf_high) / kept
    variance = 1.0 + (edge_low - edge_high) / kept - shift * shift
    full_std = std / float(np.sqrt(max(variance, 1e-6)))
    return mean - shift * full_std, full_std


def _cut(share: float, quantile: float) -> tuple[float, float]:
    """Density ``phi(z)`` and ``z * phi(z)`` of a standard normal where a ``share`` is cut
    off at its ``quantile`` z; both 0 when nothing is cut (z infinite)."""
    if share <= 0:
        return 0.0, 0.0
    z = _NORMAL.inv_cdf(quantile)
    density = _NORMAL.pdf(z)
    return density, z * density


def build_backbone(settings: ModelSettings, device: torch.device) -> FeatureExtractor | None:
    """The frozen feature extractor a variant needs (None for the pixel-only variants)."""
    if not settings.uses_backbone:
        return None
    return FeatureExtractor(settings.backbone, settings.levels).to(device)


def _settings_from_meta(path: Path, meta: ModelMeta) -> ModelSettings:
    config = meta.config
    if "checkpoint" in config:
        raise ModelFileError(f"{path}: is a training checkpoint, not a finished model")
    if "model" not in config:
        raise ModelFileError(f"{path}: model file has no model settings in its config")
    try:
        return model_settings_from_dict(config["model"])
    except Exception as exc:  # a ConfigError names the key; say which file it came from
        raise ModelFileError(f"{path}: invalid model settings ({exc})") from exc


def _thresholds_from_meta(path: Path, meta: ModelMeta) -> ThresholdSet | None:
    if meta.thresholds is None:
        return None
    try:
        return ThresholdSet.model_validate(meta.thresholds)
    except Exception as exc:
        raise ModelFileError(f"{path}: invalid thresholds ({exc})") from exc


class _ScorerBase:
    """What both scorers share: settings, pre-processing, backbone, identity, thresholds."""

    def __init__(
        self,
        settings: ModelSettings,
        backbone: FeatureExtractor | None,
        device: torch.device,
        meta: ModelMeta | None = None,
        path: Path | None = None,
    ) -> None:
        self.settings = settings
        self.backbone = backbone
        self.device = device
        self.meta = meta
        self.path = path
        self.preprocess = preprocess_config(settings)
        self.thresholds: ThresholdSet | None = (
            _thresholds_from_meta(path or Path("model"), meta) if meta is not None else None
        )

    @property
    def model_id(self) -> str:
        """Content id of the model file (``unsaved`` for a model built in memory)."""
        return model_id(self.meta) if self.meta is not None and self.meta.checksum else "unsaved"

    @property
    def threshold_version(self) -> str | None:
        """Version (content hash) of the stored thresholds; None before calibration."""
        return self.thresholds.version if self.thresholds is not None else None

    @property
    def size(self) -> int:
        """Side of the square model input."""
        return self.settings.size

    def threshold(self, rule: ThresholdRule = "operating_point") -> float:
        """The image-score threshold of ``rule``; a one-line error if not calibrated."""
        if self.thresholds is None:
            where = self.path or "this model"
            raise ModelFileError(f"{where}: not calibrated (run linewatch calibrate)")
        return self.thresholds.for_rule(rule)

    def prepare(
        self, frames: Sequence[np.ndarray], timings: dict[str, float] | None = None
    ) -> Prepared:
        """Pre-process ``frames`` and run the backbone once per frame.

        ``timings`` (if given) accumulates seconds under ``preprocess`` and ``backbone``.
        """
        t0 = time.perf_counter()
        x, regions = model_input(frames, self.settings, self.device)
        t1 = _sync(self.device)
        feats = None
        if self.backbone is not None:
            with torch.inference_mode():
                feats = self.backbone(x)
        t2 = _sync(self.device)
        if timings is not None:
            timings["preprocess"] = timings.get("preprocess", 0.0) + t1 - t0
            timings["backbone"] = timings.get("backbone", 0.0) + t2 - t1
        return Prepared(x=x, feats=feats, regions=regions)

    def close(self) -> None:
        """Release the networks (the worker calls this before loading a new model file)."""
        self.backbone = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class Scorer(_ScorerBase):
    """The joint MDAAE / SA-GAN scorer of one model file."""

    def __init__(
        self,
        model: JointModel,
        backbone: FeatureExtractor | None,
        device: torch.device,
        meta: ModelMeta | None = None,
        path: Path | None = None,
    ) -> None:
        super().__init__(model.settings, backbone, device, meta, path)
        self.model = model.to(device).eval()
        self.terms: tuple[str, ...] = ()
        self.refresh()

    def refresh(self) -> None:
        """Re-read which terms are weighted (after the model's normalisation changed)."""
        model = self.model
        self.terms = model.weights.active()
        missing = [t for t in self.terms if t not in model.available_terms()]
        if missing:
            where = self.path or "model"
            raise ModelFileError(f"{where}: score term(s) {missing} weighted but not available")

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> Scorer:
        """Read and verify a model file and build the networks on ``device``."""
        path = Path(path)
        dev = resolve_device(device)
        tensors, meta = load_model_file(path, "cpu")
        settings = _settings_from_meta(path, meta)
        backbone = build_backbone(settings, dev)
        channels = backbone.channels if backbone is not None else ()
        strides = backbone.strides if backbone is not None else ()
        model = JointModel(settings, channels, strides)
        try:
            model.load_tensors(tensors)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ModelFileError(f"{path}: weights do not fit its settings ({first})") from None
        if meta.normalisation is not None:
            try:
                model.norm = Normalisation.model_validate(meta.normalisation)
            except ValueError as exc:
                raise ModelFileError(f"{path}: invalid normalisation ({exc})") from None
        scorer = cls(model, backbone, dev, meta, path)
        log.info(
            "model_loaded",
            path=str(path),
            model_id=scorer.model_id,
            variant=settings.variant,
            device=str(dev),
            thresholds=scorer.threshold_version,
        )
        return scorer

    def score_prepared(self, prep: Prepared) -> tuple[Tensor, Tensor]:
        """Joint maps (B, 1, S, S) and scores (B,) for a prepared batch."""
        with torch.inference_mode():
            fwd = self.model(prep.x, prep.feats, self.terms, prep.aspects)
            raw = self.model.term_maps(fwd, self.terms)
            joint = self.model.joint_map(raw, prep.regions)
            maps = shape_standardised(joint, prep.regions, self.model.norm)
            scores = crop_reduce(
                maps, prep.regions, self.settings.reduce, self.settings.topk_fraction
            )
        return maps, scores

    def score_batch(
        self, frames: Sequence[np.ndarray], timings: dict[str, float] | None = None
    ) -> ScoreBatch:
        """Score a batch of frames; see the module docstring for units and sizes.

        ``timings`` (if given) accumulates seconds per stage: ``preprocess``, ``backbone``,
        ``heads`` (networks, terms, joint map) and ``post`` (maps back to frame size).
        """
        if len(frames) == 0:
            return ScoreBatch(np.zeros(0, np.float32), [])
        prep = self.prepare(frames, timings)
        t0 = time.perf_counter()
        maps, scores = self.score_prepared(prep)
        host_scores = scores.float().cpu().numpy().astype(np.float32)
        t1 = time.perf_counter()
        out_maps = to_frame_maps(maps, prep.regions)
        if timings is not None:
            timings["heads"] = timings.get("heads", 0.0) + t1 - t0
            timings["post"] = timings.get("post", 0.0) + time.perf_counter() - t1
        return ScoreBatch(host_scores, out_maps)


class BackboneOnlyScorer(_ScorerBase):
    """Same interface as :class:`Scorer`, but runs only pre-processing and the backbone.

    For the pipeline benchmark: the difference between a line run with this and with the
    real scorer is the heads' cost; the difference to the raw backbone time is the pipeline's
    overhead. Scores are 0 and maps are all-zero frames.
    """

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> BackboneOnlyScorer:
        """Read a model file's settings (not its weights) and build its backbone."""
        path = Path(path)
        dev = resolve_device(device)
        meta = read_model_meta(path)
        settings = _settings_from_meta(path, meta)
        # Pixel-only variants have no backbone; benchmark the default one so there is work.
        if not settings.uses_backbone:
            settings = settings.model_copy(update={"mdaae": True})
        return cls(settings, build_backbone(settings, dev), dev, meta, path)

    def score_batch(
        self, frames: Sequence[np.ndarray], timings: dict[str, float] | None = None
    ) -> ScoreBatch:
        """Run pre-processing and the backbone; return zero scores and maps."""
        prep = self.prepare(frames, timings)
        maps = [np.zeros(r.shape, np.float32) for r in prep.regions]
        return ScoreBatch(np.zeros(len(frames), np.float32), maps)


def _sync(device: torch.device) -> float:
    """``perf_counter`` after the device has finished its queued work (CUDA is async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def shape_standardised(maps: Tensor, regions: Sequence[Region], norm: Normalisation) -> Tensor:
    """Joint ``maps`` standardised by ``norm.shape_groups`` for each frame's aspect ratio
    (unchanged when the normalisation has none)."""
    if norm.shape_groups is None:
        return maps
    return norm.shape_groups.standardise(maps, [r.aspect for r in regions])


def crop_reduce(
    maps: Tensor, regions: Sequence[Region], reduce: str, topk_fraction: float
) -> Tensor:
    """Image scores from (B, 1, S, S) maps, each reduced over its frame's judged pixels.

    Letterbox padding and blind (clipped) pixels are not looked at, so they can neither raise
    nor hide a score; a frame that is blind everywhere is scored over its whole box.
    """
    scores = [
        reduce_map(judged_pixels(maps[i], region).view(1, 1, 1, -1), reduce, topk_fraction)
        for i, region in enumerate(regions)
    ]
    return torch.cat(scores)


def to_frame_maps(maps: Tensor, regions: Sequence[Region]) -> list[np.ndarray]:
    """Each map cropped to its frame's box and resized to the frame's (H, W), float32.

    Blind pixels take the lowest value of the judged ones, so thresholding the map with the
    image threshold never marks a region the score did not come from.
    """
    host = maps[:, 0].float().cpu().numpy()
    out: list[np.ndarray] = []
    for amap, region in zip(host, regions, strict=True):
        top, left, h, w = region.box
        crop = np.array(amap[top : top + h, left : left + w])
        if region.blind is not None and not region.blind.all():
            crop[region.blind] = crop[~region.blind].min()
        if (h, w) != region.shape:
            crop = cv2.resize(crop, region.shape[::-1], interpolation=cv2.INTER_LINEAR)
        out.append(crop.astype(np.float32, copy=False))
    return out


def clipped_mask(frame: np.ndarray, min_share: float = 0.005) -> np.ndarray | None:
    """Pixels of ``frame`` on a plateau at its maximum or minimum value (sensor clipping).

    A value counts as clipped when at least ``min_share`` of the pixels sit exactly on it:
    a clean frame has a handful of pixels at its extremes, an over- or under-exposed one has
    whole areas. None when there is no plateau.

    >>> f = np.full((10, 10), 100, np.uint8); f[:3] = 255; f[7, 7] = 0
    >>> int(clipped_mask(f).sum())
    30
    """
    if frame.dtype not in (np.uint8, np.uint16):
        return None
    top = frame.max(axis=2) if frame.ndim == 3 else frame
    bottom = frame.min(axis=2) if frame.ndim == 3 else frame
    hi, lo = top.max(), bottom.min()
    if hi == lo:
        return None
    mask: np.ndarray | None = None
    opening = np.ones((3, 3), np.uint8)
    for hit in (top == hi, bottom == lo):
        # Opening drops isolated pixels (impulses the filter kept): a plateau is an area.
        area = cv2.morphologyEx(hit.astype(np.uint8), cv2.MORPH_OPEN, opening) > 0
        if area.mean() >= min_share:
            mask = area if mask is None else mask | area
    return mask


def frame_regions(
    frames: Sequence[np.ndarray],
    settings: ModelSettings,
    clipped: Sequence[np.ndarray | None] | None = None,
) -> list[Region]:
    """The :class:`Region` of each frame in the model input of ``settings``.

    ``clipped`` gives each frame's :func:`clipped_mask` when the caller has it already.
    """
    cfg = preprocess_config(settings)
    regions = []
    for i, frame in enumerate(frames):
        shape = (int(frame.shape[0]), int(frame.shape[1]))
        box = content_box(shape, cfg)
        if clipped is not None:
            mask = clipped[i]
        else:
            mask = clipped_mask(frame) if settings.mask_clipped else None
        blind = _blind_in_box(mask, box, settings.clipped_margin) if mask is not None else None
        regions.append(Region(box=box, shape=shape, blind=blind))
    return regions


def _blind_in_box(clipped: np.ndarray, box: Box, margin: int) -> np.ndarray:
    """A frame's clipped mask resized to its box, grown by ``margin`` model-input pixels.

    The margin covers the receptive field around a plateau, where features mix clipped and
    unclipped pixels and look unusual for that reason alone.
    """
    _, _, h, w = box
    small = cv2.resize(clipped.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0.25
    if margin > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
        small = cv2.dilate(small.astype(np.uint8), kernel) > 0
    return np.asarray(small, dtype=bool)
