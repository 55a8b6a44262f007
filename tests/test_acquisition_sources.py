"""Folder replay, synth camera and the acquisition process over real ZeroMQ sockets."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from linewatch.acquisition import FrameSource, MissedFrames, RawFrame, SourceItem, SourceLost
from linewatch.acquisition.folder import FolderReplay
from linewatch.acquisition.process import AcquisitionProcess, next_slot
from linewatch.acquisition.synth import SynthCamera
from linewatch.config import CameraConfig, FolderSource, SynthSource, TransportConfig
from linewatch.data.images import write_image
from linewatch.errors import ConfigError, DataError
from linewatch.transport.codec import decode_decision_message, decode_frame
from linewatch.wire import CameraStatus, Frame, GapNotice

Message = Frame | GapNotice | CameraStatus


def _image(value: int, shape: tuple[int, ...] = (8, 12)) -> np.ndarray:
    return np.full(shape, value, np.uint8)


def _replay(path: Path, **fields: Any) -> FolderReplay:
    return FolderReplay(FolderSource.model_validate({"path": path, **fields}))


def _drain(source: FrameSource, limit: int = 1000) -> list[SourceItem]:
    items: list[SourceItem] = []
    while (item := source.read()) is not None:
        items.append(item)
        assert len(items) <= limit, "source did not end"
    return items


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Images b/2, a/1, c (top level), a mask folder and a note that is not an image."""
    root = tmp_path / "parts"
    write_image(root / "b" / "2.png", _image(20))
    write_image(root / "a" / "1.png", _image(10, (8, 12, 3)))
    write_image(root / "c.png", _image(30))
    write_image(root / "ground_truth" / "a" / "1_mask.png", _image(255))
    (root / "notes.txt").write_text("not an image")
    return root


# ---------------------------------------------------------------------- folder


def test_folder_replays_images_in_path_order(folder: Path) -> None:
    with _replay(folder) as source:
        items = _drain(source)
    assert all(isinstance(i, RawFrame) for i in items)
    frames = [i for i in items if isinstance(i, RawFrame)]
    assert [f.part_id for f in frames] == ["a/1", "b/2", "c"]
    assert [int(f.pixels.max()) for f in frames] == [10, 20, 30]
    assert frames[0].pixels.shape == (8, 12, 3) and frames[1].pixels.shape == (8, 12)


def test_folder_loops_when_asked(folder: Path) -> None:
    source = _replay(folder, loop=True)
    with source:
        ids = [item.part_id for item in (source.read() for _ in range(7))
               if isinstance(item, RawFrame)]
        assert ids == ["a/1", "b/2", "c", "a/1", "b/2", "c", "a/1"]
        assert source.loops == 2
        source.request_stop()
        assert source.read() is None


def test_unreadable_files_are_counted_and_reported_as_missed(folder: Path) -> None:
    (folder / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "b" / "4.png").write_bytes(b"")
    source = _replay(folder)
    with source:
        items = _drain(source)
    kinds = [type(i).__name__ for i in items]
    assert kinds == ["RawFrame", "RawFrame", "MissedFrames", "MissedFrames", "RawFrame"]
    missed = [i for i in items if isinstance(i, MissedFrames)]
    assert all(m.count == 1 and m.reason == "unreadable" for m in missed)
    assert "3.png" in missed[0].detail and "empty file" in missed[1].detail
    assert source.unreadable == 2


def test_empty_or_missing_folder_fails_at_open(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    with pytest.raises(DataError, match="no image files to replay"):
        _replay(tmp_path / "empty").open()
    with pytest.raises(DataError, match="does not exist"):
        _replay(tmp_path / "absent").open()


def test_folder_replays_a_data_set_split(tmp_path: Path) -> None:
    root = tmp_path / "set"
    write_image(root / "train" / "good" / "0.png", _image(1))
    write_image(root / "test" / "good" / "5.png", _image(2))
    write_image(root / "test" / "crack" / "0.png", _image(3))
    write_image(root / "ground_truth" / "crack" / "0_mask.png", _image(255))
    with _replay(root, split="test") as source:
        ids = [i.part_id for i in _drain(source) if isinstance(i, RawFrame)]
    assert ids == ["good/5", "crack/0"]  # the data set's order: good first
    with pytest.raises(DataError, match="no 'val' split"):
        _replay(root, split="val").open()


# ---------------------------------------------------------------------- synth


def _synth(**fields: Any) -> SynthCamera:
    return SynthCamera(SynthSource.model_validate({"size": 64, **fields}))


def _take(source: FrameSource, count: int) -> list[SourceItem]:
    items = [source.read() for _ in range(count)]
    return [i for i in items if i is not None]


def _pixels(items: list[SourceItem]) -> list[np.ndarray]:
    return [i.pixels for i in items if isinstance(i, RawFrame)]


def test_synth_is_deterministic_per_seed() -> None:
    with _synth(seed=3, defect_ratio=0.5) as a, _synth(seed=3, defect_ratio=0.5) as b:
        first, second = _pixels(_take(a, 4)), _pixels(_take(b, 4))
    assert len(first) == 4
    assert all(np.array_equal(x, y) for x, y in zip(first, second, strict=True))
    assert first[0].shape == (64, 64) and first[0].dtype == np.uint8
    with _synth(seed=4, defect_ratio=0.5) as c:
        other = _pixels(_take(c, 4))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other, strict=True))


def test_synth_frame_depends_only_on_seed_and_index() -> None:
    cam = _synth(seed=9)
    with cam:
        frames = _pixels(_take(cam, 5))
    assert np.array_equal(cam.make(3)[0], frames[3])


def test_synth_defect_ratio() -> None:
    with _synth(defect_ratio=1.0) as all_bad:
        _take(all_bad, 6)
    with _synth(defect_ratio=0.0) as all_good:
        _take(all_good, 6)
    assert all_bad.defects == 6 and all_good.defects == 0


def test_synth_unknown_surface_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown surface 'velvet'"):
        _synth(surface="velvet").open()


# ---------------------------------------------------------------------- process


def _receive(sock: zmq.Socket[bytes], until_stopped: bool = True) -> list[Message]:
    """Messages until the camera's 'stopped' status (bounded wait per message)."""
    messages: list[Message] = []
    while True:
        assert sock.poll(10_000), f"nothing received within 10 s after {messages[-1:]}"
        parts = sock.recv_multipart(copy=False)
        if len(parts) == 2:
            messages.append(decode_frame(parts))
            continue
        notice, _ = decode_decision_message(parts)
        assert isinstance(notice, GapNotice | CameraStatus)
        messages.append(notice)
        if isinstance(notice, CameraStatus) and notice.state == "stopped" and until_stopped:
            return messages


def _seqs(messages: list[Message]) -> list[int]:
    seqs: list[int] = []
    for m in messages:
        if isinstance(m, Frame):
            seqs.append(m.header.seq)
        elif isinstance(m, GapNotice):
            seqs.extend(range(m.first_seq, m.last_seq + 1))
    return seqs


def _process(source: FrameSource | None, endpoint: str, **kwargs: Any) -> AcquisitionProcess:
    camera = CameraConfig(id="cam7", source=SynthSource(fps=500.0, size=32), frames=6,
                          deadline_ms=250.0)
    return AcquisitionProcess(camera, TransportConfig(frames_endpoint=endpoint), source=source,
                              **kwargs)


def test_process_sends_synth_frames_with_consecutive_seq(
    pull: tuple[zmq.Socket[bytes], str],
) -> None:
    sock, endpoint = pull
    process = _process(None, endpoint, start_seq=41)
    stats = process.run()
    messages = _receive(sock)
    statuses = [m.state for m in messages if isinstance(m, CameraStatus)]
    frames = [m for m in messages if isinstance(m, Frame)]
    assert statuses == ["connected", "stopped"]
    assert [f.header.seq for f in frames] == list(range(41, 47))
    reference = SynthCamera(SynthSource(size=32))
    for i, frame in enumerate(frames):
        h = frame.header
        assert h.camera == "cam7" and h.part_id == str(h.seq) and h.shape == (32, 32)
        assert h.deadline_ns - h.ts_acquired_ns == 250_000_000
        assert np.array_equal(frame.pixels, reference.make(i)[0])
    assert stats.frames == 6 and stats.gaps == 0 and process.next_seq == 47


def test_process_turns_an_unreadable_file_into_a_gap_notice(
    pull: tuple[zmq.Socket[bytes], str], folder: Path,
) -> None:
    (folder / "b" / "3.png").write_bytes(b"corrupt")
    sock, endpoint = pull
    process = _process(_replay(folder, fps=500.0), endpoint)
    stats = process.run()
    messages = _receive(sock)
    gaps = [m for m in messages if isinstance(m, GapNotice)]
    assert [(g.first_seq, g.last_seq) for g in gaps] == [(2, 2)]
    assert _seqs(messages) == [0, 1, 2, 3]
    parts = [m.header.part_id for m in messages if isinstance(m, Frame)]
    assert parts == ["a/1", "b/2", "c"]
    assert (stats.frames, stats.gaps, stats.missed, stats.errors) == (3, 1, 1, 1)


class _FlakyCamera(FrameSource):
    """A camera that is lost after two frames, absent on the first retry, then back."""

    def __init__(self) -> None:
        super().__init__()
        self.opens = 0
        self.sent = 0

    def open(self) -> None:
        self.opens += 1
        if self.opens == 2:
            raise SourceLost("still unplugged")

    def read(self) -> SourceItem | None:
        if self.sent == 5:
            return None
        if self.sent == 2 and self.opens == 1:
            raise SourceLost("cable pulled")
        self.sent += 1
        if self.sent == 4:  # the camera itself dropped two frames before this one
            return MissedFrames(2, "dropped", "frame id jumped", 0)
        return RawFrame(np.zeros((4, 4), np.uint8), 1, self.sent, f"p{self.sent}")

    def close(self) -> None:
        pass


def test_process_reports_loss_and_reconnects_keeping_seq(
    pull: tuple[zmq.Socket[bytes], str],
) -> None:
    sock, endpoint = pull
    source = _FlakyCamera()
    process = _process(source, endpoint, reconnect_interval_s=0.01)
    stats = process.run()
    messages = _receive(sock)
    statuses = [(m.state, m.detail) for m in messages if isinstance(m, CameraStatus)]
    assert [s for s, _ in statuses] == ["connected", "lost", "reconnected", "stopped"]
    assert "cable pulled" in statuses[1][1]
    assert _seqs(messages) == list(range(6))  # frames 0,1,2 / gap 3-4 / frame 5
    assert [m.header.part_id for m in messages if isinstance(m, Frame)] == ["p1", "p2", "p3",
                                                                             "p5"]
    assert source.opens == 3
    assert (stats.frames, stats.missed, stats.reconnects) == (4, 2, 1)


def test_process_drops_frames_as_gaps_when_downstream_is_full() -> None:
    # Nothing binds this endpoint: after the high-water mark every frame waits for
    # room until its deadline, then is accounted for as missed instead of blocking.
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    camera = CameraConfig(id="cam7", source=SynthSource(fps=500.0, size=32), frames=8,
                          deadline_ms=1.0)
    transport = TransportConfig(frames_endpoint="ipc:///tmp/linewatch-test-nobody-binds",
                                high_water_mark=2, linger_ms=0)
    process = AcquisitionProcess(camera, transport, context=ctx)
    stats = process.run()
    ctx.term()
    assert stats.frames + stats.missed == 8
    assert stats.missed > 0 and stats.errors == stats.missed
    assert process.next_seq == 8


def test_process_stop_from_another_thread(pull: tuple[zmq.Socket[bytes], str]) -> None:
    sock, endpoint = pull
    camera = CameraConfig(id="cam7", source=SynthSource(fps=200.0, size=32))  # endless
    process = AcquisitionProcess(camera, TransportConfig(frames_endpoint=endpoint))
    runner = threading.Thread(target=process.run)
    runner.start()
    try:
        assert sock.poll(10_000), "no frame within 10 s"
    finally:
        process.stop()
        runner.join(timeout=30)
    assert not runner.is_alive()
    messages = _receive(sock)
    assert _seqs(messages) == list(range(process.next_seq))


# ---------------------------------------------------------------------- entry points


def _line_toml(tmp_path: Path, endpoint: str) -> Path:
    path = tmp_path / "line.toml"
    path.write_text(
        f"""
[[cameras]]
id = "cam0"
frames = 3
[cameras.source]
kind = "synth"
fps = 500.0
size = 32

[transport]
frames_endpoint = "{endpoint}"
""",
        encoding="utf-8",
    )
    return path


def test_worker_main_acquires_until_the_source_ends(
    pull: tuple[zmq.Socket[bytes], str], tmp_path: Path,
) -> None:
    from workers.acquire import main

    sock, endpoint = pull
    assert main([str(_line_toml(tmp_path, endpoint)), "--camera", "cam0", "--start-seq", "7"]) == 0
    assert _seqs(_receive(sock)) == [7, 8, 9]


def test_unknown_camera_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from linewatch.cli import main

    config = _line_toml(tmp_path, "tcp://127.0.0.1:1")
    assert main(["acquire", str(config), "--camera", "cam9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "linewatch: error: no camera 'cam9' in line line1 (cameras: cam0)"


def test_auto_start_seq_is_above_any_earlier_run(
    pull: tuple[zmq.Socket[bytes], str], tmp_path: Path,
) -> None:
    from linewatch.cli import main

    sock, endpoint = pull
    config = str(_line_toml(tmp_path, endpoint))
    assert main(["acquire", config, "--camera", "cam0", "--start-seq", "auto"]) == 0
    first = _seqs(_receive(sock))
    assert main(["acquire", config, "--camera", "cam0", "--start-seq", "auto"]) == 0
    second = _seqs(_receive(sock))
    assert first == list(range(first[0], first[0] + 3)) and second[0] > first[-1]


MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic-tile"


@pytest.mark.dataset
@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="shared magnetic-tile data set absent")
def test_folder_replays_the_magnetic_tile_val_split() -> None:
    with _replay(MAGNETIC_TILE, split="val") as source:
        first = source.read()
        assert isinstance(first, RawFrame) and first.part_id is not None
        assert first.part_id.startswith("good/")
        assert first.pixels.dtype == np.uint8 and first.pixels.ndim in (2, 3)
        assert not any("ground_truth" in str(p) for p in source.files)


@given(now=st.floats(0.0, 1e6), period=st.floats(1e-3, 10.0), phase=st.floats(0.0, 10.0))
def test_next_slot_is_the_first_grid_time_from_now(now: float, period: float,
                                                   phase: float) -> None:
    slot = next_slot(now, period, phase)
    tolerance = 1e-6  # slots are rounded to the ns; a µs is far above the float error here
    assert now - tolerance <= slot < now + period + tolerance
    periods = (slot - phase) / period
    assert abs(periods - round(periods)) * period < tolerance


def test_phased_sources_carry_their_phase_and_a_negative_one_is_refused() -> None:
    camera = SynthCamera(SynthSource(fps=20.0, phase_ms=12.5))
    assert (camera.pace_hz, camera.pace_phase_s) == (20.0, 0.0125)
    assert SynthCamera(SynthSource()).pace_phase_s is None
    with pytest.raises(ValidationError, match="phase_ms"):
        FolderSource(path=Path("x"), phase_ms=-1.0)
