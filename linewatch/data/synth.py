"""Synthetic industrial surfaces with pixel-exact defect masks.

Four textures seen on real lines, each drawn from a seeded generator so a
seed always gives the same image:

- ``brushed_metal``: bright, anisotropic streaks of a brushed or ground finish.
- ``woven_fabric``: a plain weave, periodic, with fibre texture and yarn-to-yarn
  shade differences.
- ``moulding_compound``: dark matte epoxy of chip packages: fine isotropic grain,
  low-frequency mottling, sparse filler specks.
- ``solder_grain``: packed, blobby grains lit from one side.

and four defects, each touching only the pixels of its mask:

- ``scratch``: a thin curved line, brighter or darker, fading at its ends.
- ``dent``: a round depression, shaded by the same light as the surface.
- ``corrosion``: an irregular discoloured patch with pitted grain.
- ``foreign_object``: a fibre or particle lying on top, casting a small shadow.

Defect contrast is set relative to the surface's own texture contrast, so a
defect is visible but not trivially so on every surface.

:func:`make_image` draws the clean surface first and the defect after it from
the same generator, so ``make_surface`` on a generator in the same state
returns the image the defect was drawn on (tests rely on this).
:func:`write_dataset` writes a data set in MVTec layout (see
:mod:`linewatch.data.mvtec`).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict

from linewatch import __version__
from linewatch.data.corrupt import Corruption, apply_corruption, parse_corruption
from linewatch.data.images import write_image
from linewatch.errors import DataError

SURFACES = ("brushed_metal", "woven_fabric", "moulding_compound", "solder_grain")
DEFECTS = ("scratch", "dent", "corrosion", "foreign_object")
ILLUMINATIONS = ("strong", "low", "shadow")
MIN_SIZE, MAX_SIZE = 32, 4096

# Light falls from the upper left onto every surface; dents and grains are
# shaded with this direction so they look lit by the same lamp.
_LIGHT = np.array([-0.45, -0.55, 0.70], np.float32) / np.linalg.norm([-0.45, -0.55, 0.70])

_F32 = np.float32
Rng = np.random.Generator


# =========================================================================== noise


def _normalised(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit standard deviation (a flat field stays zero)."""
    x = x - x.mean()
    std = float(x.std())
    result: np.ndarray = x / std if std > 0 else x
    return result


def _white(rng: Rng, h: int, w: int) -> np.ndarray:
    return rng.standard_normal((h, w), dtype=_F32)


def _lowfreq(rng: Rng, h: int, w: int, scale: float) -> np.ndarray:
    """A smooth random field whose blobs are about ``scale`` pixels across; unit std.

    Made at low resolution and blurred there before upsampling, so it costs
    little at any size and shows no grid pattern.
    """
    gh = max(4, math.ceil(2 * h / scale) + 2)
    gw = max(4, math.ceil(2 * w / scale) + 2)
    grid = cv2.GaussianBlur(rng.standard_normal((gh, gw), dtype=_F32), (0, 0), 1.0)
    return _normalised(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC))


def _grain(rng: Rng, h: int, w: int, sigma: float) -> np.ndarray:
    """Isotropic fine grain: white noise blurred by ``sigma`` pixels; unit std."""
    return _normalised(cv2.GaussianBlur(_white(rng, h, w), (0, 0), sigma))


def _streaks(rng: Rng, h: int, w: int, length: int, across: float, vertical: bool) -> np.ndarray:
    """Anisotropic noise: long along one axis, ``across`` pixels wide; unit std."""
    noise = _white(rng, h, w)
    kernel = (1, length) if vertical else (length, 1)
    # Two box passes approximate a Gaussian along the streak at box-filter cost.
    noise = cv2.blur(cv2.blur(noise, kernel), kernel)
    if across > 0:
        sx, sy = (across, 0.01) if vertical else (0.01, across)
        noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=sx, sigmaY=sy)
    return _normalised(noise)


def _coords(h: int, w: int, x0: int = 0, y0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) of a window, as float32 grids."""
    ys = np.arange(y0, y0 + h, dtype=_F32)
    xs = np.arange(x0, x0 + w, dtype=_F32)
    return xs[None, :].repeat(h, 0), ys[:, None].repeat(w, 1)


# =========================================================================== surfaces


def _brushed_metal(rng: Rng, size: int) -> np.ndarray:
    fine = _streaks(rng, size, size, length=41, across=0.0, vertical=False)
    coarse = _streaks(rng, size, size, length=81, across=2.0, vertical=False)
    # The brushing direction is never quite square to the camera.
    angle = rng.normal(0.0, 1.5)
    turn = cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0)
    streaks = cv2.warpAffine(7.0 * fine + 5.0 * coarse, turn, (size, size),
                             flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    sheen = 10.0 * _lowfreq(rng, size, size, size * 0.6)
    return 150.0 + sheen + streaks + 2.0 * _white(rng, size, size)


def _woven_fabric(rng: Rng, size: int) -> np.ndarray:
    period = rng.uniform(9.0, 11.0)
    angle = rng.normal(0.0, 0.02)
    xx, yy = _coords(size, size)
    # Yarns are never perfectly straight: a gentle warp of the grid.
    bend_u = 0.8 * _lowfreq(rng, size, size, 48)
    bend_v = 0.8 * _lowfreq(rng, size, size, 48)
    ca, sa = math.cos(angle), math.sin(angle)
    u = (xx * ca + yy * sa + bend_u) / period + rng.random()
    v = (-xx * sa + yy * ca + bend_v) / period + rng.random()
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    # Plain weave: the warp yarn lies on top where column + row is even.
    warp_on_top = ((iu + iv) % 2) == 0
    across = np.where(warp_on_top, fu, fv)
    along = np.where(warp_on_top, fv, fu)
    yarn = np.sin(np.pi * across) ** 0.6  # rounded cross-section, dark gaps between yarns
    dive = 0.55 + 0.45 * np.sin(np.pi * along) ** 0.5  # darker where it dives under
    gains_u = rng.normal(1.0, 0.06, 512).astype(_F32)
    gains_v = rng.normal(1.0, 0.06, 512).astype(_F32)
    gain = np.where(warp_on_top, gains_u[iu.astype(np.int64) % 512],
                    gains_v[iv.astype(np.int64) % 512])
    fibre = np.where(warp_on_top,
                     _streaks(rng, size, size, 7, 0.0, vertical=True),
                     _streaks(rng, size, size, 7, 0.0, vertical=False))
    dye = 5.0 * _lowfreq(rng, size, size, size * 0.5)
    value = 45.0 + 150.0 * yarn * dive * gain + 9.0 * fibre * yarn + dye
    return value + 2.0 * _white(rng, size, size)


def _moulding_compound(rng: Rng, size: int) -> np.ndarray:
    grain = 6.0 * _grain(rng, size, size, 0.8)
    mottle = 4.0 * _lowfreq(rng, size, size, 40) + 3.0 * _lowfreq(rng, size, size, size * 0.5)
    # Silica filler breaking the surface shows as sparse, slightly brighter specks.
    strength = rng.uniform(40.0, 90.0, (size, size)).astype(_F32)
    specks = np.where(rng.random((size, size), dtype=_F32) < 0.003, strength, _F32(0.0))
    specks = cv2.GaussianBlur(specks, (0, 0), 0.7)
    return 78.0 + grain + mottle + specks + 1.5 * _white(rng, size, size)


def _solder_grain(rng: Rng, size: int) -> np.ndarray:
    spacing = rng.uniform(6.5, 8.0)
    n = math.ceil(size / spacing) + 1
    gy, gx = np.mgrid[0:n, 0:n].astype(_F32)
    jitter = rng.uniform(-0.35, 0.35, (2, n, n)).astype(_F32)
    cx = np.rint((gx + 0.5 + jitter[0]) * spacing - spacing / 2).astype(np.int64)
    cy = np.rint((gy + 0.5 + jitter[1]) * spacing - spacing / 2).astype(np.int64)
    inside = (cx >= 0) & (cx < size) & (cy >= 0) & (cy < size)
    seeds = np.ones((size, size), np.uint8)
    seeds[cy[inside], cx[inside]] = 0
    dist, labels = cv2.distanceTransformWithLabels(
        seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
    )
    radii = (rng.uniform(0.5, 0.72, int(labels.max()) + 1) * spacing).astype(_F32)
    r = radii[labels]
    cover = np.clip(1.0 - (dist / r) ** 2, 0.0, 1.0)
    height = r * np.sqrt(cover)
    shade, spec = _lit(height)
    occlusion = np.where(cover > 0, 0.55 + 0.45 * np.sqrt(cover), 0.35)
    micro = 4.0 * _grain(rng, size, size, 0.7)
    value = 25.0 + 150.0 * shade * occlusion + 70.0 * spec * (cover > 0) + micro
    return value + 2.0 * _white(rng, size, size)


def _lit(height: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lambertian shade and a specular highlight of a height map under :data:`_LIGHT`."""
    gx = cv2.Sobel(height, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    gy = cv2.Sobel(height, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    norm = np.sqrt(gx * gx + gy * gy + 1.0)
    lx, ly, lz = _LIGHT
    shade = np.clip((-gx * lx - gy * ly + lz) / norm, 0.0, 1.0)
    half = _LIGHT + np.array([0, 0, 1], _F32)
    hx, hy, hz = half / np.linalg.norm(half)
    spec = np.clip((-gx * hx - gy * hy + hz) / norm, 0.0, 1.0) ** 24
    return shade, spec


_SURFACE_MAKERS: dict[str, Callable[[Rng, int], np.ndarray]] = {
    "brushed_metal": _brushed_metal,
    "woven_fabric": _woven_fabric,
    "moulding_compound": _moulding_compound,
    "solder_grain": _solder_grain,
}


def make_surface(rng: np.random.Generator, surface: str, size: int) -> np.ndarray:
    """A defect-free ``size`` x ``size`` ``uint8`` image of ``surface``."""
    _check_surface(surface)
    _check_size(size)
    value = _SURFACE_MAKERS[surface](rng, size)
    out: np.ndarray = np.clip(np.rint(value), 0, 255).astype(np.uint8)
    return out


# =========================================================================== defects

# A defect renderer gets the clean image (float32) and its texture contrast,
# and returns the window it drew in, the new values of that window and the
# region it changed. Only region pixels are written back, so the mask is exact.
_Window = tuple[slice, slice]
_Drawn = tuple[_Window, np.ndarray, np.ndarray]


def _window(cx: float, cy: float, half: float, size: int) -> tuple[_Window, int, int]:
    """The square window of half-width ``half`` around (cx, cy), clipped to the image."""
    x0, x1 = max(0, int(cx - half)), min(size, math.ceil(cx + half) + 1)
    y0, y1 = max(0, int(cy - half)), min(size, math.ceil(cy + half) + 1)
    return (slice(y0, y1), slice(x0, x1)), x0, y0


def _bbox_window(points: np.ndarray, margin: float, size: int) -> tuple[_Window, int, int]:
    """The window around a set of (x, y) points plus ``margin``, clipped to the image."""
    lo = np.floor(points.min(axis=0) - margin).astype(int).clip(0, size)
    hi = np.ceil(points.max(axis=0) + margin + 1).astype(int).clip(0, size)
    return (slice(lo[1], hi[1]), slice(lo[0], hi[0])), int(lo[0]), int(lo[1])


def _bezier(control: np.ndarray, n: int) -> np.ndarray:
    """``n`` points along a Bézier curve with the given (k, 2) control points."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    k = len(control) - 1
    coeff = [math.comb(k, i) * t**i * (1 - t) ** (k - i) for i in range(k + 1)]
    result: np.ndarray = sum(c * p for c, p in zip(coeff, control, strict=True))
    return result


def _draw_curve(shape: tuple[int, int], points: np.ndarray, weights: np.ndarray,
                thickness: int) -> np.ndarray:
    """Anti-aliased curve through window-relative ``points``; coverage 0..1 times ``weights``."""
    canvas = np.zeros(shape, np.uint8)
    fixed = np.rint(points * 16).astype(np.int32)  # 4 fractional bits: sub-pixel positions
    for k in range(len(fixed) - 1):
        colour = round(255 * float(weights[k]))
        cv2.line(canvas, tuple(fixed[k]), tuple(fixed[k + 1]), colour, thickness,
                 cv2.LINE_AA, shift=4)
    result: np.ndarray = canvas.astype(_F32) / 255.0
    return result


def _scratch(rng: Rng, img: np.ndarray, contrast: float) -> _Drawn:
    size = img.shape[0]
    length = rng.uniform(0.2, 0.5) * size
    angle = rng.uniform(0.0, math.pi)
    centre = rng.uniform(0.3, 0.7, 2) * size
    along = np.array([math.cos(angle), math.sin(angle)]) * length / 2
    bend = np.array([-along[1], along[0]]) * rng.uniform(-0.5, 0.5)
    points = _bezier(np.stack([centre - along, centre + 2 * bend, centre + along]), 48)
    window, x0, y0 = _bbox_window(points, 4, size)
    patch = img[window]
    # Scratches fade in and out where the tool touched down and lifted off.
    t = np.linspace(0.0, 1.0, len(points) - 1)
    fade = np.clip(np.sin(np.pi * t) * 1.6, 0.0, 1.0) ** 0.7
    thickness = 1 if rng.random() < 0.6 else 2
    cover = _draw_curve(patch.shape, points - [x0, y0], fade, thickness)
    region = cover >= 0.25
    sign = 1.0 if rng.random() < 0.6 else -1.0
    new = patch + sign * rng.uniform(2.5, 3.5) * contrast * cover
    return window, new, region


def _dent(rng: Rng, img: np.ndarray, contrast: float) -> _Drawn:
    size = img.shape[0]
    radius = max(4.0, rng.uniform(0.035, 0.075) * size)
    aspect = rng.uniform(0.7, 1.0)
    theta = rng.uniform(0.0, math.pi)
    cx, cy = rng.uniform(radius + 2, size - radius - 2, 2)
    window, x0, y0 = _window(cx, cy, radius + 2, size)
    patch = img[window]
    xx, yy = _coords(patch.shape[0], patch.shape[1], x0, y0)
    dx, dy = xx - cx, yy - cy
    a = (dx * math.cos(theta) + dy * math.sin(theta)) / radius
    b = (-dx * math.sin(theta) + dy * math.cos(theta)) / (radius * aspect)
    s2 = a * a + b * b
    region = s2 < 0.92
    bowl = np.where(region, 1.0 - s2, 0.0).astype(_F32)
    # A shallow bowl: brightness follows the slope towards the light, so the
    # wall facing the lamp lights up and the far wall falls dark.
    depth = -(bowl**2)
    gx = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    relief = -(gx * _LIGHT[0] + gy * _LIGHT[1])
    relief /= max(float(np.abs(relief).max()), 1e-6)
    amplitude = rng.uniform(1.8, 2.6) * contrast
    # Pressed-in material loses some of its texture.
    smoothed = cv2.GaussianBlur(patch, (0, 0), 1.5)
    new = patch + 0.6 * bowl * (smoothed - patch) + amplitude * (relief - 0.2 * bowl)
    return window, new, region


def _corrosion(rng: Rng, img: np.ndarray, contrast: float) -> _Drawn:
    size = img.shape[0]
    radius = max(5.0, rng.uniform(0.06, 0.13) * size)
    cx, cy = rng.uniform(radius, size - radius, 2)
    window, x0, y0 = _window(cx, cy, radius * 1.35, size)
    patch = img[window]
    h, w = patch.shape
    xx, yy = _coords(h, w, x0, y0)
    dist = np.hypot(xx - cx, yy - cy) / radius
    score = (1.0 - dist) + 0.4 * _lowfreq(rng, h, w, radius / 2.5)
    region = (score > 0.25) | (dist < 0.25)
    cover = np.where(region, np.clip((score - 0.25) / 0.3, 0.35, 1.0), 0.0)
    # Pits: sparse dark spots inside the patch.
    pits = cv2.GaussianBlur((rng.random((h, w), dtype=_F32) < 0.04).astype(_F32), (0, 0), 0.8)
    grain = _grain(rng, h, w, 0.9)
    shift = rng.uniform(1.5, 2.5) * contrast * (1.0 if rng.random() < 0.75 else -0.8)
    target = float(patch.mean()) - shift + 0.8 * contrast * grain - 4.0 * contrast * pits
    new = patch + 0.75 * cover * (target - patch)
    return window, new, region


def _foreign_object(rng: Rng, img: np.ndarray, contrast: float) -> _Drawn:
    size = img.shape[0]
    if rng.random() < 0.5:
        window, cover, tone = _fibre(rng, size, contrast)
    else:
        window, cover, tone = _particle(rng, size, contrast)
    patch = img[window]
    h, w = patch.shape
    colour = np.clip(float(patch.mean()) + tone, 10.0, 245.0) + 0.3 * contrast * _grain(
        rng, h, w, 0.7
    )
    # The object lies on the surface and shadows it slightly away from the light.
    offset = np.array([[1, 0, 1.5], [0, 1, 1.5]], _F32)
    shadow = cv2.warpAffine(cover, offset, (w, h))
    shadow = cv2.GaussianBlur(shadow, (0, 0), 1.0)
    region = (cover >= 0.2) | (shadow >= 0.25)
    shaded = patch * (1.0 - 0.3 * shadow)
    new = shaded + cover * (colour - shaded)
    return window, new, region


def _fibre(rng: Rng, size: int, contrast: float) -> tuple[_Window, np.ndarray, float]:
    length = rng.uniform(0.15, 0.35) * size
    start = rng.uniform(0.2, 0.8, 2) * size
    angle = rng.uniform(0.0, 2 * math.pi)
    end = start + length * np.array([math.cos(angle), math.sin(angle)])
    wobble = rng.normal(0.0, 0.25 * length, (2, 2))
    control = np.stack([start, start + (end - start) / 3 + wobble[0],
                        start + 2 * (end - start) / 3 + wobble[1], end])
    points = _bezier(control, 64)
    window, x0, y0 = _bbox_window(points, 5, size)
    shape = (window[0].stop - window[0].start, window[1].stop - window[1].start)
    thickness = int(rng.integers(1, 3))
    cover = _draw_curve(shape, points - [x0, y0], np.ones(len(points)), thickness)
    tone = rng.uniform(3.0, 4.5) * contrast * (1.0 if rng.random() < 0.5 else -1.0)
    return window, cover, tone


def _particle(rng: Rng, size: int, contrast: float) -> tuple[_Window, np.ndarray, float]:
    radius = max(2.5, rng.uniform(0.012, 0.03) * size)
    cx, cy = rng.uniform(radius + 4, size - radius - 4, 2)
    window, x0, y0 = _window(cx, cy, radius * 1.5 + 4, size)
    shape = (window[0].stop - window[0].start, window[1].stop - window[1].start)
    # An irregular outline: radius varying smoothly around the centre.
    angles = np.linspace(0.0, 2 * math.pi, 14, endpoint=False)
    wobble = np.clip(1.0 + 0.3 * rng.standard_normal(14), 0.5, 1.5)
    outline = np.stack([cx - x0 + radius * wobble * np.cos(angles),
                        cy - y0 + radius * wobble * np.sin(angles)], axis=1)
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [np.rint(outline * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    cover = canvas.astype(_F32) / 255.0
    tone = rng.uniform(3.0, 4.5) * contrast * (1.0 if rng.random() < 0.4 else -1.0)
    return window, cover, tone


_DEFECT_MAKERS: dict[str, Callable[[Rng, np.ndarray, float], _Drawn]] = {
    "scratch": _scratch,
    "dent": _dent,
    "corrosion": _corrosion,
    "foreign_object": _foreign_object,
}


def add_defect(
    rng: np.random.Generator, clean: np.ndarray, defect: str
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``defect`` onto a copy of the ``uint8`` image ``clean``; return it and its mask.

    The mask is True exactly where the defect was drawn; every pixel outside it
    equals ``clean``.
    """
    if defect not in _DEFECT_MAKERS:
        raise DataError(f"unknown defect {defect!r}; expected one of {', '.join(DEFECTS)}")
    contrast = _defect_contrast(clean)
    window, new, region = _DEFECT_MAKERS[defect](rng, clean.astype(_F32), contrast)
    image = clean.copy()
    mask = np.zeros(clean.shape, bool)
    image[window][region] = np.clip(np.rint(new[region]), 0, 255).astype(np.uint8)
    mask[window] = region
    return image, mask


def _defect_contrast(clean: np.ndarray) -> float:
    """The grey-level unit of a defect's contrast on this surface.

    Grows with the texture's own contrast, since a busy texture hides a faint
    defect, but less than in proportion, so defects on high-contrast textures
    are not glaring; floored so defects on flat surfaces stay visible.
    """
    return max(10.0, 12.0 * (float(clean.std()) / 12.0) ** 0.6)


def make_image(
    rng: np.random.Generator, surface: str, size: int, defect: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """A ``uint8`` ``size`` x ``size`` image of ``surface`` and its boolean defect mask.

    With ``defect=None`` the mask is all False. The surface is drawn from
    ``rng`` first, the defect after, so the clean surface under a defect can be
    recreated with :func:`make_surface` from the same generator state.
    """
    if defect is not None and defect not in DEFECTS:
        raise DataError(f"unknown defect {defect!r}; expected one of {', '.join(DEFECTS)}")
    clean = make_surface(rng, surface, size)
    if defect is None:
        return clean, np.zeros(clean.shape, bool)
    return add_defect(rng, clean, defect)


def _check_surface(surface: str) -> None:
    if surface not in _SURFACE_MAKERS:
        raise DataError(f"unknown surface {surface!r}; expected one of {', '.join(SURFACES)}")


def _check_size(size: int) -> None:
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise DataError(f"image size {size} out of range {MIN_SIZE}..{MAX_SIZE}")


# =========================================================================== data sets

# First line of every README we write; --force only replaces folders carrying it.
_README_TITLE = "# Synthetic {surface} surfaces (written by linewatch synth)"
_README_MARK = "(written by linewatch synth)"
_GENERATED = ("train", "val", "test", "ground_truth", "README.md", "split.csv")
_EVAL_SPLITS = ("val", "test")


class SynthSummary(BaseModel):
    """What :func:`write_dataset` wrote."""

    model_config = ConfigDict(frozen=True)

    out: Path
    surfaces: tuple[str, ...]
    counts: dict[str, dict[str, int]]  # split -> label -> images, for each surface
    images: int  # over all surfaces
    masks: int


class _Item(BaseModel):
    """One image to write: where, and the generator key that makes it."""

    split: str
    label: str
    index: int
    stem: str


def plan_counts(n_good: int, n_defect: int) -> dict[str, dict[str, int]]:
    """Images per split and label for one surface.

    ``n_good`` defect-free training images; val and test each get a third as
    many good images (at least one) and ``n_defect`` of every defect type.
    """
    n_eval_good = max(1, math.ceil(n_good / 3))
    counts = {"train": {"good": n_good}}
    for split in _EVAL_SPLITS:
        counts[split] = {"good": n_eval_good} | {d: n_defect for d in DEFECTS if n_defect}
    return counts


def write_dataset(
    out: Path,
    *,
    seed: int = 0,
    size: int = 256,
    n_good: int = 60,
    n_defect: int = 5,
    surface: str = "brushed_metal",
    illumination: str | None = None,
    snp_density: float = 0.0,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SynthSummary:
    """Write a synthetic data set in MVTec layout with a val split; see :mod:`.mvtec`.

    ``surface="all"`` writes one data set per surface under ``out/<surface>/``.
    ``illumination`` (``strong``, ``low``, ``shadow``) and ``snp_density``
    corrupt the val and test images only; training images stay clean. The
    same arguments always give byte-identical files. ``out`` must be empty
    unless ``overwrite``, which replaces only a data set this function wrote.
    ``progress(done, total)`` is called after each image.
    """
    surfaces = SURFACES if surface == "all" else (surface,)
    for name in surfaces:
        _check_surface(name)
    _check_size(size)
    if n_good < 1 or n_defect < 0:
        raise DataError(f"need n_good >= 1 and n_defect >= 0, got {n_good} and {n_defect}")
    corruptions = _corruptions(illumination, snp_density)
    targets = [out / name for name in surfaces] if surface == "all" else [out]
    _prepare_out(out, overwrite)
    counts = plan_counts(n_good, n_defect)
    items = _items(counts)
    total, done, masks = len(items) * len(surfaces), 0, 0
    for name, target in zip(surfaces, targets, strict=True):
        for item in items:
            masks += _write_item(target, item, seed, name, size, corruptions)
            done += 1
            if progress:
                progress(done, total)
        _write_split_csv(target, items)
        _write_readme(target, name, counts, seed, size, illumination, snp_density)
    return SynthSummary(out=out, surfaces=surfaces, counts=counts, images=total, masks=masks)


def _corruptions(illumination: str | None, snp_density: float) -> list[Corruption]:
    """The corruptions for val/test, lighting first (it acts before the sensor's noise)."""
    found = []
    if illumination is not None:
        if illumination not in ILLUMINATIONS:
            raise DataError(f"unknown illumination {illumination!r}; "
                            f"expected one of {', '.join(ILLUMINATIONS)}")
        spec = "shadow" if illumination == "shadow" else f"light:{illumination}"
        found.append(parse_corruption(spec))
    if not 0.0 <= snp_density <= 1.0:
        raise DataError(f"salt-and-pepper density {snp_density:g} out of range 0..1")
    if snp_density:
        found.append(parse_corruption(f"snp:{snp_density}"))
    return found


def _items(counts: dict[str, dict[str, int]]) -> list[_Item]:
    """Every image of one surface's set; stems are unique per label across splits."""
    items = []
    for split, labels in counts.items():
        for label, n in labels.items():
            width = max(3, len(str(n - 1)))
            items += [_Item(split=split, label=label, index=i, stem=f"{split}_{i:0{width}d}")
                      for i in range(n)]
    return items


def _write_item(
    target: Path, item: _Item, seed: int, surface: str, size: int, corruptions: list[Corruption]
) -> int:
    """Make and write one image (and its mask); return the number of masks written."""
    # Each image has its own generator keyed by what it is, so an image does
    # not change when the counts of others do.
    key = [seed, SURFACES.index(surface), ("train", *_EVAL_SPLITS).index(item.split),
           ("good", *DEFECTS).index(item.label), item.index]
    rng = np.random.default_rng(key)
    defect = None if item.label == "good" else item.label
    image, mask = make_image(rng, surface, size, defect)
    if item.split in _EVAL_SPLITS:
        for corruption in corruptions:
            image = apply_corruption(image, corruption, rng)
    write_image(target / item.split / item.label / f"{item.stem}.png", image)
    if defect is None:
        return 0
    write_image(target / "ground_truth" / item.label / f"{item.stem}_mask.png", mask)
    return 1


def _write_split_csv(target: Path, items: list[_Item]) -> None:
    lines = ["image,split,label,mask"]
    for item in items:
        mask = "" if item.label == "good" else f"ground_truth/{item.label}/{item.stem}_mask.png"
        lines.append(f"{item.split}/{item.label}/{item.stem}.png,{item.split},{item.label},{mask}")
    (target / "split.csv").write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")


def _write_readme(
    target: Path, surface: str, counts: dict[str, dict[str, int]], seed: int, size: int,
    illumination: str | None, snp_density: float,
) -> None:
    labels = ("good", *DEFECTS)
    table = ["| split | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for split, row in counts.items():
        cells = [str(row[label]) if label in row else "-" for label in labels]
        table.append(f"| {split} | " + " | ".join(cells) + " |")
    n_defect = counts["val"].get(DEFECTS[0], 0)
    command = (f"linewatch synth OUT --seed {seed} --size {size} --n-good {counts['train']['good']}"
               f" --n-defect {n_defect} --surface {surface}")
    if illumination:
        command += f" --illumination {illumination}"
    if snp_density:
        command += f" --snp {snp_density:g}"
    corrupted = ", ".join(filter(None, [
        f"{illumination} illumination" if illumination else "",
        f"salt-and-pepper noise at density {snp_density:g}" if snp_density else "",
    ])) or "none"
    text = f"""{_README_TITLE.format(surface=surface)}

{size}x{size} 8-bit grayscale images of a synthetic {surface.replace("_", " ")} surface
with pixel-exact defect masks, made by linewatch {__version__} from seed {seed}.
The same command with the same linewatch version writes byte-identical files:

    {command}

Laid out like MVTec AD, plus a validation split for threshold calibration:

{chr(10).join(table)}

- `train/good/*.png`: defect-free images, the only training input.
- `val/<label>/*.png`, `test/<label>/*.png`: `good` or a defect type.
- `ground_truth/<defect>/<stem>_mask.png`: binary masks (0 / 255) for every
  defective image, same size as the image; nonzero exactly where the defect
  changed the surface.
- `split.csv`: one row per image: path, split, label, mask path.

Corruption of val and test (train stays clean): {corrupted}.
Calibrate thresholds on `val`, report on `test`, never train on either.
"""
    (target / "README.md").write_text(text, encoding="utf-8", newline="\n")


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out``; with ``overwrite``, delete what synth wrote there before.

    ``out`` may hold a single-surface set and/or per-surface sets (from
    ``surface="all"``); nothing is deleted unless every one of them carries our
    README, and files we never write are left alone.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise DataError(f"{out}: folder is not empty; choose an empty one, or force overwrite "
                        "(--force) to replace a data set linewatch synth wrote there")
    sets = [p for p in (out / name for name in SURFACES) if p.exists()]
    if (out / "README.md").exists() or not sets:
        sets.append(out)
    for folder in sets:
        if not _is_synth_set(folder):
            raise DataError(f"{folder}: not a data set written by linewatch synth; "
                            "refusing to overwrite it")
    for folder in sets:
        for name in _GENERATED:
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        if folder != out and not any(folder.iterdir()):
            folder.rmdir()


def _is_synth_set(folder: Path) -> bool:
    """True when ``folder`` holds a README whose title line says linewatch synth wrote it."""
    readme = folder / "README.md"
    if not readme.is_file():
        return False
    with readme.open(encoding="utf-8", errors="replace") as f:
        return _README_MARK in f.readline()
