"""``linewatch run``, ``linewatch infer`` and ``linewatch demo``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the line-runtime commands."""
    run = subparsers.add_parser("run", help="start and supervise every process of a line")
    run.add_argument("config", type=Path, help="line configuration (TOML)")
    run.add_argument("--no-consumers", action="store_true",
                     help="do not start the plc and alarms consumers")
    run.set_defaults(func=_run)
    infer = subparsers.add_parser("infer", help="run one batched inference worker")
    infer.add_argument("config", type=Path, help="line configuration (TOML)")
    infer.add_argument("--worker", type=int, default=0, help="worker index (default: 0)")
    infer.set_defaults(func=_infer)


def _run(args: argparse.Namespace) -> int:
    from linewatch.config import load_config
    from linewatch.lifecycle import run_until_signalled
    from linewatch.runtime.line import LineRunner

    config = load_config(args.config)
    run_until_signalled(LineRunner(args.config, config, consumers=not args.no_consumers))
    return 0


def _infer(args: argparse.Namespace) -> int:
    from linewatch.config import load_config
    from linewatch.inference.worker import run_inference_worker

    config = load_config(args.config)
    stats = run_inference_worker(config, args.worker)
    print(f"worker {args.worker}: {stats['scored']} scored, {stats['failed']} failed")
    return 0
