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
    run.add_argument("--log-dir", type=Path, default=None,
                     help="write each process's output to DIR/<process>.log (default: stderr)")
    run.set_defaults(func=_run)
    infer = subparsers.add_parser("infer", help="run one batched inference worker")
    infer.add_argument("config", type=Path, help="line configuration (TOML)")
    infer.add_argument("--worker", type=int, default=0, help="worker index (default: 0)")
    infer.set_defaults(func=_infer)
    demo = subparsers.add_parser(
        "demo", help="run a whole synthetic line on the embedded default (no setup needed)"
    )
    demo.add_argument("--frames", type=int, default=200, help="frames to replay (default: 200)")
    demo.add_argument("--fps", type=float, default=20.0, help="camera frame rate (default: 20)")
    demo.add_argument("--epochs", type=int, default=8,
                      help="training epochs of the demo model (default: 8; cached)")
    demo.add_argument("--timeout", type=float, default=600.0,
                      help="give up after this many seconds (default: 600)")
    demo.add_argument("--json", type=Path, default=None, metavar="OUT",
                      help="also write the summary as JSON")
    demo.set_defaults(func=_demo)


def _run(args: argparse.Namespace) -> int:
    from linewatch.config import load_config
    from linewatch.lifecycle import run_until_signalled
    from linewatch.runtime.line import LineRunner

    config = load_config(args.config)
    runner = LineRunner(args.config, config, consumers=not args.no_consumers,
                        log_dir=args.log_dir)
    run_until_signalled(runner)
    return 0


def _infer(args: argparse.Namespace) -> int:
    from linewatch.config import load_config
    from linewatch.inference.worker import run_inference_worker

    config = load_config(args.config)
    stats = run_inference_worker(config, args.worker)
    print(f"worker {args.worker}: {stats['scored']} scored, {stats['failed']} failed")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from linewatch.errors import LinewatchError
    from linewatch.runtime.demo import run_demo, summary_text, write_summary_json

    if args.frames < 1:
        raise LinewatchError(f"--frames must be at least 1, got {args.frames}")
    summary = run_demo(args.frames, args.fps, args.epochs, args.timeout)
    print(summary_text(summary), end="")
    if args.json:
        write_summary_json(summary, args.json)
    return 0 if summary.verdicts_written == summary.frames_acquired else 1
