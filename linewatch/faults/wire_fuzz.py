"""Corrupted wire messages: every receiver's decoder refuses them, none crashes.

Valid messages of every kind (frames, results, notices, control messages) are
mutated at random (seeded, so a run is reproducible): parts truncated, bytes
flipped, parts dropped or added, the version changed, the header replaced by
other JSON. Each decoder must return a valid message or raise
:class:`~linewatch.transport.codec.BadMessage`; anything else would stop a
process on one bad packet. ``tests/test_faults.py`` fuzzes the same decoders
with hypothesis as well.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from linewatch.faults.result import FaultResult, Setup
from linewatch.testing import frame_header
from linewatch.transport.codec import (
    BadMessage,
    DispatchFrame,
    WorkerDone,
    decode_camera_message,
    decode_decision_message,
    decode_dispatch,
    decode_worker_message,
    encode_control,
    encode_frame,
    encode_message,
    encode_result,
)
from linewatch.wire import CameraStatus, FrameAnnounce, FrameFailed, GapNotice, ResultHeader

MESSAGES = 20_000
"""Mutated messages per run."""

Parts = list[bytes]
Decoder = Callable[[Sequence[bytes]], object]


def valid_messages() -> list[tuple[str, Parts, Decoder]]:
    """One valid message of every kind, with the decoder its receiver uses."""
    header = frame_header("cam0", 7, shape=(8, 6))
    pixels = np.arange(48, dtype=np.uint8).reshape(8, 6)
    result = ResultHeader(
        frame=header, score=0.5, map_dtype="float16", map_shape=(4, 3), model_id="m",
        threshold_version="t", threshold=1.0, worker="w0", ts_infer_start_ns=1,
        ts_infer_end_ns=2, batch_size=1,
    )
    amap = np.ones((4, 3), np.float16)
    gap = GapNotice(camera="cam0", first_seq=1, last_seq=3, ts_detected_ns=1, deadline_ns=2)
    status = CameraStatus(camera="cam0", state="lost", detail="cable", ts_ns=1)
    frame = [bytes(p) for p in encode_frame(header, pixels)]

    def worker(parts: Sequence[bytes]) -> object:
        if len(parts) != 1:
            raise BadMessage("extra_part", "one part expected")  # as the dispatcher checks
        return decode_worker_message(parts[0])

    return [
        ("frame", frame, decode_camera_message),
        ("gap", encode_message(gap), decode_camera_message),
        ("camera_status", encode_message(status), decode_camera_message),
        ("result", [bytes(p) for p in encode_result(result, amap)], decode_decision_message),
        ("announce", encode_message(FrameAnnounce(frame=header)), decode_decision_message),
        ("failed", encode_message(FrameFailed(frame=header, reason="worker_lost")),
         decode_decision_message),
        ("dispatch", [encode_control(DispatchFrame(epoch=3)), *frame], decode_dispatch),
        ("done", [encode_control(WorkerDone(worker="w0", epoch=1, frame_ids=["cam0:7"]))],
         worker),
    ]


def mutate(parts: Parts, rng: np.random.Generator) -> Parts:
    """One random corruption of a multipart message."""
    parts = list(parts)
    if not parts:  # every part lost to an earlier corruption: something arrives anyway
        return [rng.bytes(int(rng.integers(0, 64)))]
    i = int(rng.integers(len(parts)))
    kind = int(rng.integers(7))
    if kind == 0:  # truncated
        parts[i] = parts[i][: int(rng.integers(len(parts[i]) + 1))]
    elif kind == 1:  # bytes flipped
        data = bytearray(parts[i])
        for _ in range(int(rng.integers(1, 4))):
            if data:
                data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
        parts[i] = bytes(data)
    elif kind == 2:  # a part lost
        del parts[i]
    elif kind == 3:  # a part too many
        parts.insert(i, rng.bytes(int(rng.integers(0, 32))))
    elif kind == 4:  # another wire version
        parts[i] = _with_field(parts[i], "v", _odd_value(rng))
    elif kind == 5:  # a field of the header spoilt
        parts[i] = _with_field(parts[i], _some_key(parts[i], rng), _odd_value(rng))
    else:  # random bytes
        parts[i] = rng.bytes(int(rng.integers(0, 64)))
    return parts


def _with_field(part: bytes, key: str, value: Any) -> bytes:
    try:
        obj = json.loads(part)
    except (ValueError, UnicodeDecodeError):
        return part
    if not isinstance(obj, dict):
        return part
    obj[key] = value
    return json.dumps(obj).encode()


def _some_key(part: bytes, rng: np.random.Generator) -> str:
    try:
        keys = sorted(json.loads(part))
    except (ValueError, TypeError, UnicodeDecodeError):
        return "kind"
    return str(keys[int(rng.integers(len(keys)))]) if keys else "kind"


def _odd_value(rng: np.random.Generator) -> Any:
    choices: list[Any] = [None, -1, 0, 2, 2**70, 1.5, float("nan"), "x", "", [], {}, [0, 4],
                          True, "uint64", "float32", "frame", "result"]
    return choices[int(rng.integers(len(choices)))]


def fuzz(messages: int = MESSAGES, seed: int = 0) -> tuple[Counter[str], list[str]]:
    """Decode ``messages`` mutated messages; outcome counts and every crash (repr)."""
    rng = np.random.default_rng(seed)
    valid = valid_messages()
    outcomes: Counter[str] = Counter()
    crashes: list[str] = []
    for _ in range(messages):
        name, parts, decode = valid[int(rng.integers(len(valid)))]
        corrupted = mutate(parts, rng)
        try:
            decode(corrupted)
        except BadMessage as exc:
            outcomes[exc.reason] += 1
        except Exception as exc:  # what must never happen: one packet stopping a process
            crashes.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
        else:
            outcomes["still_valid"] += 1
    return outcomes, crashes


def wire_fuzz(setup: Setup) -> FaultResult:
    """Mutated messages of every kind through every receiver's decoder."""
    del setup  # nothing to start: the decoders are what every receiver runs first
    outcomes, crashes = fuzz()
    refused = sum(n for reason, n in outcomes.items() if reason != "still_valid")
    top = ", ".join(f"{r} {n}" for r, n in outcomes.most_common(4) if r != "still_valid")
    return FaultResult(
        name="wire_fuzz", fault=f"{MESSAGES} truncated / flipped / re-versioned messages",
        behaviour=f"{refused} refused as bad messages ({top}), "
                  f"{outcomes['still_valid']} still valid, {len(crashes)} crashes",
        tally=None, recover_s=None, problems=[f"decoder crashed: {c}" for c in crashes[:5]],
        details={"outcomes": dict(outcomes), "crashes": len(crashes)},
    )
