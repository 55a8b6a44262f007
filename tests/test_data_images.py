"""Image files in, arrays out: formats, bit depths, channel order, and errors naming the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch.data.images import is_image_file, read_image, read_mask, write_image
from linewatch.errors import DataError


def _encode(path: Path, bgr_or_gray: np.ndarray) -> None:
    ok, buf = cv2.imencode(path.suffix, bgr_or_gray)
    assert ok
    path.write_bytes(buf.tobytes())


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_gray_8bit_roundtrips_exactly(tmp_path: Path, suffix: str) -> None:
    gray = np.arange(12 * 7, dtype=np.uint8).reshape(12, 7) * 3
    _encode(tmp_path / f"g{suffix}", gray)
    out = read_image(tmp_path / f"g{suffix}")
    assert out.dtype == np.uint8 and out.shape == (12, 7)
    np.testing.assert_array_equal(out, gray)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_keeps_full_range(tmp_path: Path, suffix: str) -> None:
    gray = np.array([[0, 1, 256], [4095, 40000, 65535]], dtype=np.uint16)
    _encode(tmp_path / f"d{suffix}", gray)
    out = read_image(tmp_path / f"d{suffix}")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, gray)


def test_colour_comes_back_in_rgb_order(tmp_path: Path) -> None:
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR order
    _encode(tmp_path / "red.png", bgr)
    out = read_image(tmp_path / "red.png")
    assert out.shape == (4, 5, 3)
    assert (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()


def test_16bit_rgba_drops_alpha(tmp_path: Path) -> None:
    bgra = np.zeros((3, 3, 4), np.uint16)
    bgra[..., 0] = 1000  # blue
    bgra[..., 3] = 65535
    _encode(tmp_path / "a.png", bgra)
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint16 and out.shape == (3, 3, 3)
    assert (out[..., 2] == 1000).all() and (out[..., :2] == 0).all()


def test_jpeg_gray_reads_as_2d(tmp_path: Path) -> None:
    _encode(tmp_path / "j.jpg", np.full((16, 16), 90, np.uint8))
    out = read_image(tmp_path / "j.jpg")
    assert out.shape == (16, 16) and abs(int(out.mean()) - 90) <= 1


def test_odd_path_characters(tmp_path: Path) -> None:
    path = tmp_path / "Prüfung Linie 3 #1" / "bild ü.png"
    write_image(path, np.full((5, 5), 7, np.uint8))
    assert read_image(path)[0, 0] == 7


def test_write_image_rgb_and_bool(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 65535, (6, 8, 3), dtype=np.uint16)
    write_image(tmp_path / "x" / "rgb.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "x" / "rgb.png"), rgb)
    mask = np.eye(4, dtype=bool)
    write_image(tmp_path / "m.png", mask)
    assert set(np.unique(read_image(tmp_path / "m.png"))) == {0, 255}
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", (4, 4)), mask)
    assert not list(tmp_path.rglob(".*.tmp"))


def test_write_image_rejects_float(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"f\.png"):
        write_image(tmp_path / "f.png", np.zeros((2, 2), np.float32))


def test_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.png: no such file"):
        read_image(tmp_path / "nope.png")


def test_empty_file_names_path(tmp_path: Path) -> None:
    (tmp_path / "e.png").touch()
    with pytest.raises(DataError, match=r"e\.png: empty file"):
        read_image(tmp_path / "e.png")


def test_corrupt_bytes_names_path(tmp_path: Path) -> None:
    (tmp_path / "c.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.raises(DataError, match=r"c\.jpg: cannot decode"):
        read_image(tmp_path / "c.jpg")


def test_truncated_png_is_an_error(tmp_path: Path) -> None:
    ok, buf = cv2.imencode(".png", np.random.default_rng(1).integers(0, 255, (64, 64), np.uint8))
    assert ok
    (tmp_path / "t.png").write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(DataError, match=r"t\.png"):
        read_image(tmp_path / "t.png")


def test_folder_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "d.png").mkdir()
    with pytest.raises(DataError, match="folder"):
        read_image(tmp_path / "d.png")
    assert not is_image_file(tmp_path / "d.png")


def test_mask_size_mismatch(tmp_path: Path) -> None:
    write_image(tmp_path / "m.png", np.zeros((10, 20), np.uint8))
    with pytest.raises(DataError, match=r"m\.png: mask is 20x10 pixels but its image is 30x10"):
        read_mask(tmp_path / "m.png", (10, 30, 3))


def test_mask_nonzero_is_defect(tmp_path: Path) -> None:
    m = np.zeros((3, 3), np.uint8)
    m[1, 1] = 1
    m[2, 2] = 255
    write_image(tmp_path / "m.png", m)
    assert read_mask(tmp_path / "m.png", (3, 3)).sum() == 2


def test_is_image_file_ignores_hidden_and_other(tmp_path: Path) -> None:
    for name in ("a.PNG", ".DS_Store", "._a.png", "README.md"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in sorted(tmp_path.iterdir()) if is_image_file(p)] == ["a.PNG"]
