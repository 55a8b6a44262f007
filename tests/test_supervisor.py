"""The supervisor with real child processes: restart on crash, ordered shutdown."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from linewatch.runtime.supervisor import BackoffPolicy, ProcessSpec, Supervisor

CRASHER = "import sys; sys.exit(3)"
# Writes its stop order to a file when SIGTERM arrives, so the test can check the sequence.
SLEEPER = """
import signal, sys, time
def stop(*_):
    with open(sys.argv[1], "a") as f:
        f.write(sys.argv[2] + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(sys.argv[1] + "." + sys.argv[2], "w").close()
while True:
    time.sleep(0.05)
"""


def _wait_for(predicate: Callable[[], object], timeout_s: float = 20.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_backoff_doubles_and_resets() -> None:
    policy = BackoffPolicy(initial_s=0.5, maximum_s=4.0, stable_after_s=60.0)
    assert policy.next_delay(0.0, 1.0) == 0.5
    assert policy.next_delay(0.5, 1.0) == 1.0
    assert policy.next_delay(4.0, 1.0) == 4.0
    assert policy.next_delay(4.0, 61.0) == 0.5


def test_crashing_process_is_restarted(tmp_path: Path) -> None:
    sup = Supervisor(
        [ProcessSpec("crasher", (sys.executable, "-c", CRASHER), stage=0)],
        backoff=BackoffPolicy(initial_s=0.01, maximum_s=0.02),
        poll_s=0.02,
    )
    thread = threading.Thread(target=sup.run)
    thread.start()
    try:
        assert _wait_for(lambda: sup.restarts["crasher"] >= 3)
    finally:
        sup.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_shutdown_stops_stages_in_order(tmp_path: Path) -> None:
    order = tmp_path / "order"
    specs = [
        ProcessSpec(name, (sys.executable, "-c", SLEEPER, str(order), name), stage=stage)
        for name, stage in [("decide", 3), ("acquire", 0), ("worker", 2), ("dispatch", 1)]
    ]
    sup = Supervisor(specs, poll_s=0.02)
    thread = threading.Thread(target=sup.run)
    thread.start()
    try:
        names = [s.name for s in specs]
        assert _wait_for(lambda: all(Path(f"{order}.{n}").exists() for n in names))
    finally:
        sup.stop()
        thread.join(timeout=60)
    assert order.read_text().split() == ["acquire", "dispatch", "worker", "decide"]
    assert sup.running() == dict.fromkeys(["decide", "acquire", "worker", "dispatch"])


def test_process_that_finishes_is_not_restarted() -> None:
    sup = Supervisor(
        [ProcessSpec("once", (sys.executable, "-c", "pass"), stage=0)],
        backoff=BackoffPolicy(initial_s=0.01, maximum_s=0.02),
        poll_s=0.02,
    )
    thread = threading.Thread(target=sup.run)
    thread.start()
    try:
        assert _wait_for(lambda: sup.running() == {"once": None} and sup._children[0].finished)
    finally:
        sup.stop()
        thread.join(timeout=30)
    assert sup.restarts == {"once": 0}


# Appends its name and whether the other stage was ready when it started, then reports ready.
STAGED = """
import os, pathlib, sys, time
other_ready = pathlib.Path(sys.argv[2]).exists()
with open(sys.argv[1], "a") as f:
    f.write(f"{sys.argv[3]}:{other_ready}\\n")
pathlib.Path(os.environ["LINEWATCH_READY_FILE"]).touch()
pathlib.Path(sys.argv[4]).touch()
while True:
    time.sleep(0.05)
"""


def test_stages_start_back_to_front_once_each_is_ready(tmp_path: Path) -> None:
    starts, decide_up, acquire_up = tmp_path / "starts", tmp_path / "decide", tmp_path / "acq"

    def spec(name: str, stage: int, waits_for: Path, marks: Path) -> ProcessSpec:
        argv = (sys.executable, "-c", STAGED, str(starts), str(waits_for), name, str(marks))
        return ProcessSpec(name, argv, stage=stage, notifies_ready=True)

    sup = Supervisor([spec("acquire", 0, decide_up, acquire_up),
                      spec("decide", 3, acquire_up, decide_up)], poll_s=0.02)
    thread = threading.Thread(target=sup.run)
    thread.start()
    try:
        assert _wait_for(lambda: starts.exists() and len(starts.read_text().split()) == 2)
    finally:
        sup.stop()
        thread.join(timeout=60)
    assert starts.read_text().split() == ["decide:False", "acquire:True"]
    assert sup.restarts == {"acquire": 0, "decide": 0}


def test_configuration_error_stops_the_line_instead_of_restarting(tmp_path: Path) -> None:
    specs = [
        ProcessSpec("bad", (sys.executable, "-c", "import sys; sys.exit(2)"), stage=0),
        ProcessSpec("other", (sys.executable, "-c", SLEEPER, str(tmp_path / "o"), "other"),
                    stage=1),
    ]
    sup = Supervisor(specs, backoff=BackoffPolicy(initial_s=0.01), poll_s=0.02)
    thread = threading.Thread(target=sup.run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert sup.failed is not None and "bad" in sup.failed
    assert sup.restarts == {"bad": 0, "other": 0}


# A linewatch process as the line's processes are: a loop run by run_until_signalled.
FOLLOWER = """
import os, sys, threading
from linewatch.lifecycle import run_until_signalled

class Loop:
    def __init__(self):
        self.event = threading.Event()
    @property
    def stopping(self):
        return self.event.is_set()
    def stop(self):
        self.event.set()
    def run(self):
        with open(sys.argv[1] + ".pid", "w") as f:
            f.write(str(os.getpid()))
        while not self.event.wait(0.05):
            pass
        open(sys.argv[1] + ".stopped", "w").close()

run_until_signalled(Loop())
"""
# A supervisor of one such process, in a process of its own that the test can kill.
SUPERVISOR = """
import sys
from linewatch.runtime.supervisor import ProcessSpec, Supervisor
spec = ProcessSpec("follower", (sys.executable, "-c", sys.argv[2], sys.argv[1]), stage=0)
Supervisor([spec], poll_s=0.05).run()
"""


def test_children_stop_cleanly_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess

    base = tmp_path / "follower"
    # A killed supervisor cannot remove its ready-file directory: keep it in tmp_path.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(base), FOLLOWER], env=env)
    pid_file = Path(f"{base}.pid")
    child_pid = None
    try:
        assert _wait_for(pid_file.exists), "the supervised process did not start"
        assert _wait_for(lambda: pid_file.read_text() != "")
        child_pid = int(pid_file.read_text())
        supervisor.kill()  # SIGKILL: the supervisor cannot stop anything itself
        supervisor.wait(timeout=20)
        assert _wait_for(Path(f"{base}.stopped").exists), "child kept running"
    finally:
        supervisor.kill()
        if child_pid is not None and not Path(f"{base}.stopped").exists():
            os.kill(child_pid, signal.SIGKILL)
