"""Whole runs: clean shutdown, a ground truth that replays exactly, load mode, schedules."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import time
from pathlib import Path

import duckdb
import pytest
import serial
from asyncua import ua
from asyncua.sync import Client as SyncClient
from pymodbus.client import ModbusTcpClient
from support.sim import WATER_PLANT, SimulatorProcess, wait_for

from fieldtwin.sim.engine import AppliedWrite, FaultEvent, replay
from fieldtwin.sim.faults import FaultRequest
from fieldtwin.sim.scenario import load_scenario

POINTS = 18  # points of the water plant


def _clean_log(log: str) -> None:
    for bad in ("Traceback", "Task was destroyed", "Exception in callback", "level=error"):
        assert bad not in log, log


def test_clean_shutdown_and_replayable_ground_truth(tmp_path: Path) -> None:
    truth = tmp_path / "truth.duckdb"
    sim = SimulatorProcess(WATER_PLANT, speed=20.0, truth=truth, stderr_path=tmp_path / "sim.log")
    sim.start()
    try:
        links = [Path(sim.device(d)["path"]) for d in ("field-bus", "ambient-1")]
        folder = links[0].parent
        assert all(link.is_symlink() for link in links)
        client = ModbusTcpClient("127.0.0.1", port=sim.device("pump-station")["port"], timeout=5)
        assert client.connect()
        # The valve's actuator goes 20 % short of the first write, then works again.
        wrong = sim.inject(
            "wrong_value", point="valve-1.position", params={"offset": -20.0, "count": 1}
        )
        leak = sim.inject("leak", component="tank-1", duration=10.0, params={"cv": 5.0})
        foul = sim.inject("fouling", component="boiler-1", params={"efficiency": 0.8})
        assert not client.write_register(0, 1500, device_id=1).isError()
        assert not client.write_register(1, 800, device_id=1).isError()  # lands on 60 %
        assert client.write_register(0, 9999, device_id=1).isError()  # rejected, recorded
        fault = sim.inject("drift", point="tank-1.level", duration=5.0, params={"rate": 0.2})
        assert not client.read_input_registers(0, count=6, device_id=1).isError()
        client.close()
        with serial.Serial(str(links[1]), 9600, timeout=3) as port:
            port.write(b"?")
            assert port.readline().startswith(b"$AMB,")
        wait_for(lambda: sim.status()["tick"] > 300, message="300 ticks")
        # Stop while clients are connected on every protocol: nothing may be left behind.
        held = ModbusTcpClient("127.0.0.1", port=sim.device("pump-station")["port"], timeout=5)
        assert held.connect()
        port = serial.Serial(str(links[0]), 19200, timeout=1)
        opcua = SyncClient(sim.device("boiler")["url"], timeout=5)
        opcua.connect()
        idx = opcua.get_namespace_index(sim.device("boiler")["namespace"])
        assert opcua.get_node(ua.NodeId("boiler-1.temperature", idx)).read_value() > 20.0
    finally:
        code = sim.stop()
    held.close()
    port.close()
    with contextlib.suppress(Exception):
        opcua.disconnect()
    assert code == 0, sim.stderr
    _clean_log(sim.stderr)
    assert "simulator stopped" in sim.stderr
    assert not any(os.path.lexists(link) for link in links)
    assert not folder.exists()  # the ephemeral folder is gone

    db = duckdb.connect(str(truth), read_only=True)
    try:
        (last_tick, stopped, seed, speed) = db.execute(
            "SELECT last_tick, stopped_wall_ms, seed, speed FROM run"
        ).fetchone() or (None, None, None, None)
        assert last_tick is not None
        assert last_tick > 300
        assert stopped is not None
        assert (seed, speed) == (1, 20.0)
        count, ticks = db.execute(
            "SELECT count(*), count(DISTINCT tick) FROM truth"
        ).fetchone() or (0, 0)
        assert (count, ticks) == ((last_tick + 1) * POINTS, last_tick + 1)
        # What reached the process: the result of every write that moved an actuator.
        writes = db.execute(
            "SELECT tick, point, variable, result FROM writes "
            "WHERE status IN ('applied', 'altered') ORDER BY tick, rowid"
        ).fetchall()
        assert [(w[1], w[3]) for w in writes] == [
            ("pump-1.speed_sp", 1500.0),
            ("valve-1.position", 60.0),
        ]
        altered = db.execute(
            "SELECT value, before, result, fault_id FROM writes WHERE status = 'altered'"
        ).fetchall()
        assert altered == [(80.0, 50.0, 60.0, wrong["id"])]
        rejected = db.execute(
            "SELECT point, value, detail, result FROM writes WHERE status = 'rejected'"
        ).fetchall()
        assert rejected == [("pump-1.speed_sp", 9999.0, "9999 is outside 0..1800", None)]
        windows = db.execute(
            "SELECT id, kind, point, component, start_tick, end_tick, source FROM faults "
            "ORDER BY id"
        ).fetchall()
        assert windows == [
            (wrong["id"], "wrong_value", "valve-1.position", None, wrong["start_tick"],
             windows[0][5], "runtime"),
            (leak["id"], "leak", None, "tank-1", leak["start_tick"], leak["start_tick"] + 100,
             "runtime"),
            (foul["id"], "fouling", None, "boiler-1", foul["start_tick"], last_tick + 1,
             "runtime"),
            (fault["id"], "drift", "tank-1.level", None, fault["start_tick"],
             fault["start_tick"] + 50, "runtime"),
        ]  # fmt: skip
        assert windows[0][5] == writes[1][0] + 1  # used up by its one write, it closed
        process_faults = [
            FaultEvent(FaultRequest(kind, params=json.loads(params), component=component), s, e)
            for kind, component, params, s, e in db.execute(
                "SELECT kind, component, params, start_tick, end_tick FROM faults "
                "WHERE component IS NOT NULL ORDER BY id"
            ).fetchall()
        ]
        served = dict(
            db.execute("SELECT protocol || ':' || via, count(*) FROM served GROUP BY 1").fetchall()
        )
        assert served["modbus-tcp:read"] >= 4
        assert served["serial-line:answer"] >= 1
        assert served["opcua:publish"] >= 4
        assert served["opcua:read"] >= 1
        recorded = db.execute(
            "SELECT tick, point, value FROM truth ORDER BY tick, point"
        ).fetchall()
    finally:
        db.close()

    # Same seed and scenario, same writes at the same ticks: the model alone reproduces
    # every recorded true value exactly.
    scenario = load_scenario(WATER_PLANT)
    applied = [
        AppliedWrite(tick, point, variable, value) for tick, point, variable, value in writes
    ]
    replayed = sorted(
        replay(scenario, last_tick, writes=applied, faults=process_faults),
        key=lambda r: (r[0], r[1]),
    )
    assert replayed == recorded
    # without the leak and the fouling, the truth would have been another
    assert sorted(replay(scenario, last_tick, writes=applied), key=lambda r: (r[0], r[1])) != (
        recorded
    )


LOAD_SCENARIO = """
[scenario]
name = "load-and-schedule"
seed = 7
control = "127.0.0.1:0"

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

[load]
modbus_devices = 3
registers_per_device = 200
base_port = 16100

[[faults]]
kind = "drift"
point = "tank-1.level"
at = 2.0
duration = 30.0
rate = 0.5
"""


def test_load_mode_and_scheduled_faults(tmp_path: Path) -> None:
    path = tmp_path / "load.toml"
    path.write_text(LOAD_SCENARIO)
    truth = tmp_path / "truth.duckdb"
    sim = SimulatorProcess(path, speed=10.0, truth=truth, stderr_path=tmp_path / "sim.log")
    sim.start()
    try:
        load = [d for d in sim.endpoints["devices"] if "synthetic" in d]
        assert [d["id"] for d in load] == ["load-000", "load-001", "load-002"]
        layout = load[1]["synthetic"]
        assert layout == {
            "index": 1,
            "table": "input_registers",
            "address": 0,
            "registers": 200,
            "type": "uint16",
            "registers_per_point": 1,
            "points": 200,
            "point_prefix": "load-001.p",
        }
        for device in load:
            client = ModbusTcpClient("127.0.0.1", port=device["port"], timeout=5)
            assert client.connect()
            for start in (0, 100):
                words = client.read_input_registers(start, count=100, device_id=1).registers
                # one read is one tick: register k holds (index * 1000 + k + tick) mod 65536
                ticks = {
                    (w - device["synthetic"]["index"] * 1000 - (start + k)) % 65536
                    for k, w in enumerate(words)
                }
                assert len(ticks) == 1
            assert client.read_input_registers(200, count=1, device_id=1).isError()
            client.close()

        plc = ModbusTcpClient("127.0.0.1", port=sim.device("plc")["port"], timeout=5)
        assert plc.connect()

        def biased() -> bool:
            regs = plc.read_input_registers(0, count=2, device_id=1).registers
            level = struct.unpack(">f", struct.pack(">HH", *regs))[0]
            return bool(level - sim.truth("tank-1.level")["points"]["tank-1.level"]["true"] > 1.0)

        wait_for(biased, message="scheduled drift visible over Modbus")
        plc.close()
        wait_for(
            lambda: sim.control("GET", "/faults")["faults"][0]["status"] == "ended",
            message="scheduled window closes",
        )
    finally:
        code = sim.stop()  # SIGINT
    assert code == 0, sim.stderr
    _clean_log(sim.stderr)
    db = duckdb.connect(str(truth), read_only=True)
    try:
        window = db.execute(
            "SELECT source, kind, start_tick, end_tick, params FROM faults"
        ).fetchall()
        assert window == [("scenario", "drift", 20, 320, '{"offset": 0.0, "rate": 0.5}')]
        devices = {r[0] for r in db.execute("SELECT DISTINCT device FROM served").fetchall()}
        assert devices == {"plc"}  # load devices are not recorded unless asked to
        points = {r[0] for r in db.execute("SELECT DISTINCT point FROM truth").fetchall()}
        assert points == {"tank-1.level"}
    finally:
        db.close()


def test_sigterm_and_no_truth(tmp_path: Path) -> None:
    path = tmp_path / "load.toml"
    path.write_text(LOAD_SCENARIO.replace("modbus_devices = 3", "modbus_devices = 1"))
    sim = SimulatorProcess(
        path, speed=5.0, stderr_path=tmp_path / "sim.log", extra_args=["--no-truth"]
    )
    endpoints = sim.start()
    assert endpoints["ground_truth"] is None
    with pytest.raises(Exception, match="409"):
        sim.control("GET", "/truth/history?point=tank-1.level")
    time.sleep(0.3)
    assert sim.process is not None
    sim.process.send_signal(signal.SIGTERM)
    assert sim.process.wait(30) == 0
    sim.stop()  # closes the pipes
    _clean_log(sim.stderr)
    assert "simulator stopped" in sim.stderr
