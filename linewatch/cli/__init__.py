"""The ``linewatch`` command line.

Each command group lives in its own module with a ``register(subparsers)``
function that adds its subcommands and sets ``func`` on them. ``func`` takes the
parsed arguments and returns the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from linewatch import __version__
from linewatch.errors import LinewatchError
from linewatch.log import configure

# Command modules, in the order their commands appear in --help.
COMMAND_MODULES = (
    "linewatch.cli.config_cmd",
    "linewatch.cli.runtime_cmd",
    "linewatch.cli.acquisition_cmd",
    "linewatch.cli.data_cmd",
    "linewatch.cli.decision_cmd",
    "linewatch.cli.consumers_cmd",
    "linewatch.cli.transport_cmd",
    "linewatch.cli.model_cmd",
    "linewatch.cli.bench_cmd",
    "linewatch.cli.faults_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every command group registered."""
    parser = argparse.ArgumentParser(
        prog="linewatch",
        description="Real-time visual inspection for production lines.",
    )
    parser.add_argument("--version", action="version", version=f"linewatch {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info)",
    )
    parser.add_argument(
        "--log-format", default="console", choices=["console", "json"],
        help="log format on stderr (default: console)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``linewatch`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(args.log_level, args.log_format, process=args.command)
    try:
        code: int = args.func(args)
    except LinewatchError as exc:
        print(f"linewatch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
