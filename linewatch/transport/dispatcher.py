"""Frames from the cameras to the inference workers, by credit, with heartbeats.

The load-balancing broker of the ZeroMQ guide with Paranoid Pirate heartbeats::

    acquisition PUSH --> PULL  dispatcher  ROUTER <--> DEALER  worker (x N)
                                   |                             |
                                   +--> PUSH  decision  PULL <---+ PUSH

- A worker registers with ``ready`` and a credit: how many frames it may hold.
  The dispatcher sends a frame only to a worker with credit left, preferring the
  one with most; the worker's ``done`` (sent after it pushed the results) returns
  the credit. So a slow worker gets fewer frames, and none queue up behind it.
- When no worker has credit, frames wait in the dispatcher, up to
  ``transport.dispatch_queue``; then the dispatcher stops reading from the
  cameras, their sockets fill up to the high-water mark, and acquisition counts
  the frames it cannot send (they become gaps). Backpressure, never unbounded memory.
- Every frame received is announced to the decision service, which then owns its
  deadline: a verdict by then, or a fail-safe reject. The announcement leaves right
  after the frame went to a worker, so that decision's work on it (a Redis write)
  does not compete with the frame's way to the model; a result that overtakes its
  announcement is held by decision until the announcement comes. Any other notice
  leaves after the announcements of the frames read before it. Gap and camera-status
  notices from acquisition go on to decision as they are.
- A worker silent for longer than a heartbeat (plus grace) gets no new frames;
  after ``heartbeat_ms * liveness`` it is declared dead, and the frames it held
  go to another worker if their deadline allows, else fail as ``worker_lost``.
  Its registration is fenced by an epoch, so frames sent to a dead registration
  are dropped by the worker when it comes back, never scored twice.
- Frames whose deadline passes while queued fail as ``deadline_in_queue``.
- Messages decision had received but not handled die with it. When its connection
  comes back (a restarted service), the last frames announced are announced again;
  decision ignores those it knows and those already written, and decides the rest
  (at worst a fail-safe ``timeout``), so no frame is lost with a crashed decision.

Everything happens in :meth:`Dispatcher.step`, single-threaded, so tests drive
the dispatcher and its workers step by step without threads; :func:`serve` is
the whole process.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

from linewatch.config import TransportConfig
from linewatch.lifecycle import notify_ready, run_until_signalled
from linewatch.log import get_logger
from linewatch.transport.codec import (
    BadMessage,
    BadMessageCounter,
    DispatcherHeartbeat,
    DispatcherReset,
    DispatchFrame,
    Notice,
    WorkerDone,
    WorkerHeartbeat,
    WorkerReady,
    decode_camera_message,
    decode_worker_message,
    encode_control,
    encode_message,
)
from linewatch.transport.sockets import (
    Context,
    Mode,
    Socket,
    SocketKind,
    bound_endpoint,
    make_socket,
    transport_context,
)
from linewatch.wire import Frame, FrameAnnounce, FrameFailed, FrameHeader

HEARTBEAT_GRACE = 0.5
"""A worker may be this many heartbeat intervals late before it gets no new frames."""

STEP_WAIT_MS = 20.0
"""Longest wait of one :meth:`Dispatcher.step`: the resolution of deadline checks."""

FRAMES_PER_STEP = 256
"""Frames read per step at most, so that worker messages are never starved."""

CONTROLS_PER_STEP = 10_000
"""Worker messages read per step at most, so that frames are never starved either."""

log = get_logger("dispatch")


@dataclass
class _Queued:
    """A received frame and its parts as they arrived, forwarded without copying."""

    frame: Frame
    parts: list[zmq.Frame]

    @property
    def header(self) -> FrameHeader:
        return self.frame.header


@dataclass
class _Worker:
    identity: bytes
    name: str
    epoch: int
    capacity: int
    last_seen: float
    in_flight: dict[str, _Queued] = field(default_factory=dict)
    last_sent: int = 0  # dispatch counter at the last frame sent: ties go round-robin

    @property
    def credit(self) -> int:
        return self.capacity - len(self.in_flight)


@dataclass(frozen=True)
class WorkerSnapshot:
    """What the dispatcher knows of one worker, for status and tests."""

    name: str
    epoch: int
    credit: int
    in_flight: tuple[str, ...]
    silent_s: float
    eligible: bool


@dataclass
class DispatchStats:
    """Frame counts since start; logged as ``dispatcher_stats``."""

    frames_in: int = 0
    notices: int = 0
    frames_out: int = 0
    redispatched: int = 0
    done: int = 0
    workers_lost: int = 0
    reannounced: int = 0
    failed: dict[str, int] = field(default_factory=dict)


class Dispatcher:
    """The dispatcher process's state and sockets; drive it with :meth:`run` or :meth:`step`."""

    def __init__(self, cfg: TransportConfig, ctx: Context, stats_interval_s: float = 10.0) -> None:
        self.cfg = cfg
        self.stats = DispatchStats()
        self.bad_messages = BadMessageCounter("dispatcher")
        self._heartbeat_s = cfg.heartbeat_ms / 1000.0
        self._suspect_after_s = self._heartbeat_s * (1.0 + HEARTBEAT_GRACE)
        self._dead_after_s = self._heartbeat_s * cfg.liveness
        self._stats_interval_s = stats_interval_s
        self._queue: deque[_Queued] = deque()
        self._notices: deque[list[bytes]] = deque()
        self._unannounced: list[FrameHeader] = []  # read this step, announced after dispatch
        self._workers: dict[bytes, _Worker] = {}
        self._sent_count = 0
        # Frames announced last, to announce again to a decision service that reconnects:
        # at most what its receive queue and ours can have held when it went away.
        self._announced: deque[FrameHeader] = deque(maxlen=2 * cfg.high_water_mark)
        self._decision_lost = False
        self._stop = threading.Event()
        now = time.monotonic()
        self._next_heartbeat = now + self._heartbeat_s
        self._next_stats = now + stats_interval_s
        self._sockets: list[Socket] = []
        try:
            self._frames = self._open(ctx, "pull", "bind", cfg.frames_endpoint, "frames")
            self._router = self._open(ctx, "router", "bind", cfg.workers_endpoint, "workers")
            # A send to a worker that disconnected fails (EHOSTUNREACH) instead of vanishing.
            self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._decision = self._open(ctx, "push", "connect", cfg.results_endpoint, "decision")
            self._decision_events = self._decision.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            )
            self._sockets.append(self._decision_events)  # closed after the socket it watches
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ public

    @property
    def frames_endpoint(self) -> str:
        """Where acquisition connects (the bound address, port resolved)."""
        return bound_endpoint(self._frames)

    @property
    def workers_endpoint(self) -> str:
        """Where workers connect (the bound address, port resolved)."""
        return bound_endpoint(self._router)

    @property
    def queued(self) -> int:
        """Frames waiting for a worker with credit."""
        return len(self._queue)

    def workers(self) -> list[WorkerSnapshot]:
        """The registered workers, as the dispatcher sees them now."""
        now = time.monotonic()
        return [
            WorkerSnapshot(
                w.name, w.epoch, w.credit, tuple(w.in_flight), now - w.last_seen,
                self._eligible(w, now),
            )
            for w in self._workers.values()
        ]

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask :meth:`run` to drain and return (safe from a signal handler or thread)."""
        self._stop.set()

    def run(self, stop: threading.Event | None = None, drain_timeout_s: float = 5.0) -> None:
        """Dispatch until ``stop`` (or :meth:`stop`) is set, then drain and close the sockets."""
        if stop is not None:
            self._stop = stop
        log.info(
            "dispatcher_started", frames=self.frames_endpoint, workers=self.workers_endpoint,
            decision=self.cfg.results_endpoint, curve=self.cfg.curve.enabled,
        )
        notify_ready()
        try:
            while not self._stop.is_set():
                self.step()
            self.drain(drain_timeout_s)
        finally:
            self.log_stats()
            self.close()

    def step(self, timeout_ms: float = STEP_WAIT_MS) -> None:
        """Wait up to ``timeout_ms`` for messages, handle them, then dispatch and check liveness."""
        self._flush_notices()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        if self._accepting():
            poller.register(self._frames, zmq.POLLIN)
        if self._notices:
            poller.register(self._decision, zmq.POLLOUT)
        ready = dict(poller.poll(max(0, math.ceil(timeout_ms))))
        if self._router in ready:
            self._read_workers()
        if self._frames in ready:
            self._read_frames()
        self._housekeeping()

    def drain(self, timeout_s: float) -> None:
        """Finish what is held, for at most ``timeout_s``: dispatch, wait for ``done``.

        Frames left queued or unread at the end fail as ``dispatcher_stopped`` (at once
        when no worker is there to take them); frames at a worker are left to it (its
        result, or decision's deadline, settles them).
        """
        until = time.monotonic() + timeout_s
        while time.monotonic() < until and self._workers and (
            self._queue or self._in_flight() or self._frames.poll(0)
        ):
            self.step()
        self._fail_leftovers()
        in_flight = self._in_flight()
        if in_flight:
            log.warning("dispatcher_stopped_with_frames_at_workers", frames=in_flight)
        linger_until = time.monotonic() + self.cfg.linger_ms / 1000.0
        while self._notices and time.monotonic() < linger_until:
            if self._decision.poll(10, zmq.POLLOUT):
                self._flush_notices()

    def close(self) -> None:
        """Close the sockets; unsent decision messages get the configured linger."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def log_stats(self) -> None:
        """Log the counters, the queue and the workers once."""
        s = self.stats
        log.info(
            "dispatcher_stats", frames_in=s.frames_in, notices=s.notices,
            frames_out=s.frames_out, redispatched=s.redispatched, done=s.done,
            reannounced=s.reannounced,
            failed=dict(s.failed), workers_lost=s.workers_lost, queued=len(self._queue),
            in_flight=self._in_flight(), workers=len(self._workers),
            bad_messages=dict(self.bad_messages.counts),
        )

    # ------------------------------------------------------------------ receiving

    def _open(
        self, ctx: Context, kind: SocketKind, mode: Mode, endpoint: str, name: str
    ) -> Socket:
        sock = make_socket(ctx, kind, self.cfg, mode, endpoint, f"dispatcher.{name}")
        self._sockets.append(sock)
        return sock

    def _accepting(self) -> bool:
        # Decision messages waiting mean decision pushes back: take no new frames either.
        return len(self._queue) < self.cfg.dispatch_queue and not self._notices

    def _read_frames(self) -> None:
        for _ in range(FRAMES_PER_STEP):
            if not self._accepting():
                return
            try:
                parts = self._frames.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                message = decode_camera_message(parts)
            except BadMessage as exc:
                self.bad_messages.record(exc)
                continue
            if not isinstance(message, Frame):  # gap or camera status: decision's business
                self.stats.notices += 1
                self._notify(message)
                continue
            self.stats.frames_in += 1
            self._announce(message.header)
            self._queue.append(_Queued(message, parts))

    def _read_workers(self) -> None:
        for _ in range(CONTROLS_PER_STEP):
            try:
                msg = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, body = msg[0], msg[1:]
            try:
                if len(body) != 1:
                    raise BadMessage("extra_part" if body else "missing_part",
                                     f"worker message needs 1 part, got {len(body)}")
                message = decode_worker_message(body[0])
            except BadMessage as exc:
                self.bad_messages.record(exc)
                continue
            now = time.monotonic()
            if isinstance(message, WorkerReady):
                self._register(identity, message, now)
                continue
            worker = self._workers.get(identity)
            if worker is None or worker.epoch != message.epoch:
                # Declared dead meanwhile, or we restarted: it must register afresh.
                reset = DispatcherReset(epoch=message.epoch, reason="unknown_worker")
                self._send_control(identity, reset)
                continue
            worker.last_seen = now
            if isinstance(message, WorkerDone):
                self._done(worker, message)
            elif not isinstance(message, WorkerHeartbeat):  # pragma: no cover - exhaustive
                raise AssertionError(message)

    def _register(self, identity: bytes, ready: WorkerReady, now: float) -> None:
        old = self._workers.get(identity)
        if old is not None:
            # A worker that registers again has dropped what it held.
            self._lose_worker(old, "reregistered")
        capacity = min(ready.credit, self.cfg.high_water_mark)
        self._workers[identity] = _Worker(identity, ready.worker, ready.epoch, capacity, now)
        log.info("worker_ready", worker=ready.worker, epoch=ready.epoch, credit=capacity)

    def _done(self, worker: _Worker, done: WorkerDone) -> None:
        for frame_id in done.frame_ids:
            if worker.in_flight.pop(frame_id, None) is not None:
                self.stats.done += 1

    # ------------------------------------------------------------------ dispatching

    def _housekeeping(self) -> None:
        self._watch_decision()
        now = time.monotonic()
        for worker in list(self._workers.values()):
            if now - worker.last_seen > self._dead_after_s:
                self._lose_worker(worker, "silent")
        self._fail_expired_in_queue(time.time_ns())
        self._dispatch(now)
        self._queue_announcements()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self._heartbeat_s
            for worker in list(self._workers.values()):
                self._send_control(worker.identity, DispatcherHeartbeat())
        if now >= self._next_stats:
            self._next_stats = now + self._stats_interval_s
            self.log_stats()
        self._flush_notices()

    def _eligible(self, worker: _Worker, now: float) -> bool:
        return worker.credit > 0 and now - worker.last_seen <= self._suspect_after_s

    def _pick_worker(self, now: float, blocked: set[bytes]) -> _Worker | None:
        eligible = [
            w for w in self._workers.values()
            if w.identity not in blocked and self._eligible(w, now)
        ]
        if not eligible:
            return None
        return max(eligible, key=lambda w: (w.credit, -w.last_sent))

    def _dispatch(self, now: float) -> None:
        blocked: set[bytes] = set()
        while self._queue:
            worker = self._pick_worker(now, blocked)
            if worker is None:
                return
            item = self._queue[0]
            control = encode_control(DispatchFrame(epoch=worker.epoch))
            try:
                self._router.send_multipart(
                    [worker.identity, control, *item.parts], zmq.NOBLOCK, copy=False
                )
            except zmq.Again:  # its pipe is full despite credit: try the others
                blocked.add(worker.identity)
                continue
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                self._lose_worker(worker, "disconnected")
                continue
            self._queue.popleft()
            self._sent_count += 1
            worker.last_sent = self._sent_count
            worker.in_flight[item.header.frame_id] = item
            self.stats.frames_out += 1

    def _lose_worker(self, worker: _Worker, reason: str) -> None:
        """Forget a worker; its frames go to others if their deadline allows, else fail."""
        self._workers.pop(worker.identity, None)
        if reason == "reregistered":
            log.info("worker_reregistered", worker=worker.name, epoch=worker.epoch,
                     in_flight=len(worker.in_flight))
        else:
            self.stats.workers_lost += 1
            log.warning("worker_lost", worker=worker.name, epoch=worker.epoch, reason=reason,
                        in_flight=len(worker.in_flight))
        now_ns = time.time_ns()
        again = []
        for item in worker.in_flight.values():
            if item.header.deadline_ns > now_ns:
                again.append(item)
            else:
                self._fail(item.header, "worker_lost")
        self.stats.redispatched += len(again)
        # Ahead of newer frames: these were acquired earlier and are due sooner.
        self._queue.extendleft(reversed(again))

    def _fail_expired_in_queue(self, now_ns: int) -> None:
        if not any(item.header.deadline_ns <= now_ns for item in self._queue):
            return
        keep: deque[_Queued] = deque()
        for item in self._queue:
            if item.header.deadline_ns <= now_ns:
                self._fail(item.header, "deadline_in_queue")
            else:
                keep.append(item)
        self._queue = keep

    def _fail_leftovers(self) -> None:
        """Fail what is queued and what the cameras sent that was not read yet."""
        while self._queue:
            self._fail(self._queue.popleft().header, "dispatcher_stopped")
        for _ in range(self.cfg.high_water_mark):  # at most a socket's worth is waiting
            try:
                message = decode_camera_message(
                    self._frames.recv_multipart(zmq.NOBLOCK, copy=False)
                )
            except zmq.Again:
                return
            except BadMessage as exc:
                self.bad_messages.record(exc)
                continue
            if not isinstance(message, Frame):
                self.stats.notices += 1
                self._notify(message)
                continue
            self.stats.frames_in += 1
            self._announce(message.header)
            self._fail(message.header, "dispatcher_stopped")

    def _in_flight(self) -> int:
        return sum(len(w.in_flight) for w in self._workers.values())

    # ------------------------------------------------------------------ sending

    def _announce(self, header: FrameHeader) -> None:
        self._announced.append(header)
        self._unannounced.append(header)

    def _queue_announcements(self) -> None:
        for header in self._unannounced:
            self._notices.append(encode_message(FrameAnnounce(frame=header)))
        self._unannounced.clear()

    def _watch_decision(self) -> None:
        """Announce the last frames again when decision's connection comes back."""
        while True:
            try:
                event = recv_monitor_message(self._decision_events, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._decision_lost = True
                log.warning("decision_disconnected", endpoint=self.cfg.results_endpoint)
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED and self._decision_lost:
                self._decision_lost = False
                again = list(self._announced)
                for header in again:
                    self._notify(FrameAnnounce(frame=header))
                self.stats.reannounced += len(again)
                log.info("decision_reconnected", reannounced=len(again))

    def _fail(self, header: FrameHeader, reason: str) -> None:
        self.stats.failed[reason] = self.stats.failed.get(reason, 0) + 1
        log.debug("frame_failed", frame=header.frame_id, reason=reason)
        self._notify(FrameFailed(frame=header, reason=reason))

    def _notify(self, notice: Notice) -> None:
        self._queue_announcements()  # a frame's announcement before anything said about it
        self._notices.append(encode_message(notice))
        self._flush_notices()

    def _flush_notices(self) -> None:
        while self._notices:
            try:
                self._decision.send_multipart(self._notices[0], zmq.NOBLOCK)
            except zmq.Again:
                return
            self._notices.popleft()

    def _send_control(
        self, identity: bytes, control: DispatcherHeartbeat | DispatcherReset
    ) -> None:
        try:
            self._router.send_multipart([identity, encode_control(control)], zmq.NOBLOCK)
        except zmq.Again:
            pass  # its pipe is full of frames: those tell it we are alive
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            worker = self._workers.get(identity)
            if worker is not None:
                self._lose_worker(worker, "disconnected")



def serve(cfg: TransportConfig) -> DispatchStats:
    """The dispatcher process: dispatch until SIGINT/SIGTERM, then drain and close."""
    with transport_context(cfg) as ctx:
        dispatcher = Dispatcher(cfg, ctx)
        run_until_signalled(dispatcher)
    return dispatcher.stats
