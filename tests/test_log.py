"""Logging: what reaches stderr, and how."""

from __future__ import annotations

import json

import pytest

from linewatch import log


class _Writes:
    """A stand-in stderr that keeps every write call apart."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_each_event_reaches_stderr_in_one_write_with_its_newline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Processes of a line share one pipe; with unbuffered stderr every write call is a
    # system call, so an event written in two parts can get another process's in between.
    stderr = _Writes()
    monkeypatch.setattr("sys.stderr", stderr)
    log.configure("info", "json")
    try:
        log.get_logger("test").info("first_event", n=1)
        log.get_logger("test").warning("second_event", n=2)
    finally:
        log.configure("info")
    assert len(stderr.calls) == 2
    assert all(call.endswith("\n") and call.count("\n") == 1 for call in stderr.calls)
    events = [json.loads(call) for call in stderr.calls]
    assert [(e["event"], e["n"], e["level"]) for e in events] == [
        ("first_event", 1, "info"), ("second_event", 2, "warning")]
