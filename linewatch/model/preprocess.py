"""The one pre-processing path from camera pixels to backbone input (method.md §0).

Training, evaluation and the inference worker all call :func:`preprocess_batch`, so an image
is turned into exactly the same tensor wherever it is scored. Per image, in this order:

1. to float32 in [0, 1] (uint8 / 255, uint16 / 65535; float input is taken as already in
   [0, 1], which is what :func:`augment` returns);
2. resize to the model input, stretched or letterboxed (``keep_aspect``), ``INTER_AREA`` when
   shrinking, ``INTER_LINEAR`` when enlarging;
3. illumination normalisation: none, local contrast normalisation or homomorphic filtering;
4. gray to three channels, letterbox padding with the normalisation mean (so it becomes 0);
5. ``(x - mean) / std`` on the target device.

Illumination normalisation runs after the resize on purpose: its window sizes are then in
model-input pixels, so one configuration behaves the same for a 640 px and a 5 Mpx camera,
and its cost follows the model input, not the sensor. Every step works on one image at a
time, so an image's tensor does not depend on what else is in the batch.

Images are RGB (the wire order, see :mod:`linewatch.wire`), HxW, HxWx1 or HxWx3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from linewatch.errors import DataError
from linewatch.model.backbone import TF_LITE_MEAN, TF_LITE_STD, get_backbone_spec

__all__ = [
    "AugmentConfig",
    "ExposureJitter",
    "PreprocessConfig",
    "augment",
    "content_box",
    "jitter_exposure",
    "preprocess_batch",
]

Illumination = Literal["none", "lcn", "homomorphic"]
Triple = tuple[float, float, float]

_FULL_SCALE = {np.dtype(np.uint8): np.float32(255), np.dtype(np.uint16): np.float32(65535)}
# log(1 + x) is meant for intensities in pixel counts (0..255): there it is ~log(x) and splits
# light x reflectance into a sum. On [0, 1] it is nearly linear and would only subtract the
# gradient, leaving the dark side's texture with a third of its contrast.
_HOMOMORPHIC_SCALE = np.float32(255)
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class PreprocessConfig(BaseModel):
    """How frames become backbone input; stored in the model file with the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int | tuple[int, int] = Field(256, description="model input side, or (height, width)")
    keep_aspect: bool = Field(False, description="letterbox instead of stretching")
    illumination: Illumination = "none"
    lcn_window: int = Field(31, ge=3, description="LCN window side (model-input pixels, odd)")
    lcn_eps: float = Field(
        0.02, gt=0, description="added to the local std; stops flat areas blowing up"
    )
    lcn_gain: float = Field(0.2, gt=0, description="LCN output = 0.5 + gain * z, clipped to [0, 1]")
    homomorphic_sigma: float = Field(
        16.0, gt=0, description="Gaussian low-pass of the log image (model-input pixels)"
    )
    mean: Triple = TF_LITE_MEAN
    std: Triple = TF_LITE_STD

    @field_validator("size")
    @classmethod
    def _positive_size(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        sides = (v, v) if isinstance(v, int) else v
        if min(sides) < 8:
            raise ValueError(f"size must be at least 8 pixels, got {v}")
        return v

    @field_validator("lcn_window")
    @classmethod
    def _odd_window(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"lcn_window must be odd so the window is centred, got {v}")
        return v

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: Triple) -> Triple:
        if min(v) <= 0:
            raise ValueError(f"std must be positive, got {v}")
        return v

    @property
    def hw(self) -> tuple[int, int]:
        """Output (height, width)."""
        return (self.size, self.size) if isinstance(self.size, int) else self.size

    @classmethod
    def for_backbone(cls, name: str, **settings: object) -> PreprocessConfig:
        """A config whose mean/std are the ones backbone ``name`` expects."""
        spec = get_backbone_spec(name)
        return cls.model_validate({"mean": spec.mean, "std": spec.std, **settings})


class AugmentConfig(BaseModel):
    """Training augmentation of method.md eq. 12: ``Rot(Affine(x)) + N(0, sigma^2)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rotation_deg: float = Field(5.0, ge=0, le=180, description="rotation drawn from ±this")
    scale: float = Field(0.05, ge=0, lt=1, description="zoom drawn from 1 ± this")
    shear_deg: float = Field(2.0, ge=0, lt=45, description="shear drawn from ±this")
    translate: float = Field(0.02, ge=0, lt=0.5, description="shift, fraction of the side")
    noise_sigma: float = Field(0.01, ge=0, description="Gaussian noise std on the [0, 1] scale")
    hflip: bool = False
    vflip: bool = False


class ExposureJitter(BaseModel):
    """Exposure drift of a line, simulated on good images for the normal statistics.

    Each copy multiplies a good image by a gain (drawn log-uniformly, so halving and doubling
    are equally likely) and adds an offset, then clips at the sensor's range, as a lamp that
    ages, a shutter that drifts or a part that reflects more does. Gain and offset alone are
    undone by the intensity standardisation; what the copies teach the memory is the clipped
    and partly clipped texture a real over- or under-exposure leaves behind.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    copies: int = Field(2, ge=0, description="jittered copies per good image; 0 = off")
    gain: tuple[float, float] = Field(
        (0.8, 1.5), description="gain range, drawn log-uniformly (brighter more than darker)"
    )
    offset: tuple[float, float] = Field(
        (-0.05, 0.10), description="offset range on the [0, 1] scale"
    )

    @field_validator("gain", "offset")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError(f"range must be (low, high), got {v}")
        return v

    @field_validator("gain")
    @classmethod
    def _positive_gain(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] <= 0:
            raise ValueError(f"gain must be positive, got {v}")
        return v


def jitter_exposure(
    images: Sequence[np.ndarray], rng: np.random.Generator, cfg: ExposureJitter
) -> list[np.ndarray]:
    """One exposure-jittered copy of each camera image, in its dtype (:class:`ExposureJitter`).

    The result stays ``uint8`` / ``uint16`` so it takes the runtime path of a real frame:
    the clipped-plateau detection and the impulse filter see it as they would see a camera
    frame. The draws come only from ``rng``.

    >>> img = np.array([[100, 200]], np.uint8)
    >>> double = ExposureJitter(gain=(2, 2), offset=(0, 0))
    >>> jitter_exposure([img], np.random.default_rng(0), double)[0]
    array([[200, 255]], dtype=uint8)
    """
    out = []
    lo, hi = np.log(cfg.gain[0]), np.log(cfg.gain[1])
    for i, image in enumerate(images):
        if image.dtype not in _FULL_SCALE:
            raise DataError(f"image {i}: exposure jitter needs uint8 or uint16, got {image.dtype}")
        full = _FULL_SCALE[image.dtype]
        gain = np.float32(np.exp(rng.uniform(lo, hi)))
        offset = np.float32(rng.uniform(*cfg.offset) * full)
        x = image.astype(np.float32) * gain + offset
        out.append(np.rint(np.clip(x, 0.0, full)).astype(image.dtype))
    return out


def content_box(image_hw: tuple[int, int], cfg: PreprocessConfig) -> tuple[int, int, int, int]:
    """Where the image lies in the model input: ``(top, left, height, width)``.

    The whole input when stretching; the letterboxed area otherwise. Maps an anomaly map back
    onto the camera frame.
    """
    out_h, out_w = cfg.hw
    if not cfg.keep_aspect:
        return 0, 0, out_h, out_w
    h, w = image_hw
    scale = min(out_h / h, out_w / w)
    new_h = min(out_h, max(1, round(h * scale)))
    new_w = min(out_w, max(1, round(w * scale)))
    return (out_h - new_h) // 2, (out_w - new_w) // 2, new_h, new_w


def preprocess_batch(
    images: Sequence[np.ndarray],
    cfg: PreprocessConfig,
    device: torch.device | str = "cpu",
    *,
    channels_last: bool = False,
) -> torch.Tensor:
    """Camera images (any size, uint8/uint16, gray or RGB) -> normalised float (B, 3, H, W).

    Raises :class:`DataError` naming the batch index of an image it cannot use.
    """
    out_h, out_w = cfg.hw
    prepared = [_prepare(image, i, cfg) for i, image in enumerate(images)]
    batch = np.stack(prepared) if prepared else np.zeros((0, out_h, out_w, 3), np.float32)
    x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)
    mean = torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def _prepare(image: np.ndarray, index: int, cfg: PreprocessConfig) -> np.ndarray:
    """One image -> (H, W, 3) float32 in the backbone's [0, 1] space, before mean/std."""
    x = _to_unit_float(image, index)
    top, left, h, w = content_box(x.shape[:2], cfg)
    x = _resize(x, h, w)
    x = _normalise_illumination(x, cfg)
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], 3, axis=2)
    out_h, out_w = cfg.hw
    if (h, w) != (out_h, out_w):
        canvas = np.empty((out_h, out_w, 3), np.float32)
        canvas[:] = np.asarray(cfg.mean, np.float32)
        canvas[top : top + h, left : left + w] = x
        x = canvas
    return x


def _to_unit_float(image: np.ndarray, index: int) -> np.ndarray:
    """uint8/uint16/float -> contiguous float32 in [0, 1]; (H, W) for gray, (H, W, 3) for RGB."""
    if not isinstance(image, np.ndarray):
        raise DataError(f"image {index} of the batch: expected a numpy array, got {type(image)}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise DataError(
            f"image {index} of the batch: shape {image.shape} is not HxW, HxWx1 or HxWx3"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise DataError(f"image {index} of the batch: empty image {image.shape}")
    if image.dtype in _FULL_SCALE:
        # Division, not multiplication by 1/255: full scale must map to exactly 1.0.
        return np.ascontiguousarray(image, dtype=np.float32) / _FULL_SCALE[image.dtype]
    if image.dtype in _FLOATS:
        return np.ascontiguousarray(image, dtype=np.float32)
    raise DataError(
        f"image {index} of the batch: dtype {image.dtype} not supported (uint8, uint16, float)"
    )


def _resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    if x.shape[:2] == (h, w):
        return x
    shrinking = h <= x.shape[0] and w <= x.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(x, (w, h), interpolation=interpolation), np.float32)


def _normalise_illumination(x: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    if cfg.illumination == "lcn":
        return _local_contrast(x, cfg.lcn_window, cfg.lcn_eps, cfg.lcn_gain)
    if cfg.illumination == "homomorphic":
        return _homomorphic(x, cfg.homomorphic_sigma)
    return x


def _local_contrast(x: np.ndarray, window: int, eps: float, gain: float) -> np.ndarray:
    """``(x - mean_k) / (std_k + eps)`` per channel, mapped back to [0, 1] around 0.5.

    The re-centring keeps the backbone's input in the range its ImageNet weights know.
    """
    side = min(window, _largest_odd(min(x.shape[:2])))
    k = (side, side)
    mean = cv2.blur(x, k, borderType=cv2.BORDER_REFLECT_101)
    mean_sq = cv2.blur(x * x, k, borderType=cv2.BORDER_REFLECT_101)
    std = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))
    z = (x - mean) / (std + np.float32(eps))
    return np.clip(np.float32(0.5) + np.float32(gain) * z, 0.0, 1.0, dtype=np.float32)


def _homomorphic(x: np.ndarray, sigma: float) -> np.ndarray:
    """``exp(HPF(log(1 + x))) - 1`` on a 0..255 intensity scale (see ``_HOMOMORPHIC_SCALE``).

    The high-pass is the log image minus its Gaussian low-pass of width ``sigma``.

    The image's mean log level is added back so brightness stays where it was on average
    while slow illumination changes (gradients, vignetting) are removed.
    """
    log = np.log1p(x * _HOMOMORPHIC_SCALE)
    low = cv2.GaussianBlur(log, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
    level = log.mean(axis=(0, 1), dtype=np.float64).astype(np.float32)
    out = np.expm1(log - low + level) / _HOMOMORPHIC_SCALE
    return np.clip(out, 0.0, 1.0, dtype=np.float32)


def _largest_odd(n: int) -> int:
    return n if n % 2 else max(1, n - 1)


def augment(
    images: Sequence[np.ndarray], rng: np.random.Generator, cfg: AugmentConfig
) -> list[np.ndarray]:
    """Randomly rotated, affinely warped, noisy copies for training (method.md eq. 12).

    Returns float32 images in [0, 1] with the input's shape (gray stays gray), ready for
    :func:`preprocess_batch`. Rotation and affine are one warp (one interpolation) with
    reflected borders, so no black corners appear that the model would learn as normal.
    The draws come only from ``rng``: the same seed gives the same augmentations.
    """
    out = []
    for i, image in enumerate(images):
        x = _to_unit_float(image, i)
        x = _warp(x, _random_affine(x.shape[0], x.shape[1], rng, cfg))
        if cfg.hflip and rng.random() < 0.5:
            x = x[:, ::-1]
        if cfg.vflip and rng.random() < 0.5:
            x = x[::-1]
        if cfg.noise_sigma > 0:
            x = x + rng.normal(0.0, cfg.noise_sigma, size=x.shape).astype(np.float32)
        x = np.clip(x, 0.0, 1.0, dtype=np.float32)
        if image.ndim == 3 and image.shape[2] == 1:
            x = x[:, :, None]
        out.append(np.ascontiguousarray(x))
    return out


def _random_affine(h: int, w: int, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """2x3 matrix: rotation about the centre applied after scale, shear and shift."""
    angle = math.radians(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
    zoom = rng.uniform(1.0 - cfg.scale, 1.0 + cfg.scale)
    shear = math.tan(math.radians(rng.uniform(-cfg.shear_deg, cfg.shear_deg)))
    shift = rng.uniform(-cfg.translate, cfg.translate, size=2) * (w, h)
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    affine = np.array([[zoom, zoom * shear], [0.0, zoom]])
    linear = rotation @ affine
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    offset = centre - linear @ centre + shift
    return np.hstack([linear, offset[:, None]]).astype(np.float64)


def _warp(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    h, w = x.shape[:2]
    warped = cv2.warpAffine(
        x, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )
    return np.asarray(warped, np.float32)
