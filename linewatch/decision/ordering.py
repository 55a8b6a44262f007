"""Verdicts leave the decision service in sequence order, per camera.

Several inference workers return one camera's results out of order, but a reject
gate tracks parts in a FIFO (a shift register), so the ``verdicts`` and ``rejects``
streams must follow each camera's seq order. :class:`VerdictOrder` holds decided
frames and releases one only when no lower seq of its camera is still pending.

"Pending" is what the :class:`~linewatch.decision.tracker.FrameTracker` knows:
announced and not decided. The caller passes its lowest pending seq to
:meth:`VerdictOrder.release`; seqs nobody announced (the jump after a camera restart
with ``--start-seq auto``, or frames whose announcement has not arrived) never hold
anything back. Every pending frame is decided by its deadline at the latest (a
fail-safe ``timeout``), so a frame waits here no longer than the deadline of the
pending frame before it.

A frame decided after a higher seq of its camera was released (its announcement or
gap notice arrived after that) cannot be put back in order: it is released at once,
counted as ``out_of_order`` and logged.

Pure logic with explicit time (``now_ns`` only measures how long frames wait; one
released at the ``now_ns`` it was held with did not wait), so it is tested without
sockets or a clock.

>>> order: VerdictOrder[str] = VerdictOrder()
>>> order.hold("cam0", 6, "v6", now_ns=0)
>>> order.release("cam0", lowest_pending=5, now_ns=0)    # seq 5 is still due
[]
>>> order.hold("cam0", 5, "v5", now_ns=10)
>>> order.release("cam0", lowest_pending=None, now_ns=10)
['v5', 'v6']
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Generic, TypeVar

from linewatch.log import get_logger

log = get_logger("ordering")

T = TypeVar("T")


@dataclass
class OrderCounters:
    """Totals since the ordering stage was made."""

    held: int = 0  # frames that had to wait for a lower seq
    released: int = 0
    out_of_order: int = 0  # released below the seq released before it (could not be helped)
    max_wait_ms: int = 0  # longest wait of a held frame, whole milliseconds


class VerdictOrder(Generic[T]):
    """Per-camera reorder buffer: a heap of decided frames by seq, O(log n) per frame.

    Items are opaque (the service holds whole verdict batches); a camera's items come
    back in ascending seq order from :meth:`release` and :meth:`drain`.
    """

    def __init__(self) -> None:
        self.counters = OrderCounters()
        # camera -> heap of (seq, arrival number, decided at ns, item); the arrival
        # number breaks ties so that items are never compared.
        self._held: dict[str, list[tuple[int, int, int, T]]] = {}
        self._last_released: dict[str, int] = {}  # seq released last, per camera
        self._arrivals = itertools.count()

    @property
    def held_count(self) -> int:
        """Decided frames waiting for a lower seq of their camera."""
        return sum(len(heap) for heap in self._held.values())

    def cameras(self) -> list[str]:
        """Cameras with frames held, sorted."""
        return sorted(self._held)

    def highest_held(self, camera: str) -> int | None:
        """The highest seq of ``camera`` held; None if nothing is (O(held))."""
        heap = self._held.get(camera)
        return max(entry[0] for entry in heap) if heap else None

    def hold(self, camera: str, seq: int, item: T, now_ns: int) -> None:
        """Take a decided frame; it comes back from :meth:`release` when its turn comes."""
        heap = self._held.setdefault(camera, [])
        heapq.heappush(heap, (seq, next(self._arrivals), now_ns, item))

    def release(self, camera: str, lowest_pending: int | None, now_ns: int) -> list[T]:
        """The held frames of ``camera`` below ``lowest_pending`` (all if None), in seq order.

        ``lowest_pending`` is the lowest seq of the camera still waiting for its verdict
        (:meth:`FrameTracker.lowest_pending_seq`).
        """
        heap = self._held.get(camera)
        if not heap:
            return []
        released = []
        while heap and (lowest_pending is None or heap[0][0] < lowest_pending):
            seq, _, decided_ns, item = heapq.heappop(heap)
            self._count(camera, seq, decided_ns, now_ns)
            released.append(item)
        if not heap:
            del self._held[camera]
        return released

    def drain(self, now_ns: int) -> list[T]:
        """Every held frame, camera by camera (sorted), each camera's in seq order."""
        released = []
        for camera in self.cameras():
            released += self.release(camera, None, now_ns)
        return released

    def _count(self, camera: str, seq: int, decided_ns: int, now_ns: int) -> None:
        self.counters.released += 1
        if now_ns > decided_ns:
            self.counters.held += 1
            wait_ms = (now_ns - decided_ns) // 1_000_000
            self.counters.max_wait_ms = max(self.counters.max_wait_ms, wait_ms)
        last = self._last_released.get(camera)
        if last is not None and seq <= last:
            # Compared with the last seq only, so a camera restarted at lower seqs
            # counts once, not for every frame until it passes its old seqs.
            self.counters.out_of_order += 1
            log.warning("verdict_out_of_order", camera=camera, seq=seq, after_seq=last)
        self._last_released[camera] = seq
