"""A GenICam camera through a GenTL producer (``.cti``), acquired with harvesters.

What harvesters does not do for us, and this module does:

* It requeues incomplete buffers silently and keeps no drop counter, so missing
  frames are found from jumps in the producer's frame id (:class:`ProducerGaps`)
  and reported as :class:`MissedFrames` before the next good frame.
* It installs its own SIGINT handler (which destroys the acquirer) whenever an
  acquirer is created on the main thread; :meth:`GenicamCamera.open` puts the
  previous handler back so that Ctrl-C stops the process cleanly.
* It cannot recover an acquirer after the device went away; every
  :meth:`GenicamCamera.open` therefore builds a fresh :class:`Harvester`.

Camera settings that a device lacks (the simulated ``viky.cti`` has no trigger or
exposure nodes) are logged and skipped; acquisition carries on.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import genicam
from genicam.genapi import GenericException as GenApiError
from genicam.gentl import DEVICE_ACCESS_STATUS_LIST, TimeoutException
from genicam.gentl import GenericException as GenTLError
from harvesters.core import Buffer, DeviceInfo, Harvester, ImageAcquirer

from linewatch.acquisition.base import (
    DeviceNotFound,
    FrameSource,
    MissedFrames,
    RawFrame,
    SourceItem,
    SourceLost,
)
from linewatch.acquisition.pixels import check_format, to_model_pixels
from linewatch.config import GenicamSource
from linewatch.errors import ConfigError, DataError
from linewatch.log import get_logger

# Consecutive fetch timeouts after which a free-running camera counts as lost.
# A camera on a hardware trigger may idle for hours; it is only lost on errors.
MAX_TIMEOUTS = 3

_OPEN_STATES = {
    DEVICE_ACCESS_STATUS_LIST.DEVICE_ACCESS_STATUS_OPEN_READWRITE,
    DEVICE_ACCESS_STATUS_LIST.DEVICE_ACCESS_STATUS_OPEN_READONLY,
}

_SELECTORS = ("serial_number", "device_id", "user_defined_name")


def viky_cti_path() -> Path:
    """The simulated GenTL producer shipped with the ``genicam`` package (3 cameras)."""
    return Path(genicam.__file__).resolve().parent / "viky.cti"


def list_devices(cti: Path) -> list[dict[str, str]]:
    """Id, serial number, user-defined name, model and vendor of every device of a producer."""
    harvester = _harvester(cti)
    try:
        return [_describe(info) for info in harvester.device_info_list]
    finally:
        harvester.reset()


class ProducerGaps:
    """Counts the frames missing between consecutive buffers of a producer.

    By frame id when the producer numbers its buffers: a jump of k means k - 1
    frames missing. Without frame ids, and only for a free-running camera (whose
    frames are evenly spaced), by device timestamps: an interval of k periods
    means k - 1 frames missing, the period being learnt from the intervals seen.

    >>> gaps = ProducerGaps()
    >>> [gaps.observe(i, None) for i in (7, 8, 11, 12)]
    [0, 0, 2, 0]
    >>> gaps = ProducerGaps(use_timestamps=True)
    >>> [gaps.observe(None, t) for t in (0, 50, 100, 150, 300, 350)]
    [0, 0, 0, 0, 2, 0]

    A frame id or timestamp that goes backwards (a counter wrap, a camera
    restart) starts over rather than reporting billions of missing frames;
    ``restarts`` counts those.
    """

    LEARN_INTERVALS = 3
    """Intervals seen before timestamps are trusted to reveal gaps."""

    def __init__(self, use_timestamps: bool = False) -> None:
        self.use_timestamps = use_timestamps
        self.restarts = 0
        self.reset()

    def reset(self) -> None:
        """Forget the past (after a reconnect the camera restarts its counters)."""
        self._last_id: int | None = None
        self._last_ts: int | None = None
        self._period: float | None = None
        self._intervals = 0

    def observe(self, frame_id: int | None, ts_ns: int | None) -> int:
        """Frames missing before this buffer; 0 when it follows on (or nothing tells)."""
        if frame_id is not None:
            return self._by_id(frame_id)
        if self.use_timestamps and ts_ns is not None:
            return self._by_time(ts_ns)
        return 0

    def _by_id(self, frame_id: int) -> int:
        last, self._last_id = self._last_id, frame_id
        if last is None or frame_id <= last:
            self.restarts += last is not None
            return 0
        return frame_id - last - 1

    def _by_time(self, ts_ns: int) -> int:
        last, self._last_ts = self._last_ts, ts_ns
        if last is None or ts_ns <= last:
            if last is not None:
                self.restarts += 1
                self._period, self._intervals = None, 0
            return 0
        dt = ts_ns - last
        self._intervals += 1
        if self._period is None or self._intervals <= self.LEARN_INTERVALS:
            # The shortest early interval: one that hides a drop is longer, never shorter.
            self._period = dt if self._period is None else min(self._period, dt)
            return 0
        if dt > 1.5 * self._period:
            return max(0, round(dt / self._period) - 1)
        self._period += 0.1 * (dt - self._period)  # follow a slowly drifting frame rate
        return 0


class GenicamCamera(FrameSource):
    """A camera selected from a GenTL producer by serial number, id or user-defined name."""

    def __init__(self, cfg: GenicamSource) -> None:
        super().__init__()
        self.cfg = cfg
        self.device_id: str | None = None
        self._harvester: Harvester | None = None
        self._ia: ImageAcquirer | None = None
        self._gaps = ProducerGaps(use_timestamps=cfg.trigger_mode == "off")
        self._held: RawFrame | None = None
        self._timeouts = 0
        self._software_trigger = False
        # Bound here, not at import, so that it follows linewatch.log.configure().
        self._log = get_logger("acquisition.genicam")

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Find, open, configure and start the camera.

        Raises :class:`ConfigError` for a missing producer or an ambiguous
        selection, :class:`DeviceNotFound` when no device matches (yet) and
        :class:`SourceLost` when the device cannot be opened (busy, unreachable).
        """
        self.close()
        try:
            self._start()
        except (GenTLError, GenApiError) as exc:
            self.close()
            raise SourceLost(f"camera {self.device_id}: cannot open: {_why(exc)}") from exc
        except BaseException:
            # A producer left open hides its devices from the next Harvester in this process.
            self.close()
            raise
        self._gaps.reset()
        self._held = None
        self._timeouts = 0
        self._log.info("camera_opened", device=self.device_id, cti=str(self.cfg.cti))

    def _start(self) -> None:
        self._harvester = _harvester(self.cfg.cti)
        info = self._select(self._harvester.device_info_list)
        self.device_id = _describe(info)["id"]
        with _keep_sigint_handler():
            self._ia = self._harvester.create(info)
        self._configure(self._ia)
        self._ia.start()

    def close(self) -> None:
        """Stop acquisition and release the device and the producer; never raises."""
        ia, harvester = self._ia, self._harvester
        self._ia = self._harvester = None
        if ia is not None:
            # A device that went away makes stop/destroy raise; there is nothing left to free.
            with suppress(GenTLError, GenApiError):
                ia.stop()
            with suppress(GenTLError, GenApiError):
                ia.destroy()
        if harvester is not None:
            with suppress(GenTLError, GenApiError):
                harvester.reset()
            self._log.info("camera_closed", device=self.device_id)

    # ------------------------------------------------------------------ reading

    def read(self) -> SourceItem | None:
        """The next frame, or the frames missed before it; None once stopping."""
        if self._held is not None:
            held, self._held = self._held, None
            return held
        while not self.stopping:
            buffer = self._fetch()
            if buffer is None:
                continue
            try:
                with buffer:  # queued back on exit; the pixels are copied out before
                    frame = self._frame_from(buffer)
                    device_ts = _device_ts_ns(buffer)
            except (GenTLError, GenApiError) as exc:
                raise SourceLost(f"camera {self.device_id}: buffer lost: {_why(exc)}") from exc
            if frame is None:
                continue
            missed = self._gaps.observe(frame.producer_frame_id, device_ts)
            if missed:
                self._held = frame
                seen = (
                    f"frame id jumped to {frame.producer_frame_id}"
                    if frame.producer_frame_id is not None
                    else "device timestamps"
                )
                return MissedFrames(
                    missed, "dropped", f"producer dropped frames ({seen})", frame.ts_ns
                )
            return frame
        return None

    def _fetch(self) -> Buffer | None:
        ia = self._require_open()
        try:
            if self._software_trigger:
                ia.remote_device.node_map.TriggerSoftware.execute()
            buffer: Buffer | None = ia.fetch(timeout=self.cfg.fetch_timeout_s)
        except TimeoutException:
            self._on_timeout(ia)
            return None
        except (GenTLError, GenApiError) as exc:
            raise SourceLost(f"camera {self.device_id}: fetch failed: {_why(exc)}") from exc
        self._timeouts = 0
        return buffer

    def _on_timeout(self, ia: ImageAcquirer) -> None:
        self._timeouts += 1
        try:
            status = ia.device.module.access_status
        except (GenTLError, GenApiError) as exc:
            raise SourceLost(f"camera {self.device_id}: not reachable: {_why(exc)}") from exc
        if status not in _OPEN_STATES:
            raise SourceLost(f"camera {self.device_id}: access status is now {status!s}")
        if self.cfg.trigger_mode != "hardware" and self._timeouts >= MAX_TIMEOUTS:
            waited = self._timeouts * self.cfg.fetch_timeout_s
            raise SourceLost(f"camera {self.device_id}: no frame for {waited:.1f} s")
        self._log.debug("camera_fetch_timeout", device=self.device_id, timeouts=self._timeouts)

    def _frame_from(self, buffer: Buffer) -> RawFrame | None:
        ts_ns = time.time_ns()
        frame_id = _frame_id(buffer)
        components = buffer.payload.components if buffer.payload is not None else []
        if not components:
            self._log.warning(
                "camera_buffer_without_image", device=self.device_id, frame_id=frame_id
            )
            return None
        image = components[0]
        rows = image.data.reshape(image.height, -1)
        try:
            pixels = to_model_pixels(rows, image.data_format, width=image.width)
        except DataError as exc:
            raise DataError(f"camera {self.device_id}: {exc}") from None
        return RawFrame(pixels, ts_ns, frame_id, self._part_id())

    def _part_id(self) -> str | None:
        name = self.cfg.part_id_chunk
        if name is None or self._ia is None:
            return None
        try:
            value = getattr(self._ia.remote_device.node_map, name).value
        except (AttributeError, GenTLError, GenApiError) as exc:
            self._log.warning(
                "camera_part_id_unreadable", device=self.device_id, node=name, error=_why(exc)
            )
            return None
        text = str(value).strip()
        return text or None

    def _require_open(self) -> ImageAcquirer:
        if self._ia is None:
            raise SourceLost(f"camera {self.cfg.cti}: not open")
        return self._ia

    # ------------------------------------------------------------------ setup

    def _select(self, devices: list[DeviceInfo]) -> DeviceInfo:
        wanted = {k: getattr(self.cfg, k) for k in _SELECTORS if getattr(self.cfg, k) is not None}
        described = [(_describe(d), d) for d in devices]
        keys = {
            "serial_number": "serial_number",
            "device_id": "id",
            "user_defined_name": "user_defined_name",
        }
        matches = [d for desc, d in described if all(desc[keys[k]] == v for k, v in wanted.items())]
        available = "; ".join(_summary(desc) for desc, _ in described) or "none"
        if not matches:
            want = ", ".join(f"{k}={v}" for k, v in wanted.items()) or "any device"
            raise DeviceNotFound(f"{self.cfg.cti}: no camera with {want}; available: {available}")
        if len(matches) > 1:
            raise ConfigError(
                f"{self.cfg.cti}: {len(matches)} cameras match, set serial_number, device_id "
                f"or user_defined_name; available: {available}"
            )
        return matches[0]

    def _configure(self, ia: ImageAcquirer) -> None:
        cfg = self.cfg
        nodes = ia.remote_device.node_map
        self._configure_trigger(nodes)
        if cfg.pixel_format is not None:
            check_format(cfg.pixel_format)
            self._set(nodes, "PixelFormat", cfg.pixel_format)
        actual = _get_node(nodes, "PixelFormat")
        if actual is not None:
            try:
                check_format(str(actual))
            except DataError as exc:
                raise ConfigError(f"camera {self.device_id}: {exc}; set pixel_format") from None
        if cfg.exposure_us is not None:
            self._set(nodes, "ExposureAuto", "Off", quiet=True)
            if not self._set(nodes, "ExposureTime", cfg.exposure_us, quiet=True):
                self._set(nodes, "ExposureTimeAbs", cfg.exposure_us)
        ia.num_buffers = max(cfg.num_buffers, ia.min_num_buffers)
        # harvesters polls the producer in slices of this many ms while fetch() waits;
        # its 1 ms default keeps a core busy on an idle, hardware-triggered line.
        ia.timeout_period_on_client_fetch_call = cfg.fetch_timeout_s
        ia.timeout_period_on_update_event_data_call = min(50, int(cfg.fetch_timeout_s * 500))

    def _configure_trigger(self, nodes: Any) -> None:
        mode = self.cfg.trigger_mode
        self._software_trigger = False
        if mode == "off":
            self._set(nodes, "TriggerMode", "Off", quiet=True)
            return
        self._set(nodes, "TriggerSelector", "FrameStart", quiet=True)
        on = self._set(nodes, "TriggerMode", "On")
        source = "Software" if mode == "software" else self.cfg.trigger_source
        on = on and self._set(nodes, "TriggerSource", source)
        if mode == "software":
            self._software_trigger = on and hasattr(nodes, "TriggerSoftware")
        if not on or (mode == "software" and not self._software_trigger):
            self._log.warning(
                "camera_trigger_unsupported",
                device=self.device_id,
                trigger=mode,
                detail="the camera runs free",
            )

    def _set(self, nodes: Any, name: str, value: Any, quiet: bool = False) -> bool:
        """Set a camera feature; False (logged) when the camera lacks it or refuses it."""
        node = getattr(nodes, name, None)
        if node is None:
            absent = self._log.debug if quiet else self._log.warning
            absent("camera_node_absent", device=self.device_id, node=name, value=value)
            return False
        try:
            node.value = value
        except (GenTLError, GenApiError) as exc:
            self._log.warning(
                "camera_node_not_writable",
                device=self.device_id,
                node=name,
                value=value,
                error=_why(exc),
            )
            return False
        self._log.info("camera_node_set", device=self.device_id, node=name, value=value)
        return True


# ---------------------------------------------------------------------- helpers


def _harvester(cti: Path) -> Harvester:
    if not cti.is_file():
        raise ConfigError(f"genicam cti {cti}: no such file")
    harvester = Harvester()
    try:
        harvester.add_file(str(cti), check_validity=True)
    except OSError as exc:
        harvester.reset()
        raise ConfigError(f"genicam cti {cti}: not a loadable GenTL producer: {exc}") from None
    harvester.update()
    return harvester


def _describe(info: DeviceInfo) -> dict[str, str]:
    props = info.property_dict
    return {
        "id": str(props.get("id_") or ""),
        "serial_number": str(props.get("serial_number") or ""),
        "user_defined_name": str(props.get("user_defined_name") or ""),
        "model": str(props.get("model") or ""),
        "vendor": str(props.get("vendor") or ""),
    }


def _summary(desc: dict[str, str]) -> str:
    extra = f", name {desc['user_defined_name']}" if desc["user_defined_name"] else ""
    return f"{desc['id']} (serial {desc['serial_number'] or '-'}{extra})"


def _frame_id(buffer: Buffer) -> int | None:
    try:
        return int(buffer.module.frame_id)
    except (GenTLError, GenApiError, TypeError, ValueError):
        return None


def _device_ts_ns(buffer: Buffer) -> int | None:
    """The device's timestamp of a buffer in ns of its own clock; None when it has none."""
    # Straight from GenTL: harvesters' Buffer.timestamp_frequency can raise AttributeError.
    module = buffer.module
    try:
        return int(module.timestamp_ns) or None
    except GenTLError:
        pass
    try:
        ticks = int(module.timestamp)
        hz = int(module.parent.parent.timestamp_frequency)
    except GenTLError:
        return None
    return ticks * 1_000_000_000 // hz if ticks and hz else None


def _get_node(nodes: Any, name: str) -> Any:
    try:
        return getattr(nodes, name).value
    except (AttributeError, GenTLError, GenApiError):
        return None


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def _keep_sigint_handler() -> Iterator[None]:
    """Undo the SIGINT handler harvesters installs when it creates an acquirer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
