"""VerdictOrder with a FrameTracker at explicit times: verdicts leave in seq order per camera."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from linewatch.decision.ordering import VerdictOrder
from linewatch.decision.tracker import FrameTracker
from linewatch.testing import frame_header
from linewatch.wire import FrameHeader, GapNotice

MS = 1_000_000


def _header(seq: int, deadline_ms: float = 100.0, camera: str = "cam0") -> FrameHeader:
    return frame_header(camera, seq, ts_acquired_ns=0, deadline_ms=deadline_ms)


class Stage:
    """The decision service's glue, without sockets: decide, hold, release what may go."""

    def __init__(self) -> None:
        self.tracker = FrameTracker()
        self.order: VerdictOrder[str] = VerdictOrder()
        self.written: list[str] = []

    def announce(self, seq: int, deadline_ms: float = 100.0, camera: str = "cam0") -> None:
        assert self.tracker.announce(_header(seq, deadline_ms, camera))

    def result(self, seq: int, now_ms: float, camera: str = "cam0") -> None:
        assert self.tracker.complete(f"{camera}:{seq}")
        self._decided(camera, seq, f"{camera}:{seq}:result", now_ms)

    def gap(self, first: int, last: int, now_ms: float, camera: str = "cam0") -> None:
        notice = GapNotice(camera=camera, first_seq=first, last_seq=last, ts_detected_ns=0,
                           deadline_ns=0)
        for frame in self.tracker.gap(notice):
            self.order.hold(camera, frame.seq, f"{frame.frame_id}:missed", int(now_ms * MS))
        self._release(camera, now_ms)

    def tick(self, now_ms: float) -> None:
        cameras = set()
        for header in self.tracker.expire(int(now_ms * MS)):
            self.order.hold(header.camera, header.seq, f"{header.frame_id}:timeout",
                            int(now_ms * MS))
            cameras.add(header.camera)
        for camera in sorted(cameras):
            self._release(camera, now_ms)

    def _decided(self, camera: str, seq: int, item: str, now_ms: float) -> None:
        self.order.hold(camera, seq, item, int(now_ms * MS))
        self._release(camera, now_ms)

    def _release(self, camera: str, now_ms: float) -> None:
        lowest = self.tracker.lowest_pending_seq(camera)
        self.written += self.order.release(camera, lowest, int(now_ms * MS))


def test_results_arriving_shuffled_are_written_in_seq_order() -> None:
    stage = Stage()
    for seq in range(6):
        stage.announce(seq)
    for step, seq in enumerate([3, 1, 4, 0, 5, 2]):
        stage.result(seq, now_ms=step)
        if seq == 0:
            assert stage.written == ["cam0:0:result", "cam0:1:result"]  # 2 is still due
    assert stage.written == [f"cam0:{seq}:result" for seq in range(6)]
    counters = stage.order.counters
    assert (counters.released, counters.held, counters.out_of_order) == (6, 4, 0)
    assert counters.max_wait_ms == 5  # seq 3, decided at 0 ms, waited for seq 2 at 5 ms
    assert stage.order.held_count == 0


def test_a_frame_without_result_holds_later_ones_until_its_deadline() -> None:
    stage = Stage()
    stage.announce(0, deadline_ms=50)
    for seq in (1, 2):
        stage.announce(seq, deadline_ms=80)
        stage.result(seq, now_ms=10)
    stage.tick(now_ms=50)  # due *by* the deadline: not late yet
    assert stage.written == [] and stage.order.held_count == 2
    stage.tick(now_ms=51)
    assert stage.written == ["cam0:0:timeout", "cam0:1:result", "cam0:2:result"]


def test_cameras_are_independent() -> None:
    stage = Stage()
    stage.announce(0, camera="cam0")
    stage.announce(1, camera="cam0")
    stage.announce(0, camera="cam1")
    stage.result(1, now_ms=1, camera="cam0")   # waits for cam0:0
    stage.result(0, now_ms=2, camera="cam1")   # nothing of cam1 before it
    assert stage.written == ["cam1:0:result"]
    stage.result(0, now_ms=3, camera="cam0")
    assert stage.written[1:] == ["cam0:0:result", "cam0:1:result"]


def test_missed_frames_fill_their_seqs_in_order() -> None:
    stage = Stage()
    stage.announce(10)
    stage.announce(13)
    stage.result(13, now_ms=1)
    stage.gap(11, 12, now_ms=2)
    assert stage.written == []
    stage.result(10, now_ms=3)
    assert stage.written == ["cam0:10:result", "cam0:11:missed", "cam0:12:missed",
                             "cam0:13:result"]


def test_seqs_nobody_announced_hold_nothing_back() -> None:
    """A camera restarted with ``--start-seq auto`` jumps far ahead: the hole is no frame."""
    stage = Stage()
    stage.announce(7)
    stage.result(7, now_ms=1)
    restarted = 1_700_000_000_000_000
    assert stage.tracker.complete(f"cam0:{restarted}")  # its announcement is not here yet
    stage._decided("cam0", restarted, "cam0:auto:result", now_ms=2)
    assert stage.written == ["cam0:7:result", "cam0:auto:result"]
    assert stage.order.counters.held == 0


def test_a_frame_decided_below_one_already_written_is_counted_out_of_order() -> None:
    stage = Stage()
    stage.result(5, now_ms=1)        # nothing pending: written at once
    stage.gap(3, 4, now_ms=2)        # the gap notice came late: cannot go before 5 now
    stage.result(6, now_ms=3)
    assert stage.written == ["cam0:5:result", "cam0:3:missed", "cam0:4:missed",
                             "cam0:6:result"]
    assert stage.order.counters.out_of_order == 1  # counted once, not for 4 and 6 too


def test_drain_empties_every_camera_in_seq_order() -> None:
    order: VerdictOrder[str] = VerdictOrder()
    for camera, seq in [("cam1", 4), ("cam0", 9), ("cam1", 2), ("cam0", 8)]:
        order.hold(camera, seq, f"{camera}:{seq}", now_ns=0)
    assert order.cameras() == ["cam0", "cam1"] and order.highest_held("cam1") == 4
    assert order.drain(now_ns=0) == ["cam0:8", "cam0:9", "cam1:2", "cam1:4"]
    assert order.held_count == 0 and order.cameras() == []
    assert order.highest_held("cam0") is None


@settings(max_examples=60, deadline=None)
@given(
    decisions=st.permutations([(camera, seq) for camera in ("a", "b") for seq in range(12)]),
    data=st.data(),
)
def test_any_arrival_order_leaves_each_camera_in_seq_order(
    decisions: list[tuple[str, int]], data: st.DataObject
) -> None:
    stage = Stage()
    timed_out = data.draw(st.sets(st.sampled_from(decisions), max_size=4))
    for camera, seq in sorted(decisions):
        stage.announce(seq, deadline_ms=1000, camera=camera)
    for step, (camera, seq) in enumerate(decisions):
        if (camera, seq) not in timed_out:
            stage.result(seq, now_ms=step, camera=camera)
    stage.tick(now_ms=2000)
    for camera in ("a", "b"):
        seqs = [int(w.split(":")[1]) for w in stage.written if w.startswith(f"{camera}:")]
        assert seqs == list(range(12))
    assert stage.order.counters.out_of_order == 0
