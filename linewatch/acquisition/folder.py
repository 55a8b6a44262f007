"""Replays the images of a folder, or of one split of an MVTec-layout data set, as a camera.

Files are read in a fixed order (sorted relative paths; for a data-set split, the
data set's own order: ``good`` first, then by label and name), once or looping.
A file that cannot be read is logged, counted and reported as one
:class:`MissedFrames` — a line that replays a folder must not stop at one bad
file, and the frame it would have been still gets a (fail-safe) verdict.
"""

from __future__ import annotations

import time
from pathlib import Path

from linewatch.acquisition.base import FrameSource, MissedFrames, RawFrame, SourceItem
from linewatch.config import FolderSource
from linewatch.data.images import is_image_file, read_image
from linewatch.data.mvtec import MVTecDataset
from linewatch.errors import DataError
from linewatch.log import get_logger

# Masks of an MVTec-layout data set live here; replaying them as parts makes no sense.
_SKIPPED_DIRS = frozenset({"ground_truth"})


class FolderReplay(FrameSource):
    """Frames from image files, at ``cfg.fps`` (the caller paces reads)."""

    def __init__(self, cfg: FolderSource) -> None:
        super().__init__()
        self.cfg = cfg
        self.pace_hz = cfg.fps
        self.pace_phase_s = cfg.phase_s
        self.files: list[Path] = []
        self.unreadable = 0
        """Files that failed to read, over all loops."""
        self.loops = 0
        """Times the list was started again (``loop = true``)."""
        self._next = 0
        self._log = get_logger("acquisition.folder")

    def open(self) -> None:
        """List the files; raises :class:`DataError` when there are none."""
        self.files = list_images(self.cfg.path, self.cfg.split)
        self._next = 0
        self._log.info(
            "folder_opened", path=str(self._root), files=len(self.files), loop=self.cfg.loop
        )

    def read(self) -> SourceItem | None:
        """The next file as a frame, or as one missed frame if it is unreadable."""
        if self.stopping or not self.files:
            return None
        if self._next == len(self.files):
            if not self.cfg.loop:
                return None
            self._next = 0
            self.loops += 1
        path = self.files[self._next]
        self._next += 1
        try:
            pixels = read_image(path)
        except DataError as exc:
            self.unreadable += 1
            self._log.error(
                "folder_file_unreadable", path=str(path), error=str(exc), unreadable=self.unreadable
            )
            return MissedFrames(1, "unreadable", str(exc), time.time_ns())
        return RawFrame(pixels, time.time_ns(), None, self._part_id(path))

    def close(self) -> None:
        """Forget the file list (nothing else is held open)."""
        self.files = []

    @property
    def _root(self) -> Path:
        return self.cfg.path / self.cfg.split if self.cfg.split else self.cfg.path

    def _part_id(self, path: Path) -> str:
        """The file's path below the replayed folder, without suffix: ``crack/000``."""
        return path.relative_to(self._root).with_suffix("").as_posix()


def list_images(path: Path, split: str | None = None) -> list[Path]:
    """The image files a folder replay shows, in replay order.

    With ``split``, ``path`` is an MVTec-layout data set and its split is listed in
    the data set's order; otherwise every image below ``path`` (``ground_truth``
    folders excepted), sorted by relative path. Raises :class:`DataError` naming
    the folder when it is missing or holds no images.
    """
    if split is not None:
        return [sample.path for sample in MVTecDataset(path).samples(split)]
    if not path.is_dir():
        raise DataError(f"{path}: folder to replay does not exist")
    files = sorted(
        (p for p in path.rglob("*") if is_image_file(p) and not _skipped(p, path)),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise DataError(f"{path}: no image files to replay (png, jpg, bmp, tif)")
    return files


def _skipped(file: Path, root: Path) -> bool:
    parts = file.relative_to(root).parts[:-1]
    return any(part in _SKIPPED_DIRS or part.startswith(".") for part in parts)
