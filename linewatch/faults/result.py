"""What a fault scenario gets (:class:`Setup`) and what it reports (:class:`FaultResult`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from linewatch.faults.invariant import Tally


class FaultResult(BaseModel):
    """One scenario's outcome: a row of the fault table."""

    model_config = ConfigDict(frozen=True)

    name: str
    fault: str
    behaviour: str = Field(description="what the system did, in a few words")
    tally: Tally | None = Field(description="the invariant's figures; None without a line")
    recover_s: float | None = Field(description="fault to recovery, seconds; None: n/a")
    problems: list[str] = Field(description="breaches of the invariant and failed checks")
    details: dict[str, Any] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the invariant held and the scenario's own checks passed."""
        return not self.problems


@dataclass(frozen=True)
class Setup:
    """What every scenario needs: a work folder of its own and a small trained model
    (with the synthetic data set it was trained on)."""

    work: Path
    model: Path
    data: Path
    line: str = "faults"

    def folder(self, name: str) -> Path:
        """A fresh folder for scenario ``name``."""
        path = self.work / name
        path.mkdir(parents=True, exist_ok=False)
        return path


@dataclass(frozen=True)
class Scenario:
    """A named fault and the function that runs it."""

    name: str
    fault: str
    run: Callable[[Setup], FaultResult]
