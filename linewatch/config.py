"""Configuration of a whole line: pydantic models, a TOML loader, environment overrides.

A line is configured in one TOML file. Any value can be overridden from the
environment with ``LINEWATCH_<SECTION>__<KEY>`` (``__`` descends one level; a
number selects a list item, e.g. ``LINEWATCH_CAMERAS__0__FPS=5``). Values from
the environment are parsed as TOML values where they parse (``5``, ``true``,
``"text"``), else taken as plain strings.

Every error is one line naming the file and the key, so a line engineer can fix
it without reading a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from linewatch.errors import ConfigError

ENV_PREFIX = "LINEWATCH_"


class _Strict(BaseModel):
    """Base of every config model: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- cameras


class GenicamSource(_Strict):
    """A GenICam camera reached through a GenTL producer (``.cti``) with harvesters."""

    kind: Literal["genicam"] = "genicam"
    cti: Path = Field(description="path of the GenTL producer (.cti file)")
    serial_number: str | None = Field(None, description="select the camera by serial number")
    device_id: str | None = Field(None, description="select the camera by GenTL device id")
    user_defined_name: str | None = Field(None, description="select by user-defined name")
    pixel_format: str | None = Field(None, description="set PixelFormat on the camera, e.g. Mono8")
    trigger_mode: Literal["off", "software", "hardware"] = "off"
    trigger_source: str = Field("Line0", description="TriggerSource for trigger_mode hardware")
    exposure_us: float | None = Field(None, gt=0)
    num_buffers: int = Field(8, ge=1, le=256)
    fetch_timeout_s: float = Field(2.0, gt=0)
    reconnect_interval_s: float = Field(2.0, gt=0)
    part_id_chunk: str | None = Field(
        None, description="chunk node holding the part id, e.g. ChunkPartId (default: seq)"
    )


class _PacedSource(_Strict):
    """A source the acquisition process reads at a set rate (not a camera, which paces itself)."""

    fps: float = Field(10.0, gt=0)
    phase_ms: float | None = Field(
        None, ge=0,
        description="read on the host's shared clock: at whole multiples of 1/fps plus this "
        "offset (taken modulo the frame period), so sources with the same fps and phase read "
        "together, like cameras on one trigger; none = paced from this source's own start",
    )

    @property
    def phase_s(self) -> float | None:
        """``phase_ms`` in seconds (None when unset)."""
        return None if self.phase_ms is None else self.phase_ms / 1000.0


class FolderSource(_PacedSource):
    """Replays the images of a folder (or an MVTec-layout data set) at a set rate."""

    kind: Literal["folder"] = "folder"
    path: Path
    split: str | None = Field(
        None, description="replay <path>/<split> of an MVTec-layout data set, e.g. test"
    )
    loop: bool = False


class SynthSource(_PacedSource):
    """Frames made on the fly by the synthetic data generator."""

    kind: Literal["synth"] = "synth"
    size: int = Field(256, ge=32, le=4096)
    surface: str = "brushed_metal"
    defect_ratio: float = Field(0.1, ge=0.0, le=1.0)
    seed: int = 0
    # Fault injection (linewatch faults and its tests): a camera that goes away and returns.
    inject_loss_after: int | None = Field(
        None, ge=1, description="fault injection: the camera is lost after this many frames, once"
    )
    inject_loss_s: float = Field(
        5.0, gt=0, description="fault injection: and stays lost (cannot be opened) this long"
    )


CameraSource = Annotated[GenicamSource | FolderSource | SynthSource, Field(discriminator="kind")]


class OverexposureConfig(_Strict):
    """When a camera's frames clip at white: an ``overexposed`` alarm, then ``exposure_ok``."""

    enabled: bool = True
    clipped_share: float = Field(
        0.05, gt=0, le=1,
        description="share of a frame's pixels at its brightest value that counts as clipped",
    )
    frames: int = Field(
        10, ge=1, description="frames in a row above the share (or below half of it) to report"
    )


class UnderexposureConfig(_Strict):
    """When a camera's frames go dark: an ``underexposed`` alarm, then ``exposure_ok``."""

    enabled: bool = True
    level: float = Field(
        0.2, gt=0, lt=1,
        description="a frame whose brightest 1 % of pixels lies below this share of full scale "
        "counts as dark",
    )
    full_scale: int | None = Field(
        None, ge=1,
        description="the sensor's full-scale value; none = the pixel type's (255 or 65535): "
        "set 4095 for a 12-bit camera that delivers 16-bit pixels",
    )
    frames: int = Field(
        10, ge=1, description="frames in a row below the level (or above 1.5 x it) to report"
    )


class CameraConfig(_Strict):
    """One camera of the line, acquired by its own process."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    source: CameraSource
    deadline_ms: float = Field(
        1000.0, gt=0, description="ms after acquisition by which the verdict must exist"
    )
    frames: int | None = Field(
        None, ge=1, description="stop after this many frames (acquired or missed); none = run on"
    )
    overexposure: OverexposureConfig = Field(default_factory=OverexposureConfig)
    underexposure: UnderexposureConfig = Field(default_factory=UnderexposureConfig)


# --------------------------------------------------------------------------- transport


class CurveConfig(_Strict):
    """ZeroMQ CURVE authentication and encryption; key files from ``linewatch keys generate``."""

    enabled: bool = False
    keys_dir: Path | None = Field(None, description="folder with server and client key files")


class TransportConfig(_Strict):
    """ZeroMQ endpoints between acquisition, workers and decision."""

    frames_endpoint: str = "tcp://127.0.0.1:5555"
    workers_endpoint: str = "tcp://127.0.0.1:5556"
    results_endpoint: str = "tcp://127.0.0.1:5557"
    heartbeat_ms: int = Field(1000, ge=10)
    liveness: int = Field(
        3, ge=2, le=20, description="heartbeats a worker may miss before it is declared dead"
    )
    high_water_mark: int = Field(1000, ge=1)
    linger_ms: int = Field(
        1000, ge=0, le=60_000, description="how long a closing socket may flush unsent messages"
    )
    worker_credit: int | None = Field(
        None, ge=1, description="frames a worker may hold at once; default 2 x workers.max_batch"
    )
    dispatch_queue: int = Field(
        256, ge=1, description="frames the dispatcher holds while no worker has credit"
    )
    curve: CurveConfig = CurveConfig()

    @model_validator(mode="after")
    def _curve_off_loopback(self) -> TransportConfig:
        exposed = [e for e in self.endpoints() if not endpoint_is_local(e)]
        if exposed and not self.curve.enabled:
            raise ValueError(
                f"endpoint {exposed[0]} is not on 127.0.0.1/ipc; set transport.curve.enabled = true"
            )
        if self.worker_credit is not None and self.worker_credit > self.high_water_mark:
            # The dispatcher never queues more than a worker's credit on its socket, so a
            # credit above the socket's high-water mark would make sends fail, not wait.
            raise ValueError(
                f"worker_credit {self.worker_credit} exceeds high_water_mark "
                f"{self.high_water_mark}"
            )
        return self

    def endpoints(self) -> list[str]:
        """All endpoints this line binds."""
        return [self.frames_endpoint, self.workers_endpoint, self.results_endpoint]


def endpoint_is_local(endpoint: str) -> bool:
    """True for ipc/inproc endpoints and tcp on a loopback address."""
    parsed = urlparse(endpoint)
    if parsed.scheme in ("ipc", "inproc"):
        return True
    host = parsed.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- workers, model


class RoiConfig(_Strict):
    """Region of interest cropped from each frame before scoring (pixels)."""

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class InferenceOptions(_Strict):
    """How a loaded scorer runs its backbone (:mod:`linewatch.model.acceleration`).

    The heads always run in float32: reduced precision applies to the backbone, whose
    features are handed on as float32. The defaults leave scores as they are (within 1e-5)
    and run what measured fastest: on a CPU, ONNX Runtime (``bench/README.md``, "Inference
    options on CPU").
    """

    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="what runs the backbone: onnxruntime (CPU, fp32, no compile; exported at "
        "load) | torch | auto = onnxruntime where it can run, else torch",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="backbone arithmetic: fp32 | bf16 (autocast; CPUs with AVX512-BF16/AMX, "
        "CUDA) | fp16 (CUDA only); moves scores, so recalibrate under it",
    )
    channels_last: bool = Field(
        True, description="run the backbone on NHWC tensors (same scores, 1.1-1.7x on CPU)"
    )
    compile: bool = Field(
        False,
        description="torch.compile the backbone at load (same scores; 2-37 s more per load "
        "on a 2-core CPU, needs a C++ compiler)",
    )


class WorkersConfig(_Strict):
    """Batched inference workers."""

    count: int = Field(2, ge=1, le=64)
    max_batch: int | None = Field(
        None, ge=1, le=256,
        description="frames per batch at most; default by what runs the backbone: 8 on CUDA, "
        "4 with onnxruntime on a CPU, 1 with torch on a CPU (linewatch bench)",
    )
    max_wait_ms: float = Field(
        0.0, ge=0, description="extra wait to fill a batch; 0 = batch what queued meanwhile"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch threads per worker (default: auto)")
    scorer: Literal["model", "backbone_only"] = Field(
        "model",
        description="backbone_only (linewatch bench only): run pre-processing and the backbone "
        "but score every frame 0, so every part passes; shows the pipeline's own overhead",
    )
    roi: RoiConfig | None = None
    tile_size: int | None = Field(None, ge=32, description="tile frames larger than this")
    tile_overlap: int = Field(32, ge=0)
    inference: InferenceOptions = InferenceOptions()

    def batch_limit(self, device_type: str, backend: str = "torch") -> int:
        """``max_batch``, or its default for a worker whose backbone runs on ``device_type``
        with ``backend`` (``torch`` or ``onnxruntime``, as resolved for that device)."""
        if self.max_batch is not None:
            return self.max_batch
        if device_type == "cuda":
            return 8
        # Measured at 256 x 256, one thread (bench/README.md, "Inference options on CPU"):
        # onnxruntime 10.9 ms alone, 9.4 ms per image in a batch of 4, 9.8 in 8; torch
        # (channels_last) 18.0 ms alone but 24-35 ms per image in a batch of 4-8.
        return 4 if backend == "onnxruntime" else 1
    # Fault injection (linewatch faults and its tests); leave unset on a real line.
    inject_delay_ms: float = Field(
        0.0, ge=0, description="fault injection: sleep this long before scoring each batch"
    )
    inject_delay_worker: int | None = Field(
        None, ge=0, description="fault injection: only worker <index> is slowed (none = every one)"
    )
    inject_nonfinite_every: int | None = Field(
        None, ge=1,
        description="fault injection: frames whose seq is a multiple of this score NaN (map inf)",
    )


class ModelConfig(_Strict):
    """The model file the workers load (hot-reloaded when it changes)."""

    path: Path = Path("models/line.lwm")
    reload_check_s: float = Field(2.0, gt=0)


# --------------------------------------------------------------------------- decision, redis

ThresholdRule = Literal["operating_point", "f1_max", "youden"]


class DecisionConfig(_Strict):
    """Turns anomaly maps into verdicts and defect regions."""

    sigma: float = Field(4.0, ge=0, description="Gaussian smoothing of the anomaly map (pixels)")
    rule: ThresholdRule = "operating_point"
    min_area: int = Field(16, ge=1, description="smallest defect region kept (pixels)")
    heatmaps: Literal["redis", "disk", "off"] = "redis"
    heatmap_ttl_s: int = Field(3600, ge=1)
    heatmap_dir: Path = Path("heatmaps")
    max_regions: int = Field(
        32, ge=0, description="defect regions written per frame at most (highest scores first)"
    )
    max_gap_frames: int = Field(
        10_000, ge=1, description="missed-frame verdicts written per gap notice at most"
    )
    tick_ms: float = Field(20.0, gt=0, description="how often deadlines are checked")


class RedisConfig(_Strict):
    """The Redis server the streams live on; empty ``url`` starts an embedded one."""

    url: str | None = Field(None, description="redis://host:port/db; none = embedded server")
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False
    tls_ca_certs: Path | None = None
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    verdicts_maxlen: int = Field(1_000_000, ge=1000)
    spool_dir: Path = Path("spool")
    spool_max_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    defects_maxlen: int = Field(1_000_000, ge=1000)
    rejects_maxlen: int = Field(1_000_000, ge=1000)
    alarms_maxlen: int = Field(100_000, ge=1000)
    dedupe_ttl_s: int = Field(
        86_400, ge=60, description="how long a written frame id is remembered against duplicates"
    )
    socket_timeout_s: float = Field(2.0, gt=0, description="connect and command timeout")
    retries: int = Field(2, ge=0, description="retries of a failed command before spooling")
    retry_interval_s: float = Field(
        1.0, gt=0, description="while Redis is away, how often the decision service's probe "
        "PINGs it (writing resumes once it answers) and the consumers try it again"
    )


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"


# --------------------------------------------------------------------------- consumers


class ModbusConfig(_Strict):
    """The reject gate's Modbus TCP server (a PLC): a coil pulsed once per rejected part."""

    host: str = "127.0.0.1"
    port: int = Field(502, ge=1, le=65535)
    unit: int = Field(1, ge=0, le=255, description="Modbus unit (device) id of the PLC")
    coil: int = Field(0, ge=0, le=65535, description="coil pulsed for a reject (0-based)")
    camera_coils: dict[str, int] = Field(
        default_factory=dict, description="per-camera coil, where each camera has its own gate"
    )
    timeout_s: float = Field(1.0, gt=0, description="connect and request timeout")


class PlcConfig(_Strict):
    """``linewatch plc``: reads the rejects stream and signals the reject gate."""

    group: str = Field("plc", min_length=1, description="Redis consumer group")
    consumer: str | None = Field(
        None, min_length=1, description="consumer name in the group (default: the host name)"
    )
    driver: Literal["log", "modbus"] = "log"
    modbus: ModbusConfig = ModbusConfig()
    pulse_ms: float = Field(200.0, gt=0, le=10_000, description="how long the coil stays on")
    claim_idle_ms: int = Field(
        5000, ge=100, description="take over rejects another consumer left pending this long"
    )
    claim_interval_s: float = Field(5.0, gt=0, description="how often to look for them")
    stale_after_s: float = Field(
        60.0, gt=0, description="a reject this far past its deadline is logged, not acted on"
    )


class AlarmsConfig(_Strict):
    """``linewatch alarms``: watches verdicts and defects and raises operator alarms."""

    group: str = Field("alarms", min_length=1, description="Redis consumer group")
    consumer: str | None = Field(None, min_length=1, description="default: the host name")
    cooldown_s: float = Field(300.0, ge=0, description="an alarm kind repeats at most this often")
    reject_rate_window_s: float = Field(300.0, gt=0)
    reject_rate_limit: float = Field(0.2, gt=0, le=1, description="share of rejects in the window")
    reject_rate_min_parts: int = Field(20, ge=1, description="judge the rate from this many parts")
    repeat_window_s: float = Field(600.0, gt=0)
    repeat_radius_px: float = Field(20.0, gt=0, description="defect centres this close match")
    repeat_count: int = Field(3, ge=2, description="parts with a defect at one place")
    silence_s: float = Field(30.0, gt=0, description="no verdict this long: camera silent")
    fail_safe_cooldown_s: float = Field(60.0, ge=0, description="between fail-safe alarms")
    drift_reference_parts: int = Field(500, ge=20, description="passing scores kept as reference")
    drift_recent_parts: int = Field(200, ge=20, description="recent passing scores compared")
    drift_check_every: int = Field(50, ge=1, description="compare after this many new parts")
    drift_ks_limit: float = Field(
        0.3, gt=0, le=1, description="two-sample Kolmogorov-Smirnov statistic raising drift"
    )
    drift_p_limit: float = Field(0.01, gt=0, le=1, description="and its p-value below this")


# --------------------------------------------------------------------------- line


class LineConfig(_Strict):
    """Everything one production line runs with."""

    line: str = Field("line1", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    cameras: list[CameraConfig] = Field(min_length=1)
    transport: TransportConfig = TransportConfig()
    workers: WorkersConfig = WorkersConfig()
    model: ModelConfig = ModelConfig()
    decision: DecisionConfig = DecisionConfig()
    redis: RedisConfig = RedisConfig()
    logging: LoggingConfig = LoggingConfig()
    plc: PlcConfig = PlcConfig()
    alarms: AlarmsConfig = AlarmsConfig()

    @model_validator(mode="after")
    def _unique_camera_ids(self) -> LineConfig:
        ids = [c.id for c in self.cameras]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"camera ids must be unique, repeated: {', '.join(duplicates)}")
        return self


# --------------------------------------------------------------------------- loading


def load_config(path: Path | str, environ: Mapping[str, str] | None = None) -> LineConfig:
    """Read, override from the environment and validate a line's TOML file.

    Raises :class:`ConfigError` with one line naming the file and the key.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    raw = apply_env_overrides(raw, os.environ if environ is None else environ)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "<config>") -> LineConfig:
    """Validate a parsed configuration; errors become one :class:`ConfigError` line."""
    try:
        return LineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc)}") from None


def format_validation_error(exc: ValidationError) -> str:
    """All problems of a validation error on one line: ``key.path: message``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p not in _UNION_TAGS) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and not isinstance(err["input"], dict | list):
            msg = f"{msg} (got {err['input']!r})"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


_UNION_TAGS = {"genicam", "folder", "synth"}


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return ``raw`` with every ``LINEWATCH_A__B=v`` applied as ``raw[a][b] = v``."""
    result: dict[str, Any] = _deep_copy(raw)
    for name in sorted(environ):
        rest = name[len(ENV_PREFIX) :]
        # Only nested names (and the top-level line name) are overrides, so that other
        # LINEWATCH_ variables (cache folders, test switches) never reach the config.
        if not name.startswith(ENV_PREFIX) or ("__" not in rest and rest != "LINE"):
            continue
        keys = [k.lower() for k in rest.split("__")]
        _set_path(result, keys, _parse_env_value(environ[name]), name)
    return result


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_path(tree: Any, keys: list[str], value: Any, env_name: str) -> None:
    node = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"environment {env_name}: no list item {key}")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ConfigError(f"environment {env_name}: {key} is not a section")


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


EXAMPLE_CONFIG = Path(__file__).with_name("line.example.toml")


def example_config_text() -> str:
    """The complete, commented example configuration (``linewatch config example``)."""
    return EXAMPLE_CONFIG.read_text(encoding="utf-8")
