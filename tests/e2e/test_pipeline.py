"""Simulator → agents → Mosquitto → hub, all real processes (``fieldtwin.hub.demo.Plant``).

One plant for the module (starting it takes a while on a 2-core machine); each test
breaks something the simulator's faults cannot (kills, freezes or restarts a process,
an undeclared point, a missing entity, replayed frames), waits for the hub to report
the drift it must report, and puts the plant back as it found it. Every simulator fault
kind is in the fault matrix, tests/e2e/test_fault_matrix.py. Limits are shortened
through config overrides; latencies are measured against them with slack for polling
and scheduling, never tight.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest
import pytest_asyncio
from support.broker import MosquittoBroker
from support.e2e import cleared, drift_on, running_plant, wait_for

from fieldtwin.hub.demo import Plant, compare_with_truth
from fieldtwin.hub.store import TwinStore

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

GATEWAY_SILENT_S = 6.0
MISSING_AFTER_S = 5.0
SLACK_S = 15.0  # agent polling (1 s), drift cycle (0.5 s), a busy shared machine

HUB_OVERRIDES: dict[str, Any] = {
    "drift": {
        "interval_s": 0.5,
        "gateway_silent_s": GATEWAY_SILENT_S,
        "missing_after_s": MISSING_AFTER_S,
    },
    "ingest": {"gap_timeout_s": 2.0, "rebirth_min_interval_s": 2.0},
    # declared but never reported: the "missing entity" fault
    "+entities": [
        {"id": "tank-2", "type": "tank", "gateway": "gw-pumps", "static": {"height_m": 5.0}}
    ],
}


HEARTBEAT_S = 1.0  # well under GATEWAY_SILENT_S, as docs/agent.md asks


def edit_agent(gateway: str, data: dict[str, Any]) -> None:
    data.setdefault("broker", {})["heartbeat_s"] = HEARTBEAT_S
    if gateway != "gw-pumps":
        return
    pumps = data["devices"][0]
    # reported but not declared: the "undeclared entity" fault
    pumps["points"].append(
        {
            "entity": "mixer-1",
            "attribute": "speed",
            "table": "input",
            "address": 4,
            "type": "uint16",
            "unit": "rpm",
        }
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plant(
    broker: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Plant]:
    async with running_plant(
        broker,
        tmp_path_factory.mktemp("plant"),
        all_reporting,
        operators=False,
        speed=2.0,
        hub_overrides=HUB_OVERRIDES,
        agent_edit=edit_agent,
    ) as plant:
        yield plant


async def all_reporting(plant: Plant) -> bool:
    entities = await plant.call("/api/twin")
    declared = [e for e in entities if e["declared"] and e["physical_id"] != "tank-2"]
    # health is recomputed by the drift cycle, a moment after the values themselves land
    return len(declared) == 7 and all(
        e["attributes"] and e["health"] != "unknown" for e in declared
    )


async def detected(
    plant: Plant, rule: str, entity: str, attribute: str, started_ms: int, limit_s: float
) -> dict[str, Any]:
    async def found() -> Any:
        return await drift_on(plant, rule, entity, attribute)

    item = await wait_for(found, within=limit_s + 45, what=f"{rule} on {entity}.{attribute}")
    latency_s = (item["detected_ms"] - started_ms) / 1000
    assert latency_s <= limit_s + SLACK_S, f"{rule} took {latency_s:.1f} s (limit {limit_s} s)"
    return dict(item)


# -- the tests ------------------------------------------------------------------------------


async def test_twin_matches_ground_truth(plant: Plant) -> None:
    truth = await plant.truth()
    entities = await plant.call("/api/twin")
    matches, mismatches = compare_with_truth(entities, truth)
    assert not mismatches, mismatches
    assert len(matches) >= 18  # every water-plant point the simulator serves

    # A healthy plant is healthy: right after the start (under load, a slow agent) a
    # verdict may still be settling, so it has a few cycles; a finding that stays fails
    # with the drift it stands on.
    async def healthy() -> bool:
        twin = await plant.call("/api/twin")
        health = {e["physical_id"]: e["health"] for e in twin}
        return health["boiler-1"] == health["flowmeter-1"] == "healthy"

    try:
        await wait_for(healthy, within=30, what="boiler-1 and flowmeter-1 healthy")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {await plant.call('/api/drift')}") from None


async def test_structural_missing_and_undeclared(plant: Plant) -> None:
    missing = await detected(plant, "structural.missing", "tank-2", "", plant.started_ms, 60)
    assert "never reported" in missing["description"]
    undeclared = await detected(plant, "structural.undeclared", "mixer-1", "", plant.started_ms, 60)
    assert undeclared["strategy"] == "investigate"
    alarms = await plant.call("/api/alarms", {"state": "active"})
    assert any(a["entity"] == "mixer-1" and a["rule"] == "structural.undeclared" for a in alarms)
    export = await plant.call("/api/export")
    actions = [a["action"] for a in export["reconciliation"]["recent_actions"]]
    assert any("opened investigation" in a for a in actions)


async def test_gateway_killed_is_silent_at_once_and_recovers(plant: Plant) -> None:
    started = int(time.time() * 1000)
    await plant.agents["gw-boiler"].kill()
    item = await detected(plant, "temporal.gateway_silent", "gw-boiler", "", started, 1.0)
    assert "death received" in item["description"]
    twin = {e["physical_id"]: e for e in await plant.call("/api/twin")}
    assert twin["boiler-1"]["health"] == "stale"
    # sensor staleness is not reported separately for a silent gateway
    assert await drift_on(plant, "temporal.sensor_stale", "boiler-1", "temperature") is None
    await plant.start_agent("gw-boiler")
    await cleared(plant, "temporal.gateway_silent", "gw-boiler")


async def test_frozen_agent_is_silent_after_its_limit(plant: Plant) -> None:
    agent = plant.agents["gw-field"]
    assert agent.process is not None
    started = int(time.time() * 1000)
    os.kill(agent.process.pid, signal.SIGSTOP)
    try:
        item = await detected(
            plant, "temporal.gateway_silent", "gw-field", "", started, GATEWAY_SILENT_S
        )
        assert "no frames or heartbeats for" in item["description"]  # silence, not a death
    finally:
        os.kill(agent.process.pid, signal.SIGCONT)
    await cleared(plant, "temporal.gateway_silent", "gw-field")


async def test_replayed_and_tampered_frames_are_refused_and_audited(
    plant: Plant, broker: MosquittoBroker
) -> None:
    captured: list[bytes] = []
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username="hub",
        password=broker.passwords["hub"],
        identifier="e2e-observer",
        timeout=10,
    ) as observer:
        await observer.subscribe("ft/v1/gw-pumps/up/data", qos=1)
        async with asyncio.timeout(30):
            async for message in observer.messages:
                captured.append(bytes(message.payload))  # type: ignore[arg-type]
                break
    before = (await plant.call("/api/status"))["frames_rejected"]
    signed, signature = msgpack.unpackb(captured[0])
    tampered = bytearray(signed)
    tampered[-2] ^= 0x01
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username="gw-pumps",
        password=broker.passwords["gw-pumps"],
        identifier="e2e-attacker",
        timeout=10,
    ) as attacker:
        await attacker.publish("ft/v1/gw-pumps/up/data", captured[0], qos=1)
        await attacker.publish(
            "ft/v1/gw-pumps/up/data", msgpack.packb([bytes(tampered), signature]), qos=1
        )

    async def refused() -> Any:
        now = (await plant.call("/api/status"))["frames_rejected"]
        replay = now.get("replay", 0) > before.get("replay", 0)
        bad = now.get("bad_signature", 0) > before.get("bad_signature", 0)
        return replay and bad

    await wait_for(refused, within=30, what="replay and bad signature counted")
    audit = await plant.call("/api/audit", {"limit": 200})
    reasons = {a["detail"].get("reason") for a in audit if a["action"] == "frame_rejected"}
    assert {"replay", "bad_signature"} <= reasons
    metrics = await asyncio.to_thread(plant.api().call, "/metrics")
    assert 'fieldtwin_hub_frames_rejected_total{reason="bad_signature"}' in metrics


async def test_hub_crash_mid_stream_recovers_without_double_apply(plant: Plant) -> None:
    assert plant.hub is not None
    await plant.hub.kill()  # SIGKILL while the agents stream: no flush, no clean stop
    await asyncio.sleep(3)  # agents keep publishing; the broker queues for the hub
    await plant.hub.start()
    await plant.wait_for_hub()

    async def caught_up() -> bool:
        status = await plant.call("/api/status")
        return all(g["up"] for g in status["gateways"] if g["id"] in plant.agents)

    await wait_for(caught_up, within=60, what="every gateway back up")
    await asyncio.sleep(3)
    await plant.hub.stop()
    store = TwinStore.open(plant.layout.database, read_only=True, threads=1)
    try:
        duplicates = store.query(
            "SELECT gateway, epoch, seq, count(*) FROM frames GROUP BY ALL HAVING count(*) > 1"
        )
        assert duplicates == []
        data_rows = store.query(
            "SELECT (SELECT sum(samples) FROM frames WHERE kind = 'data'), "
            "(SELECT count(*) FROM history h JOIN frames f ON f.id = h.frame_id "
            "WHERE f.kind = 'data')"
        )
        assert data_rows[0][0] == data_rows[0][1]
        crashes = store.query("SELECT count(*) FROM audit WHERE action = 'hub_started'")
        assert crashes[0][0] >= 2
    finally:
        store.close()
    await plant.hub.start()
    await plant.wait_for_hub()
    await wait_for(lambda: all_reporting(plant), within=60, what="every entity reporting again")
    truth = await plant.truth()
    _, mismatches = compare_with_truth(await plant.call("/api/twin"), truth)
    assert not mismatches, mismatches


async def test_logs_are_clean(plant: Plant) -> None:
    def tracebacks() -> list[str]:
        return [
            f"{path.name}:\n{text[-3000:]}"
            for path in Path(plant.layout.logs).glob("*.log")
            if "Traceback" in (text := path.read_text(errors="replace"))
        ]

    assert await asyncio.to_thread(tracebacks) == []
