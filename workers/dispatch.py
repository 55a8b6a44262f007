"""The dispatcher process: ``python -m workers.dispatch CONFIG`` (or ``linewatch dispatch``).

Binds the frames and workers endpoints and hands frames to the inference workers
until SIGINT/SIGTERM; then it drains what it holds (bounded) and exits 0. Bad
configuration exits non-zero with a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from linewatch.config import load_config
from linewatch.errors import LinewatchError
from linewatch.log import configure
from linewatch.transport.dispatcher import serve


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the dispatcher process."""
    parser = argparse.ArgumentParser(prog="workers.dispatch", description=__doc__)
    parser.add_argument("config", type=Path, help="line configuration (TOML)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch until stopped; the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        configure(config.logging.level, config.logging.format, process="dispatch")
        serve(config.transport)
    except LinewatchError as exc:
        print(f"dispatch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
