"""The MQTT side: connect, birth, publish two lanes, take acks, rebirths and commands.

Session behaviour (docs/protocol.md, "Session behaviour"; docs/agent.md, "Uplink"):

* The client id and the username are the gateway id (a site broker binds the client id
  to the username: ``use_username_as_clientid``), QoS 1.
* Before connecting, the birth's seq is reserved (persisted) so the MQTT will can be a
  signed ``death`` naming it. That seq names the connection (the session): rebirths
  within it take fresh seqs but carry it as ``session``, and the shutdown death names
  it too, so the hub applies exactly the deaths of the live connection. A reserved seq
  is reused until a birth is actually attempted with it, so a broker that is down for
  an hour does not burn a seq per reconnect attempt.
* On every connect: subscribe to ``ft/v1/{gw}/down/+`` and the hub state topic,
  publish the birth, then everything still unacknowledged in the outbox goes to the
  backlog lane (the broker or hub may have lost it), and frames committed from now on
  go to the live lane.
* Live lane first: fresh frames, a window of ``live_window`` publishes in flight.
  Backlog lane: its own window and a token bucket in samples/s, so a long outage drains
  at a bounded rate while live data keeps flowing.
* A birth larger than one frame goes out in parts (``fieldtwin.protocol.births``), each
  with a fresh seq; part 0's seq names the birth (and, for the first birth of a
  connection, the session).
* The hub state is a signed ``hub_state`` frame (``fieldtwin.protocol.presence``): a
  new hub session seen live (not retained), or a verified ``rebirth``, makes the agent
  publish a birth and resend every unacknowledged frame. An unsigned, badly signed or
  replayed hub state is refused, counted and logged (rate-limited).
* A frame not acknowledged within ``ack_timeout_s`` while the hub is not known to be
  offline is resent; with no ack at all, each further round waits twice as long (up
  to 16 x ``ack_timeout_s``), and ``agent status`` says since when no hub acknowledged.
  The hub de-duplicates by (sender, epoch, seq), so resending is safe.
* Every ``heartbeat_s`` an unsequenced, signed ``heartbeat`` (QoS 0: never queued for
  later) tells the hub the agent and its connection are alive, with each device's link
  state, whether or not any device has data.
* Every downlink frame is verified against the pinned hub key; frames for another
  gateway, acks of another epoch and anything malformed are counted and dropped (one
  log line per reason a minute at most, then a summary).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import logging
import random
import ssl
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fieldtwin.agent.config import BrokerConfig
from fieldtwin.agent.errors import OutboxError, UplinkError
from fieldtwin.agent.outbox import AsyncOutbox, Committed
from fieldtwin.agent.util import Backoff, TokenBucket, now_ms, within
from fieldtwin.protocol.births import split_birth
from fieldtwin.protocol.errors import ProtocolError, SchemaViolation
from fieldtwin.protocol.frames import DEFAULT_MAX_FRAME_BYTES, Frame, decode_frame
from fieldtwin.protocol.keys import KeyRegistry
from fieldtwin.protocol.logfmt import RateLimitedLog, fields
from fieldtwin.protocol.messages import (
    Ack,
    Birth,
    Command,
    Death,
    DeviceLink,
    Heartbeat,
    HubState,
    Rebirth,
)
from fieldtwin.protocol.presence import PresenceView
from fieldtwin.protocol.topics import (
    HUB_STATE_TOPIC,
    downlink_filter,
    parse_topic,
    uplink_topic,
)

log = logging.getLogger("fieldtwin.agent.uplink")

BirthFactory = Callable[[int], Birth]
"""``low_water → Birth`` with the agent's current point metadata and state."""
CommandHandler = Callable[[Frame], Awaitable[None]]
DeviceStates = Callable[[], tuple[DeviceLink, ...]]
"""The link state of each device right now, for heartbeats."""

RESEND_BACKOFF_LIMIT = 16
"""With no ack at all, resend rounds back off up to this multiple of ``ack_timeout_s``."""

_DOWNLINK_KINDS = ("ack", "rebirth", "cmd")


@dataclass(slots=True)
class UplinkStats:
    connected: bool = False
    connects: int = 0
    connect_failures: int = 0
    last_connect_ms: int | None = None
    last_disconnect_ms: int | None = None
    last_error: str = ""
    births: int = 0
    published_frames: int = 0
    published_samples: int = 0
    published_bytes: int = 0
    backlog_frames: int = 0
    resent_frames: int = 0
    resend_rounds: int = 0
    resend_interval_s: float = 0.0
    """How long a published frame may now wait for its ack before it is sent again."""
    last_publish_ms: int | None = None
    acks: int = 0
    acked_frames: int = 0
    last_ack_ms: int | None = None
    no_ack_since_ms: int | None = None
    """Set while frames go unacknowledged past the ack timeout: the time of the last ack,
    or of the first publish still waiting if no hub has acknowledged since the start."""
    birth_parts: int = 0
    heartbeats: int = 0
    rebirths: int = 0
    commands: int = 0
    hub_online: bool | None = None
    hub_instance: str = ""
    hub_session: int = 0
    hub_state_rejected: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            name: (dict(value) if isinstance(value, Counter) else value)
            for name, value in ((name, getattr(self, name)) for name in self.__dataclass_fields__)
        }


class _SessionEnd(Exception):
    """Raised inside a session's task group to end it on purpose (shutdown)."""


class Uplink:
    def __init__(
        self,
        *,
        gateway: str,
        broker: BrokerConfig,
        outbox: AsyncOutbox,
        hub_keys: KeyRegistry,
        birth_factory: BirthFactory,
        on_command: CommandHandler,
        backlog_samples_per_s: float,
        ack_timeout_s: float,
        client_id: str | None = None,
        device_states: DeviceStates | None = None,
        heartbeat_s: float | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.gateway = gateway
        self.broker = broker
        self.outbox = outbox
        self.hub_keys = hub_keys
        self.birth_factory = birth_factory
        self.on_command = on_command
        self.backlog_rate = backlog_samples_per_s
        self.ack_timeout_s = ack_timeout_s
        self.client_id = client_id or gateway
        self.stats = UplinkStats()
        self.device_states = device_states or (lambda: ())
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else broker.heartbeat_s
        self.max_frame_bytes = max_frame_bytes
        kinds = ("data", "birth", "death", "cmd_result", "heartbeat")
        self._topics = {kind: uplink_topic(gateway, kind) for kind in kinds}
        self._stop = asyncio.Event()
        self._stopped = asyncio.Event()
        self._backoff = Backoff(broker.reconnect_min_s, broker.reconnect_max_s)
        self._pending_birth_seq: int | None = None
        self._session_seq: int | None = None
        self._client: Any = None
        self._live: deque[Committed] = deque()
        self._live_seqs: set[int] = set()
        self._live_event = asyncio.Event()
        self._live_drained = asyncio.Event()
        self._backlog: list[int] = []
        self._backlog_set: set[int] = set()
        self._backlog_event = asyncio.Event()
        self._published_at: dict[int, float] = {}
        self._pending_ack: Ack | None = None
        self._ack_event = asyncio.Event()
        self._last_rebirth = 0.0
        self._reject_log = RateLimitedLog(
            log, "downlink frames rejected (summary)", key_names=("sender", "reason")
        )
        self._presence = PresenceView()
        self._beat = 0
        self._resend_level = 0
        self._first_wait_ms: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        return self.stats.connected

    # -- input from the agent ---------------------------------------------------------

    def committed(self, frames: list[Committed]) -> None:
        """Frames just stored in the outbox: publish them on the live lane if connected."""
        if not self.stats.connected:
            return  # they are in the outbox and go out as backlog after reconnecting
        for frame in frames:
            self._live.append(frame)
            self._live_seqs.add(frame.seq)
        # Beyond a few thousand frames in memory, let the backlog lane read them
        # from disk instead of holding every frame's bytes twice.
        while len(self._live) > 4096:
            old = self._live.popleft()
            self._live_seqs.discard(old.seq)
            self._requeue([old.seq])
        self._live_event.set()

    def stop(self) -> None:
        self._stop.set()

    # -- connection loop --------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected until ``stop()``; reconnect with jittered exponential backoff."""
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    await self._session()
                except* _SessionEnd:
                    pass
                except* (UplinkError, OSError, OutboxError, ProtocolError) as group:
                    self._note_failure(group.exceptions[0])
                except* Exception as group:
                    if not _is_mqtt_error(group.exceptions[0]):
                        raise
                    self._note_failure(group.exceptions[0])
                finally:
                    self._set_disconnected()
                if self._stop.is_set():
                    break
                if time.monotonic() - started > 30:
                    self._backoff.reset()  # it was a working connection, not a flapping one
                delay = self._backoff.next_delay()
                log.info("reconnecting", extra=fields(in_s=round(delay, 2)))
                with contextlib.suppress(TimeoutError):
                    await within(delay, self._stop.wait())
        finally:
            self._stopped.set()

    def _note_failure(self, exc: BaseException) -> None:
        text = str(exc) or type(exc).__name__
        self.stats.last_error = text
        if self.stats.connected:
            log.warning("broker connection lost", extra=fields(error=text))
        else:
            self.stats.connect_failures += 1
            log.warning(
                "cannot connect to broker",
                extra=fields(url=self.broker.url, error=text, attempt=self._backoff.attempts + 1),
            )

    def _set_disconnected(self) -> None:
        if self.stats.connected:
            self.stats.last_disconnect_ms = now_ms()
        self.stats.connected = False
        self._client = None
        self._live.clear()
        self._live_seqs.clear()

    def _client_for(self, will_payload: bytes) -> Any:
        import aiomqtt

        tls_context = None
        if self.broker.tls:
            tls_context = ssl.create_default_context(
                cafile=str(self.broker.ca_file) if self.broker.ca_file else None
            )
            if self.broker.cert_file and self.broker.key_file:
                tls_context.load_cert_chain(str(self.broker.cert_file), str(self.broker.key_file))
        window = self.broker.live_window + self.broker.backlog_window + 4
        return aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            username=self.broker.username,
            password=self.broker.password,
            identifier=self.client_id,
            will=aiomqtt.Will(self._topics["death"], will_payload, qos=1, retain=False),
            clean_session=True,
            keepalive=self.broker.keepalive_s,
            timeout=self.broker.connect_timeout_s,
            max_inflight_messages=window,
            max_queued_outgoing_messages=window * 4,
            tls_context=tls_context,
        )

    async def _session(self) -> None:
        sync = self.outbox.sync
        if self._pending_birth_seq is None:
            self._pending_birth_seq = await self.outbox.call(sync.reserve_seq)
        birth_seq = self._pending_birth_seq
        will = await self.outbox.call(
            sync.signer.encode, sync.epoch, 0, now_ms(), Death(birth_seq, "connection lost")
        )
        client = self._client_for(will)
        # aiomqtt warns above 10 outstanding calls; the windows are the real bound.
        client.pending_calls_threshold = self.broker.live_window + self.broker.backlog_window + 8
        try:
            await client.__aenter__()
        except Exception as exc:
            raise UplinkError(_describe_mqtt(exc)) from None
        try:
            await client.subscribe(downlink_filter(self.gateway), qos=1)
            await client.subscribe(HUB_STATE_TOPIC, qos=1)
            self._client = client
            # From here on the seq counts as used, whatever happens to the publish.
            self._pending_birth_seq = None
            self._session_seq = birth_seq
            await self._publish_birth(client, birth_seq)
            # Connected before reading the next seq: a frame committed from now on goes
            # to the live lane, one committed before is below session_start (the outbox
            # worker runs calls in order) and goes to the backlog lane.
            self._backlog, self._backlog_set = [], set()
            self._published_at.clear()
            self.stats.connected = True
            self.stats.connects += 1
            self.stats.last_connect_ms = now_ms()
            session_start = await self.outbox.call(lambda: sync.next_seq)
            backlog = await self.outbox.call(sync.unacked, session_start)
            self._requeue(backlog)
            log.info(
                "connected to broker",
                extra=fields(
                    url=self.broker.url,
                    client_id=self.client_id,
                    birth_seq=birth_seq,
                    backlog_frames=len(backlog),
                ),
            )
            async with asyncio.TaskGroup() as group:
                group.create_task(self._reader(client), name="uplink-reader")
                group.create_task(self._acker(), name="uplink-acks")
                group.create_task(self._live_lane(client, group), name="uplink-live")
                group.create_task(self._backlog_lane(client, group), name="uplink-backlog")
                group.create_task(self._resend_timer(), name="uplink-resend")
                group.create_task(self._heartbeats(client), name="uplink-heartbeat")
                group.create_task(self._stopper(client), name="uplink-stopper")
        finally:
            self._client = None
            self._session_seq = None
            with contextlib.suppress(Exception):
                await within(5, client.__aexit__(None, None, None))

    async def _stopper(self, client: Any) -> None:
        """On shutdown: let the live lane drain briefly, say goodbye, end the session."""
        await self._stop.wait()
        if self._live:
            self._live_drained.clear()
            with contextlib.suppress(TimeoutError):
                await within(3.0, self._live_drained.wait())
        if self._session_seq is not None:
            sync = self.outbox.sync
            death = sync.signer.encode(
                sync.epoch, 0, now_ms(), Death(self._session_seq, "shutdown")
            )
            with contextlib.suppress(Exception):
                await client.publish(self._topics["death"], death, qos=1, timeout=2.0)
        raise _SessionEnd

    async def _publish_birth(self, client: Any, seq: int) -> None:
        """Publish a birth with seq ``seq``, in parts if it does not fit one frame."""
        sync = self.outbox.sync
        low_water = await self.outbox.call(sync.low_water)
        session = self._session_seq if self._session_seq is not None else seq
        birth = dataclasses.replace(
            self.birth_factory(min(low_water, seq)), session=0 if session == seq else session
        )
        parts = await asyncio.to_thread(split_birth, birth, seq, self.max_frame_bytes)
        seqs = [seq]
        if len(parts) > 1:
            seqs += await self.outbox.call(
                lambda: [sync.reserve_seq() for _ in range(len(parts) - 1)]
            )
        for part, part_seq in zip(parts, seqs, strict=True):
            frame = await self.outbox.call(sync.encode, part_seq, part)
            await self._publish_raw(client, "birth", frame)
        self.stats.births += 1
        self.stats.birth_parts += len(parts)
        log.info(
            "birth published",
            extra=fields(
                seq=seq,
                session=session,
                points=len(birth.points),
                parts=len(parts),
                low_water=birth.low_water,
            ),
        )

    async def _heartbeats(self, client: Any) -> None:
        """Liveness that does not depend on device data (docs/protocol.md, "Heartbeat")."""
        if self.heartbeat_s <= 0:
            return
        sync = self.outbox.sync
        interval_ms = round(self.heartbeat_s * 1000)
        while True:
            await asyncio.sleep(self.heartbeat_s)
            session = self._session_seq
            if session is None:
                continue
            self._beat += 1
            body = Heartbeat(session, self._beat, interval_ms, self.device_states())
            frame = sync.signer.encode(sync.epoch, 0, now_ms(), body)
            try:
                # QoS 0: a heartbeat is about now; the broker must not queue it for a hub
                # that is away and deliver it later as if the agent were alive then.
                await client.publish(self._topics["heartbeat"], frame, qos=0, timeout=5.0)
            except Exception as exc:
                if _is_mqtt_error(exc):
                    raise UplinkError(f"publish heartbeat failed: {_describe_mqtt(exc)}") from None
                raise
            self.stats.heartbeats += 1

    async def _publish_raw(self, client: Any, kind: str, frame: bytes) -> None:
        try:
            await client.publish(
                self._topics[kind], frame, qos=1, timeout=self.broker.publish_timeout_s
            )
        except Exception as exc:
            if _is_mqtt_error(exc):
                raise UplinkError(f"publish {kind} failed: {_describe_mqtt(exc)}") from None
            raise
        self.stats.published_frames += 1
        self.stats.published_bytes += len(frame)
        self.stats.last_publish_ms = now_ms()

    async def _publish_committed(
        self, client: Any, item: Committed, semaphore: asyncio.Semaphore, backlog: bool
    ) -> None:
        try:
            await self._publish_raw(client, item.kind, item.frame)
            self.stats.published_samples += item.samples
            if backlog:
                self.stats.backlog_frames += 1
            if self.outbox.sync.is_unacked(item.seq):
                self._published_at[item.seq] = time.monotonic()
                if self._first_wait_ms is None:
                    self._first_wait_ms = now_ms()
        finally:
            semaphore.release()

    # -- lanes ------------------------------------------------------------------------

    async def _live_lane(self, client: Any, group: asyncio.TaskGroup) -> None:
        semaphore = asyncio.Semaphore(self.broker.live_window)
        while True:
            if not self._live:
                self._live_drained.set()
                self._live_event.clear()
                await self._live_event.wait()
                continue
            item = self._live.popleft()
            self._live_seqs.discard(item.seq)
            if not self.outbox.sync.is_unacked(item.seq):
                continue
            await semaphore.acquire()
            group.create_task(
                self._publish_committed(client, item, semaphore, backlog=False),
                name=f"publish-{item.seq}",
            )

    def _requeue(self, seqs: list[int]) -> None:
        for seq in seqs:
            if seq not in self._backlog_set and seq not in self._live_seqs:
                self._backlog_set.add(seq)
                heapq.heappush(self._backlog, seq)
        if self._backlog:
            self._backlog_event.set()

    async def _backlog_lane(self, client: Any, group: asyncio.TaskGroup) -> None:
        semaphore = asyncio.Semaphore(self.broker.backlog_window)
        bucket = TokenBucket(self.backlog_rate, burst=self.backlog_rate)
        sync = self.outbox.sync
        while True:
            if not self._backlog:
                self._backlog_event.clear()
                await self._backlog_event.wait()
                continue
            chunk: list[int] = []
            while self._backlog and len(chunk) < 64:
                seq = heapq.heappop(self._backlog)
                self._backlog_set.discard(seq)
                if sync.is_unacked(seq) and seq not in self._live_seqs:
                    chunk.append(seq)
            if not chunk:
                continue
            rows = await self.outbox.call(sync.frames, chunk)
            for seq, frame in rows:
                samples = sync.row_samples(seq)
                await bucket.take(max(1, samples))
                await semaphore.acquire()
                kind = sync.row_kind(seq)
                item = Committed(seq, kind, samples, frame)
                group.create_task(
                    self._publish_committed(client, item, semaphore, backlog=True),
                    name=f"backlog-{seq}",
                )

    async def _resend_timer(self) -> None:
        """Safety net: resend frames the hub has not acknowledged in time.

        A frame waits ``ack_timeout_s`` for its ack; while no ack arrives at all, each
        resend round doubles the wait (jittered, up to ``RESEND_BACKOFF_LIMIT`` times),
        so an agent without a hub does not send its whole buffer again every minute.
        Any ack resets the wait. Also flushes the rate-limited rejection log.
        """
        period = max(0.5, min(5.0, self.ack_timeout_s / 4))
        sync = self.outbox.sync
        rng = random.Random()
        while True:
            await asyncio.sleep(period)
            self._reject_log.flush()
            if self.stats.hub_online is False:
                continue
            wait_s = self.ack_timeout_s * 2 ** min(self._resend_level, 4)
            wait_s = min(wait_s, self.ack_timeout_s * RESEND_BACKOFF_LIMIT)
            self.stats.resend_interval_s = wait_s
            cutoff = time.monotonic() - wait_s * (0.9 + 0.2 * rng.random())
            overdue = [
                s for s, t in self._published_at.items() if t < cutoff and sync.is_unacked(s)
            ]
            if not overdue:
                continue
            for seq in overdue:
                del self._published_at[seq]
            if self.stats.no_ack_since_ms is None:
                self.stats.no_ack_since_ms = self.stats.last_ack_ms or self._first_wait_ms
            self._resend_level += 1
            self.stats.resend_rounds += 1
            self.stats.resent_frames += len(overdue)
            log.info(
                "resending unacknowledged frames",
                extra=fields(
                    frames=len(overdue),
                    waited_s=round(wait_s),
                    no_ack_since_ms=self.stats.no_ack_since_ms,
                ),
            )
            self._requeue(sorted(overdue))

    def _resend_all(self) -> None:
        unacked = self.outbox.sync.unacked()
        self.stats.resent_frames += sum(1 for seq in unacked if seq in self._published_at)
        self._published_at.clear()
        self._resend_level = 0
        self._requeue(unacked)

    # -- downlink ---------------------------------------------------------------------

    async def _reader(self, client: Any) -> None:
        try:
            async for message in client.messages:
                topic = str(message.topic)
                payload = message.payload
                if not isinstance(payload, bytes | bytearray):
                    self._reject("not_bytes", topic, "payload is not binary")
                    continue
                if topic == HUB_STATE_TOPIC:
                    await self._on_hub_state(bytes(payload), retained=bool(message.retain))
                    continue
                await self._on_downlink(topic, bytes(payload))
        except Exception as exc:
            if _is_mqtt_error(exc):
                raise UplinkError(f"connection lost: {_describe_mqtt(exc)}") from None
            raise

    def _reject(self, reason: str, topic: str, detail: str) -> None:
        """Count exactly; log at most a few lines per reason a minute, then a summary."""
        self.stats.rejected[reason] += 1
        self._reject_log.log(
            ("hub", reason), logging.WARNING, "downlink frame rejected", topic=topic, detail=detail
        )

    async def _on_downlink(self, topic: str, payload: bytes) -> None:
        try:
            parsed = parse_topic(topic)
            if parsed.gateway != self.gateway or parsed.direction != "down":
                raise ProtocolError(f"topic {topic} is not this gateway's downlink")
            frame = decode_frame(payload, self.hub_keys)
        except ProtocolError as exc:
            self._reject(exc.reason, topic, str(exc))
            return
        if frame.sender != "hub" or frame.kind != parsed.kind:
            self._reject("schema", topic, f"{frame.kind} frame from {frame.sender} on {topic}")
            return
        body = frame.body
        if isinstance(body, Ack | Rebirth | Command) and body.to != self.gateway:
            self._reject("wrong_recipient", topic, f"frame is addressed to {body.to!r}")
            return
        if isinstance(body, Ack):
            if body.epoch != self.outbox.sync.epoch:
                ours = self.outbox.sync.epoch
                self._reject("other_epoch", topic, f"ack for epoch {body.epoch}, ours is {ours}")
                return
            self.stats.acks += 1
            self.stats.last_ack_ms = now_ms()
            self.stats.no_ack_since_ms = None
            self._resend_level = 0
            if self.stats.hub_online is False:
                self.stats.hub_online = True  # a signed ack proves the hub is there
            self._pending_ack = body  # acks list every range, so the newest supersedes
            self._ack_event.set()
        elif isinstance(body, Rebirth):
            await self._on_rebirth(body)
        elif isinstance(body, Command):
            self.stats.commands += 1
            await self.on_command(frame)

    async def _acker(self) -> None:
        while True:
            await self._ack_event.wait()
            self._ack_event.clear()
            ack, self._pending_ack = self._pending_ack, None
            if ack is None:
                continue
            try:
                frames, _samples = await self.outbox.call(self.outbox.sync.ack, ack.ranges)
            except OutboxError as exc:
                # The rows stay; the next ack (they list every range) deletes them.
                log.error("cannot apply an ack to the buffer", extra=fields(error=str(exc)))
                continue
            self.stats.acked_frames += frames
            if frames:
                for seq in [s for s in self._published_at if not self.outbox.sync.is_unacked(s)]:
                    del self._published_at[seq]

    async def _on_rebirth(self, body: Rebirth) -> None:
        now = time.monotonic()
        if now - self._last_rebirth < 2.0:
            self._reject("rebirth_rate", HUB_STATE_TOPIC, "rebirth requests too close together")
            return
        self._last_rebirth = now
        self.stats.rebirths += 1
        log.info("rebirth requested by hub", extra=fields(reason=body.reason))
        await self.send_birth()
        self._resend_all()

    async def _on_hub_state(self, payload: bytes, *, retained: bool) -> None:
        """Hub presence, a signed ``hub_state`` frame. A retained one is the state found
        when subscribing (the session's own birth and full resend already cover it); a
        new hub session seen live means the hub has just (re)connected and may have missed
        frames published while it was away, whichever instance it is: tell it everything
        again. Unsigned, badly signed and replayed states are refused."""
        try:
            frame = decode_frame(payload, self.hub_keys)
            if frame.sender != "hub" or not isinstance(frame.body, HubState):
                raise SchemaViolation(f"a {frame.kind} frame from {frame.sender} is no hub state")
            verdict = self._presence.observe(frame.epoch, frame.seq, frame.body)
        except ProtocolError as exc:
            self.stats.hub_state_rejected += 1
            self._reject(f"hub_state_{exc.reason}", HUB_STATE_TOPIC, str(exc))
            return
        body = frame.body
        previous = self.stats.hub_instance
        self.stats.hub_session = self._presence.session
        if verdict == "same":
            return
        if verdict == "offline":
            self.stats.hub_online = False
            log.info("hub is offline", extra=fields(instance=body.instance, reason=body.reason))
            return
        self.stats.hub_online = True
        self.stats.hub_instance = body.instance
        if retained:
            log.info(
                "hub online",
                extra=fields(instance=body.instance, session=frame.seq, previous=previous or "-"),
            )
            return
        log.info(
            "hub came online: sending birth and every unacknowledged frame",
            extra=fields(instance=body.instance, session=frame.seq, previous=previous or "-"),
        )
        await self.send_birth()
        self._resend_all()

    async def send_birth(self) -> None:
        client = self._client
        if client is None:
            return
        seq = await self.outbox.call(self.outbox.sync.reserve_seq)
        await self._publish_birth(client, seq)


def _is_mqtt_error(exc: BaseException) -> bool:
    import aiomqtt

    return isinstance(exc, aiomqtt.MqttError)


def _describe_mqtt(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "code:5" in text or "Not authorised" in text or "code:4" in text:
        return f"{text} (check broker.username/password_file and the broker's ACL)"
    return text
