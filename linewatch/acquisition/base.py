"""The contract every frame source keeps: open, read until the end, close.

A source yields :class:`RawFrame` (pixels ready for the model, RGB or mono) and
:class:`MissedFrames` (frames that existed but cannot be delivered: a camera's
dropped buffers, an unreadable file). The acquisition process numbers both, so a
missed frame still gets a sequence number and a fail-safe verdict downstream.

Sources raise :class:`SourceLost` when their device disappears; the process
closes the source and opens it again until the device returns.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

import numpy as np

from linewatch.config import CameraSource, FolderSource, GenicamSource, SynthSource
from linewatch.errors import LinewatchError


class SourceLost(LinewatchError):
    """The device behind a source is gone (unplugged, unreachable, stalled); retry later."""


class DeviceNotFound(SourceLost):
    """No device matches the selection yet; it may still be powering up."""


@dataclass(frozen=True, slots=True)
class RawFrame:
    """One acquired frame before it is numbered.

    ``pixels`` is H x W (mono) or H x W x 3 (RGB), uint8 or uint16, C-contiguous
    and owned by the frame (never a view into a driver buffer).
    """

    pixels: np.ndarray
    ts_ns: int
    """Host clock (``time.time_ns()``) when the frame was received."""
    producer_frame_id: int | None = None
    """The camera's own frame counter, when it has one."""
    part_id: str | None = None
    """Part identity from the camera (chunk data) or the file name; None = unknown."""


MissReason = Literal["dropped", "unreadable"]


@dataclass(frozen=True, slots=True)
class MissedFrames:
    """``count`` frames existed but cannot be delivered; each still needs a verdict."""

    count: int
    reason: MissReason
    detail: str
    ts_ns: int


SourceItem = RawFrame | MissedFrames


class FrameSource(ABC):
    """A camera, a folder or a generator of frames.

    Use as a context manager or call :meth:`open` and :meth:`close`. :meth:`read`
    returns the next item, or None at the end of a finite source or once
    :meth:`request_stop` was called.
    """

    pace_hz: float | None = None
    """Rate the caller should read at; None when the source paces itself (a camera)."""
    pace_phase_s: float | None = None
    """Offset of the reads on the host's monotonic clock (see ``phase_ms``); None: none."""

    def __init__(self) -> None:
        self._stop = threading.Event()

    @abstractmethod
    def open(self) -> None:
        """Acquire the device or the file list. Raises SourceLost if it is absent."""

    @abstractmethod
    def read(self) -> SourceItem | None:
        """The next frame or miss; None at the end. Raises SourceLost if the device went."""

    @abstractmethod
    def close(self) -> None:
        """Release everything; safe to call twice and after a failed open."""

    def request_stop(self) -> None:
        """Make a blocked or later :meth:`read` return None. Safe from signal handlers."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`request_stop` was called."""
        return self._stop.is_set()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def make_source(cfg: CameraSource) -> FrameSource:
    """The source a camera's configuration describes (not yet opened)."""
    # Imported here so that a synth or folder line never loads the GenICam libraries.
    if isinstance(cfg, GenicamSource):
        from linewatch.acquisition.genicam import GenicamCamera

        return GenicamCamera(cfg)
    if isinstance(cfg, FolderSource):
        from linewatch.acquisition.folder import FolderReplay

        return FolderReplay(cfg)
    if isinstance(cfg, SynthSource):
        from linewatch.acquisition.synth import SynthCamera

        return SynthCamera(cfg)
    raise TypeError(f"unknown camera source {type(cfg).__name__}")
