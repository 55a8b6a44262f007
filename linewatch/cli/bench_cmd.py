"""``linewatch bench``: the model's speed and the whole line's latency on this machine.

::

    linewatch bench [--json OUT] [--device auto|cpu|cuda] [--model FILE] [--quick]
                    [--only model|pipeline] [--sizes 128 256 512] [--batches 1 4 8 16]
                    [--cameras 1 2 4] [--camera-phase aligned|spread|free] [--fps 10]
                    [--seconds 6] [--max-batch N] [--floor | --no-floor]
                    [--backend auto|torch|onnxruntime] [--precision fp32|bf16|fp16]
                    [--channels-last | --no-channels-last] [--compile]

Without ``--model`` every size is measured with a small model of that size, trained for one
epoch on a synthetic set and cached (``~/.cache/linewatch/bench``). See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from linewatch.errors import ConfigError

if TYPE_CHECKING:
    from linewatch.bench import ModelBenchPlan, PipelinePlan
    from linewatch.config import InferenceOptions


@dataclass(frozen=True)
class _Preset:
    sizes: tuple[int, ...]
    batches: tuple[int, ...]
    repeats: int
    warmup: int
    cameras: tuple[int, ...]
    seconds: float
    warmup_seconds: float


# The default fits a few minutes on a 2-core CPU (models cached); --quick about a minute.
_FULL = _Preset((128, 256, 512), (1, 4, 8, 16), 3, 1, (1, 2, 4), 6.0, 2.0)
_QUICK = _Preset((128, 256), (1, 8), 2, 1, (1, 2), 3.0, 1.0)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``linewatch bench``."""
    p = subparsers.add_parser(
        "bench", help="measure the model and the whole line on this machine (table + JSON)"
    )
    p.add_argument("--json", type=Path, default=None, metavar="OUT",
                   help="also write every figure and setting as JSON")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="device of the model and of the line's workers (default: auto)")
    p.add_argument("--model", type=Path, default=None, metavar="FILE",
                   help="benchmark this model file at every size (default: a small model "
                        "trained per size, cached)")
    p.add_argument("--quick", action="store_true",
                   help="fewer sizes, batches, repeats and cameras (about a minute on a CPU)")
    p.add_argument("--only", choices=["model", "pipeline"], default=None,
                   help="run one part only")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the model benchmark (default: torch's, = cores)")
    p.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help="where bench models are kept (default: ~/.cache/linewatch)")
    model = p.add_argument_group("model part")
    model.add_argument("--sizes", type=int, nargs="+", default=None, metavar="N",
                       help="square frame sides (default: 128 256 512)")
    model.add_argument("--batches", type=int, nargs="+", default=None, metavar="N",
                       help="frames per call (default: 1 4 8 16)")
    model.add_argument("--tiled-frame", type=int, default=1024, metavar="N",
                       help="side of a frame scored as tiles of the 256 model (or of --model); "
                            "0 = skip (default: 1024)")
    model.add_argument("--repeats", type=int, default=None,
                       help="timed calls per row, median reported (default: 3)")
    model.add_argument("--warmup", type=int, default=None,
                       help="untimed calls before each row (default: 1)")
    model.add_argument("--backend", choices=["auto", "torch", "onnxruntime"], default=None,
                       help="what runs the backbone (default: workers.inference's, auto: "
                            "onnxruntime on a CPU, torch on CUDA)")
    model.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                       help="backbone precision (default: workers.inference's, fp32)")
    model.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="backbone on NHWC tensors (default: workers.inference's)")
    model.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the backbone, at load (default: off)")
    line = p.add_argument_group("pipeline part")
    line.add_argument("--cameras", type=int, nargs="+", default=None, metavar="N",
                      help="camera counts, one line run each (default: 1 2 4)")
    line.add_argument("--camera-phase", choices=("aligned", "spread", "free"),
                      default="aligned",
                      help="when the cameras read: aligned (all at once, as on one trigger), "
                           "spread (evenly apart), free (each from its own start: by chance, "
                           "so runs vary) (default: aligned)")
    line.add_argument("--fps", type=float, default=10.0,
                      help="frames per second per camera (default: 10)")
    line.add_argument("--seconds", type=float, default=None,
                      help="measured seconds per run (default: 6)")
    line.add_argument("--warmup-seconds", type=float, default=None,
                      help="unmeasured seconds at the start of each run (default: 2)")
    line.add_argument("--frame-size", type=int, default=256,
                      help="side of the synth cameras' frames (default: 256)")
    line.add_argument("--workers", type=int, default=2, help="inference workers (default: 2)")
    line.add_argument("--max-batch", type=int, default=None, metavar="N",
                      help="frames per batch at most (default: the line's, workers.max_batch: "
                           "4 with onnxruntime on a CPU, 1 with torch, 8 on CUDA)")
    line.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                      help="after each camera count, run the same processes with no code in "
                           "them, for the overhead this machine allows (default: on; not run "
                           "with --camera-phase free)")
    p.set_defaults(func=_bench)


def _positive(name: str, values: tuple[int, ...] | int | float) -> None:
    items = values if isinstance(values, tuple) else (values,)
    if any(v <= 0 for v in items):
        raise ConfigError(f"{name} must be positive, got {' '.join(str(v) for v in items)}")


def _check_model_sizes(sizes: tuple[int, ...], flag: str) -> None:
    """Bench models are trained per size, so sizes must be valid model input sides."""
    bad = [s for s in sizes if s % 32 or not 32 <= s <= 2048]
    if bad:
        raise ConfigError(f"{flag} {bad[0]}: a model size must be a multiple of 32 in "
                          "32..2048 (or give --model FILE)")


def _plans(
    args: argparse.Namespace, cache: Path
) -> tuple[ModelBenchPlan | None, PipelinePlan | None]:
    """The plans of the parts to run, from the preset and the flags that override it."""
    from linewatch.bench import ModelBenchPlan, PipelinePlan, pipeline_model

    preset = _QUICK if args.quick else _FULL
    sizes = tuple(args.sizes or preset.sizes)
    batches = tuple(args.batches or preset.batches)
    cameras = tuple(args.cameras or preset.cameras)
    repeats = preset.repeats if args.repeats is None else args.repeats
    warmup = preset.warmup if args.warmup is None else args.warmup
    seconds = args.seconds or preset.seconds
    warmup_s = preset.warmup_seconds if args.warmup_seconds is None else args.warmup_seconds
    for name, value in (("--sizes", sizes), ("--batches", batches), ("--cameras", cameras),
                        ("--repeats", repeats), ("--fps", args.fps), ("--seconds", seconds),
                        ("--frame-size", args.frame_size), ("--workers", args.workers)):
        _positive(name, value)
    if args.max_batch is not None:
        _positive("--max-batch", args.max_batch)
    if warmup < 0 or warmup_s < 0 or args.tiled_frame < 0:
        raise ConfigError("--warmup, --warmup-seconds and --tiled-frame cannot be negative")
    if args.model is not None and not args.model.is_file():
        raise ConfigError(f"--model {args.model}: no such file")
    model_plan: ModelBenchPlan | None = None
    pipeline_plan: PipelinePlan | None = None
    if args.only in (None, "model"):
        if args.model is None:
            _check_model_sizes(sizes, "--sizes")
        model_plan = ModelBenchPlan(
            sizes=sizes, batches=batches, tiled_frame=args.tiled_frame or None, warmup=warmup,
            repeats=repeats, device=args.device, model=args.model,
            inference=_inference(args),
        )
    if args.only in (None, "pipeline"):
        if args.model is None:
            _check_model_sizes((args.frame_size,), "--frame-size")
        pipeline_plan = PipelinePlan(
            cameras=cameras, fps=args.fps, camera_phase=args.camera_phase,
            seconds=seconds, warmup_s=warmup_s,
            frame_size=args.frame_size, workers=args.workers, device=args.device,
            max_batch=args.max_batch, model=pipeline_model(args.frame_size, args.model, cache),
            floor=args.floor,
        )
    return model_plan, pipeline_plan


def _inference(args: argparse.Namespace) -> InferenceOptions:
    """The workers' default inference options with the flags given on top."""
    from linewatch.config import InferenceOptions

    flags = {"backend": args.backend, "precision": args.precision,
             "channels_last": args.channels_last, "compile": args.compile}
    return InferenceOptions(**{k: v for k, v in flags.items() if v is not None})


def _command(args: argparse.Namespace, model_plan: ModelBenchPlan | None,
             pipeline_plan: PipelinePlan | None) -> str:
    """The command line with every setting spelled out (``--quick`` expanded): it
    reproduces the run, whatever defaults a later version has."""
    words = ["linewatch", "bench", "--device", args.device]
    if args.model is not None:
        words += ["--model", str(args.model)]
    if args.cache is not None:
        words += ["--cache", str(args.cache)]
    if args.threads is not None:
        words += ["--threads", str(args.threads)]
    if args.only is not None:
        words += ["--only", args.only]
    if model_plan is not None:
        m = model_plan
        words += ["--sizes", *map(str, m.sizes), "--batches", *map(str, m.batches),
                  "--tiled-frame", str(m.tiled_frame or 0), "--repeats", str(m.repeats),
                  "--warmup", str(m.warmup), "--backend", m.inference.backend,
                  "--precision", m.inference.precision,
                  "--channels-last" if m.inference.channels_last else "--no-channels-last",
                  "--compile" if m.inference.compile else "--no-compile"]
    if pipeline_plan is not None:
        q = pipeline_plan
        words += ["--cameras", *map(str, q.cameras), "--camera-phase", q.camera_phase,
                  "--fps", f"{q.fps:g}",
                  "--seconds", f"{q.seconds:g}", "--warmup-seconds", f"{q.warmup_s:g}",
                  "--frame-size", str(q.frame_size), "--workers", str(q.workers),
                  "--max-batch", str(q.batch_limit), "--floor" if q.floor else "--no-floor"]
    if args.json is not None:
        words += ["--json", str(args.json)]
    return shlex.join(words)


def _bench(args: argparse.Namespace) -> int:
    import torch

    from linewatch.bench import run_bench
    from linewatch.bench.report import format_report, write_json
    from linewatch.model.scorer import resolve_device
    from linewatch.runtime.demo import default_cache_dir

    resolve_device(args.device)  # cuda without a GPU: one line, before any training
    if args.threads is not None:
        _positive("--threads", args.threads)
        torch.set_num_threads(args.threads)
    cache = args.cache or default_cache_dir()
    model_plan, pipeline_plan = _plans(args, cache)
    command = _command(args, model_plan, pipeline_plan)
    report = run_bench(model_plan, pipeline_plan, command=command, cache=cache,
                       log_dir=cache / "bench" / "last-run-logs", device=args.device)
    print(format_report(report), end="")
    if args.json is not None:
        write_json(report, args.json)
    return 0
