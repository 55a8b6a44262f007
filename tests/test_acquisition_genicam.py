"""The GenICam camera through harvesters and the real simulated producer viky.cti.

viky.cti (shipped with the ``genicam`` package) offers three virtual cameras,
VikyTL_DEV_red/green/blue with serial numbers 0/1/2, 400 x 400 RGBa8 at 20 fps.
One GenTL producer is shared by a whole process, so each test opens at most one
camera at a time.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq

from linewatch.acquisition import DeviceNotFound, MissedFrames, RawFrame
from linewatch.acquisition.genicam import (
    GenicamCamera,
    ProducerGaps,
    list_devices,
    viky_cti_path,
)
from linewatch.acquisition.process import AcquisitionProcess
from linewatch.config import CameraConfig, GenicamSource, TransportConfig
from linewatch.errors import ConfigError
from linewatch.transport.codec import decode_decision_message, decode_frame

VIKY = viky_cti_path()


def _viky_usable() -> str | None:
    """Why viky.cti cannot be used here, or None when it lists its three cameras."""
    if not VIKY.is_file():
        return f"{VIKY} not found in the installed genicam package"
    try:
        devices = list_devices(VIKY)
    except Exception as exc:  # any failure to load the producer on this machine
        return f"viky.cti does not load here: {type(exc).__name__}: {exc}"
    return None if len(devices) == 3 else f"viky.cti lists {len(devices)} cameras, expected 3"


_SKIP = _viky_usable()
needs_viky = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


def _camera(**fields: object) -> GenicamCamera:
    return GenicamCamera(GenicamSource.model_validate({"cti": VIKY, **fields}))


def _read_frames(cam: GenicamCamera, n: int) -> list[RawFrame | MissedFrames]:
    items: list[RawFrame | MissedFrames] = []
    while sum(isinstance(i, RawFrame) for i in items) < n:
        item = cam.read()
        assert item is not None
        items.append(item)
    return items


def _check_frame_ids(items: list[RawFrame | MissedFrames]) -> None:
    """Frame ids increase; any jump is exactly the MissedFrames reported before it."""
    last: int | None = None
    missed = 0
    for item in items:
        if isinstance(item, MissedFrames):
            assert item.reason == "dropped" and item.count >= 1
            missed += item.count
            continue
        assert item.producer_frame_id is not None
        if last is not None:
            assert item.producer_frame_id == last + 1 + missed
        last, missed = item.producer_frame_id, 0


# ---------------------------------------------------------------------- frame ids


def test_producer_gaps_by_frame_id() -> None:
    gaps = ProducerGaps()
    assert [gaps.observe(i, None) for i in (1, 2, 3, 7, 8, 10)] == [0, 0, 0, 3, 0, 1]


def test_frame_id_going_back_restarts_instead_of_reporting_a_huge_gap() -> None:
    gaps = ProducerGaps()
    assert [gaps.observe(i, None) for i in (65534, 65535, 1, 2, None, 3)] == [0] * 6
    assert gaps.restarts == 1
    gaps.reset()
    assert gaps.observe(100, None) == 0


def test_producer_gaps_by_device_timestamps_when_ids_are_absent() -> None:
    period = 50_000_000  # 20 fps
    jitter = [0, 3, -2, 1, 0, -1, 2, 0, 1]
    ts = [i * period + j * 100_000 for i, j in enumerate(jitter)]
    ts = ts[:4] + ts[6:]  # frames 4 and 5 never arrive
    gaps = ProducerGaps(use_timestamps=True)
    assert [gaps.observe(None, t) for t in ts] == [0, 0, 0, 0, 2, 0, 0]
    # A drop while the period is still being learnt is not mistaken for the period.
    early = ProducerGaps(use_timestamps=True)
    assert [early.observe(None, t) for t in (0, 150, 200, 250, 300, 400)] == [0] * 5 + [1]


def test_timestamps_are_ignored_for_a_triggered_camera() -> None:
    gaps = ProducerGaps(use_timestamps=False)  # parts arrive when they arrive
    assert [gaps.observe(None, t) for t in (0, 10, 20, 30, 500)] == [0] * 5


# ---------------------------------------------------------------------- viky


@needs_viky
def test_lists_viky_cameras() -> None:
    devices = list_devices(VIKY)
    assert [d["id"] for d in devices] == ["VikyTL_DEV_red", "VikyTL_DEV_green", "VikyTL_DEV_blue"]
    assert [d["serial_number"] for d in devices] == ["0", "1", "2"]


@needs_viky
def test_fetches_rgb_frames_with_increasing_frame_ids() -> None:
    cam = _camera(serial_number="1", num_buffers=4)
    with cam:
        assert cam.device_id == "VikyTL_DEV_green"
        items = _read_frames(cam, 6)
    frames = [i for i in items if isinstance(i, RawFrame)]
    for frame in frames:
        assert frame.pixels.shape == (400, 400, 3) and frame.pixels.dtype == np.uint8
        assert frame.pixels.flags.c_contiguous and frame.pixels.flags.owndata
        assert frame.ts_ns > 0 and frame.part_id is None
    _check_frame_ids(items)
    # Pixels survive the buffer being queued back and refilled by later frames.
    assert frames[0].pixels.any()


@needs_viky
def test_pixel_format_is_set_on_the_camera() -> None:
    with _camera(device_id="VikyTL_DEV_blue", pixel_format="Mono8") as cam:
        items = _read_frames(cam, 2)
    frames = [i for i in items if isinstance(i, RawFrame)]
    assert all(f.pixels.shape == (400, 400) and f.pixels.dtype == np.uint8 for f in frames)


@needs_viky
def test_part_id_from_a_chunk_node() -> None:
    # viky has no part-id chunk; its bounce counter chunk stands in for one.
    with _camera(serial_number="0", part_id_chunk="ChunkNrBounces") as cam:
        items = _read_frames(cam, 2)
    assert all(i.part_id is not None and i.part_id.isdigit()
               for i in items if isinstance(i, RawFrame))


@needs_viky
def test_missing_nodes_are_skipped_not_fatal() -> None:
    # viky has no trigger or exposure nodes: the camera runs free and frames still come.
    with _camera(serial_number="2", trigger_mode="software", exposure_us=500.0) as cam:
        assert isinstance(_read_frames(cam, 1)[-1], RawFrame)


@needs_viky
def test_no_selector_with_several_cameras_lists_them() -> None:
    with pytest.raises(ConfigError, match="3 cameras match") as err:
        _camera().open()
    assert "VikyTL_DEV_red (serial 0)" in str(err.value)
    assert "VikyTL_DEV_blue (serial 2)" in str(err.value)


@needs_viky
def test_unknown_serial_is_device_not_found_with_the_available_ones() -> None:
    cam = _camera(serial_number="F00")
    with pytest.raises(DeviceNotFound, match="no camera with serial_number=F00") as err:
        cam.open()
    assert "VikyTL_DEV_green (serial 1)" in str(err.value)
    cam.close()


@needs_viky
def test_selectors_must_all_match() -> None:
    with pytest.raises(DeviceNotFound):
        _camera(serial_number="0", device_id="VikyTL_DEV_blue").open()


def test_missing_or_invalid_cti_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        _camera(cti=tmp_path / "absent.cti").open()
    fake = tmp_path / "fake.cti"
    fake.write_text("not a shared library")
    with pytest.raises(ConfigError, match="not a loadable GenTL producer"):
        _camera(cti=fake).open()


@needs_viky
def test_close_releases_the_camera_and_keeps_sigint() -> None:
    before = signal.getsignal(signal.SIGINT)
    cam = _camera(serial_number="0")
    cam.open()
    # harvesters installs its own SIGINT handler when it creates an acquirer.
    assert signal.getsignal(signal.SIGINT) is before
    cam.close()
    cam.close()  # twice is fine
    with cam:  # the device was released: it opens again
        assert isinstance(_read_frames(cam, 1)[-1], RawFrame)


@needs_viky
def test_stop_request_ends_reading() -> None:
    with _camera(serial_number="1") as cam:
        cam.request_stop()
        assert cam.read() is None


# ---------------------------------------------------------------------- process


@needs_viky
def test_process_sends_viky_frames_with_consecutive_seq() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    camera = CameraConfig(id="viky0", source=GenicamSource(cti=VIKY, serial_number="0"))
    process = AcquisitionProcess(
        camera, TransportConfig(frames_endpoint=f"tcp://127.0.0.1:{port}"), start_seq=100,
        context=ctx,
    )
    runner = threading.Thread(target=process.run)
    runner.start()
    seqs: list[int] = []  # of frames and of gap notices, in arrival order
    try:
        while process.stats.frames < 5 or len(seqs) < 5:
            assert pull.poll(10_000), "no message from the acquisition process within 10 s"
            parts = pull.recv_multipart(copy=False)
            if len(parts) == 2:
                frame = decode_frame(parts)
                assert frame.header.camera == "viky0" and frame.pixels.shape == (400, 400, 3)
                assert frame.header.part_id == str(frame.header.seq)
                seqs.append(frame.header.seq)
            else:
                notice, _ = decode_decision_message(parts)
                if notice.kind == "gap":  # a drop on a busy machine: seqs still accounted
                    seqs.extend(range(notice.first_seq, notice.last_seq + 1))
    finally:
        process.stop()
        runner.join(timeout=30)
    assert not runner.is_alive()
    assert seqs == list(range(100, 100 + len(seqs)))
    assert process.stats.frames >= 5 and process.next_seq >= 100 + len(seqs)
    pull.close(linger=0)
    ctx.term()


@needs_viky
def test_cli_lists_cameras() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "linewatch", "cameras", str(VIKY)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "VikyTL_DEV_green\tserial=1" in result.stdout
