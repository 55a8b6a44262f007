"""The decision service: results in, one verdict per acquired frame out.

It binds the line's results endpoint (PULL) and receives everything addressed to
decision: workers' results, the dispatcher's announcements and failures,
acquisition's gap notices and camera status. For each frame it writes exactly one
verdict, with its defects and, for a reject, a reject record:

- a result: smooth the anomaly map (``decision.sigma``), find regions at or above
  the result's threshold, reject if ``score >= threshold``;
- a non-finite score or map: fail-safe reject, reason ``bad_result``;
- a result after the frame's deadline, or no result by then: fail-safe ``timeout``;
- a frame acquisition never delivered (gap): fail-safe ``missed_frame``;
- a frame a worker could not score: fail-safe with the worker's reason.

Verdicts (and rejects) are written in seq order per camera, as a reject gate's FIFO
needs: a decided frame waits in :class:`~linewatch.decision.ordering.VerdictOrder`
until every lower seq of its camera that the tracker knows is pending has its
verdict. Seqs nobody announced never hold anything back, and a pending frame is
decided by its deadline at the latest, so the wait is bounded. On the way out, frames
still pending below a held one are rejected fail-safe (``decision_stopped``) so that
everything held can be written, in order; the rest stay pending for the successor.

Announced frames are also kept in Redis until decided, so a restarted service
still times out the frames its predecessor held (and orders them with its own);
writes are idempotent by frame id, so a result delivered again after a restart is
not a second verdict.

Camera status from acquisition becomes an alarm on ``linewatch:<line>:alarms``: a
lost camera ``camera_lost`` (critical), a reconnected one ``camera_reconnected``
(info), an over-exposed one ``overexposed`` and a dark one ``underexposed`` (warnings),
and ``exposure_ok`` (info) when its frames are exposed right again; written once per
camera and status time, and spooled with the verdicts while Redis is away.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import redis
import zmq

from linewatch.config import LineConfig
from linewatch.decision.ordering import VerdictOrder
from linewatch.decision.postprocess import (
    Region,
    render_heatmap,
    scaled_map,
    smoothed_regions,
)
from linewatch.decision.tracker import FrameTracker, MissedFrame
from linewatch.lifecycle import notify_ready, run_until_signalled
from linewatch.log import get_logger
from linewatch.streams.client import redis_client
from linewatch.streams.records import (
    REASON_ANOMALY,
    REASON_BAD_RESULT,
    REASON_MISSED_FRAME,
    REASON_OK,
    REASON_TIMEOUT,
    AlarmRecord,
    DefectRecord,
    RejectRecord,
    VerdictBatch,
    VerdictRecord,
)
from linewatch.streams.writer import StreamWriter
from linewatch.transport.codec import (
    BadMessage,
    BadMessageCounter,
    Part,
    decode_decision_message,
)
from linewatch.transport.sockets import Socket, make_socket, transport_context
from linewatch.wire import (
    CameraStatus,
    FrameAnnounce,
    FrameFailed,
    FrameHeader,
    GapNotice,
    ResultHeader,
)

log = get_logger("decision")

# Messages decided per wake-up before their verdicts are written (one Redis round trip)
# and deadlines are checked again: enough to carry a batch from each worker, few enough
# that under a backlog the first of them is not held back by hundreds of others.
_RECEIVE_BATCH = 32
_STATS_EVERY_S = 60.0

# Fail-safe reason of a frame still pending below a held one when the service stops:
# rejected so that the frames held behind it are written in order.
REASON_STOPPED = "decision_stopped"

# Camera states that raise an alarm: kind and severity.
_CAMERA_ALARMS: dict[str, tuple[str, Literal["info", "warning", "critical"]]] = {
    "lost": ("camera_lost", "critical"),
    "reconnected": ("camera_reconnected", "info"),
    "overexposed": ("overexposed", "warning"),
    "underexposed": ("underexposed", "warning"),
    "exposure_ok": ("exposure_ok", "info"),
}


@dataclass
class DecisionCounters:
    """Totals since the service started."""

    messages: int = 0
    results: int = 0
    passes: int = 0
    rejects: int = 0
    fail_safe: int = 0
    bad_results: int = 0
    timeouts: int = 0
    missed: int = 0
    failed: int = 0
    stopped: int = 0
    ignored_results: int = 0
    camera_status: int = 0
    alarms: int = 0
    errors: int = 0


class DecisionService:
    """Turns a line's results and notices into verdicts on its Redis streams.

    ``on_camera_status`` is called with each camera status notice, after its alarm
    (if any) was written. ``clock_ns`` gives wall-clock ns since the epoch, as
    deadlines are.
    """

    def __init__(
        self,
        cfg: LineConfig,
        client: redis.Redis,
        *,
        writer: StreamWriter | None = None,
        on_camera_status: Callable[[CameraStatus], None] | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.cfg = cfg
        self.writer = writer or StreamWriter(client, cfg.line, cfg.redis, cfg.decision)
        self.tracker = FrameTracker(max_gap=cfg.decision.max_gap_frames)
        self.order: VerdictOrder[VerdictBatch] = VerdictOrder()
        self._released: list[VerdictBatch] = []  # out of the order stage, not yet written
        self.counters = DecisionCounters()
        self.bad_messages = BadMessageCounter("decision")
        self.ready = threading.Event()  # set once the socket is bound
        self._on_camera_status = on_camera_status
        self._clock_ns = clock_ns
        self._stop = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask :meth:`run` to finish what is queued and return."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for."""
        return self._stop.is_set()

    def run(self, stop_event: threading.Event | None = None) -> None:
        """Bind, serve until ``stop_event`` (or :meth:`stop`) is set, then shut down cleanly.

        On the way out, messages already queued are decided, due deadlines expire,
        every held verdict is written in order (see the module docstring) and the spool
        is flushed to Redis if it is reachable.
        """
        stop = stop_event or self._stop
        transport = self.cfg.transport
        endpoint = transport.results_endpoint
        with transport_context(transport) as ctx:
            sock = make_socket(ctx, "pull", transport, "bind", endpoint, "decision")
            try:
                self.restore()
                self.ready.set()
                notify_ready()
                log.info("decision_started", endpoint=endpoint, line=self.cfg.line)
                self._serve(sock, lambda: stop.is_set() or self._stop.is_set())
                self._receive_available(sock, limit=None)
                self.tick()
            finally:
                sock.close()
                self.flush_order()
                self.writer.flush()
                self.writer.close()
                log.info("decision_stopped", **self.stats())

    def restore(self) -> None:
        """Take over frames an earlier run announced but did not decide, and drain the spool."""
        restored = sum(self.tracker.announce(h) for h in self.writer.load_pending())
        if restored:
            log.info("pending_frames_restored", frames=restored)
        self.writer.flush()

    def _serve(self, sock: Socket, stopped: Callable[[], bool]) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        tick_s = self.cfg.decision.tick_ms / 1000
        next_tick = time.monotonic()
        next_stats = next_tick + _STATS_EVERY_S
        while not stopped():
            if poller.poll(timeout=max(1, round(self.cfg.decision.tick_ms))):
                self._receive_available(sock, limit=_RECEIVE_BATCH)
            now = time.monotonic()
            if now >= next_tick:
                self.tick()
                next_tick = now + tick_s
            if now >= next_stats:
                log.info("decision_stats", **self.stats())
                next_stats = now + _STATS_EVERY_S

    def _receive_available(self, sock: Socket, limit: int | None) -> None:
        messages: list[Sequence[Part]] = []
        while limit is None or len(messages) < limit:
            try:
                messages.append(sock.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        self.handle_all(messages)

    def tick(self) -> None:
        """Fail-safe verdicts for frames past their deadline; retry a spooled backlog."""
        now = self._clock_ns()
        for header in self.tracker.expire(now):
            self.counters.timeouts += 1
            self._hold(self._fail_safe(header, REASON_TIMEOUT, now), now)
        # Expiry also ends waits for announcements that never came: look at every camera.
        for camera in self.order.cameras():
            self._release(camera, now)
        self._write_released()
        self.writer.flush(force=False)

    def flush_order(self) -> None:
        """Write every held verdict, in order, for a stop.

        A frame still pending below a held one of its camera would have to be written
        first but has no verdict yet: it is rejected fail-safe (``decision_stopped``).
        Pending frames above every held one stay pending, for the next run.
        """
        now = self._clock_ns()
        for camera in self.order.cameras():
            highest = self.order.highest_held(camera)
            blockers = self.tracker.pending_before(camera, highest) if highest is not None else []
            for header in blockers:
                if self.tracker.fail(header, REASON_STOPPED):
                    self.counters.stopped += 1
                    self._hold(self._fail_safe(header, REASON_STOPPED, now), now)
            if blockers:
                log.warning("pending_rejected_on_stop", camera=camera, frames=len(blockers),
                            first_seq=blockers[0].seq, last_seq=blockers[-1].seq)
        self._released.extend(self.order.drain(now))
        self._write_released()

    def stats(self) -> dict[str, int]:
        """Every counter of the service, its tracker and its writer, flat."""
        merged = {f"decision_{k}": v for k, v in asdict(self.counters).items()}
        merged |= {f"tracker_{k}": v for k, v in asdict(self.tracker.counters).items()}
        merged |= {f"order_{k}": v for k, v in asdict(self.order.counters).items()}
        merged |= {f"writer_{k}": v for k, v in asdict(self.writer.counters).items()}
        merged["bad_messages"] = self.bad_messages.total
        merged["pending"] = self.tracker.pending_count
        merged["held"] = self.order.held_count
        return merged

    # ------------------------------------------------------------------ messages

    def handle(self, parts: Sequence[Part]) -> None:
        """Decide on one received multipart message; a bad one is counted and skipped."""
        self.handle_all([parts])

    def handle_all(self, messages: Sequence[Sequence[Part]]) -> None:
        """Decide on received messages in order, then write what they released at once.

        One Redis round trip carries the verdicts of everything that arrived together
        (a worker's batch, several cameras), each still its own atomic write.
        """
        for parts in messages:
            self._handle_one(parts)
        self._write_released()

    def _handle_one(self, parts: Sequence[Part]) -> None:
        self.counters.messages += 1
        try:
            message, amap = decode_decision_message(parts)
        except BadMessage as exc:
            self.bad_messages.record(exc)
            return
        if isinstance(message, ResultHeader) and amap is not None:  # the codec pairs them
            self._on_result(message, amap)
        elif isinstance(message, FrameAnnounce):
            self._on_announce(message.frame)
        elif isinstance(message, FrameFailed):
            self._on_failed(message)
        elif isinstance(message, GapNotice):
            self._on_gap(message)
        elif isinstance(message, CameraStatus):
            self._on_camera(message)

    def _on_announce(self, frame: FrameHeader) -> None:
        if not self.tracker.announce(frame):
            # Known: maybe a decided frame that waited for this announcement to be released.
            self._release(frame.camera, self._clock_ns())
        elif not self.writer.remember_pending(frame):
            # Announced again after a restart of this service, and written before it.
            self.tracker.written_before(frame.frame_id)

    def _on_result(self, result: ResultHeader, stored_map: np.ndarray) -> None:
        frame = result.frame
        announced = self.tracker.is_pending(frame.frame_id)
        if not self.tracker.complete(frame.frame_id):
            self.counters.ignored_results += 1
            return
        now = self._clock_ns()
        if not announced:  # the result overtook its announcement: keep the seq order
            self.tracker.await_announcement(frame, now)
        self.counters.results += 1
        try:
            batch = self._decide(result, stored_map, now)
        except Exception:
            # A bug or an odd map must not cost the frame its verdict: reject it.
            self.counters.errors += 1
            log.exception("decide_failed", frame_id=frame.frame_id)
            batch = self._fail_safe(frame, REASON_BAD_RESULT, now, result)
        self._hold(batch, now)
        self._release(frame.camera, now)

    def _on_failed(self, message: FrameFailed) -> None:
        announced = self.tracker.is_pending(message.frame.frame_id)
        if self.tracker.fail(message.frame, message.reason):
            now = self._clock_ns()
            if not announced:  # a worker's failure that overtook the announcement
                self.tracker.await_announcement(message.frame, now)
            self.counters.failed += 1
            self._hold(self._fail_safe(message.frame, message.reason, now), now)
            self._release(message.frame.camera, now)
        else:
            self.counters.ignored_results += 1

    def _on_gap(self, notice: GapNotice) -> None:
        missed = self.tracker.gap(notice)
        if missed:
            log.warning("frames_missed", camera=notice.camera, first_seq=notice.first_seq,
                        last_seq=notice.last_seq, verdicts=len(missed))
        now = self._clock_ns()
        for frame in missed:
            self.counters.missed += 1
            self._hold(self._missed(frame, notice.deadline_ns, now), now)
        if missed:
            self._release(notice.camera, now)

    def _on_camera(self, status: CameraStatus) -> None:
        self.counters.camera_status += 1
        log.info("camera_status", camera=status.camera, state=status.state, detail=status.detail)
        alarm = self._camera_alarm(status)
        if alarm is not None and self.writer.write_alarm(alarm):
            self.counters.alarms += 1
        if self._on_camera_status is not None:
            self._on_camera_status(status)

    @staticmethod
    def _camera_alarm(status: CameraStatus) -> AlarmRecord | None:
        kind_severity = _CAMERA_ALARMS.get(status.state)
        if kind_severity is None:
            return None  # connected, stopped: expected, nothing for the operator
        kind, severity = kind_severity
        detail = f": {status.detail}" if status.detail else ""
        return AlarmRecord(
            kind=kind, severity=severity, camera=status.camera, ts_ns=status.ts_ns,
            message=f"{status.camera}: camera {status.state}{detail}",
            details_json=json.dumps({"state": status.state, "detail": status.detail},
                                    sort_keys=True),
        )

    def _hold(self, batch: VerdictBatch, now: int) -> None:
        """Queue a decided frame for writing in its camera's seq order."""
        verdict = batch.verdict
        self.order.hold(verdict.camera, verdict.seq, batch, now)

    def _release(self, camera: str, now: int) -> None:
        """Queue for writing the held verdicts of ``camera`` that no pending frame precedes."""
        lowest = self.tracker.lowest_pending_seq(camera)
        self._released.extend(self.order.release(camera, lowest, now))

    def _write_released(self) -> None:
        """Write the released verdicts, in the order they were released."""
        if not self._released:
            return
        batches, self._released = self._released, []
        for batch, written in zip(batches, self.writer.write_verdicts(batches), strict=True):
            if not written:
                continue  # written before (the writer counts it), or refused by a full spool
            verdict = batch.verdict
            if verdict.verdict == "reject":
                self.counters.rejects += 1
            else:
                self.counters.passes += 1
            self.counters.fail_safe += verdict.fail_safe

    # ------------------------------------------------------------------ verdicts

    def _decide(self, result: ResultHeader, stored_map: np.ndarray, now: int) -> VerdictBatch:
        frame = result.frame
        decision = self.cfg.decision
        amap = scaled_map(stored_map, result.map_scale)
        if not math.isfinite(result.score) or not np.isfinite(amap).all():
            self.counters.bad_results += 1
            log.warning("bad_result", frame_id=frame.frame_id, worker=result.worker)
            return self._fail_safe(frame, REASON_BAD_RESULT, now, result)
        if now > frame.deadline_ns:
            self.counters.timeouts += 1
            log.warning("result_after_deadline", frame_id=frame.frame_id,
                        late_ms=(now - frame.deadline_ns) / 1e6)
            return self._fail_safe(frame, REASON_TIMEOUT, now, result)

        sx, sy, ox, oy = self._map_to_frame(frame, amap.shape)
        min_area_map = max(1, math.ceil(decision.min_area / (sx * sy)))
        smoothed, found = smoothed_regions(amap, decision.sigma, result.threshold, min_area_map)
        kept = found[: decision.max_regions]
        reject = result.score >= result.threshold
        verdict = self._verdict(
            frame, now, result, reject=reject, reason=REASON_ANOMALY if reject else REASON_OK,
            fail_safe=False, n_defects=len(found),
        )
        defects = tuple(
            self._defect(frame, result, i, region.scaled(sx, sy, ox, oy), now)
            for i, region in enumerate(kept)
        )
        heatmaps = self._heatmaps(smoothed, kept)
        return VerdictBatch(verdict, defects, self._reject(verdict, frame.deadline_ns), heatmaps)

    def _map_to_frame(
        self, frame: FrameHeader, map_shape: tuple[int, ...]
    ) -> tuple[float, float, int, int]:
        """Scale and offset from map pixels to frame pixels (the map covers the ROI)."""
        height, width = frame.shape[0], frame.shape[1]
        ox, oy = 0, 0
        roi = self.cfg.workers.roi
        if roi is not None:
            ox, oy = min(roi.x, width - 1), min(roi.y, height - 1)
            width, height = min(roi.width, width - ox), min(roi.height, height - oy)
        return width / map_shape[1], height / map_shape[0], ox, oy

    def _heatmaps(self, smoothed: np.ndarray, regions: list[Region]) -> tuple[bytes, ...]:
        if self.cfg.decision.heatmaps == "off":
            return ()
        return tuple(render_heatmap(smoothed, region) for region in regions)

    def _verdict(
        self,
        frame: FrameHeader,
        now: int,
        result: ResultHeader | None,
        *,
        reject: bool,
        reason: str,
        fail_safe: bool,
        n_defects: int = 0,
    ) -> VerdictRecord:
        return VerdictRecord(
            frame_id=frame.frame_id,
            camera=frame.camera,
            seq=frame.seq,
            part_id=frame.part_id,
            verdict="reject" if reject else "pass",
            reason=reason,
            fail_safe=fail_safe,
            score=result.score if result else None,
            model_id=result.model_id if result else None,
            threshold=result.threshold if result else None,
            threshold_version=result.threshold_version if result else None,
            rule=self.cfg.decision.rule,
            n_defects=n_defects,
            ts_acquired_ns=frame.ts_acquired_ns,
            ts_decided_ns=now,
            latency_ms=(now - frame.ts_acquired_ns) / 1e6,
            ts_infer_start_ns=result.ts_infer_start_ns if result else None,
            ts_infer_end_ns=result.ts_infer_end_ns if result else None,
            batch_size=result.batch_size if result else None,
        )

    def _defect(
        self, frame: FrameHeader, result: ResultHeader, index: int, region: Region, now: int
    ) -> DefectRecord:
        return DefectRecord(
            frame_id=frame.frame_id, camera=frame.camera, seq=frame.seq, part_id=frame.part_id,
            region=index, x=region.x, y=region.y, w=region.w, h=region.h, area=region.area,
            max_score=region.max_score, mean_score=region.mean_score, heatmap_ref=None,
            model_id=result.model_id, ts_decided_ns=now,
        )

    @staticmethod
    def _reject(verdict: VerdictRecord, deadline_ns: int) -> RejectRecord | None:
        if verdict.verdict != "reject":
            return None
        return RejectRecord(
            frame_id=verdict.frame_id, part_id=verdict.part_id, camera=verdict.camera,
            seq=verdict.seq, reason=verdict.reason, deadline_ns=deadline_ns,
            ts_decided_ns=verdict.ts_decided_ns,
        )

    def _fail_safe(
        self, frame: FrameHeader, reason: str, now: int, result: ResultHeader | None = None
    ) -> VerdictBatch:
        verdict = self._verdict(frame, now, result, reject=True, reason=reason, fail_safe=True)
        return VerdictBatch(verdict, reject=self._reject(verdict, frame.deadline_ns))

    def _missed(self, frame: MissedFrame, deadline_ns: int, now: int) -> VerdictBatch:
        verdict = VerdictRecord(
            frame_id=frame.frame_id, camera=frame.camera, seq=frame.seq, part_id=None,
            verdict="reject", reason=REASON_MISSED_FRAME, fail_safe=True, score=None,
            model_id=None, threshold=None, threshold_version=None, rule=self.cfg.decision.rule,
            n_defects=0, ts_acquired_ns=None, ts_decided_ns=now, latency_ms=None,
        )
        return VerdictBatch(verdict, reject=self._reject(verdict, deadline_ns))


def run_decision(cfg: LineConfig, redis_url: str | None = None) -> dict[str, int]:
    """Run the decision service of ``cfg``'s line until SIGINT/SIGTERM; its final counters.

    ``redis_url`` overrides ``redis.url`` (``linewatch run`` passes its embedded server's).
    """
    client = redis_client(cfg.redis, redis_url)
    try:
        service = DecisionService(cfg, client)
        run_until_signalled(service)
        return service.stats()
    finally:
        client.close()
