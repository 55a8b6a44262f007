"""The model file: one ``.lwm`` file with the weights and everything needed to score with them.

A model file is a safetensors file (tensors only, nothing is ever unpickled) whose string
metadata holds:

=====================  ===============================================================
``format``             ``linewatch-model``
``format_version``     ``2``; a reader refuses any version but 1 and 2
``created_at``         ISO 8601, UTC
``linewatch_version``  the linewatch that trained it
``config``             JSON: the model configuration (validated by the model code)
``normalisation``      JSON: score normalisation statistics (absent before calibration)
``thresholds``         JSON: decision thresholds (absent before calibration)
``data``               JSON: fingerprint of the training images
``checksum``           sha256 over every tensor (name, dtype, shape, bytes) and the other
                       metadata, so any changed byte is found before a worker uses it
=====================  ===============================================================

Format 2 stores each memory's precision matrices (symmetric) as their packed upper
triangles, ``<memory>.precision_packed``, which halves the file; format 1 held them whole, and
still loads. The model code unpacks them (:meth:`NormalMemory.take_shapes`).

Files are written atomically (temporary file, fsync, rename), so a worker that hot-reloads
the path sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from linewatch import __version__
from linewatch.errors import DataError, ModelFileError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SUFFIX",
    "DataFingerprint",
    "ModelMeta",
    "fingerprint_images",
    "load_model_file",
    "model_id",
    "read_model_meta",
    "save_model_file",
    "update_model_meta",
]

FORMAT_NAME = "linewatch-model"
FORMAT_VERSION = 2
# Versions this linewatch reads: 1 differs from 2 only in holding whole precision matrices.
READABLE_VERSIONS = (1, 2)
SUFFIX = ".lwm"

# A header is a few kB of JSON; anything near this is a file of another kind.
_MAX_HEADER_BYTES = 64 * 1024 * 1024
_JSON_FIELDS = ("config", "normalisation", "thresholds", "data")
_CHUNK = 1024 * 1024


class DataFingerprint(BaseModel):
    """Identifies the training images by content: same files, same fingerprint.

    ``sha256`` covers each image's path relative to the data root, its size and a hash of
    its bytes (not its mtime, so a copy of the data set fingerprints the same).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    n_images: int = Field(ge=0)
    total_bytes: int = Field(ge=0)


class ModelMeta(BaseModel):
    """Everything in a model file besides the tensors.

    ``format_version`` and ``checksum`` describe the file a meta was read from; they are
    filled in by :func:`save_model_file` / :func:`load_model_file`, and ignored on save.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: dict[str, Any]
    normalisation: dict[str, Any] | None = None
    thresholds: dict[str, Any] | None = None
    data: DataFingerprint | None = None
    created_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    linewatch_version: str = __version__
    format_version: int = FORMAT_VERSION
    checksum: str | None = None


# --------------------------------------------------------------------------- writing


def save_model_file(
    path: Path | str, tensors: Mapping[str, torch.Tensor], meta: ModelMeta
) -> ModelMeta:
    """Write ``tensors`` and ``meta`` to ``path`` atomically; returns the meta as stored.

    Tensors are copied to the CPU first, so the caller's (GPU) tensors are untouched.
    """
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ModelFileError(f"{path}: a model file name must end in {SUFFIX}")
    cpu = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    header = _encode_meta(path, meta)
    header["checksum"] = _checksum(cpu, header)
    try:
        blob = save_safetensors(cpu, metadata=header)
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{path}: cannot store these tensors ({exc})") from exc
    _atomic_write(path, blob)
    return meta.model_copy(
        update={"format_version": FORMAT_VERSION, "checksum": header["checksum"]}
    )


def update_model_meta(path: Path | str, **changes: Any) -> ModelMeta:
    """Rewrite the model file at ``path`` with some metadata fields replaced.

    Used by calibration to add ``thresholds`` and ``normalisation``. The tensors are verified
    and written back unchanged; ``created_at`` keeps the training time.
    """
    protected = {"format_version", "checksum"} & changes.keys()
    unknown = changes.keys() - ModelMeta.model_fields.keys()
    if protected or unknown:
        raise TypeError(f"update_model_meta cannot set {sorted(protected | unknown)}")
    tensors, meta = load_model_file(path)
    try:
        updated = ModelMeta.model_validate({**meta.model_dump(), **changes})
    except ValidationError as exc:
        raise ModelFileError(f"{path}: invalid metadata update ({_first_error(exc)})") from exc
    return save_model_file(path, tensors, updated)


def _encode_meta(path: Path, meta: ModelMeta) -> dict[str, str]:
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "created_at": meta.created_at.isoformat(),
        "linewatch_version": meta.linewatch_version,
    }
    # Python-mode dump: JSON mode would quietly turn a NaN threshold into null.
    fields = meta.model_dump(include=set(_JSON_FIELDS))
    for name in _JSON_FIELDS:
        if fields[name] is not None:
            try:
                header[name] = _canonical_json(fields[name])
            except (ValueError, TypeError) as exc:  # NaN, inf, objects: would not read back
                raise ModelFileError(f"{path}: metadata {name} is not valid JSON ({exc})") from exc
    return header


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _atomic_write(path: Path, blob: bytes) -> None:
    """Temporary file in the same directory, fsync, rename over ``path``, fsync directory."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        with suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise ModelFileError(f"{path}: cannot write ({exc.strerror or exc})") from exc
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable; not every platform lets a directory be opened."""
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- reading


def load_model_file(
    path: Path | str, device: torch.device | str = "cpu"
) -> tuple[dict[str, torch.Tensor], ModelMeta]:
    """Read, verify (format, version, size, checksum) and return tensors and metadata."""
    path = Path(path)
    blob = _read(path)
    raw = _parse_header(path, blob[: _header_end(path, blob)], len(blob))
    meta = _decode_meta(path, raw)
    try:
        tensors = load_safetensors(blob)
    except Exception as exc:  # safetensors raises its own error types for bad data
        raise ModelFileError(f"{path}: corrupt tensor data ({exc})") from exc
    if _checksum(tensors, raw) != raw["checksum"]:
        raise ModelFileError(
            f"{path}: checksum mismatch; the file is corrupt or was changed after it was written"
        )
    return {name: t.to(device) for name, t in tensors.items()}, meta


def read_model_meta(path: Path | str) -> ModelMeta:
    """The metadata only, from the file's header (cheap: the tensors are not read).

    Checks format, version and size; the checksum needs the tensors, so only
    :func:`load_model_file` verifies it.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) == 8:
                head += f.read(min(_header_length(head), _MAX_HEADER_BYTES))
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return _decode_meta(path, _parse_header(path, head, size))


def model_id(meta: ModelMeta) -> str:
    """Short content id (12 hex digits of the checksum): changes with weights or metadata."""
    if meta.checksum is None:
        raise ValueError("model_id needs a ModelMeta returned by save/load/read of a model file")
    return meta.checksum[:12]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: model file not found") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _header_length(head: bytes) -> int:
    return int(struct.unpack("<Q", head[:8])[0])


def _header_end(path: Path, blob: bytes) -> int:
    if len(blob) < 8:
        raise ModelFileError(f"{path}: not a linewatch model file (only {len(blob)} bytes)")
    return 8 + min(_header_length(blob), _MAX_HEADER_BYTES)


def _parse_header(path: Path, head: bytes, file_size: int) -> dict[str, str]:
    """Validate the safetensors framing and return its string metadata.

    ``head`` is the 8-byte length plus (up to) the JSON header; ``file_size`` the whole file.
    """
    not_ours = f"{path}: not a linewatch model file"
    if len(head) < 8:
        raise ModelFileError(f"{not_ours} (only {file_size} bytes)")
    n = _header_length(head)
    if n > _MAX_HEADER_BYTES:
        raise ModelFileError(f"{not_ours} (not a safetensors file)")
    if 8 + n > file_size:
        raise ModelFileError(
            f"{path}: truncated (header needs {8 + n} bytes, file has {file_size})"
        )
    try:
        header = json.loads(head[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"{not_ours} (not a safetensors file)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{not_ours} (not a safetensors file)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelFileError(f"{path}: corrupt safetensors metadata")
    if metadata.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{not_ours} (safetensors without format {FORMAT_NAME})")
    expected = 8 + n + _data_length(path, header)
    if file_size < expected:
        raise ModelFileError(f"{path}: truncated ({file_size} of {expected} bytes)")
    if file_size > expected:
        raise ModelFileError(f"{path}: corrupt ({file_size - expected} bytes after the data)")
    return {str(k): str(v) for k, v in metadata.items()}


def _data_length(path: Path, header: Mapping[str, Any]) -> int:
    try:
        return max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ModelFileError(f"{path}: corrupt safetensors header") from None


def _decode_meta(path: Path, raw: Mapping[str, str]) -> ModelMeta:
    version = raw.get("format_version")
    if version not in {str(v) for v in READABLE_VERSIONS}:
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise ModelFileError(
            f"{path}: made by linewatch model format {version}, this linewatch reads {readable}"
        )
    if "checksum" not in raw:
        raise ModelFileError(f"{path}: corrupt (no checksum in the metadata)")
    fields: dict[str, Any] = {
        "created_at": raw.get("created_at"),
        "linewatch_version": raw.get("linewatch_version"),
        "format_version": int(version),
        "checksum": raw["checksum"],
    }
    try:
        for name in _JSON_FIELDS:
            if name in raw:
                fields[name] = json.loads(raw[name])
        return ModelMeta.model_validate(fields)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: corrupt metadata ({exc.msg})") from exc
    except ValidationError as exc:
        raise ModelFileError(f"{path}: invalid metadata ({_first_error(exc)})") from exc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "value"
    return f"{where}: {err['msg']}"


# --------------------------------------------------------------------------- hashing


def _checksum(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, then the other metadata."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(_canonical_json([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    rest = {k: v for k, v in header.items() if k != "checksum"}
    digest.update(_canonical_json(rest).encode())
    return digest.hexdigest()


def fingerprint_images(
    paths: Iterable[Path | str], root: Path | str | None = None
) -> DataFingerprint:
    """Fingerprint a training set by its files' relative paths, sizes and content hashes.

    Paths are taken relative to ``root`` (default: their common directory), so the same data
    set copied elsewhere gives the same fingerprint; the order of ``paths`` does not matter.
    """
    # abspath, not resolve: symlinked images keep the names the data set gives them.
    files = sorted({Path(os.path.abspath(p)) for p in paths})
    if not files:
        return DataFingerprint(sha256=hashlib.sha256(b"").hexdigest(), n_images=0, total_bytes=0)
    base = Path(os.path.abspath(root)) if root is not None else Path(os.path.commonpath(files))
    if len(files) == 1 and root is None:
        base = files[0].parent
    lines = []
    total = 0
    for file in files:
        size, content = _file_digest(file)
        total += size
        try:
            relative = file.relative_to(base).as_posix()
        except ValueError:
            raise DataError(f"{file}: not under the data root {base}") from None
        lines.append(f"{relative}\t{size}\t{content}")
    whole = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
    return DataFingerprint(sha256=whole, n_images=len(files), total_bytes=total)


def _file_digest(file: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    try:
        with file.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise DataError(f"{file}: cannot read training image ({exc.strerror or exc})") from exc
    return size, digest.hexdigest()
