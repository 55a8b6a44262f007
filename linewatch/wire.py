"""Wire-level types shared by every stage: what a frame, a result and a notice are.

These pydantic models are the contract between processes. Every stage may import
this module; it imports nothing of linewatch but errors. Encoding to and from
ZeroMQ multipart messages lives in :mod:`linewatch.transport.codec`.

Timestamps are integer nanoseconds since the Unix epoch (``time.time_ns()``), so
that processes on one host compare them without float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

WIRE_VERSION: Final = 1

PixelDType = Literal["uint8", "uint16"]
MapDType = Literal["float16", "uint8"]


class _Wire(BaseModel):
    # NaN/inf scores must cross the wire as themselves, so decision can reject them safely.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class FrameHeader(_Wire):
    """Everything known about a frame at acquisition; travels with it to the verdict."""

    kind: Literal["frame"] = "frame"
    v: Literal[1] = WIRE_VERSION
    camera: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0, description="per-camera sequence number, gap-free unless frames drop")
    part_id: str = Field(min_length=1, max_length=128)
    ts_acquired_ns: int = Field(ge=0)
    deadline_ns: int = Field(ge=0, description="verdict due by then, else fail-safe reject")
    dtype: PixelDType
    shape: tuple[int, int] | tuple[int, int, int]

    @model_validator(mode="after")
    def _check_shape(self) -> FrameHeader:
        if any(s <= 0 for s in self.shape):
            raise ValueError(f"shape must be positive, got {self.shape}")
        if len(self.shape) == 3 and self.shape[2] not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.shape[2]}")
        return self

    @property
    def frame_id(self) -> str:
        """Unique id of the frame on this line: ``<camera>:<seq>``."""
        return f"{self.camera}:{self.seq}"

    @property
    def nbytes(self) -> int:
        """Length the pixel buffer must have."""
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame: its header and its pixels (H x W or H x W x C, C = 1 or 3, RGB order)."""

    header: FrameHeader
    pixels: np.ndarray


class ResultHeader(_Wire):
    """A worker's result for one frame; the anomaly map follows as a second part."""

    kind: Literal["result"] = "result"
    v: Literal[1] = WIRE_VERSION
    frame: FrameHeader
    score: float = Field(description="image anomaly score, normalised (1.0 ~ threshold scale)")
    map_dtype: MapDType
    map_shape: tuple[int, int]
    map_scale: float = Field(1.0, gt=0, description="value = stored * map_scale (uint8 maps)")
    model_id: str
    threshold_version: str
    threshold: float
    worker: str
    ts_infer_start_ns: int
    ts_infer_end_ns: int
    batch_size: int = Field(ge=1)


class FrameAnnounce(_Wire):
    """The dispatcher tells the decision service that a frame exists and is due."""

    kind: Literal["announce"] = "announce"
    v: Literal[1] = WIRE_VERSION
    frame: FrameHeader


class FrameFailed(_Wire):
    """A frame that cannot be scored (worker died with it, bad pixels): fail-safe reject."""

    kind: Literal["failed"] = "failed"
    v: Literal[1] = WIRE_VERSION
    frame: FrameHeader
    reason: str = Field(min_length=1, max_length=64)


class GapNotice(_Wire):
    """Acquisition saw frames missing (sequence or producer frame-id gap)."""

    kind: Literal["gap"] = "gap"
    v: Literal[1] = WIRE_VERSION
    camera: str
    first_seq: int = Field(ge=0)
    last_seq: int = Field(ge=0)
    ts_detected_ns: int
    deadline_ns: int


class CameraStatus(_Wire):
    """Acquisition reports camera state changes (lost, reconnected, over-exposed) for alarms."""

    kind: Literal["camera_status"] = "camera_status"
    v: Literal[1] = WIRE_VERSION
    camera: str
    state: Literal["connected", "lost", "reconnected", "stopped", "overexposed", "underexposed",
                   "exposure_ok"]
    detail: str = ""
    ts_ns: int


DecisionMessage = Annotated[
    ResultHeader | FrameAnnounce | FrameFailed | GapNotice | CameraStatus,
    Field(discriminator="kind"),
]
