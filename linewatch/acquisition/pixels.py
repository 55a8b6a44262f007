"""Camera pixel formats (GenICam PFNC names) to the pixels the model sees.

The model takes H x W mono or H x W x 3 RGB frames, uint8 or uint16:

* ``Mono8`` -> H x W uint8.
* ``Mono10/12/14/16`` -> H x W uint16, shifted left to fill 16 bits, so that
  every 16-bit frame spans the same range whatever the sensor depth
  (a 12-bit value v becomes v << 4).
* ``RGB*``, ``BGR*``, ``RGBa*``, ``BGRa*`` -> H x W x 3 in RGB order, alpha dropped.
* ``Bayer{RG,BG,GB,GR}{8,10,12,16}`` -> demosaiced (bilinear) H x W x 3 RGB.

The result never shares memory with its input, so the camera's buffer can be
queued back as soon as this returns. Packed formats (``Mono12p``, ``Mono10Packed``)
are refused: select the unpacked variant on the camera.

>>> import numpy as np
>>> raw = np.array([[1, 2, 3, 255], [4, 5, 6, 255]], dtype=np.uint8)  # 1 x 2 RGBa8
>>> to_model_pixels(raw.reshape(1, 8), "RGBa8").tolist()
[[[1, 2, 3], [4, 5, 6]]]
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from linewatch.errors import DataError


@dataclass(frozen=True, slots=True)
class _Format:
    channels: int  # components per pixel in the camera buffer
    bits: int  # significant bits per component
    bgr: bool = False  # stored blue first
    bayer: int | None = None  # OpenCV demosaic code, for Bayer formats


# OpenCV names Bayer patterns after the second row's second and third pixels, so
# GenICam's BayerRG (R at the top left) is OpenCV's BayerBG, and so on.
_BAYER_CODES = {
    "RG": cv2.COLOR_BayerBG2RGB,
    "BG": cv2.COLOR_BayerRG2RGB,
    "GB": cv2.COLOR_BayerGR2RGB,
    "GR": cv2.COLOR_BayerGB2RGB,
}


def _build_table() -> dict[str, _Format]:
    table: dict[str, _Format] = {"Mono8": _Format(1, 8)}
    for bits in (10, 12, 14, 16):
        table[f"Mono{bits}"] = _Format(1, bits)
    for bits in (8, 10, 12, 14, 16):
        table[f"RGB{bits}"] = _Format(3, bits)
        table[f"BGR{bits}"] = _Format(3, bits, bgr=True)
        table[f"RGBa{bits}"] = _Format(4, bits)
        table[f"BGRa{bits}"] = _Format(4, bits, bgr=True)
    for pattern, code in _BAYER_CODES.items():
        for bits in (8, 10, 12, 16):
            table[f"Bayer{pattern}{bits}"] = _Format(1, bits, bayer=code)
    return table


_FORMATS = _build_table()

SUPPORTED_FORMATS: tuple[str, ...] = tuple(sorted(_FORMATS))
"""Every pixel format :func:`to_model_pixels` converts."""


def check_format(pixel_format: str) -> None:
    """Raise :class:`DataError` naming ``pixel_format`` unless it is supported."""
    if pixel_format not in _FORMATS:
        raise DataError(
            f"pixel format {pixel_format!r} is not supported; use one of "
            f"Mono8, Mono10/12/14/16, RGB8, BGR8, RGBa8, BGRa8, Bayer<RG|BG|GB|GR><8|10|12|16> "
            f"(unpacked)"
        )


def to_model_pixels(data: np.ndarray, pixel_format: str, width: int | None = None) -> np.ndarray:
    """Convert a camera buffer to model pixels (see the module docstring).

    ``data`` is H x (W·C) or H x W x C, with C the components per pixel of
    ``pixel_format``; uint8 for 8-bit formats, uint16 for deeper ones. With
    ``width`` (pixels) given, longer rows are cut: that drops a driver's row
    padding. The result is a new C-contiguous array.
    """
    check_format(pixel_format)
    fmt = _FORMATS[pixel_format]
    want = np.uint8 if fmt.bits == 8 else np.uint16
    if data.dtype != want:
        raise DataError(
            f"pixel format {pixel_format}: expected {np.dtype(want).name} data, got {data.dtype}"
        )
    if width is not None and data.ndim == 2:
        data = data[:, : width * fmt.channels]
    image = _shape_image(data, fmt, pixel_format)
    if fmt.bits not in (8, 16):
        # A fresh array, so the camera buffer is already copied out here.
        image = np.left_shift(image, 16 - fmt.bits, dtype=np.uint16)
    if fmt.bayer is not None:
        return cv2.cvtColor(np.ascontiguousarray(image), fmt.bayer)
    if fmt.channels == 1:
        return np.array(image, copy=True, order="C")
    rgb = image[:, :, 2::-1] if fmt.bgr else image[:, :, :3]
    return np.array(rgb, copy=True, order="C")


def _shape_image(data: np.ndarray, fmt: _Format, pixel_format: str) -> np.ndarray:
    if data.ndim == 3:
        if data.shape[2] != fmt.channels:
            raise DataError(
                f"pixel format {pixel_format}: expected {fmt.channels} channels, "
                f"got {data.shape[2]}"
            )
        return data if fmt.channels > 1 else data[:, :, 0]
    if data.ndim != 2 or data.shape[1] % fmt.channels:
        raise DataError(
            f"pixel format {pixel_format}: cannot shape {data.shape} into "
            f"rows of {fmt.channels}-component pixels"
        )
    if fmt.channels == 1:
        return data
    return data.reshape(data.shape[0], data.shape[1] // fmt.channels, fmt.channels)
