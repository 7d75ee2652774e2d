"""Every fault kind, injected at run time and observed by a real client.

Value faults (stuck, drift, spike, noise) are checked against the simulator's ground
truth; link faults (dropout, slow, disconnect, corrupt, exception, bad_status) by what
the client experiences; actuator faults (ignore_writes, wrong_value) by what a client's
write and read-back see and what the ground truth recorded of each write. Every test
ends its faults (the ``plant`` fixture) and waits for the device to recover, so the next
test starts from a healthy plant.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import serial
from asyncua import Client, ua
from pymodbus.client import ModbusSerialClient, ModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.framer.rtu import FramerRTU
from support.sim import SimulatorProcess, wait_for

from fieldtwin.sim.lineproto import LineError, parse_line

FLOAT32 = ModbusTcpClient.DATATYPE.FLOAT32


@contextmanager
def tcp(sim: SimulatorProcess, timeout: float = 2.0) -> Iterator[ModbusTcpClient]:
    client = ModbusTcpClient(
        "127.0.0.1", port=sim.device("pump-station")["port"], timeout=timeout, retries=0
    )
    try:
        yield client
    finally:
        client.close()


def read_level(sim: SimulatorProcess, timeout: float = 2.0) -> float:
    with tcp(sim, timeout) as client:
        regs = client.read_input_registers(0, count=2, device_id=1).registers
        return float(client.convert_from_registers(regs, FLOAT32))


def tcp_answers(sim: SimulatorProcess) -> bool:
    try:
        read_level(sim, timeout=1.0)
    except (ModbusIOException, ConnectionException, AttributeError):
        return False
    return True


def fault_status(sim: SimulatorProcess, fault_id: int) -> str:
    for fault in sim.control("GET", "/faults")["faults"]:
        if fault["id"] == fault_id:
            return str(fault["status"])
    raise KeyError(fault_id)


def truth_of(sim: SimulatorProcess, point: str) -> dict[str, float]:
    values: dict[str, float] = sim.truth(point)["points"][point]
    return values


# -- value faults -------------------------------------------------------------------------


def test_stuck_value_over_modbus_tcp(plant: SimulatorProcess) -> None:
    before = set()
    for _ in range(5):
        before.add(read_level(plant))
        time.sleep(0.05)
    assert len(before) > 1  # measurement noise moves the reading every tick
    fault = plant.inject("stuck", point="tank-1.level")
    assert fault["device"] == "pump-station"
    wait_for(lambda: fault_status(plant, fault["id"]) == "active", message="fault active")
    readings = set()
    for _ in range(6):
        readings.add(read_level(plant))
        time.sleep(0.1)
    assert len(readings) == 1
    frozen = readings.pop()
    assert truth_of(plant, "tank-1.level")["reported"] == pytest.approx(frozen, rel=1e-6)  # float32
    plant.control("DELETE", f"/faults/{fault['id']}")
    wait_for(lambda: read_level(plant) != frozen, message="value moves again after clear")


def test_bias_drift_over_modbus_rtu(plant: SimulatorProcess) -> None:
    bus = plant.device("field-bus")

    def bias() -> float:
        client = ModbusSerialClient(bus["path"], baudrate=19200, timeout=2, retries=0)
        try:
            assert client.connect()
            raw = client.read_input_registers(0, count=1, device_id=2).registers[0]
        finally:
            client.close()
        pressure = struct.unpack(">h", struct.pack(">H", raw))[0] * 0.01
        return pressure - truth_of(plant, "pt-1.pressure")["true"]

    assert abs(bias()) < 0.1
    plant.inject("drift", point="pt-1.pressure", params={"rate": 0.05})  # bar per sim second
    wait_for(lambda: bias() > 0.5, message="bias grows past 0.5 bar")
    first = bias()
    wait_for(lambda: bias() > first + 0.3, message="bias keeps growing")
    plant.clear_faults()
    wait_for(lambda: abs(bias()) < 0.1, message="bias gone after clear")


async def test_spike_over_opcua(plant: SimulatorProcess) -> None:
    boiler = plant.device("boiler")
    async with Client(boiler["url"], timeout=10) as client:
        idx = await client.get_namespace_index(boiler["namespace"])
        node = client.get_node(ua.NodeId("boiler-1.temperature", idx))
        true = truth_of(plant, "boiler-1.temperature")["true"]
        assert abs(await node.read_value() - true) < 1.0
        plant.inject(
            "spike", point="boiler-1.temperature", duration=30.0, params={"magnitude": 100.0}
        )
        await _until(lambda: _spiked(node, plant), "spike seen over OPC-UA")
        await _until(lambda: _calm(node, plant), "spike over after its 30 s")


async def _spiked(node: object, plant: SimulatorProcess) -> bool:
    value = await node.read_value()  # type: ignore[attr-defined]
    return bool(value - truth_of(plant, "boiler-1.temperature")["true"] > 90.0)


async def _calm(node: object, plant: SimulatorProcess) -> bool:
    value = await node.read_value()  # type: ignore[attr-defined]
    return bool(abs(value - truth_of(plant, "boiler-1.temperature")["true"]) < 1.0)


async def _until(check: object, message: str, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for: {message}"
        await asyncio.sleep(0.1)


def test_noise_burst_over_serial(plant: SimulatorProcess) -> None:
    path = plant.device("ambient-1")["path"]

    def spread() -> float:
        values = []
        with serial.Serial(path, 9600, timeout=3) as port:
            for _ in range(8):
                port.reset_input_buffer()
                port.write(b"?")
                line = port.readline()
                values.append(parse_line(line).values[0])
                time.sleep(0.05)
        return statistics.pstdev(values)

    assert spread() < 1.0
    plant.inject("noise", point="ambient-1.temperature", params={"sigma": 20.0})
    wait_for(lambda: spread() > 5.0, message="noisy readings")


# -- link faults: Modbus TCP --------------------------------------------------------------


def test_dropout_slow_disconnect_on_modbus_tcp(plant: SimulatorProcess) -> None:
    plant.inject("dropout", device="pump-station")
    wait_for(lambda: not tcp_answers(plant), message="device stops answering")
    with tcp(plant, timeout=0.5) as client:
        assert client.connect()  # the port still accepts connections: the device is mute
        with pytest.raises(ModbusIOException):
            client.read_input_registers(0, count=2, device_id=1)
    plant.clear_faults()
    wait_for(lambda: tcp_answers(plant), message="answers again")

    plant.inject("slow", device="pump-station", params={"delay_ms": 1500})
    wait_for(lambda: not tcp_answers(plant), message="1 s client timeout expires")
    started = time.monotonic()
    read_level(plant, timeout=10.0)
    assert time.monotonic() - started >= 1.4
    plant.clear_faults()
    wait_for(lambda: tcp_answers(plant), message="fast again")

    plant.inject("disconnect", device="pump-station")

    def refused() -> bool:
        with tcp(plant, timeout=1.0) as client:
            return not client.connect()

    wait_for(refused, message="connection refused")
    # Someone else takes the port meanwhile: coming back fails, is counted and retried.
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", plant.device("pump-station")["port"]))
    squatter.listen()
    try:
        plant.clear_faults()
        wait_for(
            lambda: plant.status()["counters"].get("reconnect_failures", 0) > 0,
            message="failed comeback counted",
        )
    finally:
        squatter.close()
    wait_for(lambda: tcp_answers(plant), message="listening again")


def test_exception_responses(plant: SimulatorProcess) -> None:
    plant.inject("exception", point="tank-1.level", params={"code": 4})
    with tcp(plant) as client:

        def failing() -> bool:
            response = client.read_input_registers(0, count=2, device_id=1)
            return bool(response.isError() and response.exception_code == 4)

        wait_for(failing, message="exception 4 for the faulted point")
        assert not client.read_input_registers(4, count=1, device_id=1).isError()
        assert client.read_input_registers(0, count=6, device_id=1).exception_code == 4
    plant.clear_faults()
    plant.inject("exception", device="field-bus", unit_id=2, params={"code": 6})
    bus = plant.device("field-bus")
    client = ModbusSerialClient(bus["path"], baudrate=19200, timeout=2, retries=0)
    try:
        assert client.connect()

        def busy() -> bool:
            response = client.read_input_registers(0, count=2, device_id=2)
            return bool(response.isError() and response.exception_code == 6)

        wait_for(busy, message="unit 2 answers 'device busy'")
        assert not client.read_input_registers(0, count=2, device_id=1).isError()
    finally:
        client.close()


# -- link faults: Modbus RTU --------------------------------------------------------------


def _rtu_request(unit: int) -> bytes:
    body = bytes([unit, 4, 0, 0, 0, 2])
    return body + struct.pack(">H", FramerRTU.compute_CRC(body))


def _rtu_exchange(port: serial.Serial, unit: int) -> bytes:
    port.reset_input_buffer()
    port.write(_rtu_request(unit))
    answer: bytes = port.read(9)  # unit, fc, count, 4 data bytes, crc
    return answer


def _crc_ok(frame: bytes) -> bool:
    return len(frame) > 2 and FramerRTU.compute_CRC(frame[:-2]) == int.from_bytes(frame[-2:], "big")


def test_corrupt_frames_and_unit_dropout_on_rtu(plant: SimulatorProcess) -> None:
    with serial.Serial(plant.device("field-bus")["path"], 19200, timeout=1.0) as port:
        assert _crc_ok(_rtu_exchange(port, 1))
        plant.inject("corrupt", device="field-bus", unit_id=1)
        wait_for(lambda: not _crc_ok(_rtu_exchange(port, 1)), message="bad CRC from unit 1")
        corrupt = _rtu_exchange(port, 1)
        assert len(corrupt) == 9
        assert corrupt[:2] == bytes([1, 4])  # a whole answer, only the CRC is wrong
        assert _crc_ok(_rtu_exchange(port, 2))  # unit 2 on the same bus is fine
        plant.clear_faults()
        wait_for(lambda: _crc_ok(_rtu_exchange(port, 1)), message="good CRC again")

        fault = plant.inject("dropout", device="field-bus", unit_id=2, duration=20.0)
        wait_for(lambda: _rtu_exchange(port, 2) == b"", message="unit 2 silent")
        assert _crc_ok(_rtu_exchange(port, 1))
        # 20 simulated seconds pass in 2 wall seconds at --speed 10: it ends by itself
        wait_for(lambda: _crc_ok(_rtu_exchange(port, 2)), message="unit 2 back after the window")
        assert fault_status(plant, fault["id"]) == "ended"


def test_rtu_bus_disconnect_removes_the_port(plant: SimulatorProcess) -> None:
    path = plant.device("field-bus")["path"]
    with serial.Serial(path, 19200, timeout=1.0) as port:
        assert _crc_ok(_rtu_exchange(port, 1))
        plant.inject("disconnect", device="field-bus")
        wait_for(lambda: not os.path.lexists(path), message="symlink removed")
        with pytest.raises(serial.SerialException, match="Input/output error"):
            port.write(_rtu_request(1))  # the "adaptor" is unplugged
    plant.clear_faults()
    wait_for(lambda: os.path.lexists(path), message="symlink back")
    with serial.Serial(path, 19200, timeout=1.0) as port:
        wait_for(lambda: _crc_ok(_rtu_exchange(port, 1)), message="bus answers on the new pty")


# -- link faults: serial line sensor ------------------------------------------------------


def test_serial_faults(plant: SimulatorProcess) -> None:
    path = plant.device("ambient-1")["path"]
    with serial.Serial(path, 9600, timeout=2.5) as port:
        parse_line(port.readline())
        plant.inject("corrupt", device="ambient-1")

        def corrupted() -> bool:
            port.reset_input_buffer()
            port.write(b"?\r\n")
            try:
                parse_line(port.readline())
            except LineError:
                return True
            return False

        wait_for(corrupted, message="checksum errors")
        plant.clear_faults()
        wait_for(lambda: not corrupted(), message="good lines again")

        plant.inject("dropout", device="ambient-1")
        time.sleep(0.3)
        port.reset_input_buffer()
        port.write(b"?")
        assert port.readline() == b""  # neither an answer nor a periodic line in 2.5 s
        plant.clear_faults()
        wait_for(lambda: port.readline() != b"", message="lines again")

        plant.inject("slow", device="ambient-1", params={"delay_ms": 1000})
        time.sleep(0.3)
        port.reset_input_buffer()
        started = time.monotonic()
        port.write(b"?")
        parse_line(port.readline())
        assert time.monotonic() - started >= 0.9
        plant.clear_faults()

        plant.inject("disconnect", device="ambient-1")
        wait_for(lambda: not os.path.lexists(path), message="symlink removed")
        with pytest.raises(serial.SerialException):
            port.readline()
    plant.clear_faults()
    wait_for(lambda: os.path.lexists(path), message="symlink back")
    with serial.Serial(path, 9600, timeout=3) as port:
        # the first line may carry the head of one the disconnect cut ("$$AMB,..."),
        # as on a real line: the next whole line is what counts
        first = port.readline()
        line = first if first.count(b"$") == 1 else port.readline()
        assert parse_line(line).talker == "AMB"


# -- link faults: OPC-UA ------------------------------------------------------------------


async def test_opcua_bad_status_dropout_slow_disconnect(plant: SimulatorProcess) -> None:
    boiler = plant.device("boiler")
    url = boiler["url"]
    async with Client(url, timeout=10) as client:
        idx = await client.get_namespace_index(boiler["namespace"])
        pressure = client.get_node(ua.NodeId("boiler-1.pressure", idx))
        temperature = client.get_node(ua.NodeId("boiler-1.temperature", idx))
        plant.inject("bad_status", point="boiler-1.pressure", params={"status": "BadSensorFailure"})

        async def bad() -> bool:
            value = await pressure.read_data_value(raise_on_bad_status=False)
            return bool(value.StatusCode.value == ua.StatusCodes.BadSensorFailure)

        await _until(bad, "BadSensorFailure on Pressure")
        assert isinstance(await temperature.read_value(), float)  # other nodes stay good
        plant.clear_faults()

        async def good() -> bool:
            value = await pressure.read_data_value(raise_on_bad_status=False)
            return bool(value.StatusCode.is_good())

        await _until(good, "Pressure good again")

        # asyncua's client probes the server every second and drops a connection whose
        # probe takes longer, so stay under that: 700 ms per answer.
        plant.inject("slow", device="boiler", params={"delay_ms": 700})
        await asyncio.sleep(0.5)
        started = time.monotonic()
        await temperature.read_value()
        assert time.monotonic() - started >= 0.65
        plant.clear_faults()

    async with Client(url, timeout=1) as client:
        node = client.get_node(ua.NodeId("boiler-1.temperature", idx))
        await node.read_value()
        plant.inject("dropout", device="boiler")

        async def read_until_it_fails() -> None:
            for _ in range(200):
                await node.read_value()
                await asyncio.sleep(0.05)

        with pytest.raises((TimeoutError, ua.UaError)):
            await read_until_it_fails()
    plant.clear_faults()

    async def readable() -> bool:
        try:
            async with Client(url, timeout=2) as fresh:
                await fresh.get_node(ua.NodeId("boiler-1.temperature", idx)).read_value()
        except (OSError, TimeoutError, ua.UaError):
            return False
        return True

    await _until(readable, "OPC-UA answers after the dropout")

    plant.inject("disconnect", device="boiler")

    async def refused() -> bool:
        try:
            async with Client(url, timeout=2):
                return False
        except (OSError, TimeoutError):
            return True

    await _until(refused, "OPC-UA endpoint refuses connections")
    plant.clear_faults()
    await _until(readable, "OPC-UA endpoint back")


# -- actuator faults ----------------------------------------------------------------------


def test_actuator_faults_over_modbus_tcp(plant: SimulatorProcess) -> None:
    point = "valve-1.position"  # holding register 1, uint16, scale 0.1
    since = plant.status()["tick"]
    with tcp(plant) as client:

        def register() -> int:
            return int(client.read_holding_registers(1, count=1, device_id=1).registers[0])

        assert register() == 500
        fault = plant.inject("ignore_writes", point=point)
        assert fault["device"] == "pump-station"
        assert not client.write_register(1, 200, device_id=1).isError()  # acknowledged...
        assert register() == 500  # ...but the read-back straight away shows the old value
        wait_for(lambda: len(plant.writes(point, since_tick=since)) == 1, message="recorded")
        time.sleep(0.5)  # five simulated seconds: the valve does not move
        assert register() == 500
        assert truth_of(plant, point)["true"] == pytest.approx(50.0)
        plant.control("DELETE", f"/faults/{fault['id']}")

        # Goes elsewhere once, then works again: a rollback to 50 % lands.
        once = plant.inject("wrong_value", point=point, params={"offset": 15.0, "count": 1})
        assert not client.write_register(1, 200, device_id=1).isError()
        assert register() == 350
        wait_for(lambda: truth_of(plant, point)["true"] == pytest.approx(35.0), message="35 %")
        assert not client.write_register(1, 500, device_id=1).isError()
        assert register() == 500
        wait_for(lambda: truth_of(plant, point)["true"] == pytest.approx(50.0), message="50 %")
    wait_for(lambda: len(plant.writes(point, since_tick=since)) == 3, message="all recorded")
    records = plant.writes(point, since_tick=since)
    assert [
        (w["status"], w["value"], w["before"], w["result"], w["fault_id"]) for w in records
    ] == [
        ("ignored", pytest.approx(20.0), pytest.approx(50.0), pytest.approx(50.0), fault["id"]),
        ("altered", pytest.approx(20.0), pytest.approx(50.0), pytest.approx(35.0), once["id"]),
        ("applied", pytest.approx(50.0), pytest.approx(35.0), pytest.approx(50.0), None),
    ]
    assert {(w["device"], w["protocol"], w["variable"]) for w in records} == {
        ("pump-station", "modbus-tcp", point)
    }
    assert records[0]["tick"] < records[1]["tick"] < records[2]["tick"]
    wait_for(lambda: fault_status(plant, once["id"]) == "ended", message="used up, it ends")


async def test_actuator_faults_on_the_opcua_heater_setpoint(plant: SimulatorProcess) -> None:
    point = "boiler-1.heater_power_sp"
    boiler = plant.device("boiler")
    since = plant.status()["tick"]

    def write_of(value: float) -> ua.DataValue:
        return ua.DataValue(ua.Variant(value, ua.VariantType.Double))

    async with Client(boiler["url"], timeout=10) as client:
        idx = await client.get_namespace_index(boiler["namespace"])
        node = client.get_node(ua.NodeId(point, idx))
        power = client.get_node(ua.NodeId("boiler-1.heater_power", idx))
        assert await node.read_value() == 30.0
        wrong = plant.inject("wrong_value", point=point, params={"offset": -5.0})
        await node.write_value(write_of(40.0))  # answered Good (asyncua raises on Bad)
        assert await node.read_value() == 35.0  # the node shows where the actuator went
        await _until(lambda: _near(power, 35.0), "heater power follows 35 kW, not 40")

        plant.clear_faults()
        ignore = plant.inject("ignore_writes", point=point)
        await node.write_value(write_of(45.0))
        assert await node.read_value() == 35.0
        await asyncio.sleep(0.5)  # five simulated seconds, 2.5 heater time constants
        assert await node.read_value() == 35.0
        assert truth_of(plant, "boiler-1.heater_power")["true"] == pytest.approx(35.0, abs=0.1)

        plant.clear_faults()
        await node.write_value(write_of(30.0))  # back where it was
        assert await node.read_value() == 30.0
    wait_for(lambda: len(plant.writes(point, since_tick=since)) == 3, message="all recorded")
    records = plant.writes(point, since_tick=since)
    assert [
        (w["status"], w["value"], w["before"], w["result"], w["fault_id"]) for w in records
    ] == [
        ("altered", 40.0, 30.0, 35.0, wrong["id"]),
        ("ignored", 45.0, 35.0, 35.0, ignore["id"]),
        ("applied", 30.0, 35.0, 30.0, None),
    ]
    assert {(w["device"], w["protocol"]) for w in records} == {("boiler", "opcua")}


async def _near(node: object, value: float) -> bool:
    return bool(abs(await node.read_value() - value) < 0.05)  # type: ignore[attr-defined]
