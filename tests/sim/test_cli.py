"""The ``fieldtwin sim`` commands as a user types them, against the running simulator."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

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


def _http(address: str, raw: bytes) -> tuple[int, dict[str, object]]:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_control_interface_refuses_bad_requests(plant: SimulatorProcess) -> None:
    address = plant.endpoints["control"]
    before = len(plant.control("GET", "/faults")["faults"])
    cases = [
        (b"GET /nowhere HTTP/1.1\r\n\r\n", 404, "no route"),
        (b"PUT /faults HTTP/1.1\r\n\r\n", 405, "not allowed"),
        (b"POST /faults HTTP/1.1\r\nContent-Length: 5\r\n\r\n{oops", 400, "not JSON"),
        (b"POST /faults HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]", 400, "expected a JSON object"),
        (b"hello\r\n\r\n", 400, "HTTP/1.1 request line"),
        (b"POST /faults HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413, "larger than"),
        (b"GET /truth?point=nope HTTP/1.1\r\n\r\n", 404, "unknown point"),
        (b"DELETE /faults/abc HTTP/1.1\r\n\r\n", 404, "no fault"),
    ]
    for raw, status, text in cases:
        code, body = _http(address, raw)
        assert code == status, (raw, body)
        assert text in str(body["error"]), (raw, body)
    body_json = json.dumps({"kind": "stuck", "point": "tank-1.level", "colour": "red"}).encode()
    code, body = _http(
        address,
        b"POST /faults HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body_json), body_json),
    )
    assert (code, body["error"]) == (
        400,
        "unknown field 'colour' (fields: device, duration, kind, params, point, unit_id)",
    )
    assert len(plant.control("GET", "/faults")["faults"]) == before  # nothing was injected
