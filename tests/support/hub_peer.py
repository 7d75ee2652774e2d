"""An acknowledging stand-in for the hub, built only on ``fieldtwin.protocol``.

It shows what the edge agent expects of a hub (docs/protocol.md, "Session behaviour"):

* connects as MQTT user ``hub`` (client id ``ft-hub-peer-...``), publishes the retained
  signed hub state (a ``hub_state`` frame opening a session) with a signed offline will
  naming that session, like the hub (``fieldtwin.protocol.presence``);
* subscribes to ``ft/v1/+/up/+``, verifies every frame with the gateway keys it was
  given, checks that the signed sender matches the topic's gateway;
* uses a ``DeliveryTracker`` to apply each (sender, epoch, seq) exactly once: a replay
  is counted in ``duplicates`` and not applied again, a birth's ``low_water`` closes
  the seqs below it;
* assembles births sent in parts (``births`` holds one frame per whole birth, its body
  the assembled birth) and keeps every heartbeat;
* records what it applied (samples, births, deaths, command results) and, after
  "storing" it, sends the gateway a signed ``ack`` listing all delivered ranges of
  the gateway's current epoch (acks are coalesced, at most one per ``ack_interval_s``);
* can send signed ``cmd`` and ``rebirth`` frames, stop acknowledging (``acking``),
  lose data frames in transit (``dropping``), or restart as a new hub instance.

Tests use it to assert "every sample arrived, none applied twice".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from fieldtwin.protocol.births import assemble_birth
from fieldtwin.protocol.errors import ProtocolError, Replay, StaleEpoch
from fieldtwin.protocol.frames import Frame, FrameSigner, decode_frame, encode_frame
from fieldtwin.protocol.keys import KeyPair, KeyRegistry, PublicKey
from fieldtwin.protocol.messages import (
    Ack,
    Approval,
    Birth,
    Command,
    CommandResult,
    Data,
    Death,
    Heartbeat,
    Rebirth,
    Sample,
    Value,
)
from fieldtwin.protocol.presence import HubPresence
from fieldtwin.protocol.topics import (
    HUB_STATE_TOPIC,
    HUB_UPLINK_FILTER,
    downlink_topic,
    parse_topic,
)
from fieldtwin.protocol.tracker import DeliveryTracker
from support.broker import MosquittoBroker


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class GatewayView:
    """Everything the peer applied for one gateway."""

    samples: list[Sample] = field(default_factory=list)
    births: list[Frame] = field(default_factory=list)
    birth_parts: list[Frame] = field(default_factory=list)
    """Every birth frame as it arrived (a birth in parts gives several)."""
    pending_parts: dict[int, dict[int, Frame]] = field(default_factory=dict)
    heartbeats: list[Frame] = field(default_factory=list)
    deaths: list[Frame] = field(default_factory=list)
    results: list[CommandResult] = field(default_factory=list)
    applied: list[tuple[int, int]] = field(default_factory=list)
    """(epoch, seq) of every frame applied, in arrival order."""
    duplicates: int = 0
    epochs: set[int] = field(default_factory=set)
    sample_count: int = 0
    """Samples applied from data frames (counted even when they are not kept)."""

    def values(self, entity: str, attribute: str) -> list[Sample]:
        return [s for s in self.samples if s.entity == entity and s.attribute == attribute]

    def latest(self, entity: str, attribute: str) -> Sample | None:
        """Newest by source timestamp (what a twin would show)."""
        matching = self.values(entity, attribute)
        return max(matching, key=lambda s: s.ts_ms) if matching else None

    def keys(self) -> set[tuple[str, str]]:
        return {(s.entity, s.attribute) for s in self.samples}


class HubPeer:
    """Run with ``async with HubPeer(broker, {"gw-01": key.public}, hub_key) as hub:``."""

    def __init__(
        self,
        broker: MosquittoBroker,
        gateway_keys: dict[str, PublicKey],
        hub_key: KeyPair,
        *,
        ack: bool = True,
        ack_interval_s: float = 0.02,
        instance: str | None = None,
        keep_samples: bool = True,
        on_apply: Callable[[Frame], None] | None = None,
    ) -> None:
        self.broker = broker
        self.hub_key = hub_key
        self.registry = KeyRegistry.of(gateway_keys)
        self.acking = ack
        self.ack_interval_s = ack_interval_s
        self.instance = instance or uuid.uuid4().hex[:12]
        self.epoch = _now_ms()
        self.seq = 0
        self.keep_samples = keep_samples
        """False: count samples instead of keeping them (benchmarks at 50k points/s)."""
        self.on_apply = on_apply
        """Called with every frame applied (after it counts as stored)."""
        self.tracker = DeliveryTracker()
        self.gateways: dict[str, GatewayView] = defaultdict(GatewayView)
        self.rejected: Counter[str] = Counter()
        self.frames_received = 0
        self._dirty: set[str] = set()
        self._client: aiomqtt.Client | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._connected = asyncio.Event()
        self._running = False
        self.connects = 0
        self.dropping = False
        """Drop incoming data frames unseen (frames lost in transit), for resend tests."""
        self.dropped = 0

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> HubPeer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _take_seq(self) -> tuple[int, int]:
        self.seq += 1
        return self.epoch, self.seq

    def _new_client(self) -> aiomqtt.Client:
        self.presence = HubPresence(
            FrameSigner("hub", self.hub_key), self.instance, self._take_seq, _now_ms
        )
        will, self._online_state = self.presence.connect()
        return aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            username="hub",
            password=self.broker.passwords["hub"],
            identifier=f"ft-hub-peer-{os.getpid()}-{self.instance}",
            will=aiomqtt.Will(HUB_STATE_TOPIC, will, qos=1, retain=True),
            timeout=10,
        )

    async def start(self) -> None:
        """Connect (and keep reconnecting if the broker goes away, like a real hub)."""
        self._connected = asyncio.Event()
        self._running = True
        self._tasks = [
            asyncio.create_task(self._connection(), name="hub-peer-connection"),
            asyncio.create_task(self._acker(), name="hub-peer-acker"),
        ]
        async with asyncio.timeout(30):
            await self._connected.wait()

    async def _connection(self) -> None:
        while self._running:
            client = self._new_client()
            try:
                await client.__aenter__()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)
                continue
            try:
                await client.subscribe(HUB_UPLINK_FILTER, qos=1)
                await client.publish(HUB_STATE_TOPIC, self._online_state, qos=1, retain=True)
                self._client = client
                self.connects += 1
                self._connected.set()
                async for message in client.messages:
                    payload = message.payload
                    if isinstance(payload, bytes | bytearray):
                        self.handle(str(message.topic), bytes(payload))
            except aiomqtt.MqttError:
                pass
            finally:
                self._client = None
                self._connected.clear()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await client.__aexit__(None, None, None)
            await asyncio.sleep(0.2)

    async def stop(self, *, announce: bool = True) -> None:
        """Disconnect; ``announce`` publishes the retained offline state first."""
        client = self._client
        if client is not None and announce:
            with contextlib.suppress(Exception):
                offline = self.presence.offline("shutdown")
                await client.publish(HUB_STATE_TOPIC, offline, qos=1, retain=True)
        self._running = False
        pending = {task for task in self._tasks if not task.done()}
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            for task in pending:  # again and again: aiomqtt's wait_for can swallow one
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        self._tasks = []
        self._client = None

    async def restart(self, *, new_instance: bool = True) -> None:
        await self.stop()
        if new_instance:
            self.instance = uuid.uuid4().hex[:12]
        await self.start()

    async def wait_connected(self, deadline_s: float = 30.0) -> None:
        async with asyncio.timeout(deadline_s):
            await self._connected.wait()

    # -- receiving -------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> None:
        """Verify, de-duplicate and apply one uplink frame (also usable without MQTT)."""
        self.frames_received += 1
        try:
            parsed = parse_topic(topic)
            frame = decode_frame(payload, self.registry)
            if frame.sender != parsed.gateway or frame.kind != parsed.kind:
                raise ProtocolError(f"{frame.kind} from {frame.sender} on {topic}")
        except ProtocolError as exc:
            self.rejected[exc.reason] += 1
            return
        view = self.gateways[frame.sender]
        if self.dropping and frame.kind == "data":
            self.dropped += 1  # as if lost between broker and hub: never stored, never acked
            return
        if frame.kind == "death":
            view.deaths.append(frame)
            self._changed.set()
            return
        if isinstance(frame.body, Heartbeat):
            view.heartbeats.append(frame)
            self._changed.set()
            return
        try:
            self.tracker.check(frame.sender, frame.epoch, frame.seq)
        except Replay:
            view.duplicates += 1
            self._dirty.add(frame.sender)  # re-ack so the agent can let go of it
            return
        except StaleEpoch:
            self.rejected["stale_epoch"] += 1
            return
        body = frame.body
        if isinstance(body, Data):
            view.sample_count += len(body)
            if self.keep_samples:
                view.samples.extend(body.samples)
        elif isinstance(body, Birth):
            view.birth_parts.append(frame)
            if body.parts == 1:
                view.births.append(frame)  # its state repeats samples already applied
            else:
                birth_id = body.birth_id(frame.seq)
                held = view.pending_parts.setdefault(birth_id, {})
                held[body.part] = frame
                if len(held) == body.parts:
                    del view.pending_parts[birth_id]
                    whole = assemble_birth([f.body for f in held.values()])  # type: ignore[misc]
                    view.births.append(dataclasses.replace(held[0], body=whole))
        elif isinstance(body, CommandResult):
            view.results.append(body)
        # "Stored": now record delivery (and, for a birth, close what will never come).
        self.tracker.record(frame.sender, frame.epoch, frame.seq)
        if isinstance(body, Birth):
            self.tracker.close_below(frame.sender, frame.epoch, body.low_water)
        view.applied.append((frame.epoch, frame.seq))
        view.epochs.add(frame.epoch)
        self._dirty.add(frame.sender)
        self._changed.set()
        if self.on_apply is not None:
            self.on_apply(frame)

    async def _acker(self) -> None:
        while self._running:
            await asyncio.sleep(self.ack_interval_s)
            if not self.acking or not self._dirty or self._client is None:
                continue
            dirty, self._dirty = self._dirty, set()
            for gateway in sorted(dirty):
                try:
                    await self.send_ack(gateway)
                except (aiomqtt.MqttError, RuntimeError):
                    self._dirty.add(gateway)  # try again once reconnected

    # -- sending ---------------------------------------------------------------------

    def _next_frame(self, body: Any) -> bytes:
        self.seq += 1
        return encode_frame(self.hub_key, "hub", self.epoch, self.seq, _now_ms(), body)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self._client is None:
            raise RuntimeError("hub peer is not connected")
        await self._client.publish(topic, payload, qos=1, retain=retain, timeout=10)

    async def send_ack(self, gateway: str, ranges: Iterable[tuple[int, int]] | None = None) -> None:
        epoch = self.tracker.epoch_of(gateway)
        if epoch is None:
            return
        chosen = tuple(ranges) if ranges is not None else tuple(self.tracker.ranges(gateway))
        await self.publish(
            downlink_topic(gateway, "ack"),
            self._next_frame(Ack(to=gateway, epoch=epoch, ranges=chosen)),
        )

    async def send_rebirth(self, gateway: str, reason: str = "test") -> None:
        await self.publish(
            downlink_topic(gateway, "rebirth"), self._next_frame(Rebirth(gateway, reason))
        )

    async def send_command(
        self,
        gateway: str,
        entity: str,
        attribute: str,
        value: Value,
        *,
        cmd_id: str | None = None,
        expires_in_s: float = 30.0,
        approvals: tuple[Approval, ...] = (),
        restore_value: Value = None,
        to: str | None = None,
    ) -> str:
        cmd_id = cmd_id or uuid.uuid4().hex
        command = Command(
            to=to or gateway,
            cmd_id=cmd_id,
            entity=entity,
            attribute=attribute,
            value=value,
            expires_at_ms=_now_ms() + int(expires_in_s * 1000),
            approvals=approvals,
            reason="test",
            restore_value=restore_value,
        )
        await self.publish(downlink_topic(gateway, "cmd"), self._next_frame(command))
        return cmd_id

    # -- waiting ---------------------------------------------------------------------

    async def wait_for(
        self, condition: Callable[[], bool], deadline_s: float = 30.0, what: str = "condition"
    ) -> None:
        """Poll until ``condition()`` holds, or fail with ``what`` after ``deadline_s``."""
        deadline = time.monotonic() + deadline_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await self._changed.wait()

    def result(self, gateway: str, cmd_id: str) -> CommandResult | None:
        for result in self.gateways[gateway].results:
            if result.cmd_id == cmd_id:
                return result
        return None

    def delivered(self, gateway: str) -> list[tuple[int, int]]:
        epoch = self.tracker.epoch_of(gateway)
        return self.tracker.ranges(gateway, epoch) if epoch is not None else []


def death_of(frame: Frame) -> Death:
    assert isinstance(frame.body, Death)
    return frame.body
