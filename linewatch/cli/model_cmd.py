"""``linewatch train|calibrate|evaluate|ablation``: the model's life before the line.

::

    linewatch train DATA --out line.lwm [--variant E] [--size 256] [--resume]
    linewatch calibrate line.lwm DATA
    linewatch evaluate line.lwm DATA --split test --json out.json --report report/
    linewatch ablation DATA --out ablation/ --seeds 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from linewatch.errors import ConfigError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the model commands."""
    _register_train(subparsers)
    _register_calibrate(subparsers)
    _register_evaluate(subparsers)
    _register_ablation(subparsers)


# --------------------------------------------------------------------------- shared options


def _add_model_options(p: argparse.ArgumentParser, with_variant: bool = True) -> None:
    if with_variant:
        p.add_argument(
            "--variant",
            default="E",
            choices=list("ABCDE"),
            help="ablation variant (default: E, the product)",
        )
    p.add_argument("--size", type=int, default=None, help="model input side (default: 256)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model setting override, VALUE in JSON (e.g. --set sigma=2); repeatable",
    )


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 6)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: 16)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw  # a bare word is a string: --set memory=knn
    return out


def _model_settings(args: argparse.Namespace) -> Any:
    from linewatch.model.settings import variant_settings

    overrides = _overrides(args.overrides)
    if args.size is not None:
        overrides["size"] = args.size
    return variant_settings(getattr(args, "variant", "E"), **overrides)


def _train_settings(args: argparse.Namespace) -> Any:
    from linewatch.model.settings import train_settings

    values: dict[str, Any] = {"device": args.device, "amp": not args.no_amp}
    for name in ("epochs", "batch", "seed"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return train_settings(**values)


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False)


# --------------------------------------------------------------------------- train


def _register_train(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("train", help="train a model on DATA/train (good images only)")
    p.add_argument("data", type=Path, help="data set in MVTec layout")
    p.add_argument("--out", type=Path, required=True, help="model file to write (.lwm)")
    p.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint")
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="do not calibrate on val even when it holds defects",
    )
    _add_model_options(p)
    _add_train_options(p)
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from linewatch.model.train import train

    if args.out.suffix != ".lwm":
        raise ConfigError(f"--out {args.out}: a model file name must end in .lwm")
    report = train(
        args.data,
        args.out,
        _model_settings(args),
        _train_settings(args),
        resume=args.resume,
        progress=_progress(args),
        calibrate=not args.no_calibrate,
    )
    print(
        f"{report.model_path}: trained {report.epochs_run} epochs (best {report.best_epoch}) "
        f"in {report.seconds:.0f} s on {report.train_images} images"
        + (", calibrated on val" if report.calibrated else ", not calibrated")
    )
    return 0


# --------------------------------------------------------------------------- calibrate


def _register_calibrate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "calibrate", help="fit normalisation, term weights and thresholds on DATA/val"
    )
    p.add_argument("model", type=Path, help="model file (.lwm), updated in place")
    p.add_argument("data", type=Path, help="data set with a val split (good + defective)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_calibrate)


def _calibrate(args: argparse.Namespace) -> int:
    from linewatch.model.calibrate import calibrate

    report = calibrate(args.model, args.data, args.device, args.batch, _progress(args))
    t = report.thresholds
    w = report.normalisation.weights
    terms = ", ".join(f"{k} {v:.3f}" for k, v in report.term_auroc.items())
    weights = ", ".join(f"{k} {getattr(w, k):g}" for k in w.active()) if w else "settings"
    groups = report.normalisation.shape_groups
    shapes = ("one group of frame shapes" if groups is None else
              f"{len(groups.centre)} groups of frame shapes split at width/height "
              + " ".join(f"{e:.2f}" for e in groups.edges))
    print(
        f"{args.model}: val AUROC {report.val_auroc:.4f} ({report.n_good} good, "
        f"{report.n_defect} defective); per term {terms}; weights {weights}; {shapes}; "
        f"thresholds operating_point {t.operating_point:.4f} f1_max {t.f1_max:.4f} "
        f"youden {t.youden:.4f} (version {t.version}); the operating point's precision "
        f"over val and {report.exposure_copies} exposure-jittered copies of it"
    )
    return 0


# --------------------------------------------------------------------------- evaluate


def _register_evaluate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("evaluate", help="metrics, timing and a report on a split")
    p.add_argument("model", type=Path, help="model file (.lwm)")
    p.add_argument("data", type=Path, help="data set in MVTec layout")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--json", dest="json_out", type=Path, default=None, help="write results here")
    p.add_argument("--report", type=Path, default=None, help="write an HTML report into DIR")
    p.add_argument(
        "--scores",
        type=Path,
        default=None,
        metavar="CSV",
        help="write every image's score, verdict and exposure here (CSV)",
    )
    p.add_argument(
        "--corrupt",
        default=None,
        metavar="KIND",
        help="snp:<density>, light:strong, light:low or shadow",
    )
    p.add_argument(
        "--rule", default="operating_point", choices=["operating_point", "f1_max", "youden"]
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the corruption")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from linewatch.model.evaluate import evaluate

    r = evaluate(
        args.model,
        args.data,
        args.split,
        args.corrupt,
        args.batch,
        args.device,
        args.rule,
        args.seed,
        args.json_out,
        args.report,
        _progress(args),
        args.scores,
    )
    shown = {
        k: getattr(r, k)
        for k in (
            "image_auroc",
            "image_pr_auc",
            "pixel_auroc",
            "aupro",
            "f1",
            "precision",
            "recall",
            "false_alarm_rate",
            "ms_per_image",
            "backbone_ms_per_image",
            "n_images",
        )
    }
    json.dump({k: round(v, 4) if isinstance(v, float) else v for k, v in shown.items()}, sys.stdout)
    sys.stdout.write("\n")
    return 0


# --------------------------------------------------------------------------- ablation


def _register_ablation(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "ablation", help="train and evaluate variants A-E with the same budget and seeds"
    )
    p.add_argument("data", type=Path, help="data set with train, val and test splits")
    p.add_argument("--out", type=Path, required=True, help="folder for models and tables")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: 3)")
    p.add_argument("--variants", default="ABCDE", help="which variants (default: ABCDE)")
    _add_model_options(p, with_variant=False)
    _add_train_options(p)
    p.add_argument("--eval-batch", type=int, default=8)
    p.set_defaults(func=_ablation)


def _ablation(args: argparse.Namespace) -> int:
    from linewatch.model.ablation import run_ablation

    variants = [v for v in args.variants.upper() if v.strip()]
    bad = [v for v in variants if v not in "ABCDE"]
    if bad or not variants:
        raise ConfigError(f"--variants {args.variants!r}: use letters from ABCDE")
    if args.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    overrides = _overrides(args.overrides)
    if args.size is not None:
        overrides["size"] = args.size
    _model_settings(args)  # a bad override fails here, before any training
    run_ablation(
        args.data,
        args.out,
        variants,
        args.seeds,
        overrides,
        _train_settings(args),
        args.eval_batch,
        _progress(args),
    )
    print((args.out / "ablation.md").read_text(), end="")
    return 0
