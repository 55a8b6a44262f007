"""One camera's acquisition process: ``python -m workers.acquire CONFIG --camera ID``.

Runs until the source ends (a folder replayed once, a synth camera with
``frames`` set) or SIGINT/SIGTERM; exits 0 then, and non-zero with a one-line
message for bad configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from linewatch.acquisition.process import AcquisitionProcess, camera_config, run_until_signalled
from linewatch.config import load_config
from linewatch.errors import LinewatchError
from linewatch.log import configure


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the acquisition process."""
    parser = argparse.ArgumentParser(prog="workers.acquire", description=__doc__)
    parser.add_argument("config", type=Path, help="line configuration (TOML)")
    parser.add_argument("--camera", required=True, help="id of the camera to acquire")
    parser.add_argument(
        "--start-seq",
        type=int,
        default=0,
        help="sequence number of the first frame (after a restart: the last one sent + 1)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Acquire one camera until stopped; the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        configure(config.logging.level, config.logging.format, process=f"acquire-{args.camera}")
        camera = camera_config(config, args.camera)
        process = AcquisitionProcess(camera, config.transport, start_seq=args.start_seq)
        run_until_signalled(process)
    except LinewatchError as exc:
        print(f"acquire: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
