"""Scenario files: the shipped water plant loads, and mistakes get a clear error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support.sim import WATER_PLANT

from fieldtwin.protocol.config import ConfigError
from fieldtwin.sim.scenario import load_scenario

BASE = """
[scenario]
name = "mini"
seed = 3

[process.pump-1]
type = "pump"

[process.valve-1]
type = "valve"
upstream_level = "tank-1.level"

[process.tank-1]
type = "tank"
inflows = ["pump-1.flow"]
outflows = ["valve-1.flow"]

[[devices]]
id = "plc"
protocol = "modbus-tcp"
port = 15999

[[devices.points]]
name = "tank-1.level"
table = "input_registers"
address = 0
type = "float32"

[[devices.points]]
name = "pump-1.speed_sp"
table = "holding_registers"
address = 0
type = "uint16"
writable = true
"""


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return load_scenario(path)


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "scenario.toml"))
    return message


def test_water_plant_matches_the_contract() -> None:
    scenario = load_scenario(WATER_PLANT)
    assert scenario.name == "water-plant"
    assert (scenario.control_host, scenario.control_port) == ("127.0.0.1", 17100)
    devices = {d.id: d for d in scenario.devices}
    assert devices["pump-station"].port == 15020
    assert devices["field-bus"].unit_ids == [1, 2]
    assert str(devices["field-bus"].link) == "/tmp/fieldtwin-sim/rtu-bus-1"
    assert str(devices["ambient-1"].link) == "/tmp/fieldtwin-sim/ambient-1"
    assert devices["boiler"].url == "opc.tcp://127.0.0.1:48400/fieldtwin/boiler"
    assert devices["boiler"].namespace == "urn:fieldtwin:sim:water-plant"
    points = scenario.points
    level = points["tank-1.level"]
    assert (level.table, level.address, level.dtype) == ("input_registers", 0, "float32")
    raw = points["tank-1.level_raw"]
    assert raw.codec is not None
    assert (raw.address, raw.codec.byte_order, raw.codec.word_order) == (2, "big", "little")
    assert raw.same_as == "tank-1.level"
    current = points["pump-1.motor_current"]
    assert current.codec is not None
    assert (current.address, current.dtype, current.codec.scale) == (5, "int16", 0.01)
    assert (points["pump-1.speed_sp"].low, points["pump-1.speed_sp"].high) == (0.0, 1800.0)
    assert points["valve-1.position"].codec is not None
    assert points["pump-1.running"].table == "coils"
    assert points["tank-1.high_level"].table == "discrete_inputs"
    flow = points["flowmeter-1.flow"]
    assert flow.codec is not None
    assert (flow.unit_id, flow.codec.word_order) == (1, "little")
    assert (points["pt-1.pressure"].unit_id, points["pt-1.temperature"].address) == (2, 1)
    assert points["boiler-1.heater_power_sp"].browse_name == "HeaterPowerSetpoint"
    assert points["boiler-1.heater_power_sp"].writable
    assert [p.name for p in devices["ambient-1"].points] == [
        "ambient-1.temperature",
        "ambient-1.humidity",
    ]


def test_minimal_scenario_loads(tmp_path: Path) -> None:
    scenario = _load(tmp_path, BASE)
    assert scenario.points["pump-1.speed_sp"].high == 1800.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("port = 15999", 'port = 15999\nhots = "::1"'),
            r"devices\[0\]\.hots: unknown key; did you mean 'host'",
        ),
        (
            ('type = "float32"', 'type = "float33"'),
            r"devices\[0\]\.points\[0\]\.type: 'float33' is not one of",
        ),
        (
            ('name = "tank-1.level"', 'name = "tank-1.levle"'),
            r"points\[0\]\.source: 'tank-1.levle' is not a process variable "
            r"\(variables of that component: tank-1.level",
        ),
        (
            ('upstream_level = "tank-1.level"', 'upstream_level = "tank-9.level"'),
            r"process\.valve-1\.upstream_level",
        ),
        (('type = "pump"', 'type = "pumps"'), r"process\.pump-1\.type: 'pumps' is not one of"),
        (
            ("[process.pump-1]", "[process.pump-1]\nrated_sped = 1.0"),
            r"process\.pump-1\.rated_sped: unknown key; did you mean 'rated_speed'",
        ),
        (('address = 0\ntype = "uint16"', 'address = 1\ntype = "uint16"'), None),
        (("port = 15999", "port = 70000"), r"devices\[0\]\.port: 70000 is out of range"),
        (
            ("seed = 3", 'seed = 3\ncontrol = "10.0.0.5:17100"'),
            r"scenario\.control: '10\.0\.0\.5' is not a loopback",
        ),
    ],
)
def test_errors_name_file_key_and_fix(
    tmp_path: Path, change: tuple[str, str], expected: str | None
) -> None:
    text = BASE.replace(*change)
    if expected is None:
        _load(tmp_path, text)
    else:
        assert re.search(expected, _error(tmp_path, text))


def test_layout_and_semantic_errors(tmp_path: Path) -> None:
    overlap = (
        BASE.replace('address = 0\ntype = "float32"', 'address = 0\ntype = "float64"')
        + """
[[devices.points]]
name = "tank-1.inflow"
table = "input_registers"
address = 3
type = "uint16"
"""
    )
    assert "tank-1.inflow overlaps tank-1.level at unit 1 input_registers address 3" in _error(
        tmp_path, overlap
    )
    read_only = BASE.replace('name = "pump-1.speed_sp"', 'name = "pump-1.speed"')
    assert "'pump-1.speed' is not a setpoint or command" in _error(tmp_path, read_only)
    coil = BASE.replace('table = "holding_registers"', 'table = "coils"').replace(
        'type = "uint16"\nwritable', "writable"
    )
    assert "'pump-1.speed_sp' is a number; put it in holding_registers" in _error(tmp_path, coil)
    limits = BASE.replace("writable = true", "writable = true\nmax = 5000.0")
    assert "must lie within 0.0..1800.0" in _error(tmp_path, limits)
    duplicate = BASE + BASE[BASE.index("[[devices]]") :].replace("15999", "15998")
    assert "device id 'plc' is used twice" in _error(tmp_path, duplicate)
    no_devices = BASE[: BASE.index("[[devices]]")]
    assert "the scenario serves nothing" in _error(tmp_path, no_devices)
    load = no_devices + "[load]\nmodbus_devices = 2\n"
    assert "load.base_port: set the first port" in _error(tmp_path, load)
    assert _load(tmp_path, no_devices + "[load]\nmodbus_devices = 2\nbase_port = 16000\n")


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (
            'kind = "stuck"\npoint = "tank-1.lvl"',
            r"faults\[0\]\.point: unknown point 'tank-1.lvl'; did you mean 'tank-1.level'",
        ),
        (
            'kind = "corrupt"\ndevice = "plc"',
            r"faults\[0\]\.kind: corrupt cannot happen on a modbus-tcp device",
        ),
        (
            'kind = "drift"\ndevice = "plc"',
            r"faults\[0\]\.point: drift changes one point's value: name the point",
        ),
        (
            'kind = "stuk"\npoint = "tank-1.level"',
            r"faults\[0\]\.kind: unknown fault kind 'stuk'; did you mean 'stuck'",
        ),
        (
            'kind = "exception"\ndevice = "plc"\ncode = 7',
            r"faults\[0\]\.code: 7 is not a Modbus exception code",
        ),
        (
            'kind = "slow"\ndevice = "plc"\ndelay_ms = -1',
            r"faults\[0\]\.delay_ms: -1\.0 is out of range",
        ),
        (
            'kind = "dropout"\ndevice = "plc"\nunit_id = 9',
            r"faults\[0\]\.unit_id: plc has no unit 9",
        ),
        (
            'kind = "drift"\npoint = "tank-1.level"\nrte = 1.0',
            r"faults\[0\]\.rte: unknown key; did you mean 'rate'",
        ),
        (
            'kind = "leak"\npoint = "tank-1.level"',
            r"faults\[0\]\.point: leak is a fault of the process, not of a device",
        ),
        (
            'kind = "leak"\ncomponent = "pump-1"',
            r"faults\[0\]\.component: pump-1 is a pump; leak happens to a tank \(tanks: tank-1\)",
        ),
        (
            'kind = "fouling"\ncomponent = "tank-1"',
            r"faults\[0\]\.component: tank-1 is a tank; fouling happens to a boiler "
            r"\(boilers: none in this scenario\)",
        ),
        (
            'kind = "ignore_writes"\npoint = "tank-1.level"',
            r"faults\[0\]\.point: tank-1\.level is read-only; ignore_writes needs a writable "
            r"point \(writable: pump-1\.speed_sp\)",
        ),
        (
            'kind = "wrong_value"\npoint = "pump-1.speed_sp"',
            r"faults\[0\]\.offset: wrong_value needs exactly one of offset",
        ),
        (
            'kind = "wrong_value"\npoint = "pump-1.speed_sp"\ncount = 0\nvalue = 5.0',
            r"faults\[0\]\.count: 0 is below the minimum 1",
        ),
        (
            'kind = "stuck"\npoint = "tank-1.level"\ncomponent = "tank-1"',
            r"faults\[0\]\.component: stuck happens on a device",
        ),
    ],
)
def test_fault_schedule_errors(tmp_path: Path, fault: str, expected: str) -> None:
    assert re.search(expected, _error(tmp_path, BASE + "\n[[faults]]\n" + fault + "\n"))


def test_scheduled_faults_load(tmp_path: Path) -> None:
    fault = 'kind = "drift"\npoint = "tank-1.level"\nat = 5.0\nduration = 2.0\nrate = 0.5\n'
    text = BASE + "\n[[faults]]\n" + fault
    scenario = load_scenario(_write(tmp_path, text))
    [scheduled] = scenario.faults
    assert scheduled.request.device == "plc"
    assert scheduled.request.params == {"rate": 0.5, "offset": 0.0}
    assert (scheduled.at, scheduled.duration) == (5.0, 2.0)


def test_scheduled_process_and_actuator_faults_load(tmp_path: Path) -> None:
    text = (
        BASE
        + '\n[[faults]]\nkind = "leak"\ncomponent = "tank-1"\nat = 10.0\ncv = 1.5\n'
        + '\n[[faults]]\nkind = "wrong_value"\npoint = "pump-1.speed_sp"\noffset = -100.0\n'
    )
    leak, wrong = load_scenario(_write(tmp_path, text)).faults
    assert (leak.request.component, leak.request.device, leak.request.params) == (
        "tank-1",
        None,
        {"cv": 1.5},
    )
    assert leak.at == 10.0
    assert (wrong.request.device, wrong.request.params) == ("plc", {"offset": -100.0})


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return path
