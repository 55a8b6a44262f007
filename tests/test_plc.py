"""The reject-gate consumer against a real Redis and a real Modbus TCP server (pymodbus)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from structlog.testing import capture_logs

from linewatch.cli import main as cli_main
from linewatch.config import ModbusConfig, PlcConfig, RedisConfig
from linewatch.consumers.drivers import DriverError, LogDriver, ModbusCoilDriver
from linewatch.consumers.group import GroupReader
from linewatch.consumers.plc import PlcConsumer
from linewatch.streams.records import RejectRecord, StreamKeys
from linewatch.streams.server import EmbeddedRedis
from linewatch.streams.writer import StreamWriter
from linewatch.testing import free_port, read_records, sample_batch, wait_until

UNIT = 1
WRITE_SINGLE_COIL = 5


class CoilLog:
    """Every coil write the Modbus server receives, in order, as (coil, value)."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bool]] = []
        self._lock = threading.Lock()

    async def action(
        self, function_code: int, start_address: int, address: int, count: int,
        registers: list[int], values: list[int] | list[bool] | None,
    ) -> None:
        # Called for the write (values given) and again for its read-back (None).
        if function_code == WRITE_SINGLE_COIL and values is not None:
            with self._lock:
                self.writes.append((address, bool(values[0])))

    def snapshot(self) -> list[tuple[int, bool]]:
        with self._lock:
            return list(self.writes)


@contextmanager
def modbus_server(coils: CoilLog, port: int | None = None) -> Iterator[int]:
    """A pymodbus TCP server on 127.0.0.1 (its own thread and event loop); yields its port."""
    port = port or free_port()
    device = SimDevice(
        id=UNIT,
        simdata=(
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],
            [SimData(0, values=False, datatype=DataType.BITS)],
            [SimData(0, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, values=0, datatype=DataType.REGISTERS)],
        ),
        action=coils.action,
    )
    loop = asyncio.new_event_loop()
    listening = threading.Event()
    servers: list[ModbusTcpServer] = []

    async def serve() -> None:
        server = ModbusTcpServer(device, address=("127.0.0.1", port))
        servers.append(server)
        await server.serve_forever(background=True)
        listening.set()
        await server.serving

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert listening.wait(10), "modbus server did not start"
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(servers[0].shutdown(), loop).result(10)
        thread.join(10)
        loop.close()


def plc_config(port: int = 502, **overrides: object) -> PlcConfig:
    base: dict[str, object] = {
        "driver": "modbus",
        "consumer": "gate-b",
        "pulse_ms": 1.0,
        "claim_idle_ms": 100,
        "claim_interval_s": 0.05,
        "modbus": ModbusConfig(port=port, unit=UNIT, coil=3, camera_coils={"cam1": 5}),
    }
    return PlcConfig.model_validate({**base, **overrides})


def consumer_for(client: redis.Redis, line: str, cfg: PlcConfig, **kwargs: object) -> PlcConsumer:
    driver = ModbusCoilDriver(cfg.modbus, cfg.pulse_ms) if cfg.driver == "modbus" else LogDriver()
    return PlcConsumer(client, line, cfg, driver, block_ms=20, **kwargs)  # type: ignore[arg-type]


def write_rejects(client: redis.Redis, line: str, tmp_path: Path, *cameras: str) -> None:
    writer = StreamWriter(client, line, RedisConfig(spool_dir=tmp_path / "spool"))
    for seq, camera in enumerate(cameras):
        batch = sample_batch(camera, seq, reject=True)
        assert writer.write_verdict(batch.verdict, batch.defects, batch.reject)


def pending(client: redis.Redis, line: str, group: str = "plc") -> int:
    return int(client.xpending(StreamKeys(line).rejects, group)["pending"])


def poll_until(consumer: PlcConsumer, condition: object, what: str) -> None:
    wait_until(lambda: consumer.poll() >= 0 and condition(), timeout_s=10, what=what)  # type: ignore[operator]


def test_rejects_written_before_start_pulse_their_coils_and_are_acked(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    coils = CoilLog()
    # Written before the group exists: created at id 0, it still delivers them.
    write_rejects(redis_client, line_name, tmp_path, "cam0", "cam1")
    with modbus_server(coils) as port:
        consumer = consumer_for(redis_client, line_name, plc_config(port))
        poll_until(consumer, lambda: consumer.stats.signalled == 2, "two rejects signalled")
        consumer.close()
    assert coils.snapshot() == [(3, True), (3, False), (5, True), (5, False)]
    assert pending(redis_client, line_name) == 0
    assert consumer.stats.failed == consumer.stats.late == 0


def test_entries_of_a_crashed_consumer_are_claimed_and_signalled(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    coils = CoilLog()
    keys = StreamKeys(line_name)
    crashed = GroupReader(redis_client, [keys.rejects], "plc", "gate-a", block_ms=20)
    crashed.ensure_groups()
    write_rejects(redis_client, line_name, tmp_path, "cam0", "cam0")
    assert len(crashed.read_new()) == 2  # read, never acknowledged: gate-a "crashed"
    assert pending(redis_client, line_name) == 2
    with modbus_server(coils) as port:
        consumer = consumer_for(redis_client, line_name, plc_config(port, consumer="gate-b"))
        poll_until(consumer, lambda: consumer.stats.signalled == 2, "claimed rejects signalled")
        consumer.close()
    assert coils.snapshot() == [(3, True), (3, False)] * 2
    assert pending(redis_client, line_name) == 0
    assert crashed.read_own_pending() == []  # gate-a has nothing left to redo


def test_restart_under_the_same_name_redoes_its_pending_rejects_with_the_log_driver(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    keys = StreamKeys(line_name)
    before_crash = GroupReader(redis_client, [keys.rejects], "plc", "gate-a", block_ms=20)
    before_crash.ensure_groups()
    write_rejects(redis_client, line_name, tmp_path, "cam0")
    (entry,) = before_crash.read_new()
    # Restarted as gate-a with a claim idle time far away: its own pending list is re-read.
    cfg = plc_config(driver="log", consumer="gate-a", claim_idle_ms=3_600_000)
    consumer = consumer_for(redis_client, line_name, cfg)
    with capture_logs() as logs:
        consumer.poll()
    signals = [e for e in logs if e["event"] == "reject_signal"]
    assert [(s["frame_id"], s["camera"], s["reason"]) for s in signals] == [
        ("cam0:0", "cam0", "anomaly")
    ]
    assert RejectRecord.from_fields(entry.fields).frame_id == "cam0:0"
    assert pending(redis_client, line_name) == 0


def test_failed_signal_stays_pending_and_is_retried_when_the_plc_is_back(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    coils = CoilLog()
    port = free_port()  # nothing listens there yet
    consumer = consumer_for(redis_client, line_name, plc_config(port, modbus=ModbusConfig(
        port=port, unit=UNIT, coil=3, timeout_s=0.5)))
    write_rejects(redis_client, line_name, tmp_path, "cam0")
    poll_until(consumer, lambda: consumer.stats.failed >= 1, "signal failed")
    assert consumer.stats.signalled == 0
    assert pending(redis_client, line_name) == 1
    with modbus_server(coils, port):
        poll_until(consumer, lambda: consumer.stats.signalled == 1, "retried after claim")
        consumer.close()
    assert coils.snapshot() == [(3, True), (3, False)]
    assert pending(redis_client, line_name) == 0


def test_late_reject_is_signalled_and_stale_one_is_only_logged(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    write_rejects(redis_client, line_name, tmp_path, "cam0")
    (reject,) = read_records(redis_client, line_name, RejectRecord)
    deadline_ns = reject.deadline_ns
    cfg = plc_config(driver="log", stale_after_s=10.0)
    late = consumer_for(redis_client, line_name, cfg, clock_ns=lambda: deadline_ns + 2 * 10**9)
    with capture_logs() as logs:
        late.poll()
    assert (late.stats.late, late.stats.signalled) == (1, 1)
    assert [e["late_ms"] for e in logs if e["event"] == "reject_late"] == [2000.0]

    line2 = line_name + "-stale"
    write_rejects(redis_client, line2, tmp_path, "cam0")
    stale = consumer_for(redis_client, line2, cfg, clock_ns=lambda: deadline_ns + 10**12)
    with capture_logs() as logs:
        stale.poll()
    assert (stale.stats.stale, stale.stats.signalled) == (1, 0)
    assert [e["event"] for e in logs if e["event"].startswith("reject_")] == ["reject_stale"]
    assert pending(redis_client, line2) == 0


def test_malformed_reject_is_acked_not_retried(
    redis_client: redis.Redis, line_name: str
) -> None:
    redis_client.xadd(StreamKeys(line_name).rejects, {"frame_id": "cam0:1", "seq": "x"})
    consumer = consumer_for(redis_client, line_name, plc_config(driver="log"))
    consumer.poll()
    assert (consumer.stats.malformed, consumer.stats.signalled) == (1, 0)
    assert pending(redis_client, line_name) == 0


def test_group_is_recreated_when_redis_lost_the_stream(
    redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    consumer = consumer_for(redis_client, line_name, plc_config(driver="log"))
    consumer.poll()
    redis_client.delete(StreamKeys(line_name).rejects)  # as after a restart without persistence
    consumer.poll()  # NOGROUP -> group made again, no exception
    write_rejects(redis_client, line_name, tmp_path, "cam0")
    poll_until(consumer, lambda: consumer.stats.signalled == 1, "signalled after recreation")


def test_cli_names_a_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plc", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml" in capsys.readouterr().err


def test_worker_process_signals_and_stops_cleanly_on_sigterm(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, line_name: str, tmp_path: Path
) -> None:
    config = tmp_path / "line.toml"
    config.write_text(
        f'line = "{line_name}"\n[[cameras]]\nid = "cam0"\n[cameras.source]\nkind = "synth"\n'
        '[plc]\ndriver = "log"\nconsumer = "gate-w"\n[logging]\nformat = "json"\n'
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.plc", str(config), "--redis-url", redis_server.url],
        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        keys = StreamKeys(line_name)
        wait_until(lambda: redis_client.exists(keys.rejects), timeout_s=20, what="group made")
        write_rejects(redis_client, line_name, tmp_path, "cam0")
        wait_until(
            lambda: _delivered_and_acked(redis_client, keys.rejects), timeout_s=20,
            what="reject acked by the worker",
        )
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    logs = stdout + stderr  # (where logs go is linewatch.log's business)
    assert "reject_signal" in logs and "consumer_stopped" in logs


def _delivered_and_acked(client: redis.Redis, stream: str) -> bool:
    (group,) = client.xinfo_groups(stream)
    last_id = client.xrevrange(stream, count=1)[0][0]  # type: ignore[index]
    return bool(group["last-delivered-id"] == last_id and group["pending"] == 0)



def test_modbus_driver_reconnects_after_the_plc_restarted() -> None:
    reject = sample_batch("cam0", 0).reject
    assert reject is not None
    first, second = CoilLog(), CoilLog()
    port = free_port()
    driver = ModbusCoilDriver(ModbusConfig(port=port, unit=UNIT, coil=2, timeout_s=0.5), 1.0)
    with modbus_server(first, port):
        driver.act(reject)
    with modbus_server(second, port):
        # The old connection is dead: an act may fail once, then one reconnects.
        wait_until(lambda: _act(driver, reject), what="act on the restarted PLC")
    driver.close()
    assert first.snapshot() == [(2, True), (2, False)]
    assert second.snapshot()[-2:] == [(2, True), (2, False)]


def _act(driver: ModbusCoilDriver, reject: RejectRecord) -> bool:
    try:
        driver.act(reject)
    except DriverError:
        return False
    return True


def test_own_pending_entries_are_read_page_by_page(
    redis_client: redis.Redis, line_name: str
) -> None:
    streams = [f"{line_name}:a", f"{line_name}:b"]
    reader = GroupReader(redis_client, streams, "g", "c", count=2, block_ms=20)
    reader.ensure_groups()
    for i in range(5):
        redis_client.xadd(streams[0], {"i": str(i)})
    redis_client.xadd(streams[1], {"i": "b"})
    delivered = reader.read_new() + reader.read_new()
    assert len(delivered) == 5  # count applies per stream and call: 2 + 1, then 2
    again = GroupReader(redis_client, streams, "g", "c", count=2, block_ms=20).read_own_pending()
    assert sorted(again, key=lambda e: (e.stream, e.id)) == sorted(
        delivered, key=lambda e: (e.stream, e.id)
    )
