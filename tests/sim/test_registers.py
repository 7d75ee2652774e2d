"""Register maps without sockets: addressing rules, writes, load devices, served values."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from support.sim import WATER_PLANT

from fieldtwin.sim.context import SimContext
from fieldtwin.sim.engine import Simulation
from fieldtwin.sim.faults import FaultRequest, LinkFaults
from fieldtwin.sim.modbus import ExceptionCode, ModbusException, Request, encode_request
from fieldtwin.sim.modbus_server import answer
from fieldtwin.sim.registers import PlantRegisterMap, SyntheticRegisterMap
from fieldtwin.sim.scenario import LoadSpec, Scenario, load_scenario


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return load_scenario(WATER_PLANT)


@pytest.fixture
def ctx(scenario: Scenario) -> SimContext:
    return SimContext(Simulation(scenario), None)


def pump_station(scenario: Scenario, ctx: SimContext) -> PlantRegisterMap:
    return PlantRegisterMap(scenario.device("pump-station"), ctx)


def code_of(excinfo: pytest.ExceptionInfo[ModbusException]) -> int:
    return int(excinfo.value.code)


def test_reads_encode_points_and_report_served_values(scenario: Scenario, ctx: SimContext) -> None:
    regmap = pump_station(scenario, ctx)
    words, served = regmap.read(1, "input_registers", 0, 6)
    assert len(words) == 6
    values = dict(served)
    assert set(values) == {
        "tank-1.level",
        "tank-1.level_raw",
        "pump-1.speed",
        "pump-1.motor_current",
    }
    assert values["tank-1.level"] == values["tank-1.level_raw"]
    assert values["tank-1.level"] == pytest.approx(ctx.sim.value("tank-1.level"), rel=1e-6)
    # a read that cuts a float in half serves no value for it
    _, served = regmap.read(1, "input_registers", 1, 2)
    assert served == []
    bits, served = regmap.read(1, "coils", 0, 1)
    assert bits == [True]
    assert served == [("pump-1.running", 1.0)]


def test_addressing_rules(scenario: Scenario, ctx: SimContext) -> None:
    regmap = pump_station(scenario, ctx)
    for table, address, count in [
        ("input_registers", 5, 2),  # past the extent
        ("holding_registers", 2, 1),
        ("coils", 1, 1),
        ("discrete_inputs", 0, 2),
    ]:
        with pytest.raises(ModbusException) as caught:
            regmap.read(1, table, address, count)
        assert code_of(caught) == ExceptionCode.ILLEGAL_DATA_ADDRESS
    with pytest.raises(ModbusException):
        regmap.read(2, "input_registers", 0, 1)  # unit 2 has no input registers here


def test_writes(scenario: Scenario, ctx: SimContext) -> None:
    regmap = pump_station(scenario, ctx)
    regmap.write(1, "holding_registers", 0, (1200, 333))
    assert ctx.sim.value("pump-1.speed_sp") == 1200.0
    assert ctx.sim.value("valve-1.position") == pytest.approx(33.3)
    words, _ = regmap.read(1, "holding_registers", 0, 2)
    assert words == [1200, 333]
    with pytest.raises(ModbusException) as caught:
        regmap.write(1, "holding_registers", 0, (2000,))
    assert code_of(caught) == ExceptionCode.ILLEGAL_DATA_VALUE
    with pytest.raises(ModbusException) as caught:
        regmap.write(1, "holding_registers", 1, (1001,))  # 100.1 %
    assert code_of(caught) == ExceptionCode.ILLEGAL_DATA_VALUE
    regmap.write(1, "coils", 0, (False,))
    assert ctx.sim.value("pump-1.running") == 0.0
    assert ctx.counters["writes_accepted"] == 3
    assert ctx.counters["writes_rejected"] == 2


def test_float_write_must_cover_the_point(tmp_path: Path) -> None:
    valve = 'name = "valve-1.position"\ntable = "holding_registers"\naddress = 1\n'
    text = WATER_PLANT.read_text().replace(
        valve + 'type = "uint16"\nscale = 0.1', valve + 'type = "float32"'
    )
    path = tmp_path / "plant.toml"
    path.write_text(text)
    scenario = load_scenario(path)
    ctx = SimContext(Simulation(scenario), None)
    regmap = pump_station(scenario, ctx)
    with pytest.raises(ModbusException) as caught:
        regmap.write(1, "holding_registers", 1, (0x4220,))  # half a float
    assert code_of(caught) == ExceptionCode.ILLEGAL_DATA_ADDRESS
    regmap.write(1, "holding_registers", 1, tuple(struct.unpack(">HH", struct.pack(">f", 40.0))))
    assert ctx.sim.value("valve-1.position") == 40.0


def test_answer_applies_link_and_point_exceptions(scenario: Scenario, ctx: SimContext) -> None:
    regmap = pump_station(scenario, ctx)
    read = encode_request(Request(4, 0, 2))
    assert answer(regmap, 1, read, LinkFaults())[0][:2] == bytes([4, 4])
    assert answer(regmap, 1, read, LinkFaults(exception=6))[0] == bytes([0x84, 6])
    ctx.sim.inject(FaultRequest("exception", point="tank-1.level", params={"code": 4}))
    ctx.sim.step()
    assert answer(regmap, 1, read, LinkFaults())[0] == bytes([0x84, 4])
    assert answer(regmap, 1, encode_request(Request(4, 4, 1)), LinkFaults())[0][:2] == bytes([4, 2])
    assert answer(regmap, 1, bytes([43, 14, 1, 0]), LinkFaults())[0] == bytes([0xAB, 1])


@pytest.mark.parametrize("point_type", ["uint16", "float32"])
def test_synthetic_load_device(scenario: Scenario, point_type: str) -> None:
    ctx = SimContext(Simulation(scenario), None)
    for _ in range(7):
        ctx.sim.step()
    spec = LoadSpec(devices=3, registers_per_device=200, point_type=point_type, base_port=16000)
    regmap = SyntheticRegisterMap(2, spec, ctx)
    words, _ = regmap.read(1, "input_registers", 0, 100)
    if point_type == "uint16":
        assert words == [(2000 + k + 7) % 65536 for k in range(100)]
    else:
        values = [
            struct.unpack(">f", struct.pack(">HH", words[i], words[i + 1]))[0]
            for i in range(0, 100, 2)
        ]
        assert values == [pytest.approx(2000 + k + 0.7, rel=1e-6) for k in range(50)]
    with pytest.raises(ModbusException):
        regmap.read(1, "input_registers", 150, 51)
    with pytest.raises(ModbusException):
        regmap.read(1, "holding_registers", 0, 1)
    with pytest.raises(ModbusException):
        regmap.write(1, "input_registers", 0, (1,))
