"""Exposure watch: tell the operator when a camera's frames clip at white or go dark.

A lamp turned up, a shutter time set too long or daylight on the part clip the brightest
parts of the image at the sensor's full scale. The model cannot judge texture that is not
there any more and rejects more good parts (``evaluate --corrupt light:strong``), so the
line should say why before an operator starts to doubt the model: acquisition watches the
share of each frame's pixels that sit at its brightest value and reports the camera
``overexposed`` (a warning alarm) when it stays above ``clipped_share`` for ``frames``
frames in a row, and ``exposure_ok`` when it has stayed below half of that as long.

The brightest value of the frame itself stands for the sensor's full scale, so the watch
needs no bit depth (12 bits in a uint16 clip at 4095). An image that is not clipped holds
few pixels at exactly its maximum: :func:`clipped_share` of the 204 magnetic-tile
test/good images is 0.03 % (median) and 3.5 % at most; under ``light:strong`` 0.5 %
(median) and up to 78 %, 5 % or more in 28 % of them. A frame of one value throughout
counts as clipped only at the dtype's full scale (a white frame, not a black one). The
GenTL simulator ``viky.cti`` delivers frames that are white but for a few pixels (99.8 %
of the values at 255), so a line on it reports its cameras ``overexposed``, rightly.

A failing lamp or a closed aperture does the opposite: the image goes dark and shot noise
grows against the texture (``evaluate --corrupt light:low``). :func:`bright_level` is the
99th percentile of a frame's pixels as a share of full scale, which a few hot pixels cannot
hold up; the camera is ``underexposed`` (a warning alarm) when it stays below
``level`` for ``frames`` frames and ``exposure_ok`` again once it has stayed at 1.5 x that
as long. Full scale is the pixel type's unless the camera's ``full_scale`` says otherwise
(a 12-bit sensor in 16-bit pixels). On magnetic-tile the 204 good test images have levels
of 0.28 to 1.0 (median 0.67) and 0.07 to 0.35 under ``light:low`` (median 0.19; 49 % of all
437 test images under 0.2, 74 % under 0.25), so the default level 0.2 flags none of the data
set's own exposures. That data set mixes six exposures and draws a gain per image; a line's
camera sees one exposure, and a dimmed lamp moves all its frames together. The figures come
from ``linewatch evaluate MODEL DATA --scores S.csv [--corrupt light:low]`` (its
``bright_level`` and ``clipped_share`` columns are these functions).

>>> watch = ExposureWatch(OverexposureConfig(clipped_share=0.05, frames=2))
>>> [watch.observe(s) for s in (0.2, 0.3, 0.3, 0.01, 0.02)]
[None, 'overexposed', None, None, 'exposure_ok']
>>> dark = DarkWatch(UnderexposureConfig(level=0.2, frames=2))
>>> [dark.observe(v) for v in (0.1, 0.1, 0.25, 0.35, 0.4)]
[None, 'underexposed', None, None, 'exposure_ok']
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from linewatch.config import OverexposureConfig, UnderexposureConfig

ExposureChange = Literal["overexposed", "underexposed", "exposure_ok"]

# Every 4th row and column: a 256 x 256 frame is judged on 4096 pixels, in microseconds,
# and a clipped area of any size an operator should hear about covers many of them. Larger
# frames are sampled more sparsely, to about as many pixels as a 512 x 512 one (a
# 2048 x 2048 RGB frame took 6 ms for the bright level on every 4th pixel, 0.2 ms now).
_STEP = 4
_MAX_SAMPLES = 128 * 128
# A dark camera is cleared only well above the level, so a level wavering near it does not flap.
_DARK_CLEAR = 1.5


def _grid_sample(pixels: np.ndarray) -> np.ndarray:
    """Every n-th row and column (n >= 4), at most about ``_MAX_SAMPLES`` positions."""
    area = pixels.shape[0] * pixels.shape[1] if pixels.ndim >= 2 else pixels.size
    step = max(_STEP, int(np.ceil(np.sqrt(area / _MAX_SAMPLES))))
    return pixels[::step, ::step]


def clipped_share(pixels: np.ndarray) -> float:
    """Share of the pixels (all channels) at the frame's brightest value, sampled on a grid."""
    sample = _grid_sample(pixels)
    if sample.size == 0:
        return 0.0
    top = sample.max()
    if top == sample.min():
        full = np.iinfo(sample.dtype).max if sample.dtype.kind in "ui" else 1.0
        return 1.0 if top >= full else 0.0
    return float(np.count_nonzero(sample == top)) / sample.size


def bright_level(pixels: np.ndarray, full_scale: int | None = None) -> float:
    """99th percentile of the pixels (all channels, sampled on a grid) over full scale.

    ``full_scale`` defaults to the integer pixel type's largest value (1.0 for floats).

    >>> bright_level(np.full((8, 8), 51, np.uint8))
    0.2
    """
    sample = _grid_sample(pixels).ravel()
    if sample.size == 0:
        return 0.0
    if full_scale is None:
        full_scale = np.iinfo(sample.dtype).max if sample.dtype.kind in "ui" else 1
    k = int(0.99 * (sample.size - 1))
    return float(np.partition(sample, k)[k]) / float(full_scale)


class _Watch:
    """One camera's state for one exposure fault, fed one measure per frame.

    The state flips only after ``frames`` frames in a row point the other way, with a
    margin between entering and leaving it, so a measure wavering at the limit does not flap.
    """

    entered: ExposureChange
    measure_name: str

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self.active = False
        self.last = 0.0
        self._run = 0

    def measure(self, pixels: np.ndarray) -> float:
        """This watch's measure of a frame."""
        raise NotImplementedError

    def describe(self, change: ExposureChange) -> str:
        """What the operator reads with the alarm of ``change``."""
        raise NotImplementedError

    def _towards_other(self, value: float) -> bool:
        raise NotImplementedError

    def observe(self, value: float) -> ExposureChange | None:
        """Take a frame's measure; the new state when it changes, else None."""
        self.last = value
        self._run = self._run + 1 if self._towards_other(value) else 0
        if self._run < self.frames:
            return None
        self._run = 0
        self.active = not self.active
        return self.entered if self.active else "exposure_ok"


class ExposureWatch(_Watch):
    """Over-exposure, fed :func:`clipped_share`: on above ``clipped_share``, off below half."""

    entered = "overexposed"
    measure_name = "clipped_share"

    def __init__(self, cfg: OverexposureConfig) -> None:
        super().__init__(cfg.frames)
        self.cfg = cfg

    @property
    def overexposed(self) -> bool:
        """True while the camera is reported over-exposed."""
        return self.active

    def measure(self, pixels: np.ndarray) -> float:
        """:func:`clipped_share` of the frame."""
        return clipped_share(pixels)

    def describe(self, change: ExposureChange) -> str:
        """The clipped share against the limit, and what to check."""
        cfg, what = self.cfg, f"{self.last:.0%} of the frame at its brightest value"
        if change == "overexposed":
            return (f"{what}, over {cfg.clipped_share:.0%} for {cfg.frames} frames: check "
                    "lighting and exposure time")
        return f"{what}, under {cfg.clipped_share / 2:.1%} for {cfg.frames} frames"

    def _towards_other(self, value: float) -> bool:
        limit = self.cfg.clipped_share
        return value < limit / 2 if self.active else value >= limit


class DarkWatch(_Watch):
    """Under-exposure, fed :func:`bright_level`: on below ``level``, off at 1.5 x it."""

    entered = "underexposed"
    measure_name = "bright_level"

    def __init__(self, cfg: UnderexposureConfig) -> None:
        super().__init__(cfg.frames)
        self.cfg = cfg

    @property
    def underexposed(self) -> bool:
        """True while the camera is reported under-exposed."""
        return self.active

    def measure(self, pixels: np.ndarray) -> float:
        """:func:`bright_level` of the frame against the camera's full scale."""
        return bright_level(pixels, self.cfg.full_scale)

    def describe(self, change: ExposureChange) -> str:
        """The bright level against the limit, and what to check."""
        cfg, what = self.cfg, f"brightest 1 % of the frame at {self.last:.0%} of full scale"
        if change == "underexposed":
            return (f"{what}, under {cfg.level:.0%} for {cfg.frames} frames: check lighting, "
                    "aperture and exposure time (or cameras.underexposure.full_scale for a "
                    "sensor of fewer bits than its pixel type)")
        return f"{what}, over {cfg.level * _DARK_CLEAR:.0%} for {cfg.frames} frames"

    def _towards_other(self, value: float) -> bool:
        limit = self.cfg.level
        return value >= limit * _DARK_CLEAR if self.active else value < limit
