"""The machine's floor under the line's overhead: one ZeroMQ message between two processes.

A frame crosses three process boundaries on its way to a verdict (camera to dispatcher,
dispatcher to worker, worker to decision), and each costs what this machine takes to carry a
message over an ipc socket and wake the process that waits for it (on a VM, an idle
virtual CPU must be woken first). The pipeline benchmark measures it beside its runs, so
the overhead can be read against it.

The receiver is a child process (:func:`receive`) that takes the messages, each starting
with its send time, and answers with the one-way delays as JSON: same machine, same clock.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

import numpy as np
import zmq
from pydantic import TypeAdapter

_DELAYS = TypeAdapter(list[float])
_STAMP = 8  # bytes of the send time (ns, little endian) at the start of a message


def measure_hop_ms(messages: int = 200, interval_s: float = 0.02,
                   payload_bytes: int = 65536) -> np.ndarray:
    """One-way delays (ms) of ``messages`` messages of ``payload_bytes`` between two processes,
    one every ``interval_s`` (the pace of a camera: the receiver sleeps between them)."""
    with tempfile.TemporaryDirectory(prefix="lw-hop-") as tmp, zmq.Context() as ctx:
        endpoint = f"ipc://{tmp}/hop"
        answers = ctx.socket(zmq.PULL)
        answers.bind(f"{endpoint}-answers")
        sender = ctx.socket(zmq.PUSH)
        child = subprocess.Popen([sys.executable, "-c", _CHILD, endpoint, str(messages)])
        try:
            _expect(answers, b"ready")  # bound: nothing sent from here on waits for it
            sender.connect(endpoint)
            payload = bytes(payload_bytes)
            sender.send(_stamp() + payload)  # the connection's first message, not measured
            for _ in range(messages):
                time.sleep(interval_s)
                sender.send(_stamp() + payload, copy=False)
            delays = _DELAYS.validate_json(_expect(answers))
        finally:
            child.wait(timeout=30)
            sender.close(linger=0)
            answers.close(linger=0)
    return np.array(delays, dtype=np.float64)


_CHILD = ("import sys; from linewatch.bench.hop import receive; "
          "receive(sys.argv[1], int(sys.argv[2]))")


def _expect(sock: zmq.Socket[bytes], what: bytes | None = None) -> bytes:
    if not sock.poll(30_000):
        raise RuntimeError("hop benchmark: the receiving process did not answer in 30 s")
    answer = sock.recv()
    if what is not None and answer != what:
        raise RuntimeError(f"hop benchmark: expected {what!r}, got {answer[:40]!r}")
    return answer


def _stamp() -> bytes:
    return time.time_ns().to_bytes(_STAMP, "little")


def receive(endpoint: str, messages: int) -> None:
    """The receiving end (a child process): take the first message and ``messages`` more,
    then answer with the one-way delays of those, as JSON."""
    with zmq.Context() as ctx:
        receiver = ctx.socket(zmq.PULL)
        receiver.bind(endpoint)
        answer = ctx.socket(zmq.PUSH)
        answer.connect(f"{endpoint}-answers")
        answer.send(b"ready")
        receiver.recv()  # the connection's first message
        delays = []
        for _ in range(messages):
            message = receiver.recv(copy=False)
            now = time.time_ns()
            delays.append((now - int.from_bytes(message.buffer[:_STAMP], "little")) / 1e6)
        answer.send(_DELAYS.dump_json(delays))
        answer.close(linger=5_000)
        receiver.close(linger=0)
