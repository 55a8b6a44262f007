"""Synthetic surfaces and data sets: exact masks, textures that look like their names,
byte-identical output for a seed, and the ``linewatch synth`` command."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linewatch.cli import main
from linewatch.data.images import read_image, read_mask
from linewatch.data.mvtec import MVTecDataset
from linewatch.data.synth import (
    DEFECTS,
    SURFACES,
    SynthSummary,
    add_defect,
    make_image,
    make_surface,
    plan_counts,
    write_dataset,
)
from linewatch.errors import DataError


def _small(out: Path, **kwargs: Any) -> SynthSummary:
    """A 13-image set of 64x64 images: 3 train, 5 val, 5 test."""
    return write_dataset(out, **({"size": 64, "n_good": 3, "n_defect": 1} | kwargs))


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("surface", SURFACES)
def test_good_image_has_empty_mask(surface: str) -> None:
    img, mask = make_image(_rng(), surface, 128, None)
    assert img.dtype == np.uint8 and img.shape == (128, 128)
    assert mask.dtype == bool and mask.shape == (128, 128) and not mask.any()
    assert 10 < img.mean() < 245 and img.std() > 3  # neither blank nor saturated


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("defect", DEFECTS)
def test_mask_is_exactly_the_changed_region(surface: str, defect: str) -> None:
    clean = make_surface(_rng(5), surface, 256)
    img, mask = make_image(_rng(5), surface, 256, defect)
    np.testing.assert_array_equal(img[~mask], clean[~mask])
    assert 0 < mask.mean() < 0.15
    changed = img != clean
    assert changed[mask].mean() > 0.85  # the mask is not padded with untouched pixels
    # Visible but not glaring: mean change within a few texture contrasts.
    delta = np.abs(img.astype(np.int16) - clean)[mask].mean()
    assert 4 < delta < 120


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.integers(32, 200),
    surface=st.sampled_from(SURFACES),
    defect=st.sampled_from(DEFECTS),
)
def test_masks_exact_at_any_size_and_seed(seed: int, size: int, surface: str, defect: str) -> None:
    clean = make_surface(_rng(seed), surface, size)
    img, mask = make_image(_rng(seed), surface, size, defect)
    assert img.shape == mask.shape == (size, size)
    assert mask.any()
    np.testing.assert_array_equal(img[~mask], clean[~mask])


def test_add_defect_leaves_its_input_alone() -> None:
    clean = make_surface(_rng(), "woven_fabric", 96)
    before = clean.copy()
    add_defect(_rng(1), clean, "corrosion")
    np.testing.assert_array_equal(clean, before)


def test_same_seed_same_image_other_seed_differs() -> None:
    a, ma = make_image(_rng(3), "solder_grain", 96, "dent")
    b, mb = make_image(_rng(3), "solder_grain", 96, "dent")
    c, _ = make_image(_rng(4), "solder_grain", 96, "dent")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: make_image(_rng(), "wood", 64, None), "unknown surface 'wood'"),
        (lambda: make_image(_rng(), "brushed_metal", 64, "crack"), "unknown defect 'crack'"),
        (lambda: make_image(_rng(), "brushed_metal", 16, None), "size 16 out of range"),
    ],
)
def test_bad_arguments(call: Callable[[], object], match: str) -> None:
    with pytest.raises(DataError, match=match):
        call()


# --------------------------------------------------------------------------- textures


def _autocorr_x(img: np.ndarray, lags: range) -> np.ndarray:
    """Row autocorrelation of the high-passed image at each lag."""
    a = img.astype(np.float32)
    a = a - cv2.GaussianBlur(a, (0, 0), 8)
    a -= a.mean()
    var = float((a * a).mean())
    return np.array([(a[:, : a.shape[1] - k] * a[:, k:]).mean() / var for k in lags])


def _grad_ratio(img: np.ndarray) -> float:
    """Mean horizontal over mean vertical neighbour difference: 1 for isotropic texture."""
    f = img.astype(np.float32)
    return float(np.abs(np.diff(f, axis=1)).mean() / np.abs(np.diff(f, axis=0)).mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_brushed_metal_is_streaked(seed: int) -> None:
    img = make_surface(_rng(seed), "brushed_metal", 256)
    assert _grad_ratio(img) < 0.6  # smooth along the brushing, rough across it
    assert _autocorr_x(img, range(8, 9))[0] > 0.6  # streaks run on for many pixels


@pytest.mark.parametrize("seed", [0, 1])
def test_woven_fabric_is_periodic(seed: int) -> None:
    ac = _autocorr_x(make_surface(_rng(seed), "woven_fabric", 256), range(31))
    assert ac[15:26].max() > 0.5  # the weave repeats every two yarns
    assert ac[3:9].min() < 0.3


@pytest.mark.parametrize("seed", [0, 1])
def test_moulding_compound_is_isotropic_grain_with_mottling(seed: int) -> None:
    img = make_surface(_rng(seed), "moulding_compound", 256)
    assert 0.85 < _grad_ratio(img) < 1.15
    ac = _autocorr_x(img, range(9))
    assert ac[1] > 0.1 and abs(ac[8]) < 0.1  # fine grain, no structure beyond it
    # 16x16 block means vary far more than white noise of the same std would (std/16).
    blocks = img.reshape(16, 16, 16, 16).mean(axis=(1, 3))
    assert blocks.std() > 0.3 * img.std()


@pytest.mark.parametrize("seed", [0, 1])
def test_solder_grain_is_blobby(seed: int) -> None:
    img = make_surface(_rng(seed), "solder_grain", 256)
    assert 0.8 < _grad_ratio(img) < 1.2
    ac = _autocorr_x(img, range(6))
    assert ac[2] > 0.3  # grains several pixels across, not pixel noise
    assert ac[5] < 0.1  # and separate: the next grain is uncorrelated
    assert img.std() > 25  # lit domes against dark gaps


# --------------------------------------------------------------------------- data sets


def test_plan_counts_default() -> None:
    counts = plan_counts(60, 5)
    assert counts["train"] == {"good": 60}
    assert counts["val"] == counts["test"] == {"good": 20} | dict.fromkeys(DEFECTS, 5)


def test_dataset_layout_masks_and_loader(tmp_path: Path) -> None:
    out = tmp_path / "set"
    summary = _small(out, seed=1)
    assert summary.images == 3 + 2 * (1 + len(DEFECTS)) and summary.masks == 2 * len(DEFECTS)
    ds = MVTecDataset(out)
    assert ds.splits() == ["train", "val", "test"]
    assert ds.labels("test") == ["good", *sorted(DEFECTS)]
    for split in ds.splits():
        for sample in ds.validate(split):
            assert sample.mask is not None or not sample.is_defect
            if sample.mask is not None:
                mask = read_mask(sample.mask, read_image(sample.path).shape)
                assert mask.any()
                assert set(np.unique(read_image(sample.mask))) == {0, 255}
    rows = (out / "split.csv").read_text().splitlines()
    assert rows[0] == "image,split,label,mask"
    assert len(rows) - 1 == summary.images
    assert "val/dent/val_000.png,val,dent,ground_truth/dent/val_000_mask.png" in rows
    readme = (out / "README.md").read_text()
    assert "--seed 1 --size 64 --n-good 3 --n-defect 1 --surface brushed_metal" in readme


def test_written_image_matches_make_image(tmp_path: Path) -> None:
    _small(tmp_path, seed=2)
    img = read_image(tmp_path / "test" / "scratch" / "test_000.png")
    mask = read_mask(tmp_path / "ground_truth" / "scratch" / "test_000_mask.png", img.shape)
    clean = read_image(tmp_path / "train" / "good" / "train_000.png")
    assert img.shape == clean.shape == (64, 64)
    assert mask.any() and (img != clean).any()


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    _small(tmp_path / "a", seed=7)
    _small(tmp_path / "b", seed=7)
    _small(tmp_path / "c", seed=8)
    a, b, c = (_hashes(tmp_path / x) for x in "abc")
    assert len(a) == 13 + 8 + 2
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in images)


def test_images_do_not_depend_on_other_counts(tmp_path: Path) -> None:
    write_dataset(tmp_path / "few", seed=3, size=64, n_good=2, n_defect=1)
    write_dataset(tmp_path / "many", seed=3, size=64, n_good=5, n_defect=2)
    for name in ("train/good/train_001.png", "val/corrosion/val_000.png"):
        assert (tmp_path / "few" / name).read_bytes() == (tmp_path / "many" / name).read_bytes()


def test_corruption_applies_to_val_and_test_only(tmp_path: Path) -> None:
    _small(tmp_path / "clean", seed=4)
    _small(tmp_path / "dark", seed=4, illumination="low", snp_density=0.1)
    clean, dark = _hashes(tmp_path / "clean"), _hashes(tmp_path / "dark")
    for name, digest in clean.items():
        same = dark[name] == digest
        if name.startswith(("train/", "ground_truth/")):
            assert same, name
        elif name.startswith(("val/", "test/")):
            assert not same, name
    img = read_image(tmp_path / "dark" / "val" / "good" / "val_000.png")
    assert 0.05 < ((img == 0) | (img == 255)).mean() < 0.15
    assert "low illumination, salt-and-pepper noise at density 0.1" in (
        tmp_path / "dark" / "README.md").read_text()


def test_all_surfaces(tmp_path: Path) -> None:
    summary = write_dataset(tmp_path, seed=0, surface="all", size=48, n_good=1, n_defect=1)
    assert summary.surfaces == SURFACES
    assert summary.images == 4 * (1 + 2 * (1 + len(DEFECTS)))
    for surface in SURFACES:
        assert MVTecDataset(tmp_path / surface).validate("test")
    # The brushed-metal set is the one a single-surface run writes.
    write_dataset(tmp_path / "single", seed=0, surface="brushed_metal", size=48, n_good=1,
                  n_defect=1)
    assert _hashes(tmp_path / "single") == _hashes(tmp_path / "brushed_metal")


def test_refuses_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="folder is not empty"):
        _small(tmp_path)
    with pytest.raises(DataError, match="not a data set written by linewatch synth"):
        _small(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_only_our_files(tmp_path: Path) -> None:
    write_dataset(tmp_path, seed=0, size=64, n_good=6, n_defect=2)
    (tmp_path / "notes.txt").write_text("mine")
    _small(tmp_path, seed=0, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert len(list((tmp_path / "train" / "good").iterdir())) == 3
    fresh = tmp_path / "fresh"
    _small(fresh, seed=0)
    kept = {k: v for k, v in _hashes(tmp_path).items() if not k.startswith(("fresh/", "notes"))}
    assert kept == _hashes(fresh)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_good": 0}, "n_good >= 1"),
        ({"n_defect": -1}, "n_defect >= 0"),
        ({"snp_density": 1.5}, "density 1.5 out of range"),
        ({"illumination": "dim"}, "unknown illumination 'dim'"),
        ({"surface": "wood"}, "unknown surface 'wood'"),
    ],
)
def test_write_dataset_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(DataError, match=match):
        write_dataset(tmp_path / "x", **({"size": 64} | kwargs))
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- command line


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "set"
    argv = ["synth", str(out), "--seed", "3", "--size", "48", "--n-good", "3", "--n-defect", "1",
            "--surface", "woven_fabric", "--illumination", "shadow", "--snp", "0.02"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    assert stdout == [f"wrote 13 images (3 train, 5 val, 5 test per surface; 8 masks) "
                      f"of woven_fabric to {out}"]
    assert MVTecDataset(out).validate("val")
    assert main(argv) == 1
    assert "folder is not empty" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0


def test_cli_data_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _small(tmp_path)
    assert main(["data", "check", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith(
        "ok: train 3 (0 defective), val 5 (4 defective), test 5 (4 defective)")
    (tmp_path / "ground_truth" / "dent" / "test_000_mask.png").unlink()
    assert main(["data", "check", str(tmp_path)]) == 1
    assert "test_000.png: defective image has no mask" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["synth"],
        ["synth", "OUT", "--surface", "wood"],
        ["synth", "OUT", "--illumination", "dim"],
        ["synth", "OUT", "--size", "big"],
    ],
)
def test_cli_bad_arguments_exit_non_zero(argv: list[str], tmp_path: Path) -> None:
    argv = [str(tmp_path / a) if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0


@pytest.mark.parametrize("args", [["--snp", "2"], ["--size", "8"], ["--n-good", "0"]])
def test_cli_bad_values_exit_non_zero(args: list[str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", str(tmp_path / "x"), *args]) != 0
    err = capsys.readouterr().err
    assert err.startswith("linewatch: error:") and "Traceback" not in err
