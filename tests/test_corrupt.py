"""Test-time corruptions: parsing, and that each keeps the image's dtype and shape."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import linewatch.data.corrupt
from linewatch.data.corrupt import Corruption, apply_corruption, parse_corruption
from linewatch.errors import DataError

KINDS = ["snp:0.2", "light:strong", "light:low", "shadow"]


def _image(dtype: type, rgb: bool) -> np.ndarray:
    full = np.iinfo(dtype).max
    ramp = np.linspace(0.2, 0.7, 64 * 48).reshape(48, 64)
    img: np.ndarray = np.rint(ramp * full).astype(dtype)
    return np.stack([img, img // 2, img // 3], axis=2) if rgb else img


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("snp:0.25", Corruption(kind="snp", density=0.25)),
        ("snp:0", Corruption(kind="snp", density=0.0)),
        (" SNP:1 ", Corruption(kind="snp", density=1.0)),
        ("light:strong", Corruption(kind="light:strong")),
        ("Light:Low", Corruption(kind="light:low")),
        ("shadow", Corruption(kind="shadow")),
    ],
)
def test_parse_valid(text: str, expected: Corruption) -> None:
    assert parse_corruption(text) == expected
    assert parse_corruption(str(expected)) == expected


@pytest.mark.parametrize(
    "text", ["", "snp", "snp:", "snp:abc", "snp:-0.1", "snp:1.5", "snp:nan", "light", "light:dim",
             "shadow:2", "fog"],
)
def test_parse_invalid_lists_valid_forms(text: str) -> None:
    with pytest.raises(DataError, match=r"valid forms: snp:<density 0\.\.1>, light:strong, "
                                        r"light:low, shadow"):
        parse_corruption(text)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("rgb", [False, True])
def test_keeps_dtype_and_shape_and_changes_image(kind: str, dtype: type, rgb: bool) -> None:
    img = _image(dtype, rgb)
    before = img.copy()
    out = apply_corruption(img, parse_corruption(kind), np.random.default_rng(0))
    assert out.dtype == img.dtype and out.shape == img.shape
    assert not np.array_equal(out, img)
    np.testing.assert_array_equal(img, before)  # input untouched


@pytest.mark.parametrize("density", [0.05, 0.25, 0.5])
def test_snp_density_is_close_to_asked(density: float) -> None:
    img = np.full((200, 300, 3), 128, np.uint8)
    out = apply_corruption(img, parse_corruption(f"snp:{density}"), np.random.default_rng(1))
    salt = (out == 255).all(axis=2)
    pepper = (out == 0).all(axis=2)
    assert abs((salt | pepper).mean() - density) < 0.01
    assert abs(salt.mean() - pepper.mean()) < 0.01
    # Every channel of a pixel is hit alike: no coloured noise.
    touched = (out != 128).any(axis=2)
    np.testing.assert_array_equal(touched, salt | pepper)


def test_snp_16bit_uses_full_scale() -> None:
    out = apply_corruption(np.full((50, 50), 1000, np.uint16), parse_corruption("snp:0.5"),
                           np.random.default_rng(2))
    assert set(np.unique(out)) == {0, 1000, 65535}


def test_strong_light_brightens_and_clips() -> None:
    img = _image(np.uint8, False)
    out = apply_corruption(img, parse_corruption("light:strong"), np.random.default_rng(3))
    assert out.mean() > img.mean() * 1.2
    assert (out[img >= 200] == 255).all()


def test_low_light_darkens_with_noise() -> None:
    img = np.full((100, 100), 40000, np.uint16)
    out = apply_corruption(img, parse_corruption("light:low"), np.random.default_rng(4))
    assert out.mean() < 0.4 * 40000
    assert out.std() > 0  # shot noise on a flat input


def test_shadow_darkens_part_only() -> None:
    img = np.full((128, 128), 200, np.uint8)
    out = apply_corruption(img, parse_corruption("shadow"), np.random.default_rng(5))
    assert (out <= img).all()
    dark = out < 200
    assert 0.05 < dark.mean() < 0.8
    assert out.min() < 130  # the band is clearly darker, not a faint tint


def test_same_rng_same_result() -> None:
    img = _image(np.uint8, True)
    for kind in KINDS:
        a = apply_corruption(img, parse_corruption(kind), np.random.default_rng(9))
        b = apply_corruption(img, parse_corruption(kind), np.random.default_rng(9))
        np.testing.assert_array_equal(a, b)


def test_float_image_is_refused() -> None:
    with pytest.raises(DataError, match="float32"):
        apply_corruption(np.zeros((4, 4), np.float32), parse_corruption("shadow"),
                         np.random.default_rng(0))


def test_docstring_examples() -> None:
    assert doctest.testmod(linewatch.data.corrupt).failed == 0
