"""An inference worker's end of the dispatcher protocol (see :mod:`.dispatcher`).

The worker's loop calls :meth:`WorkerLink.poll` for frames, pushes a result or a
failure for each with :meth:`~WorkerLink.send_result` / :meth:`~WorkerLink.send_failed`,
then acknowledges them with :meth:`~WorkerLink.done`, which returns their credit.

Heartbeats are sent from :meth:`~WorkerLink.poll` (and ``done``), never from a
thread: a worker whose loop stalls stops heartbeating, and that is how the
dispatcher learns to stop sending it frames and to hand its frames to others.
When the link finds it has been silent that long itself, or the dispatcher says
it does not know it, or the dispatcher falls silent, it registers afresh under a
new epoch and drops what it held: results for those frames are not sent, because
the dispatcher has given the frames to another worker or failed them. So each
frame ends at decision once, whichever worker stalls.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from types import TracebackType

import numpy as np
import zmq

from linewatch.config import TransportConfig
from linewatch.log import get_logger
from linewatch.transport.codec import (
    BadMessage,
    BadMessageCounter,
    DispatcherReset,
    DispatchFrame,
    WorkerDone,
    WorkerHeartbeat,
    WorkerReady,
    decode_dispatch,
    encode_control,
    encode_message,
    encode_result,
)
from linewatch.transport.sockets import Context, Socket, SocketKind, make_socket
from linewatch.wire import Frame, FrameFailed, FrameHeader, ResultHeader

SELF_EXPIRY_MARGIN = 0.5
"""Heartbeat intervals before the dispatcher would declare us dead that we give up first."""

log = get_logger("worker_link")


class WorkerLink:
    """Frames in from the dispatcher, results out to decision, for one inference worker.

    ``max_batch`` sets the default credit (2 x ``max_batch``: one batch scoring while
    the next one arrives) unless ``transport.worker_credit`` is set. Pass ``ctx`` to
    share a context (the caller then terminates it); else the link owns its own.
    """

    def __init__(
        self,
        cfg: TransportConfig,
        worker_id: str,
        max_batch: int,
        ctx: Context | None = None,
    ) -> None:
        self.cfg = cfg
        self.worker_id = worker_id
        self.credit = min(cfg.worker_credit or 2 * max_batch, cfg.high_water_mark)
        self.epoch = 0
        self.bad_messages = BadMessageCounter(f"worker {worker_id}")
        self.forfeited = 0
        self.results_dropped = 0
        self._heartbeat_s = cfg.heartbeat_ms / 1000.0
        self._expire_after_s = self._heartbeat_s * (cfg.liveness - SELF_EXPIRY_MARGIN)
        self._dispatcher_dead_after_s = self._heartbeat_s * cfg.liveness
        self._in_flight: dict[str, FrameHeader] = {}
        self._own_ctx = ctx is None
        self._ctx: Context = zmq.Context() if ctx is None else ctx
        self._sockets: list[Socket] = []
        try:
            self._dealer = self._open("dealer", cfg.workers_endpoint, "dispatcher")
            self._results = self._open("push", cfg.results_endpoint, "results")
            # Decision gone: give up on a result after a heartbeat rather than stall the loop;
            # decision's own deadline then rejects the frame.
            self._results.setsockopt(zmq.SNDTIMEO, cfg.heartbeat_ms)
        except BaseException:
            self.close()
            raise
        now = time.monotonic()
        self._last_sent = now
        self._last_heard = now
        self._register("start", now)

    # ------------------------------------------------------------------ public

    @property
    def in_flight(self) -> int:
        """Frames received and not yet acknowledged with :meth:`done`."""
        return len(self._in_flight)

    def poll(self, timeout_ms: float) -> list[Frame]:
        """Frames sent to this worker, waiting at most ``timeout_ms`` for the first.

        Returns every frame already queued once one is there; an empty list after the
        timeout. Sends heartbeats while it waits. The pixel arrays are read-only views
        of the received messages.
        """
        now = time.monotonic()
        until = now + max(0.0, timeout_ms) / 1000.0
        frames: list[Frame] = []
        while True:
            self._keep_alive(now)
            wait_s = min(until, self._last_sent + self._heartbeat_s) - now
            if self._dealer.poll(max(0, math.ceil(wait_s * 1000.0))):
                frames = self._receive(frames)
            now = time.monotonic()
            if frames or now >= until:
                self._keep_alive(now)
                return frames

    def done(self, frame_ids: Iterable[str]) -> None:
        """Acknowledge frames whose results (or failures) were sent; their credit returns."""
        now = time.monotonic()
        self._keep_alive(now)
        known = [fid for fid in frame_ids if self._in_flight.pop(fid, None) is not None]
        if known:
            self._send_control(WorkerDone(worker=self.worker_id, epoch=self.epoch,
                                          frame_ids=known), now)

    def send_result(self, header: ResultHeader, amap: np.ndarray) -> None:
        """Push a frame's result to decision (the map is sent without copying)."""
        if self._owns(header.frame):
            self._push(encode_result(header, amap), header.frame)

    def send_failed(self, header: FrameHeader, reason: str) -> None:
        """Push a frame's failure to decision (fail-safe reject there)."""
        if self._owns(header):
            self._push(encode_message(FrameFailed(frame=header, reason=reason)), header)

    def close(self) -> None:
        """Close the sockets (results get the configured linger to leave)."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> WorkerLink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _open(self, kind: SocketKind, endpoint: str, name: str) -> Socket:
        role = f"worker.{self.worker_id}.{name}"
        sock = make_socket(self._ctx, kind, self.cfg, "connect", endpoint, role)
        self._sockets.append(sock)
        return sock

    def _register(self, why: str, now: float) -> None:
        """Start a new epoch: drop held frames, announce our credit."""
        if self._in_flight:
            self.forfeited += len(self._in_flight)
            log.warning("frames_forfeited", worker=self.worker_id, why=why,
                        frames=len(self._in_flight))
            self._in_flight.clear()
        self.epoch += 1
        self._last_heard = now  # give the dispatcher a full interval to answer
        self._send_control(
            WorkerReady(worker=self.worker_id, epoch=self.epoch, credit=self.credit), now
        )
        log.info("worker_registering", worker=self.worker_id, epoch=self.epoch, why=why,
                 credit=self.credit)

    def _keep_alive(self, now: float) -> None:
        """Re-register when either side fell silent too long, else heartbeat when due."""
        if now - self._last_sent > self._expire_after_s:
            self._register("stalled", now)  # the dispatcher has given up on us by now
        elif now - self._last_heard > self._dispatcher_dead_after_s:
            log.warning("dispatcher_silent", worker=self.worker_id,
                        silent_s=round(now - self._last_heard, 3))
            self._register("dispatcher_silent", now)
        elif now - self._last_sent >= self._heartbeat_s:
            self._send_control(WorkerHeartbeat(worker=self.worker_id, epoch=self.epoch), now)

    def _send_control(self, control: WorkerReady | WorkerHeartbeat | WorkerDone,
                      now: float) -> None:
        try:
            self._dealer.send(encode_control(control), zmq.NOBLOCK)
        except zmq.Again:
            # No dispatcher for a while (its queue is full): silence re-registers us later.
            log.debug("control_not_sent", worker=self.worker_id, kind=control.kind)
        self._last_sent = now

    def _receive(self, frames: list[Frame]) -> list[Frame]:
        while True:
            try:
                parts = self._dealer.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return frames
            try:
                control, frame = decode_dispatch(parts)
            except BadMessage as exc:
                self.bad_messages.record(exc)
                continue
            self._last_heard = time.monotonic()
            if isinstance(control, DispatcherReset):
                if control.epoch == self.epoch:  # else it answers a registration already left
                    self._register(control.reason, self._last_heard)
                    frames = []  # they belonged to the registration the dispatcher forgot
            elif isinstance(control, DispatchFrame) and frame is not None:
                if control.epoch != self.epoch:
                    log.debug("stale_frame_dropped", worker=self.worker_id,
                              frame=frame.header.frame_id, epoch=control.epoch)
                    continue
                self._in_flight[frame.header.frame_id] = frame.header
                frames.append(frame)

    def _owns(self, header: FrameHeader) -> bool:
        """False (and counted) for a frame forfeited by a re-registration."""
        self._keep_alive(time.monotonic())
        if header.frame_id in self._in_flight:
            return True
        self.results_dropped += 1
        log.info("result_dropped", worker=self.worker_id, frame=header.frame_id,
                 why="frame_forfeited")
        return False

    def _push(self, parts: list[bytes] | list[bytes | memoryview], header: FrameHeader) -> None:
        try:
            self._results.send_multipart(parts, copy=False)
        except zmq.Again:
            self.results_dropped += 1
            log.warning("result_dropped", worker=self.worker_id, frame=header.frame_id,
                        why="decision_not_receiving")
