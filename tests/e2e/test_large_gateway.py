"""One agent serving a 20,000-point PLC: simulator load mode → agent → Mosquitto → hub.

The simulator serves 20 Modbus TCP devices of 1,000 input registers each (load mode,
docs/simulator.md); the agent reads them through one register-range entry per device
(``count = 1000``); its birth (about 3 MB) goes in parts and the hub applies it once
it has all of them. Everything is real: the simulator process, Mosquitto with the
project's ACL, the agent's DuckDB buffer and the hub's DuckDB twin.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from support.agent_env import AgentEnv, running_agent
from support.broker import MosquittoBroker
from support.hub_env import running_hub, wait_for, write_hub_config
from support.sim import SimProcess

from fieldtwin.protocol.frames import DEFAULT_MAX_FRAME_BYTES
from fieldtwin.protocol.keys import load_public_key

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DEVICES = 20
REGISTERS = 1000
POINTS = DEVICES * REGISTERS

SCENARIO = f"""
[scenario]
name = "load-{DEVICES}x{REGISTERS}"
seed = 1
tick = 0.5
control = "127.0.0.1:17101"

[load]
modbus_devices = {DEVICES}
registers_per_device = {REGISTERS}
point_type = "uint16"
table = "input_registers"
host = "127.0.0.1"
base_port = 15100
"""


def agent_devices(endpoints: dict[str, Any]) -> list[dict[str, Any]]:
    """One device per load device, its 1,000 registers as one register-range entry."""
    devices = []
    for device in endpoints["devices"]:
        synthetic = device["synthetic"]
        devices.append(
            {
                "id": device["id"],
                "protocol": "modbus-tcp",
                "host": device["host"],
                "port": device["port"],
                "interval_ms": 5000,
                "points": [
                    {
                        "entity": device["id"],
                        "attribute": "p{i}",
                        "table": "input",
                        "address": synthetic["address"],
                        "count": synthetic["points"],
                        "type": "uint16",
                    }
                ],
            }
        )
    return devices


async def test_a_20000_point_gateway_reaches_the_twin(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    scenario = tmp_path / "load.toml"
    scenario.write_text(SCENARIO)
    sim = SimProcess.start(scenario, "--no-truth", timeout=120, stderr_path=tmp_path / "sim.log")
    try:
        files = write_hub_config(
            tmp_path / "hub",
            broker_url=broker.url,
            password=broker.passwords["hub"],
            client_id="ft-hub-large",
            silent_s=30,
            missing_s=30,
            drift_interval_s=1.0,
        )
        keys = tmp_path / "hub" / "keys"
        password_file = keys / "gw-01.password"
        password_file.write_text(broker.passwords.get("gw-01") or broker.add_user("gw-01"))
        password_file.chmod(0o600)
        env = AgentEnv(
            root=tmp_path / "agent",
            gateway="gw-01",
            broker=broker,
            gateway_key_path=keys / "gw-01.key",
            gateway_public=load_public_key(keys / "gw-01.pub"),
            hub_key=files.hub_key,
            hub_public_path=keys / "hub.pub",
            password_file=password_file,
        )
        env.root.mkdir()
        devices = agent_devices(sim.endpoints)
        assert len(devices) == DEVICES
        config = env.write_config(devices, buffer={"flush_ms": 200, "batch_max_samples": 5000})
        async with running_hub(files.config) as hub, running_agent(config) as agent:
            state = hub.service.ingest.state

            def count(table: dict[Any, Any]) -> int:
                return sum(1 for item in table.values() if item.gateway == "gw-01")

            async def born() -> bool:  # the hub's state is read on its database thread
                return await hub.db(count, state.points) == POINTS

            await wait_for(born, within=120)
            stats = agent.uplink.stats
            assert stats.birth_parts >= 3 * stats.births  # ~3 MB over 1 MiB frames, each

            async def births_applied() -> bool:
                """Every birth the agent sent is applied once, whole, every part stored."""
                frames = (
                    await hub.db(
                        hub.service.store.query,
                        "SELECT count(*) FROM frames WHERE gateway = 'gw-01' AND kind = 'birth'",
                    )
                )[0][0]
                births = (
                    await hub.db(
                        hub.service.store.query,
                        "SELECT count(*) FROM audit WHERE action = 'birth' AND subject = 'gw-01'",
                    )
                )[0][0]
                stats = agent.uplink.stats
                return bool(frames == stats.birth_parts and births == stats.births)

            await wait_for(births_applied, within=60)

            async def reported() -> bool:
                return await hub.db(count, state.current) == POINTS

            started = time.monotonic()
            await wait_for(reported, within=180)
            elapsed = time.monotonic() - started
            # Register k of load device i holds (i*1000 + k + tick) mod 65536: within one
            # block read the tick is the same, so (value - i*1000 - k) takes one value per
            # read. Wrong addresses or codecs would scatter it over hundreds of values.
            current = await hub.db(dict, state.current)
            for index in range(DEVICES):
                device = f"load-{index:03d}"
                ticks = {
                    (current[(device, f"p{k}")].value - index * 1000 - k) % 65536
                    for k in range(REGISTERS)
                }
                assert len(ticks) <= 16, (device, sorted(ticks)[:20])
            # A loaded machine may make the agent resend a frame whose ack was late; the hub
            # drops that copy as a replay, which is recovery working. Anything else is a bug.
            rejected = {k: n for k, n in hub.metrics.frames_rejected.items() if k != "replay"}
            assert rejected == {}, hub.metrics.frames_rejected
            assert await hub.db(hub.service.ingest.tracker.gaps, "gw-01") == []
            print(
                f"\n{POINTS} points: {stats.births} birth(s) in {stats.birth_parts} parts of at "
                f"most {DEFAULT_MAX_FRAME_BYTES} bytes; every point current after {elapsed:.1f} s"
            )
    finally:
        code = sim.stop(timeout=60)
        assert code == 0, sim.log[-3000:]
