"""The fault table: one row per scenario, as Markdown text or JSON.

>>> from linewatch.faults.result import FaultResult
>>> row = FaultResult(name="x", fault="a fault", behaviour="it coped", tally=None,
...                   recover_s=None, problems=[])
>>> print(fault_table([row]).splitlines()[2])
| a fault | it coped | - | - | - | - | - | ok |
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from linewatch.faults.result import FaultResult

COLUMNS = ("fault", "what the system did", "frames in", "verdicts out", "lost", "duplicated",
           "time to recover", "result")


def fault_row(result: FaultResult) -> tuple[str, ...]:
    """The table cells of one result."""
    t = result.tally
    figures = (
        ("-",) * 4 if t is None
        else (str(t.frames_in), str(t.verdicts_out), str(t.lost), str(t.duplicated))
    )
    recover = "-" if result.recover_s is None else f"{result.recover_s:.1f} s"
    verdict = "ok" if result.ok else "FAILED: " + "; ".join(result.problems)
    return (result.fault, result.behaviour, *figures, recover, verdict)


def fault_table(results: Sequence[FaultResult]) -> str:
    """A Markdown table of ``results`` (pipes in cells escaped)."""
    rows = [COLUMNS, *(fault_row(r) for r in results)]
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in COLUMNS) + "|")
    return "\n".join(lines) + "\n"


def write_json(results: Sequence[FaultResult], path: Path) -> None:
    """Every result, with its details, as a JSON list (``linewatch faults --json OUT``)."""
    payload = [{**r.model_dump(mode="json"), "ok": r.ok} for r in results]
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
