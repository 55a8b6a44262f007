"""FrameTracker: every frame decided once, whatever order results and notices come in."""

from __future__ import annotations

from linewatch.decision.tracker import FrameTracker, MissedFrame
from linewatch.testing import frame_header
from linewatch.wire import FrameHeader, GapNotice

MS = 1_000_000


def _header(seq: int, deadline_ms: float = 100.0, camera: str = "cam0") -> FrameHeader:
    return frame_header(camera, seq, ts_acquired_ns=0, deadline_ms=deadline_ms)


def _gap(first: int, last: int, camera: str = "cam0") -> GapNotice:
    return GapNotice(camera=camera, first_seq=first, last_seq=last, ts_detected_ns=0,
                     deadline_ns=50 * MS)


def test_a_frame_without_result_times_out_once_at_its_deadline() -> None:
    tracker = FrameTracker()
    tracker.announce(_header(1, deadline_ms=10))
    tracker.announce(_header(2, deadline_ms=30))
    assert tracker.expire(10 * MS) == []  # due *by* the deadline: not late yet
    assert [h.seq for h in tracker.expire(20 * MS)] == [1]
    assert [h.seq for h in tracker.expire(40 * MS)] == [2]
    assert tracker.expire(100 * MS) == []
    assert tracker.pending_count == 0 and tracker.counters.timed_out == 2


def test_a_result_completes_once_and_a_second_is_a_duplicate() -> None:
    tracker = FrameTracker()
    tracker.announce(_header(1))
    assert tracker.complete("cam0:1") is True
    assert tracker.complete("cam0:1") is False
    assert tracker.expire(10_000 * MS) == []  # decided: never a timeout as well
    assert tracker.counters.duplicates == 1


def test_a_result_after_the_timeout_is_late_and_ignored() -> None:
    tracker = FrameTracker()
    tracker.announce(_header(1, deadline_ms=10))
    assert len(tracker.expire(20 * MS)) == 1
    assert tracker.complete("cam0:1") is False
    assert tracker.counters.late == 1 and tracker.counters.duplicates == 0


def test_a_result_for_a_frame_never_announced_is_accepted_once() -> None:
    tracker = FrameTracker()
    assert tracker.complete("cam0:7") is True
    assert tracker.announce(_header(7)) is False  # the announcement came second
    assert tracker.expire(10_000 * MS) == []
    assert tracker.counters.unannounced == 1


def test_a_failure_decides_the_frame() -> None:
    tracker = FrameTracker()
    tracker.announce(_header(3))
    assert tracker.fail(_header(3), "worker_lost") is True
    assert tracker.complete("cam0:3") is False
    assert tracker.expire(10_000 * MS) == []


def test_a_gap_lists_frames_not_seen_and_only_once() -> None:
    tracker = FrameTracker()
    tracker.announce(_header(11))       # announced: left to its deadline
    tracker.complete("cam0:12")         # decided already
    missed = tracker.gap(_gap(10, 13))
    assert missed == [MissedFrame("cam0", 10), MissedFrame("cam0", 13)]
    assert missed[0].frame_id == "cam0:10"
    assert tracker.gap(_gap(10, 13)) == []       # the same notice again
    assert tracker.complete("cam0:10") is False  # a frame declared missed stays decided
    assert tracker.counters.late == 1


def test_a_huge_gap_is_capped_and_counted() -> None:
    tracker = FrameTracker(max_gap=5)
    assert [m.seq for m in tracker.gap(_gap(0, 99))] == [0, 1, 2, 3, 4]
    assert tracker.counters.gap_truncated == 95


def test_memory_of_decided_frames_is_bounded() -> None:
    tracker = FrameTracker(recent=10)
    for seq in range(5000):
        tracker.announce(_header(seq))
        tracker.complete(f"cam0:{seq}")
    assert tracker.complete("cam0:4999") is False  # recent: still known
    assert tracker.complete("cam0:0") is True     # forgotten: Redis dedupe takes over
    assert len(tracker._done) <= 10 and len(tracker._deadlines) <= 4 * 1024 + 1
    assert tracker._seq_entries <= 4 * 1024 + 1  # never asked for the lowest: compacted


def test_the_lowest_pending_seq_follows_decisions_per_camera() -> None:
    tracker = FrameTracker()
    for seq in (5, 3, 9):
        tracker.announce(_header(seq, deadline_ms=10 * seq))
    tracker.announce(_header(1, camera="cam1"))
    assert tracker.lowest_pending_seq("cam0") == 3
    tracker.complete("cam0:3")
    assert tracker.lowest_pending_seq("cam0") == 5
    tracker.complete("cam0:4")       # never announced: not pending, never waited for
    assert tracker.lowest_pending_seq("cam0") == 5
    assert [h.seq for h in tracker.expire(60 * MS)] == [5]
    assert tracker.lowest_pending_seq("cam0") == 9
    assert [h.seq for h in tracker.pending_before("cam0", 10)] == [9]
    assert tracker.pending_before("cam0", 9) == []
    tracker.fail(_header(9), "worker_lost")
    assert tracker.lowest_pending_seq("cam0") is None
    assert tracker.lowest_pending_seq("cam1") == 1
    assert tracker.lowest_pending_seq("cam7") is None
