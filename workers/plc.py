"""The reject-gate process: ``python -m workers.plc CONFIG [--redis-url URL]``.

Signals the gate for every reject of the line until SIGINT/SIGTERM, then exits 0;
non-zero with a one-line message for bad configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from linewatch.config import load_config
from linewatch.consumers.plc import run_plc
from linewatch.errors import LinewatchError
from linewatch.log import configure


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the reject-gate consumer process."""
    parser = argparse.ArgumentParser(prog="workers.plc", description=__doc__)
    parser.add_argument("config", type=Path, help="line configuration (TOML)")
    parser.add_argument(
        "--redis-url", default=None, help="Redis to read from (default: redis.url of the config)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the reject-gate consumer until stopped; the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        configure(config.logging.level, config.logging.format, process="plc")
        run_plc(config, args.redis_url)
    except LinewatchError as exc:
        print(f"plc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
