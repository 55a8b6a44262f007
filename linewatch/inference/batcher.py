"""Dynamic batching, separate from the model (as Triton separates its batcher).

A batch is released when it is full, when its oldest frame has waited
``max_wait_ms``, or when waiting longer would let a frame miss its deadline
given how long a batch takes. Time is passed in, so the policy is testable
without a clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from linewatch.wire import Frame

_MS = 1_000_000


@dataclass
class DynamicBatcher:
    """Collects frames and decides when a batch must go to the model.

    ``batch_time_ms`` is the running estimate of one batch's model time; it is
    updated with :meth:`observe_batch_time` (exponential moving average).
    """

    max_batch: int
    max_wait_ms: float
    batch_time_ms: float = 50.0
    _queue: deque[tuple[int, Frame]] = field(default_factory=deque)

    def add(self, frame: Frame, now_ns: int) -> None:
        """Queue a frame received at ``now_ns``."""
        self._queue.append((now_ns, frame))

    def __len__(self) -> int:
        return len(self._queue)

    def due_in_ms(self, now_ns: int) -> float | None:
        """Milliseconds until the queued frames must be released (None when empty)."""
        if not self._queue:
            return None
        if len(self._queue) >= self.max_batch:
            return 0.0
        oldest_arrival = self._queue[0][0]
        by_wait = oldest_arrival + self.max_wait_ms * _MS
        earliest_deadline = min(f.header.deadline_ns for _, f in self._queue)
        # Leave room for the batch itself and a margin for the decision service.
        by_deadline = earliest_deadline - int(1.5 * self.batch_time_ms * _MS)
        return max(0.0, (min(by_wait, by_deadline) - now_ns) / _MS)

    def take(self, now_ns: int, force: bool = False) -> list[Frame]:
        """Release a batch if one is due (or ``force``); else an empty list."""
        due = self.due_in_ms(now_ns)
        if due is None or (due > 0.0 and not force):
            return []
        count = min(self.max_batch, len(self._queue))
        return [self._queue.popleft()[1] for _ in range(count)]

    def observe_batch_time(self, ms: float) -> None:
        """Fold a measured batch time into the estimate used for deadlines."""
        self.batch_time_ms = 0.8 * self.batch_time_ms + 0.2 * ms
