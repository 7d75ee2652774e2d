"""Command benchmarks: approve-to-write and approve-to-verified latency, operator requests/s.

Run: python bench/commands.py [--rounds N] [--seconds S]

1. Latency through the real pipeline: a Mosquitto with the project's ACL (started here
   on a free port), the water-plant simulator, the three agents (the pump station's
   checks operator approvals itself) and the hub, as processes (``hub.demo.Plant``).
   Each round, alice proposes a new pump speed setpoint and bob approves it over the
   operator channel. Measured from just before bob's signed approval is published:
   - approve-to-write: until the simulated device received the write (the simulator's
     ground-truth write record, stamped with this machine's wall clock);
   - approve-to-verified: until the hub marked the command verified (its ``verified_ms``,
     same clock): the agent read the value back, reported it, and the hub's twin saw it.
2. Operator requests verified per second: (a) in process, ``RequestGate.admit`` on
   signed requests (decode, Ed25519 verify, expiry, nonce) on one core; (b) end to end,
   one operator client keeping 32 ``cmd.dry_run`` requests in flight against the running
   hub for ``--seconds``: answers per second (each request verified, authorised and
   answered with a signed, policy-checked verdict).

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.broker import MosquittoBroker  # noqa: E402
from support.plant import plant_logins  # noqa: E402

from fieldtwin.hub.config import load_hub_config  # noqa: E402
from fieldtwin.hub.demo import Plant, PlantOptions  # noqa: E402
from fieldtwin.hub.opclient import OperatorClient, OperatorProfile  # noqa: E402
from fieldtwin.hub.operators import RequestGate  # noqa: E402
from fieldtwin.protocol.frames import FrameSigner  # noqa: E402
from fieldtwin.protocol.keys import load_private_key  # noqa: E402
from fieldtwin.protocol.messages import OperatorRequest  # noqa: E402
from fieldtwin.protocol.topics import operator_request_topic  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def _writes(plant: Plant) -> list[dict[str, Any]]:
    result = await plant.sim_call("GET", "/truth/writes?point=pump-1.speed_sp")
    return list(result["writes"])


async def latency(plant: Plant, rounds: int) -> dict[str, list[float]]:
    alice = OperatorClient(OperatorProfile.load(plant.layout.operator_profile("alice")))
    bob = OperatorClient(OperatorProfile.load(plant.layout.operator_profile("bob")))
    to_write: list[float] = []
    to_verified: list[float] = []
    async with alice.connected(), bob.connected():
        for n in range(rounds):
            value = 1000 if n % 2 == 0 else 900
            seen = len(await _writes(plant))
            proposed = await alice.request(
                "cmd.propose", {"target": "pump-1.speed_sp", "value": value, "reason": "bench"}
            )
            if proposed["state"] != "awaiting_approval":
                raise SystemExit(
                    f"round {n}: {proposed['id']} {proposed['state']}: {proposed['outcome']}"
                )
            approval = bob.approval_for(proposed)
            started_ms = time.time() * 1000
            await bob.request("cmd.approve", approval)
            deadline = time.monotonic() + 60
            row: dict[str, Any] = {}
            while time.monotonic() < deadline:
                row = await bob.request("cmd.show", {"cmd_id": proposed["id"]})
                if row["closed_ms"] is not None:
                    break
                await asyncio.sleep(0.05)
            if row.get("state") != "verified":
                raise SystemExit(
                    f"round {n}: {proposed['id']} {row.get('state')}: {row.get('outcome')}"
                )
            written = [w for w in (await _writes(plant))[seen:] if w["value"] == value]
            if len(written) != 1:
                raise SystemExit(f"round {n}: {len(written)} device writes of {value}")
            to_write.append(written[0]["wall_ms"] - started_ms)
            to_verified.append(row["verified_ms"] - started_ms)
    return {"write": to_write, "verified": to_verified}


def gate_rate(state: Path, seconds: float) -> float:
    """Requests admitted per second by the hub's gate, in process (one core)."""
    config = load_hub_config(state / "hub.toml")
    registry = config.operator_registry()
    key = load_private_key(state / "keys" / "alice.key")
    signer = FrameSigner("alice", key)
    now = int(time.time() * 1000)
    payloads = [
        signer.encode(
            1,
            n + 1,
            now,
            OperatorRequest(
                secrets.token_hex(12),
                now + 300_000,
                "cmd.dry_run",
                {"target": "pump-1.speed_sp", "value": 1000},
            ),
        )
        for n in range(20_000)
    ]
    gate = RequestGate(config.operators, registry, started_ms=now - 1000)
    topic = operator_request_topic("alice")
    done = 0
    started = time.perf_counter()
    for payload in payloads:
        gate.admit(topic, payload, now)
        done += 1
        if time.perf_counter() - started >= seconds:
            break
    return done / (time.perf_counter() - started)


async def request_rate(plant: Plant, seconds: float, window: int = 32) -> float:
    client = OperatorClient(OperatorProfile.load(plant.layout.operator_profile("vic")))
    answered = 0
    async with client.connected():
        deadline = time.monotonic() + seconds
        started = time.monotonic()

        async def worker() -> None:
            nonlocal answered
            while time.monotonic() < deadline:
                await client.request("cmd.dry_run", {"target": "pump-1.speed_sp", "value": 1000})
                answered += 1

        await asyncio.gather(*(worker() for _ in range(window)))
        elapsed = time.monotonic() - started
    return answered / elapsed


async def run(rounds: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ft-bench-cmd-") as tmp:
        workdir = Path(tmp)
        broker = MosquittoBroker(workdir / "broker")
        broker.add_user("hub")
        state = workdir / "plant"
        plant_logins(broker, state)  # gateways, and alice/bob/vic with the operator ACL
        broker.start()
        plant = Plant(PlantOptions(state_dir=state, broker_url=broker.url, speed=1.0))
        try:
            await plant.start()
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                twin = {e["physical_id"]: e for e in await plant.call("/api/twin")}
                attrs = twin.get("pump-1", {}).get("attributes", {})
                level = twin.get("tank-1", {}).get("attributes", {}).get("level")
                if "speed_sp" in attrs and level and level["quality"] == "good":
                    break
                await asyncio.sleep(0.5)
            lat = await latency(plant, rounds)
            end_to_end = await request_rate(plant, seconds)
            in_process = gate_rate(state, seconds)
        finally:
            await plant.stop()
            broker.stop()
    return {
        "rounds": rounds,
        "approve_to_write_p50_ms": round(percentile(lat["write"], 0.5), 1),
        "approve_to_write_p99_ms": round(percentile(lat["write"], 0.99), 1),
        "approve_to_verified_p50_ms": round(percentile(lat["verified"], 0.5), 1),
        "approve_to_verified_p99_ms": round(percentile(lat["verified"], 0.99), 1),
        "approve_to_write_mean_ms": round(statistics.fmean(lat["write"]), 1),
        "operator_requests_per_s_end_to_end": round(end_to_end, 1),
        "operator_requests_verified_per_s_one_core": round(in_process, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="commands to approve (default 40)")
    parser.add_argument("--seconds", type=float, default=10.0, help="request-rate phases (s)")
    args = parser.parse_args()
    result = asyncio.run(run(args.rounds, args.seconds))
    result["machine"] = f"{platform.machine()} {platform.python_version()}"
    width = max(len(k) for k in result)
    print(f"{'measurement'.ljust(width)}  result")
    for name, value in result.items():
        print(f"{name.ljust(width)}  {value}")
    target = result["approve_to_write_p99_ms"] < 200
    print(f"{'target approve-to-write p99 < 200 ms'.ljust(width)}  {'met' if target else 'missed'}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
