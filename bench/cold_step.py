"""What one step of the line costs when it runs once per frame, not in a tight loop.

    python bench/cold_step.py [--pause-ms 50] [--calls 80] [--cpu N] [--hold-cpu-latency]

The line's processes wake once per frame (every 100 ms per camera at 10 fps), do a few
steps and sleep again. ``timeit`` in a loop measures a step with warm caches and a busy
CPU; this measures the same steps the way the line runs them:

- ``loop``: back to back in one process (what ``bench/hot_path.py`` and timeit show);
- ``paused``: one process, each call after sleeping ``--pause-ms``;
- ``woken``: a second process receives the message over ZeroMQ (ipc), sent every
  ``--pause-ms``, and times its decode right after it wakes: the dispatcher's situation.

Steps: building a ``FrameHeader`` (pydantic), ``encode_frame`` and ``decode_camera_message``
of a 256 x 256 RGB frame; for comparison ``json.loads`` of the header alone, pydantic's
``model_validate_json`` of it (one call, no stdlib parse) and an empty call. ``--cpu N``
pins both processes to CPU N; ``--hold-cpu-latency`` holds ``/dev/cpu_dma_latency`` at 0
while it runs (root only: CPUs then poll instead of entering an idle state, the kernel's PM
QoS request that low-latency tunings make).
Prints median and p90 microseconds per call.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import struct
import tempfile
import time
from collections.abc import Callable

import numpy as np
import zmq

from linewatch.testing import frame_header
from linewatch.transport.codec import decode_camera_message, encode_frame
from linewatch.wire import FrameHeader

_PIXELS = np.zeros((256, 256, 3), np.uint8)  # the shape _header announces


def _header(seq: int) -> FrameHeader:
    return frame_header("cam0", seq, shape=(256, 256, 3))


def _time_us(call: Callable[[], object]) -> float:
    start = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - start) / 1e3


def _in_process(calls: int, pause_s: float) -> dict[str, list[float]]:
    parts = encode_frame(_header(1), _PIXELS)
    raw = bytes(parts[0])
    steps: dict[str, Callable[[], object]] = {
        "FrameHeader(...)": lambda: _header(1),
        "encode_frame": lambda: encode_frame(_header(1), _PIXELS),
        "decode_camera_message": lambda: decode_camera_message(parts),
        # Would a lighter codec help? The stdlib parse alone, and pydantic's own JSON parser
        # in one call; an empty call is the floor of the timer after a pause.
        "json.loads(header)": lambda: json.loads(raw),
        "model_validate_json": lambda: FrameHeader.model_validate_json(raw),
        "empty_call": lambda: None,
    }
    out: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(calls):
        for name, call in steps.items():
            if pause_s:
                time.sleep(pause_s)
            out[name].append(_time_us(call))
    return out


def _receiver(endpoint: str, reply: str, calls: int, cpu: int | None,
              results: mp.Queue[list[float]]) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(endpoint)
    push.connect(reply)
    times = []
    for _ in range(calls):
        parts = pull.recv_multipart(copy=False)
        times.append(_time_us(lambda p=parts: decode_camera_message(p)))  # type: ignore[misc]
        push.send(b"")
    results.put(times)
    ctx.destroy(linger=0)


def _woken(calls: int, pause_s: float, cpu: int | None) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="lw-cold-") as tmp:
        endpoint, reply = f"ipc://{tmp}/in", f"ipc://{tmp}/out"
        ctx = zmq.Context()
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        push.bind(endpoint)
        pull.bind(reply)
        results: mp.Queue[list[float]] = mp.Queue()
        child = mp.Process(target=_receiver, args=(endpoint, reply, calls, cpu, results))
        child.start()
        for seq in range(calls):
            time.sleep(pause_s)
            push.send_multipart(encode_frame(_header(seq + 1), _PIXELS), copy=False)
            pull.recv()
        times: list[float] = results.get()
        child.join()
        ctx.destroy(linger=0)
    return times


def _row(name: str, mode: str, times: list[float], skip: int) -> str:
    kept = np.array(times[skip:])
    return f"{name:<24} {mode:<8} {np.median(kept):8.1f} {np.percentile(kept, 90):8.1f}"


def _hold_cpu_latency(parser: argparse.ArgumentParser) -> int:
    """Ask the kernel (PM QoS) for CPUs that never idle; the request lasts while fd is open."""
    try:
        held = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
        os.write(held, struct.pack("i", 0))
    except OSError as exc:
        parser.error(f"--hold-cpu-latency: {exc.strerror}: {exc.filename or 'write'} "
                     "(needs root and a kernel with PM QoS)")
    return held


def main() -> None:
    """Time each step in each setting and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pause-ms", type=float, default=50.0, help="sleep before each call")
    parser.add_argument("--calls", type=int, default=80, help="timed calls per step and mode")
    parser.add_argument("--cpu", type=int, default=None, help="pin both processes to this CPU")
    parser.add_argument("--hold-cpu-latency", action="store_true",
                        help="hold /dev/cpu_dma_latency at 0 while running (root)")
    args = parser.parse_args()
    held = _hold_cpu_latency(parser) if args.hold_cpu_latency else None
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    skip = min(10, args.calls // 4)  # first calls pay for imports and first allocations
    pause_s = args.pause_ms / 1000.0
    print(f"pause {args.pause_ms:g} ms, {args.calls} calls, cpu {args.cpu}, "
          f"cpu latency held: {held is not None}")
    print(f"{'step':<24} {'mode':<8} {'p50 us':>8} {'p90 us':>8}")
    for mode, pause in (("loop", 0.0), ("paused", pause_s)):
        for name, times in _in_process(args.calls, pause).items():
            print(_row(name, mode, times, skip))
    print(_row("decode_camera_message", "woken", _woken(args.calls, pause_s, args.cpu), skip))
    if held is not None:
        os.close(held)


if __name__ == "__main__":
    main()
