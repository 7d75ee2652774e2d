"""The whole agent against the simulator's real devices, a real broker and the hub peer.

One gateway reads every water-plant device (Modbus TCP, Modbus RTU, the line sensor,
OPC-UA) through the example configs, rewritten to the simulator's ephemeral endpoints.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.agent_env import AgentEnv, devices_from_example, running_agent
from support.broker import MosquittoBroker
from support.hub_peer import HubPeer
from support.sim import SimProcess

from fieldtwin.protocol.messages import Birth, Quality, Sample

ALL_POINTS = {
    ("tank-1", "level"),
    ("tank-1", "level_raw"),
    ("pump-1", "speed"),
    ("pump-1", "motor_current"),
    ("pump-1", "speed_sp"),
    ("valve-1", "position"),
    ("pump-1", "running"),
    ("tank-1", "high_level"),
    ("flowmeter-1", "flow"),
    ("flowmeter-1", "total"),
    ("pt-1", "pressure"),
    ("pt-1", "temperature"),
    ("ambient-1", "temperature"),
    ("ambient-1", "humidity"),
    ("boiler-1", "temperature"),
    ("boiler-1", "pressure"),
    ("boiler-1", "heater_power_sp"),
    ("boiler-1", "heater_power"),
}
# How far a reading may be from the simulator's true value (noise, time between reads).
TOLERANCE = {
    "tank-1.level": 0.05,
    "tank-1.level_raw": 0.05,
    "pump-1.speed": 60,
    "pump-1.motor_current": 1.0,
    "flowmeter-1.flow": 2.0,
    "flowmeter-1.total": 0.05,
    "pt-1.pressure": 0.1,
    "pt-1.temperature": 0.5,
    "ambient-1.temperature": 0.5,
    "ambient-1.humidity": 1.0,
    "boiler-1.temperature": 1.0,
    "boiler-1.pressure": 0.1,
    "boiler-1.heater_power": 1.0,
}


def all_devices(sim: SimProcess) -> list[dict[str, Any]]:
    return [
        d
        for name in ("pumps", "field", "boiler")
        for d in devices_from_example(name, sim.endpoints)
    ]


def good_keys(samples: list[Sample]) -> set[tuple[str, str]]:
    return {(s.entity, s.attribute) for s in samples if s.quality == Quality.GOOD}


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from fieldtwin.protocol.cli import main; raise SystemExit(main())",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def env(tmp_path: Path, broker: MosquittoBroker, request: pytest.FixtureRequest) -> AgentEnv:
    name = "gw-" + request.node.name.replace("test_", "")[:18].replace("_", "-").strip("-")
    return AgentEnv.create(tmp_path, name, broker)


async def test_every_point_arrives_with_the_right_value_and_quality(
    env: AgentEnv, broker: MosquittoBroker, plant: SimProcess
) -> None:
    config = env.write_config(all_devices(plant))
    async with (
        HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub,
        running_agent(config) as agent,
    ):
        view = hub.gateways[env.gateway]
        await hub.wait_for(lambda: good_keys(view.samples) >= ALL_POINTS, 45, what="every point")
        truth = plant.truth()["points"]
        for entity, attribute in sorted(ALL_POINTS):
            name = f"{entity}.{attribute}"
            latest = view.latest(entity, attribute)
            assert latest is not None, name
            assert latest.quality == Quality.GOOD, name
            expected = truth[name]["true"]
            if name in TOLERANCE:
                assert latest.value == pytest.approx(expected, abs=TOLERANCE[name]), name
            elif isinstance(latest.value, bool):
                assert latest.value == bool(expected), name
            else:
                assert latest.value == pytest.approx(expected, abs=1e-6), name
        # One reading served in two word orders decodes to the same number.
        level = {s.ts_ms: s.value for s in view.values("tank-1", "level")}
        raw = {s.ts_ms: s.value for s in view.values("tank-1", "level_raw")}
        both = set(level) & set(raw)
        assert both
        assert all(level[ts] == raw[ts] for ts in both)
        # The birth declares every point with its metadata.
        birth = view.births[0].body
        assert isinstance(birth, Birth)
        assert {(p.entity, p.attribute) for p in birth.points} == ALL_POINTS
        speed_sp = next(p for p in birth.points if p.attribute == "speed_sp")
        assert (speed_sp.writable, speed_sp.min, speed_sp.max, speed_sp.unit) == (
            True,
            0,
            1800,
            "rpm",
        )
        # `agent status` reads the running agent's status file.
        await asyncio.sleep(1.5)
        status = await asyncio.to_thread(cli, "agent", "status", "-c", str(config))
        assert status.returncode == 0, status.stderr
        for word in ("running", "pump-station", "field-bus", "ambient-1", "boiler", "oldest"):
            assert word in status.stdout
        raw_status = await asyncio.to_thread(cli, "agent", "status", "-c", str(config), "--json")
        data = json.loads(raw_status.stdout)
        assert data["uplink"]["connected"] is True
        # Most requests succeed; on a loaded machine the very first connect or read may
        # miss its 1 s timeout, which is counted, not hidden.
        pump_station = data["sources"]["pump-station"]
        assert pump_station["success_ratio"] >= 0.9, pump_station
        assert pump_station["failures"] <= 2, pump_station
        assert data["sources"]["boiler"]["mode"] == "subscribe"
        assert data["sources"]["field-bus"]["units"]["2"]["state"] == "closed"
        assert agent.uplink.stats.published_samples > 0
    await hub.wait_for(lambda: True)
    status = await asyncio.to_thread(cli, "agent", "status", "-c", str(config))
    assert status.returncode == 3
    assert "NOT RUNNING" in status.stdout


async def test_commands_are_checked_written_and_read_back(
    env: AgentEnv, broker: MosquittoBroker, plant: SimProcess
) -> None:
    config = env.write_config(all_devices(plant))
    async with (
        HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub,
        running_agent(config),
    ):
        gw = env.gateway
        await hub.wait_for(lambda: bool(hub.gateways[gw].births), what="birth")

        async def run(entity: str, attribute: str, value: Any, **options: Any) -> Any:
            cmd_id = await hub.send_command(gw, entity, attribute, value, **options)
            await hub.wait_for(lambda: hub.result(gw, cmd_id) is not None, 30, what=cmd_id)
            return hub.result(gw, cmd_id)

        speed = await run("pump-1", "speed_sp", 1200)
        assert (speed.status, speed.readback) == ("ok", 1200), speed
        assert speed.readback_ts_ms is not None
        valve = await run("valve-1", "position", 45.5)
        assert (valve.status, valve.readback) == ("ok", 45.5), valve
        heater = await run("boiler-1", "heater_power_sp", 35.0)
        assert (heater.status, heater.readback) == ("ok", 35.0), heater
        coil = await run("pump-1", "running", True)
        assert (coil.status, coil.readback) == ("ok", True), coil
        truth = plant.truth("pump-1.speed_sp", "valve-1.position")["points"]
        assert truth["pump-1.speed_sp"]["reported"] == 1200
        assert truth["valve-1.position"]["reported"] == pytest.approx(45.5)

        refused = await run("tank-1", "level", 1.0)
        assert refused.status == "rejected"
        assert "not writable" in refused.detail
        too_high = await run("pump-1", "speed_sp", 1900)
        assert too_high.status == "rejected"
        assert "above the limit" in too_high.detail
        expired = await run("pump-1", "speed_sp", 100, expires_in_s=-1)
        assert expired.status == "expired"
        # A repeated command id is never executed twice: the original outcome comes back.
        again_id = await hub.send_command(gw, "pump-1", "speed_sp", 900, cmd_id=speed.cmd_id)
        await hub.wait_for(
            lambda: sum(r.cmd_id == again_id for r in hub.gateways[gw].results) == 2, what="dup"
        )
        duplicate = hub.gateways[gw].results[-1]
        assert (duplicate.status, duplicate.readback) == ("duplicate", 1200)
        assert "already handled: ok" in duplicate.detail
        assert plant.truth("pump-1.speed_sp")["points"]["pump-1.speed_sp"]["reported"] == 1200
        await run("pump-1", "speed_sp", 900)  # leave the plant as the scenario started it
        await run("valve-1", "position", 50.0)
        await run("boiler-1", "heater_power_sp", 30.0)


async def test_a_dead_unit_does_not_delay_the_others_on_the_bus(
    env: AgentEnv, broker: MosquittoBroker, plant: SimProcess
) -> None:
    bus = plant.device("field-bus")
    interval_ms, timeout_s = 500, 0.4
    live = [
        {
            "entity": "flowmeter-1",
            "attribute": "flow",
            "unit_id": 1,
            "table": "input",
            "address": 0,
            "type": "float32",
            "word_order": "little",
        },
        {
            "entity": "pt-1",
            "attribute": "pressure",
            "unit_id": 2,
            "table": "input",
            "address": 0,
            "type": "int16",
            "scale": 0.01,
        },
    ]
    # Unit 3 is not on the bus; with six blocks it would cost six timeouts per cycle.
    dead = [
        {
            "entity": "ghost-1",
            "attribute": f"{table}_{interval}",
            "unit_id": 3,
            "table": table,
            "address": 0,
            "type": "bool" if table in ("coil", "discrete") else "uint16",
            "interval_ms": interval,
        }
        for table in ("input", "holding", "coil", "discrete")
        for interval in (500, 700)
    ][:6]
    device = {
        "id": "field-bus",
        "protocol": "modbus-rtu",
        "path": bus["path"],
        "baudrate": 19200,
        "timeout_s": timeout_s,
        "interval_ms": interval_ms,
        "breaker_threshold": 2,
        "points": live + dead,
    }
    config = env.write_config([device])
    async with (
        HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub,
        running_agent(config) as agent,
    ):
        view = hub.gateways[env.gateway]
        ghosts = {(d["entity"], d["attribute"]) for d in dead}
        await hub.wait_for(
            lambda: (
                {(s.entity, s.attribute) for s in view.samples if s.quality == Quality.BAD}
                >= ghosts
            ),
            30,
            what="the dead unit's points reported BAD",
        )
        # Watch the live units' replies (report by exception would hide unchanged reads).
        driver = agent.drivers[0]
        replies: dict[int, list[int]] = {1: [], 2: []}
        read_block = driver._read_block  # type: ignore[attr-defined]

        async def recording(block: Any) -> Any:
            result = await read_block(block)
            if block.unit_id in replies:
                replies[block.unit_id].append(result[1])
            return result

        driver._read_block = recording  # type: ignore[attr-defined]
        await asyncio.sleep(8.0)
        for unit, stamps in replies.items():
            gaps = [b - a for a, b in itertools.pairwise(stamps)]
            assert len(gaps) >= 8, f"unit {unit} was hardly read: {stamps}"
            # At most one timeout on top of the interval (plus slack for a busy machine);
            # six timeouts in a cycle would be 2.4 s.
            assert max(gaps) <= interval_ms + timeout_s * 1000 + 1000, (unit, gaps)
        bad = [s for s in view.samples if (s.entity, s.attribute) in ghosts]
        assert all(s.quality == Quality.BAD and s.value is None for s in bad)
        assert len(bad) == len(ghosts)  # BAD once per point, not once per failed poll
        breaker = agent.drivers[0].breakers[3]  # type: ignore[attr-defined]
        assert breaker.down
        assert agent.drivers[0].breakers[1].failures == 0  # type: ignore[attr-defined]


async def test_unit_dropout_goes_bad_then_recovers(
    env: AgentEnv, broker: MosquittoBroker, plant: SimProcess
) -> None:
    devices = devices_from_example("field", plant.endpoints)[:1]
    devices[0].update(
        timeout_s=0.3, interval_ms=300, breaker_threshold=2, breaker_max_cooldown_s=1.0
    )
    config = env.write_config(devices)
    async with (
        HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub,
        running_agent(config),
    ):
        view = hub.gateways[env.gateway]

        def latest_quality(attribute: str) -> Quality | None:
            sample = view.latest("pt-1", attribute)
            return sample.quality if sample else None

        await hub.wait_for(lambda: latest_quality("pressure") == Quality.GOOD, what="good")
        plant.inject("dropout", device="field-bus", unit_id=2)
        await hub.wait_for(lambda: latest_quality("pressure") == Quality.BAD, 30, what="bad")
        assert view.latest("flowmeter-1", "flow").quality == Quality.GOOD  # type: ignore[union-attr]
        plant.clear_faults()
        await hub.wait_for(lambda: latest_quality("pressure") == Quality.GOOD, 30, what="recovery")


async def test_opcua_session_recovers_after_the_server_goes_away(
    env: AgentEnv, broker: MosquittoBroker, plant: SimProcess
) -> None:
    config = env.write_config(devices_from_example("boiler", plant.endpoints))
    async with (
        HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub,
        running_agent(config) as agent,
    ):
        view = hub.gateways[env.gateway]

        def quality() -> Quality | None:
            sample = view.latest("boiler-1", "temperature")
            return sample.quality if sample else None

        await hub.wait_for(lambda: quality() == Quality.GOOD, 30, what="boiler good")
        plant.inject("disconnect", device="boiler")
        await hub.wait_for(lambda: quality() == Quality.BAD, 30, what="boiler bad")
        plant.clear_faults()
        await hub.wait_for(lambda: quality() == Quality.GOOD, 60, what="boiler recovered")
        driver = agent.drivers[0]
        assert driver.stats.reconnects >= 2
        marker = len(view.samples)
        await hub.wait_for(
            lambda: any(s.attribute == "temperature" for s in view.samples[marker:]),
            30,
            what="fresh samples after recovery",
        )


async def test_silent_serial_sensor_goes_stale_with_its_original_timestamp(
    env: AgentEnv, broker: MosquittoBroker, plant: SimProcess
) -> None:
    ambient = devices_from_example("field", plant.endpoints)[1]
    ambient["max_silence_s"] = 3
    config = env.write_config([ambient])
    async with (
        HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub,
        running_agent(config),
    ):
        view = hub.gateways[env.gateway]
        await hub.wait_for(lambda: view.latest("ambient-1", "humidity") is not None, what="line")
        plant.inject("dropout", device="ambient-1")
        await hub.wait_for(
            lambda: any(s.quality == Quality.STALE for s in view.samples), 30, what="stale"
        )
        stale = next(s for s in view.samples if s.quality == Quality.STALE)
        earlier = [
            s
            for s in view.samples
            if (s.entity, s.attribute) == (stale.entity, stale.attribute)
            and s.quality == Quality.GOOD
        ]
        assert (stale.value, stale.ts_ms) == (earlier[-1].value, earlier[-1].ts_ms)
        plant.clear_faults()
        await hub.wait_for(
            lambda: (
                view.latest("ambient-1", "humidity").quality == Quality.GOOD  # type: ignore[union-attr]
                and view.latest("ambient-1", "humidity").ts_ms > stale.ts_ms
            ),  # type: ignore[union-attr]
            30,
            what="fresh again",
        )


async def test_buffer_cap_and_overflow_policy_while_the_hub_is_away(
    env: AgentEnv, broker: MosquittoBroker, plant: SimProcess
) -> None:
    pumps = devices_from_example("pumps", plant.endpoints)
    pumps[0]["interval_ms"] = 50
    config = env.write_config(pumps, buffer={"max_samples": 300, "overflow": "drop_oldest"})
    async with running_agent(config) as agent:
        sync = agent.outbox.sync
        deadline = time.monotonic() + 60
        while sync.counters.dropped_samples == 0:
            assert time.monotonic() < deadline, "the cap was never reached"
            assert sync.stats().samples <= 300
            await asyncio.sleep(0.2)
        assert sync.low_water() > 1
        async with HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub:
            view = hub.gateways[env.gateway]
            await hub.wait_for(lambda: len(view.births) >= 1, what="birth")
            birth = view.births[-1].body
            assert isinstance(birth, Birth)
            assert birth.low_water > 1
            await hub.wait_for(lambda: sync.stats().samples < 300, what="drain")
        await asyncio.sleep(1.2)
    status = json.loads(env.state_dir.joinpath("status.json").read_text())
    assert status["buffer"]["counters"]["dropped_samples"] > 0
    assert status["buffer"]["overflow"] == "drop_oldest"


async def test_opcua_polling_mode_reads_every_node(
    env: AgentEnv, broker: MosquittoBroker, plant: SimProcess
) -> None:
    boiler = devices_from_example("boiler", plant.endpoints)
    boiler[0]["mode"] = "poll"
    config = env.write_config(boiler)
    async with (
        HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub,
        running_agent(config) as agent,
    ):
        view = hub.gateways[env.gateway]
        expected = {k for k in ALL_POINTS if k[0] == "boiler-1"}
        await hub.wait_for(lambda: good_keys(view.samples) >= expected, 30, what="boiler points")
        assert agent.drivers[0].stats.extra["mode"] == "poll"
        truth = plant.truth("boiler-1.temperature")["points"]["boiler-1.temperature"]["true"]
        latest = view.latest("boiler-1", "temperature")
        assert latest is not None
        assert latest.value == pytest.approx(truth, abs=1.0)


async def test_opcua_falls_back_to_polling_when_the_server_refuses_subscriptions(
    env: AgentEnv, broker: MosquittoBroker, plant: SimProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The simulator's OPC-UA server always grants subscriptions, so the refusal a
    # constrained embedded server gives (BadTooManySubscriptions) is injected here.
    import asyncua
    from asyncua import ua

    refused = 0

    async def refuse(*_args: object, **_kwargs: object) -> None:
        nonlocal refused
        refused += 1
        raise ua.UaStatusCodeError(ua.StatusCodes.BadTooManySubscriptions)

    monkeypatch.setattr(asyncua.Client, "create_subscription", refuse)
    config = env.write_config(devices_from_example("boiler", plant.endpoints))
    async with (
        HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub,
        running_agent(config) as agent,
    ):
        view = hub.gateways[env.gateway]
        expected = {k for k in ALL_POINTS if k[0] == "boiler-1"}
        await hub.wait_for(lambda: good_keys(view.samples) >= expected, 30, what="boiler points")
        assert refused >= 1
        assert agent.drivers[0].stats.extra["mode"] == "poll"
        # polling keeps the values moving with the process
        before = len(view.samples)
        await hub.wait_for(lambda: len(view.samples) > before, 30, what="later polls")


async def test_a_steady_opcua_value_keeps_getting_good_heartbeats(
    env: AgentEnv, broker: MosquittoBroker, plant: SimProcess
) -> None:
    # A setpoint nobody writes: the server never changes the node, so its
    # SourceTimestamp stays where it was; a Good re-read must still count as fresh.
    boiler = devices_from_example("boiler", plant.endpoints)
    for point in boiler[0]["points"]:
        if point["attribute"] == "heater_power_sp":
            point["max_silence_s"] = 2
    config = env.write_config(boiler)
    async with (
        HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub,
        running_agent(config),
    ):
        view = hub.gateways[env.gateway]

        def setpoint() -> list[Sample]:
            return [
                s
                for s in view.samples
                if (s.entity, s.attribute) == ("boiler-1", "heater_power_sp")
            ]

        await hub.wait_for(lambda: len(setpoint()) >= 3, 30, what="three setpoint heartbeats")
        samples = setpoint()
        assert {s.quality for s in samples} == {Quality.GOOD}
        assert len({s.value for s in samples}) == 1  # steady...
        stamps = [s.ts_ms for s in samples]
        assert stamps == sorted(set(stamps))  # ...yet each heartbeat is fresh


async def test_broker_stopped_and_restarted_mid_stream_loses_no_sample(
    env: AgentEnv, broker: MosquittoBroker, plant: SimProcess
) -> None:
    pumps = devices_from_example("pumps", plant.endpoints)
    pumps[0]["interval_ms"] = 100
    config = env.write_config(pumps)
    async with (
        HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub,
        running_agent(config) as agent,
    ):
        view = hub.gateways[env.gateway]
        sync = agent.outbox.sync
        await hub.wait_for(lambda: len(view.applied) >= 10, 30, what="data flowing")
        broker.stop()
        stopped_at = sync.next_seq
        await asyncio.sleep(3.0)  # the agent keeps reading and committing meanwhile
        assert sync.next_seq > stopped_at + 5
        broker.start()
        restarted_at = sync.next_seq
        await hub.wait_for(
            lambda: sync.low_water() > restarted_at, 60, what="everything before the restart acked"
        )
        delivered = hub.delivered(env.gateway)
        assert delivered[0][0] == 1
        assert delivered[0][1] >= restarted_at - 1  # no hole: every frame arrived (or was closed)
        assert len(view.applied) == len(set(view.applied))
        keys = [(s.entity, s.attribute, s.ts_ms) for s in view.samples]
        assert len(keys) == len(set(keys))  # no sample applied twice
        assert agent.uplink.stats.connects >= 2


def _when_true(truth: list[list[Any]], value: float) -> float | None:
    """Wall ms at which the simulator's true value (per tick, monotonic) passed ``value``,
    interpolated between ticks; None outside the range it covered."""
    walls = [float(row[2]) for row in truth]
    values = [float(row[3]) for row in truth]
    if values[-1] < values[0]:
        values = [-v for v in values]
        value = -value
    if not values[0] < value < values[-1]:
        return None
    for i in range(1, len(values)):
        if values[i] >= value:
            share = (value - values[i - 1]) / (values[i] - values[i - 1])
            return walls[i - 1] + share * (walls[i] - walls[i - 1])
    return None


async def test_a_reading_is_stamped_when_its_value_was_true(
    env: AgentEnv, broker: MosquittoBroker, plant: SimProcess
) -> None:
    """Both setpoints stepped; the pump's speed (Modbus, 1 rpm noise) and the heater's
    power (OPC-UA, no noise) then follow first-order lags of 3 s and 2 s. Each reading
    on the steep part of the response is placed on the simulator's true curve: the
    time the value was true, against its stamp. OPC-UA carries the tick's time as its
    SourceTimestamp, so the stamp is exact; Modbus has no source time, and the
    register holds the last tick's value until the next, so a reading stamped on
    arrival is between 0 and one tick (100 ms at speed 1) plus the reply's latency
    after the moment it was true. A stamp at a scheduled poll time, or a state one
    tick off, would fall outside."""
    from asyncua import Client, ua
    from pymodbus.client import AsyncModbusTcpClient

    pumps = devices_from_example("pumps", plant.endpoints)
    pumps[0]["interval_ms"] = 50
    boiler = devices_from_example("boiler", plant.endpoints)
    boiler[0]["interval_ms"] = 50
    boiler[0]["publishing_interval_ms"] = 50
    config = env.write_config([*pumps, *boiler])
    tick_ms = float(plant.endpoints["tick_s"]) * 1000 / float(plant.endpoints["speed"])
    steps = {"pump-1.speed": "pump-1.speed_sp", "boiler-1.heater_power": "boiler-1.heater_power_sp"}
    now = plant.truth(*steps.values())["points"]
    speed_sp = 600 if now["pump-1.speed_sp"]["true"] > 1200 else 1700
    power_sp = 5.0 if now["boiler-1.heater_power_sp"]["true"] > 25 else 45.0
    async with (
        HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub,
        running_agent(config),
    ):
        view = hub.gateways[env.gateway]
        wanted = {("pump-1", "speed"), ("boiler-1", "heater_power")}
        await hub.wait_for(lambda: good_keys(view.samples) >= wanted, 30, what="both points")
        since = int(plant.status()["tick"])
        modbus = AsyncModbusTcpClient(
            plant.device("pump-station")["host"], port=plant.device("pump-station")["port"]
        )
        opcua = Client(plant.device("boiler")["url"], timeout=5)
        assert await modbus.connect()
        await opcua.connect()
        try:
            index = await opcua.get_namespace_index(plant.device("boiler")["namespace"])
            node = opcua.get_node(f"ns={index};s=boiler-1.heater_power_sp")
            assert not (await modbus.write_register(0, speed_sp, device_id=1)).isError()
            await node.write_value(ua.DataValue(ua.Variant(power_sp, ua.VariantType.Double)))
        finally:
            modbus.close()
            await opcua.disconnect()
        await asyncio.sleep(2.5)  # the steep part of both responses
    offsets: dict[str, list[float]] = {}
    for point in steps:
        truth = plant.request("GET", f"/truth/history?point={point}&since_tick={since}")["rows"]
        first, last = float(truth[0][3]), float(truth[-1][3])
        entity, _, attribute = point.partition(".")
        for reading in view.values(entity, attribute):
            assert isinstance(reading.value, int | float)
            # the steep part only: between 10 % and 90 % of the way
            share = (reading.value - first) / (last - first)
            if reading.ts_ms >= truth[0][2] and 0.1 < share < 0.9:
                when = _when_true(truth, float(reading.value))
                if when is not None:
                    offsets.setdefault(point, []).append(reading.ts_ms - when)
    modbus_offsets = sorted(offsets["pump-1.speed"])
    opcua_offsets = offsets["boiler-1.heater_power"]
    assert len(modbus_offsets) >= 5, offsets
    assert len(opcua_offsets) >= 5, offsets
    # OPC-UA: the tick's own time (a millisecond of rounding either way)
    assert all(abs(o) <= 2 for o in opcua_offsets), opcua_offsets
    # Modbus: never before the value was true (the noise is worth ~10 ms on this
    # slope), typically within a tick of it, none later than a tick and 250 ms
    median = modbus_offsets[len(modbus_offsets) // 2]
    assert modbus_offsets[0] >= -20, modbus_offsets
    assert 0 <= median <= tick_ms + 50, modbus_offsets
    assert modbus_offsets[-1] <= tick_ms + 250, modbus_offsets
