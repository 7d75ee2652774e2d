"""A load generator: N simulated gateways speaking the real protocol to a broker.

For benchmarks (``bench/scale.py``) and for tests that prove nothing is lost or stored
twice, e.g. across a hub failover. It reuses ``fieldtwin.protocol`` (frames, keys,
births, presence, topics), never the agent: every gateway signs its own frames with its
own Ed25519 key, opens each connection with a real birth (points with metadata, state,
``low_water``, ``session``), publishes one ``data`` frame per tick carrying all its
points, sends unsequenced heartbeats, and ends with a ``death`` on a clean stop (and as
the MQTT will when it has a connection of its own).

Acks are honoured as an agent honours them (docs/protocol.md, "Session behaviour"):
every data frame stays in memory until a verified ``ack`` covers it; a frame not acked
within ``ack_timeout_s`` is resent, with the wait doubling (jittered, up to 16x) while
no ack arrives; a verified ``rebirth`` and a new hub session seen live on the signed
``hub_state`` make the gateway send a birth and everything unacknowledged again.

Values are a pure function of (gateway index, point index, tick) (``value_of``) and
every data frame first sent is kept in the ``Ledger``, so a checker can compare what was
sent with the hub's ``history`` table row for row.

Connections: by default a small pool of MQTT connections under broker users of the
benchmark-only ``loadgen`` role (``fieldtwin broker config --loadgen-user``), which may
write every gateway's uplink; ``connection_per_gateway`` gives each gateway its own
connection as its gateway user, with its will, as a site runs. A pool connection has no
per-gateway will (it can carry one message), so losing it is seen by the hub as
silence, not deaths.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt

from fieldtwin.protocol.aio import within
from fieldtwin.protocol.births import split_birth
from fieldtwin.protocol.errors import ProtocolError, SchemaViolation
from fieldtwin.protocol.frames import DEFAULT_MAX_FRAME_BYTES, FrameSigner, decode_frame
from fieldtwin.protocol.keys import (
    KeyPair,
    KeyRegistry,
    PublicKey,
    load_private_key,
    load_public_key,
    write_key_pair,
)
from fieldtwin.protocol.messages import (
    Ack,
    Birth,
    Data,
    Death,
    DeviceLink,
    Heartbeat,
    HubState,
    PointMeta,
    Quality,
    Rebirth,
    Sample,
)
from fieldtwin.protocol.presence import PresenceView
from fieldtwin.protocol.topics import (
    HUB_STATE_TOPIC,
    check_gateway_id,
    downlink_filter,
    parse_topic,
    uplink_topic,
)
from fieldtwin.sim.errors import SimError

log = logging.getLogger("fieldtwin.sim.loadgen")

MANIFEST = "loadgen.json"
FRAGMENT = "gateways.toml"
HUB_CONFIG = "hub.toml"
ENTITY_TYPE = "loadgen"
DEVICE = "sim"
RESEND_BACKOFF_LIMIT = 16
"""With no ack at all, resend rounds back off up to this multiple of ``ack_timeout_s``."""
REBIRTH_MIN_INTERVAL_S = 2.0
SUBSCRIBE_CHUNK = 100
"""Topic filters per SUBSCRIBE packet when a pool connection subscribes its gateways."""


class LoadgenError(SimError):
    """The fleet folder, the broker or the options do not allow a run."""

    reason = "loadgen"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def value_of(gateway_index: int, point: int, tick: int) -> float:
    """The value gateway ``gateway_index`` sends for ``point`` at ``tick`` (0-based).

    Exact in a double (an integer over 100), so a checker recomputes it bit for bit."""
    return ((gateway_index * 7_919 + point * 104_729 + tick * 31) % 100_000) / 100.0


# -- the fleet on disk ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """Names of a fleet: gateway ``i`` is ``{prefix}-{i:04d}`` (1-based), with one entity
    ``{gateway}-dev`` of type ``loadgen`` whose attributes are ``p00`` .. ``p{points-1}``."""

    prefix: str
    count: int
    points: int

    def __post_init__(self) -> None:
        if self.count < 1 or self.points < 1:
            raise LoadgenError("a fleet needs at least one gateway and one point")
        try:
            check_gateway_id(self.gateway(self.count - 1))
        except ProtocolError as exc:
            raise LoadgenError(f"prefix {self.prefix!r}: {exc}") from None

    def gateway(self, index: int) -> str:
        width = max(4, len(str(self.count)))
        return f"{self.prefix}-{index + 1:0{width}d}"

    @property
    def gateways(self) -> list[str]:
        return [self.gateway(i) for i in range(self.count)]

    @staticmethod
    def entity(gateway: str) -> str:
        return f"{gateway}-dev"

    @property
    def attributes(self) -> tuple[str, ...]:
        width = max(2, len(str(self.points - 1)))
        return tuple(f"p{i:0{width}d}" for i in range(self.points))

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "count": self.count, "points": self.points}


@dataclass(frozen=True, slots=True)
class Fleet:
    """A fleet folder loaded: names, each gateway's key pair and the hub's public key."""

    spec: FleetSpec
    directory: Path
    keys: dict[str, KeyPair]
    hub_key: PublicKey | None


def init_fleet(
    directory: Path,
    count: int,
    points: int,
    prefix: str = "gw-load",
    broker_url: str = "mqtt://127.0.0.1:1883",
) -> FleetSpec:
    """Write one key pair per gateway (kept if present), the hub's key pair, the hub
    config fragment ``gateways.toml`` (absolute paths, so any config can take it in),
    a complete ``hub.toml`` and the manifest ``loadgen.json``."""
    spec = FleetSpec(prefix, count, points)
    directory = directory.resolve()
    keys = directory / "keys"
    for name in [*spec.gateways, "hub"]:
        if not (keys / f"{name}.pub").exists():
            write_key_pair(keys, name)
    fragment = hub_fragment(spec, keys)
    (directory / FRAGMENT).write_text(fragment)
    (directory / HUB_CONFIG).write_text(hub_config_text(directory, broker_url) + fragment)
    (directory / MANIFEST).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    return spec


def hub_fragment(spec: FleetSpec, keys: Path) -> str:
    """``[gateways.ID]``, the ``loadgen`` type and one ``[[entities]]`` per gateway."""
    lines = [
        f"# {spec.count} simulated gateways x {spec.points} points, written by",
        "# `fieldtwin sim gateways init`; paste into a hub config or use hub.toml.",
        "",
    ]
    for gateway in spec.gateways:
        lines += [f"[gateways.{gateway}]", f'public_key = "{keys / gateway}.pub"', ""]
    for attribute in spec.attributes:
        lines += [f"[types.{ENTITY_TYPE}.attributes.{attribute}]", 'unit = ""', ""]
    for gateway in spec.gateways:
        lines += [
            "[[entities]]",
            f'id = "{spec.entity(gateway)}"',
            f'type = "{ENTITY_TYPE}"',
            f'gateway = "{gateway}"',
            "",
        ]
    return "\n".join(lines)


def hub_config_text(directory: Path, broker_url: str) -> str:
    return f"""# A hub for the load generator's fleet (`fieldtwin sim gateways init`).
# Generate the broker's files with a benchmark-only loadgen user:
#   fieldtwin broker config -c {directory / HUB_CONFIG} --loadgen-user loadgen
# then add password_file = "broker/passwords/hub.password" under [broker].

[hub]
twin_id = "loadgen"
domain = "load test"
database = "{directory / "state" / "hub.duckdb"}"
key = "{directory / "keys" / "hub.key"}"

[broker]
url = "{broker_url}"

"""


def load_fleet(directory: Path, hub_key: Path | None = None) -> Fleet:
    """Read a fleet folder written by ``init_fleet``. ``hub_key`` is the hub's public key
    file (default ``DIR/keys/hub.pub``); without one, downlink frames cannot be
    verified and the run refuses to start."""
    directory = directory.resolve()
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        spec = FleetSpec(str(manifest["prefix"]), int(manifest["count"]), int(manifest["points"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoadgenError(
            f"{directory / MANIFEST}: not a fleet folder ({exc}); run "
            "'fieldtwin sim gateways init' first"
        ) from None
    try:
        keys = {gw: load_private_key(directory / "keys" / f"{gw}.key") for gw in spec.gateways}
        pub = hub_key if hub_key is not None else directory / "keys" / "hub.pub"
        hub = load_public_key(pub) if pub.exists() or hub_key is not None else None
    except ProtocolError as exc:
        raise LoadgenError(str(exc)) from None
    return Fleet(spec, directory, keys, hub)


# -- what was sent -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SentFrame:
    gateway: str
    index: int
    seq: int
    tick: int
    ts_ms: int


@dataclass(slots=True)
class Ledger:
    """Every data frame first sent (resends are not repeated here). Rows are derived, not
    stored, so a long run at 50,000 points/s stays small in memory."""

    spec: FleetSpec
    frames: list[SentFrame] = field(default_factory=list)

    def rows(self) -> Iterator[tuple[str, str, str, int, float]]:
        """(gateway, entity, attribute, ts_ms, value) for every point sent."""
        attributes = self.spec.attributes
        for frame in self.frames:
            entity = self.spec.entity(frame.gateway)
            for point, attribute in enumerate(attributes):
                value = value_of(frame.index, point, frame.tick)
                yield frame.gateway, entity, attribute, frame.ts_ms, value

    def points(self) -> int:
        return len(self.frames) * self.spec.points

    def write_csv(self, path: Path) -> None:
        with path.open("w") as out:
            out.write("gateway,entity,attribute,ts_ms,value\n")
            for row in self.rows():
                out.write(",".join(map(str, row)) + "\n")


# -- statistics -----------------------------------------------------------------------------


@dataclass(slots=True)
class LoadStats:
    gateways: int = 0
    points_per_frame: int = 0
    connections: int = 0
    frames_sent: int = 0
    points_sent: int = 0
    frames_acked: int = 0
    frames_resent: int = 0
    births: int = 0
    heartbeats: int = 0
    deaths: int = 0
    rebirths_requested: int = 0
    hub_sessions: int = 0
    connects: int = 0
    publish_errors: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    started: float = 0.0
    elapsed_s: float = 0.0
    """Seconds of play (first tick to the last), what the rates are measured over."""
    lag_s: float = 0.0
    """The most a slot of a tick started behind its schedule (could not keep up)."""
    latencies: list[float] = field(default_factory=list)

    def percentile(self, share: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]

    def as_dict(self, in_flight: int = 0) -> dict[str, Any]:
        elapsed = max(self.elapsed_s, 1e-9)
        p50, p99 = self.percentile(0.5), self.percentile(0.99)
        return {
            "gateways": self.gateways,
            "points_per_frame": self.points_per_frame,
            "connections": self.connections,
            "frames_sent": self.frames_sent,
            "points_sent": self.points_sent,
            "frames_acked": self.frames_acked,
            "frames_resent": self.frames_resent,
            "in_flight": in_flight,
            "births": self.births,
            "heartbeats": self.heartbeats,
            "deaths": self.deaths,
            "rebirths_requested": self.rebirths_requested,
            "hub_sessions": self.hub_sessions,
            "connects": self.connects,
            "publish_errors": self.publish_errors,
            "rejected": dict(self.rejected),
            "elapsed_s": round(self.elapsed_s, 3),
            "frames_per_s": round(self.frames_sent / elapsed, 1),
            "points_per_s": round(self.points_sent / elapsed, 1),
            "lag_s": round(self.lag_s, 3),
            "ack_latency_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "ack_latency_p99_ms": None if p99 is None else round(p99 * 1000, 1),
        }


def format_stats(stats: dict[str, Any]) -> str:
    return "\n".join(f"{key:<20} {value}" for key, value in stats.items())


# -- one simulated gateway -------------------------------------------------------------------


@dataclass(eq=False)
class SimGateway:
    """One gateway's sequence, session and unacknowledged frames (an agent's outbox,
    in memory: a load generator that dies starts a new epoch)."""

    id: str
    index: int
    entity: str
    attributes: tuple[str, ...]
    signer: FrameSigner
    epoch: int
    interval_ms: int
    seq: int = 0
    session: int = 0
    """Seq of the birth that opened the current connection (0: not connected)."""
    reserved: int = 0
    """A seq reserved for the next connection's birth (the will names it)."""
    beat: int = 0
    unacked: dict[int, bytes] = field(default_factory=dict)
    first_sent: dict[int, float] = field(default_factory=dict)
    last_sent: dict[int, float] = field(default_factory=dict)
    resend_level: int = 0
    last_rebirth: float = -math.inf
    last_tick: int = -1
    last_seq: int = 0
    last_ts_ms: int = 0
    started_ms: int = field(default_factory=now_ms)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def reserve(self) -> int:
        if not self.reserved:
            self.reserved = self.next_seq()
        return self.reserved

    def will(self) -> bytes:
        return self.signer.encode(self.epoch, 0, now_ms(), Death(self.reserve(), "connection lost"))

    def births(self, *, rebirth: bool) -> list[bytes]:
        """A birth opening a connection (the reserved seq) or within it, in parts if large."""
        if rebirth and self.session:
            seq = self.next_seq()
            session = self.session
        else:
            seq = self.reserve()
            self.reserved = 0
            self.session = session = seq
        low_water = min(self.unacked, default=seq)
        state: tuple[Sample, ...] = ()
        seqs: tuple[int, ...] = ()
        tick = self.last_tick
        if tick >= 0:
            state = tuple(
                Sample(self.entity, a, value_of(self.index, p, tick), self.last_ts_ms, Quality.GOOD)
                for p, a in enumerate(self.attributes)
            )
            seqs = (self.last_seq,) * len(state)
        points = tuple(
            PointMeta(
                self.entity,
                a,
                "float64",
                interval_ms=self.interval_ms,
                source=f"loadgen/{self.id}/{a}",
                device=DEVICE,
            )
            for a in self.attributes
        )
        birth = Birth(
            points,
            state,
            min(low_water, seq),
            {"agent": "fieldtwin-loadgen"},
            session=0 if session == seq else session,
            state_seqs=seqs,
        )
        parts = split_birth(birth, seq, DEFAULT_MAX_FRAME_BYTES)
        numbers = [seq] + [self.next_seq() for _ in parts[1:]]
        return [
            self.signer.encode(self.epoch, n, now_ms(), part)
            for part, n in zip(parts, numbers, strict=True)
        ]

    def data(self, tick: int, ts_ms: int) -> tuple[int, bytes]:
        count = len(self.attributes)
        body = Data(
            (self.entity,) * count,
            self.attributes,
            tuple(value_of(self.index, p, tick) for p in range(count)),
            (ts_ms,) * count,
            (0,) * count,
        )
        seq = self.next_seq()
        frame = self.signer.encode(self.epoch, seq, now_ms(), body)
        self.unacked[seq] = frame
        self.last_tick, self.last_seq, self.last_ts_ms = tick, seq, ts_ms
        return seq, frame

    def heartbeat(self, interval_ms: int) -> bytes:
        self.beat += 1
        link = DeviceLink(DEVICE, True, since_ms=self.started_ms)
        body = Heartbeat(self.session, self.beat, interval_ms, (link,))
        return self.signer.encode(self.epoch, 0, now_ms(), body)

    def death(self, reason: str) -> bytes:
        return self.signer.encode(self.epoch, 0, now_ms(), Death(self.session, reason))

    def apply_ack(self, ack: Ack, now: float) -> list[float]:
        """Drop acked frames; return their ack latencies (from the first publish)."""
        ranges = ack.ranges
        done = [s for s in self.unacked if any(a <= s <= b for a, b in ranges)]
        latencies = []
        for seq in done:
            del self.unacked[seq]
            self.last_sent.pop(seq, None)
            first = self.first_sent.pop(seq, None)
            if first is not None:
                latencies.append(now - first)
        self.resend_level = 0
        return latencies


# -- connections ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BrokerTarget:
    host: str
    port: int
    tls: bool = False
    ca_file: Path | None = None

    @classmethod
    def parse(cls, url: str, ca_file: Path | None = None) -> BrokerTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp") or not parts.hostname:
            raise LoadgenError(f"--broker {url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise LoadgenError(f"--broker {url!r} has an invalid port") from None
        return cls(unquote(parts.hostname), port, tls, ca_file)


class _Link:
    """One MQTT connection carrying one or more simulated gateways."""

    def __init__(
        self,
        gen: LoadGenerator,
        name: str,
        gateways: list[SimGateway],
        username: str,
        password: str | None,
        *,
        own_will: bool,
    ) -> None:
        self.gen = gen
        self.name = name
        self.gateways = {gw.id: gw for gw in gateways}
        self.username = username
        self.password = password
        self.own_will = own_will
        self.client: aiomqtt.Client | None = None
        self.group: asyncio.TaskGroup | None = None
        self.window = asyncio.Semaphore(gen.window)
        self.presence = PresenceView()
        self.hub_online: bool | None = None
        self.connected_once = asyncio.Event()
        self.stopping = False

    def _client(self) -> aiomqtt.Client:
        target = self.gen.target
        will = None
        if self.own_will:
            gw = next(iter(self.gateways.values()))
            will = aiomqtt.Will(uplink_topic(gw.id, "death"), gw.will(), qos=1, retain=False)
        tls = None
        if target.tls:
            tls = ssl.create_default_context(cafile=str(target.ca_file) if target.ca_file else None)
        client = aiomqtt.Client(
            target.host,
            target.port,
            username=self.username,
            password=self.password,
            identifier=self.name,
            will=will,
            clean_session=True,
            keepalive=30,
            timeout=10,
            max_inflight_messages=self.gen.window,
            tls_context=tls,
        )
        client.pending_calls_threshold = self.gen.window + 64
        return client

    async def run(self) -> None:
        """Stay connected until stopped, reconnecting with jittered exponential backoff."""
        delay = 0.5
        while not self.stopping:
            try:
                await self._session()
                delay = 0.5
            except* aiomqtt.MqttError as errors:
                # one line per outage and connection, not one per retry (1,000 connections)
                level = logging.WARNING if delay == 0.5 else logging.DEBUG
                log.log(level, "loadgen connection %s: %s", self.name, errors.exceptions[0])
            self.client = None
            self.group = None
            for gw in self.gateways.values():
                gw.session = 0  # the next connection opens with a new birth
            if self.stopping:
                return
            await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, 10.0)

    async def _session(self) -> None:
        client = self._client()
        async with client:
            self.client = client
            self.gen.stats.connects += 1
            names = [downlink_filter(gw) for gw in self.gateways]
            for start in range(0, len(names), SUBSCRIBE_CHUNK):
                chunk = [(name, 1) for name in names[start : start + SUBSCRIBE_CHUNK]]
                await client.subscribe(chunk)
            await client.subscribe(HUB_STATE_TOPIC, qos=1)
            async with asyncio.TaskGroup() as group:
                self.group = group
                reader = group.create_task(self._reader(client), name=f"loadgen-reader-{self.name}")
                for gw in self.gateways.values():
                    await self.birth_and_resend(gw, rebirth=False)
                self.connected_once.set()
                await self.gen.stopped.wait()
                self.stopping = True
                await self._goodbye()
                self.group = None
                with contextlib.suppress(TimeoutError):
                    await within(10, self._drain_window())
                reader.cancel()

    async def _goodbye(self) -> None:
        """A clean stop: a death naming each gateway's connection (no will is sent then)."""
        for gw in self.gateways.values():
            if gw.session:
                await self.publish(gw.id, "death", gw.death("shutdown"))
                self.gen.stats.deaths += 1

    async def _drain_window(self) -> None:
        for _ in range(self.gen.window):
            await self.window.acquire()
        for _ in range(self.gen.window):
            self.window.release()

    async def birth_and_resend(self, gw: SimGateway, *, rebirth: bool) -> None:
        """A birth, then every unacknowledged frame: the hub may have missed them."""
        for frame in gw.births(rebirth=rebirth):
            await self.publish(gw.id, "birth", frame)
        self.gen.stats.births += 1
        pending = sorted(gw.unacked)
        now = time.monotonic()
        self.gen.stats.frames_resent += sum(1 for s in pending if s in gw.last_sent)
        gw.resend_level = 0
        for seq in pending:
            held = gw.unacked.get(seq)  # an ack may have come in meanwhile
            if held is not None:
                gw.last_sent[seq] = now
                gw.first_sent.setdefault(seq, now)
                await self.publish(gw.id, "data", held)

    async def publish(self, gateway: str, kind: str, frame: bytes, qos: int = 1) -> None:
        """Queue one publish within the window; returns once it is in flight."""
        group, client = self.group, self.client
        if group is None or client is None:
            return
        await self.window.acquire()
        group.create_task(
            self._publish(client, uplink_topic(gateway, kind), frame, qos),
            name=f"loadgen-pub-{gateway}-{kind}",
        )

    async def _publish(self, client: aiomqtt.Client, topic: str, frame: bytes, qos: int) -> None:
        try:
            await client.publish(topic, frame, qos=qos, timeout=30)
        except aiomqtt.MqttError:
            self.gen.stats.publish_errors += 1  # stays unacked: resent later
        finally:
            self.window.release()

    async def _reader(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                self.gen.stats.rejected["not_bytes"] += 1
                continue
            topic = str(message.topic)
            if topic == HUB_STATE_TOPIC:
                await self._on_hub_state(bytes(payload), retained=bool(message.retain))
            else:
                await self._on_downlink(topic, bytes(payload))

    async def _on_downlink(self, topic: str, payload: bytes) -> None:
        gen = self.gen
        try:
            parsed = parse_topic(topic)
            gw = self.gateways.get(parsed.gateway)
            if gw is None or parsed.direction != "down":
                raise SchemaViolation(f"{topic} is not a downlink of this connection")
            frame = decode_frame(payload, gen.hub_keys)
            body = frame.body
            if frame.sender != "hub" or frame.kind != parsed.kind:
                raise SchemaViolation(f"{frame.kind} from {frame.sender} on {topic}")
        except ProtocolError as exc:
            gen.stats.rejected[exc.reason] += 1
            return
        if isinstance(body, Ack | Rebirth) and body.to != gw.id:
            gen.stats.rejected["wrong_recipient"] += 1
            return
        if isinstance(body, Ack):
            if body.epoch != gw.epoch:
                gen.stats.rejected["other_epoch"] += 1
                return
            self.hub_online = True  # a signed ack proves the hub is there
            latencies = gw.apply_ack(body, time.monotonic())
            gen.stats.frames_acked += len(latencies)
            if len(gen.stats.latencies) < 2_000_000:
                gen.stats.latencies.extend(latencies)
            if not gw.unacked and gen.all_acked():
                gen.acked.set()
        elif isinstance(body, Rebirth):
            now = time.monotonic()
            if now - gw.last_rebirth < REBIRTH_MIN_INTERVAL_S:
                gen.stats.rejected["rebirth_rate"] += 1
                return
            gw.last_rebirth = now
            gen.stats.rebirths_requested += 1
            await self.birth_and_resend(gw, rebirth=True)
        else:
            gen.stats.rejected["unexpected_kind"] += 1

    async def _on_hub_state(self, payload: bytes, *, retained: bool) -> None:
        """A new hub session seen live (not the retained copy) may have missed frames:
        every gateway of this connection sends a birth and everything unacked again."""
        gen = self.gen
        try:
            frame = decode_frame(payload, gen.hub_keys)
            if frame.sender != "hub" or not isinstance(frame.body, HubState):
                raise SchemaViolation(f"a {frame.kind} frame from {frame.sender} is no hub state")
            verdict = self.presence.observe(frame.epoch, frame.seq, frame.body)
        except ProtocolError as exc:
            gen.stats.rejected[f"hub_state_{exc.reason}"] += 1
            return
        if verdict == "offline":
            self.hub_online = False
            return
        if verdict == "same":
            return
        self.hub_online = True
        if retained:
            return
        gen.stats.hub_sessions += 1
        for gw in self.gateways.values():
            await self.birth_and_resend(gw, rebirth=True)


# -- the generator ----------------------------------------------------------------------------


@dataclass(slots=True)
class LoadOptions:
    rate: float = 1.0
    """Data frames per gateway per second (each carries every point)."""
    duration_s: float = 10.0
    usernames: tuple[str, ...] = ("loadgen",)
    """Broker users of the ``loadgen`` role; connection ``n`` logs in as ``usernames[n %
    len]``. A site broker binds client ids to usernames (``use_username_as_clientid``),
    so there give one user per connection: connections of one user would take over each
    other's session. One user for several connections works on the test broker only."""
    password: str | None = None
    """The password of a single user (else ``password_dir``)."""
    connections: int = 0
    """Pool size; 0: one per user, at least 4 when there is one user (test broker)."""
    connection_per_gateway: bool = False
    """Each gateway on its own connection as its own broker user, with its will."""
    password_dir: Path | None = None
    """``DIR/{user}.password`` for each user (as ``fieldtwin broker config`` writes them)."""
    window: int = 256
    """Publishes in flight per connection."""
    ack_timeout_s: float = 5.0
    heartbeat_s: float = 5.0
    drain_s: float = 15.0
    """After the last tick, how long to wait for the remaining acks."""
    connect_timeout_s: float = 30.0
    client_id_prefix: str = "loadgen"


class LoadGenerator:
    """Plays a fleet against a broker. ``await run()`` returns the statistics; ``ledger``
    holds what was sent. ``stop()`` ends the run early (a clean stop, with deaths)."""

    def __init__(self, fleet: Fleet, broker_url: str, options: LoadOptions) -> None:
        if fleet.hub_key is None:
            raise LoadgenError(
                f"no hub public key ({fleet.directory / 'keys' / 'hub.pub'}); give --hub-key"
            )
        if options.rate <= 0 or options.duration_s < 0:
            raise LoadgenError("--rate must be above 0 and --duration not negative")
        self.fleet = fleet
        self.options = options
        self.target = BrokerTarget.parse(broker_url)
        self.hub_keys = KeyRegistry.of({"hub": fleet.hub_key})
        self.window = options.window
        self.ledger = Ledger(fleet.spec)
        self.stats = LoadStats(gateways=fleet.spec.count, points_per_frame=fleet.spec.points)
        self.stopped = asyncio.Event()
        self.acked = asyncio.Event()
        self._halt = asyncio.Event()
        self.period_ms = max(1, round(1000 / options.rate))
        epoch = now_ms()
        spec = fleet.spec
        self.gateways = [
            SimGateway(
                gw,
                i,
                spec.entity(gw),
                spec.attributes,
                FrameSigner(gw, fleet.keys[gw]),
                epoch,
                self.period_ms,
            )
            for i, gw in enumerate(spec.gateways)
        ]
        self.links = self._links()
        self._link_of = {gw.id: link for link in self.links for gw in link.gateways.values()}
        self.stats.connections = len(self.links)

    def _links(self) -> list[_Link]:
        opts = self.options
        if opts.connection_per_gateway:
            return [
                _Link(self, gw.id, [gw], gw.id, self._password(gw.id), own_will=True)
                for gw in self.gateways
            ]
        users = opts.usernames
        if not users:
            raise LoadgenError("give at least one broker user (--username)")
        count = opts.connections or (len(users) if len(users) > 1 else 4)
        count = max(1, min(count, len(self.gateways)))
        links = []
        for n in range(count):
            user = users[n % len(users)]
            shared = count > len(users)
            name = f"{opts.client_id_prefix}-{n}" if shared else user
            gateways = self.gateways[n::count]
            links.append(_Link(self, name, gateways, user, self._password(user), own_will=False))
        return links

    def _password(self, user: str) -> str | None:
        opts = self.options
        if opts.password_dir is None:
            return opts.password
        path = opts.password_dir / f"{user}.password"
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise LoadgenError(f"cannot read {path}: {exc.strerror or exc}") from None

    def in_flight(self) -> int:
        return sum(len(gw.unacked) for gw in self.gateways)

    def all_acked(self) -> bool:
        return self._halt.is_set() and not any(gw.unacked for gw in self.gateways)

    def stop(self) -> None:
        """End the run early: stop ticking, drain acks briefly, say goodbye."""
        self._halt.set()

    async def run(self) -> dict[str, Any]:
        """Connect, play ``duration_s`` of ticks, wait for the last acks, stop cleanly."""
        self.stats.started = time.monotonic()
        try:
            await self._run()
        except* LoadgenError as errors:
            raise errors.exceptions[0] from None  # one clear line for the CLI
        return self.stats.as_dict(self.in_flight())

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for link in self.links:
                group.create_task(link.run(), name=f"loadgen-link-{link.name}")
            await self._wait_connected()
            timers = [
                group.create_task(self._resender(), name="loadgen-resend"),
                group.create_task(self._heartbeats(), name="loadgen-heartbeat"),
            ]
            await self._play()
            self._halt.set()
            if self.all_acked():
                self.acked.set()
            with contextlib.suppress(TimeoutError):
                await within(self.options.drain_s, self.acked.wait())
            for timer in timers:
                timer.cancel()
            self.stopped.set()  # every connection says goodbye and closes

    async def _wait_connected(self) -> None:
        try:
            await within(
                self.options.connect_timeout_s,
                asyncio.gather(*(link.connected_once.wait() for link in self.links)),
            )
        except TimeoutError:
            raise LoadgenError(
                f"not every connection reached {self.target.host}:{self.target.port} within "
                f"{self.options.connect_timeout_s:g} s (user, password, ACL?)"
            ) from None

    async def _play(self) -> None:
        """One data frame per gateway per tick, gateways spread evenly over the period."""
        loop = asyncio.get_running_loop()
        ticks = math.ceil(self.options.duration_s * self.options.rate)
        period = self.period_ms / 1000
        slots = max(1, min(len(self.gateways), 20))
        by_slot = [self.gateways[s::slots] for s in range(slots)]
        start = loop.time()
        start_ms = now_ms()
        stats = self.stats
        for tick in range(ticks):
            for slot, gateways in enumerate(by_slot):
                due = start + tick * period + slot * period / slots
                delay = due - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await within(delay, self._halt.wait())
                else:
                    stats.lag_s = max(stats.lag_s, -delay)
                if self._halt.is_set():
                    stats.elapsed_s = loop.time() - start
                    return
                ts_ms = start_ms + tick * self.period_ms + round(slot * self.period_ms / slots)
                for gw in gateways:
                    seq, frame = gw.data(tick, ts_ms)
                    self.ledger.frames.append(SentFrame(gw.id, gw.index, seq, tick, ts_ms))
                    stats.frames_sent += 1
                    stats.points_sent += len(gw.attributes)
                    link = self._link_of[gw.id]
                    if link.client is not None and gw.session:
                        now = time.monotonic()
                        gw.first_sent[seq] = gw.last_sent[seq] = now
                        await link.publish(gw.id, "data", frame)
                    else:
                        gw.last_sent[seq] = time.monotonic()
        stats.elapsed_s = max(loop.time() - start, ticks * period)

    async def _resender(self) -> None:
        """Frames not acknowledged in time go again; the wait doubles (jittered, up to
        16x) per round while a gateway hears no ack, and any ack resets it."""
        timeout = self.options.ack_timeout_s
        period = max(0.1, min(2.0, timeout / 4))
        rng = random.Random()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for gw in self.gateways:
                link = self._link_of[gw.id]
                if not gw.unacked or link.client is None or link.hub_online is False:
                    continue
                wait = min(timeout * 2 ** min(gw.resend_level, 4), timeout * RESEND_BACKOFF_LIMIT)
                cutoff = now - wait * (0.9 + 0.2 * rng.random())
                overdue = [s for s in gw.unacked if gw.last_sent.get(s, now) < cutoff]
                if not overdue:
                    continue
                gw.resend_level += 1
                for seq in overdue:
                    frame = gw.unacked.get(seq)
                    if frame is None:
                        continue
                    gw.last_sent[seq] = time.monotonic()
                    gw.first_sent.setdefault(seq, gw.last_sent[seq])
                    self.stats.frames_resent += 1
                    await link.publish(gw.id, "data", frame)

    async def _heartbeats(self) -> None:
        """Unsequenced heartbeats at QoS 0, spread over the interval (docs/protocol.md)."""
        interval = self.options.heartbeat_s
        if interval <= 0:
            return
        interval_ms = round(interval * 1000)
        slots = max(1, min(len(self.gateways), 50))
        by_slot = [self.gateways[s::slots] for s in range(slots)]
        while True:
            for gateways in by_slot:
                await asyncio.sleep(interval / slots)
                for gw in gateways:
                    link = self._link_of[gw.id]
                    if link.client is None or not gw.session:
                        continue
                    await link.publish(gw.id, "heartbeat", gw.heartbeat(interval_ms), qos=0)
                    self.stats.heartbeats += 1


async def run_load(
    directory: Path,
    broker_url: str,
    options: LoadOptions,
    *,
    hub_key: Path | None = None,
    on_generator: Callable[[LoadGenerator], None] | None = None,
) -> tuple[dict[str, Any], Ledger]:
    """Load the fleet in ``directory``, play it, return (stats, ledger)."""
    generator = LoadGenerator(load_fleet(directory, hub_key), broker_url, options)
    if on_generator is not None:
        on_generator(generator)
    stats = await generator.run()
    return stats, generator.ledger


def expected_history(ledger: Ledger) -> Counter[tuple[str, str, int, float]]:
    """(entity, attribute, ts_ms, value) with their counts, as the hub's history holds them."""
    return Counter((entity, attr, ts, value) for _gw, entity, attr, ts, value in ledger.rows())


def history_sql(spec: FleetSpec) -> tuple[str, list[Any]]:
    """The query over the hub's ``history`` table that ``expected_history`` compares with."""
    return (
        "SELECT entity, attribute, ts_ms, num FROM history WHERE starts_with(entity, ?)",
        [f"{spec.prefix}-"],
    )


def summarize(stats: dict[str, Any], spec: FleetSpec, rate: float) -> str:
    head = f"{spec.count} gateways x {spec.points} points at {rate:g} Hz"
    return head + "\n" + format_stats(stats)


__all__: Sequence[str] = (
    "Fleet",
    "FleetSpec",
    "Ledger",
    "LoadGenerator",
    "LoadOptions",
    "LoadgenError",
    "expected_history",
    "history_sql",
    "init_fleet",
    "load_fleet",
    "run_load",
    "value_of",
)
