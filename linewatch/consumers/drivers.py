"""Output drivers of the reject gate: what ``linewatch plc`` does for each rejected part.

Every driver has one contract, :meth:`OutputDriver.act`: signal the gate for one
reject, or raise :class:`DriverError`. The consumer acknowledges a reject only after
``act`` returned, so a reject whose signal failed stays pending and is retried.

- :class:`LogDriver` only logs ``reject_signal`` (commissioning, dry runs, tests).
- :class:`ModbusCoilDriver` pulses a coil of a PLC over Modbus TCP.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException

from linewatch.config import ModbusConfig, PlcConfig
from linewatch.errors import LinewatchError
from linewatch.log import get_logger
from linewatch.streams.records import RejectRecord

log = get_logger("plc_driver")


class DriverError(LinewatchError):
    """The gate could not be signalled; the reject stays pending and is retried."""


class OutputDriver(ABC):
    """Signals the reject gate; one instance per consumer, used from one thread."""

    @abstractmethod
    def act(self, reject: RejectRecord) -> None:
        """Signal the gate for ``reject``; raise :class:`DriverError` when that failed."""

    def close(self) -> None:  # noqa: B027 - most drivers hold nothing to release
        """Release connections; the driver is not used afterwards."""


class LogDriver(OutputDriver):
    """Logs ``reject_signal`` for each reject and does nothing else."""

    def act(self, reject: RejectRecord) -> None:
        """Log the reject as an info event ``reject_signal``."""
        log.info(
            "reject_signal", frame_id=reject.frame_id, part_id=reject.part_id,
            camera=reject.camera, reason=reject.reason,
        )


class ModbusCoilDriver(OutputDriver):
    """Pulses a coil of a Modbus TCP server: on, ``pulse_ms``, off.

    The connection is opened on first use and again after any failure. If switching
    the coil off fails, it is tried once more on a fresh connection before
    :class:`DriverError` is raised, because a coil left on would reject every part.
    """

    def __init__(
        self,
        cfg: ModbusConfig,
        pulse_ms: float,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cfg = cfg
        self.pulse_s = pulse_ms / 1000.0
        self._sleep = sleep
        # retries=0: a request that times out fails at once; the reject stays pending and
        # is claimed again, which is the retry that matters.
        self._client = ModbusTcpClient(cfg.host, port=cfg.port, timeout=cfg.timeout_s, retries=0)

    def coil_for(self, camera: str) -> int:
        """The coil of ``camera``'s gate: ``camera_coils[camera]``, else ``coil``."""
        return self.cfg.camera_coils.get(camera, self.cfg.coil)

    def act(self, reject: RejectRecord) -> None:
        """Pulse the camera's coil; raises :class:`DriverError` if either write failed."""
        coil = self.coil_for(reject.camera)
        try:
            self._write(coil, True)
            self._sleep(self.pulse_s)
        finally:
            # Also after a failed "on": the request may have reached the PLC all the same.
            self._switch_off(coil)
        log.info("reject_signal", frame_id=reject.frame_id, part_id=reject.part_id,
                 camera=reject.camera, reason=reject.reason, coil=coil)

    def close(self) -> None:
        """Close the connection to the PLC."""
        self._client.close()

    def _switch_off(self, coil: int) -> None:
        try:
            self._write(coil, False)
        except DriverError:
            self._write(coil, False)  # once more, on a fresh connection

    def _write(self, coil: int, value: bool) -> None:
        where = f"modbus {self.cfg.host}:{self.cfg.port} unit {self.cfg.unit} coil {coil}"
        try:
            response = self._client.write_coil(coil, value, device_id=self.cfg.unit)
        except (ModbusException, OSError) as exc:
            self._client.close()  # reconnect on the next write
            raise DriverError(f"{where}: write {value} failed: {exc}") from exc
        if response.isError():
            raise DriverError(f"{where}: write {value} refused: {response}")


def make_driver(cfg: PlcConfig) -> OutputDriver:
    """The driver ``cfg.driver`` names."""
    if cfg.driver == "modbus":
        return ModbusCoilDriver(cfg.modbus, cfg.pulse_ms)
    return LogDriver()
