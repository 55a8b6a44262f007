"""Wire messages to ZeroMQ multipart messages and back, validated at every receiver.

Following pyzmq's serialization guide: a small JSON header (a pydantic model with a
version field) in the first part, then the raw pixel or map buffer, sent and received
with ``copy=False`` so that a frame's pixels are never copied between the camera
buffer and the worker's numpy array. Nothing here uses pickle: a receiver trusts no
sender, so every decoder either returns a validated value or raises
:class:`BadMessage`; receivers count it with :class:`BadMessageCounter` and go on.

Multipart layouts::

    frame                      [FrameHeader JSON, pixels]   (with gap / camera status
                                                             notices on the frames channel)
    result                     [ResultHeader JSON, anomaly map]
    notice                     [FrameAnnounce | FrameFailed | GapNotice | CameraStatus JSON]
    dispatcher -> worker       [control JSON, FrameHeader JSON, pixels] or [control JSON]
    worker -> dispatcher       [control JSON]   (ready / heartbeat / done)

Pixels and maps are little-endian, C order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from linewatch.errors import WireError
from linewatch.log import get_logger
from linewatch.wire import (
    WIRE_VERSION,
    CameraStatus,
    DecisionMessage,
    Frame,
    FrameAnnounce,
    FrameFailed,
    FrameHeader,
    GapNotice,
    ResultHeader,
)

HEADER_MAX_BYTES = 64 * 1024
"""A JSON header larger than this is refused unparsed (headers are a few hundred bytes)."""

Part = zmq.Frame | bytes | memoryview
"""One received part: a zero-copy :class:`zmq.Frame` or plain bytes."""

Notice = FrameAnnounce | FrameFailed | GapNotice | CameraStatus
"""Single-part messages on the decision channel."""

_M = TypeVar("_M", bound=BaseModel)


class BadMessage(WireError):
    """A received message failed validation.

    ``reason`` is one snake_case word for counting (``bad_json``, ``wrong_version``,
    ``length_mismatch``, ...); ``detail`` says what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- frames, results


def encode_frame(header: FrameHeader, pixels: np.ndarray) -> list[bytes | memoryview]:
    """``[header JSON, pixel buffer]`` for ``send_multipart(..., copy=False)``.

    The pixel part is a view of ``pixels`` (copied only if not C-contiguous), so the
    caller must not write to the array until the message has left the socket.
    """
    return [_json(header), _array_view(pixels, header.dtype, header.shape, "pixels")]


def decode_frame(parts: Sequence[Part]) -> Frame:
    """Validate ``[header JSON, pixels]`` and view the pixels as an array without copying.

    The array shares memory with the received buffer and is read-only; copy it to
    change it. Raises :class:`BadMessage`.
    """
    _expect_parts(parts, 2, "frame")
    header = _validate(FrameHeader, _header_object(parts[0], {"frame"}))
    return Frame(header, _array_from(parts[1], header.dtype, header.shape, "pixels"))


def decode_camera_message(parts: Sequence[Part]) -> Frame | GapNotice | CameraStatus:
    """Anything acquisition sends on the frames channel: a frame, a gap or a camera status."""
    if not parts:
        raise BadMessage("missing_part", "empty message")
    obj = _header_object(parts[0], {"frame", "gap", "camera_status"})
    if obj["kind"] == "frame":
        _expect_parts(parts, 2, "frame")
        header = _validate(FrameHeader, obj)
        return Frame(header, _array_from(parts[1], header.dtype, header.shape, "pixels"))
    _expect_parts(parts, 1, str(obj["kind"]))
    if obj["kind"] == "gap":
        return _validate(GapNotice, obj)
    return _validate(CameraStatus, obj)


def encode_result(header: ResultHeader, amap: np.ndarray) -> list[bytes | memoryview]:
    """``[result header JSON, anomaly map buffer]``; the map is sent without copying."""
    return [_json(header), _array_view(amap, header.map_dtype, header.map_shape, "map")]


def decode_result(parts: Sequence[Part]) -> tuple[ResultHeader, np.ndarray]:
    """Validate ``[result header JSON, map]``; the map array views the received buffer."""
    _expect_parts(parts, 2, "result")
    header = _validate(ResultHeader, _header_object(parts[0], {"result"}))
    return header, _array_from(parts[1], header.map_dtype, header.map_shape, "map")


# --------------------------------------------------------------------------- decision channel

_DECISION_ADAPTER: TypeAdapter[DecisionMessage] = TypeAdapter(DecisionMessage)
_DECISION_KINDS = {"result", "announce", "failed", "gap", "camera_status"}


def encode_message(model: Notice) -> list[bytes]:
    """A single-part notice for the decision channel (results use :func:`encode_result`)."""
    return [_json(model)]


def decode_decision_message(parts: Sequence[Part]) -> tuple[DecisionMessage, np.ndarray | None]:
    """Any message on the decision channel: a notice and ``None``, or a result and its map."""
    if not parts:
        raise BadMessage("missing_part", "empty message")
    obj = _header_object(parts[0], _DECISION_KINDS)
    if obj["kind"] == "result":
        _expect_parts(parts, 2, "result")
        header = _validate(ResultHeader, obj)
        return header, _array_from(parts[1], header.map_dtype, header.map_shape, "map")
    _expect_parts(parts, 1, str(obj["kind"]))
    try:
        return _DECISION_ADAPTER.validate_python(obj), None
    except ValidationError as exc:
        raise BadMessage("bad_header", _first_error(exc)) from None


# --------------------------------------------------------------------------- dispatcher <-> worker


class _Control(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = WIRE_VERSION


class WorkerReady(_Control):
    """A worker (re)registers: it can hold ``credit`` frames; ``epoch`` fences older frames."""

    kind: Literal["ready"] = "ready"
    worker: str = Field(min_length=1, max_length=128)
    epoch: int = Field(ge=0)
    credit: int = Field(ge=1, le=100_000)


class WorkerHeartbeat(_Control):
    """The worker's poll loop is alive."""

    kind: Literal["heartbeat"] = "heartbeat"
    worker: str = Field(min_length=1, max_length=128)
    epoch: int = Field(ge=0)


class WorkerDone(_Control):
    """The worker pushed results (or failures) for these frames; their credit returns."""

    kind: Literal["done"] = "done"
    worker: str = Field(min_length=1, max_length=128)
    epoch: int = Field(ge=0)
    frame_ids: list[str] = Field(max_length=100_000)


WorkerMessage = Annotated[WorkerReady | WorkerHeartbeat | WorkerDone, Field(discriminator="kind")]


class DispatchFrame(_Control):
    """Leads a frame sent to a worker; ``epoch`` is the registration it was sent to."""

    kind: Literal["frame"] = "frame"
    epoch: int = Field(ge=0)


class DispatcherHeartbeat(_Control):
    """The dispatcher is alive (workers re-register when it falls silent)."""

    kind: Literal["heartbeat"] = "heartbeat"


class DispatcherReset(_Control):
    """The dispatcher does not know this worker (declared dead, or restarted): re-register."""

    kind: Literal["reset"] = "reset"
    epoch: int = Field(ge=0, description="the epoch of the message it answers")
    reason: str = Field(max_length=64)


DispatcherMessage = Annotated[
    DispatchFrame | DispatcherHeartbeat | DispatcherReset, Field(discriminator="kind")
]

_WORKER_ADAPTER: TypeAdapter[WorkerMessage] = TypeAdapter(WorkerMessage)
_DISPATCHER_ADAPTER: TypeAdapter[DispatcherMessage] = TypeAdapter(DispatcherMessage)


def encode_control(model: _Control) -> bytes:
    """One control message as JSON bytes."""
    return _json(model)


def decode_worker_message(part: Part) -> WorkerMessage:
    """A worker's ready / heartbeat / done message; raises :class:`BadMessage`."""
    obj = _header_object(part, {"ready", "heartbeat", "done"})
    try:
        return _WORKER_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        raise BadMessage("bad_control", _first_error(exc)) from None


def decode_dispatch(parts: Sequence[Part]) -> tuple[DispatcherMessage, Frame | None]:
    """A dispatcher message to a worker: a control message and, for ``frame``, the frame."""
    if not parts:
        raise BadMessage("missing_part", "empty message")
    obj = _header_object(parts[0], {"frame", "heartbeat", "reset"})
    try:
        control = _DISPATCHER_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        raise BadMessage("bad_control", _first_error(exc)) from None
    if isinstance(control, DispatchFrame):
        return control, decode_frame(parts[1:])
    _expect_parts(parts, 1, control.kind)
    return control, None


# --------------------------------------------------------------------------- counting


class BadMessageCounter:
    """Counts bad messages per reason and logs them without flooding the log.

    Every receiver owns one: a bad message is counted, logged as ``bad_message``
    and skipped; it never stops the receiver. The first ``log_first`` of each
    reason are logged, then every ``log_every``-th with the running count.
    """

    def __init__(self, source: str, log_first: int = 10, log_every: int = 1000) -> None:
        self.source = source
        self.counts: dict[str, int] = {}
        self._log_first = log_first
        self._log_every = log_every
        self._log = get_logger("transport")

    @property
    def total(self) -> int:
        """Bad messages seen, all reasons together."""
        return sum(self.counts.values())

    def record(self, error: BadMessage, **context: Any) -> None:
        """Count one bad message and log it (throttled per reason)."""
        count = self.counts.get(error.reason, 0) + 1
        self.counts[error.reason] = count
        if count <= self._log_first or count % self._log_every == 0:
            self._log.warning(
                "bad_message", source=self.source, reason=error.reason, detail=error.detail,
                count=count, **context,
            )


# --------------------------------------------------------------------------- internals


def _json(model: BaseModel) -> bytes:
    return model.model_dump_json().encode()


def _expect_parts(parts: Sequence[Part], n: int, what: str) -> None:
    if len(parts) < n:
        raise BadMessage("missing_part", f"{what} needs {n} part(s), got {len(parts)}")
    if len(parts) > n:
        raise BadMessage("extra_part", f"{what} needs {n} part(s), got {len(parts)}")


def _buffer(part: Part) -> memoryview:
    view = part.buffer if isinstance(part, zmq.Frame) else memoryview(part)
    try:
        return view.cast("B") if view.format != "B" or view.ndim != 1 else view
    except TypeError as exc:  # a non-contiguous view cannot be read as bytes
        raise BadMessage("bad_buffer", str(exc)) from None


def _header_object(part: Part, kinds: set[str]) -> dict[str, Any]:
    """Parse a JSON header and check its version and kind before full validation."""
    raw = _buffer(part)
    if raw.nbytes > HEADER_MAX_BYTES:
        raise BadMessage("header_too_large", f"{raw.nbytes} bytes > {HEADER_MAX_BYTES}")
    try:
        obj = json.loads(raw.tobytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise BadMessage("bad_json", str(exc)[:200]) from None
    if not isinstance(obj, dict):
        raise BadMessage("bad_json", f"header is a {type(obj).__name__}, not an object")
    version = obj.get("v")
    # An exact int: JSON's 1.0 and true compare equal to 1 in Python but are no version.
    if type(version) is not int or version != WIRE_VERSION:
        raise BadMessage("wrong_version", f"v={obj.get('v')!r}, this end speaks {WIRE_VERSION}")
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        raise BadMessage("wrong_kind", f"kind={obj.get('kind')!r}, expected {sorted(kinds)}")
    return obj


def _validate(model: type[_M], obj: dict[str, Any]) -> _M:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise BadMessage("bad_header", _first_error(exc)) from None


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "(header)"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"[:300]


def _wire_dtype(name: str) -> np.dtype[Any]:
    return np.dtype(name).newbyteorder("<")


def _array_view(array: np.ndarray, dtype: str, shape: tuple[int, ...], what: str) -> memoryview:
    if array.dtype.name != dtype or tuple(array.shape) != tuple(shape):
        raise BadMessage(
            "header_mismatch",
            f"{what} are {array.dtype.name} {tuple(array.shape)}, header says {dtype} {shape}",
        )
    wire = np.ascontiguousarray(array, dtype=_wire_dtype(dtype))  # no copy when already so
    return wire.data.cast("B")


def _array_from(part: Part, dtype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    buf = _buffer(part)
    # math.prod on Python ints: a hostile shape cannot overflow into a matching length.
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if buf.nbytes != expected:
        raise BadMessage(
            "length_mismatch",
            f"{what} have {buf.nbytes} bytes, header says {dtype} {tuple(shape)} = {expected}",
        )
    array = np.frombuffer(buf, dtype=_wire_dtype(dtype)).reshape(shape)
    # The buffer may be the sender's own memory (inproc), so nobody may write through it.
    array.flags.writeable = False
    return array
