"""Bookkeeping behind "every acquired frame ends as exactly one verdict".

The tracker knows which frames are due (announced, with a deadline), which were
decided recently, and which never arrived (gaps). It decides nothing itself: each
method tells the caller whether it should write a verdict now.

- :meth:`FrameTracker.complete` / :meth:`FrameTracker.fail` return True exactly once
  per frame; a second result, or one arriving after the frame timed out, returns
  False (and is logged) so that it cannot become a second verdict.
- :meth:`FrameTracker.expire` hands back the frames whose deadline passed without a
  result; :meth:`FrameTracker.gap` the frames acquisition never saw.
- :meth:`FrameTracker.lowest_pending_seq` tells the verdict ordering
  (:mod:`linewatch.decision.ordering`) which seq of a camera it still has to wait for.
- A result can overtake its frame's announcement (they travel on different sockets,
  and a stalled service reads its queues fair-queued, not in send order). Such a frame
  is decided but stays "awaiting its announcement" (:meth:`FrameTracker.await_announcement`):
  it counts as pending for the ordering until the announcement arrives (every lower
  seq of its camera is announced before it), for ``announce_wait_ns`` at most and
  never past its deadline.

>>> from linewatch.testing import frame_header
>>> tracker = FrameTracker()
>>> header = frame_header("cam0", 1, ts_acquired_ns=0, deadline_ms=1)
>>> tracker.announce(header)
True
>>> [h.frame_id for h in tracker.expire(now_ns=2_000_000)]
['cam0:1']
>>> tracker.announce(header)      # decided (timed out): never pending again
False
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from linewatch.log import get_logger
from linewatch.wire import FrameHeader, GapNotice

log = get_logger("tracker")


class MissedFrame(NamedTuple):
    """A frame acquisition never delivered (a sequence gap)."""

    camera: str
    seq: int

    @property
    def frame_id(self) -> str:
        """``<camera>:<seq>``, as :attr:`FrameHeader.frame_id`."""
        return f"{self.camera}:{self.seq}"


@dataclass
class TrackerCounters:
    """Totals since the tracker was made."""

    announced: int = 0
    completed: int = 0
    unannounced: int = 0
    written_before: int = 0
    failed: int = 0
    timed_out: int = 0
    missed: int = 0
    duplicates: int = 0
    late: int = 0
    gap_truncated: int = 0


class FrameTracker:
    """Pending frames with deadlines and a bounded memory of decided ones.

    ``recent`` bounds how many decided frame ids are remembered to refuse a second
    result; ``max_gap`` bounds the frames one gap notice can declare missed;
    ``announce_wait_ns`` bounds how long a frame decided before its announcement
    waits for it.
    """

    def __init__(self, recent: int = 100_000, max_gap: int = 10_000,
                 announce_wait_ns: int = 1_000_000_000) -> None:
        self.counters = TrackerCounters()
        self._recent = recent
        self._max_gap = max_gap
        self._announce_wait_ns = announce_wait_ns
        self._pending: dict[str, FrameHeader] = {}
        self._deadlines: list[tuple[int, str]] = []  # heap; entries of decided frames stay
        # Per camera, a heap of announced seqs; entries of decided frames stay until they
        # reach the top (lowest_pending_seq) or the heaps are compacted (_compact).
        self._seqs: dict[str, list[tuple[int, str]]] = {}
        self._seq_entries = 0
        self._done: OrderedDict[str, str] = OrderedDict()  # frame id -> how it ended
        self._awaiting: dict[str, int] = {}  # decided before their announcement -> wait until

    @property
    def pending_count(self) -> int:
        """Frames announced and not decided yet."""
        return len(self._pending)

    def is_pending(self, frame_id: str) -> bool:
        """True while ``frame_id`` waits for its result."""
        return frame_id in self._pending

    def announce(self, header: FrameHeader) -> bool:
        """Register a frame due by ``header.deadline_ns``; False if it is known already
        (an announcement awaited by a decided frame ends that wait)."""
        frame_id = header.frame_id
        if self._awaiting.pop(frame_id, None) is not None:
            return False
        if frame_id in self._pending or frame_id in self._done:
            return False
        self._pending[frame_id] = header
        self._index(header)
        self.counters.announced += 1
        return True

    def await_announcement(self, header: FrameHeader, now_ns: int) -> None:
        """A frame decided before its announcement arrived: it holds back higher seqs of
        its camera (see :meth:`lowest_pending_seq`) until :meth:`announce`, for
        ``announce_wait_ns`` at most and not past its deadline (see :meth:`expire`)."""
        if header.frame_id not in self._awaiting:
            until = min(header.deadline_ns, now_ns + self._announce_wait_ns)
            self._awaiting[header.frame_id] = until
            self._index(header, until)

    def written_before(self, frame_id: str) -> None:
        """An announced frame turned out to have its verdict already (written by an earlier
        run of the service): it is no longer pending, and a result for it is a duplicate."""
        if self._pending.pop(frame_id, None) is not None:
            self.counters.written_before += 1
            self._remember(frame_id, "written_before")

    def _index(self, header: FrameHeader, until_ns: int | None = None) -> None:
        due = header.deadline_ns if until_ns is None else until_ns
        heapq.heappush(self._deadlines, (due, header.frame_id))
        heapq.heappush(self._seqs.setdefault(header.camera, []), (header.seq, header.frame_id))
        self._seq_entries += 1

    def _waited_for(self, frame_id: str) -> bool:
        """Pending, or decided and awaiting its announcement: the ordering waits for it."""
        return frame_id in self._pending or frame_id in self._awaiting

    def lowest_pending_seq(self, camera: str) -> int | None:
        """The lowest seq of ``camera`` announced and not decided yet, or decided and still
        awaiting its announcement; None if there is none.

        Amortised O(log n): each decided frame's entry is dropped once, when it is on top.
        """
        heap = self._seqs.get(camera)
        while heap and not self._waited_for(heap[0][1]):
            heapq.heappop(heap)
            self._seq_entries -= 1
        if not heap:
            self._seqs.pop(camera, None)
            return None
        return heap[0][0]

    def pending_before(self, camera: str, seq: int) -> list[FrameHeader]:
        """Pending frames of ``camera`` with a seq below ``seq``, lowest first (O(pending))."""
        return sorted(
            (h for h in self._pending.values() if h.camera == camera and h.seq < seq),
            key=lambda h: h.seq,
        )

    def complete(self, frame_id: str) -> bool:
        """A result arrived: True the first time (announced or not), False after that."""
        if not self._finish(frame_id, "result"):
            return False
        self.counters.completed += 1
        return True

    def fail(self, header: FrameHeader, reason: str) -> bool:
        """The frame cannot be scored: True if a fail-safe verdict is to be written now."""
        if not self._finish(header.frame_id, reason):
            return False
        self.counters.failed += 1
        return True

    def gap(self, notice: GapNotice) -> list[MissedFrame]:
        """Frames of a gap notice that still need a ``missed_frame`` verdict.

        Frames already announced or decided are left out. At most ``max_gap`` are
        returned; the rest are counted and logged as an error.
        """
        missed = []
        last = notice.last_seq
        if last - notice.first_seq + 1 > self._max_gap:
            last = notice.first_seq + self._max_gap - 1
            skipped = notice.last_seq - last
            self.counters.gap_truncated += skipped
            log.error("gap_truncated", camera=notice.camera, first_seq=notice.first_seq,
                      last_seq=notice.last_seq, without_verdict=skipped)
        for seq in range(notice.first_seq, last + 1):
            frame = MissedFrame(notice.camera, seq)
            if frame.frame_id in self._pending or frame.frame_id in self._done:
                continue
            self._remember(frame.frame_id, "missed_frame")
            missed.append(frame)
        self.counters.missed += len(missed)
        return missed

    def expire(self, now_ns: int) -> list[FrameHeader]:
        """Frames whose deadline is before ``now_ns`` with no result: they time out now.

        A decided frame whose announcement has not come in time stops waiting for it
        (an integration that sends no announcements, or one lost with a crashed
        predecessor).
        """
        expired = []
        while self._deadlines and self._deadlines[0][0] < now_ns:
            deadline, frame_id = heapq.heappop(self._deadlines)
            if self._awaiting.get(frame_id) == deadline:
                del self._awaiting[frame_id]
                continue
            header = self._pending.get(frame_id)
            if header is None or header.deadline_ns != deadline:
                continue  # decided already
            del self._pending[frame_id]
            self._remember(frame_id, "timeout")
            expired.append(header)
        self.counters.timed_out += len(expired)
        return expired

    def next_deadline_ns(self) -> int | None:
        """The earliest deadline among pending frames (may be one decided since)."""
        return self._deadlines[0][0] if self._deadlines else None

    def _finish(self, frame_id: str, outcome: str) -> bool:
        ended = self._done.get(frame_id)
        if ended is not None:
            if ended == "timeout" or ended == "missed_frame":
                self.counters.late += 1
                log.warning("late_result_ignored", frame_id=frame_id, ended_as=ended, now=outcome)
            else:
                self.counters.duplicates += 1
                log.info("duplicate_result_ignored", frame_id=frame_id, ended_as=ended)
            return False
        if self._pending.pop(frame_id, None) is None:
            # Results and announcements travel on different paths; either may come first.
            self.counters.unannounced += 1
        self._remember(frame_id, outcome)
        return True

    def _remember(self, frame_id: str, outcome: str) -> None:
        self._done[frame_id] = outcome
        if len(self._done) > self._recent:
            self._done.popitem(last=False)
        limit = 4 * max(len(self._pending) + len(self._awaiting), 1024)
        if len(self._deadlines) > limit or self._seq_entries > limit:
            self._compact()

    def _compact(self) -> None:
        """Drop heap entries of decided frames so the heaps stay as small as pending."""
        self._deadlines = [(d, f) for d, f in self._deadlines if self._waited_for(f)]
        heapq.heapify(self._deadlines)
        for camera, heap in list(self._seqs.items()):
            kept = [(s, f) for s, f in heap if self._waited_for(f)]
            if kept:
                heapq.heapify(kept)
                self._seqs[camera] = kept
            else:
                del self._seqs[camera]
        self._seq_entries = sum(len(h) for h in self._seqs.values())
