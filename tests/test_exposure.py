"""Exposure watch: the clipped share and the bright level of a frame, the states they
report, the alarms."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import zmq

from linewatch.acquisition.exposure import DarkWatch, ExposureWatch, bright_level, clipped_share
from linewatch.acquisition.process import AcquisitionProcess
from linewatch.config import (
    CameraConfig,
    OverexposureConfig,
    TransportConfig,
    UnderexposureConfig,
    validate_config,
)
from linewatch.data.images import write_image
from linewatch.data.synth import make_image
from linewatch.errors import ConfigError
from linewatch.model.preprocess import ExposureJitter, jitter_exposure
from linewatch.transport.codec import decode_decision_message
from linewatch.wire import CameraStatus


def _texture(seed: int = 0, size: int = 64) -> np.ndarray:
    image, _ = make_image(np.random.default_rng(seed), "brushed_metal", size, None)
    return image


def _clipped(image: np.ndarray, gain: float) -> np.ndarray:
    fixed = ExposureJitter(gain=(gain, gain), offset=(0.0, 0.0))
    return jitter_exposure([image], np.random.default_rng(0), fixed)[0]


def test_a_textured_frame_has_almost_nothing_at_its_brightest_value() -> None:
    assert clipped_share(_texture()) < 0.01


def test_the_clipped_share_follows_the_clipped_area_whatever_the_bit_depth() -> None:
    image = _texture()
    bright = _clipped(image, 1.6)
    expected = float(np.mean(bright == 255))
    assert 0.2 < expected < 0.8
    assert clipped_share(bright) == pytest.approx(expected, abs=0.05)
    twelve_bit = np.minimum(image.astype(np.uint16) * 26, 4095)  # Mono12 in a uint16
    share_12 = float(np.mean(twelve_bit == 4095))
    assert 0.2 < share_12 < 0.8
    assert clipped_share(twelve_bit) == pytest.approx(share_12, abs=0.05)
    rgb = np.repeat(bright[:, :, None], 3, axis=2)
    assert clipped_share(rgb) == pytest.approx(expected, abs=0.05)


def test_a_frame_of_one_value_is_clipped_only_at_full_scale() -> None:
    assert clipped_share(np.full((16, 16), 255, np.uint8)) == 1.0
    assert clipped_share(np.zeros((16, 16), np.uint8)) == 0.0
    assert clipped_share(np.full((16, 16), 4095, np.uint16)) == 0.0
    assert clipped_share(np.zeros((0, 4), np.uint8)) == 0.0


def test_the_state_changes_after_frames_in_a_row_and_does_not_flap() -> None:
    watch = ExposureWatch(OverexposureConfig(clipped_share=0.1, frames=3))
    # Above the limit twice, then a dip: the run starts again.
    assert [watch.observe(s) for s in (0.2, 0.2, 0.05, 0.2, 0.2)] == [None] * 5
    assert watch.observe(0.2) == "overexposed" and watch.overexposed
    # Below the limit but above half of it: still over-exposed.
    assert [watch.observe(s) for s in (0.08, 0.08, 0.08, 0.08)] == [None] * 4
    assert [watch.observe(s) for s in (0.01, 0.01, 0.01)] == [None, None, "exposure_ok"]
    assert not watch.overexposed


def test_the_bright_level_follows_the_light_whatever_the_bit_depth() -> None:
    image = _texture()
    level = bright_level(image)
    assert 0.5 < level < 0.95  # a well-lit synthetic part
    assert bright_level(_clipped(image, 0.25)) == pytest.approx(level * 0.25, abs=0.01)
    twelve_bit = image.astype(np.uint16) * 16  # Mono12 in a uint16
    assert bright_level(twelve_bit, full_scale=4095) == pytest.approx(level, abs=0.01)
    assert bright_level(twelve_bit) < 0.07  # without full_scale: 16 bits assumed
    dim = _clipped(_texture(size=256), 0.25)
    hot = dim.copy()
    hot[np.random.default_rng(0).random(hot.shape) < 0.004] = 255  # 0.4 % hot pixels
    assert bright_level(hot) == pytest.approx(bright_level(dim), abs=0.01)
    assert bright_level(np.zeros((0, 4), np.uint8)) == 0.0


def test_a_large_frame_is_judged_on_a_sparser_grid_with_the_same_result() -> None:
    image = _texture(size=256)
    large = cv2.resize(image, (2048, 2048), interpolation=cv2.INTER_NEAREST)
    assert bright_level(large) == pytest.approx(bright_level(image), abs=0.02)
    clipped = _clipped(image, 1.6)
    large_clipped = cv2.resize(clipped, (2048, 2048), interpolation=cv2.INTER_NEAREST)
    assert clipped_share(large_clipped) == pytest.approx(clipped_share(clipped), abs=0.03)


def test_the_dark_state_changes_after_frames_in_a_row_and_does_not_flap() -> None:
    watch = DarkWatch(UnderexposureConfig(level=0.2, frames=3))
    assert [watch.observe(v) for v in (0.1, 0.1, 0.5, 0.1, 0.1)] == [None] * 5
    assert watch.observe(0.1) == "underexposed" and watch.underexposed
    # Above the level but under 1.5 x it: still under-exposed.
    assert [watch.observe(v) for v in (0.25, 0.25, 0.25, 0.25)] == [None] * 4
    assert [watch.observe(v) for v in (0.4, 0.4, 0.4)] == [None, None, "exposure_ok"]
    assert not watch.underexposed


def test_bad_settings_are_refused_naming_the_key() -> None:
    camera = {"id": "cam0", "source": {"kind": "synth"}}
    for bad in ({"clipped_share": 0}, {"clipped_share": 1.5}, {"frames": 0}):
        with pytest.raises(ConfigError, match="overexposure"):
            validate_config({"line": "x", "cameras": [{**camera, "overexposure": bad}]})
    for bad in ({"level": 0}, {"level": 1.0}, {"full_scale": 0}, {"frames": 0}):
        with pytest.raises(ConfigError, match="underexposure"):
            validate_config({"line": "x", "cameras": [{**camera, "underexposure": bad}]})


def _statuses(sock: zmq.Socket[bytes]) -> list[CameraStatus]:
    """Camera statuses until 'stopped' (frames skipped; bounded wait per message)."""
    seen: list[CameraStatus] = []
    while not seen or seen[-1].state != "stopped":
        assert sock.poll(10_000), f"nothing received within 10 s after {seen[-1:]}"
        parts = sock.recv_multipart(copy=False)
        if len(parts) == 1:
            status, _ = decode_decision_message(parts)
            assert isinstance(status, CameraStatus)
            seen.append(status)
    return seen


def _replay(
    tmp_path: Path, pull: tuple[zmq.Socket[bytes], str], gain: float, watch: dict[str, Any]
) -> list[CameraStatus]:
    """Statuses of a folder replay: 3 frames at ``gain``, then 3 as they are."""
    sock, endpoint = pull
    images = [_clipped(_texture(i), gain) for i in range(3)] + [_texture(i) for i in range(3, 6)]
    for i, image in enumerate(images):
        write_image(tmp_path / "parts" / f"{i}.png", image)
    camera = CameraConfig.model_validate({
        "id": "cam3",
        "source": {"kind": "folder", "path": tmp_path / "parts", "fps": 500.0},
        **watch,
    })
    process = AcquisitionProcess(camera, TransportConfig(frames_endpoint=endpoint))
    runner = threading.Thread(target=process.run)
    runner.start()
    try:
        return _statuses(sock)
    finally:
        runner.join(timeout=30)


def test_acquisition_reports_an_overexposed_camera_and_its_recovery(
    tmp_path: Path, pull: tuple[zmq.Socket[bytes], str]
) -> None:
    statuses = _replay(tmp_path, pull, 1.6, {"overexposure": {"clipped_share": 0.1, "frames": 2}})
    assert [s.state for s in statuses] == ["connected", "overexposed", "exposure_ok", "stopped"]
    assert "check lighting" in statuses[1].detail and statuses[1].camera == "cam3"


def test_acquisition_reports_an_underexposed_camera_and_its_recovery(
    tmp_path: Path, pull: tuple[zmq.Socket[bytes], str]
) -> None:
    statuses = _replay(tmp_path, pull, 0.2, {"underexposure": {"frames": 2}})
    assert [s.state for s in statuses] == ["connected", "underexposed", "exposure_ok", "stopped"]
    assert "check lighting" in statuses[1].detail and "full scale" in statuses[1].detail


def test_the_watch_can_be_turned_off(tmp_path: Path, pull: tuple[zmq.Socket[bytes], str]) -> None:
    sock, endpoint = pull
    for i in range(3):
        write_image(tmp_path / "parts" / f"{i}.png", _clipped(_texture(i), 1.6))
    camera = CameraConfig.model_validate({
        "id": "cam3",
        "source": {"kind": "folder", "path": tmp_path / "parts", "fps": 500.0},
        "overexposure": {"enabled": False, "frames": 1},
    })
    AcquisitionProcess(camera, TransportConfig(frames_endpoint=endpoint)).run()
    assert [s.state for s in _statuses(sock)] == ["connected", "stopped"]
