"""The ``fieldtwin sim`` commands as a user types them, against the running simulator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pymodbus.client import ModbusTcpClient
from support.sim import ROOT, WATER_PLANT, SimulatorProcess, wait_for


def fieldtwin(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fieldtwin.protocol.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def test_fault_inject_list_clear(plant: SimulatorProcess) -> None:
    control = plant.endpoints["control"]
    result = fieldtwin(
        "sim", "fault", "inject", "drift", "--point", "pt-1.pressure", "--rate", "0.5",
        "--duration", "600", "--control", control, "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    fault = json.loads(result.stdout)
    assert (fault["kind"], fault["device"], fault["params"]) == (
        "drift",
        "field-bus",
        {"rate": 0.5, "offset": 0.0},
    )
    listed = fieldtwin("sim", "fault", "list", "--control", control)
    assert listed.returncode == 0
    assert f"{fault['id']:>4}" in listed.stdout
    assert "drift" in listed.stdout
    assert "pt-1.pressure" in listed.stdout

    def bias() -> float:
        point = plant.truth("pt-1.pressure")["points"]["pt-1.pressure"]
        return float(point["reported"] - point["true"])

    wait_for(lambda: bias() > 1.0, message="drift reported over the control interface")
    cleared = fieldtwin("sim", "fault", "clear", str(fault["id"]), "--control", control)
    assert cleared.returncode == 0, cleared.stderr
    assert cleared.stdout.startswith("cleared")
    wait_for(lambda: abs(bias()) < 0.1, message="drift cleared")

    truth = fieldtwin("sim", "truth", "--point", "tank-1.level", "--control", control, "--json")
    assert truth.returncode == 0
    assert list(json.loads(truth.stdout)["points"]) == ["tank-1.level"]
    status = fieldtwin("sim", "status", "--control", control)
    assert status.returncode == 0
    assert status.stdout.startswith("water-plant: tick ")


def test_cli_errors_are_one_clear_line(plant: SimulatorProcess, tmp_path: Path) -> None:
    control = plant.endpoints["control"]
    wrong_kind = fieldtwin(
        "sim", "fault", "inject", "corrupt", "--device", "pump-station", "--control", control
    )
    assert wrong_kind.returncode == 1
    assert "corrupt cannot happen on a modbus-tcp device" in wrong_kind.stderr
    assert "Traceback" not in wrong_kind.stderr
    unknown = fieldtwin(
        "sim", "fault", "inject", "stuck", "--point", "tank-1.lvl", "--control", control
    )
    assert "did you mean 'tank-1.level'" in unknown.stderr
    missing = fieldtwin("sim", "fault", "clear", "999", "--control", control)
    assert missing.returncode == 1
    assert "no fault with id 999" in missing.stderr
    nobody = fieldtwin("sim", "fault", "list", "--control", "127.0.0.1:1")
    assert nobody.returncode == 1
    assert "no simulator answers at 127.0.0.1:1" in nobody.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text(
        WATER_PLANT.read_text().replace(
            'address = 5\ntype = "int16"', 'address = 5\ntype = "int61"'
        )
    )
    check = fieldtwin("sim", "check", str(bad))
    assert check.returncode == 1
    assert f"{bad}: devices[0].points[3].type: 'int61' is not one of" in check.stderr
    assert fieldtwin("sim", "check", str(WATER_PLANT)).returncode == 0

    existing = tmp_path / "exists.duckdb"
    existing.write_bytes(b"")
    run = fieldtwin("sim", "run", str(WATER_PLANT), "--ephemeral", "--truth", str(existing))
    assert run.returncode == 1
    assert "already exists" in run.stderr
    slow = fieldtwin("sim", "run", str(WATER_PLANT), "--speed", "0")
    assert slow.returncode == 1
    assert "--speed 0.0" in slow.stderr


def test_run_prints_a_table_and_stops_after(tmp_path: Path) -> None:
    scenario = tmp_path / "serial.toml"
    scenario.write_text(
        """
[scenario]
name = "one-sensor"

[process.ambient-1]
type = "ambient"

[[devices]]
id = "ambient-1"
protocol = "serial-line"
link = "/tmp/fieldtwin-sim/never-used"

[[devices.points]]
name = "ambient-1.temperature"
"""
    )
    result = fieldtwin(
        "sim",
        "run",
        str(scenario),
        "--ephemeral",
        "--stop-after",
        "1",
        "--truth",
        str(tmp_path / "t.duckdb"),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "fieldtwin simulator: one-sensor (seed 1, speed 1x)"
    assert any(
        line.startswith("ambient-1") and "serial-line" in line and "/dev/pts/" in line
        for line in lines
    )
    assert any(line.startswith("control") for line in lines)
    assert "Press Ctrl+C to stop." in result.stdout
    assert "simulator stopped" in result.stderr


def test_actuator_and_process_faults_from_the_cli(plant: SimulatorProcess) -> None:
    control = plant.endpoints["control"]

    def inject(*args: str) -> dict[str, object]:
        result = fieldtwin("sim", "fault", "inject", *args, "--control", control, "--json")
        assert result.returncode == 0, result.stderr
        fault: dict[str, object] = json.loads(result.stdout)
        return fault

    leak = inject("leak", "--component", "tank-1", "--cv", "2.5", "--duration", "20")
    assert (leak["kind"], leak["component"], leak["device"], leak["params"]) == (
        "leak", "tank-1", None, {"cv": 2.5},
    )  # fmt: skip
    fouling = inject("fouling", "--component", "boiler-1", "--efficiency", "0.7")
    assert fouling["params"] == {"efficiency": 0.7}
    ignore = inject("ignore_writes", "--point", "pump-1.speed_sp", "--count", "1")
    assert (ignore["device"], ignore["params"], ignore["writes_affected"]) == (
        "pump-station", {"count": 1}, 0,
    )  # fmt: skip
    wrong = inject("wrong_value", "--point", "boiler-1.heater_power_sp", "--value", "25")
    assert (wrong["device"], wrong["params"]) == ("boiler", {"value": 25.0})
    listed = fieldtwin("sim", "fault", "list", "--control", control).stdout
    assert "leak          tank-1" in listed
    assert "fouling       boiler-1" in listed
    assert "efficiency=0.7" in listed

    since = plant.status()["tick"]
    client = ModbusTcpClient("127.0.0.1", port=plant.device("pump-station")["port"], timeout=5)
    try:
        assert client.connect()
        assert not client.write_register(0, 1200, device_id=1).isError()  # ignored (count 1)
        assert not client.write_register(0, 900, device_id=1).isError()  # applied
        assert client.write_register(0, 5000, device_id=1).isError()  # rejected
    finally:
        client.close()
    query = ("sim", "truth", "--writes", "--point", "pump-1.speed_sp", "--since-tick", str(since))

    def recorded() -> list[dict[str, object]]:
        result = fieldtwin(*query, "--control", control, "--json")
        assert result.returncode == 0, result.stderr
        writes: list[dict[str, object]] = json.loads(result.stdout)["writes"]
        return writes

    wait_for(lambda: len(recorded()) == 3, message="three writes recorded")
    records = recorded()
    assert [(w["status"], w["value"], w["result"]) for w in records] == [
        ("ignored", 1200.0, 900.0),
        ("applied", 900.0, 900.0),
        ("rejected", 5000.0, None),  # in arrival order, whatever tick each was recorded at
    ]
    assert [w["seq"] for w in records] == sorted(w["seq"] for w in records)
    listed = fieldtwin("sim", "fault", "list", "--control", control).stdout
    assert "ignore_writes pump-1.speed_sp" in listed
    assert "count=1, writes affected=1" in listed
    table = fieldtwin(*query, "--control", control)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "TICK", "SIM", "S", "POINT", "STATUS", "WRITTEN", "BEFORE", "RESULT", "FAULT", "VIA",
    ]  # fmt: skip
    assert lines[1].split()[3:9] == [
        "ignored",
        "1200",
        "900",
        "900",
        str(ignore["id"]),
        "modbus-tcp",
    ]
    assert lines[3].endswith("(5000 is outside 0..1800)")

    mistakes = [
        (("wrong_value", "--point", "valve-1.position"), "wrong_value needs exactly one of offset"),
        (("leak", "--point", "tank-1.level"), "leak is a fault of the process, not of a device"),
        (("fouling", "--component", "boiler-1", "--efficiency", "1.5"), "out of range 0.0..1.0"),
        (("ignore_writes", "--point", "pump-1.speed"), "pump-1.speed is read-only"),
    ]
    for args, message in mistakes:
        result = fieldtwin("sim", "fault", "inject", *args, "--control", control)
        assert result.returncode == 1
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    stray = fieldtwin("sim", "truth", "--limit", "5", "--control", control)
    assert stray.returncode == 1
    assert "--since-tick and --limit go with --writes" in stray.stderr
