"""Data sets in MVTec AD layout, with an optional validation split.

::

    root/
      train/good/*                      defect-free images, the only training input
      val/<label>/*                     optional: good + defective, for thresholds
      test/<label>/*                    good + defective, for reporting
      ground_truth/<label>/<stem>_mask.png   one mask per defective image

Masks of ``val`` and ``test`` share ``ground_truth/<label>/``, so image stems
must be unique per label across those splits (as in the magnetic-tile set).
Files that are not images (README.md, split.csv, .DS_Store) are ignored.

:meth:`MVTecDataset.validate` reads every file of a split before any training
starts, so a bad file stops the run at once with its path instead of an hour
in.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from linewatch.data.images import is_image_file, read_image, read_mask
from linewatch.errors import DataError
from linewatch.log import get_logger

GOOD = "good"
SPLITS = ("train", "val", "test")
_MASK_DIR = "ground_truth"
_MASK_SUFFIX = "_mask.png"

log = get_logger("data")


class Sample(BaseModel):
    """One image of a data set: where it is, its split and label, and its mask if any."""

    model_config = ConfigDict(frozen=True)

    path: Path
    split: str
    label: str
    mask: Path | None = None

    @property
    def is_defect(self) -> bool:
        """True for every label other than ``good``."""
        return self.label != GOOD


class MVTecDataset:
    """An MVTec-layout data set on disk; listing is lazy, sorted and deterministic."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data set folder does not exist")
        if not self.splits():
            raise DataError(
                f"{self.root}: not an MVTec-layout data set (no train/, val/ or test/ folder)"
            )

    def splits(self) -> list[str]:
        """The splits present, in the order train, val, test."""
        return [split for split in SPLITS if (self.root / split).is_dir()]

    def labels(self, split: str) -> list[str]:
        """Label folder names of a split, sorted, ``good`` first."""
        folder = self._split_dir(split)
        names = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(names, key=lambda name: (name != GOOD, name))

    def samples(self, split: str) -> list[Sample]:
        """Every image of a split, by label (``good`` first) then file name.

        A defective image's ``mask`` is its ``ground_truth`` file, or ``None``
        when that file is absent (:meth:`validate` reports it).
        """
        found: list[Sample] = []
        for label in self.labels(split):
            paths = sorted(p for p in (self.root / split / label).iterdir() if is_image_file(p))
            found += [
                Sample(path=p, split=split, label=label, mask=self._mask(label, p)) for p in paths
            ]
        if not found:
            raise DataError(f"{self.root / split}: split holds no images")
        return found

    def good(self, split: str) -> list[Sample]:
        """The defect-free images of a split."""
        found = [s for s in self.samples(split) if not s.is_defect]
        if not found:
            raise DataError(f"{self.root / split / GOOD}: no defect-free images")
        return found

    def mask_path(self, label: str, image: Path) -> Path:
        """Where the mask of a defective image is expected."""
        return self.root / _MASK_DIR / label / f"{image.stem}{_MASK_SUFFIX}"

    def validate(self, split: str) -> list[Sample]:
        """Read every image and mask of a split; return its samples or raise on the first problem.

        Checks that each image decodes, that ``train`` holds only good images,
        that every defective image has a mask, and that each mask has its
        image's size. The :class:`DataError` names the first culprit and how
        many other problems were found.
        """
        samples = self.samples(split)
        problems = [p for p in map(self._check, samples) if p is not None]
        if len(problems) == 1:
            raise DataError(problems[0])
        if problems:
            raise DataError(f"{problems[0]} (and {len(problems) - 1} more problem(s) in {split})")
        log.info("split_validated", root=str(self.root), split=split, images=len(samples))
        return samples

    def _check(self, sample: Sample) -> str | None:
        """The problem with one sample, as a one-line message, or None."""
        if sample.split == "train" and sample.is_defect:
            return f"{sample.path}: train must hold only good images, found label {sample.label!r}"
        try:
            image = read_image(sample.path)
            if sample.is_defect and sample.mask is not None:
                read_mask(sample.mask, image.shape)
        except DataError as exc:
            return str(exc)
        if sample.is_defect and sample.mask is None:
            expected = self.mask_path(sample.label, sample.path)
            return f"{sample.path}: defective image has no mask (expected {expected})"
        return None

    def __repr__(self) -> str:
        return f"MVTecDataset({str(self.root)!r})"

    def _split_dir(self, split: str) -> Path:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        folder = self.root / split
        if not folder.is_dir():
            raise DataError(
                f"{folder}: no {split!r} split in this data set "
                f"(found: {', '.join(self.splits())})"
            )
        return folder

    def _mask(self, label: str, image: Path) -> Path | None:
        if label == GOOD:
            return None
        mask = self.mask_path(label, image)
        return mask if mask.is_file() else None
