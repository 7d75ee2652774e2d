"""Approved actuation end to end: simulator → agents → Mosquitto (project ACL) → hub,
with operators signing requests over the broker and the simulator's ground truth as
the judge of what reached the device.

One plant for the module. The pump station's agent checks operator approvals itself
(the demo configures approvers), so every write below carried a valid approval.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest
import pytest_asyncio
from support.broker import MosquittoBroker
from support.e2e import running_plant, wait_for

from fieldtwin.hub.demo import Plant
from fieldtwin.hub.opclient import OperatorClient, OperatorError, OperatorProfile
from fieldtwin.protocol.frames import FrameSigner, decode_frame
from fieldtwin.protocol.keys import KeyRegistry, load_private_key, load_public_key
from fieldtwin.protocol.messages import OperatorRequest, OperatorResponse
from fieldtwin.protocol.topics import operator_request_topic, operator_response_topic

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

GATEWAY_SILENT_S = 5.0
LEVEL_STALE_S = 6.0
SELECT_WINDOW_S = 6.0

HUB_OVERRIDES: dict[str, Any] = {
    "drift": {"interval_s": 0.5, "gateway_silent_s": GATEWAY_SILENT_S},
    "types": {
        "tank": {"attributes": {"level": {"stale_after_s": LEVEL_STALE_S}}},
        "pump": {
            "attributes": {
                "speed_sp": {"select_window_s": SELECT_WINDOW_S, "verify_timeout_s": 20.0}
            }
        },
    },
}


def edit_agent(gateway: str, data: dict[str, Any]) -> None:
    if gateway == "gw-pumps":
        # a slow device answer keeps the agent waiting (instead of failing after 1 s), so
        # the test can kill it between the write reaching the device and the answer
        data["devices"][0]["timeout_s"] = 10.0


async def setpoint_and_level_reported(plant: Plant) -> bool:
    return bool(await reported(plant, "pump-1.speed_sp") and await reported(plant, "tank-1.level"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plant(
    broker: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Plant]:
    async with running_plant(
        broker,
        tmp_path_factory.mktemp("actuation"),
        setpoint_and_level_reported,
        speed=2.0,
        hub_overrides=HUB_OVERRIDES,
        agent_edit=edit_agent,
    ) as plant:
        yield plant


async def reported(plant: Plant, point: str) -> Any:
    entity, attribute = point.split(".")
    twin = {e["physical_id"]: e for e in await plant.call("/api/twin")}
    attr = twin.get(entity, {}).get("attributes", {}).get(attribute)
    return attr if attr and attr["quality"] == "good" else None


def profile(plant: Plant, operator: str) -> OperatorProfile:
    return OperatorProfile.load(plant.layout.operator_profile(operator))


async def ask(plant: Plant, operator: str, op: str, args: dict[str, Any]) -> Any:
    client = OperatorClient(profile(plant, operator))
    async with client.connected():
        return await client.request(op, args)


async def approve(plant: Plant, operator: str, command_id: str) -> Any:
    client = OperatorClient(profile(plant, operator))
    async with client.connected():
        row = await client.request("cmd.show", {"cmd_id": command_id})
        await client.request("cmd.approve", client.approval_for(row))
        return await client.request("cmd.show", {"cmd_id": command_id})


async def settled(plant: Plant, command_id: str, states: set[str], within: float = 40) -> Any:
    async def check() -> Any:
        row = await ask(plant, "vic", "cmd.show", {"cmd_id": command_id})
        return row if row["state"] in states else None

    return await wait_for(check, within, f"{command_id} in {sorted(states)}")


async def writes(plant: Plant, point: str) -> list[dict[str, Any]]:
    result = await plant.sim_call("GET", f"/truth/writes?point={point}")
    return list(result["writes"])


async def true_value(plant: Plant, point: str) -> Any:
    return (await plant.truth())[point]["true"]


async def set_speed(plant: Plant, value: int, reason: str = "restore") -> dict[str, Any]:
    """alice proposes, bob approves, and the command is verified. Once the policy allows
    it: after an agent restart the interlock inputs and the gateway link take a moment
    to be fresh and online again, and a command proposed then is (rightly) refused."""

    async def allowed() -> Any:
        verdict = await ask(
            plant, "alice", "cmd.dry_run", {"target": "pump-1.speed_sp", "value": value}
        )
        return verdict if verdict["allowed"] else None

    await wait_for(allowed, within=30, what=f"a dry run of pump-1.speed_sp := {value} allowed")
    proposed = await ask(
        plant,
        "alice",
        "cmd.propose",
        {"target": "pump-1.speed_sp", "value": value, "reason": reason},
    )
    assert proposed["state"] == "awaiting_approval", (proposed["state"], proposed.get("policy"))
    await approve(plant, "bob", proposed["id"])
    return await settled(plant, proposed["id"], {"verified"})


async def test_an_approved_setpoint_reaches_the_device_and_is_verified(plant: Plant) -> None:
    before = (await reported(plant, "pump-1.speed_sp"))["value"]
    seen = len(await writes(plant, "pump-1.speed_sp"))
    target = 1200 if before != 1200 else 1000
    proposed = await ask(
        plant,
        "alice",
        "cmd.propose",
        {"target": "pump-1.speed_sp", "value": target, "reason": "raise inflow"},
    )
    assert proposed["checkpoint"]["value"] == before
    # alice may not approve her own (two-person rule; she is no approver anyway)
    with pytest.raises(OperatorError) as refused:
        await approve(plant, "alice", proposed["id"])
    assert refused.value.code == "forbidden"
    await approve(plant, "bob", proposed["id"])
    verified = await settled(plant, proposed["id"], {"verified"})
    assert [e["change"] for e in verified["timeline"]][-1] == "verified"
    done = (await writes(plant, "pump-1.speed_sp"))[seen:]
    assert [(w["value"], w["status"]) for w in done] == [(target, "applied")]
    assert await true_value(plant, "pump-1.speed_sp") == target
    await set_speed(plant, 900)


async def test_a_stale_interlock_input_refuses_the_command(plant: Plant) -> None:
    agent = plant.agents["gw-pumps"]
    assert agent.process is not None
    seen = len(await writes(plant, "pump-1.speed_sp"))
    before = await true_value(plant, "pump-1.speed_sp")
    os.kill(agent.process.pid, signal.SIGSTOP)
    try:

        async def stale() -> Any:
            verdict = await ask(
                plant, "alice", "cmd.dry_run", {"target": "pump-1.speed_sp", "value": 1100}
            )
            texts = [c["text"] for c in verdict["policy"] if not c["ok"]]
            return texts if any("is stale, last sample" in t for t in texts) else None

        texts = await wait_for(stale, within=30, what="stale interlock refusal")
        assert any(
            t.startswith("interlock pump-needs-water: input tank-1.level is stale, last sample")
            for t in texts
        ), texts
        # the real thing, not only the dry run: refused, with the reason, and audited
        proposed = await ask(
            plant,
            "alice",
            "cmd.propose",
            {"target": "pump-1.speed_sp", "value": 1100, "reason": "stale test"},
        )
        assert proposed["state"] == "refused", proposed
        assert "input tank-1.level is stale, last sample" in proposed["outcome"]
        with pytest.raises(OperatorError):  # a refused command cannot be approved into a write
            await approve(plant, "bob", proposed["id"])
    finally:
        os.kill(agent.process.pid, signal.SIGCONT)
    audit = await plant.call("/api/audit?limit=500")
    (record,) = [
        r for r in audit if r["action"] == "command_refused" and r["subject"] == proposed["id"]
    ]
    assert record["actor"] == "alice"
    assert any("input tank-1.level is stale" in t for t in record["detail"]["refusals"]), record
    await wait_for(lambda: gateway_up(plant, "gw-pumps"), within=60, what="gw-pumps back")
    shown = await ask(plant, "vic", "cmd.show", {"cmd_id": proposed["id"]})
    assert shown["state"] == "refused"
    assert (await writes(plant, "pump-1.speed_sp"))[seen:] == []  # the device was not written
    assert await true_value(plant, "pump-1.speed_sp") == before


async def gateway_up(plant: Plant, gateway: str) -> bool:
    status = await plant.call("/api/status")
    return any(g["id"] == gateway and g["up"] for g in status["gateways"])


async def test_an_approval_not_sent_in_its_select_window_expires_unsent(plant: Plant) -> None:
    seen = len(await writes(plant, "pump-1.speed_sp"))
    await wait_for(lambda: allowed(plant, 1150), within=30, what="the policy allows 1150 again")
    proposed = await ask(
        plant, "alice", "cmd.propose", {"target": "pump-1.speed_sp", "value": 1150, "reason": "r"}
    )
    assert proposed["state"] == "awaiting_approval", proposed["outcome"]
    agent = plant.agents["gw-pumps"]
    assert agent.process is not None
    os.kill(agent.process.pid, signal.SIGSTOP)
    try:
        await wait_for(
            lambda: _not(gateway_up(plant, "gw-pumps")), within=30, what="gw-pumps silent"
        )
        approved = await approve(plant, "bob", proposed["id"])
        assert approved["state"] == "approved"
        expired = await settled(plant, proposed["id"], {"expired"}, within=SELECT_WINDOW_S + 20)
        assert "select window" in expired["outcome"]
    finally:
        os.kill(agent.process.pid, signal.SIGCONT)
    await wait_for(lambda: gateway_up(plant, "gw-pumps"), within=60, what="gw-pumps back")
    await asyncio.sleep(2)
    assert (await writes(plant, "pump-1.speed_sp"))[seen:] == []  # never written


async def allowed(plant: Plant, value: Any) -> bool:
    verdict = await ask(plant, "vic", "cmd.dry_run", {"target": "pump-1.speed_sp", "value": value})
    return bool(verdict["allowed"])


async def _not(awaitable: Any) -> bool:
    return not await awaitable


async def test_a_replayed_operator_request_is_refused(
    plant: Plant, broker: MosquittoBroker
) -> None:
    keys = plant.layout.keys
    body = OperatorRequest(
        secrets.token_hex(12),
        int(time.time() * 1000) + 30_000,
        "cmd.dry_run",
        {"target": "pump-1.speed_sp", "value": 1000},
    )
    frame = FrameSigner("alice", load_private_key(keys / "alice.key")).encode(
        1, 1, int(time.time() * 1000), body
    )
    hub = KeyRegistry.of({"hub": load_public_key(keys / "hub.pub")})
    answers: list[OperatorResponse] = []
    password = (keys / "alice.password").read_text().strip()
    async with aiomqtt.Client(
        broker.host, broker.port, username="alice", password=password, timeout=10
    ) as client:
        await client.subscribe(operator_response_topic("alice"), qos=1)
        for _ in range(2):  # the same signed bytes, twice (a captured request replayed)
            await client.publish(operator_request_topic("alice"), frame, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                answer = decode_frame(bytes(message.payload), hub).body  # type: ignore[arg-type]
                assert isinstance(answer, OperatorResponse)
                answers.append(answer)
                if len(answers) == 2:
                    return

        await asyncio.wait_for(collect(), 30)
    assert [(a.req_id, a.ok, a.code) for a in answers] == [
        (body.req_id, True, ""),
        (body.req_id, False, "replay"),
    ]


async def test_a_stuck_actuator_fails_verification_and_is_rolled_back(plant: Plant) -> None:
    before = (await reported(plant, "pump-1.speed_sp"))["value"]
    seen = len(await writes(plant, "pump-1.speed_sp"))
    await plant.sim_call(
        "POST",
        "/faults",
        {"kind": "ignore_writes", "point": "pump-1.speed_sp", "params": {"count": 1}},
    )
    proposed = await ask(
        plant, "alice", "cmd.propose", {"target": "pump-1.speed_sp", "value": 1300, "reason": "r"}
    )
    await approve(plant, "bob", proposed["id"])
    done = await settled(plant, proposed["id"], {"rolled_back", "rollback_failed"})
    assert done["state"] == "rolled_back", done["outcome"]
    changes = [(e["command"], e["change"]) for e in done["timeline"]]
    assert (proposed["id"], "failed") in changes
    assert (f"{proposed['id']}.rb", "verified") in changes
    device = [(w["value"], w["status"]) for w in (await writes(plant, "pump-1.speed_sp"))[seen:]]
    assert device == [(1300, "ignored"), (before, "applied")]
    assert await true_value(plant, "pump-1.speed_sp") == before
    await plant.sim_call("POST", "/faults/clear", {})


async def test_an_agent_killed_between_write_and_result_writes_once(plant: Plant) -> None:
    seen = len(await writes(plant, "pump-1.speed_sp"))
    await plant.sim_call(
        "POST", "/faults", {"kind": "slow", "device": "pump-station", "params": {"delay_ms": 6000}}
    )
    proposed = await ask(
        plant, "alice", "cmd.propose", {"target": "pump-1.speed_sp", "value": 1100, "reason": "r"}
    )
    await approve(plant, "bob", proposed["id"])

    async def written() -> bool:
        return len(await writes(plant, "pump-1.speed_sp")) > seen

    await wait_for(written, within=30, what="the write reached the device")
    await plant.agents["gw-pumps"].kill()  # before the (delayed) answer reached the agent
    await plant.sim_call("POST", "/faults/clear", {})
    await plant.start_agent("gw-pumps")
    done = await settled(plant, proposed["id"], {"verified", "rolled_back", "rollback_failed"})
    assert done["state"] == "verified", done["outcome"]
    resent = [e for e in done["timeline"] if e["change"] == "result"]
    assert resent, done["timeline"]
    device = [(w["value"], w["status"]) for w in (await writes(plant, "pump-1.speed_sp"))[seen:]]
    assert device == [(1100, "applied")]  # once, although the frame was sent again
    await set_speed(plant, 900)
