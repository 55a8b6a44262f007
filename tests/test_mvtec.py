"""MVTec-layout loading and the pre-training validation that names the bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from linewatch.data.images import write_image
from linewatch.data.mvtec import MVTecDataset, Sample
from linewatch.errors import DataError

MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic-tile"


def _img(value: int = 100, shape: tuple[int, int] = (16, 20)) -> np.ndarray:
    return np.full(shape, value, np.uint8)


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """A small valid data set: 3 train good, val and test with good + scratch."""
    root = tmp_path / "set"
    for i in (2, 0, 1):
        write_image(root / "train" / "good" / f"t{i}.png", _img(i))
    for split in ("val", "test"):
        write_image(root / split / "good" / f"{split}_g0.png", _img())
        for i in range(2):
            stem = f"{split}_s{i}"
            write_image(root / split / "scratch" / f"{stem}.png", _img())
            mask = np.zeros((16, 20), bool)
            mask[3, 4:9] = True
            write_image(root / "ground_truth" / "scratch" / f"{stem}_mask.png", mask)
    (root / "README.md").write_text("about\n")
    (root / "train" / "good" / ".DS_Store").write_bytes(b"\0\1")
    (root / "val" / "scratch" / "notes.txt").write_text("ignored\n")
    return root


def test_layout_is_listed_sorted(root: Path) -> None:
    ds = MVTecDataset(root)
    assert ds.splits() == ["train", "val", "test"]
    train = ds.samples("train")
    assert [s.path.name for s in train] == ["t0.png", "t1.png", "t2.png"]
    assert all(not s.is_defect and s.mask is None for s in train)
    val = ds.samples("val")
    assert [(s.label, s.path.name) for s in val] == [
        ("good", "val_g0.png"), ("scratch", "val_s0.png"), ("scratch", "val_s1.png"),
    ]
    assert val[1].mask == root / "ground_truth" / "scratch" / "val_s0_mask.png"
    assert [s.path.name for s in ds.good("test")] == ["test_g0.png"]
    assert ds.validate("val") == val


def test_val_is_optional(root: Path) -> None:
    for p in sorted((root / "val").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (root / "val").rmdir()
    ds = MVTecDataset(root)
    assert ds.splits() == ["train", "test"]
    with pytest.raises(DataError, match=r"no 'val' split.*found: train, test"):
        ds.samples("val")


def test_sample_is_defect() -> None:
    assert Sample(path=Path("a.png"), split="test", label="crack", mask=None).is_defect
    assert not Sample(path=Path("a.png"), split="test", label="good", mask=None).is_defect


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        MVTecDataset(tmp_path / "missing")
    with pytest.raises(DataError, match="not an MVTec-layout"):
        MVTecDataset(tmp_path)


def test_empty_split_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "train" / "good").mkdir(parents=True)
    (tmp_path / "train" / "good" / "README.md").write_text("x")
    with pytest.raises(DataError, match=r"train: split holds no images"):
        MVTecDataset(tmp_path).validate("train")


def test_unknown_split(root: Path) -> None:
    with pytest.raises(DataError, match="unknown split 'dev'"):
        MVTecDataset(root).samples("dev")


def test_missing_image_is_named(root: Path) -> None:
    (root / "train" / "good" / "gone.png").symlink_to(root / "nowhere.png")
    with pytest.raises(DataError, match=r"gone\.png: no such file$"):
        MVTecDataset(root).validate("train")


def test_empty_file_is_named(root: Path) -> None:
    (root / "train" / "good" / "t1.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"t1\.png: empty file"):
        MVTecDataset(root).validate("train")


def test_corrupt_file_is_named_and_others_counted(root: Path) -> None:
    (root / "test" / "good" / "test_g0.png").write_bytes(b"\x89PNG garbage")
    (root / "test" / "scratch" / "test_s1.png").write_bytes(b"")
    with pytest.raises(DataError) as info:
        MVTecDataset(root).validate("test")
    message = str(info.value)
    assert "test_g0.png: cannot decode" in message
    assert message.endswith("(and 1 more problem(s) in test)")


def test_missing_mask_is_named(root: Path) -> None:
    (root / "ground_truth" / "scratch" / "val_s1_mask.png").unlink()
    ds = MVTecDataset(root)
    assert ds.samples("val")[2].mask is None
    with pytest.raises(DataError, match=r"val_s1\.png: defective image has no mask.*val_s1_mask"):
        ds.validate("val")


def test_mask_size_mismatch_is_named(root: Path) -> None:
    write_image(root / "ground_truth" / "scratch" / "test_s0_mask.png", np.zeros((8, 8), bool))
    expected = r"test_s0_mask\.png: mask is 8x8 pixels but its image is 20x16"
    with pytest.raises(DataError, match=expected):
        MVTecDataset(root).validate("test")


def test_defects_in_train_are_refused(root: Path) -> None:
    write_image(root / "train" / "scratch" / "x.png", _img())
    with pytest.raises(DataError, match="train must hold only good images"):
        MVTecDataset(root).validate("train")


@pytest.mark.dataset
@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="shared magnetic-tile data set absent")
def test_magnetic_tile_matches_its_split_csv() -> None:
    ds = MVTecDataset(MAGNETIC_TILE)
    assert ds.splits() == ["train", "val", "test"]
    rows = (MAGNETIC_TILE / "split.csv").read_text().splitlines()[1:]
    expected = set()
    for row in rows:
        image, split, label, mask = row.split(",")
        expected.add((split, label, image, mask))
    listed = set()
    for split in ds.splits():
        for s in ds.validate(split):
            mask = s.mask.relative_to(MAGNETIC_TILE).as_posix() if s.mask else ""
            listed.add((split, s.label, s.path.relative_to(MAGNETIC_TILE).as_posix(), mask))
    assert listed == expected
    assert len(ds.good("train")) == 590
