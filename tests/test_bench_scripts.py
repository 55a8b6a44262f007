"""The benchmark scripts in bench/ run and print a figure for every step they name.

Figures are not asserted (they depend on the machine); a script that breaks when the code
it times changes is what these catch.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
_NUMBER = r"\d+(\.\d+)?"


def _run(script: str, *args: str) -> list[str]:
    done = subprocess.run([sys.executable, str(BENCH / script), *args],
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.splitlines()


def test_cold_step_times_each_step_in_each_mode() -> None:
    lines = _run("cold_step.py", "--calls", "8", "--pause-ms", "1")
    rows = [line.split() for line in lines if re.search(rf"{_NUMBER}\s+{_NUMBER}$", line)]
    modes = {(row[0], row[1]) for row in rows}
    for step in ("FrameHeader(...)", "encode_frame", "decode_camera_message",
                 "json.loads(header)", "model_validate_json", "empty_call"):
        assert {(step, "loop"), (step, "paused")} <= modes
    assert ("decode_camera_message", "woken") in modes
    assert all(float(row[2]) > 0 for row in rows)


def test_hot_path_prints_a_time_per_step() -> None:
    lines = _run("hot_path.py", "--repeats", "5")
    timed = [line for line in lines if re.search(rf"\s{_NUMBER}$", line)]
    assert len(timed) >= 10


def test_floor_measures_each_camera_count_in_both_topologies() -> None:
    for topology in ("broker", "direct"):
        lines = _run("floor.py", "--cameras", "1", "2", "--seconds", "1",
                     "--warmup-seconds", "0.5", "--model-ms", "1", "--topology", topology)
        rows = [line.split() for line in lines if re.fullmatch(r"\s*\d+\s+\d+(\s+[\d.]+){6}", line)]
        assert [row[0] for row in rows] == ["1", "2"], lines
        for row in rows:
            assert int(row[1]) > 0
            assert float(row[2]) >= 1.0  # every worker held its CPU the model time asked for
