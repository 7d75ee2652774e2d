"""Real clients against the running water-plant simulator: every protocol, closed loop.

Clients are pymodbus (TCP and RTU on the pty), pyserial on the ambient pty and asyncua.
Values are compared with the simulator's own ground truth from the control interface.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import serial
from asyncua import Client, ua
from pymodbus.client import ModbusSerialClient, ModbusTcpClient
from pymodbus.exceptions import ModbusIOException
from support.sim import SimulatorProcess, wait_for

from fieldtwin.sim.lineproto import parse_line

FLOAT32 = ModbusTcpClient.DATATYPE.FLOAT32


@contextmanager
def tcp_client(sim: SimulatorProcess, timeout: float = 3.0) -> Iterator[ModbusTcpClient]:
    client = ModbusTcpClient(
        "127.0.0.1", port=sim.device("pump-station")["port"], timeout=timeout, retries=0
    )
    assert client.connect()
    try:
        yield client
    finally:
        client.close()


@contextmanager
def rtu_client(sim: SimulatorProcess, timeout: float = 2.0) -> Iterator[ModbusSerialClient]:
    bus = sim.device("field-bus")
    client = ModbusSerialClient(bus["path"], baudrate=bus["baudrate"], timeout=timeout, retries=0)
    assert client.connect()
    try:
        yield client
    finally:
        client.close()


def reported(sim: SimulatorProcess, point: str) -> float:
    return float(sim.truth(point)["points"][point]["reported"])


def true_value(sim: SimulatorProcess, point: str) -> float:
    return float(sim.truth(point)["points"][point]["true"])


def test_endpoints_json(water_plant: SimulatorProcess) -> None:
    ep = water_plant.endpoints
    assert ep["scenario"] == "water-plant"
    assert (ep["seed"], ep["speed"], ep["tick_s"]) == (1, 10.0, 0.1)
    assert ep["ground_truth"].endswith("ground-truth.duckdb")
    protocols = {d["id"]: d["protocol"] for d in ep["devices"]}
    assert protocols == {
        "pump-station": "modbus-tcp",
        "field-bus": "modbus-rtu",
        "ambient-1": "serial-line",
        "boiler": "opcua",
    }
    assert water_plant.device("field-bus")["unit_ids"] == [1, 2]
    assert water_plant.device("field-bus")["pty"].startswith("/dev/pts/")
    assert water_plant.device("boiler")["namespace"] == "urn:fieldtwin:sim:water-plant"
    assert water_plant.device("boiler")["url"].endswith("/fieldtwin/boiler")


def test_modbus_tcp_serves_the_register_map(plant: SimulatorProcess) -> None:
    with tcp_client(plant) as client:
        regs = client.read_input_registers(0, count=6, device_id=1).registers
        level = client.convert_from_registers(regs[0:2], FLOAT32)
        level_raw = client.convert_from_registers(regs[2:4], FLOAT32, word_order="little")
        speed, current = regs[4], client.convert_from_registers([regs[5]], client.DATATYPE.INT16)
        holding = client.read_holding_registers(0, count=2, device_id=1).registers
        running = client.read_coils(0, count=1, device_id=1).bits[0]
        high = client.read_discrete_inputs(0, count=1, device_id=1).bits[0]
        gap_free = client.read_input_registers(6, count=1, device_id=1)
        other_unit = client.read_input_registers(0, count=1, device_id=7)
    assert level == level_raw  # one reading in two word orders
    truth = plant.truth()["points"]
    assert level == pytest.approx(truth["tank-1.level"]["true"], abs=0.05)
    assert speed == pytest.approx(truth["pump-1.speed"]["true"], abs=50)
    assert float(current) * 0.01 == pytest.approx(truth["pump-1.motor_current"]["true"], abs=1.0)
    assert truth["pump-1.motor_current"]["noise"] == pytest.approx(0.05)  # the scenario's sigma
    assert holding[0] == round(truth["pump-1.speed_sp"]["reported"])
    assert holding[1] * 0.1 == pytest.approx(truth["valve-1.position"]["reported"], abs=0.05)
    assert running is True
    assert high is False
    assert gap_free.isError()
    assert gap_free.exception_code == 2  # past the table's extent
    assert other_unit.isError()
    assert other_unit.exception_code == 11  # no such unit behind this address


def test_closed_loop_pump_speed_moves_the_level(plant: SimulatorProcess) -> None:
    with tcp_client(plant) as client:
        start = true_value(plant, "tank-1.level")
        assert not client.write_register(0, 1800, device_id=1).isError()
        assert client.read_holding_registers(0, count=1, device_id=1).registers == [1800]
        wait_for(lambda: true_value(plant, "pump-1.speed") > 1700, message="pump speeds up")

        def read_level() -> float:
            regs = client.read_input_registers(0, count=2, device_id=1).registers
            return float(client.convert_from_registers(regs, FLOAT32))

        wait_for(lambda: read_level() > start + 0.05, message="level read over Modbus rises")
        refused = client.write_register(0, 5000, device_id=1)
        assert refused.isError()
        assert refused.exception_code == 3  # outside 0..1800
        # valve through write-multiple (FC 16): 45.0 % is 450 at scale 0.1
        assert not client.write_registers(1, [450], device_id=1).isError()
        wait_for(lambda: true_value(plant, "valve-1.position") == 45.0, message="valve moves")
        # stop the pump through its coil; the level falls
        assert not client.write_coil(0, False, device_id=1).isError()
        wait_for(lambda: true_value(plant, "pump-1.speed") < 100, message="pump stops")
        high = true_value(plant, "tank-1.level")
        wait_for(lambda: read_level() < high - 0.05, message="level falls")
        assert not client.write_coil(0, True, device_id=1).isError()
        assert not client.write_registers(0, [900, 500], device_id=1).isError()


def near_truth(
    point: str, value: float, before: dict[str, Any], after: dict[str, Any], tol: float
) -> bool:
    """``value`` lies within ``tol`` of the true values seen just before and after the read."""
    lo = min(before[point]["true"], after[point]["true"]) - tol
    hi = max(before[point]["true"], after[point]["true"]) + tol
    return lo <= value <= hi


def test_modbus_rtu_bus_has_two_units(plant: SimulatorProcess) -> None:
    with rtu_client(plant, timeout=1.0) as client:
        before = plant.truth()["points"]
        flow_regs = client.read_input_registers(0, count=4, device_id=1).registers
        pt_regs = client.read_input_registers(0, count=2, device_id=2).registers
        after = plant.truth()["points"]
        with pytest.raises(ModbusIOException):  # unit 3 is not on the bus: nobody answers
            client.read_input_registers(0, count=1, device_id=3)
    flow = client.convert_from_registers(flow_regs[0:2], FLOAT32, word_order="little")
    total = client.convert_from_registers(flow_regs[2:4], client.DATATYPE.UINT32)
    pressure = client.convert_from_registers([pt_regs[0]], client.DATATYPE.INT16)
    assert near_truth("flowmeter-1.flow", float(flow), before, after, 0.5)
    assert near_truth("flowmeter-1.total", float(total) * 0.001, before, after, 0.002)
    assert near_truth("pt-1.pressure", float(pressure) * 0.01, before, after, 0.05)
    assert near_truth("pt-1.temperature", pt_regs[1] * 0.1, before, after, 0.5)


def test_serial_line_sensor(plant: SimulatorProcess) -> None:
    with serial.Serial(plant.device("ambient-1")["path"], 9600, timeout=5) as port:
        first = parse_line(port.readline())
        second = parse_line(port.readline())
        assert first.talker == "AMB"
        assert second.seq == (first.seq + 1) % 65536
        port.write(b"?\r\n")
        answered = parse_line(port.readline())
        assert answered.seq == (second.seq + 1) % 65536
    truth = plant.truth()["points"]
    temperature, humidity = answered.values
    assert temperature == pytest.approx(truth["ambient-1.temperature"]["true"], abs=1.0)
    assert humidity == pytest.approx(truth["ambient-1.humidity"]["true"], abs=2.0)


async def test_opcua_boiler(plant: SimulatorProcess) -> None:
    boiler = plant.device("boiler")
    async with Client(boiler["url"], timeout=10) as client:
        idx = await client.get_namespace_index(boiler["namespace"])
        obj = await client.nodes.objects.get_child(f"{idx}:Boiler1")
        children = await obj.get_children()
        names = sorted([(await n.read_browse_name()).Name for n in children])
        assert names == ["HeaterPower", "HeaterPowerSetpoint", "Pressure", "Temperature"]
        # agents address nsu=<namespace>;s=<id> and resolve the index at connect
        temperature = client.get_node(ua.NodeId("boiler-1.temperature", idx))
        pressure = await obj.get_child(f"{idx}:Pressure")
        setpoint = client.get_node(ua.NodeId("boiler-1.heater_power_sp", idx))
        truth = plant.truth()["points"]
        assert await temperature.read_value() == pytest.approx(
            truth["boiler-1.temperature"]["true"], abs=1.0
        )
        assert await pressure.read_value() == pytest.approx(
            truth["boiler-1.pressure"]["true"], abs=0.1
        )
        data = await temperature.read_data_value()
        assert data.SourceTimestamp is not None

        await setpoint.write_value(ua.DataValue(ua.Variant(45.0, ua.VariantType.Double)))
        assert await setpoint.read_value() == 45.0
        deadline = time.monotonic() + 30
        while true_value(plant, "boiler-1.heater_power") < 44.0:
            assert time.monotonic() < deadline, "heater power never followed the setpoint"
            await asyncio.sleep(0.1)
        with pytest.raises(ua.UaStatusCodeError) as out_of_range:
            await setpoint.write_value(ua.DataValue(ua.Variant(75.0, ua.VariantType.Double)))
        assert out_of_range.value.code == ua.StatusCodes.BadOutOfRange
        with pytest.raises(ua.UaStatusCodeError) as wrong_type:
            await setpoint.write_value(ua.DataValue(ua.Variant(5.0, ua.VariantType.Float)))
        assert wrong_type.value.code == ua.StatusCodes.BadTypeMismatch
        with pytest.raises(ua.UaStatusCodeError):
            await temperature.write_value(ua.DataValue(ua.Variant(1.0, ua.VariantType.Double)))
        await setpoint.write_value(ua.DataValue(ua.Variant(30.0, ua.VariantType.Double)))


def test_truth_history_over_control(plant: SimulatorProcess) -> None:
    history = plant.control("GET", "/truth/history?point=tank-1.level&limit=50")
    rows = history["rows"]
    assert rows[0][0] == 0
    assert [r[0] for r in rows] == list(range(len(rows)))
    assert rows[0][3] == pytest.approx(2.5)
    status = plant.control("GET", "/status")
    assert status["tick"] > 0
    assert status["counters"]["modbus_requests"] > 0


def test_serial_backlog_is_dropped_but_never_mid_line(plant: SimulatorProcess) -> None:
    with serial.Serial(plant.device("ambient-1")["path"], 9600, timeout=5) as port:
        port.reset_input_buffer()
        head = port.read_until(b",")  # stop reading in the middle of a line ...
        assert head.startswith(b"$AMB")
        time.sleep(3.2)  # ... while three more lines come due
        parse_line(head + port.readline())  # the line was not cut
        port.reset_input_buffer()
        time.sleep(3.2)  # nobody reads: whole unread lines are dropped, the newest stays
        waiting = port.read(port.in_waiting)
        assert 1 <= waiting.count(b"\n") <= 2, waiting
