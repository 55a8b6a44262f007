"""``linewatch plc CONFIG`` and ``linewatch alarms CONFIG``: the stream consumers."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``plc`` and ``alarms`` commands."""
    plc = subparsers.add_parser(
        "plc", help="signal the reject gate for every reject (Modbus coil or log)"
    )
    _add_common(plc)
    plc.set_defaults(func=_plc)
    alarms = subparsers.add_parser(
        "alarms", help="watch verdicts and defects and write alarms for the operator"
    )
    _add_common(alarms)
    alarms.set_defaults(func=_alarms)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="line configuration (TOML)")
    parser.add_argument(
        "--redis-url", default=None,
        help="Redis to read from (default: redis.url of the configuration)",
    )


def _plc(args: argparse.Namespace) -> int:
    # Imported here so that `linewatch --help` does not load pymodbus.
    from linewatch.config import load_config
    from linewatch.consumers.plc import run_plc

    stats = run_plc(load_config(args.config), args.redis_url)
    print(
        f"plc: {stats.signalled} reject(s) signalled ({stats.late} late), {stats.stale} stale, "
        f"{stats.failed} failed signal(s), {stats.malformed} malformed"
    )
    return 0


def _alarms(args: argparse.Namespace) -> int:
    from linewatch.config import load_config
    from linewatch.consumers.alarms import run_alarms

    stats = run_alarms(load_config(args.config), args.redis_url)
    print(f"alarms: {stats.alarms} alarm(s) from {stats.verdicts} verdict(s), "
          f"{stats.defects} defect(s)")
    return 0
