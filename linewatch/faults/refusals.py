"""Bad model files and bad configurations: refused with one line, before half a line runs.

Each case runs ``linewatch run`` as a user would and checks that it exits with the
configuration-error code, prints exactly one ``linewatch: error:`` line naming the
culprit, and started no process (no process log was written). A worker that finds
its model file bad when it starts (replaced after the pre-flight check) stops the
whole line the same way, instead of being restarted in a loop.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

from linewatch.config import load_config
from linewatch.faults.harness import LineSpec, Table, write_config
from linewatch.faults.result import FaultResult, Setup
from linewatch.model.modelfile import FORMAT_VERSION
from linewatch.runtime.line import line_processes
from linewatch.runtime.supervisor import CONFIG_ERROR_EXIT, Supervisor, linewatch_argv

RUN_TIMEOUT_S = 60.0
"""Bound on one refused ``linewatch run`` (it imports torch to check the model file)."""

_ERROR_PREFIX = "linewatch: error:"


def _spec(setup: Setup, name: str, model: Path, source: Table | None = None,
          workers: Table | None = None) -> LineSpec:
    return LineSpec(line=f"{setup.line}-{name}", model=model, frames=10,
                    source=source or {"kind": "synth", "size": 64, "fps": 10.0},
                    workers=workers or {})


def refused_run(config: Path, logs: Path) -> tuple[list[str], str]:
    """Run ``linewatch run config --log-dir logs``; problems with how it refused, and its error.

    Expected: exit code 2, one ``linewatch: error:`` line and no traceback on stderr,
    and no process started (``logs`` stays empty).
    """
    argv = linewatch_argv("run", str(config), "--no-consumers", "--log-dir", str(logs))
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        return [f"linewatch run {config.name} did not refuse within {RUN_TIMEOUT_S:.0f} s"], ""
    errors = [line for line in done.stderr.splitlines() if line.startswith(_ERROR_PREFIX)]
    error = errors[-1][len(_ERROR_PREFIX):].strip() if errors else ""
    problems = []
    if done.returncode != CONFIG_ERROR_EXIT:
        problems.append(f"linewatch run exited {done.returncode}, not {CONFIG_ERROR_EXIT}")
    if len(errors) != 1 or "Traceback" in done.stderr:
        problems.append(f"not one error line: {done.stderr.strip()[-300:]!r}")
    started = sorted(p.name for p in logs.glob("*.log")) if logs.exists() else []
    if started:
        problems.append(f"processes started before the refusal: {', '.join(started)}")
    return problems, error


def _expect(problems: list[str], error: str, *words: str) -> list[str]:
    missing = [w for w in words if w not in error]
    if missing and error:
        problems = [*problems, f"the error does not name {missing}: {error!r}"]
    return problems


# --------------------------------------------------------------------------- model files


def other_version(model: Path, dest: Path, version: int = 7) -> Path:
    """A copy of ``model`` that claims another format version (as a newer linewatch writes)."""
    blob = model.read_bytes()
    old = f'"format_version":"{FORMAT_VERSION}"'.encode()
    new = f'"format_version":"{version}"'.encode()
    if blob.count(old) != 1 or len(old) != len(new):
        raise ValueError(f"{model}: format_version not found once in its header")
    dest.write_bytes(blob.replace(old, new))
    return dest


def bad_checksum(model: Path, dest: Path) -> Path:
    """A copy of ``model`` with one bit of its last tensor flipped (bit rot, a bad copy)."""
    blob = bytearray(model.read_bytes())
    blob[-1] ^= 0x01
    dest.write_bytes(bytes(blob))
    return dest


def bad_model_file(setup: Setup) -> FaultResult:
    """Model files of another format version and with a wrong checksum."""
    work = setup.folder("bad_model_file")
    problems: list[str] = []
    errors = []
    cases = [
        ("version", other_version(setup.model, work / "v7.lwm"), ("model.path", "format 7")),
        ("checksum", bad_checksum(setup.model, work / "flipped.lwm"),
         ("model.path", "checksum mismatch")),
    ]
    for name, model, words in cases:
        config = write_config(_spec(setup, f"model-{name}", model), work / name)
        found, error = refused_run(config, work / name / "logs")
        problems += _expect(found, error, *words)
        errors.append(error)
    # A worker that meets a bad file at start (replaced after the pre-flight check):
    config = write_config(_spec(setup, "model-worker", work / "flipped.lwm"), work / "worker")
    failed, restarts = _worker_refuses(config, work / "worker" / "logs")
    if failed is None or "checksum mismatch" not in failed:
        problems.append(f"a worker with a corrupt model did not stop the line: {failed!r}")
    if restarts:
        problems.append(f"the worker was restarted {restarts} time(s) instead")
    return FaultResult(
        name="bad_model_file", fault="model file of format version 7 / one bit flipped",
        behaviour="refused before start, one line naming model.path; a worker meeting it "
                  "stops the line",
        tally=None, recover_s=None, problems=problems,
        details={"errors": [*errors, failed]},
    )


def _worker_refuses(config_path: Path, logs: Path) -> tuple[str | None, int]:
    """Supervise the line's first worker alone (as ``linewatch run`` would, past the
    pre-flight check); why the line stopped, and how often the worker was restarted."""
    config = load_config(config_path)
    specs = [s for s in line_processes(config_path, config, consumers=False)
             if s.name == "infer-0"]
    supervisor = Supervisor(specs, log_dir=logs)
    thread = threading.Thread(target=supervisor.run, name="refusal", daemon=True)
    thread.start()
    thread.join(RUN_TIMEOUT_S)
    if thread.is_alive():
        supervisor.stop()
        thread.join(RUN_TIMEOUT_S)
    return supervisor.failed, sum(supervisor.restarts.values())


# --------------------------------------------------------------------------- configurations


def bad_config(setup: Setup) -> FaultResult:
    """An unknown key; a missing camera producer together with an uncalibrated model."""
    work = setup.folder("bad_config")
    uncalibrated = _uncalibrated(setup.model, work / "uncalibrated.lwm")
    cases = [
        ("unknown_key", _spec(setup, "cfg-key", setup.model, workers={"bogus": 1}),
         ("workers.bogus", "unknown key")),
        ("missing_parts", _spec(setup, "cfg-parts", uncalibrated,
                                source={"kind": "genicam", "cti": str(work / "absent.cti")}),
         ("cameras[0]", "absent.cti", "model.path", "not calibrated")),
    ]
    problems: list[str] = []
    errors = []
    for name, spec, words in cases:
        config = write_config(spec, work / name)
        found, error = refused_run(config, work / name / "logs")
        problems += _expect(found, error, *words)
        errors.append(error)
    return FaultResult(
        name="bad_config", fault="unknown key; absent .cti and an uncalibrated model",
        behaviour="refused before any process started, every problem on one line",
        tally=None, recover_s=None, problems=problems, details={"errors": errors},
    )


def _uncalibrated(model: Path, dest: Path) -> Path:
    from linewatch.model.modelfile import update_model_meta

    shutil.copyfile(model, dest)
    update_model_meta(dest, thresholds=None)
    return dest
