"""Test-time corruptions: salt-and-pepper noise and the lighting faults of a real line.

Used to measure how a model holds up when the line's lighting drifts
(``evaluate --corrupt KIND``) and to write corrupted val/test splits of a
synthetic data set. Text forms, as given on the command line:

- ``snp:<density>``: salt-and-pepper noise; ``density`` in 0..1 is the share of
  pixels replaced, half by white, half by black.
- ``light:strong``: overexposure: gain and offset, clipped at white.
- ``light:low``: underexposure with the photon shot noise a dim image carries.
- ``shadow``: a soft-edged dark band across part of the image, as cast by a
  bar or a robot arm between lamp and part.

>>> parse_corruption("snp:0.25")
Corruption(kind='snp', density=0.25)
>>> str(parse_corruption(" Light:Strong "))
'light:strong'
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from linewatch.errors import DataError

CorruptionKind = Literal["snp", "light:strong", "light:low", "shadow"]
VALID_FORMS = ("snp:<density 0..1>", "light:strong", "light:low", "shadow")

# Sensor model of low light: electrons at full scale (a small-pixel industrial
# sensor) and read noise in electrons; together they set the noise a dim
# image shows.
_FULL_WELL_E = 1000.0
_READ_NOISE_E = 3.0


class Corruption(BaseModel):
    """A parsed corruption; ``str()`` gives back its canonical text form."""

    model_config = ConfigDict(frozen=True)

    kind: CorruptionKind
    density: float = Field(0.0, ge=0.0, le=1.0, description="salt-and-pepper share of pixels")

    def __str__(self) -> str:
        return f"snp:{self.density:g}" if self.kind == "snp" else self.kind


def parse_corruption(text: str) -> Corruption:
    """Parse ``snp:<density>``, ``light:strong``, ``light:low`` or ``shadow``.

    A malformed string raises :class:`DataError` listing the valid forms.
    """
    spec = text.strip().lower()
    if spec in ("light:strong", "light:low", "shadow"):
        return Corruption.model_validate({"kind": spec})
    if spec.startswith("snp:"):
        try:
            density = float(spec.removeprefix("snp:"))
        except ValueError:
            density = -1.0
        if 0.0 <= density <= 1.0:
            return Corruption(kind="snp", density=density)
    raise DataError(f"bad corruption {text!r}; valid forms: {', '.join(VALID_FORMS)}")


def apply_corruption(
    img: np.ndarray, corruption: Corruption, rng: np.random.Generator
) -> np.ndarray:
    """A corrupted copy of ``img``: same shape and dtype (``uint8``/``uint16``, gray or RGB).

    Parameters that a real fault varies (gain, band position) are drawn from
    ``rng``, so a seeded generator gives a reproducible corruption.
    """
    if img.dtype not in (np.uint8, np.uint16):
        raise DataError(f"cannot corrupt a {img.dtype} image; expected uint8 or uint16")
    full = float(np.iinfo(img.dtype).max)
    if corruption.kind == "snp":
        return _salt_and_pepper(img, corruption.density, rng, full)
    x = img.astype(np.float32) / full
    if corruption.kind == "light:strong":
        x = _overexpose(x, rng)
    elif corruption.kind == "light:low":
        x = _underexpose(x, rng)
    else:
        x = _shadow(x, rng)
    out: np.ndarray = np.rint(np.clip(x, 0.0, 1.0) * full).astype(img.dtype)
    return out


def _salt_and_pepper(
    img: np.ndarray, density: float, rng: np.random.Generator, full: float
) -> np.ndarray:
    """Replace a ``density`` share of pixels (all channels alike) by white or black."""
    hit = rng.random(img.shape[:2]) < density
    salt = rng.random(img.shape[:2]) < 0.5
    out = img.copy()
    out[hit & salt] = full
    out[hit & ~salt] = 0
    return out


def _overexpose(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Too much light: gain 1.2-1.4 and an offset, so the brightest parts clip at white."""
    gain = rng.uniform(1.2, 1.4)
    offset = rng.uniform(0.03, 0.08)
    result: np.ndarray = x * gain + offset
    return result


def _underexpose(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Too little light: gain 0.2-0.35, then Poisson shot noise and read noise of the sensor."""
    gain = rng.uniform(0.2, 0.35)
    electrons = rng.poisson(x * gain * _FULL_WELL_E).astype(np.float32)
    electrons += rng.normal(0.0, _READ_NOISE_E, x.shape).astype(np.float32)
    result: np.ndarray = electrons / _FULL_WELL_E
    return result


def _shadow(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A dark band at a random angle, 15-40 % of the image wide, with soft penumbra edges."""
    h, w = x.shape[:2]
    angle = rng.uniform(0.0, np.pi)
    nx, ny = np.cos(angle), np.sin(angle)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    diag = float(np.hypot(h, w))
    # Signed distance from the band's centre line, in units of the image diagonal.
    dist = ((xx - w / 2) * nx + (yy - h / 2) * ny) / diag + rng.uniform(-0.25, 0.25)
    half_width = rng.uniform(0.075, 0.2)
    penumbra = rng.uniform(0.03, 0.08)
    # 1 inside the band, 0 outside, a smoothstep across the penumbra.
    t = np.clip((half_width + penumbra - np.abs(dist)) / penumbra, 0.0, 1.0)
    inside = t * t * (3.0 - 2.0 * t)
    depth = rng.uniform(0.4, 0.65)
    attenuation = (1.0 - depth * inside).astype(np.float32)
    if x.ndim == 3:
        attenuation = attenuation[:, :, None]
    result: np.ndarray = x * attenuation
    return result
