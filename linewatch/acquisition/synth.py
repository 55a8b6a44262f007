"""A camera that makes its frames with the synthetic data generator.

Frame ``i`` depends only on ``(seed, i)``: the same configuration replays the same
parts, defects included, whatever was read before (and after a restart).

Fault injection (``inject_loss_after``, for ``linewatch faults``): after that many
frames the camera raises :class:`SourceLost` once and cannot be opened again for
``inject_loss_s`` seconds, as an unplugged camera would; then it is back.
"""

from __future__ import annotations

import time

import numpy as np

from linewatch.acquisition.base import FrameSource, RawFrame, SourceItem, SourceLost
from linewatch.config import SynthSource
from linewatch.data.synth import DEFECTS, SURFACES, make_image
from linewatch.errors import ConfigError
from linewatch.log import get_logger


class SynthCamera(FrameSource):
    """Synthetic frames at ``cfg.fps`` (the caller paces reads); a defect in ``defect_ratio``."""

    def __init__(self, cfg: SynthSource) -> None:
        super().__init__()
        self.cfg = cfg
        self.pace_hz = cfg.fps
        self.pace_phase_s = cfg.phase_s
        self.index = 0
        """Index of the next frame."""
        self.defects = 0
        """Frames made with a defect so far."""
        self._delivered = 0  # frames read over every open, for the injected loss
        self._lost_until: float | None = None  # monotonic end of the injected loss
        self._log = get_logger("acquisition.synth")

    def open(self) -> None:
        """Start again from frame 0; :class:`ConfigError` for an unknown surface."""
        if self.cfg.surface not in SURFACES:
            raise ConfigError(
                f"synth source: unknown surface {self.cfg.surface!r} (one of {', '.join(SURFACES)})"
            )
        if self._lost_until is not None and time.monotonic() < self._lost_until:
            left = self._lost_until - time.monotonic()
            raise SourceLost(f"synth camera: unplugged (fault injection), back in {left:.1f} s")
        self.index = 0
        self.defects = 0
        self._log.info(
            "synth_opened",
            surface=self.cfg.surface,
            size=self.cfg.size,
            seed=self.cfg.seed,
        )

    def read(self) -> SourceItem | None:
        """The next synthetic frame; None once stopping (the process limits the count)."""
        if self.stopping:
            return None
        if self.cfg.inject_loss_after == self._delivered and self._lost_until is None:
            self._lost_until = time.monotonic() + self.cfg.inject_loss_s
            raise SourceLost(
                f"synth camera: unplugged after {self._delivered} frames (fault injection)"
            )
        image, defect = self.make(self.index)
        self._delivered += 1
        self.index += 1
        self.defects += defect is not None
        return RawFrame(image, time.time_ns(), None, None)

    def close(self) -> None:
        """Nothing to release."""

    def make(self, index: int) -> tuple[np.ndarray, str | None]:
        """Frame ``index`` and the defect drawn on it (None for a good part)."""
        rng = np.random.default_rng([self.cfg.seed, index])
        defect: str | None = None
        if rng.random() < self.cfg.defect_ratio:
            defect = str(DEFECTS[int(rng.integers(len(DEFECTS)))])
        image, _mask = make_image(rng, self.cfg.surface, self.cfg.size, defect)
        return image, defect
