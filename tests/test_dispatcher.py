"""Dispatcher and worker links over real ZeroMQ sockets (ipc in tmp_path).

Most tests drive the dispatcher and the links step by step in one thread, so that
what they assert follows from the protocol, not from timing; one runs them in
threads as the processes would. Every wait is a poll with a bounded timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from linewatch.config import TransportConfig
from linewatch.transport.codec import (
    BadMessage,
    decode_decision_message,
    encode_frame,
    encode_message,
)
from linewatch.transport.dispatcher import Dispatcher
from linewatch.transport.sockets import Context, Socket, make_socket, transport_context
from linewatch.transport.worker_link import WorkerLink
from linewatch.wire import (
    CameraStatus,
    FrameAnnounce,
    FrameFailed,
    FrameHeader,
    GapNotice,
    ResultHeader,
)
from workers.dispatch import main as dispatch_main

WAIT_S = 15.0  # upper bound of any wait; tests normally finish far sooner


def transport(tmp_path: Path, **changes: Any) -> TransportConfig:
    return TransportConfig(
        frames_endpoint=f"ipc://{tmp_path}/frames",
        workers_endpoint=f"ipc://{tmp_path}/workers",
        results_endpoint=f"ipc://{tmp_path}/results",
        **changes,
    )


@pytest.fixture
def ctx() -> Iterator[Context]:
    context: Context = zmq.Context()
    yield context
    context.destroy(linger=0)


class Camera:
    """Acquisition's end: pushes frames whose pixels encode their sequence number."""

    def __init__(self, ctx: Context, cfg: TransportConfig, size: int = 8) -> None:
        self.sock = make_socket(ctx, "push", cfg, "connect", cfg.frames_endpoint, "test.camera")
        self.size = size
        self.seq = 0

    def header(self, deadline_s: float) -> FrameHeader:
        now = time.time_ns()
        header = FrameHeader(
            camera="cam0", seq=self.seq, part_id=f"part{self.seq}", ts_acquired_ns=now,
            deadline_ns=max(0, now + int(deadline_s * 1e9)), dtype="uint8",
            shape=(self.size, self.size),
        )
        self.seq += 1
        return header

    def send(self, deadline_s: float = 60.0, flags: int = 0) -> str:
        header = self.header(deadline_s)
        pixels = np.full(header.shape, header.seq % 256, np.uint8)
        self.sock.send_multipart(encode_frame(header, pixels), flags, copy=False)
        return header.frame_id


@dataclass
class Decision:
    """Decision's end: collects announces and the final outcome of every frame."""

    sock: Socket
    announced: list[str] = field(default_factory=list)
    notices: list[GapNotice | CameraStatus] = field(default_factory=list)
    outcomes: dict[str, list[ResultHeader | FrameFailed]] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=list)  # every message's kind, in arrival order

    def read(self, timeout_ms: int = 0) -> None:
        if not self.sock.poll(timeout_ms):
            return
        while True:
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            message, amap = decode_decision_message(parts)
            self.kinds.append(message.kind)
            if isinstance(message, FrameAnnounce):
                self.announced.append(message.frame.frame_id)
            elif isinstance(message, ResultHeader | FrameFailed):
                self.outcomes.setdefault(message.frame.frame_id, []).append(message)
            else:
                self.notices.append(message)
            if isinstance(message, ResultHeader):  # the worker sent the frame's own pixels
                assert amap is not None and amap[0, 0] == message.frame.seq % 256

    def failed(self, reason: str) -> set[str]:
        return {fid for fid, outs in self.outcomes.items()
                if any(isinstance(o, FrameFailed) and o.reason == reason for o in outs)}

    def scored_by(self, worker: str) -> set[str]:
        return {fid for fid, outs in self.outcomes.items()
                if any(isinstance(o, ResultHeader) and o.worker == worker for o in outs)}


@pytest.fixture
def decision(ctx: Context, tmp_path: Path) -> Decision:
    cfg = transport(tmp_path)
    return Decision(make_socket(ctx, "pull", cfg, "bind", cfg.results_endpoint, "test.decision"))


def result_for(header: FrameHeader, worker: str) -> tuple[ResultHeader, np.ndarray]:
    """A result whose map carries the frame's pixel value, so the test sees real pixels."""
    amap = np.full((2, 2), header.seq % 256, np.uint8)
    return ResultHeader(
        frame=header, score=0.5, map_dtype="uint8", map_shape=(2, 2), model_id="m",
        threshold_version="t", threshold=1.0, worker=worker, ts_infer_start_ns=0,
        ts_infer_end_ns=0, batch_size=1,
    ), amap


def serve(link: WorkerLink, timeout_ms: float = 5) -> int:
    """One turn of a worker's loop: poll, 'score' each frame (its pixel value), ack."""
    frames = link.poll(timeout_ms)
    for frame in frames:
        result, amap = result_for(frame.header, link.worker_id)
        amap[:] = frame.pixels[0, 0]
        link.send_result(result, amap)
    link.done([f.header.frame_id for f in frames])
    return len(frames)


def until(condition: Callable[[], bool], turn: Callable[[], object], what: str) -> None:
    """Run ``turn`` until ``condition`` holds; fail after WAIT_S."""
    give_up = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < give_up, f"gave up waiting for {what}"
        turn()


def assert_each_frame_ends_once(decision: Decision, frame_ids: list[str],
                                turn: Callable[[], object] | None = None) -> None:
    """Every frame has one outcome and one announcement. ``turn`` keeps the line moving
    while announcements are awaited (default: read decision's socket)."""
    assert sorted(decision.outcomes) == sorted(frame_ids)
    twice = {fid: outs for fid, outs in decision.outcomes.items() if len(outs) != 1}
    assert not twice, f"frames with more than one outcome: {twice}"
    # A result can overtake its announcement (two senders into one socket, as decision
    # allows for): read on until every announcement is in; a missing one fails after WAIT_S.
    until(lambda: len(decision.announced) >= len(frame_ids),
          turn or (lambda: decision.read(50)), "every announcement")
    assert sorted(decision.announced) == sorted(frame_ids)


# --------------------------------------------------------------------------- tests


def test_frames_flow_to_a_worker_and_results_to_decision(
    ctx: Context, tmp_path: Path, decision: Decision
) -> None:
    cfg = transport(tmp_path)
    dispatcher = Dispatcher(cfg, ctx)
    camera = Camera(ctx, cfg)
    with WorkerLink(cfg, "w0", max_batch=2, ctx=ctx) as link:
        sent = [camera.send() for _ in range(10)]

        def turn() -> None:
            dispatcher.step(5)
            serve(link)
            decision.read()

        until(lambda: len(decision.outcomes) == len(sent), turn, "10 results")
        until(lambda: dispatcher.stats.done == len(sent), turn, "10 acks")
        assert_each_frame_ends_once(decision, sent)
        assert decision.scored_by("w0") == set(sent)
        assert dispatcher.stats.frames_in == dispatcher.stats.frames_out == 10
        assert [w.in_flight for w in dispatcher.workers()] == [()]
        assert link.in_flight == 0
    dispatcher.close()


def test_two_worker_threads_each_frame_ends_exactly_once(
    ctx: Context, tmp_path: Path, decision: Decision
) -> None:
    cfg = transport(tmp_path)
    stop_dispatcher, stop_workers = threading.Event(), threading.Event()
    dispatcher = Dispatcher(cfg, ctx)
    dispatch_thread = threading.Thread(target=dispatcher.run, args=(stop_dispatcher,))
    dispatch_thread.start()

    def work(name: str) -> None:
        with WorkerLink(cfg, name, max_batch=2) as link:  # own context, as in its process
            while not stop_workers.is_set():
                serve(link, timeout_ms=20)

    workers = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(2)]
    for w in workers:
        w.start()
    try:
        until(lambda: len(dispatcher.workers()) == 2, lambda: time.sleep(0.01), "2 workers")
        camera = Camera(ctx, cfg)
        sent = [camera.send() for _ in range(60)]
        until(lambda: len(decision.outcomes) == len(sent), lambda: decision.read(50), "results")
    finally:
        stop_workers.set()
        for w in workers:
            w.join(WAIT_S)
        stop_dispatcher.set()
        dispatch_thread.join(WAIT_S)
    assert not dispatch_thread.is_alive()
    while decision.sock.poll(200):  # anything late would be a duplicate
        decision.read()
    assert_each_frame_ends_once(decision, sent)
    assert decision.scored_by("w0") and decision.scored_by("w1")  # both got work
    assert dispatcher.stats.failed == {}


def test_stalled_worker_gets_no_new_frames_and_its_frames_move_on(
    ctx: Context, tmp_path: Path, decision: Decision
) -> None:
    # Passed over after 150 ms of silence, dead after 1 s; "short" frames are due 0.5 s
    # after acquisition, so they reach the worker in time but cannot outlive its death.
    cfg = transport(tmp_path, heartbeat_ms=100, liveness=10)
    dispatcher = Dispatcher(cfg, ctx)
    camera = Camera(ctx, cfg)
    stalled = WorkerLink(cfg, "stalled", max_batch=4, ctx=ctx)  # credit 8
    until(lambda: len(dispatcher.workers()) == 1, lambda: dispatcher.step(5), "registration")

    far, short = camera.send(deadline_s=60), camera.send(deadline_s=0.5)
    held: dict[str, FrameHeader] = {}

    def receive() -> None:
        dispatcher.step(5)
        held.update((f.header.frame_id, f.header) for f in stalled.poll(5))

    until(lambda: len(held) == 2, receive, "frames at the soon-stalled worker")
    # From now on `stalled` is not polled: its loop hangs in the middle of a batch.
    healthy = WorkerLink(cfg, "healthy", max_batch=1, ctx=ctx)  # credit 2 < 6 left at `stalled`

    def turn() -> None:
        dispatcher.step(5)
        serve(healthy)
        decision.read()

    def is_suspect() -> bool:
        states = {w.name: w for w in dispatcher.workers()}
        return "healthy" in states and "stalled" in states and not states["stalled"].eligible

    until(is_suspect, turn, "the stalled worker to be passed over")
    later = [camera.send(deadline_s=60) for _ in range(6)]
    until(lambda: dispatcher.stats.workers_lost == 1, turn, "the stalled worker declared dead")
    sent = [far, short, *later]
    until(lambda: len(decision.outcomes) == len(sent), turn, "every frame settled")

    assert set(held) == {far, short}
    assert decision.scored_by("healthy") == {far, *later}  # moved on, and all new work
    assert decision.failed("worker_lost") == {short}  # its deadline had passed
    assert dispatcher.stats.redispatched == 1

    # The stalled worker wakes up and finishes its batch: forfeited, not scored twice.
    result, amap = result_for(held[far], "stalled")
    stalled.send_result(result, amap)
    assert stalled.results_dropped == 1 and stalled.in_flight == 0 and stalled.epoch == 2

    def reregister() -> bool:
        turn()
        assert stalled.poll(5) == []  # nothing of its old registration comes back
        return any(w.name == "stalled" and w.epoch == 2 for w in dispatcher.workers())

    until(reregister, lambda: None, "re-registration")
    while decision.sock.poll(100):
        decision.read()
    assert_each_frame_ends_once(decision, sent)
    stalled.close()
    healthy.close()
    dispatcher.close()


def test_frames_past_their_deadline_in_the_queue_fail(
    ctx: Context, tmp_path: Path, decision: Decision
) -> None:
    cfg = transport(tmp_path)
    dispatcher = Dispatcher(cfg, ctx)
    camera = Camera(ctx, cfg)
    sent = [camera.send(deadline_s=-1.0) for _ in range(3)]  # already due: no worker anyway

    def turn() -> None:
        dispatcher.step(5)
        decision.read()

    until(lambda: len(decision.outcomes) == 3, turn, "3 failures")
    assert_each_frame_ends_once(decision, sent)
    assert decision.failed("deadline_in_queue") == set(sent)
    dispatcher.close()


def test_backpressure_stops_reading_cameras_then_recovers(
    ctx: Context, tmp_path: Path, decision: Decision
) -> None:
    cfg = transport(tmp_path, dispatch_queue=4, high_water_mark=2)
    dispatcher = Dispatcher(cfg, ctx)
    camera = Camera(ctx, cfg, size=256)  # 64 KiB frames fill the ipc socket buffers soon
    sent: list[str] = []

    def turn() -> None:
        dispatcher.step(1)
        decision.read()

    refused, give_up = 0, time.monotonic() + WAIT_S
    while refused < 50:  # no worker: send until the camera's socket stays full
        assert time.monotonic() < give_up and len(sent) < 5000, "the camera never blocked"
        turn()
        try:
            sent.append(camera.send(flags=zmq.NOBLOCK))
            refused = 0
        except zmq.Again:
            refused += 1
    assert dispatcher.queued == 4 == dispatcher.stats.frames_in  # the bound, no more read
    until(lambda: len(decision.announced) == 4, turn, "4 announces")
    assert len(sent) > 4  # the rest wait in the sockets: backpressure reached the camera

    with WorkerLink(cfg, "w0", max_batch=1, ctx=ctx) as link:

        def work() -> None:
            dispatcher.step(5)
            serve(link)
            decision.read()

        until(lambda: len(decision.outcomes) == len(sent), work, "the backlog to drain")
    # With a high-water mark of 2 the dispatcher's announcements wait in its own queue for
    # room on the decision socket: it must keep stepping for the last ones to leave.
    assert_each_frame_ends_once(decision, sent, turn)
    dispatcher.close()


def test_bad_messages_are_counted_and_skipped(
    ctx: Context, tmp_path: Path, decision: Decision
) -> None:
    cfg = transport(tmp_path)
    dispatcher = Dispatcher(cfg, ctx)
    camera = Camera(ctx, cfg)
    rogue_worker = make_socket(ctx, "dealer", cfg, "connect", cfg.workers_endpoint, "test.rogue")
    camera.sock.send_multipart([b"{not json", b"x"])
    camera.sock.send_multipart([b'{"kind": "frame", "v": 2}', b"x"])
    rogue_worker.send(b'{"kind": "ready", "v": 1}')
    rogue_worker.send_multipart([b"{}", b"extra"])
    with WorkerLink(cfg, "w0", max_batch=2, ctx=ctx) as link:
        sent = [camera.send() for _ in range(3)]

        def turn() -> None:
            dispatcher.step(5)
            serve(link)
            decision.read()

        until(lambda: len(decision.outcomes) == 3, turn, "the good frames")
        until(lambda: dispatcher.bad_messages.total == 4, turn, "4 bad messages counted")
    assert dispatcher.bad_messages.counts == {
        "bad_json": 1, "wrong_version": 1, "bad_control": 1, "extra_part": 1,
    }
    assert_each_frame_ends_once(decision, sent)
    dispatcher.close()


def test_gap_and_camera_notices_go_on_to_decision_in_order_with_the_announcements(
    ctx: Context, tmp_path: Path, decision: Decision
) -> None:
    cfg = transport(tmp_path)
    dispatcher = Dispatcher(cfg, ctx)
    camera = Camera(ctx, cfg)
    gap = GapNotice(camera="cam0", first_seq=0, last_seq=1, ts_detected_ns=1, deadline_ns=2)
    status = CameraStatus(camera="cam0", state="lost", detail="cable", ts_ns=3)
    camera.sock.send_multipart(encode_message(gap))
    camera.seq = 2
    frame_id = camera.send()
    camera.sock.send_multipart(encode_message(status))

    def turn() -> None:
        dispatcher.step(5)
        decision.read()

    until(lambda: len(decision.notices) == 2, turn, "both notices")
    assert decision.notices == [gap, status]
    assert decision.announced == [frame_id]
    # The frame's announcement waits for its dispatch, but never behind a later notice.
    assert decision.kinds == ["gap", "announce", "camera_status"]
    assert dispatcher.stats.notices == 2 and dispatcher.stats.frames_in == 1
    dispatcher.close()


def test_worker_ignores_frames_of_an_old_epoch(ctx: Context, tmp_path: Path) -> None:
    cfg = transport(tmp_path)
    router = make_socket(ctx, "router", cfg, "bind", cfg.workers_endpoint, "test.dispatcher")
    with WorkerLink(cfg, "w0", max_batch=1, ctx=ctx) as link:
        assert router.poll(int(WAIT_S * 1000))
        identity, ready = router.recv_multipart()
        assert b'"ready"' in ready and link.epoch == 1
        header = Camera.header(Camera(ctx, cfg), deadline_s=60)
        frame = encode_frame(header, np.zeros(header.shape, np.uint8))
        router.send_multipart([identity, b'{"kind": "frame", "v": 1, "epoch": 0}', *frame])
        router.send_multipart([identity, b'{"kind": "frame", "v": 1, "epoch": 1}', *frame])
        router.send_multipart([identity, b'{"kind": "bogus", "v": 1}'])
        got: list[Any] = []
        until(lambda: bool(got), lambda: got.extend(link.poll(50)), "the current frame")
        assert len(got) == 1 and link.in_flight == 1
        until(lambda: link.bad_messages.total == 1, lambda: link.poll(5), "bad message counted")


def test_dispatch_process_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    cfg = transport(tmp_path)
    config = tmp_path / "line.toml"
    config.write_text(
        f'[[cameras]]\nid = "cam0"\n[cameras.source]\nkind = "synth"\n'
        f'[transport]\nframes_endpoint = "{cfg.frames_endpoint}"\n'
        f'workers_endpoint = "{cfg.workers_endpoint}"\n'
        f'results_endpoint = "{cfg.results_endpoint}"\n',
        encoding="utf-8",
    )
    with transport_context(cfg) as ctx:
        decision = Decision(
            make_socket(ctx, "pull", cfg, "bind", cfg.results_endpoint, "test.decision")
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "linewatch", "dispatch", str(config)],  # as supervised
            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            camera = Camera(ctx, cfg)
            frame_id = camera.send(deadline_s=60)  # no worker: it waits in the queue
            until(lambda: bool(decision.announced), lambda: decision.read(100), "the announce")
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=WAIT_S)
        finally:
            proc.kill()
        assert proc.returncode == 0, stderr.decode()
        until(lambda: bool(decision.outcomes), lambda: decision.read(100), "the failure")
        assert decision.failed("dispatcher_stopped") == {frame_id}


def test_bad_message_error_names_reason() -> None:
    error = BadMessage("length_mismatch", "pixels have 3 bytes")
    assert str(error) == "length_mismatch: pixels have 3 bytes"


def test_dispatch_entry_point_names_a_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert dispatch_main([str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: no such configuration file" in capsys.readouterr().err
