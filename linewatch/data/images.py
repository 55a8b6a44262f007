"""Reading and writing image files: one place that knows file formats and channel order.

Everything downstream sees images as numpy arrays: ``uint8`` or ``uint16``,
``HxW`` for grayscale or ``HxWx3`` in RGB order. Files are read through
``np.fromfile`` + ``cv2.imdecode`` rather than ``cv2.imread`` because
``imread`` silently returns ``None`` for paths with non-ASCII characters on
some platforms, and we want every failure to name the file and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from linewatch.errors import DataError

# File suffixes treated as images (compared lower-case); everything else in a
# data-set folder (README.md, .DS_Store, Thumbs.db) is ignored.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


def is_image_file(path: Path) -> bool:
    """True for a visible, non-folder entry whose suffix is an image format we read.

    A dangling symlink counts, so that reading it reports the missing file
    instead of the image silently dropping out of a data set.
    """
    return (
        path.suffix.lower() in IMAGE_SUFFIXES
        and not path.name.startswith(".")
        and not path.is_dir()
    )


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as ``uint8``/``uint16``, ``HxW`` (gray) or ``HxWx3`` (RGB).

    Reads PNG, JPEG, BMP and TIFF at 8 or 16 bits; alpha is dropped. Raises
    :class:`DataError` naming the path when the file is missing, empty, not
    decodable, or of a pixel type we do not handle (e.g. float TIFF).
    """
    path = Path(path)
    raw = _read_bytes(path)
    img = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"{path}: cannot decode as an image (corrupt or unsupported format)")
    if img.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: pixel type {img.dtype} is not supported (use 8 or 16 bit)")
    return _to_gray_or_rgb(path, img)


def read_mask(path: str | os.PathLike[str], shape: tuple[int, ...]) -> np.ndarray:
    """Read a defect mask as a boolean ``HxW`` array (nonzero = defect).

    ``shape`` is the shape of the image the mask belongs to (only its first two
    entries are compared); a mask of another size raises :class:`DataError`.
    """
    path = Path(path)
    mask = read_image(path)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if mask.shape != tuple(shape[:2]):
        raise DataError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} pixels "
            f"but its image is {shape[1]}x{shape[0]}"
        )
    result: np.ndarray = mask != 0
    return result


def write_image(path: str | os.PathLike[str], img: np.ndarray) -> None:
    """Write ``img`` as a lossless PNG, creating parent folders.

    Accepts ``uint8``/``uint16`` gray or RGB, and ``bool`` masks (written as
    0/255). The same array always gives the same bytes (no timestamps), and the
    file appears atomically, so a folder watcher never sees half an image.
    """
    path = Path(path)
    if img.dtype == np.bool_:
        img = img.astype(np.uint8) * 255
    if img.dtype not in (np.uint8, np.uint16) or img.ndim not in (2, 3):
        raise DataError(f"{path}: cannot write a {img.dtype} array of shape {img.shape} as PNG")
    if img.ndim == 3:
        if img.shape[2] != 3:
            raise DataError(f"{path}: expected 3 channels (RGB), got {img.shape[2]}")
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise DataError(f"{path}: PNG encoding failed")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(encoded.tobytes())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{path}: cannot write ({exc.strerror})") from exc


def _read_bytes(path: Path) -> np.ndarray:
    """The file's bytes, or a DataError saying why there are none."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an image file")
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc


def _to_gray_or_rgb(path: Path, img: np.ndarray) -> np.ndarray:
    """Normalise OpenCV's channel layouts (gray, gray+alpha, BGR, BGRA) to gray or RGB."""
    if img.ndim == 2:
        return img
    channels = img.shape[2]
    if channels == 1:
        return img[:, :, 0]
    if channels == 2:  # gray + alpha
        return np.ascontiguousarray(img[:, :, 0])
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise DataError(f"{path}: {channels} channels are not supported (gray, RGB or RGBA)")
