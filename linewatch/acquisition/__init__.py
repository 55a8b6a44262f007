"""Acquisition: camera, folder and synthetic frame sources, and the process that sends them.

A source (:class:`FrameSource`) yields :class:`RawFrame` and :class:`MissedFrames`;
:class:`linewatch.acquisition.process.AcquisitionProcess` numbers them and pushes
frames, gap notices and camera status downstream.
"""

from linewatch.acquisition.base import (
    DeviceNotFound,
    FrameSource,
    MissedFrames,
    RawFrame,
    SourceItem,
    SourceLost,
    make_source,
)

__all__ = [
    "DeviceNotFound",
    "FrameSource",
    "MissedFrames",
    "RawFrame",
    "SourceItem",
    "SourceLost",
    "make_source",
]
