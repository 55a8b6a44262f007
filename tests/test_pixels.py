"""Camera pixel formats to model pixels, checked against OpenCV and against known colours."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from linewatch.acquisition.pixels import SUPPORTED_FORMATS, to_model_pixels
from linewatch.errors import DataError

H, W = 6, 10


def _random(shape: tuple[int, ...], dtype: type[np.generic], bits: int = 8) -> np.ndarray:
    rng = np.random.default_rng(sum(shape) + bits)
    return rng.integers(0, 2**bits, size=shape, dtype=dtype)


def _flat_rows(image: np.ndarray) -> np.ndarray:
    """How a camera buffer arrives: H rows of W·C components."""
    return image.reshape(image.shape[0], -1)


def test_mono8_is_copied_unchanged() -> None:
    raw = _random((H, W), np.uint8)
    out = to_model_pixels(raw, "Mono8")
    assert out.dtype == np.uint8 and out.shape == (H, W)
    assert np.array_equal(out, raw)
    assert not np.shares_memory(out, raw)


@pytest.mark.parametrize("bits", [10, 12, 14, 16])
def test_deep_mono_fills_16_bits(bits: int) -> None:
    raw = _random((H, W), np.uint16, bits)
    raw[0, 0] = 2**bits - 1  # the brightest value must map to the top of the 16-bit range
    out = to_model_pixels(raw, f"Mono{bits}")
    expected = (raw.astype(np.uint32) << (16 - bits)).astype(np.uint16)
    assert out.dtype == np.uint16 and np.array_equal(out, expected)
    assert out[0, 0] >> (16 - bits) == 2**bits - 1
    assert not np.shares_memory(out, raw)


def test_rgb8_from_flat_rows() -> None:
    rgb = _random((H, W, 3), np.uint8)
    out = to_model_pixels(_flat_rows(rgb), "RGB8")
    assert out.shape == (H, W, 3) and np.array_equal(out, rgb)
    assert not np.shares_memory(out, rgb)


def test_bgr8_matches_opencv() -> None:
    bgr = _random((H, W, 3), np.uint8)
    out = to_model_pixels(_flat_rows(bgr), "BGR8")
    assert np.array_equal(out, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    assert out.flags.c_contiguous


@pytest.mark.parametrize(("fmt", "code"), [("RGBa8", cv2.COLOR_RGBA2RGB),
                                           ("BGRa8", cv2.COLOR_BGRA2RGB)])
def test_alpha_formats_match_opencv(fmt: str, code: int) -> None:
    four = _random((H, W, 4), np.uint8)
    out = to_model_pixels(_flat_rows(four), fmt)
    assert out.shape == (H, W, 3) and np.array_equal(out, cv2.cvtColor(four, code))
    assert out.flags.c_contiguous and not np.shares_memory(out, four)


@pytest.mark.parametrize("fmt", ["RGB12", "BGR10", "RGBa12", "BGRa16"])
def test_deep_colour_formats(fmt: str) -> None:
    bits = int(fmt.lstrip("RGBa"))
    channels = 4 if "a" in fmt else 3
    raw = _random((H, W, channels), np.uint16, bits)
    out = to_model_pixels(raw, fmt)
    rgb = raw[:, :, 2::-1] if fmt.startswith("BGR") else raw[:, :, :3]
    assert out.dtype == np.uint16 and np.array_equal(out, rgb.astype(np.uint32) << (16 - bits))


# GenICam names the colour of the top-left pixel first: BayerRG = R G / G B.
_PATTERNS = {"RG": "RGGB", "BG": "BGGR", "GB": "GBRG", "GR": "GRBG"}
# OpenCV names the same patterns differently; the module maps them.
_OPENCV = {"RG": cv2.COLOR_BayerBG2RGB, "BG": cv2.COLOR_BayerRG2RGB,
           "GB": cv2.COLOR_BayerGR2RGB, "GR": cv2.COLOR_BayerGB2RGB}


def _mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """What a Bayer sensor records of ``rgb``: one colour per pixel, in ``pattern``."""
    out = np.zeros(rgb.shape[:2], rgb.dtype)
    channel = {"R": 0, "G": 1, "B": 2}
    for k, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        out[dy::2, dx::2] = rgb[dy::2, dx::2, channel[pattern[k]]]
    return out


@pytest.mark.parametrize("pattern", sorted(_PATTERNS))
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_bayer_recovers_the_scene_colour(pattern: str, bits: int) -> None:
    dtype = np.uint8 if bits == 8 else np.uint16
    colour = np.array([0.8, 0.4, 0.1]) * (2**bits - 1)
    scene = np.broadcast_to(colour.astype(dtype), (32, 32, 3))
    out = to_model_pixels(_mosaic(scene, _PATTERNS[pattern]), f"Bayer{pattern}{bits}")
    assert out.shape == (32, 32, 3) and out.dtype == dtype
    expected = colour * (2 ** (16 - bits) if bits not in (8, 16) else 1)
    inner = out[2:-2, 2:-2].reshape(-1, 3).astype(float)
    assert np.abs(inner - expected).max() <= 2 ** (16 - bits if bits != 8 else 0)


@pytest.mark.parametrize("pattern", sorted(_PATTERNS))
def test_bayer8_matches_opencv_demosaic(pattern: str) -> None:
    raw = _random((H, W), np.uint8)
    out = to_model_pixels(raw, f"Bayer{pattern}8")
    assert np.array_equal(out, cv2.cvtColor(raw, _OPENCV[pattern]))


def test_row_padding_is_cut() -> None:
    rgb = _random((H, W, 3), np.uint8)
    padded = np.concatenate([_flat_rows(rgb), np.full((H, 4), 7, np.uint8)], axis=1)
    assert np.array_equal(to_model_pixels(padded, "RGB8", width=W), rgb)


@pytest.mark.parametrize("fmt", SUPPORTED_FORMATS)
def test_every_supported_format_gives_an_owned_model_image(fmt: str) -> None:
    deep = not fmt.endswith("8")
    channels = 4 if "a" in fmt[3:5] else 3 if fmt[:3] in ("RGB", "BGR") else 1
    raw = _random((H, W * channels), np.uint16 if deep else np.uint8, 10 if deep else 8)
    out = to_model_pixels(raw, fmt)
    assert out.dtype == (np.uint16 if deep else np.uint8)
    assert out.shape == ((H, W) if fmt.startswith("Mono") else (H, W, 3))
    assert out.flags.c_contiguous and not np.shares_memory(out, raw)


@pytest.mark.parametrize("fmt", ["YUV422_8", "Mono12p", "Mono10Packed", "mono8", ""])
def test_unsupported_format_is_named(fmt: str) -> None:
    with pytest.raises(DataError, match=f"pixel format '{fmt}' is not supported"):
        to_model_pixels(np.zeros((H, W), np.uint8), fmt)


def test_wrong_dtype_or_shape_is_refused() -> None:
    with pytest.raises(DataError, match="expected uint16"):
        to_model_pixels(np.zeros((H, W), np.uint8), "Mono12")
    with pytest.raises(DataError, match="3-component"):
        to_model_pixels(np.zeros((H, W * 3 + 1), np.uint8), "RGB8")
    with pytest.raises(DataError, match="expected 4 channels"):
        to_model_pixels(np.zeros((H, W, 3), np.uint8), "RGBa8")
