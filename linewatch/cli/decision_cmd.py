"""``linewatch decide CONFIG`` and ``linewatch streams describe``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``decide`` and ``streams`` commands."""
    decide = subparsers.add_parser(
        "decide", help="turn results into verdicts on the line's Redis streams"
    )
    decide.add_argument("config", type=Path, help="line configuration (TOML)")
    decide.add_argument(
        "--redis-url", default=None, help="Redis to write to (default: redis.url of the config)"
    )
    decide.set_defaults(func=_decide)
    streams = subparsers.add_parser("streams", help="the Redis streams a line writes")
    actions = streams.add_subparsers(dest="streams_action", metavar="ACTION", required=True)
    describe = actions.add_parser("describe", help="print every stream field as Markdown")
    describe.add_argument(
        "--update", type=Path, default=None, metavar="FILE",
        help="replace the text between <!-- streams:begin --> and <!-- streams:end --> in FILE",
    )
    describe.set_defaults(func=_describe)


def _decide(args: argparse.Namespace) -> int:
    # Imported here so that `linewatch --help` does not load ZeroMQ and OpenCV.
    from linewatch.config import load_config
    from linewatch.decision.service import run_decision

    config = load_config(args.config)
    stats = run_decision(config, args.redis_url)
    print(
        f"{config.line}: {stats['decision_passes']} pass, {stats['decision_rejects']} reject "
        f"({stats['decision_fail_safe']} fail-safe), {stats['writer_spooled']} spooled, "
        f"{stats['writer_refused']} refused, {stats['pending']} pending"
    )
    return 0


def _describe(args: argparse.Namespace) -> int:
    from linewatch.streams.records import describe_records, embed_description

    if args.update is None:
        print(describe_records(), end="")
        return 0
    args.update.write_text(embed_description(args.update.read_text(encoding="utf-8")),
                           encoding="utf-8")
    print(f"{args.update}: stream fields updated")
    return 0
