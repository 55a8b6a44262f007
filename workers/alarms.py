"""The alarms process: ``python -m workers.alarms CONFIG [--redis-url URL]``.

Watches the line's verdicts and defects and writes alarms until SIGINT/SIGTERM, then
exits 0; non-zero with a one-line message for bad configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from linewatch.config import load_config
from linewatch.consumers.alarms import run_alarms
from linewatch.errors import LinewatchError
from linewatch.log import configure


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the alarms consumer process."""
    parser = argparse.ArgumentParser(prog="workers.alarms", description=__doc__)
    parser.add_argument("config", type=Path, help="line configuration (TOML)")
    parser.add_argument(
        "--redis-url", default=None, help="Redis to read from (default: redis.url of the config)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the alarms consumer until stopped; the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        configure(config.logging.level, config.logging.format, process="alarms")
        run_alarms(config, args.redis_url)
    except LinewatchError as exc:
        print(f"alarms: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
