"""The line's process topology with no code in it: the floor under the line's overhead.

The pipeline benchmark measures the time a frame spends outside the model, from the camera
read to its verdict in Redis. :func:`measure_floor` runs what any code with the line's
processes and messages would pay on this machine, so that overhead can be read against it:

- one process per camera, paced at ``fps`` on a common trigger (``aligned``) or spread
  evenly over the frame period, sending a 256 x 256 uint8 frame (64 KiB) and a 24-byte
  header over ipc PUSH;
- a broker in the dispatcher's place: PULL from the cameras, ROUTER to the workers, each
  frame to the first worker that said ``ready`` (the load-balancing broker of the ZeroMQ
  guide); ``topology="direct"`` drops it, and camera i pushes to worker i;
- ``workers`` processes that hold their CPU for ``model_ms`` per frame (a busy loop, as a
  single-threaded model does), then send a 256 x 256 float16 map (128 KiB) to
- one process in decision's place, which adds one entry per frame to a Redis stream by a Lua
  script that stamps the server's ``TIME``, as the line's writer does.

No header is parsed, no map smoothed, no record validated, no deadline tracked: every step
is a few lines of Python. The processes are spawned, so this module is what they import.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import struct
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Literal

import numpy as np
import redis
import zmq

__all__ = ["FloorPhase", "Topology", "measure_floor"]

FloorPhase = Literal["aligned", "spread"]
Topology = Literal["broker", "direct"]

_CAMERA_START_NS = 2_000_000_000
"""The cameras' first trigger, after they are started: their start-up falls in the warm-up."""

# camera index, seq, acquired (ns); then model start and end (ns), appended by the worker
_FRAME = struct.Struct("<IIq")
_SCORED = struct.Struct("<IIqqq")
_STAMP_LUA = """
local now = redis.call('TIME')
local us = now[1] * 1000000 + now[2]
redis.call('XADD', KEYS[1], '*', 'frame', ARGV[1], 'ts_written_us', us)
return us
"""


def _camera(index: int, endpoint: str, period_ns: int, start_ns: int, frames: int) -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.PUSH) as sock:
        sock.connect(endpoint)
        pixels = np.zeros((256, 256), np.uint8)
        for seq in range(frames):
            slot = start_ns + seq * period_ns
            time.sleep(max(0.0, (slot - time.time_ns()) / 1e9))
            acquired = time.time_ns()
            sock.send_multipart([_FRAME.pack(index, seq, acquired), pixels.data], copy=False)
        sock.close(linger=5_000)


def _up(ctx: zmq.Context[zmq.Socket[bytes]], report: str) -> None:
    """Tell the parent this process's sockets are bound or connected."""
    with ctx.socket(zmq.PUSH) as sock:
        sock.connect(report)
        sock.send(b"up")
        sock.close(linger=5_000)


def _broker(frames_in: str, workers_out: str, total: int, report: str) -> None:
    with zmq.Context() as ctx:
        pull, router = ctx.socket(zmq.PULL), ctx.socket(zmq.ROUTER)
        pull.bind(frames_in)
        router.bind(workers_out)
        _up(ctx, report)
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        poller.register(router, zmq.POLLIN)
        ready: deque[bytes] = deque()
        waiting: deque[list[zmq.Frame]] = deque()
        forwarded = 0
        while forwarded < total:
            events = dict(poller.poll(1000))
            if router in events:
                while router.poll(0):
                    ready.append(router.recv_multipart()[0])
            if pull in events:
                while pull.poll(0):
                    waiting.append(pull.recv_multipart(copy=False))
            while ready and waiting:
                router.send_multipart([ready.popleft(), *waiting.popleft()], copy=False)
                forwarded += 1
        router.close(linger=5_000)
        pull.close(linger=0)


def _worker(source: str, direct: bool, decision: str, model_ms: float, report: str) -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.PUSH) as push:
        if direct:  # this worker's own cameras push to it
            frames = ctx.socket(zmq.PULL)
            frames.bind(source)
        else:  # the broker sends a frame per ``ready``
            frames = ctx.socket(zmq.DEALER)
            frames.connect(source)
        push.connect(decision)
        _up(ctx, report)
        amap = np.zeros((256, 256), np.float16)
        while True:  # until the parent stops the process
            if not direct:
                frames.send(b"ready")
            parts = frames.recv_multipart(copy=False)
            start = time.time_ns()
            end_at = start + int(model_ms * 1e6)
            while time.time_ns() < end_at:  # the model holds its CPU
                pass
            end = time.time_ns()
            push.send_multipart([parts[0].bytes + struct.pack("<qq", start, end), amap.data],
                                copy=False)


def _decision(endpoint: str, redis_url: str, total: int, report: str) -> None:
    client = redis.Redis.from_url(redis_url)
    stream = f"linewatch:bench-floor:{uuid.uuid4().hex}"  # its own, deleted after the run
    stamp = client.register_script(_STAMP_LUA)
    rows = []
    with zmq.Context() as ctx, ctx.socket(zmq.PULL) as pull, ctx.socket(zmq.PUSH) as out:
        pull.bind(endpoint)
        out.connect(report)
        out.send(b"up")
        for _ in range(total):
            parts = pull.recv_multipart(copy=False)
            decided = time.time_ns()
            np.frombuffer(parts[1].buffer, np.float16)  # the map, as decision takes it
            camera, seq, acquired, start, end = _SCORED.unpack(parts[0].bytes)
            written_us = int(stamp(keys=[stream], args=[f"{camera}:{seq}"]))
            rows.append((camera, seq, acquired, start, end, decided, written_us * 1000))
        client.delete(stream)
        out.send(np.array(rows, np.int64).tobytes())
        out.close(linger=5_000)


def _receive(report: zmq.Socket[bytes], procs: Sequence[BaseProcess], timeout_s: float,
             what: str) -> bytes:
    """The next report message; RuntimeError when a process died or ``timeout_s`` passed."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if report.poll(200):
            return report.recv()
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"floor benchmark: process {dead[0].name} exited with code "
                               f"{dead[0].exitcode} (its error is on stderr)")
    raise RuntimeError(f"floor benchmark: timed out after {timeout_s:g} s waiting to {what}")


def measure_floor(cameras: int, *, workers: int, fps: float, phase: FloorPhase,
                  model_ms: float, seconds: float, warmup_s: float, redis_url: str,
                  topology: Topology = "broker") -> np.ndarray:
    """One run of the bare topology; per steady frame, a row of (camera, seq, acquired,
    model start, model end, decided, written) in ns since the epoch.

    Every frame sent is received by the decision process, or this raises RuntimeError.
    """
    frames = math.ceil(fps * (seconds + warmup_s))
    total = frames * cameras
    direct = topology == "direct"
    # spawn, not fork: a forked child would inherit this process's ZeroMQ context
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="lw-floor-") as tmp, \
            zmq.Context() as zctx, zctx.socket(zmq.PULL) as report:
        ends = {n: f"ipc://{tmp}/{n}" for n in ("frames", "workers", "decision", "report")}
        worker_ends = [f"{ends['workers']}-{k}" if direct else ends["workers"]
                       for k in range(workers)]
        report.bind(ends["report"])
        procs = [ctx.Process(target=_decision, name="floor-decision",
                             args=(ends["decision"], redis_url, total, ends["report"]))]
        if not direct:
            procs.append(ctx.Process(target=_broker, name="floor-broker",
                                     args=(ends["frames"], ends["workers"], total,
                                           ends["report"])))
        procs += [ctx.Process(target=_worker, name=f"floor-worker-{k}",
                              args=(end, direct, ends["decision"], model_ms, ends["report"]))
                  for k, end in enumerate(worker_ends)]
        for p in procs:
            p.start()
        try:
            for _ in procs:  # every socket bound or connected before the first frame
                if _receive(report, procs, 60.0, "start") != b"up":
                    raise RuntimeError("floor benchmark: a process did not report its start")
            start_ns = time.time_ns() + _CAMERA_START_NS
            period_ns = int(1e9 / fps)
            offset_ns = period_ns // cameras if phase == "spread" else 0
            cams = [ctx.Process(target=_camera, name=f"floor-camera-{i}", args=(
                        i, worker_ends[i % workers] if direct else ends["frames"],
                        period_ns, start_ns + i * offset_ns, frames))
                    for i in range(cameras)]
            for p in cams:
                p.start()
            procs += cams
            answer = _receive(report, procs, seconds + warmup_s + 60,
                              f"receive all {total} frames")
            rows = np.frombuffer(answer, np.int64).reshape(-1, 7)
        finally:
            for p in procs:
                p.join(timeout=2)
                if p.is_alive():  # the workers serve until stopped
                    p.terminate()
                    p.join()
    return rows[rows[:, 2] >= start_ns + int(warmup_s * 1e9)]
