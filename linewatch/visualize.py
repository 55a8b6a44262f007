"""Pictures for people: anomaly-map overlays, region boxes, PNG encoding.

Everything takes and returns RGB ``uint8`` arrays (H x W x 3); conversion to
OpenCV's BGR happens inside, where OpenCV is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import cv2
import numpy as np

from linewatch.errors import DataError

Box = tuple[int, int, int, int]
"""A region's bounding box as OpenCV gives it: (x, y, width, height) in pixels."""


class BoxLike(Protocol):
    """Anything with a pixel bounding box, e.g. a defect region of the decision stage."""

    @property
    def x(self) -> int: ...
    @property
    def y(self) -> int: ...
    @property
    def w(self) -> int: ...
    @property
    def h(self) -> int: ...


def _xywh(box: Box | BoxLike) -> Box:
    if isinstance(box, tuple):
        x, y, w, h = box
        return int(x), int(y), int(w), int(h)
    return int(box.x), int(box.y), int(box.w), int(box.h)


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    """A gray or RGB uint8/uint16 image as RGB uint8.

    uint16 images are shifted down from the smallest bit depth holding their
    maximum (10, 12, 14 or 16 bits), so a 12-bit camera is not shown 16x dark.
    """
    img = np.asarray(image)
    if img.dtype == np.uint16:
        bits = max(8, int(img.max()).bit_length())
        img = (img >> (bits - 8)).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise DataError(f"image dtype must be uint8 or uint16, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim == 3 and img.shape[2] == 3:
        return img
    raise DataError(f"image must be H x W or H x W x 3, got shape {img.shape}")


def heatmap_overlay(
    image: np.ndarray,
    amap: np.ndarray,
    vmin: float = 0.0,
    vmax: float | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """The image with its anomaly map blended on top in the JET colormap (RGB uint8).

    The map (any size, float) is resized to the image with bilinear
    interpolation and scaled so ``vmin`` is blue and ``vmax`` (default: the
    map's maximum) red. Pass the same ``vmin``/``vmax`` to every overlay of a
    report so colours compare across images. NaN counts as ``vmin``.

    >>> heatmap_overlay(np.zeros((4, 6), np.uint8), np.ones((2, 3)), vmax=1.0).shape
    (4, 6, 3)
    """
    if not 0.0 <= alpha <= 1.0:
        raise DataError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _to_rgb8(image)
    m: np.ndarray = np.asarray(amap, dtype=np.float32)
    if m.ndim != 2 or m.size == 0:
        raise DataError(f"anomaly map must be a non-empty H x W array, got shape {m.shape}")
    m = np.nan_to_num(m, nan=vmin, posinf=float(np.finfo(np.float32).max), neginf=vmin)
    height, width = rgb.shape[:2]
    if m.shape != (height, width):
        m = cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
    top = float(m.max()) if vmax is None else float(vmax)
    span = top - vmin
    scaled = np.clip((m - vmin) / span, 0.0, 1.0) if span > 0 else np.zeros_like(m)
    heat_bgr = cv2.applyColorMap((scaled * 255.0 + 0.5).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat_bgr, cv2.COLOR_BGR2RGB)
    blended = cv2.addWeighted(rgb, 1.0 - alpha, heat, alpha, 0.0)
    return np.asarray(blended, dtype=np.uint8)


def draw_regions(
    rgb: np.ndarray,
    boxes: Sequence[Box | BoxLike],
    color: tuple[int, int, int] = (255, 255, 255),
    thickness: int = 1,
) -> np.ndarray:
    """A copy of an RGB image with a rectangle outline around each box.

    A box is an ``(x, y, w, h)`` tuple or an object with those attributes
    (a defect region), in the image's pixel grid.

    >>> out = draw_regions(np.zeros((5, 5, 3), np.uint8), [(1, 1, 3, 3)])
    >>> int(out[1, 1, 0]), int(out[2, 2, 0])
    (255, 0)
    """
    out = _to_rgb8(rgb).copy()
    for box in boxes:
        x, y, w, h = _xywh(box)
        if w <= 0 or h <= 0:
            raise DataError(f"box {(x, y, w, h)} has no area")
        # cv2.rectangle takes inclusive corners; the box spans x .. x + w - 1.
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), color, thickness)
    return out


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of a gray or RGB uint8/uint16 image (colour stays RGB in the file).

    >>> encode_png(np.zeros((2, 2, 3), np.uint8))[:4]
    b'\\x89PNG'
    """
    arr = np.asarray(img)
    if arr.dtype not in (np.uint8, np.uint16):
        raise DataError(f"PNG needs uint8 or uint16 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    elif not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1)):
        raise DataError(f"PNG needs H x W or H x W x 3 pixels, got shape {arr.shape}")
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise DataError(f"PNG encoding failed for an image of shape {arr.shape}")
    return bytes(buf.tobytes())
