"""``linewatch config example|check``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from linewatch.config import example_config_text, load_config


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``config`` command group."""
    parser = subparsers.add_parser("config", help="print or check a line configuration")
    actions = parser.add_subparsers(dest="config_action", metavar="ACTION", required=True)
    example = actions.add_parser("example", help="print a complete, commented example")
    example.set_defaults(func=_example)
    check = actions.add_parser("check", help="validate a configuration file")
    check.add_argument("file", type=Path, help="TOML file to check")
    check.set_defaults(func=_check)


def _example(args: argparse.Namespace) -> int:
    sys.stdout.write(example_config_text())
    return 0


def _check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    print(f"{args.file}: ok (line {config.line}, {len(config.cameras)} camera(s))")
    return 0
