"""Process lifecycle shared by every linewatch process: stop cleanly on SIGINT/SIGTERM, and
when the supervisor that started the process dies."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from linewatch.log import get_logger

log = get_logger("lifecycle")


class Stoppable(Protocol):
    """A long-running loop: ``run`` until ``stop`` is called from a signal handler."""

    @property
    def stopping(self) -> bool: ...

    def stop(self) -> None: ...

    def run(self) -> Any: ...


def run_until_signalled(loop: Stoppable) -> Any:
    """Run ``loop``, stopping it cleanly on SIGINT or SIGTERM; returns what ``run`` returns.

    A second signal while it stops raises KeyboardInterrupt, for a loop that hangs.
    Handlers are installed only on the main thread and restored after.
    """
    if threading.current_thread() is not threading.main_thread():
        return loop.run()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if loop.stopping:
            raise KeyboardInterrupt
        log.info("stop_requested", signal=signal.Signals(signum).name)
        loop.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    follow_supervisor()
    try:
        return loop.run()
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: installed outside Python, cannot be restored
                signal.signal(sig, handler)


READY_FILE_ENV = "LINEWATCH_READY_FILE"
SUPERVISOR_PID_ENV = "LINEWATCH_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def follow_supervisor() -> None:
    """Stop (SIGTERM, so cleanly) when the supervisor that started this process dies.

    A supervisor killed with SIGKILL cannot stop its children; left running, they would
    hold the line's sockets against the processes of a restarted supervisor. The
    supervisor names itself in ``LINEWATCH_SUPERVISOR_PID``; a process started by hand has
    none, and this does nothing. Linux only (``prctl``); elsewhere the service manager's
    process-group kill (systemd's ``KillMode``) is what stops them.
    """
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if not supervisor or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("supervisor_watch_failed", errno=ctypes.get_errno())
        return
    if os.getppid() != int(supervisor):  # it died before the watch was set
        log.warning("supervisor_gone", supervisor_pid=int(supervisor))
        os.kill(os.getpid(), signal.SIGTERM)


def notify_ready() -> None:
    """Tell the supervisor this process serves now (like systemd's ``sd_notify READY=1``).

    The supervisor names a file in ``LINEWATCH_READY_FILE``; a process started by
    hand has none, and this does nothing.
    """
    path = os.environ.get(READY_FILE_ENV)
    if path:
        Path(path).touch()
        log.info("process_ready")
