"""``linewatch acquire CONFIG --camera ID`` and ``linewatch cameras CTI``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``acquire`` and ``cameras`` commands."""
    acquire = subparsers.add_parser(
        "acquire", help="acquire one camera and push its frames to the dispatcher"
    )
    acquire.add_argument("config", type=Path, help="line configuration (TOML)")
    acquire.add_argument("--camera", required=True, help="id of the camera to acquire")
    acquire.add_argument(
        "--start-seq",
        type=_start_seq,
        default=0,
        metavar="N|auto",
        help="sequence number of the first frame: after a restart the last one sent + 1, "
        "or 'auto' (now in microseconds, above any seq an earlier run reached); default 0",
    )
    acquire.set_defaults(func=_acquire)
    cameras = subparsers.add_parser("cameras", help="list the cameras a GenTL producer (.cti) sees")
    cameras.add_argument(
        "cti",
        type=Path,
        nargs="?",
        help="GenTL producer file (default: the simulated viky.cti shipped with genicam)",
    )
    cameras.set_defaults(func=_cameras)


def _acquire(args: argparse.Namespace) -> int:
    # Imported here so that `linewatch --help` does not load ZeroMQ and OpenCV.
    from linewatch.acquisition.process import AcquisitionProcess, auto_start_seq, camera_config
    from linewatch.config import load_config
    from linewatch.lifecycle import run_until_signalled

    config = load_config(args.config)
    camera = camera_config(config, args.camera)
    start_seq = auto_start_seq() if args.start_seq is None else args.start_seq
    process = AcquisitionProcess(camera, config.transport, start_seq=start_seq)
    stats = run_until_signalled(process)
    print(
        f"{camera.id}: {stats.frames} frames sent, {stats.missed} missed in {stats.gaps} gap(s), "
        f"{stats.errors} error(s), next seq {process.next_seq}"
    )
    return 0


def _start_seq(text: str) -> int | None:
    """``--start-seq``: a number, or None for 'auto'."""
    if text == "auto":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'auto', got {text!r}")
    return int(text)


def _cameras(args: argparse.Namespace) -> int:
    from linewatch.acquisition.genicam import list_devices, viky_cti_path

    cti = args.cti if args.cti is not None else viky_cti_path()
    devices = list_devices(cti)
    if not devices:
        print(f"{cti}: no cameras found")
        return 1
    for d in devices:
        print(
            f"{d['id']}\tserial={d['serial_number'] or '-'}\t"
            f"name={d['user_defined_name'] or '-'}\t{d['vendor']} {d['model']}"
        )
    return 0
