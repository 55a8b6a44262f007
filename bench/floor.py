"""The floor of the line's overhead on this machine: its process topology with no code in it.

    python bench/floor.py [--cameras 1 2] [--fps 10] [--model-ms 12.5] [--seconds 8]

``linewatch bench --only pipeline`` measures the line's overhead: the time a frame spends
outside the model, from the camera read to its verdict in Redis. This script measures what
any code with the same processes and messages would pay on this machine, so the line's
figure can be read against it:

- one process per camera, paced at ``--fps`` on a common trigger (the bench's ``aligned``),
  sending a 256 x 256 uint8 frame (64 KiB) and a 24-byte header over ipc PUSH;
- a broker (the dispatcher's place): PULL from the cameras, ROUTER to the workers, a frame
  to the first worker that said ``ready`` (the load-balancing broker of the ZeroMQ guide);
- ``--workers`` processes that hold their CPU for ``--model-ms`` per frame (a busy loop, as
  a single-threaded model does), then send a 256 x 256 float16 map (128 KiB) to
- one process in decision's place, which adds one entry per frame to a Redis stream by a
  Lua script that stamps the server's ``TIME``, as the line's writer does (a real Redis,
  started for the run on 127.0.0.1).

No headers are parsed, no map is smoothed, no record is validated: every step is a few
lines of Python. Per frame: overhead = (written - acquired) - (model end - model start),
and its parts ``in`` (acquired to model start), ``out`` (model end to decision) and
``write`` (decision to the Redis stamp), as the pipeline benchmark defines them; the ratio
is mean overhead / mean model time. The first ``--warmup-seconds`` are not measured.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import struct
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import redis
import zmq

from linewatch.streams.server import EmbeddedRedis

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
            written_us = int(stamp(keys=["floor:verdicts"], args=[f"{camera}:{seq}"]))
            rows.append((camera, seq, acquired, start, end, decided, written_us * 1000))
        out.send(np.array(rows, np.int64).tobytes())
        out.close(linger=5_000)


def run(cameras: int, args: argparse.Namespace, redis_url: str, tmp: Path) -> np.ndarray:
    """One run; rows of (camera, seq, acquired, model start, model end, decided, written) ns."""
    frames = int(np.ceil(args.fps * (args.seconds + args.warmup_seconds)))
    total = frames * cameras
    direct = args.topology == "direct"
    ends = {n: f"ipc://{tmp}/{n}-{cameras}" for n in ("frames", "workers", "decision", "report")}
    worker_ends = [f"{ends['workers']}-{k}" if direct else ends["workers"]
                   for k in range(args.workers)]
    # spawn, not fork: a forked child would inherit this process's ZeroMQ context
    ctx = mp.get_context("spawn")
    with zmq.Context() as zctx, zctx.socket(zmq.PULL) as report:
        report.bind(ends["report"])
        procs = [ctx.Process(target=_decision,
                             args=(ends["decision"], redis_url, total, ends["report"]))]
        if not direct:
            procs.append(ctx.Process(target=_broker, args=(ends["frames"], ends["workers"],
                                                           total, ends["report"])))
        procs += [ctx.Process(target=_worker, args=(end, direct, ends["decision"],
                                                    args.model_ms, ends["report"]))
                  for end in worker_ends]
        for p in procs:
            p.start()
        for _ in procs:  # every socket bound or connected before the first frame
            if not report.poll(60_000) or report.recv() != b"up":
                raise RuntimeError("floor benchmark: a process did not start in 60 s")
        start_ns = time.time_ns() + 2_000_000_000  # the cameras' start-up: in the warm-up
        period_ns = int(1e9 / args.fps)
        offset_ns = period_ns // cameras if args.phase == "spread" else 0
        cams = [ctx.Process(target=_camera, args=(
                    i, worker_ends[i % args.workers] if direct else ends["frames"],
                    period_ns, start_ns + i * offset_ns, frames))
                for i in range(cameras)]
        for p in cams:
            p.start()
        if not report.poll(int((args.seconds + args.warmup_seconds + 60) * 1000)):
            raise RuntimeError("floor benchmark: no report from the decision process")
        rows = np.frombuffer(report.recv(), np.int64).reshape(-1, 7)
        for p in procs + cams:
            p.join(timeout=2)
            if p.is_alive():  # the workers serve until stopped
                p.terminate()
                p.join()
    steady = rows[:, 2] >= start_ns + int(args.warmup_seconds * 1e9)
    return rows[steady]


def summary(rows: np.ndarray) -> dict[str, float]:
    """Mean overhead, its parts and the ratio to the mean model time, in ms."""
    acquired, start, end, decided, written = (rows[:, i].astype(np.float64) / 1e6
                                              for i in range(2, 7))
    model = end - start
    overhead = (written - acquired) - model
    return {
        "frames": float(len(rows)),
        "model_ms": float(model.mean()),
        "overhead_ms": float(overhead.mean()),
        "overhead_p50_ms": float(np.median(overhead)),
        "overhead_p99_ms": float(np.percentile(overhead, 99)),
        "in_ms": float((start - acquired).mean()),
        "out_ms": float((decided - end).mean()),
        "write_ms": float((written - decided).mean()),
        "overhead_ratio": float(overhead.mean() / model.mean()),
    }


def main() -> None:
    """Run each camera count and print one line of figures for it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fps", type=float, default=10.0)
    parser.add_argument("--model-ms", type=float, default=12.5,
                        help="CPU time a worker holds per frame (the line's model time)")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    parser.add_argument("--phase", choices=("aligned", "spread"), default="aligned",
                        help="cameras on one trigger, or spread evenly over the frame period")
    parser.add_argument("--topology", choices=("broker", "direct"), default="broker",
                        help="broker: the line's (camera, dispatcher, worker, decision); "
                        "direct: camera i pushes to worker i %% workers, no broker")
    args = parser.parse_args()
    with (tempfile.TemporaryDirectory(prefix="lw-floor-") as tmp,
          EmbeddedRedis(Path(tmp) / "redis") as server):
        print(f"floor ({args.topology}): {args.workers} workers holding a CPU "
              f"{args.model_ms} ms per frame, {args.fps:g} fps per camera, {args.phase}; "
              "ms, means unless marked", flush=True)
        print("cams  frames  model  overhead  p50   p99   in    out   write  ratio")
        for cameras in args.cameras:
            s = summary(run(cameras, args, server.url, Path(tmp)))
            print(f"{cameras:4d}  {s['frames']:6.0f}  {s['model_ms']:5.1f}  "
                  f"{s['overhead_ms']:8.2f}  {s['overhead_p50_ms']:4.2f}  "
                  f"{s['overhead_p99_ms']:4.2f}  {s['in_ms']:4.2f}  {s['out_ms']:4.2f}  "
                  f"{s['write_ms']:5.2f}  {s['overhead_ratio']:5.3f}", flush=True)


if __name__ == "__main__":
    main()
