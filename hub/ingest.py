"""Ingest: raw MQTT messages in, a durable twin update and the acks to send out.

Synchronous and free of network I/O, so it is tested (and benchmarked) with frames
signed in the test; the runtime feeds it batches from the broker and runs it on the
database thread. For each message of a batch, in arrival order:

1. ``parse_topic`` and ``decode_frame`` (size, structure, key, signature, schema);
2. the signed sender and kind must match the topic (``topic_mismatch``);
3. ``tracker.check`` refuses replays and stale epochs (on a working copy of the
   tracker, so a frame repeated *within* a batch is caught too);
4. its samples are merged last-writer-wins against the state plus the batch's winners.

Then one transaction stores the frames (the journal of the tracker and of the current
state, see ``store``), their samples in history, and audit records, point metadata
and gateway changes when there are any. Only after it commits are the tracker and the
in-memory state replaced, and acks listing every delivered range of each gateway's
epoch become due. If the write fails nothing is applied or acked; the senders still
hold the frames and resend them, and they are not replays because the tracker never
recorded them. ``flush`` brings the tracker snapshot, the ``current`` table and the
gateway links up to date once per drift cycle.

Births larger than one frame arrive in parts (docs/protocol.md, "Births in parts"):
parts are held in memory, unrecorded, until the last one arrives; then every part is
stored and the assembled birth applied in that batch, so a birth changes the session,
the twin and history exactly once, or not at all (a lost part leaves a seq gap and the
hub asks for a rebirth). Heartbeats (unsequenced) only refresh the gateway's liveness
and device link states in memory.

Rejected frames are counted exactly by reason and audited; a flood is audited at most
``audit_rejections_per_minute`` times per (gateway, reason) and minute, plus one
summary record of how many were suppressed, and logged at most a few lines per
(gateway, reason) and minute plus one summary line (``RateLimitedLog``); replays and
stale heartbeats, which normal recovery produces, are logged at info level.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fieldtwin.hub.audit import AuditChain, AuditEvent
from fieldtwin.hub.config import HubConfig
from fieldtwin.hub.errors import StoreError
from fieldtwin.hub.metrics import HubMetrics
from fieldtwin.hub.state import (
    GatewayHeartbeat,
    GatewayLink,
    MergeResult,
    PointInfo,
    SemanticSpec,
    TwinState,
    encode_columns,
)
from fieldtwin.hub.storage import TwinStorePort
from fieldtwin.hub.store import Flush, FrameRow, IngestWrite
from fieldtwin.protocol.births import assemble_birth, check_same_birth
from fieldtwin.protocol.errors import ProtocolError, Replay
from fieldtwin.protocol.frames import Frame, Limits, decode_frame
from fieldtwin.protocol.keys import KeyRegistry
from fieldtwin.protocol.logfmt import RateLimitedLog
from fieldtwin.protocol.messages import Birth, CommandResult, Data, Death, Heartbeat
from fieldtwin.protocol.topics import parse_topic
from fieldtwin.protocol.tracker import DeliveryTracker

log = logging.getLogger("fieldtwin.hub.ingest")


class TopicMismatch(ProtocolError):
    """The signed sender or kind differs from what the topic says."""

    reason = "topic_mismatch"


class StaleDeath(ProtocolError):
    """A death that does not name the sender's latest birth (a replay, or late)."""

    reason = "stale_death"


class StaleHeartbeat(ProtocolError):
    """A heartbeat that does not name the gateway's live connection, or repeats a beat."""

    reason = "stale_heartbeat"


EXPECTED_REJECTIONS = frozenset({Replay.reason, StaleHeartbeat.reason})
"""Reasons normal recovery produces (resends after a missed ack, a heartbeat racing its
connection's birth): logged at info level, not as warnings."""


@dataclass(slots=True)
class _PendingBirth:
    """The parts of one multi-part birth received so far (docs/protocol.md)."""

    epoch: int
    birth_id: int
    parts: int
    session: int
    started_ms: int
    received: dict[int, tuple[Frame, Inbound]] = field(default_factory=dict)

    def copy(self) -> _PendingBirth:
        return replace(self, received=dict(self.received))


@dataclass(slots=True)
class Inbound:
    topic: str
    payload: bytes
    received_ms: int
    received_ns: int = 0


@dataclass(slots=True)
class Accepted:
    gateway: str
    kind: str
    epoch: int
    seq: int
    sent_at_ms: int
    received_ns: int
    samples: int


@dataclass(slots=True)
class IngestOutcome:
    accepted: list[Accepted] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    ack_due: dict[str, int] = field(default_factory=dict)
    points_applied: int = 0
    points_stored: int = 0
    births: list[str] = field(default_factory=list)
    deaths: list[str] = field(default_factory=list)
    cmd_results: list[tuple[str, CommandResult, int]] = field(default_factory=list)
    """(gateway, result, received_ms) of the batch's stored ``cmd_result`` frames."""
    committed_ns: int = 0
    error: StoreError | None = None


class _RejectionAudit:
    """Audits rejections with a per-minute cap per (gateway, reason)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.window = -1
        self.counts: Counter[tuple[str, str]] = Counter()

    def admit(self, gateway: str, reason: str, now_ms: int, events: list[AuditEvent]) -> bool:
        window = now_ms // 60_000
        if window != self.window:
            for (gw, why), count in sorted(self.counts.items()):
                if count > self.per_minute:
                    events.append(
                        AuditEvent(
                            now_ms,
                            "hub",
                            "frames_rejected_suppressed",
                            gw,
                            {"reason": why, "suppressed": count - self.per_minute},
                        )
                    )
            self.window = window
            self.counts.clear()
        self.counts[(gateway, reason)] += 1
        return self.counts[(gateway, reason)] <= self.per_minute


class HubSequence:
    """The hub's own (epoch, seq) for the frames it signs; seqs are reserved in blocks."""

    BLOCK = 100_000

    def __init__(self, epoch: int, next_seq: int, ceiling: int) -> None:
        self.epoch = epoch
        self.next_seq = next_seq
        self.ceiling = ceiling

    @property
    def remaining(self) -> int:
        return self.ceiling - self.next_seq + 1

    def take(self) -> int:
        if self.next_seq > self.ceiling:
            raise StoreError("the hub ran out of reserved sequence numbers")
        seq = self.next_seq
        self.next_seq += 1
        return seq


class IngestCore:
    """Turns batches of raw messages into stored twin updates."""

    def __init__(
        self,
        config: HubConfig,
        store: TwinStorePort,
        state: TwinState,
        tracker: DeliveryTracker,
        registry: KeyRegistry,
        audit: AuditChain,
        metrics: HubMetrics,
        next_frame_id: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.state = state
        self.tracker = tracker
        self.registry = registry
        self.audit = audit
        self.metrics = metrics
        self.next_frame_id = next_frame_id
        self.clock = clock
        self.limits = Limits(max_frame_bytes=config.ingest.max_frame_bytes)
        self.rejections = _RejectionAudit(config.ingest.audit_rejections_per_minute)
        self.semantics = self._semantics()
        self.gap_since: dict[str, int] = {}
        self.last_rebirth: dict[str, int] = {}
        self.dirty_current: set[tuple[str, str]] = set(state.unflushed)
        self.dirty_gateways: set[str] = set()
        self.flushed_upto = next_frame_id - 1
        self.pending_births: dict[str, _PendingBirth] = {}
        """Multi-part births waiting for parts, per gateway (memory only; a restarted hub
        asks for a rebirth through the gap their unrecorded seqs leave)."""
        self.reject_log = RateLimitedLog(
            log, "frames rejected (summary)", key_names=("gateway", "reason")
        )
        self.store_log = RateLimitedLog(
            log, "ingest batches not stored (summary)", key_names=("store", "kind")
        )

    def _semantics(self) -> dict[tuple[str, str], SemanticSpec]:
        out: dict[tuple[str, str], SemanticSpec] = {}
        schema = self.config.schema
        for entity, attribute in schema.declared_points():
            spec = schema.spec(entity, attribute)
            if spec is not None and (spec.max_rate is not None or spec.frozen_min_change):
                out[(entity, attribute)] = SemanticSpec(spec.max_rate, spec.frozen_min_change)
        return out

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- the batch ---------------------------------------------------------------------

    def process(self, messages: Sequence[Inbound]) -> IngestOutcome:
        outcome = IngestOutcome()
        now_ms = self.now_ms()
        self.reject_log.flush()
        work = DeliveryTracker.from_dict(self.tracker.to_dict())
        write = IngestWrite()
        merge = MergeResult()
        links: dict[str, GatewayLink] = {}
        events: list[AuditEvent] = []
        points: dict[tuple[str, str], PointInfo] = {}
        sequenced: set[str] = set()
        pending = {gateway: held.copy() for gateway, held in self.pending_births.items()}
        heartbeats: dict[str, GatewayHeartbeat] = {}
        settled: list[tuple[Frame, Inbound]] = []
        frame_id = self.next_frame_id

        def link_of(gateway: str) -> GatewayLink:
            link = links.get(gateway)
            if link is None:
                held = self.state.gateways.get(gateway)
                link = GatewayLink(gateway) if held is None else _copy_link(held)
                links[gateway] = link
            return link

        for message in messages:
            gateway = "?"
            try:
                topic = parse_topic(message.topic)
                gateway = topic.gateway
                if topic.direction != "up":
                    raise TopicMismatch(f"{message.topic} is a downlink topic")
                frame = decode_frame(message.payload, self.registry, self.limits)
                if frame.sender != topic.gateway or frame.kind != topic.kind:
                    raise TopicMismatch(
                        f"{frame.kind} frame signed by {frame.sender} arrived on {message.topic}"
                    )
                if frame.kind == "death":
                    self._death(frame, link_of(frame.sender), message, events, pending, settled)
                    outcome.deaths.append(frame.sender)
                    self.metrics.frames_accepted[(frame.sender, frame.kind)] += 1
                    continue
                if frame.kind == "heartbeat":
                    heartbeats[frame.sender] = self._heartbeat(
                        frame, link_of(frame.sender), message, heartbeats
                    )
                    self.metrics.frames_accepted[(frame.sender, frame.kind)] += 1
                    continue
                work.check(frame.sender, frame.epoch, frame.seq)
                units, birth = self._units(frame, message, link_of(frame.sender), pending, settled)
            except ProtocolError as exc:
                self._reject(exc, gateway, message, now_ms, events, outcome)
                continue
            finally:
                # Parts of births that will never be applied (superseded, or their
                # connection died) still count as delivered, so they leave no seq gap.
                while settled:
                    unapplied, arrived = settled.pop(0)
                    if self._record(work, unapplied):
                        sequenced.add(unapplied.sender)
                        link_of(unapplied.sender).frames += 1
                        write.frames.append(_frame_row(frame_id, unapplied, arrived, None))
                        frame_id += 1
            if not units:
                continue  # a birth part, held until the whole birth has arrived
            for unit, _ in units:
                work.record(unit.sender, unit.epoch, unit.seq)
            sequenced.add(frame.sender)
            link = link_of(frame.sender)
            if link.epoch and frame.epoch > link.epoch:
                events.append(
                    AuditEvent(
                        message.received_ms,
                        frame.sender,
                        "epoch_changed",
                        frame.sender,
                        {"old": link.epoch, "new": frame.epoch},
                    )
                )
                link.birth_seq = 0
                link.session = 0
                link.death_birth_seq = 0
            link.epoch = frame.epoch
            link.last_frame_ms = message.received_ms
            samples = 0
            body = frame.body
            first_id = frame_id
            if isinstance(body, Data):
                samples = len(body)
                self._history(write, body, frame_id)
                self.state.merge(
                    body.entities,
                    body.attributes,
                    body.values,
                    body.ts_ms,
                    body.qualities,
                    frame.sender,
                    message.received_ms,
                    self.semantics,
                    into=merge,
                )
                link.online = True
            elif birth is not None:
                samples = len(birth.state)
                head = units[0][0]  # part 0: its seq names the birth
                self._birth(
                    head, birth, link, message, merge, write, points, first_id, events, work
                )
                work.close_below(frame.sender, frame.epoch, birth.low_water)
                outcome.births.append(frame.sender)
            elif isinstance(body, CommandResult):
                outcome.cmd_results.append((frame.sender, body, message.received_ms))
                write.cmd_results.append(
                    (
                        message.received_ms,
                        frame.sender,
                        body.cmd_id,
                        body.status,
                        body.detail,
                        repr(body.readback),
                        body.readback_ts_ms,
                    )
                )
                events.append(
                    AuditEvent(
                        message.received_ms,
                        frame.sender,
                        "cmd_result",
                        body.cmd_id,
                        {"status": body.status, "detail": body.detail},
                    )
                )
            link.points += samples
            for unit, arrived in units:
                part = unit.body
                applied = birth is not None or not isinstance(part, Birth)
                write.frames.append(
                    _frame_row(
                        frame_id,
                        unit,
                        arrived,
                        part.low_water if applied and isinstance(part, Birth) else None,
                    )
                )
                outcome.accepted.append(
                    Accepted(
                        unit.sender,
                        unit.kind,
                        unit.epoch,
                        unit.seq,
                        unit.sent_at_ms,
                        arrived.received_ns,
                        len(part.state) if isinstance(part, Birth) else samples,
                    )
                )
                link.frames += 1
                frame_id += 1
            link.upto_frame = frame_id - 1

        known = self.state.first_seen
        for key, winner in merge.winners.items():
            if key[0] not in known and key[0] not in write.new_entities:
                write.new_entities[key[0]] = (winner.received_ms, winner.gateway)
        write.points = list(points.values())
        # Gateway rows are journaled by the frames; only changes of session (birth,
        # death, epoch) are written at once, the counters with the next flush.
        for gateway, link in links.items():
            held = self.state.gateways.get(gateway)
            if (
                held is None
                or held.epoch != link.epoch
                or held.birth_seq != link.birth_seq
                or held.online != link.online
            ):
                write.gateways.append(link)
        write.audit = self.audit.chain(events)
        for gateway, waiting in list(pending.items()):
            current = work.epoch_of(gateway)
            if current is not None and waiting.epoch < current:
                del pending[gateway]  # its epoch was replaced: it can never complete
        # Heartbeats are liveness, not data: kept in memory, never stored or acknowledged.
        self.state.heartbeats.update(heartbeats)
        if not (write.frames or write.audit or write.gateways):
            self.pending_births = pending
            return outcome
        try:
            self.store.write_ingest(write)
        except StoreError as exc:
            self.metrics.store_errors += 1
            outcome.error = exc
            self.store_log.flush()
            self.store_log.log(
                ("twin", type(exc).__name__),
                logging.ERROR,
                "ingest batch not stored; nothing applied or acknowledged",
                frames=len(write.frames),
                error=str(exc)[:500],
            )
            return outcome
        outcome.committed_ns = time.time_ns()
        # Durable: now the working copies become the truth.
        self.audit.commit(write.audit)
        self.tracker = work
        self.pending_births = pending
        self.state.apply(merge)
        self.state.gateways.update(links)
        self.state.points.update(points)
        for entity, (first_seen, _) in write.new_entities.items():
            self.state.first_seen.setdefault(entity, first_seen)
        self.next_frame_id = frame_id
        self.dirty_current.update(merge.winners)
        self.dirty_gateways.update(links)
        outcome.points_applied = merge.considered
        outcome.points_stored = len(write.history)
        for gateway in sequenced:
            epoch = work.epoch_of(gateway)
            if epoch is not None:
                outcome.ack_due[gateway] = epoch
            if work.gaps(gateway):
                self.gap_since.setdefault(gateway, now_ms)
            else:
                self.gap_since.pop(gateway, None)
        metrics = self.metrics
        metrics.batches += 1
        metrics.points_applied += outcome.points_applied
        metrics.points_stored += outcome.points_stored
        for accepted in outcome.accepted:
            metrics.frames_accepted[(accepted.gateway, accepted.kind)] += 1
        if outcome.accepted:
            oldest = min(a.sent_at_ms for a in outcome.accepted)
            metrics.ingest_lag_s = max(0.0, outcome.committed_ns / 1e9 - oldest / 1000)
        return outcome

    # -- births in parts ---------------------------------------------------------------

    def _units(
        self,
        frame: Frame,
        message: Inbound,
        link: GatewayLink,
        pending: dict[str, _PendingBirth],
        settled: list[tuple[Frame, Inbound]],
    ) -> tuple[list[tuple[Frame, Inbound]], Birth | None]:
        """What this frame makes storable now, and the birth to apply with it, if any.

        A frame that is not part of a multi-part birth is its own unit. A part is held
        (nothing storable yet) until the last part of its birth arrives; then every part
        is stored in this batch and the assembled birth applied once. A part of a birth
        older than one already applied or pending is stored but never applied, and so
        are the held parts of a birth that a newer one supersedes (``settled``).
        """
        body = frame.body
        if not isinstance(body, Birth):
            return [(frame, message)], None
        sender, epoch = frame.sender, frame.epoch
        birth_id = body.birth_id(frame.seq)
        if epoch == link.epoch and (
            birth_id < link.birth_seq or body.session_seq(frame.seq) <= link.death_birth_seq
        ):
            # A newer birth was applied already, or the birth's connection has ended.
            return [(frame, message)], None
        held = pending.get(sender)
        if held is not None and (held.epoch, held.birth_id) < (epoch, birth_id):
            if held.epoch == epoch:
                settled.extend(held.received[i] for i in sorted(held.received))
            del pending[sender]
            held = None
        if body.parts == 1:
            return [(frame, message)], body
        if held is not None and (held.epoch, held.birth_id) > (epoch, birth_id):
            return [(frame, message)], None  # a newer birth is arriving
        if held is None:
            held = pending[sender] = _PendingBirth(
                epoch, birth_id, body.parts, body.session_seq(frame.seq), message.received_ms
            )
        elif body.part in held.received:
            raise Replay(
                f"{sender}: part {body.part} of birth {birth_id} (epoch {epoch}) already arrived"
            )
        else:
            some = next(iter(held.received.values()))[0].body
            assert isinstance(some, Birth)
            check_same_birth(some, body)
        held.received[body.part] = (frame, message)
        if len(held.received) < held.parts:
            return [], None
        del pending[sender]
        units = [held.received[i] for i in range(held.parts)]
        parts = [unit.body for unit, _ in units]
        return units, assemble_birth(parts)  # type: ignore[arg-type]

    @staticmethod
    def _record(work: DeliveryTracker, frame: Frame) -> bool:
        """Record a settled part as delivered, unless its epoch has been replaced."""
        try:
            work.check(frame.sender, frame.epoch, frame.seq)
        except ProtocolError:
            return False
        work.record(frame.sender, frame.epoch, frame.seq)
        return True

    # -- per kind ----------------------------------------------------------------------

    def _history(self, write: IngestWrite, body: Data, frame_id: int) -> None:
        history = write.history
        count = len(body)
        kinds, nums, txts = encode_columns(body.values)
        history.entity.extend(body.entities)
        history.attribute.extend(body.attributes)
        history.kind.extend(kinds)
        history.num.extend(nums)
        history.txt.extend(txts)
        history.ts_ms.extend(body.ts_ms)
        history.quality.extend(body.qualities)
        history.frame_id.extend([frame_id] * count)

    def _birth(
        self,
        frame: Frame,
        body: Birth,
        link: GatewayLink,
        message: Inbound,
        merge: MergeResult,
        write: IngestWrite,
        points: dict[tuple[str, str], PointInfo],
        frame_id: int,
        events: list[AuditEvent],
        tracker: DeliveryTracker,
    ) -> None:
        for point in body.points:
            points[(point.entity, point.attribute)] = PointInfo(
                point.entity,
                point.attribute,
                frame.sender,
                point.dtype,
                point.unit,
                point.writable,
                point.min,
                point.max,
                point.interval_ms,
                point.source,
                message.received_ms,
                point.device,
            )
        state = body.state
        if state:
            entities = [s.entity for s in state]
            attributes = [s.attribute for s in state]
            values = [s.value for s in state]
            stamps = [s.ts_ms for s in state]
            qualities = [int(s.quality) for s in state]
            self.state.merge(
                entities,
                attributes,
                values,
                stamps,
                qualities,
                frame.sender,
                message.received_ms,
                self.semantics,
                into=merge,
            )
            # History is exactly-once per sample: a birth repeats samples that travel in
            # data frames, so it stores only those whose data frame will never arrive
            # (below the birth's low water and never delivered: dropped by the sender's
            # overflow policy). A delivered frame already stored them; a frame at or above
            # the low water is still held by the sender and will store them; a sample
            # with no seq (0) is the sender's own to deliver in a data frame.
            sender, epoch, low_water = frame.sender, frame.epoch, body.low_water
            orphans = [
                i
                for i in range(len(state))
                if 0 < (seq := body.seq_of(i)) < low_water
                and not tracker.delivered(sender, epoch, seq)
            ]
            if orphans:
                picked = Data(
                    tuple(entities[i] for i in orphans),
                    tuple(attributes[i] for i in orphans),
                    tuple(values[i] for i in orphans),
                    tuple(stamps[i] for i in orphans),
                    tuple(qualities[i] for i in orphans),
                )
                self._history(write, picked, frame_id)
        link.birth_seq = frame.seq
        link.session = body.session_seq(frame.seq)
        link.online = True
        link.last_birth_ms = message.received_ms
        link.death_reason = ""
        link.info = dict(body.info)
        events.append(
            AuditEvent(
                message.received_ms,
                frame.sender,
                "birth",
                frame.sender,
                {
                    "epoch": frame.epoch,
                    "seq": frame.seq,
                    "points": len(body.points),
                    "low_water": body.low_water,
                },
            )
        )

    def _death(
        self,
        frame: Frame,
        link: GatewayLink,
        message: Inbound,
        events: list[AuditEvent],
        pending: dict[str, _PendingBirth],
        settled: list[tuple[Frame, Inbound]],
    ) -> None:
        body = frame.body
        assert isinstance(body, Death)
        # The will is signed at connect, so it names the birth that opened the connection;
        # rebirths within it carry that seq as their ``session``. Only a death naming the
        # live connection applies; any other is a replay or arrived too late. A connection
        # whose opening birth is still arriving in parts is live too: its death ends it.
        held = pending.get(frame.sender)
        opening = held is not None and held.epoch == frame.epoch and held.session == body.birth_seq
        if link.session:
            current = body.birth_seq == link.session
        else:
            # Session unknown (a store from before births carried it): any birth of this
            # epoch after the one named by the last applied death may have opened it.
            current = link.death_birth_seq < body.birth_seq <= link.birth_seq
        if not opening and (frame.epoch != link.epoch or not link.online or not current):
            raise StaleDeath(
                f"death naming birth {body.birth_seq} of epoch {frame.epoch}; the gateway's "
                f"live connection was opened by birth {link.session or '?'} of epoch "
                f"{link.epoch} (latest birth {link.birth_seq}), the last death named birth "
                f"{link.death_birth_seq}" + ("" if link.online else "; it is already offline")
            )
        if held is not None and held.epoch == frame.epoch:
            # The connection is gone: its birth in parts can never complete.
            settled.extend(held.received[i] for i in sorted(held.received))
            del pending[frame.sender]
        link.death_birth_seq = body.birth_seq
        link.online = False
        link.death_ms = message.received_ms
        link.death_reason = body.reason
        events.append(
            AuditEvent(
                message.received_ms,
                frame.sender,
                "death",
                frame.sender,
                {"birth_seq": body.birth_seq, "reason": body.reason},
            )
        )

    def _heartbeat(
        self,
        frame: Frame,
        link: GatewayLink,
        message: Inbound,
        fresh: dict[str, GatewayHeartbeat],
    ) -> GatewayHeartbeat:
        """Accept a heartbeat of the live connection with a beat above the last one."""
        body = frame.body
        assert isinstance(body, Heartbeat)
        if frame.epoch != link.epoch or body.session != link.session or not link.online:
            state = "online" if link.online else "offline"
            raise StaleHeartbeat(
                f"heartbeat of connection {body.session} (epoch {frame.epoch}); the gateway's "
                f"live connection is {link.session or '?'} of epoch {link.epoch} ({state})"
            )
        last = fresh.get(frame.sender) or self.state.heartbeats.get(frame.sender)
        if (
            last is not None
            and (last.epoch, last.session) == (frame.epoch, body.session)
            and body.beat <= last.beat
        ):
            raise StaleHeartbeat(
                f"heartbeat beat {body.beat} of connection {body.session} is not after beat "
                f"{last.beat} (a replay)"
            )
        return GatewayHeartbeat(
            message.received_ms,
            frame.epoch,
            body.session,
            body.beat,
            body.interval_ms,
            body.devices,
        )

    def _reject(
        self,
        exc: ProtocolError,
        gateway: str,
        message: Inbound,
        now_ms: int,
        events: list[AuditEvent],
        outcome: IngestOutcome,
    ) -> None:
        """Count exactly, audit with a per-minute cap, log rate-limited per (gateway, reason)."""
        reason = exc.reason
        outcome.rejected[reason] += 1
        if isinstance(exc, Replay):
            # A sender repeats a frame when it missed our ack: acks are idempotent, so
            # answer with the current ranges (the repeat itself is refused). Acks are
            # coalesced: one per gateway per ``ack_interval_ms`` answers many repeats.
            epoch = self.tracker.epoch_of(gateway)
            if epoch is not None:
                outcome.ack_due[gateway] = epoch
        self.metrics.frames_rejected[reason] += 1
        if self.rejections.admit(gateway, reason, now_ms, events):
            detail: dict[str, Any] = {
                "reason": reason,
                "topic": message.topic[:200],
                "bytes": len(message.payload),
                "error": str(exc)[:500],
            }
            events.append(AuditEvent(message.received_ms, "hub", "frame_rejected", gateway, detail))
        self.reject_log.log(
            (gateway, reason),
            logging.INFO if reason in EXPECTED_REJECTIONS else logging.WARNING,
            "frame rejected",
            topic=message.topic[:200],
            error=str(exc)[:500],
        )

    # -- flushing ----------------------------------------------------------------------

    def flush_plan(self) -> Flush | None:
        """What the next drift cycle writes so the journal can be short, or None."""
        self.store_log.flush()
        self.reject_log.flush()  # once per drift cycle: summaries appear after a flood ends
        upto = self.next_frame_id - 1
        if upto == self.flushed_upto and not self.dirty_current and not self.dirty_gateways:
            return None
        state = self.state
        flush = Flush(upto_frame=upto, tracker=self.tracker.dumps())
        for key in self.dirty_current:
            current = state.current[key]
            if key in state.persisted:
                flush.current_changed[key] = current
            else:
                flush.current_new[key] = current
        flush.gateways = [state.gateways[g] for g in sorted(self.dirty_gateways)]
        return flush

    def flushed(self, flush: Flush) -> None:
        """The flush is durable: the journal before ``flush.upto_frame`` is covered."""
        self.state.persisted.update(flush.current_new)
        self.dirty_current.difference_update(flush.current_new)
        self.dirty_current.difference_update(flush.current_changed)
        self.dirty_gateways.difference_update(g.gateway for g in flush.gateways)
        self.flushed_upto = flush.upto_frame

    # -- gaps --------------------------------------------------------------------------

    def due_rebirths(self, now_ms: int) -> list[tuple[str, str]]:
        """Gateways whose seq gap outlived the gap timeout (and were not asked recently)."""
        due: list[tuple[str, str]] = []
        timeout_ms = self.config.ingest.gap_timeout_s * 1000
        min_interval_ms = self.config.ingest.rebirth_min_interval_s * 1000
        for gateway, since in list(self.gap_since.items()):
            gaps = self.tracker.gaps(gateway)
            if not gaps:
                del self.gap_since[gateway]
                continue
            if now_ms - since < timeout_ms:
                continue
            if now_ms - self.last_rebirth.get(gateway, 0) < min_interval_ms:
                continue
            if gateway in self.pending_births:
                continue  # a birth in parts is arriving; its own timeout applies below
            first, last = gaps[0]
            missing = sum(b - a + 1 for a, b in gaps)
            due.append((gateway, f"gap: {missing} seqs missing (first {first}-{last})"))
        for gateway, held in sorted(self.pending_births.items()):
            if now_ms - held.started_ms < timeout_ms:
                continue
            if now_ms - self.last_rebirth.get(gateway, 0) < min_interval_ms:
                continue
            missing_parts = sorted(set(range(held.parts)) - set(held.received))
            due.append(
                (
                    gateway,
                    f"incomplete birth {held.birth_id}: {len(held.received)} of {held.parts} "
                    f"parts arrived (missing {', '.join(map(str, missing_parts[:10]))})",
                )
            )
        return due

    def note_rebirth(self, gateway: str, now_ms: int) -> None:
        self.last_rebirth[gateway] = now_ms
        if gateway in self.gap_since:
            self.gap_since[gateway] = now_ms


def _copy_link(link: GatewayLink) -> GatewayLink:
    return replace(link, info=dict(link.info))


def _frame_row(frame_id: int, frame: Frame, message: Inbound, low_water: int | None) -> FrameRow:
    body = frame.body
    samples = 0
    if isinstance(body, Birth):
        samples = len(body.state)
    elif isinstance(body, Data):
        samples = len(body)
    return FrameRow(
        frame_id,
        frame.sender,
        frame.kind,
        frame.epoch,
        frame.seq,
        frame.sent_at_ms,
        message.received_ms,
        samples,
        low_water,
    )
