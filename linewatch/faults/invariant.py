"""The invariant every fault must keep: each acquired frame ends as exactly one verdict.

:func:`tally` compares what acquisition numbered with what the line wrote and
counts every way it can go wrong: frames without a verdict (lost), second
verdicts for one frame (duplicated), verdicts for frames nobody acquired,
verdicts without a reason, rejects without a reject record or twice, and
verdicts written out of their camera's seq order.

>>> from linewatch.testing import sample_batch
>>> batches = [sample_batch(seq=s, reject=s == 1) for s in (0, 1, 1)]
>>> t = tally([0, 1, 2], [b.verdict for b in batches], [batches[1].reject])
>>> (t.frames_in, t.verdicts_out, t.lost, t.duplicated, t.holds)
(3, 3, 1, 1, False)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict

from linewatch.streams.records import RejectRecord, VerdictRecord


class Tally(BaseModel):
    """What one run of a line acquired and wrote, and every breach of the invariant."""

    model_config = ConfigDict(frozen=True)

    frames_in: int
    """Frames acquisition numbered (sent, or reported missed)."""
    verdicts_out: int
    """Verdict entries written."""
    lost: int
    """Acquired frames without a verdict."""
    duplicated: int
    """Verdicts beyond the first of a frame."""
    unexpected: int
    """Verdicts of frames acquisition never numbered."""
    without_reason: int
    """Verdicts with an empty reason."""
    reject_mismatch: int
    """Reject verdicts without exactly one reject record, plus reject records without one."""
    out_of_order: int
    """Verdicts written after a higher seq of their camera."""
    fail_safe: int
    """Fail-safe verdicts (not a breach: how the line kept the invariant)."""
    reasons: dict[str, int]
    """Verdicts per reason."""

    @property
    def holds(self) -> bool:
        """True when every acquired frame has exactly one verdict, with a reason, and
        every reject one reject record, all in order."""
        breaches = (self.lost, self.duplicated, self.unexpected, self.without_reason,
                    self.reject_mismatch, self.out_of_order)
        return self.frames_in == self.verdicts_out and not any(breaches)

    def breaches(self) -> list[str]:
        """Each breach of the invariant as a short phrase (empty when it holds)."""
        found = [
            f"{n} {what}" for n, what in (
                (self.lost, "frame(s) lost"),
                (self.duplicated, "verdict(s) duplicated"),
                (self.unexpected, "verdict(s) of frames never acquired"),
                (self.without_reason, "verdict(s) without a reason"),
                (self.reject_mismatch, "reject(s) without exactly one reject record"),
                (self.out_of_order, "verdict(s) out of seq order"),
            ) if n
        ]
        if not found and self.frames_in != self.verdicts_out:
            found.append(f"{self.frames_in} frames in, {self.verdicts_out} verdicts out")
        return found


def tally(
    acquired: Iterable[int],
    verdicts: Sequence[VerdictRecord],
    rejects: Sequence[RejectRecord],
) -> Tally:
    """Check ``verdicts`` and ``rejects`` (stream order) of one camera against the seqs
    its acquisition numbered."""
    expected = set(acquired)
    per_seq = Counter(v.seq for v in verdicts)
    reject_seqs = {v.seq for v in verdicts if v.verdict == "reject"}
    per_reject = Counter(r.seq for r in rejects)
    mismatch = sum(per_reject.get(s, 0) != 1 for s in reject_seqs)
    mismatch += sum(n for s, n in per_reject.items() if s not in reject_seqs)
    return Tally(
        frames_in=len(expected),
        verdicts_out=len(verdicts),
        lost=len(expected - per_seq.keys()),
        duplicated=sum(n - 1 for n in per_seq.values()),
        unexpected=sum(n for s, n in per_seq.items() if s not in expected),
        without_reason=sum(not v.reason for v in verdicts),
        reject_mismatch=mismatch,
        out_of_order=_out_of_order([v.seq for v in verdicts]),
        fail_safe=sum(v.fail_safe for v in verdicts),
        reasons=dict(sorted(Counter(v.reason for v in verdicts).items())),
    )


def _out_of_order(seqs: Sequence[int]) -> int:
    highest = -1
    late = 0
    for seq in seqs:
        if seq < highest:
            late += 1
        highest = max(highest, seq)
    return late
