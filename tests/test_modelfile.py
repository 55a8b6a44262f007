"""The .lwm model file: round trip, refusal of anything not intact, atomic writes, fingerprints."""

from __future__ import annotations

import json
import os
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from linewatch.errors import DataError, ModelFileError
from linewatch.model.modelfile import (
    DataFingerprint,
    ModelMeta,
    fingerprint_images,
    load_model_file,
    model_id,
    read_model_meta,
    save_model_file,
    update_model_meta,
)

torch.set_num_threads(1)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "enc.weight": torch.randn(16, 8, 3, 3, generator=g),
        "enc.bias": torch.randn(16, generator=g).half(),
        "dec.weight": torch.randn(4, 4, generator=g).bfloat16(),
        "bn.num_batches_tracked": torch.tensor(7),
        "mask": torch.rand(5, generator=g) > 0.5,
        "empty": torch.zeros(0, 3),
    }


def _meta() -> ModelMeta:
    return ModelMeta(
        config={"variant": "E", "levels": ["s4", "s8", "s16"], "preprocess": {"size": 256}},
        normalisation={"feat": {"mean": 0.1, "std": 0.02}},
        data=DataFingerprint(sha256="ab" * 32, n_images=209, total_bytes=123456),
        created_at=datetime(2026, 5, 1, 12, 0, tzinfo=UTC),
    )


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "line.lwm"
    save_model_file(path, _tensors(), _meta())
    return path


def _rewrite_metadata(path: Path, **changes: str) -> None:
    """Write the same tensors with edited raw metadata, keeping the stored checksum."""
    tensors, _ = load_model_file(path)
    raw = _raw_metadata(path)
    raw.update(changes)
    save_file(tensors, str(path), metadata=raw)


def _raw_metadata(path: Path) -> dict[str, str]:
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    metadata: dict[str, str] = json.loads(blob[8 : 8 + n])["__metadata__"]
    return metadata


def test_round_trip_keeps_every_tensor_and_field(model_path: Path) -> None:
    tensors, meta = load_model_file(model_path)
    expected = _tensors()
    assert tensors.keys() == expected.keys()
    for name, t in expected.items():
        assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), name
    assert meta.model_dump(exclude={"checksum"}) == _meta().model_dump(exclude={"checksum"})
    assert meta.thresholds is None  # not calibrated yet, and says so
    assert meta.checksum is not None and len(model_id(meta)) == 12
    assert read_model_meta(model_path) == meta


def test_metadata_is_plain_json_strings_under_the_documented_keys(model_path: Path) -> None:
    raw = _raw_metadata(model_path)
    assert raw["format"] == "linewatch-model" and raw["format_version"] == "2"
    assert set(raw) == {
        "format",
        "format_version",
        "created_at",
        "linewatch_version",
        "config",
        "normalisation",
        "data",
        "checksum",
    }
    assert json.loads(raw["config"])["levels"] == ["s4", "s8", "s16"]


def test_save_returns_the_meta_as_stored(tmp_path: Path) -> None:
    stored = save_model_file(tmp_path / "m.lwm", _tensors(), _meta())
    assert stored == read_model_meta(tmp_path / "m.lwm")
    assert stored.checksum is not None


def test_created_at_must_carry_a_time_zone() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        ModelMeta(config={}, created_at=datetime(2026, 5, 1, 12, 0))


def test_one_changed_byte_in_the_weights_is_found(model_path: Path) -> None:
    blob = bytearray(model_path.read_bytes())
    blob[-40] ^= 0x01  # inside the tensor data, past the header
    model_path.write_bytes(bytes(blob))
    with pytest.raises(ModelFileError, match=r"line\.lwm: checksum mismatch"):
        load_model_file(model_path)


def test_edited_metadata_is_found(model_path: Path) -> None:
    _rewrite_metadata(model_path, normalisation='{"feat":{"mean":0.1,"std":0.5}}')
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        load_model_file(model_path)


def test_another_format_version_is_refused_with_both_versions_named(model_path: Path) -> None:
    _rewrite_metadata(model_path, format_version="3")
    for read in (read_model_meta, load_model_file):
        with pytest.raises(ModelFileError) as err:
            read(model_path)
        assert str(err.value) == (
            f"{model_path}: made by linewatch model format 3, this linewatch reads 1 and 2"
        )


def test_other_files_are_not_model_files(tmp_path: Path) -> None:
    plain = tmp_path / "weights.lwm"
    save_file({"w": torch.zeros(2)}, str(plain))
    pickled = tmp_path / "pickled.lwm"
    torch.save({"w": torch.zeros(2)}, pickled)  # a zip of pickles: must never be unpickled
    text = tmp_path / "text.lwm"
    text.write_text("hello, this is not a model\n")
    tiny = tmp_path / "tiny.lwm"
    tiny.write_bytes(b"\x01\x02")
    for path in (plain, pickled, text, tiny):
        with pytest.raises(ModelFileError, match=rf"{path.name}: not a linewatch model file"):
            load_model_file(path)
        with pytest.raises(ModelFileError, match=rf"{path.name}: not a linewatch model file"):
            read_model_meta(path)
    with pytest.raises(ModelFileError, match="model file not found"):
        load_model_file(tmp_path / "missing.lwm")


@pytest.mark.parametrize("where", ["in_length", "in_header", "in_data", "last_byte"])
def test_a_truncated_file_is_refused(model_path: Path, where: str) -> None:
    blob = model_path.read_bytes()
    header_end = 8 + struct.unpack("<Q", blob[:8])[0]
    keep = {
        "in_length": 5,
        "in_header": header_end // 2,
        "in_data": (header_end + len(blob)) // 2,
        "last_byte": len(blob) - 1,
    }[where]
    model_path.write_bytes(blob[:keep])
    for read in (read_model_meta, load_model_file):
        with pytest.raises(ModelFileError, match=r"line\.lwm: (truncated|not a linewatch)") as err:
            read(model_path)
        assert "\n" not in str(err.value)


def test_trailing_bytes_are_refused(model_path: Path) -> None:
    with model_path.open("ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(ModelFileError, match="16 bytes after the data"):
        read_model_meta(model_path)


def test_read_model_meta_reads_only_the_header(model_path: Path) -> None:
    """Corrupt weights do not stop the cheap header read (the full load finds them)."""
    blob = bytearray(model_path.read_bytes())
    blob[-1] ^= 0xFF
    model_path.write_bytes(bytes(blob))
    assert read_model_meta(model_path).config["variant"] == "E"
    with pytest.raises(ModelFileError, match="checksum"):
        load_model_file(model_path)


def test_writes_are_atomic_and_leave_no_temporary_files(
    tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_model_file(model_path, {"w": torch.ones(3)}, _meta())  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["line.lwm"]
    before = model_path.read_bytes()

    def disk_full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(ModelFileError, match=r"line\.lwm: cannot write \(No space left"):
        save_model_file(model_path, _tensors(), _meta())
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["line.lwm"]
    assert model_path.read_bytes() == before  # the old model is still whole


def test_a_model_file_must_be_named_lwm(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"model\.pth: a model file name must end in \.lwm"):
        save_model_file(tmp_path / "model.pth", _tensors(), _meta())


def test_metadata_that_is_not_json_is_refused_before_writing(tmp_path: Path) -> None:
    meta = _meta().model_copy(update={"thresholds": {"f1_max": float("nan")}})
    with pytest.raises(ModelFileError, match="metadata thresholds is not valid JSON"):
        save_model_file(tmp_path / "m.lwm", _tensors(), meta)
    assert list(tmp_path.iterdir()) == []


def test_update_adds_thresholds_and_keeps_weights_and_training_time(model_path: Path) -> None:
    before_tensors, before = load_model_file(model_path)
    after = update_model_meta(model_path, thresholds={"operating_point": 0.42})
    tensors, meta = load_model_file(model_path)
    assert meta == after and meta.thresholds == {"operating_point": 0.42}
    assert meta.created_at == before.created_at and meta.config == before.config
    assert model_id(meta) != model_id(before)  # the id follows the content
    assert all(torch.equal(tensors[k], before_tensors[k]) for k in before_tensors)
    with pytest.raises(TypeError, match="checksum"):
        update_model_meta(model_path, checksum="00")
    with pytest.raises(TypeError, match="colour"):
        update_model_meta(model_path, colour="red")
    with pytest.raises(ModelFileError, match="invalid metadata update"):
        update_model_meta(model_path, data={"sha256": "short"})


def test_model_id_needs_a_stored_meta() -> None:
    with pytest.raises(ValueError, match="model_id"):
        model_id(_meta())


def _dataset(root: Path) -> list[Path]:
    paths = []
    for i, name in enumerate(["good/000.png", "good/001.png", "good/sub/002.png"]):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([i]) * (100 + i))
        paths.append(p)
    return paths


def test_fingerprint_follows_content_and_names_not_location_order_or_mtime(
    tmp_path: Path,
) -> None:
    paths = _dataset(tmp_path / "a")
    first = fingerprint_images(paths)
    assert first.n_images == 3 and first.total_bytes == 303

    copy = _dataset(tmp_path / "b")
    os.utime(copy[0], (1, 1))
    assert fingerprint_images(reversed(copy)) == first

    copy[1].write_bytes(b"\x09" * 101)  # same size, other content
    assert fingerprint_images(copy) != first
    copy[1].write_bytes(b"\x01" * 101)
    copy[2].rename(copy[2].with_name("003.png"))
    assert fingerprint_images([*copy[:2], copy[2].with_name("003.png")]) != first


def test_fingerprint_errors_name_the_file(tmp_path: Path) -> None:
    paths = _dataset(tmp_path)
    with pytest.raises(DataError, match=r"missing\.png: cannot read training image"):
        fingerprint_images([*paths, tmp_path / "good" / "missing.png"])
    with pytest.raises(DataError, match="not under the data root"):
        fingerprint_images(paths, root=tmp_path / "good" / "sub")
