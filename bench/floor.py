"""The floor of the line's overhead on this machine: its process topology with no code in it.

    python bench/floor.py [--cameras 1 2] [--fps 10] [--model-ms 12.5] [--seconds 8]
                          [--phase aligned|spread] [--topology broker|direct]

``linewatch bench --only pipeline`` runs the same floor after each camera count, with the
line's own model time (``linewatch.bench.floor`` describes the processes). This script runs
it alone, with a model time of your choice, and also without the broker
(``--topology direct``: camera i pushes straight to worker i). Per frame: overhead =
(written - acquired) - (model end - model start), and its parts ``in`` (acquired to model
start), ``out`` (model end to decision) and ``write`` (decision to the Redis stamp); the
ratio is mean overhead / mean model time. The first ``--warmup-seconds`` are not measured.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from linewatch.bench.floor import measure_floor
from linewatch.bench.pipeline import summarise_floor
from linewatch.streams.server import EmbeddedRedis


def main() -> None:
    """Run each camera count and print one line of figures for it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fps", type=float, default=10.0)
    parser.add_argument("--model-ms", type=float, default=12.5,
                        help="CPU time a worker holds per frame (the line's model time)")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    parser.add_argument("--phase", choices=("aligned", "spread"), default="aligned",
                        help="cameras on one trigger, or spread evenly over the frame period")
    parser.add_argument("--topology", choices=("broker", "direct"), default="broker",
                        help="broker: the line's (camera, dispatcher, worker, decision); "
                        "direct: camera i pushes to worker i %% workers, no broker")
    args = parser.parse_args()
    with (tempfile.TemporaryDirectory(prefix="lw-floor-") as tmp,
          EmbeddedRedis(Path(tmp) / "redis") as server):
        print(f"floor ({args.topology}): {args.workers} workers holding a CPU "
              f"{args.model_ms} ms per frame, {args.fps:g} fps per camera, {args.phase}; "
              "ms, means", flush=True)
        print("cams  frames  model  overhead  in    out   write  ratio")
        for cameras in args.cameras:
            rows = measure_floor(cameras, workers=args.workers, fps=args.fps, phase=args.phase,
                                 model_ms=args.model_ms, seconds=args.seconds,
                                 warmup_s=args.warmup_seconds, redis_url=server.url,
                                 topology=args.topology)
            f = summarise_floor(rows, cameras, args.model_ms)
            s = f.overhead_stages
            print(f"{cameras:4d}  {f.steady_frames:6d}  {f.model_ms:5.1f}  "
                  f"{f.overhead_ms_mean:8.2f}  "
                  f"{s.to_model:4.2f}  {s.to_decision:4.2f}  {s.decide_write:5.2f}  "
                  f"{f.overhead_ratio:5.3f}", flush=True)


if __name__ == "__main__":
    main()
