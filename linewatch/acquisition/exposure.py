"""Over-exposure watch: tell the operator when a camera's frames clip at white.

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

>>> watch = ExposureWatch(OverexposureConfig(clipped_share=0.05, frames=2))
>>> [watch.observe(s) for s in (0.2, 0.3, 0.3, 0.01, 0.02)]
[None, 'overexposed', None, None, 'exposure_ok']
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from linewatch.config import OverexposureConfig

ExposureChange = Literal["overexposed", "exposure_ok"]

# Every 4th row and column: a 256 x 256 frame is judged on 4096 pixels, in microseconds,
# and a clipped area of any size an operator should hear about covers many of them.
_STEP = 4


def clipped_share(pixels: np.ndarray) -> float:
    """Share of the pixels (all channels) at the frame's brightest value, sampled on a grid."""
    sample = pixels[::_STEP, ::_STEP]
    if sample.size == 0:
        return 0.0
    top = sample.max()
    if top == sample.min():
        full = np.iinfo(sample.dtype).max if sample.dtype.kind in "ui" else 1.0
        return 1.0 if top >= full else 0.0
    return float(np.count_nonzero(sample == top)) / sample.size


class ExposureWatch:
    """The over-exposure state of one camera, fed one clipped share per frame."""

    def __init__(self, cfg: OverexposureConfig) -> None:
        self.cfg = cfg
        self.overexposed = False
        self._run = 0  # frames in a row that point to the other state
        self.last_share = 0.0

    def observe(self, share: float) -> ExposureChange | None:
        """Take a frame's clipped share; the new state when it changes, else None."""
        self.last_share = share
        limit = self.cfg.clipped_share
        # Half the limit to clear: a share wavering around the limit does not flap.
        towards_other = share < limit / 2 if self.overexposed else share >= limit
        self._run = self._run + 1 if towards_other else 0
        if self._run < self.cfg.frames:
            return None
        self._run = 0
        self.overexposed = not self.overexposed
        return "overexposed" if self.overexposed else "exposure_ok"
