"""``linewatch faults``: the fault-injection suite as a table; ``linewatch aof-cost``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``faults`` and ``aof-cost`` commands."""
    faults = subparsers.add_parser(
        "faults", help="inject faults into real lines (processes, Redis) and tabulate the outcome"
    )
    faults.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="also write every result, with details, as JSON")
    faults.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run only these scenarios (default: all; see --list)")
    faults.add_argument("--list", action="store_true", help="list the scenarios and exit")
    faults.add_argument("--work", type=Path, default=None, metavar="DIR",
                        help="keep the lines' configs, logs and Redis files in DIR "
                             "(default: a temporary folder, removed)")
    faults.set_defaults(func=_faults)
    aof = subparsers.add_parser(
        "aof-cost", help="time verdict writes against Redis with appendfsync always/everysec/no"
    )
    aof.add_argument("--writes", type=int, default=2000, help="writes per setting (default 2000)")
    aof.add_argument("--dir", type=Path, default=Path("."),
                     help="folder on the disk to measure (default: the current folder)")
    aof.add_argument("--json", type=Path, default=None, metavar="OUT",
                     help="also write the figures as JSON")
    aof.set_defaults(func=_aof_cost)


def _faults(args: argparse.Namespace) -> int:
    import tempfile

    from linewatch.errors import LinewatchError
    from linewatch.faults.report import fault_table, write_json
    from linewatch.faults.result import Setup
    from linewatch.faults.scenarios import SCENARIOS, run_all, scenario_names
    from linewatch.testing import tiny_model

    if args.list:
        for scenario in SCENARIOS:
            print(f"{scenario.name}\t{scenario.fault}")
        return 0
    unknown = sorted(set(args.only or ()) - set(scenario_names()))
    if unknown:
        raise LinewatchError(f"--only: no scenario {', '.join(unknown)} (see --list)")
    with tempfile.TemporaryDirectory(prefix="linewatch-faults-") as tmp:
        work = args.work or Path(tmp)
        if args.work is not None and any(work.iterdir() if work.is_dir() else ()):
            raise LinewatchError(f"--work {work}: folder is not empty")
        data, model = tiny_model(work / "model")
        results = run_all(Setup(work, model, data), args.only)
    print(fault_table(results), end="")
    if args.json:
        write_json(results, args.json)
    return 0 if all(r.ok for r in results) else 1


def _aof_cost(args: argparse.Namespace) -> int:
    import json

    from linewatch.errors import LinewatchError
    from linewatch.faults.aof import aof_cost, aof_table

    if args.writes < 1:
        raise LinewatchError(f"--writes must be at least 1, got {args.writes}")
    costs = aof_cost(args.writes, args.dir)
    print(aof_table(costs), end="")
    if args.json:
        args.json.write_text(json.dumps([c.model_dump() for c in costs], indent=2) + "\n")
    return 0
