"""Every fault scenario, by name: what ``linewatch faults`` and ``tests/test_faults.py`` run.

One implementation of each scenario, used by both: the tests assert that a
scenario's result is ``ok``; the command prints the results as a table.
"""

from __future__ import annotations

import time

from linewatch.faults import line_faults, refusals, wire_fuzz
from linewatch.faults.result import FaultResult, Scenario, Setup
from linewatch.log import get_logger

log = get_logger("faults")

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("worker_killed", "kill -9 of an inference worker", line_faults.worker_killed),
    Scenario("decision_killed", "kill -9 of the decision service", line_faults.decision_killed),
    Scenario("redis_outage", "Redis away for 10 s", line_faults.redis_outage),
    Scenario("redis_silent", "Redis's port silent for 10 s", line_faults.redis_silent),
    Scenario("camera_lost", "camera unplugged and back", line_faults.camera_lost),
    Scenario("slow_worker", "one worker slower than the deadline", line_faults.slow_worker),
    Scenario("corrupt_images", "corrupt image files in a replay", line_faults.corrupt_images),
    Scenario("overexposed_camera", "lighting turned up, then down",
             line_faults.overexposed_camera),
    Scenario("underexposed_camera", "lighting dimmed, then back",
             line_faults.underexposed_camera),
    Scenario("nonfinite_scores", "NaN/inf in the model's output", line_faults.nonfinite_scores),
    Scenario("bad_model_file", "model file of another version / bad checksum",
             refusals.bad_model_file),
    Scenario("bad_config", "bad configuration", refusals.bad_config),
    Scenario("wire_fuzz", "corrupted wire messages", wire_fuzz.wire_fuzz),
)


def scenario_names() -> list[str]:
    """Names of every scenario, in the order they run."""
    return [s.name for s in SCENARIOS]


def run_scenario(name: str, setup: Setup) -> FaultResult:
    """Run scenario ``name`` in ``setup``; KeyError for an unknown name."""
    scenario = next((s for s in SCENARIOS if s.name == name), None)
    if scenario is None:
        raise KeyError(f"no fault scenario {name!r}; known: {', '.join(scenario_names())}")
    started = time.monotonic()
    log.info("fault_scenario_started", scenario=name)
    result = scenario.run(setup)
    log.info("fault_scenario_finished", scenario=name, ok=result.ok,
             seconds=round(time.monotonic() - started, 1), problems=result.problems)
    return result


def run_all(setup: Setup, names: list[str] | None = None) -> list[FaultResult]:
    """Run the scenarios ``names`` (default: all), in order; a scenario whose harness
    fails (a process that never comes up) is a failed result, so the others still run."""
    results = []
    for name in names or scenario_names():
        try:
            results.append(run_scenario(name, setup))
        except Exception as exc:  # report it as a row; the table must still come out
            log.exception("fault_scenario_crashed", scenario=name)
            fault = next(s.fault for s in SCENARIOS if s.name == name)
            results.append(FaultResult(
                name=name, fault=fault, behaviour="the scenario could not run", tally=None,
                recover_s=None, problems=[f"{type(exc).__name__}: {exc}"],
            ))
    return results
