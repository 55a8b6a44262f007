"""``linewatch synth`` (write a synthetic data set) and ``linewatch data check`` (validate one)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from linewatch.data.mvtec import MVTecDataset
from linewatch.data.synth import DEFECTS, ILLUMINATIONS, SURFACES, write_dataset


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``synth`` command and the ``data`` command group."""
    synth = subparsers.add_parser(
        "synth", help="write a synthetic data set (MVTec layout, with masks)",
        description="Write synthetic industrial surface images with defect masks in MVTec "
                    "layout, plus a val split. The same arguments give byte-identical files.",
    )
    synth.add_argument("out", type=Path, metavar="OUT", help="folder to write (must be empty)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256)")
    synth.add_argument("--n-good", type=int, default=60, metavar="N",
                       help="defect-free training images; val and test get a third as many "
                            "good images each (default: 60)")
    synth.add_argument("--n-defect", type=int, default=5, metavar="N",
                       help=f"images per defect type ({', '.join(DEFECTS)}) in each of val "
                            "and test (default: 5)")
    synth.add_argument("--surface", default="brushed_metal", choices=[*SURFACES, "all"],
                       help="surface texture; 'all' writes one set per surface under OUT "
                            "(default: brushed_metal)")
    synth.add_argument("--illumination", choices=ILLUMINATIONS,
                       help="lighting fault applied to val and test images")
    synth.add_argument("--snp", type=float, default=0.0, metavar="DENSITY",
                       help="salt-and-pepper noise density 0..1 on val and test (default: 0)")
    synth.add_argument("--force", action="store_true",
                       help="replace a data set written earlier by linewatch synth in OUT")
    synth.set_defaults(func=_synth)

    data = subparsers.add_parser("data", help="check data sets")
    actions = data.add_subparsers(dest="data_action", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check", help="read every image and mask of an MVTec-layout data set",
        description="Read every image and mask; report the first bad file and how many more.",
    )
    check.add_argument("root", type=Path, metavar="ROOT", help="data set folder")
    check.set_defaults(func=_check)


def _synth(args: argparse.Namespace) -> int:
    bars: list[tqdm[None]] = []

    def progress(done: int, total: int) -> None:
        # Made on the first image, so a refused OUT prints no empty bar.
        if not bars:
            bars.append(tqdm(total=total, desc="synth", unit="img", file=sys.stderr, leave=False))
        bars[0].update(done - bars[0].n)

    try:
        summary = write_dataset(
            args.out, seed=args.seed, size=args.size, n_good=args.n_good,
            n_defect=args.n_defect, surface=args.surface, illumination=args.illumination,
            snp_density=args.snp, overwrite=args.force, progress=progress,
        )
    finally:
        for bar in bars:
            bar.close()
    per_split = ", ".join(f"{sum(labels.values())} {split}"
                          for split, labels in summary.counts.items())
    surfaces = "+".join(summary.surfaces)
    print(f"wrote {summary.images} images ({per_split} per surface; {summary.masks} masks) "
          f"of {surfaces} to {summary.out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    dataset = MVTecDataset(args.root)
    found = []
    for split in dataset.splits():
        samples = dataset.validate(split)
        defects = sum(s.is_defect for s in samples)
        found.append(f"{split} {len(samples)} ({defects} defective)")
    print(f"{args.root}: ok: {', '.join(found)}")
    return 0
