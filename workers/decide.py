"""The decision process: ``python -m workers.decide CONFIG [--redis-url URL]``.

Writes one verdict per acquired frame to the line's Redis streams until
SIGINT/SIGTERM, then finishes what it holds and exits 0; non-zero with a
one-line message for bad configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from linewatch.config import load_config
from linewatch.decision.service import run_decision
from linewatch.errors import LinewatchError
from linewatch.log import configure


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the decision process."""
    parser = argparse.ArgumentParser(prog="workers.decide", description=__doc__)
    parser.add_argument("config", type=Path, help="line configuration (TOML)")
    parser.add_argument(
        "--redis-url", default=None, help="Redis to write to (default: redis.url of the config)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the decision service until stopped; the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        configure(config.logging.level, config.logging.format, process="decide")
        run_decision(config, args.redis_url)
    except LinewatchError as exc:
        print(f"decide: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
