"""Codec: round trips over real sockets, zero copy, and every malformed message refused."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from linewatch.errors import WireError
from linewatch.transport.codec import (
    HEADER_MAX_BYTES,
    BadMessage,
    BadMessageCounter,
    DispatcherReset,
    DispatchFrame,
    WorkerDone,
    WorkerReady,
    decode_camera_message,
    decode_decision_message,
    decode_dispatch,
    decode_frame,
    decode_result,
    decode_worker_message,
    encode_control,
    encode_frame,
    encode_message,
    encode_result,
)
from linewatch.wire import (
    CameraStatus,
    FrameAnnounce,
    FrameFailed,
    FrameHeader,
    GapNotice,
    ResultHeader,
)


def frame_header(
    dtype: str = "uint8", shape: tuple[int, ...] = (4, 6), seq: int = 0
) -> FrameHeader:
    return FrameHeader.model_validate(
        {"camera": "cam0", "seq": seq, "part_id": f"p{seq}", "ts_acquired_ns": 1,
         "deadline_ns": 2, "dtype": dtype, "shape": shape}
    )


def result_header(map_dtype: str = "float16", map_shape: tuple[int, int] = (3, 5)) -> ResultHeader:
    return ResultHeader.model_validate(
        {"frame": frame_header().model_dump(), "score": 0.7, "map_dtype": map_dtype,
         "map_shape": map_shape, "model_id": "m1", "threshold_version": "t1", "threshold": 1.0,
         "worker": "w0", "ts_infer_start_ns": 1, "ts_infer_end_ns": 2, "batch_size": 1}
    )


@pytest.fixture
def pipe(tmp_path: Path) -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    """A real PUSH -> PULL pair over ipc."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    endpoint = f"ipc://{tmp_path}/codec"
    pull.bind(endpoint)
    push.connect(endpoint)
    yield push, pull
    ctx.destroy(linger=0)


def recv(sock: zmq.Socket[bytes]) -> list[zmq.Frame]:
    assert sock.poll(5000), "nothing arrived within 5 s"
    return sock.recv_multipart(copy=False)


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [("uint8", (48, 64)), ("uint16", (48, 64)), ("uint8", (48, 64, 3)),
     ("uint16", (20, 30, 3)), ("uint8", (16, 16, 1))],
)
def test_frame_round_trip_without_copies(pipe: Any, dtype: str, shape: tuple[int, ...]) -> None:
    push, pull = pipe
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)
    header = frame_header(dtype, shape)

    parts = encode_frame(header, pixels)
    assert np.shares_memory(np.frombuffer(parts[1], dtype=np.uint8), pixels)
    push.send_multipart(parts, copy=False)
    received = recv(pull)
    frame = decode_frame(received)

    assert frame.header == header
    assert frame.pixels.dtype == np.dtype(dtype) and frame.pixels.shape == shape
    np.testing.assert_array_equal(frame.pixels, pixels)
    # The array views the received message's own buffer: no copy on the way in.
    assert np.shares_memory(frame.pixels, np.frombuffer(received[1].buffer, dtype=np.uint8))
    assert not frame.pixels.flags.writeable


def test_non_contiguous_pixels_are_sent_in_c_order(pipe: Any) -> None:
    push, pull = pipe
    pixels = np.arange(8 * 10, dtype=np.uint8).reshape(8, 10)[:, ::2]
    push.send_multipart(encode_frame(frame_header("uint8", (8, 5)), pixels), copy=False)
    np.testing.assert_array_equal(decode_frame(recv(pull)).pixels, pixels)


def test_encode_refuses_pixels_that_disagree_with_the_header() -> None:
    with pytest.raises(BadMessage) as info:
        encode_frame(frame_header("uint8", (4, 6)), np.zeros((4, 6), np.uint16))
    assert info.value.reason == "header_mismatch"


@pytest.mark.parametrize(("map_dtype", "np_dtype"), [("float16", np.float16), ("uint8", np.uint8)])
def test_result_round_trip(pipe: Any, map_dtype: str, np_dtype: Any) -> None:
    push, pull = pipe
    amap = (np.arange(15).reshape(3, 5) / 3).astype(np_dtype)
    header = result_header(map_dtype)
    push.send_multipart(encode_result(header, amap), copy=False)
    received = recv(pull)

    got_header, got_map = decode_result(received)
    assert got_header == header
    np.testing.assert_array_equal(got_map, amap)
    message, decision_map = decode_decision_message(received)
    assert message == header and decision_map is not None
    np.testing.assert_array_equal(decision_map, amap)


@pytest.mark.parametrize(
    "notice",
    [
        FrameAnnounce(frame=frame_header()),
        FrameFailed(frame=frame_header(), reason="worker_lost"),
        GapNotice(camera="cam0", first_seq=3, last_seq=5, ts_detected_ns=1, deadline_ns=2),
        CameraStatus(camera="cam0", state="lost", detail="cable", ts_ns=1),
    ],
)
def test_notices_round_trip_on_the_decision_channel(pipe: Any, notice: Any) -> None:
    push, pull = pipe
    push.send_multipart(encode_message(notice))
    message, amap = decode_decision_message(recv(pull))
    assert message == notice and type(message) is type(notice)
    assert amap is None


def good_frame_parts() -> list[bytes]:
    return [bytes(p) for p in encode_frame(frame_header(), np.zeros((4, 6), np.uint8))]


def header_with(**changes: Any) -> bytes:
    obj = json.loads(good_frame_parts()[0])
    obj.update(changes)
    return json.dumps(obj).encode()


MALFORMED: list[tuple[str, list[bytes]]] = [
    ("bad_json", [b"{not json", bytes(24)]),
    ("bad_json", [b"\xff\xfe\x00garbage", bytes(24)]),
    ("bad_json", [b"[1, 2, 3]", bytes(24)]),
    ("wrong_version", [header_with(v=2), bytes(24)]),
    ("wrong_version", [header_with(v=None), bytes(24)]),
    ("wrong_kind", [header_with(kind="result"), bytes(24)]),
    ("bad_header", [header_with(dtype="float64"), bytes(24)]),
    ("bad_header", [header_with(shape=[4, 6, 2]), bytes(48)]),
    ("bad_header", [header_with(unexpected="x"), bytes(24)]),
    ("length_mismatch", [good_frame_parts()[0], bytes(23)]),
    ("length_mismatch", [header_with(dtype="uint16"), bytes(24)]),
    ("missing_part", [good_frame_parts()[0]]),
    ("missing_part", []),
    ("extra_part", [*good_frame_parts(), b"x"]),
    ("header_too_large", [b" " * (HEADER_MAX_BYTES + 1), bytes(24)]),
]


@pytest.mark.parametrize(("reason", "parts"), MALFORMED)
def test_malformed_frames_raise_wire_error_with_reason(reason: str, parts: list[bytes]) -> None:
    with pytest.raises(WireError) as info:
        decode_frame(parts)
    assert isinstance(info.value, BadMessage)
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{reason}: ")


def test_receiver_counts_bad_messages_and_keeps_going(pipe: Any) -> None:
    push, pull = pipe
    good = 0
    for i, (_, parts) in enumerate(MALFORMED):
        if parts:  # ZeroMQ cannot send an empty multipart message
            push.send_multipart(parts)
        push.send_multipart(encode_frame(frame_header(seq=i), np.full((4, 6), i, np.uint8)))
        good += 1
    counter = BadMessageCounter("test", log_first=1)
    seqs: list[int] = []
    while len(seqs) < good:
        try:
            frame = decode_frame(recv(pull))
        except BadMessage as exc:
            counter.record(exc)
            continue
        assert frame.pixels[0, 0] == frame.header.seq
        seqs.append(frame.header.seq)
    assert seqs == list(range(len(MALFORMED)))
    expected: dict[str, int] = {}
    for reason, parts in MALFORMED:
        if parts:
            expected[reason] = expected.get(reason, 0) + 1
    assert counter.counts == expected
    assert counter.total == len(MALFORMED) - 1


@pytest.mark.parametrize(
    ("reason", "parts"),
    [
        ("missing_part", [encode_result(result_header(), np.zeros((3, 5), np.float16))[0]]),
        ("extra_part", [*encode_message(FrameAnnounce(frame=frame_header())), b"x"]),
        ("length_mismatch", [encode_result(result_header(), np.zeros((3, 5), np.float16))[0],
                             bytes(29)]),
        ("wrong_kind", [header_with()]),
        ("bad_header", [json.dumps({"kind": "gap", "v": 1, "camera": "c"}).encode()]),
    ],
)
def test_malformed_decision_messages(reason: str, parts: list[Any]) -> None:
    with pytest.raises(BadMessage) as info:
        decode_decision_message([bytes(p) for p in parts])
    assert info.value.reason == reason


def test_control_messages_round_trip_and_refuse_garbage() -> None:
    ready = WorkerReady(worker="w0", epoch=3, credit=16)
    assert decode_worker_message(encode_control(ready)) == ready
    done = WorkerDone(worker="w0", epoch=3, frame_ids=["cam0:1", "cam0:2"])
    assert decode_worker_message(encode_control(done)) == done
    for raw, reason in [
        (b'{"kind": "ready", "v": 1, "worker": "w0", "epoch": 0, "credit": 0}', "bad_control"),
        (b'{"kind": "frame", "v": 1, "epoch": 0}', "wrong_kind"),
        (b'{"kind": "ready", "v": 9}', "wrong_version"),
    ]:
        with pytest.raises(BadMessage) as info:
            decode_worker_message(raw)
        assert info.value.reason == reason

    pixels = np.ones((4, 6), np.uint8)
    control, frame = decode_dispatch(
        [encode_control(DispatchFrame(epoch=2)), *map(bytes, encode_frame(frame_header(), pixels))]
    )
    assert control == DispatchFrame(epoch=2) and frame is not None
    np.testing.assert_array_equal(frame.pixels, pixels)
    reset = DispatcherReset(epoch=1, reason="unknown_worker")
    assert decode_dispatch([encode_control(reset)]) == (reset, None)
    with pytest.raises(BadMessage) as info:
        decode_dispatch([encode_control(reset), b"extra"])
    assert info.value.reason == "extra_part"


# --------------------------------------------------------------------------- fuzzing

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)


_shapes = st.lists(st.integers(min_value=1, max_value=4), min_size=2, max_size=3) | st.lists(
    st.integers(min_value=-3, max_value=2**70), max_size=4
)


@st.composite
def _frame_messages(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A frame message near validity: a good header with a few fields spoilt, any buffer."""
    header: dict[str, Any] = {
        "kind": "frame", "v": 1,
        "camera": draw(st.text(min_size=1, max_size=8)),
        "seq": draw(st.integers(min_value=0, max_value=2**65)),
        "part_id": draw(st.text(min_size=1, max_size=4)),
        "ts_acquired_ns": draw(st.integers(min_value=0)),
        "deadline_ns": draw(st.integers(min_value=0)),
        "dtype": draw(st.sampled_from(["uint8", "uint16"])),
        "shape": draw(_shapes),
    }
    for key in draw(st.lists(st.sampled_from([*header, "extra"]), max_size=2)):
        header[key] = draw(_json_scalars | st.sampled_from(["float32", "object", [0, 4]]))
    raw = draw(st.sampled_from([False] * 9 + [True]))
    first = draw(st.binary(max_size=40)) if raw else json.dumps(header).encode()
    try:  # the length the header asks for, when it can be computed
        itemsize = {"uint8": 1, "uint16": 2}.get(header["dtype"], 1)
        wanted = int(np.prod(header["shape"])) * itemsize
    except (TypeError, ValueError, OverflowError):
        wanted = 0
    exact = 0 <= wanted <= 512 and draw(st.booleans())
    buffer = draw(st.binary(min_size=wanted, max_size=wanted) if exact else st.binary(max_size=64))
    return first, buffer


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=_frame_messages())
@example(message=(b'{"kind": [0, 4], "v": 1, "camera": "0", "seq": 0, "part_id": "0", '
                  b'"ts_acquired_ns": 0, "deadline_ns": 0, "dtype": "uint8", "shape": []}', b""))
def test_decode_frame_fuzz_raises_only_wire_error(message: tuple[bytes, bytes]) -> None:
    first, buffer = message
    try:
        frame = decode_frame([first, buffer])
    except WireError:
        return
    assert frame.pixels.nbytes == len(buffer)
    assert frame.pixels.shape == frame.header.shape


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.binary(max_size=32), max_size=4))
def test_decode_decision_message_fuzz_raises_only_wire_error(parts: list[bytes]) -> None:
    with contextlib.suppress(WireError):
        decode_decision_message(parts)


def test_camera_channel_carries_frames_gaps_and_camera_status() -> None:
    pixels = np.ones((4, 6), np.uint8)
    message = decode_camera_message([bytes(p) for p in encode_frame(frame_header(), pixels)])
    assert not isinstance(message, GapNotice | CameraStatus)
    assert message.header == frame_header()
    gap = GapNotice(camera="cam0", first_seq=3, last_seq=5, ts_detected_ns=1, deadline_ns=2)
    status = CameraStatus(camera="cam0", state="reconnected", ts_ns=1)
    assert decode_camera_message(encode_message(gap)) == gap
    assert decode_camera_message(encode_message(status)) == status
    for parts, reason in [
        (encode_message(FrameAnnounce(frame=frame_header())), "wrong_kind"),
        ([*encode_message(gap), b"x"], "extra_part"),
        ([good_frame_parts()[0]], "missing_part"),
    ]:
        with pytest.raises(BadMessage) as info:
            decode_camera_message(parts)
        assert info.value.reason == reason
