"""Helpers for hub tests: a small twin config on disk, a signing gateway, a running hub.

``GatewaySigner`` produces real signed frames with the protocol package (the same bytes
an agent sends), so hub tests exercise verification, replay protection and storage
without an agent process.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fieldtwin.protocol.aio import recancel_stuck
from fieldtwin.protocol.births import split_birth
from fieldtwin.protocol.frames import FrameSigner
from fieldtwin.protocol.keys import KeyPair, write_key_pair
from fieldtwin.protocol.messages import (
    Birth,
    Data,
    Death,
    DeviceLink,
    Heartbeat,
    PointMeta,
    Quality,
    Sample,
    Value,
)
from fieldtwin.protocol.topics import uplink_topic


def now_ms() -> int:
    return time.time_ns() // 1_000_000


HUB_TOML = """
[hub]
twin_id = "test-plant"
domain = "test"
database = "{database}"
key = "keys/hub.key"
api_port = 0
memory_limit = "256MB"
threads = 1

[broker]
url = "{broker_url}"
username = "hub"
password = "{password}"
client_id = "{client_id}"

[ingest]
gap_timeout_s = 0.5
rebirth_min_interval_s = 1.0
ack_interval_ms = 50
batch_window_ms = 2
queue_max_frames = {queue_max}

[drift]
interval_s = {drift_interval_s}
stale_factor = 3.0
default_interval_s = 30.0
gateway_silent_s = {silent_s}
missing_after_s = {missing_s}
rate_hold_s = 5.0

[gateways.gw-01]
public_key = "keys/gw-01.pub"

[gateways.gw-02]
public_key = "keys/gw-02.pub"

[types.tank.attributes.level]
unit = "m"
interval_s = 1.0
stale_after_s = {stale_s}
high = {{ warning = 4.0, critical = 4.5 }}
low = {{ warning = 1.0 }}
deadband = 0.1
max_rate = 1.0
frozen_after_s = {frozen_s}

[types.tank.attributes.temp]
unit = "degC"

[types.pump.attributes.speed]
unit = "rpm"

[types.pump.attributes.speed_sp]
unit = "rpm"
writable = true
min = 0
max = 1800
max_step = 600
tolerance = 5
approvals = 1
two_person = true
verify_timeout_s = {verify_s}

[types.pump.attributes.running]
writable = true

[[entities]]
id = "tank-1"
type = "tank"
gateway = "gw-01"
static = {{ area_m2 = 1.0 }}

[[entities]]
id = "pump-1"
type = "pump"
gateway = "gw-01"
desired = {{ speed_sp = 900 }}

[[interlocks]]
id = "pump-needs-water"
description = "pump speed above 0 requires tank level above 0.3 m"
target = "pump-1.speed_sp"
when = "> 0"
require = "tank-1.level > 0.3"

[operators.olga]
public_key = "keys/olga.pub"
roles = ["operator"]

[operators.piet]
public_key = "keys/piet.pub"
roles = ["approver"]

[operators.ada]
public_key = "keys/ada.pub"
roles = ["admin"]

[operators.vic]
public_key = "keys/vic.pub"
roles = ["viewer"]

[[relationships]]
source = "pump-1"
target = "tank-1"
type = "feeds"

[[structural]]
id = "pump-feeds-tank"
entity_type = "pump"
relationship = "feeds"
target_type = "tank"

[reconciliation]
default = "alert"

[[reconciliation.rules]]
drift = "temporal.sensor_stale"
strategy = "auto_correct"

[[reconciliation.rules]]
drift = "structural.undeclared"
strategy = "investigate"
{extra}
"""


OPERATORS = ("olga", "piet", "ada", "vic")
"""The test config's operators: olga operator, piet approver, ada admin, vic viewer."""


@dataclass
class HubFiles:
    config: Path
    hub_key: KeyPair
    gateway_keys: dict[str, KeyPair]
    database: Path
    operator_keys: dict[str, KeyPair] = field(default_factory=dict)

    @property
    def keys(self) -> Path:
        return self.config.parent / "keys"


def write_hub_config(
    directory: Path,
    *,
    broker_url: str = "mqtt://127.0.0.1:1",
    password: str = "",
    client_id: str = "ft-hub",
    silent_s: float = 3.0,
    missing_s: float = 2.0,
    stale_s: float = 3.0,
    frozen_s: float = 5.0,
    drift_interval_s: float = 0.2,
    verify_s: float = 10.0,
    queue_max: int = 10_000,
    extra: str = "",
) -> HubFiles:
    directory.mkdir(parents=True, exist_ok=True)
    keys = directory / "keys"
    pairs: dict[str, KeyPair] = {}
    for name in ("hub", "gw-01", "gw-02", *OPERATORS):
        if (keys / f"{name}.key").exists():
            from fieldtwin.protocol.keys import load_private_key

            pairs[name] = load_private_key(keys / f"{name}.key")
        else:
            pairs[name] = write_key_pair(keys, name)[2]
    database = directory / "state" / "hub.duckdb"
    config = directory / "hub.toml"
    config.write_text(
        HUB_TOML.format(
            database=database,
            broker_url=broker_url,
            password=password,
            client_id=client_id,
            silent_s=silent_s,
            missing_s=missing_s,
            stale_s=stale_s,
            frozen_s=frozen_s,
            drift_interval_s=drift_interval_s,
            verify_s=verify_s,
            queue_max=queue_max,
            extra=extra,
        )
    )
    hub_key = pairs.pop("hub")
    operators = {name: pairs.pop(name) for name in OPERATORS}
    return HubFiles(config, hub_key, pairs, database, operators)


def register_operators(broker: Any, files: HubFiles) -> None:
    """Broker users for the config's operators, with password files next to their keys
    (where ``fieldtwin cmd --operator NAME -c hub.toml`` looks for them)."""
    import os

    for name in OPERATORS:
        password = broker.passwords.get(name) or broker.add_user(name, role="operator")
        path = files.keys / f"{name}.password"
        path.write_text(password + "\n")
        os.chmod(path, 0o600)


@dataclass
class GatewaySigner:
    """Signs frames as one gateway, keeping its own epoch and seq like an agent."""

    gateway: str
    key: KeyPair
    epoch: int = field(default_factory=now_ms)
    seq: int = 0
    birth_seq: int = 0
    session: int = 0
    """The seq of the birth that opened the current connection (what a will names)."""

    def __post_init__(self) -> None:
        self.signer = FrameSigner(self.gateway, self.key)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def data(self, samples: Iterable[Sample], seq: int | None = None) -> tuple[str, bytes]:
        body = Data.of(samples)
        number = seq if seq is not None else self.next_seq()
        return uplink_topic(self.gateway, "data"), self.signer.encode(
            self.epoch, number, now_ms(), body
        )

    def birth(
        self,
        points: Iterable[PointMeta] = (),
        state: Iterable[Sample] = (),
        low_water: int = 1,
        info: dict[str, str] | None = None,
        rebirth: bool = False,
        state_seqs: Iterable[int] = (),
    ) -> tuple[str, bytes]:
        """A birth opening a new connection, or with ``rebirth`` one within the current.

        ``state_seqs`` names the data frame that carries each state sample (as an agent's
        birth does); without it the hub takes the state as current but not as history."""
        seq = self.next_seq()
        self.birth_seq = seq
        if not rebirth or not self.session:
            self.session = seq
        body = Birth(
            tuple(points),
            tuple(state),
            low_water,
            info or {"agent": "test"},
            session=0 if self.session == seq else self.session,
            state_seqs=tuple(state_seqs),
        )
        return uplink_topic(self.gateway, "birth"), self.signer.encode(
            self.epoch, seq, now_ms(), body
        )

    def birth_parts(
        self,
        points: Iterable[PointMeta] = (),
        state: Iterable[Sample] = (),
        low_water: int = 1,
        *,
        max_frame_bytes: int,
        rebirth: bool = False,
        state_seqs: Iterable[int] = (),
    ) -> list[tuple[str, bytes]]:
        """A birth split as an agent splits it for ``max_frame_bytes`` (parts in order)."""
        seq = self.next_seq()
        self.birth_seq = seq
        if not rebirth or not self.session:
            self.session = seq
        whole = Birth(
            tuple(points),
            tuple(state),
            low_water,
            {"agent": "test"},
            session=0 if self.session == seq else self.session,
            state_seqs=tuple(state_seqs),
        )
        parts = split_birth(whole, seq, max_frame_bytes)
        seqs = [seq] + [self.next_seq() for _ in parts[1:]]
        topic = uplink_topic(self.gateway, "birth")
        return [
            (topic, self.signer.encode(self.epoch, number, now_ms(), part))
            for part, number in zip(parts, seqs, strict=True)
        ]

    def heartbeat(
        self, beat: int, devices: Iterable[DeviceLink] = (), session: int | None = None
    ) -> tuple[str, bytes]:
        body = Heartbeat(self.session if session is None else session, beat, 1000, tuple(devices))
        return uplink_topic(self.gateway, "heartbeat"), self.signer.encode(
            self.epoch, 0, now_ms(), body
        )

    def death(self, birth_seq: int | None = None, reason: str = "test") -> tuple[str, bytes]:
        body = Death(birth_seq if birth_seq is not None else self.session, reason)
        return uplink_topic(self.gateway, "death"), self.signer.encode(
            self.epoch, 0, now_ms(), body
        )


def sample(
    entity: str, attribute: str, value: Value, ts: int | None = None, quality: int = 0
) -> Sample:
    return Sample(entity, attribute, value, ts if ts is not None else now_ms(), Quality(quality))


def point(entity: str, attribute: str, dtype: str = "float64", **kw: Any) -> PointMeta:
    return PointMeta(entity, attribute, dtype, **kw)


async def wait_for(predicate: Any, within: float = 20.0, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy (awaiting it if it is a coroutine)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running_hub(config_path: Path, *, mqtt: bool = True) -> AsyncIterator[Any]:
    """Run a ``Hub`` in this event loop; yields it once ready (and connected)."""
    from fieldtwin.hub.config import load_hub_config
    from fieldtwin.hub.runtime import Hub

    hub = Hub(load_hub_config(config_path))
    task = asyncio.create_task(hub.run(), name="test-hub")
    try:
        await wait_for(lambda: hub.ready.is_set() or task.done(), within=30)
        if task.done():
            task.result()
        if mqtt:
            await wait_for(lambda: hub.mqtt_ready.is_set() or task.done(), within=30)
            if task.done():
                task.result()
        yield hub
    finally:
        task.cancel()
        # As `fieldtwin hub run` does on SIGTERM: after 3 s, tasks that were asked to
        # stop and run on (a library swallowed the request) are cancelled again.
        done, _ = await asyncio.wait({task}, timeout=3)
        for _ in range(27):
            if done:
                break
            recancel_stuck("hub-")
            done, _ = await asyncio.wait({task}, timeout=1)
        # a hub that still does not stop fails here, not at the suite's timeout
        if not done:
            stacks = io.StringIO()
            for stuck in asyncio.all_tasks():
                stuck.print_stack(file=stacks)
            raise AssertionError(
                "the hub did not stop within 30 s of being cancelled; tasks:\n" + stacks.getvalue()
            )
        with contextlib.suppress(asyncio.CancelledError):
            await task
