"""Build edge-agent configs for tests: keys, broker login, devices from the simulator.

    env = AgentEnv.create(tmp_path, "gw-pumps", broker)
    devices = devices_from_example("pumps", sim.endpoints)
    config_path = env.write_config(devices, buffer={"flush_ms": 50})
    async with HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub:
        async with running_agent(config_path) as agent: ...

The example agent configs (examples/agents/*.toml) describe the water-plant devices at
their default endpoints; ``devices_from_example`` rewrites host/port/path/url with
the ones an ``--ephemeral`` simulator printed, so tests read exactly what the examples
read.
"""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldtwin.agent.config import load_config
from fieldtwin.agent.runtime import Agent
from fieldtwin.hub.demo import toml_dumps
from fieldtwin.protocol.keys import KeyPair, PublicKey, load_public_key, write_key_pair
from support.broker import MosquittoBroker

__all__ = ["AgentEnv", "devices_from_example", "running_agent", "toml_dumps"]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "agents"


def devices_from_example(
    name: str, endpoints: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The ``[[devices]]`` of examples/agents/NAME.toml, pointed at a running simulator."""
    data = tomllib.loads((EXAMPLES / f"{name}.toml").read_text(encoding="utf-8"))
    devices: list[dict[str, Any]] = data["devices"]
    if endpoints is None:
        return devices
    served = {d["id"]: d for d in endpoints["devices"]}
    for device in devices:
        sim = served[device["id"]]
        if device["protocol"] == "modbus-tcp":
            device["host"], device["port"] = sim["host"], sim["port"]
        elif device["protocol"] in ("modbus-rtu", "serial-line"):
            device["path"] = sim["path"]
        elif device["protocol"] == "opcua":
            device["url"] = sim["url"]
    return devices


@dataclass
class AgentEnv:
    """A gateway's files in a temporary folder: keys, broker password, state, config."""

    root: Path
    gateway: str
    broker: MosquittoBroker
    gateway_key_path: Path
    gateway_public: PublicKey
    hub_key: KeyPair
    hub_public_path: Path
    password_file: Path

    @classmethod
    def create(
        cls,
        root: Path,
        gateway: str,
        broker: MosquittoBroker,
        hub_key: KeyPair | None = None,
    ) -> AgentEnv:
        keys = root / "keys"
        key_path, pub_path, _ = write_key_pair(keys, gateway)
        hub = hub_key or KeyPair.generate()
        hub_public = keys / "hub.pub"
        hub_public.write_bytes(hub.public.pem())
        password_file = keys / f"{gateway}.password"
        password_file.write_text(broker.add_user(gateway))
        password_file.chmod(0o600)
        return cls(
            root=root,
            gateway=gateway,
            broker=broker,
            gateway_key_path=key_path,
            gateway_public=load_public_key(pub_path),
            hub_key=hub,
            hub_public_path=hub_public,
            password_file=password_file,
        )

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def config_path(self) -> Path:
        return self.root / f"{self.gateway}.toml"

    def config(
        self,
        devices: list[dict[str, Any]],
        *,
        buffer: dict[str, Any] | None = None,
        broker: dict[str, Any] | None = None,
        status: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "gateway": self.gateway,
            "state_dir": str(self.state_dir),
            "keys": {
                "private": str(self.gateway_key_path),
                "hub_public": str(self.hub_public_path),
            },
            "broker": {
                "url": self.broker.url,
                "password_file": str(self.password_file),
                "reconnect_min_s": 0.2,
                "reconnect_max_s": 2.0,
                **(broker or {}),
            },
            "buffer": {"flush_ms": 50, **(buffer or {})},
            "status": {"interval_s": 1.0, **(status or {})},
            "devices": devices,
        }

    def write_config(self, devices: list[dict[str, Any]], **options: Any) -> Path:
        self.config_path.write_text(toml_dumps(self.config(devices, **options)))
        return self.config_path


@contextlib.asynccontextmanager
async def running_agent(config_path: Path) -> AsyncIterator[Agent]:
    """Run an agent in this event loop; stop it cleanly (as on SIGTERM) afterwards."""
    agent = Agent(load_config(config_path))
    task = asyncio.create_task(agent.run(), name="agent-under-test")
    try:
        yield agent
    finally:
        agent.stop()
        try:
            async with asyncio.timeout(60):
                assert await task == 0
        finally:
            if not task.done():
                task.cancel()
