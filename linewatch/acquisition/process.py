"""One camera's acquisition process: read frames, number them, push them downstream.

Every frame gets the camera id, a per-camera sequence number (monotonic; a
restarted process continues from the ``start_seq`` it is given), its acquisition
time and its verdict deadline, and leaves as ``[FrameHeader JSON, pixels]`` on a
PUSH socket connected to ``transport.frames_endpoint``. The same socket carries:

* :class:`~linewatch.wire.GapNotice` for frames that existed but cannot be sent
  (camera drops, unreadable files, a full queue downstream), so that each of
  their sequence numbers still gets a fail-safe verdict;
* :class:`~linewatch.wire.CameraStatus` when the camera is connected, lost,
  reconnected, over-exposed and exposed right again (:mod:`linewatch.acquisition.exposure`),
  and when acquisition stops.

Sends never block the camera for long: a frame that cannot be queued before its
own deadline is dropped and reported as a gap, since its verdict would be late
anyway and waiting longer would overflow the camera's buffers instead.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import zmq

from linewatch.acquisition.base import FrameSource, MissedFrames, RawFrame, SourceLost, make_source
from linewatch.acquisition.exposure import DarkWatch, ExposureChange, ExposureWatch
from linewatch.config import CameraConfig, GenicamSource, LineConfig, TransportConfig
from linewatch.errors import ConfigError
from linewatch.lifecycle import notify_ready
from linewatch.log import get_logger
from linewatch.transport.codec import encode_frame, encode_message
from linewatch.transport.sockets import make_socket, transport_context
from linewatch.wire import CameraStatus, FrameHeader, GapNotice

DEFAULT_RECONNECT_S = 2.0
"""Retry interval for sources whose configuration has none (folder, synth)."""

STATUS_SEND_S = 0.5
"""How long a status or gap notice may wait for room on a full socket."""

PART_ID_MAX = 128
"""Longest part id a frame header takes; longer ones keep their end (the most specific)."""

StatusState = Literal[
    "connected", "lost", "reconnected", "stopped", "overexposed", "underexposed", "exposure_ok"
]


@dataclass
class AcquireStats:
    """Counters of one acquisition process since it started."""

    frames: int = 0
    """Frames sent downstream."""
    gaps: int = 0
    """Gap notices sent (each covers one or more sequence numbers)."""
    missed: int = 0
    """Sequence numbers without pixels: camera drops, unreadable files, full queue."""
    errors: int = 0
    """Unreadable files, device losses and frames dropped for lack of room downstream."""
    reconnects: int = 0
    """Times the source came back after it was lost."""


class AcquisitionProcess:
    """Runs one camera's source and sends its frames; :meth:`run` blocks until the end.

    :meth:`stop` may be called from a signal handler or another thread. ``source``
    replaces the one ``camera.source`` describes (tests, custom sources);
    ``context`` is the process's ZeroMQ context (default: one made and closed by
    :meth:`run`); ``reconnect_interval_s`` overrides the source's retry interval.
    """

    def __init__(
        self,
        camera: CameraConfig,
        transport: TransportConfig,
        *,
        start_seq: int = 0,
        source: FrameSource | None = None,
        context: zmq.Context[Any] | None = None,
        stats_interval_s: float = 10.0,
        reconnect_interval_s: float | None = None,
    ) -> None:
        if start_seq < 0:
            raise ValueError(f"start_seq must be >= 0, got {start_seq}")
        self.camera = camera
        self.transport = transport
        self.source = source if source is not None else make_source(camera.source)
        self.next_seq = start_seq
        self._start_seq = start_seq
        self._limit = camera.frames
        """Sequence number the next frame or missed frame gets."""
        self.stats = AcquireStats()
        self._deadline_ns = int(camera.deadline_ms * 1_000_000)
        if reconnect_interval_s is None:
            reconnect_interval_s = (
                camera.source.reconnect_interval_s
                if isinstance(camera.source, GenicamSource)
                else DEFAULT_RECONNECT_S
            )
        self._reconnect_s = reconnect_interval_s
        self._stats_interval_s = stats_interval_s
        self._context = context
        self._sock: zmq.Socket[Any] | None = None
        self._pending_gaps: list[tuple[int, int]] = []
        self._dropped = 0  # frames dropped for lack of room downstream
        self._exposure_watches = [
            watch for watch in (ExposureWatch(camera.overexposure), DarkWatch(camera.underexposure))
            if watch.cfg.enabled
        ]
        self._stop = threading.Event()
        self._log = get_logger("acquisition").bind(camera=camera.id)

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Ask :meth:`run` to finish; safe from signal handlers and other threads."""
        self._stop.set()
        self.source.request_stop()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def run(self) -> AcquireStats:
        """Acquire until the source ends or :meth:`stop`; returns the final counters."""
        if self._context is not None:
            return self._run(self._context)
        with transport_context(self.transport) as context:
            return self._run(context)

    def _run(self, context: zmq.Context[Any]) -> AcquireStats:
        self._sock = make_socket(
            context,
            "push",
            self.transport,
            "connect",
            self.transport.frames_endpoint,
            role="acquisition",
        )
        self._log.info(
            "acquire_started", endpoint=self.transport.frames_endpoint, next_seq=self.next_seq
        )
        try:
            if self._open_source(reconnect=False):
                self._loop()
        finally:
            self.source.close()
            self._flush_gaps(STATUS_SEND_S)
            self._send_status("stopped", f"next_seq={self.next_seq}")
            self._log.info("acquire_stopped", next_seq=self.next_seq, **asdict(self.stats))
            self._sock.close(linger=self.transport.linger_ms)
            self._sock = None
        return self.stats

    # ------------------------------------------------------------------ main loop

    def _loop(self) -> None:
        pacer = _Pacer(self.source.pace_hz, self.source.pace_phase_s)
        last_stats = time.monotonic()
        frames_at_last = 0
        while pacer.wait(self._stop):
            try:
                item = self.source.read()
            except SourceLost as exc:
                if not self._recover(exc):
                    return
                pacer.restart()
                continue
            if item is None:
                return
            if isinstance(item, MissedFrames):
                self._missed(item)
            else:
                self._frame(item)
            if self._limit is not None and self.next_seq - self._start_seq >= self._limit:
                self._log.info("acquire_limit_reached", frames=self._limit)
                return
            now = time.monotonic()
            if now - last_stats >= self._stats_interval_s:
                fps = (self.stats.frames - frames_at_last) / (now - last_stats)
                self._log.info(
                    "acquire_stats", fps=round(fps, 2), next_seq=self.next_seq, **asdict(self.stats)
                )
                last_stats, frames_at_last = now, self.stats.frames

    def _frame(self, raw: RawFrame) -> None:
        seq = self._take_seqs(1)
        header = FrameHeader(
            camera=self.camera.id,
            seq=seq,
            part_id=(raw.part_id or str(seq))[-PART_ID_MAX:],
            ts_acquired_ns=raw.ts_ns,
            deadline_ns=raw.ts_ns + self._deadline_ns,
            dtype=raw.pixels.dtype.name,
            shape=raw.pixels.shape,
        )
        self._flush_gaps(0.0)
        if self._send(encode_frame(header, raw.pixels), until_ns=header.deadline_ns):
            self.stats.frames += 1
            self._watch_exposure(raw.pixels)  # after the send: not on the frame's way
            return
        # Downstream stayed full until the frame's deadline: account for it as a gap.
        self.stats.errors += 1
        self.stats.missed += 1
        self._dropped += 1
        if self._dropped <= 10 or self._dropped % 100 == 0:  # a dead dispatcher must not flood
            self._log.warning(
                "frame_dropped",
                seq=seq,
                dropped=self._dropped,
                reason="downstream full until deadline",
            )
        self._add_gap(seq, seq)

    def _watch_exposure(self, pixels: np.ndarray) -> None:
        for watch in self._exposure_watches:
            change = watch.observe(watch.measure(pixels))
            if change is not None:
                measure = {watch.measure_name: round(watch.last, 4)}
                self._report_exposure(change, watch.describe(change), **measure)

    def _report_exposure(self, change: ExposureChange, detail: str, **measure: float) -> None:
        if change == "exposure_ok":
            self._log.info("camera_exposure_ok", **measure)
        else:
            self._log.warning(f"camera_{change}", **measure)
        self._send_status(change, detail)

    def _missed(self, item: MissedFrames) -> None:
        first = self._take_seqs(item.count)
        last = first + item.count - 1
        self.stats.missed += item.count
        if item.reason == "unreadable":
            self.stats.errors += 1
        self._log.warning(
            "frames_missed", first_seq=first, last_seq=last, reason=item.reason, detail=item.detail
        )
        self._add_gap(first, last)
        self._flush_gaps(0.0)

    def _take_seqs(self, count: int) -> int:
        first = self.next_seq
        self.next_seq += count
        return first

    # ------------------------------------------------------------------ device loss

    def _open_source(self, reconnect: bool) -> bool:
        """Open the source, retrying while its device is absent; False if stopped first."""
        attempt = 0
        while not self.stopping:
            attempt += 1
            try:
                self.source.open()
            except SourceLost as exc:
                self.source.close()
                if attempt == 1 and not reconnect:
                    self._send_status("lost", str(exc))
                if attempt <= 3 or attempt % 30 == 0:
                    self._log.warning(
                        "camera_unavailable",
                        attempt=attempt,
                        error=str(exc),
                        retry_s=self._reconnect_s,
                    )
                if self._stop.wait(self._reconnect_s):
                    return False
                continue
            state: StatusState = "reconnected" if reconnect else "connected"
            self._send_status(state, "" if attempt == 1 else f"after {attempt} attempts")
            self._log.info(f"camera_{state}", attempts=attempt)
            notify_ready()
            return True
        return False

    def _recover(self, exc: SourceLost) -> bool:
        """Report the loss, then reopen the source; False if stopped first."""
        self.stats.errors += 1
        self._log.error("camera_lost", error=str(exc))
        self._send_status("lost", str(exc))
        self.source.close()
        if self._stop.wait(self._reconnect_s) or not self._open_source(reconnect=True):
            return False
        self.stats.reconnects += 1
        return True

    # ------------------------------------------------------------------ sending

    def _send(self, parts: list[Any], until_ns: int) -> bool:
        """Queue a message, waiting for room until ``until_ns`` (epoch ns) at most."""
        assert self._sock is not None
        while True:
            try:
                self._sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                pass
            remaining_ms = (until_ns - time.time_ns()) // 1_000_000
            if remaining_ms <= 0 or self.stopping:
                return False
            self._sock.poll(min(remaining_ms, 100), zmq.POLLOUT)

    def _add_gap(self, first: int, last: int) -> None:
        if self._pending_gaps and self._pending_gaps[-1][1] + 1 == first:
            first = self._pending_gaps.pop()[0]
        self._pending_gaps.append((first, last))

    def _flush_gaps(self, wait_s: float) -> None:
        """Send pending gap notices in order; those that find no room stay pending."""
        while self._pending_gaps:
            first, last = self._pending_gaps[0]
            now = time.time_ns()
            notice = GapNotice(
                camera=self.camera.id,
                first_seq=first,
                last_seq=last,
                ts_detected_ns=now,
                deadline_ns=now + self._deadline_ns,
            )
            if not self._send(encode_message(notice), until_ns=now + int(wait_s * 1e9)):
                return
            self._pending_gaps.pop(0)
            self.stats.gaps += 1

    def _send_status(self, state: StatusState, detail: str = "") -> None:
        status = CameraStatus(
            camera=self.camera.id, state=state, detail=detail[:500], ts_ns=time.time_ns()
        )
        if self._sock is None or not self._send(
            encode_message(status), until_ns=time.time_ns() + int(STATUS_SEND_S * 1e9)
        ):
            self._log.warning("camera_status_not_sent", state=state, detail=detail)


class _Pacer:
    """Spaces reads ``1/hz`` apart on the monotonic clock, without drift or bursts.

    Read ``n`` is due at ``t0 + n/hz``; after falling more than a frame behind,
    the schedule restarts instead of catching up in a burst. ``t0`` is now, or with
    ``phase_s`` the next slot of :func:`next_slot` (so that paced sources of one host
    with the same rate and phase read together).
    """

    def __init__(self, hz: float | None, phase_s: float | None = None) -> None:
        self._period = 1.0 / hz if hz else None
        self._phase_s = phase_s
        self.restart()

    def restart(self) -> None:
        self._t0: float | None = None
        self._n = 0

    def wait(self, stop: threading.Event) -> bool:
        """Sleep until the next read is due; False once ``stop`` is set."""
        if self._period is None:
            return not stop.is_set()
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = self._start(now, self._period)
        due = self._t0 + self._n * self._period
        if now - due > self._period:
            self._t0, self._n = self._start(now, self._period), 0
            due = self._t0
        self._n += 1
        if due > now:
            return not stop.wait(due - now)
        return not stop.is_set()

    def _start(self, now: float, period: float) -> float:
        return now if self._phase_s is None else next_slot(now, period, self._phase_s)


def next_slot(now: float, period: float, phase: float) -> float:
    """The first time at or after ``now`` that is ``phase`` plus a whole number of periods.

    On the monotonic clock, which every process of a host shares.

    >>> next_slot(10.02, 0.1, 0.05)
    10.05
    >>> next_slot(10.05, 0.1, 0.05)
    10.05
    """
    slots = math.ceil(round((now - phase) / period, 9))  # 9 places: float noise on a slot
    return round(phase + slots * period, 9)


def auto_start_seq() -> int:
    """A first sequence number no earlier run of this camera can have reached: now in µs.

    For a restart without knowing the last seq sent: the decision service refuses a
    frame id it has seen, so reusing seqs would leave real parts without a verdict.
    A previous run would have to average over a million frames a second to collide.
    """
    return time.time_ns() // 1000


def camera_config(config: LineConfig, camera_id: str) -> CameraConfig:
    """The camera ``camera_id`` of a line; :class:`ConfigError` lists the ids there are."""
    for camera in config.cameras:
        if camera.id == camera_id:
            return camera
    known = ", ".join(c.id for c in config.cameras)
    raise ConfigError(f"no camera {camera_id!r} in line {config.line} (cameras: {known})")


