"""What the decision service writes to Redis: stream keys and flat stream records.

A Redis stream entry is a flat map of strings, so every record here is a pydantic
model whose fields are scalars, written with :meth:`StreamRecord.to_fields` and read
back with :meth:`StreamRecord.from_fields`:

- ``int`` and ``str`` as text, ``float`` with ``repr`` (round-trips exactly,
  ``nan``/``inf`` included), ``bool`` as ``"1"``/``"0"``, ``None`` as ``""``.

Readers ignore fields they do not know, so a newer writer may add fields without
breaking older consumers. :func:`describe_records` renders every field of every
record as a Markdown table; the README's stream reference is generated from it.

>>> rec = RejectRecord(frame_id="cam0:7", part_id="P7", camera="cam0", seq=7,
...                    reason="anomaly", deadline_ns=10, ts_decided_ns=9)
>>> rec.to_fields()["seq"]
'7'
>>> RejectRecord.from_fields(rec.to_fields()) == rec
True
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

STREAM_KINDS = ("verdicts", "defects", "rejects", "alarms")

# Fields the frame script of the stream writer sets in Redis itself, not sent by the writer.
REDIS_STAMPED = frozenset({"ts_written_us"})

# Reasons a verdict is given. ``ok``/``anomaly`` come from a scored frame; the rest
# are fail-safe rejects. A FrameFailed notice may carry another reason (e.g. a
# worker's ``bad_pixels``), which is written as sent.
REASON_OK = "ok"
REASON_ANOMALY = "anomaly"
REASON_TIMEOUT = "timeout"
REASON_MISSED_FRAME = "missed_frame"
REASON_WORKER_LOST = "worker_lost"
REASON_BAD_RESULT = "bad_result"


class StreamKeys:
    """Redis key names of one line; every key starts with ``linewatch:<line>:``."""

    def __init__(self, line: str) -> None:
        self.line = line
        self.prefix = f"linewatch:{line}:"
        self.verdicts = self.prefix + "verdicts"
        self.defects = self.prefix + "defects"
        self.rejects = self.prefix + "rejects"
        self.alarms = self.prefix + "alarms"
        # Hash of frames announced but not yet decided; survives a decision restart.
        self.pending = self.prefix + "pending"

    def stream(self, kind: str) -> str:
        """Key of the stream ``kind`` (one of :data:`STREAM_KINDS`)."""
        if kind not in STREAM_KINDS:
            raise ValueError(f"unknown stream {kind!r}; expected one of {STREAM_KINDS}")
        return self.prefix + kind

    def done(self, frame_id: str) -> str:
        """Dedupe key set when a frame's verdict is written (its value: the entry id)."""
        return f"{self.prefix}done:{frame_id}"

    def heatmap(self, frame_id: str, region: int) -> str:
        """Key of the PNG heatmap of defect region ``region`` of a frame."""
        return f"{self.prefix}heatmap:{frame_id}:{region}"


# --------------------------------------------------------------------------- encoding


def encode_value(value: Any) -> str:
    """One field value as stream text (see the module docstring for the rules)."""
    if value is None:
        return ""
    if isinstance(value, bool):  # before int: bool is an int
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _nullable(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return type(None) in typing.get_args(annotation)
    return annotation is None or annotation is type(None)


class StreamRecord(BaseModel):
    """Base of stream records: flat scalar fields, written as a str -> str map."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stream: ClassVar[str]
    """The stream (``linewatch:<line>:<stream>``) records of this class go to."""

    def to_fields(self) -> dict[str, str]:
        """The record as stream entry fields, in declaration order; fields that Redis
        stamps itself (:data:`REDIS_STAMPED`) are left for the writer's script to add."""
        return {name: encode_value(getattr(self, name)) for name in type(self).model_fields
                if name not in REDIS_STAMPED}

    @classmethod
    def from_fields(cls, fields: Mapping[str, str] | Mapping[bytes, bytes]) -> Self:
        """Parse stream entry fields (bytes or str); unknown fields are ignored."""
        known = cls.model_fields
        data: dict[str, Any] = {}
        for raw_key, raw_value in fields.items():
            key, value = _text(raw_key), _text(raw_value)
            if key not in known:
                continue
            data[key] = None if value == "" and _nullable(known[key].annotation) else value
        return cls.model_validate(data)


# --------------------------------------------------------------------------- records

_FRAME_ID = "frame id `<camera>:<seq>`, unique on the line"
_WRITTEN_US = (
    "when Redis added the entry, us since epoch (the Redis server's clock, stamped by the "
    "writer's script); empty in entries of older writers"
)
_PART_ID = "part id from acquisition; empty for a missed frame (never acquired)"


class VerdictRecord(StreamRecord):
    """One verdict per acquired frame (stream ``verdicts``): pass, reject or fail-safe reject."""

    stream: ClassVar[str] = "verdicts"

    frame_id: str = Field(description=_FRAME_ID)
    camera: str = Field(description="camera id")
    seq: int = Field(description="per-camera frame sequence number")
    part_id: str | None = Field(description=_PART_ID)
    verdict: Literal["pass", "reject"] = Field(description="`pass` or `reject`")
    reason: str = Field(
        description="why: `ok`, `anomaly`; fail-safe: `timeout`, `missed_frame`, "
        "`worker_lost`, `bad_result`, or the reason a worker reported"
    )
    fail_safe: bool = Field(
        description="`1` when rejected because the frame could not be scored in time"
    )
    score: float | None = Field(description="image anomaly score; empty when not scored")
    model_id: str | None = Field(description="id of the model that scored the frame")
    threshold: float | None = Field(description="threshold the score was compared with")
    threshold_version: str | None = Field(description="version of the calibrated threshold")
    rule: str = Field(description="threshold rule of the line (`decision.rule`)")
    n_defects: int = Field(description="defect regions found (may exceed those written)")
    ts_acquired_ns: int | None = Field(description="acquisition time, ns since epoch")
    ts_decided_ns: int = Field(description="decision time, ns since epoch")
    latency_ms: float | None = Field(description="acquisition to decision, milliseconds")
    # Where the time went (linewatch bench); optional, so older writers' entries still parse.
    ts_infer_start_ns: int | None = Field(
        None, description="when the worker began scoring the frame's batch, ns since epoch"
    )
    ts_infer_end_ns: int | None = Field(
        None, description="when the worker finished scoring the frame's batch, ns since epoch"
    )
    batch_size: int | None = Field(None, description="frames in the batch the frame was scored in")
    ts_written_us: int | None = Field(None, description=_WRITTEN_US)


class DefectRecord(StreamRecord):
    """One defect region of a frame (stream ``defects``), in frame pixel coordinates."""

    stream: ClassVar[str] = "defects"

    frame_id: str = Field(description=_FRAME_ID)
    camera: str = Field(description="camera id")
    seq: int = Field(description="per-camera frame sequence number")
    part_id: str = Field(description="part id from acquisition")
    region: int = Field(description="index of the region in the frame, 0 = highest max score")
    x: int = Field(description="bounding box left, pixels")
    y: int = Field(description="bounding box top, pixels")
    w: int = Field(description="bounding box width, pixels")
    h: int = Field(description="bounding box height, pixels")
    area: int = Field(description="region area, pixels")
    max_score: float = Field(description="highest smoothed anomaly value in the region")
    mean_score: float = Field(description="mean smoothed anomaly value in the region")
    heatmap_ref: str | None = Field(
        description="where the region's PNG heatmap is: a Redis key "
        "`linewatch:<line>:heatmap:<frame_id>:<region>` or a file path; empty when off"
    )
    model_id: str = Field(description="id of the model that scored the frame")
    ts_decided_ns: int = Field(description="decision time, ns since epoch")
    ts_written_us: int | None = Field(None, description=_WRITTEN_US)


class RejectRecord(StreamRecord):
    """A part to reject at the gate (stream ``rejects``); one per reject verdict."""

    stream: ClassVar[str] = "rejects"

    frame_id: str = Field(description=_FRAME_ID)
    part_id: str | None = Field(description=_PART_ID)
    camera: str = Field(description="camera id")
    seq: int = Field(description="per-camera frame sequence number")
    reason: str = Field(description="the verdict's reason")
    deadline_ns: int = Field(description="time the verdict was due, ns since epoch")
    ts_decided_ns: int = Field(description="decision time, ns since epoch")
    ts_written_us: int | None = Field(None, description=_WRITTEN_US)


class AlarmRecord(StreamRecord):
    """Something an operator must know (stream ``alarms``): camera lost, drift, backlog."""

    stream: ClassVar[str] = "alarms"

    kind: str = Field(description="what happened, e.g. `camera_lost`, `reject_rate`")
    severity: Literal["info", "warning", "critical"] = Field(
        description="`info`, `warning` or `critical`"
    )
    message: str = Field(description="one line for the operator")
    camera: str | None = Field(description="camera concerned; empty for the whole line")
    ts_ns: int = Field(description="time of the alarm, ns since epoch")
    details_json: str = Field("{}", description="further details as a JSON object")


@dataclass(frozen=True, slots=True)
class VerdictBatch:
    """Everything written for one frame, at once: its verdict, defects, reject and heatmaps.

    ``heatmaps[i]`` (PNG bytes), when given, belongs to ``defects[i]``.
    """

    verdict: VerdictRecord
    defects: tuple[DefectRecord, ...] = ()
    reject: RejectRecord | None = None
    heatmaps: tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def frame_id(self) -> str:
        """The frame the batch decides."""
        return self.verdict.frame_id


RECORD_TYPES: tuple[type[StreamRecord], ...] = (
    VerdictRecord,
    DefectRecord,
    RejectRecord,
    AlarmRecord,
)


# --------------------------------------------------------------------------- reference


def _type_text(annotation: Any) -> str:
    nullable = _nullable(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if nullable else []
    base = args[0] if args else annotation
    if typing.get_origin(base) is Literal:
        text = " \\| ".join(f"`{v}`" for v in typing.get_args(base))
    else:
        text = {bool: "bool `1`/`0`", int: "int", float: "float", str: "string"}[base]
    return f"{text} or empty" if nullable else text


def describe_records() -> str:
    """Markdown reference of every stream and field, for the README."""
    lines: list[str] = []
    for record in RECORD_TYPES:
        doc = (record.__doc__ or "").strip().splitlines()[0]
        lines += [f"### `linewatch:<line>:{record.stream}`", "", doc, ""]
        lines += ["| field | type | meaning |", "|---|---|---|"]
        for name, info in record.model_fields.items():
            lines.append(f"| `{name}` | {_type_text(info.annotation)} | {info.description} |")
        lines.append("")
    return "\n".join(lines)


DESCRIPTION_BEGIN = "<!-- streams:begin -->"
DESCRIPTION_END = "<!-- streams:end -->"


def embed_description(document: str) -> str:
    """``document`` with :func:`describe_records` between the streams markers (README)."""
    from linewatch.errors import LinewatchError

    head, begin, rest = document.partition(DESCRIPTION_BEGIN)
    _, end, tail = rest.partition(DESCRIPTION_END)
    if not begin or not end:
        raise LinewatchError(f"no {DESCRIPTION_BEGIN} ... {DESCRIPTION_END} markers in the file")
    return f"{head}{begin}\n{describe_records()}{end}{tail}"
