"""The hub service: the one API of the hub, whatever the transport.

The HTTP adapter (hub/api.py), the operator channel (the runtime's ``_operator_loop``
in hub/runtime.py, which hands each request to ``handle_request``) and the console
feed all call this class; the runtime (hub/runtime.py) only wires loops together.
Every method runs on the hub's database thread (one call at a time), which owns the
DuckDB store *and* the in-memory twin, so there are no locks and no torn reads.

Methods that change something return ``Effects``: the frames to publish (signed here)
and the rebirths to ask for. The runtime performs them; nothing here touches a socket.

What lives here:

- opening and closing the store, and the hub's identity (``HubSigner``);
- ingest batches, and what they mean for commands (results, gateways coming back);
- the sync cycle: drift, alarms, reconciliation (alarm strategies, corrective commands,
  investigations), health, flush;
- the command lifecycle around the pure ``CommandBook`` and ``check_command`` policy:
  propose, approve, reject, cancel, send, verify, roll back;
- operator requests: verified by ``RequestGate``, authorised by role, dispatched,
  answered (signed), audited — refusals too;
- queries for the API, the CLI and consoles.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fieldtwin.hub import predict, queries
from fieldtwin.hub.alarms import Alarm, AlarmBook, Transition, planned_actions
from fieldtwin.hub.audit import AuditChain, AuditEvent, verify_chain
from fieldtwin.hub.commands import (
    ApprovalRecord,
    Checkpoint,
    CommandBook,
    CommandRecord,
    Outcome,
    RuleParams,
    label,
)
from fieldtwin.hub.config import HubConfig
from fieldtwin.hub.drift import DriftEngine, DriftReport, Finding
from fieldtwin.hub.errors import (
    AlarmError,
    CommandError,
    OperatorRefused,
    QueryError,
    StoreError,
)
from fieldtwin.hub.export import snapshot_hash, twin_document
from fieldtwin.hub.ingest import HubSequence, Inbound, IngestCore, IngestOutcome
from fieldtwin.hub.metrics import HubMetrics, render
from fieldtwin.hub.operators import READ, RequestGate, VerifiedRequest, permissions
from fieldtwin.hub.policy import GatewayStatus, PolicyInput, Verdict, check_command
from fieldtwin.hub.predict import FitHistory, Flagged
from fieldtwin.hub.state import CurrentValue, decode_value, numeric
from fieldtwin.hub.storage import TwinStorePort
from fieldtwin.hub.store import SyncWrite
from fieldtwin.protocol.approvals import verify_approval
from fieldtwin.protocol.errors import BadSignature, ProtocolError
from fieldtwin.protocol.frames import FrameSigner
from fieldtwin.protocol.keys import KeyPair
from fieldtwin.protocol.logfmt import fields
from fieldtwin.protocol.messages import (
    MAX_RANGES,
    Ack,
    AnyBody,
    Approval,
    Command,
    OperatorResponse,
    Rebirth,
    Value,
)
from fieldtwin.protocol.topics import (
    OPERATOR_REQUEST_FILTER,
    downlink_topic,
    operator_response_topic,
)
from fieldtwin.protocol.tracker import DeliveryTracker

if TYPE_CHECKING:
    from fieldtwin.hub.store_pg import PgTwinStore
    from fieldtwin.hub.views import ViewFeed
    from fieldtwin.hub.workers import Fence

log = logging.getLogger("fieldtwin.hub")

ALARM_TOPIC = "ft/v1/hub/alarms"
"""Alarm transitions of ``alert`` and ``investigate`` rules are published here (JSON)."""


# -- the hub's identity ------------------------------------------------------------------


class HubSigner:
    """The hub's key and (epoch, seq): every frame the hub sends is signed here.

    Used from the event loop (acks, rebirths) and the database thread (commands,
    operator answers), hence the lock. Seqs are reserved in blocks in the store by the
    database thread (``reserve_ceiling``) before they run out.
    """

    def __init__(self, key: KeyPair, sequence: HubSequence) -> None:
        self.frames = FrameSigner("hub", key)
        self.sequence = sequence
        self._lock = threading.Lock()

    @property
    def key(self) -> KeyPair:
        return self.frames.key

    def sign(self, body: AnyBody, now_ms: int) -> bytes:
        with self._lock:
            seq = self.sequence.take()
            epoch = self.sequence.epoch
        return self.frames.encode(epoch, seq, now_ms, body)

    def take(self) -> tuple[int, int]:
        """The next (epoch, seq) for a frame signed with ``frames`` directly (the signed
        hub state, whose online frame's seq names the session)."""
        with self._lock:
            return self.sequence.epoch, self.sequence.take()

    def wanted_ceiling(self) -> int | None:
        """A new ceiling to reserve when less than half a block is left, else None."""
        with self._lock:
            if self.sequence.remaining >= HubSequence.BLOCK // 2:
                return None
            return self.sequence.ceiling + HubSequence.BLOCK

    def raise_ceiling(self, ceiling: int) -> None:
        with self._lock:
            self.sequence.ceiling = max(self.sequence.ceiling, ceiling)


# -- effects -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outbound:
    topic: str
    payload: bytes
    retain: bool = False


@dataclass(slots=True)
class Effects:
    """What the runtime must do after a service call: publish, ask for rebirths."""

    publish: list[Outbound] = field(default_factory=list)
    rebirths: list[tuple[str, str, str]] = field(default_factory=list)
    """(gateway, reason, entity) to ask for a birth (rate-limited by the runtime)."""
    gap_rebirths: list[tuple[str, str]] = field(default_factory=list)

    def extend(self, other: Effects) -> None:
        self.publish.extend(other.publish)
        self.rebirths.extend(other.rebirths)
        self.gap_rebirths.extend(other.gap_rebirths)


@dataclass(frozen=True, slots=True)
class Operation:
    permission: str
    handler: Callable[[HubService, VerifiedRequest, Mapping[str, Any], int], Any]
    mutating: bool


# -- the service ---------------------------------------------------------------------------


class HubService:
    """Everything the hub knows and does, behind one set of methods (database thread)."""

    def __init__(
        self,
        config: HubConfig,
        store: TwinStorePort,
        *,
        instance: str,
        metrics: HubMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open the hub's state on ``store`` (call on the database thread)."""
        self.config = config
        self.store = store
        self.instance = instance
        self.metrics = metrics
        self.clock = clock
        self.started_ms = self.now_ms()
        self.last_report: DriftReport | None = None
        self.last_query_ms: int | None = None
        self.api_url: str | None = None
        """The HTTP API's base URL while it listens (set by the runtime)."""
        self._pending_actions: list[tuple[int, str, str, str, str]] = []
        self._ack_pending: dict[str, tuple[int, list[tuple[int, int]]]] = {}
        self._refusal_counts: Counter[tuple[str, str, int]] = Counter()
        self._shared: PgTwinStore | None = None
        """The store, once this hub is one of several workers sharing it (``share``)."""
        self._fence: Fence | None = None
        """A worker's partitions: it evaluates drift and alarms of their entities only."""
        self._id_block_end: dict[str, int] = {}
        self._mirrored_ms = 0
        self._models_read_ms = 0
        self._command_mirror: dict[str, CommandRecord] = {}
        self.mirrored_silent: set[str] = set()
        """Other workers' silent gateways, as the view leader last mirrored them."""
        self._view_feed: ViewFeed | None = None
        self._block_end = 0
        registry = config.registry()
        operator_registry = config.operator_registry()
        if config.workers is None and store.meta("run_by_workers"):
            # Its shared checkpoint (tracker, upto_frame) was written by every worker and
            # is nobody's to trust: a single hub would acknowledge and replay wrongly.
            raise StoreError(
                f"{store.location} is run by hub workers (first: "
                f"{store.meta('run_by_workers')}); start this hub as one of them: add a "
                "[workers] section to its config (docs/hub.md, 'Workers sharing the "
                "gateways')"
            )
        state, tracker = store.load_state()
        ids = store.next_ids()
        head_seq, head_hash = store.audit_head()
        chain = AuditChain(head_seq, head_hash)
        epoch, first, ceiling = store.hub_sequence(HubSequence.BLOCK)
        self.signer = HubSigner(config.load_key(), HubSequence(epoch, first, ceiling))
        schema = config.schema
        declared = [
            (e.id, e.twin_id, e.type, e.gateway, e.name, json.dumps(dict(e.static), sort_keys=True))
            for e in schema.entities.values()
        ]
        relationships = [
            (
                r.source,
                r.target,
                r.type,
                json.dumps(dict(r.attributes), sort_keys=True)
                if r.attributes is not None
                else None,
            )
            for r in schema.relationships
        ]
        now = self.started_ms
        records = chain.chain(
            [
                AuditEvent(
                    now,
                    "hub",
                    "hub_started",
                    config.twin_id,
                    {
                        "instance": instance,
                        "pid": os.getpid(),
                        "config": str(config.file),
                        "entities": len(declared),
                        "operators": sorted(config.operators),
                        "hub_epoch": epoch,
                    },
                ),
                *store.recovery_events(now),  # a damaged WAL was set aside (store.py)
            ]
        )
        metrics.store_recoveries += store.recovery is not None
        store.sync_declared(
            declared, relationships, {"twin_id": config.twin_id, "domain": config.domain}, records
        )
        chain.commit(records)
        self.ingest = IngestCore(
            config,
            store,
            state,
            tracker,
            registry,
            chain,
            metrics,
            next_frame_id=ids["frame"],
            clock=clock,
        )
        self.engine = DriftEngine(schema, config.drift, config.reconciliation, config.gateways, now)
        self.alarm_book = AlarmBook(
            [Alarm.from_row(row) for row in store.open_alarms()], ids["alarm"]
        )
        open_commands = [
            CommandRecord.from_row(row)
            for row in store.command_rows(OPEN_COMMANDS_SQL, limit=100_000)
        ]
        self.commands = CommandBook(open_commands, store.next_command_number())
        self.gate = RequestGate(config.operators, operator_registry, started_ms=now)
        self.gate.remember(store.live_nonces(now))
        self._open_events = store.open_drift_events()
        self._next_drift_id = ids["drift"]
        self._next_investigation = ids["investigation"]
        self._health = store.entity_health()
        self.models = predict.ModelBank(config)
        self.models.restore(store.load_models())
        # a stored model fitted on history a finding flags does not judge until refitted
        self._screen_models(now)

    # -- basics ----------------------------------------------------------------------------

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    @property
    def audit(self) -> AuditChain:
        return self.ingest.audit

    def _store(self, write: SyncWrite, events: Sequence[AuditEvent]) -> None:
        """One transaction: the write plus its audit records, chained now."""
        if self._fence is not None:
            # a worker commits changes to its entities only while it holds them
            entities = [str(a["entity"]) for a in write.alarms]
            entities += [str(e["entity"]) for e in write.drift_started]
            entities += list(write.health)
            entities += [str(c["entity"]) for c in write.commands]
            write.owners.update(self.owner_of(entity) for entity in entities)
        write.audit = self.audit.chain(events)
        self.store.write_sync(write)
        self.audit.commit(write.audit)

    def reserve_sequence(self) -> None:
        ceiling = self.signer.wanted_ceiling()
        if ceiling is not None:
            self.store.reserve_hub_seqs(ceiling)
            self.signer.raise_ceiling(ceiling)

    def close(self) -> None:
        try:
            write = SyncWrite(flush=self.ingest.flush_plan())
            self._store(
                write,
                [
                    AuditEvent(
                        self.now_ms(),
                        "hub",
                        "hub_stopped",
                        self.config.twin_id,
                        {"instance": self.instance},
                    )
                ],
            )
        except StoreError as exc:
            log.error("could not flush and audit the stop", extra=fields(error=str(exc)))
        self.store.close()

    # -- workers sharing the store (hub/workers.py) -----------------------------------------

    def share(self, fence: Fence) -> None:
        """Become one worker of several on this PostgreSQL store (``[workers]``).

        Values journaled by other workers are theirs to flush into ``current``, so the
        ones this worker loaded at start are not marked for its flush."""
        from fieldtwin.hub.store_pg import PgTwinStore

        store = self.store
        if not isinstance(store, PgTwinStore):
            raise StoreError("[workers] needs a PostgreSQL store ([hub] store = postgresql://...)")
        store.share(fence)
        self._shared = store
        self._fence = fence
        self.ingest.dirty_current.clear()
        self._next_block()
        # Commands are run by the owner of their gateway's partition: none until adopted.
        self.commands = CommandBook([], self.commands.next_number)
        for kind in ("alarm", "drift", "investigation", "command"):
            self._next_id_block(kind)
        self.models.refitted_ms = 0  # its own targets' models: fit when due from now on

    def _next_block(self) -> None:
        from fieldtwin.hub.store_pg import FRAME_BLOCK

        assert self._shared is not None
        first = self._shared.frame_block()
        self.ingest.next_frame_id = first
        self._block_end = first + FRAME_BLOCK

    def _next_id_block(self, kind: str) -> None:
        """Alarm, drift event and investigation numbers from a block of this worker's
        own, so workers sharing a store never write the same id."""
        from fieldtwin.hub.store_pg import ID_BLOCK

        assert self._shared is not None
        first = self._shared.id_block(kind)
        if kind == "alarm":
            self.alarm_book.next_number = first
        elif kind == "drift":
            self._next_drift_id = first
        elif kind == "command":
            self.commands.next_number = first
        else:
            self._next_investigation = first
        self._id_block_end[kind] = first + ID_BLOCK

    def _reserve_ids(self, wanted: int) -> None:
        """Before a cycle: room in each id block for ``wanted`` new numbers."""
        if self._shared is None:
            return
        next_of = {
            "alarm": self.alarm_book.next_number,
            "drift": self._next_drift_id,
            "investigation": self._next_investigation,
            "command": self.commands.next_number,
        }
        for kind, end in self._id_block_end.items():
            if next_of[kind] + wanted >= end:
                self._next_id_block(kind)

    def owner_of(self, entity: str) -> str:
        """The gateway whose partition owner evaluates ``entity``: a gateway's own
        findings (``temporal.gateway_silent``) go with the gateway, an entity with its
        declared gateway, else the one reporting it."""
        return entity if entity in self.config.gateways else self.engine.gateway_of(entity)

    def evaluates(self, entity: str) -> bool:
        """Whether this hub computes drift and alarms for ``entity``: always, unless it
        is a worker and the entity's gateway is in a partition it has not adopted."""
        fence = self._fence
        return fence is None or fence.owns(self.owner_of(entity))

    def adopt(self, gateways: Sequence[str]) -> None:
        """Take over gateways whose partitions this worker just claimed: their links and
        delivery tracker as committed by whoever held them, before any frame of theirs is
        processed or acknowledged here; their frame ids from a fresh, higher block."""
        store = self._shared
        if store is None or not gateways:
            return
        links, tracker = store.load_gateways(gateways)
        ingest = self.ingest
        mine = ingest.tracker.to_dict()
        theirs = tracker.to_dict()["senders"]
        for gateway in gateways:
            mine["senders"].pop(gateway, None)
            if gateway in theirs:
                mine["senders"][gateway] = theirs[gateway]
            if gateway in links:
                ingest.state.gateways[gateway] = links[gateway]
            ingest.pending_births.pop(gateway, None)
            ingest.gap_since.pop(gateway, None)
            self._ack_pending.pop(gateway, None)
        ingest.tracker = DeliveryTracker.from_dict(mine)
        self._next_block()
        self._adopt_drift(set(gateways))

    def release(self, gateways: Sequence[str]) -> None:
        """Partitions lost: their commands are the new owner's to run."""
        self.commands.drop(set(gateways))

    def _adopt_drift(self, gateways: set[str]) -> None:
        """Take over the drift state of the entities of ``gateways`` as their previous
        evaluator stored it: current values (its flushes), open alarms, open drift events
        and health, so the first cycle goes on from there instead of raising again."""
        store = self._shared
        assert store is not None

        def adopted(entity: str) -> bool:
            return self.owner_of(entity) in gateways

        state = self.ingest.state
        for row in store.flushed_current_rows():
            entity, attribute, kind, num, txt, ts_ms, quality, gateway, received, changed = row
            if gateway not in gateways and not adopted(entity):
                continue
            held = state.current.get((entity, attribute))
            if held is not None and (held.ts_ms, held.received_ms) >= (ts_ms, received):
                continue
            state.current[(entity, attribute)] = CurrentValue(
                decode_value(kind, num, txt), ts_ms, quality, gateway, received, changed
            )
            state.persisted.add((entity, attribute))
        self.alarm_book.adopt(
            [Alarm.from_row(row) for row in store.open_alarms() if adopted(str(row["entity"]))],
            adopted,
        )
        for key in [k for k in self._open_events if adopted(k[1])]:
            del self._open_events[key]
        self._open_events.update(
            {k: v for k, v in store.open_drift_events().items() if adopted(k[1])}
        )
        for entity, health in store.entity_health().items():
            if adopted(entity):
                self._health[entity] = health
        self.commands.adopt(
            [
                CommandRecord.from_row(row)
                for row in store.command_rows(
                    f"gateway = ANY(?::text[]) AND {OPEN_COMMANDS_SQL}",
                    [sorted(gateways)],
                    limit=100_000,
                )
            ],
            gateways,
        )
        # A gained gateway's heartbeats went to the previous owner: its silence is
        # measured from now at the earliest, unless the previous owner already found it
        # silent (that verdict stands until the gateway is heard).
        now = self.now_ms()
        for gateway in gateways:
            if ("temporal.gateway_silent", gateway, "") in self.alarm_book.open:
                self.engine.listening_since.pop(gateway, None)
            else:
                self.engine.listening_since[gateway] = now

    # -- ingest ----------------------------------------------------------------------------

    def ingest_batch(self, batch: list[Inbound]) -> tuple[IngestOutcome, Effects]:
        if self._shared is not None:
            # a fresh id block before this batch could run past the current one
            held = sum(len(p.received) for p in self.ingest.pending_births.values())
            if self.ingest.next_frame_id + len(batch) + held >= self._block_end:
                self._next_block()
        outcome = self.ingest.process(batch)
        tracker = self.ingest.tracker
        for gateway, epoch in outcome.ack_due.items():
            ranges = tracker.ranges(gateway, epoch)[-MAX_RANGES:]
            self._ack_pending[gateway] = (epoch, ranges)
        effects = Effects()
        if outcome.error is None and (outcome.cmd_results or outcome.births):
            effects.extend(self._after_ingest(outcome))
        return outcome, effects

    def take_acks(self) -> dict[str, tuple[int, list[tuple[int, int]]]]:
        pending, self._ack_pending = self._ack_pending, {}
        return pending

    def sign(self, body: AnyBody) -> bytes:
        return self.signer.sign(body, self.now_ms())

    def ack_frame(self, gateway: str, epoch: int, ranges: list[tuple[int, int]]) -> Outbound:
        body = Ack(to=gateway, epoch=epoch, ranges=tuple(ranges))
        return Outbound(downlink_topic(gateway, "ack"), self.sign(body))

    def rebirth_frame(self, gateway: str, reason: str) -> Outbound:
        return Outbound(
            downlink_topic(gateway, "rebirth"), self.sign(Rebirth(to=gateway, reason=reason))
        )

    def _after_ingest(self, outcome: IngestOutcome) -> Effects:
        """Command results, and commands to resend to a gateway that came back."""
        now = self.now_ms()
        book = self.commands
        result = Outcome()
        events: list[AuditEvent] = []
        for gateway, body, received_ms in outcome.cmd_results:
            try:
                result.extend(
                    book.result(
                        body.cmd_id, body.status, body.detail, body.readback, received_ms, gateway
                    )
                )
            except CommandError as exc:
                events.append(
                    AuditEvent(
                        received_ms,
                        gateway,
                        "cmd_result_unmatched",
                        body.cmd_id,
                        {"status": body.status, "why": str(exc)},
                    )
                )
        effects = Effects()
        for gateway in outcome.births:
            # A gateway that (re)connected may have died between write and answer: the same
            # signed frame goes again; the agent never writes a cmd_id twice and answers
            # with what it knows (the original result, or "outcome unknown").
            for command in book.active():
                if command.gateway == gateway and command.state == "sent":
                    frame = self._command_frame(command, now, resend=True)
                    effects.publish.append(frame)
                    book.resent(command.id, now)
                    events.append(
                        AuditEvent(
                            now,
                            "hub",
                            "command_resent",
                            command.id,
                            {"gateway": gateway, "why": "gateway reconnected without a result"},
                        )
                    )
        result.extend(self._settle(result, now))
        effects.extend(self._commit_commands(result, now, events))
        return effects

    # -- the sync cycle (drift, alarms, reconciliation) --------------------------------------

    def sync_cycle(self, now: int) -> tuple[DriftReport, Effects]:
        """Evaluate drift, move alarms, reconcile and store it all; then flush."""
        report, write, events, effects = self._evaluate(now)
        self._store(write, events)
        effects.gap_rebirths.extend(self.ingest.due_rebirths(now))
        self.last_report = report
        effects.extend(self.command_tick(now))
        self.reserve_sequence()
        return report, effects

    def flush(self) -> None:
        """Bring tracker snapshot, current table and gateway rows up to the journal."""
        flush = self.ingest.flush_plan()
        if flush is not None:
            self.store.write_sync(SyncWrite(flush=flush))
            self.ingest.flushed(flush)

    def note_action(self, action: tuple[int, str, str, str, str]) -> None:
        self._pending_actions.append(action)

    def _evaluate(self, now: int) -> tuple[DriftReport, SyncWrite, list[AuditEvent], Effects]:
        state = self.ingest.state
        report = self.engine.evaluate(state, now)
        owns: Callable[[str], bool] | None = None
        if self._fence is not None:
            # A worker: only the entities of its partitions are its to judge (the rest of
            # its state is other workers' and may be old).
            owns = self.evaluates
            report = DriftReport(
                report.checked_ms,
                [f for f in report.findings if owns(f.entity)],
                {e: h for e, h in report.health.items() if owns(e)},
                {g for g in report.silent_gateways if owns(g)},
                report.stale_attributes,
            )
            self._reserve_ids(len(report.findings) + len(self.alarm_book.open) + 1)
        transitions = self.alarm_book.reconcile(report.findings, now, owns)
        write = SyncWrite(checked_ms=now)
        events: list[AuditEvent] = []
        effects = Effects()
        write.actions.extend(self._pending_actions)
        self._pending_actions = []
        current = {f.key: f for f in report.findings}
        for key, finding in current.items():
            if key not in self._open_events:
                event_id = self._next_drift_id
                self._next_drift_id += 1
                self._open_events[key] = event_id
                write.drift_started.append(
                    {
                        "id": event_id,
                        "rule": finding.rule,
                        "drift_type": finding.type,
                        "entity": finding.entity,
                        "attribute": finding.attribute,
                        "severity": finding.severity,
                        "strategy": finding.strategy,
                        "description": finding.description,
                        "detected_ms": finding.since_ms,
                    }
                )
                if finding.strategy == "ignore":
                    events.append(
                        AuditEvent(
                            now, "hub", "drift_recorded", finding.entity, _finding_detail(finding)
                        )
                    )
        for key in [k for k in self._open_events if k not in current]:
            if owns is not None and not owns(key[1]):
                continue  # another worker's
            write.drift_cleared.append((self._open_events.pop(key), now))
            if owns is not None:
                write.owners.add(self.owner_of(key[1]))
        corrective = Outcome()
        for transition in transitions:
            write.alarms.append(transition.alarm.row())
            events.append(_alarm_event(transition))
            _log_alarm(transition)
            for action in planned_actions(transition):
                if action == "publish":
                    effects.publish.append(
                        Outbound(ALARM_TOPIC, _alarm_payload(transition, self.instance))
                    )
                elif action == "rebirth":
                    gateway = transition.alarm.gateway or self.engine.gateway_of(
                        transition.alarm.entity
                    )
                    if gateway in self.config.gateways:
                        effects.rebirths.append(
                            (
                                gateway,
                                f"resync: {transition.alarm.rule} on {transition.alarm.entity}",
                                transition.alarm.entity,
                            )
                        )
                elif action == "propose":
                    corrective.extend(self._propose_corrections(transition, now, write))
                elif action == "investigate":
                    self._investigate(transition, now, write, events)
        changed = {e: h for e, h in report.health.items() if self._health.get(e) != h}
        if changed:
            write.health = changed
            for entity, health in sorted(changed.items()):
                events.append(
                    AuditEvent(
                        now,
                        "hub",
                        "health_changed",
                        entity,
                        {"from": self._health.get(entity, "unknown"), "to": health},
                    )
                )
            self._health.update(changed)
        if corrective.transitions:
            corrective.extend(self._settle(corrective, now))
            self._command_write(corrective, write, events)
            effects.publish.extend(self._send_due(corrective.send, now, write, events))
        return report, write, events, effects

    def _propose_corrections(self, transition: Transition, now: int, write: SyncWrite) -> Outcome:
        """An ``auto_correct`` alarm: entities with ``desired`` values that differ from the
        reported ones get corrective commands, which enter the command lifecycle."""
        alarm = transition.alarm
        declared = self.config.schema.entities.get(alarm.entity)
        out = Outcome()
        if declared is None or not declared.desired:
            return out
        state = self.ingest.state
        in_flight = self.commands.in_flight()
        for attribute, desired in sorted(declared.desired.items()):
            current = state.current.get((alarm.entity, attribute))
            value = current.value if current is not None else None
            if value == desired or (
                numeric(value) is not None
                and numeric(desired) is not None
                and abs((numeric(value) or 0) - (numeric(desired) or 0)) < 1e-9
            ):
                continue
            if (alarm.entity, attribute) in in_flight:
                continue
            auto = self.config.reconciliation.auto_execute(
                alarm.rule, declared.type, alarm.entity, alarm.attribute
            )
            proposed = self._propose(
                alarm.entity,
                attribute,
                desired,
                reason=f"auto_correct for {alarm.rule}: {alarm.description}",
                actor="hub",
                source="reconciliation",
                now=now,
                alarm_id=alarm.id,
                approvals=0 if auto else None,
            )
            out.extend(proposed)
            command = proposed.transitions[-1].command
            write.actions.append(
                (
                    now,
                    alarm.entity,
                    f"proposed command {command.id}: {attribute} := {desired} "
                    f"({label(command.state)})",
                    "failed" if command.state == "refused" else "success",
                    command.id,
                )
            )
        return out

    def _investigate(
        self, transition: Transition, now: int, write: SyncWrite, events: list[AuditEvent]
    ) -> None:
        alarm = transition.alarm
        state = self.ingest.state
        schema = self.config.schema
        related = sorted(
            {r.target for r in schema.relationships if r.source == alarm.entity}
            | {r.source for r in schema.relationships if r.target == alarm.entity}
        )

        def attributes_of(entity: str) -> dict[str, Any]:
            return {
                attr: {"value": cur.value, "ts_ms": cur.ts_ms, "quality": cur.quality}
                for (ent, attr), cur in sorted(state.current.items())
                if ent == entity
            }

        gateway = alarm.gateway or self.engine.gateway_of(alarm.entity)
        link = state.gateways.get(gateway)
        recent: list[dict[str, Any]] = []
        if alarm.attribute:
            recent = queries.history(self.store, alarm.entity, alarm.attribute, 0, now, limit=20)
        snapshot = {
            "finding": transition.finding and _finding_detail(transition.finding),
            "entity": {"id": alarm.entity, "attributes": attributes_of(alarm.entity)},
            "related": {entity: attributes_of(entity) for entity in related},
            "relationships": [
                {"source": r.source, "target": r.target, "type": r.type}
                for r in schema.relationships
                if alarm.entity in (r.source, r.target)
            ],
            "gateway": None
            if link is None
            else {
                "id": link.gateway,
                "online": link.online,
                "epoch": link.epoch,
                "last_frame_ms": link.last_frame_ms,
                "last_birth_ms": link.last_birth_ms,
            },
            "recent_history": recent,
            "open_alarms": [a.row() for a in self.alarm_book.open.values()],
        }
        investigation_id = f"I-{self._next_investigation:06d}"
        self._next_investigation += 1
        write.investigations.append(
            {
                "id": investigation_id,
                "opened_ms": now,
                "alarm_id": alarm.id,
                "rule": alarm.rule,
                "entity": alarm.entity,
                "attribute": alarm.attribute,
                "description": alarm.description,
                "status": "open",
                "snapshot": snapshot,
            }
        )
        write.actions.append(
            (
                now,
                alarm.entity,
                f"opened investigation {investigation_id}",
                "success",
                investigation_id,
            )
        )
        events.append(
            AuditEvent(
                now,
                "hub",
                "investigation_opened",
                alarm.entity,
                {"investigation": investigation_id, "alarm": alarm.id},
            )
        )

    # -- commands ---------------------------------------------------------------------------

    def _gateway_status(self, gateway: str | None) -> GatewayStatus | None:
        if not gateway:
            return None
        link = self.ingest.state.gateways.get(gateway)
        silent = self.last_report.silent_gateways if self.last_report else set()
        if link is None or link.last_frame_ms == 0:
            return GatewayStatus(gateway, False, "it has never connected")
        if not link.online:
            since = queries.iso(link.death_ms) or "?"
            why = f" ({link.death_reason})" if link.death_reason else ""
            return GatewayStatus(gateway, False, f"disconnected since {since}{why}")
        if gateway in silent:
            return GatewayStatus(gateway, False, f"silent since {queries.iso(link.last_frame_ms)}")
        return GatewayStatus(gateway, True)

    def _policy_input(self, gateway: str | None) -> PolicyInput:
        state = self.ingest.state
        engine = self.engine

        def stale_after(entity: str, attribute: str) -> int:
            point = state.points.get((entity, attribute))
            return engine.stale_after_ms(
                self.config.schema.spec(entity, attribute),
                point.interval_ms if point is not None else None,
            )

        return PolicyInput(
            schema=self.config.schema,
            current=self._policy_current(),
            dtypes={key: point.dtype for key, point in state.points.items()},
            stale_after_ms=stale_after,
            gateway=self._gateway_status(gateway),
            in_flight=self.commands.in_flight(),
            now_ms=self.now_ms(),
        )

    def _policy_current(self) -> Mapping[tuple[str, str], CurrentValue]:
        """Current values for interlocks: this hub's; on a worker, its own entities' from
        memory and other workers' from the shared ``current`` table (at most about one
        flush interval old), never its own stale copies of theirs."""
        state = self.ingest.state
        if self._shared is None:
            return state.current
        merged = dict(state.current)
        for row in self._shared.flushed_current_rows():
            entity, attribute, kind, num, txt, ts_ms, quality, gateway, received, changed = row
            if not self.evaluates(entity):
                merged[(entity, attribute)] = CurrentValue(
                    decode_value(kind, num, txt), ts_ms, quality, gateway, received, changed
                )
        return merged

    def _gateway_of(self, entity: str) -> str | None:
        declared = self.config.schema.entities.get(entity)
        if declared is None:
            return None
        return declared.gateway or self.engine.gateway_of(entity) or None

    def dry_run(self, entity: str, attribute: str, value: Value) -> dict[str, Any]:
        """The verdict and checkpoint a proposal would get now, without proposing."""
        gateway = self._gateway_of(entity)
        verdict = check_command(entity, attribute, value, self._policy_input(gateway))
        checkpoint = self._checkpoint(entity, attribute, self.now_ms())
        spec = self.config.schema.spec(entity, attribute)
        params = RuleParams.of(spec) if spec is not None and spec.writable else None
        return {
            "entity": entity,
            "attribute": attribute,
            "value": value,
            "gateway": gateway,
            "allowed": verdict.ok,
            "policy": verdict.rows(),
            "summary": verdict.summary(),
            "checkpoint": None if checkpoint is None else _checkpoint_row(checkpoint),
            "approvals_required": params.approvals if params else None,
            "two_person": params.two_person if params else None,
            "limits": None
            if spec is None
            else {"min": spec.min, "max": spec.max, "unit": spec.unit},
            **(self._prediction(entity, attribute, value) if verdict.ok else {}),
        }

    def _prediction(self, entity: str, attribute: str, value: Value) -> dict[str, Any]:
        """The predicted effect of holding ``value`` (dry run, approval): empty when no
        model depends on the attribute, the reason when the models cannot say."""
        if not self.config.prediction.enabled or isinstance(value, bool | str) or value is None:
            return {}
        if not self.models.downstream([(entity, attribute)]):
            return {}
        self._shared_models()
        try:
            result = predict.simulate(
                self.models,
                self._predict_context(),
                {f"{entity}.{attribute}": float(value)},
                round(self.config.prediction.horizon_s * 1000),
                fit_missing=False,  # a dry run or approval never waits for a fit
            )
        except predict.PredictionError as exc:
            return {"prediction_unavailable": str(exc)}
        summary = predict.effect_summary(result)
        if not summary:
            reasons = [e.get("untrusted") or e.get("error") for e in result["effects"]]
            return {"prediction_unavailable": "; ".join(sorted({r for r in reasons if r}))}
        return {"prediction": summary}

    def _predict_context(self) -> predict.Context:
        return predict.Context(self.store, self.config, self.now_ms())

    # -- prediction (hub/predict.py) ---------------------------------------------------------

    def predict(self, target: str, horizon: str = "", at: str = "") -> dict[str, Any]:
        self._queried()
        self._shared_models()
        now = self.now_ms()
        horizon_ms = (
            queries.parse_duration_ms(horizon)
            if horizon
            else round(self.config.prediction.horizon_s * 1000)
        )
        at_ms = queries.parse_time(at, now) if at else None
        return predict.forecast(self.models, self._predict_context(), target, horizon_ms, at_ms)

    def simulate(self, sets: Mapping[str, float], horizon: str = "") -> dict[str, Any]:
        self._queried()
        self._shared_models()
        horizon_ms = (
            queries.parse_duration_ms(horizon)
            if horizon
            else round(self.config.prediction.horizon_s * 1000)
        )
        result = predict.simulate(self.models, self._predict_context(), sets, horizon_ms)
        result["policy"] = {}
        for point, value in result["set"].items():
            entity, attribute = predict.parse_point(point)
            typed: Value = int(value) if float(value).is_integer() else value
            verdict = check_command(
                entity, attribute, typed, self._policy_input(self._gateway_of(entity))
            )
            result["policy"][point] = {
                "allowed": verdict.ok,
                "summary": verdict.summary(),
                "checks": verdict.rows(),
            }
        return result

    def risk(self, horizon: str = "") -> dict[str, Any]:
        """The forecasted risk; by default until the next sync (``predict.sync_horizon_s``)."""
        self._shared_models()
        horizon_ms = queries.parse_duration_ms(horizon) if horizon else None
        return predict.risk(self.models, self._predict_context(), horizon_ms)

    def model_list(self) -> list[dict[str, Any]]:
        self._shared_models()
        return predict.model_rows(self.models)

    def models_due(self, now: int) -> bool:
        return self.config.prediction.enabled and self.models.due(now)

    def install_models(
        self, fitted: Mapping[str, Any], errors: Mapping[str, str], now: int
    ) -> None:
        self.models.install(self.store, fitted, errors, now)

    def fit_models(self, history: FitHistory, now: int) -> tuple[dict[str, Any], dict[str, str]]:
        """Fit the models (pure CPU: the runtime calls this on a worker thread). A worker
        keeps the fits of its own entities' targets only; the other workers fit and
        store theirs, and it reads those from the store (``_shared_models``). (It still
        fits every target and drops the rest: simpler, and costs CPU only.)"""
        fitted, errors = self.models.fit_all(history, now)
        if self._fence is None:
            return fitted, errors

        def mine(target: str) -> bool:
            return self.evaluates(target.rpartition(".")[0])

        return (
            {t: m for t, m in fitted.items() if mine(t)},
            {t: e for t, e in errors.items() if mine(t)},
        )

    def _shared_models(self) -> None:
        """On a worker: the other workers' models, as they stored them (every 5 s at
        most), for forecasts, what-ifs, risk and model drift that chain across them."""
        if self._fence is None:
            return
        now = self.now_ms()
        if now - self._models_read_ms < 5000:
            return
        self._models_read_ms = now
        refitted = self.models.refitted_ms  # this worker's own refit schedule
        self.models.restore(
            row
            for row in self.store.load_models()
            if not self.evaluates(str(row.get("target", "")).rpartition(".")[0])
        )
        self.models.refitted_ms = refitted

    def measure_models(self, now: int) -> int:
        """Recompute the models' sustained misses for the drift engine; returns how many."""
        self._shared_models()
        if not self.config.prediction.enabled or not self.models.models:
            self.engine.model_misses = {}
            return 0
        flagged = self._screen_models(now)
        window = self.models.recent_window_ms()
        times, grids = predict.load_grids(
            self.store, self.models.all_points(), now - window, now, self.models.step_ms
        )
        # a window that reaches into flagged history is not judged: a model run from a
        # stuck reading misses the recovered one, an echo of the fault, not a new one
        recent = predict.exclude(times, grids, flagged)
        self.engine.model_misses = self.models.misses(recent, now, self._watched_from())
        return len(self.engine.model_misses)

    def _watched_from(self) -> dict[str, int]:
        """Per modelled point, since when this hub has watched it without a break: its
        own start, or its gateway's last birth (a reconnect, an agent restart) if later."""
        out: dict[str, int] = {}
        for point in self.models.all_points():
            link = self.ingest.state.gateways.get(self.engine.gateway_of(point[0]))
            birth = link.last_birth_ms if link is not None else 0
            out[predict.label(point)] = max(self.started_ms, birth)
        return out

    def _screen_models(self, now: int) -> tuple[Flagged, ...]:
        """The flagged spans over every model's fit window, and the models they make
        suspect (``ModelBank.screen``)."""
        if not self.config.prediction.enabled or not self.models.models:
            self.models.suspect = {}
            return ()
        flagged = predict.load_flagged(
            self.store,
            self.config,
            self.models.all_points(),
            self.models.screen_window_ms(now),
            now,
        )
        self.models.screen(flagged)
        return flagged

    def _checkpoint(self, entity: str, attribute: str, now: int) -> Checkpoint | None:
        current = self.ingest.state.current.get((entity, attribute))
        if current is None:
            return None
        return Checkpoint(
            current.value,
            current.ts_ms,
            current.quality,
            snapshot_hash(self.ingest.state.snapshot_values()),
            now,
        )

    def _propose(
        self,
        entity: str,
        attribute: str,
        value: Value,
        *,
        reason: str,
        actor: str,
        source: str,
        now: int,
        request: str = "",
        alarm_id: str | None = None,
        approvals: int | None = None,
    ) -> Outcome:
        gateway = self._gateway_of(entity)
        verdict = check_command(entity, attribute, value, self._policy_input(gateway))
        spec = self.config.schema.spec(entity, attribute)
        params = RuleParams.of(spec) if spec is not None else _default_params()
        if approvals is not None:
            params = RuleParams(
                approvals,
                params.two_person,
                params.tolerance,
                params.verify_timeout_ms,
                params.select_window_ms,
                params.approval_timeout_ms,
                params.expiry_ms,
                params.rollback,
            )
        checkpoint = self._checkpoint(entity, attribute, now) if verdict.ok else None
        return self.commands.propose(
            gateway=gateway or "",
            entity=entity,
            attribute=attribute,
            value=value,
            reason=reason,
            actor=actor,
            source=source,
            params=params,
            verdict=verdict,
            checkpoint=checkpoint,
            now_ms=now,
            request=request,
            alarm_id=alarm_id,
        )

    def _settle(self, outcome: Outcome, now: int) -> Outcome:
        """Plan the rollbacks an outcome asks for (each through the policy), repeatedly."""
        extra = Outcome()
        pending = list(outcome.rollbacks)
        while pending:
            parent = self.commands.get(pending.pop(0))
            spec = self.config.schema.spec(parent.entity, parent.attribute)
            params = RuleParams.of(spec) if spec is not None else _default_params()
            assert parent.checkpoint is not None
            verdict = check_command(
                parent.entity,
                parent.attribute,
                parent.checkpoint.value,
                self._policy_input(parent.gateway),
                rollback_of=parent.id,
            )
            step = self.commands.propose_rollback(parent.id, verdict, now, params)
            extra.extend(step)
            pending.extend(step.rollbacks)
        return extra

    def _command_write(self, outcome: Outcome, write: SyncWrite, events: list[AuditEvent]) -> None:
        for transition in outcome.transitions:
            command = transition.command
            write.commands.append(command.row())
            detail = {
                "before": transition.before,
                "after": transition.after,
                "request": transition.request,
                **{k: _plain(v) for k, v in transition.detail.items()},
            }
            write.command_events.append(
                (
                    command.id,
                    transition.at_ms,
                    transition.change,
                    transition.before,
                    transition.after,
                    transition.actor,
                    transition.request,
                    json.dumps(detail, default=str, sort_keys=True),
                )
            )
            events.append(
                AuditEvent(
                    transition.at_ms,
                    transition.actor,
                    f"command_{transition.change}",
                    command.id,
                    {
                        "point": f"{command.entity}.{command.attribute}",
                        "value": _plain(command.value),
                        **detail,
                    },
                )
            )
            log.info(
                "command " + transition.change.replace("_", " "),
                extra=fields(
                    cmd=command.id,
                    point=f"{command.entity}.{command.attribute}",
                    value=command.value,
                    state=command.state,
                    actor=transition.actor,
                    outcome=command.outcome or None,
                ),
            )

    def _command_frame(self, command: CommandRecord, now: int, *, resend: bool = False) -> Outbound:
        expires = (
            command.expires_at_ms if resend and command.expires_at_ms else now + command.expiry_ms
        )
        restore = command.checkpoint.value if command.checkpoint is not None else None
        body = Command(
            to=command.gateway,
            cmd_id=command.id,
            entity=command.entity,
            attribute=command.attribute,
            value=command.value,
            expires_at_ms=expires,
            approvals=tuple(a.approval() for a in command.approvals),
            reason=command.reason[:4096],
            restore_value=restore,
            rollback_of=command.rollback_of or "",
            rollback_from=command.rollback_from,
        )
        return Outbound(downlink_topic(command.gateway, "cmd"), self.sign(body))

    def _send_due(
        self, ids: Sequence[str], now: int, write: SyncWrite, events: list[AuditEvent]
    ) -> list[Outbound]:
        """Send approved commands, re-checking the policy first (select-before-operate)."""
        frames: list[Outbound] = []
        for command_id in ids:
            command = self.commands.commands.get(command_id)
            if command is None or command.state != "approved":
                continue
            verdict = check_command(
                command.entity,
                command.attribute,
                command.value,
                _without_self(self._policy_input(command.gateway), command),
                rollback_of=command.rollback_of or "",
            )
            outcome = Outcome()
            offline = any(c.name == "gateway" and not c.ok for c in verdict.checks)
            if offline:
                # wait for the gateway within the select window (its inputs go stale
                # while it is away; they are judged when it is back)
                command.policy = verdict.rows()
                continue
            hard = [c for c in verdict.checks if not c.ok]
            # The restore value was approved with the command: if the point moved since,
            # the approvals no longer describe what the command would undo.
            moved = self._checkpoint_moved(command)
            if moved:
                hard.append(_check("checkpoint", moved))
            if hard:
                outcome.extend(self.commands.send_refused(command.id, Verdict(tuple(hard)), now))
            else:
                frame = self._command_frame(command, now)
                expires = now + command.expiry_ms
                outcome.extend(self.commands.sent(command.id, expires, now))
                frames.append(frame)
            outcome.extend(self._settle(outcome, now))
            self._command_write(outcome, write, events)
        return frames

    def _checkpoint_moved(self, command: CommandRecord) -> str:
        if command.checkpoint is None or command.rollback_of:
            return ""
        current = self.ingest.state.current.get(command.key)
        if current is None:
            return ""
        from fieldtwin.hub.policy import within_tolerance

        if within_tolerance(current.value, command.checkpoint.value, command.tolerance):
            return ""
        return (
            f"{command.entity}.{command.attribute} moved from the approved restore point "
            f"{command.checkpoint.value!r} to {current.value!r}; propose it again"
        )

    def _commit_commands(
        self, outcome: Outcome, now: int, events: list[AuditEvent] | None = None
    ) -> Effects:
        """Store an outcome's transitions (and send what became approved) in one write."""
        write = SyncWrite()
        audit = list(events or [])
        self._command_write(outcome, write, audit)
        effects = Effects()
        effects.publish.extend(self._send_due(outcome.send, now, write, audit))
        if write.commands or audit:
            self._store(write, audit)
        self.commands.forget_settled()
        return effects

    def command_tick(self, now: int | None = None) -> Effects:
        """Expiries, sends waiting for a gateway, verification and rollbacks."""
        now = self.now_ms() if now is None else now
        state = self.ingest.state
        self._reserve_ids(len(self.commands.commands) + 1)  # rollbacks take numbers

        def observe(entity: str, attribute: str) -> CurrentValue | None:
            return state.current.get((entity, attribute))

        outcome = self.commands.tick(now, observe)
        outcome.extend(self._settle(outcome, now))
        outcome.send.extend(c.id for c in self.commands.due())
        if not outcome.transitions and not outcome.send:
            return Effects()
        return self._commit_commands(outcome, now)

    # -- operator requests ------------------------------------------------------------------

    def handle_request(self, topic: str, payload: bytes) -> Effects:
        """One message from the operator channel: verify, authorise, act, answer, audit."""
        now = self.now_ms()
        effects = Effects()
        if self._fence is not None and not self.answers(payload):
            return effects  # another worker's to answer
        try:
            request = self.gate.admit(topic, payload, now)
        except OperatorRefused as exc:
            operator = self.gate.topic_operator(topic)
            self._refused(operator or "?", topic, exc, now, None)
            if operator is not None and exc.code not in ("bad_topic",):
                req_id = _peek_req_id(payload)
                effects.publish.append(self._answer(operator, req_id, exc.code, str(exc), None))
            return effects
        spec = OPERATIONS.get(request.op)
        try:
            if spec is None:
                raise OperatorRefused(
                    f"unknown operation {request.op!r} (known: {', '.join(sorted(OPERATIONS))})",
                    code="invalid",
                )
            self.gate.authorize(request, spec.permission)
            if self._fence is not None:
                self._worker_check(request, spec)
            result = spec.handler(self, request, request.request.args, now)
        except OperatorRefused as exc:
            self._refused(request.operator, topic, exc, now, request)
            effects.publish.append(
                self._answer(request.operator, request.req_id, exc.code, str(exc), None)
            )
            return effects
        except (CommandError, AlarmError, QueryError, ProtocolError) as exc:
            code = getattr(
                exc,
                "code",
                "invalid" if isinstance(exc, QueryError | ProtocolError) else "conflict",
            )
            if spec is not None and spec.mutating:
                self._refused(
                    request.operator, topic, OperatorRefused(str(exc), code=code), now, request
                )
            effects.publish.append(
                self._answer(request.operator, request.req_id, code, str(exc), None)
            )
            return effects
        if isinstance(result, _Answered):
            effects.extend(result.effects)
            answer: Any = result.answer
        else:
            answer = result
        # frames to gateways first (they are what the operator is waiting for), then the answer
        effects.publish.append(self._answer(request.operator, request.req_id, "", "", answer))
        return effects

    def answers(self, payload: bytes) -> bool:
        """On a worker: whether this worker answers an operator request. Every worker
        receives every request; exactly one (while leases are stable) answers it: for
        an alarm action the owner of the alarm's entity, whose alarm book counts; for
        anything else the holder of the partition the request's bytes hash to. The
        choice reads the request unverified: it only routes, the chosen worker
        verifies everything."""
        import zlib

        fence = self._fence
        if fence is None:
            return True
        store = self._shared
        assert store is not None
        op, args = _peek_op(payload)
        alarm_id, cmd_id, target = args.get("alarm_id"), args.get("cmd_id"), args.get("target")
        if op.startswith("alarm.") and isinstance(alarm_id, str):
            held = self.alarm_book.by_id.get(alarm_id)
            if held is not None and self.evaluates(held.entity):
                return True
            rows = store.alarm_rows("id = ?", [alarm_id[:64]])
            if rows:
                return self.evaluates(str(rows[0]["entity"]))
        elif op in ("cmd.propose", "cmd.dry_run") and isinstance(target, str) and "." in target:
            return self.evaluates(target.rpartition(".")[0])
        elif op.startswith("view."):
            return self.view_leader()
        elif op.startswith("cmd.") and isinstance(cmd_id, str):
            command = self.commands.commands.get(cmd_id)
            if command is not None:
                return self.evaluates(command.entity)
            commands = store.command_rows("id = ?", [cmd_id[:64]], limit=1)
            if commands:
                return self.evaluates(str(commands[0]["entity"]))
        return zlib.crc32(payload) % fence.partitions in fence.held

    def _worker_check(self, request: VerifiedRequest, spec: Operation) -> None:
        """On a worker: room for new ids, and refuse a mutating request another worker
        already stored (its nonce is in the shared store)."""
        store = self._shared
        assert store is not None
        self._reserve_ids(2)
        if spec.mutating and store.nonce_used(request.operator, request.req_id):
            raise OperatorRefused(
                f"request {request.req_id} was already received (a replay)", code="replay"
            )

    def _answer(self, operator: str, req_id: str, code: str, error: str, result: Any) -> Outbound:
        body = OperatorResponse(
            to=operator,
            req_id=req_id or "unknown",
            ok=not code,
            code=code,
            error=error[:4096],
            result=_plain(result),
        )
        return Outbound(operator_response_topic(operator), self.sign(body))

    def _refused(
        self,
        operator: str,
        topic: str,
        exc: OperatorRefused,
        now: int,
        request: VerifiedRequest | None,
    ) -> None:
        """Refusals are audited like acceptances (at most 60 per operator, reason, minute)."""
        self.metrics.operator_refused[exc.code] += 1
        window = now // 60_000
        key = (operator, exc.code, window)
        self._refusal_counts[key] += 1
        if len(self._refusal_counts) > 10_000:
            self._refusal_counts = Counter(
                {k: v for k, v in self._refusal_counts.items() if k[2] == window}
            )
        count = self._refusal_counts[key]
        if count > 60:
            return
        detail: dict[str, Any] = {"code": exc.code, "why": str(exc)[:500], "topic": topic[:200]}
        if request is not None:
            detail["request"] = request.signature_ref
            detail["op"] = request.op
        if count == 60:
            detail["note"] = "further refusals of this kind are counted, not audited, this minute"
        try:
            self._store(
                SyncWrite(), [AuditEvent(now, operator, "operator_refused", operator, detail)]
            )
        except StoreError as exc2:
            log.error("could not audit a refusal", extra=fields(error=str(exc2)))
        log.warning(
            "operator request refused",
            extra=fields(operator=operator, code=exc.code, why=str(exc)[:300]),
        )

    def _accepted(
        self,
        request: VerifiedRequest,
        write: SyncWrite,
        events: list[AuditEvent],
        now: int,
        subject: str,
    ) -> None:
        """A mutating request is audited and its nonce persisted with what it changed."""
        self.metrics.operator_requests[request.op] += 1
        write.nonces.append(
            (request.operator, request.req_id, request.op, request.request.expires_at_ms, now)
        )
        events.insert(
            0,
            AuditEvent(
                now,
                request.operator,
                "operator_request",
                subject,
                {
                    "op": request.op,
                    "request": request.signature_ref,
                    "args": _plain(_redacted(request.request.args)),
                },
            ),
        )

    # operations --------------------------------------------------------------------------

    def op_whoami(self, request: VerifiedRequest, args: Mapping[str, Any], now: int) -> Any:
        spec = self.config.operators[request.operator]
        granted = permissions(spec.roles)
        ops = sorted(
            name for name, op in OPERATIONS.items() if "*" in granted or op.permission in granted
        )
        return {
            "operator": spec.id,
            "name": spec.name,
            "roles": sorted(spec.roles),
            "operations": ops,
            "hub": {"twin_id": self.config.twin_id, "instance": self.instance},
        }

    def op_propose(self, request: VerifiedRequest, args: Mapping[str, Any], now: int) -> Any:
        if args.get("dry_run"):
            return self.op_dry_run(request, args, now)
        entity, attribute = _target(args)
        value = _value(args)
        reason = _text(args, "reason")
        outcome = self._propose(
            entity,
            attribute,
            value,
            reason=reason,
            actor=request.operator,
            source="operator",
            now=now,
            request=request.signature_ref,
        )
        command = outcome.transitions[-1].command
        return self._operator_commit(request, outcome, now, command.id, answer=None)

    def op_dry_run(self, request: VerifiedRequest, args: Mapping[str, Any], now: int) -> Any:
        entity, attribute = _target(args)
        return self.dry_run(entity, attribute, _value(args))

    def op_approve(self, request: VerifiedRequest, args: Mapping[str, Any], now: int) -> Any:
        command_id = _text(args, "cmd_id")
        command = self.commands.get(command_id)
        signature = args.get("signature")
        key_id = args.get("key_id")
        if not isinstance(signature, bytes) or not isinstance(key_id, str):
            raise CommandError(
                "approve needs signature (bytes) and key_id: the approver signs the command's "
                "digest with their own key",
                code="invalid",
            )
        approval = Approval(request.operator, key_id, signature)
        try:
            key = self.gate.registry.lookup(request.operator, key_id)
        except ProtocolError:
            raise CommandError(
                f"key {key_id} is not registered for {request.operator}", code="forbidden"
            ) from None
        try:
            verify_approval(approval, key, bytes.fromhex(command.digest))
        except BadSignature:
            raise CommandError(
                f"the approval does not sign {command_id}'s digest {command.digest[:16]}…: "
                "the command may have changed since it was shown; show it again",
                code="invalid",
            ) from None
        record = ApprovalRecord(request.operator, key_id, signature, now, request.signature_ref)
        outcome = self.commands.approve(
            command_id, request.operator, record, now, request.signature_ref
        )
        return self._operator_commit(request, outcome, now, command_id, answer=None)

    def op_reject(self, request: VerifiedRequest, args: Mapping[str, Any], now: int) -> Any:
        command_id = _text(args, "cmd_id")
        outcome = self.commands.reject(
            command_id, request.operator, _text(args, "reason"), now, request.signature_ref
        )
        return self._operator_commit(request, outcome, now, command_id, answer=None)

    def op_cancel(self, request: VerifiedRequest, args: Mapping[str, Any], now: int) -> Any:
        command_id = _text(args, "cmd_id")
        command = self.commands.get(command_id)
        if command.proposed_by != request.operator and "admin" not in request.roles:
            raise OperatorRefused(
                f"{command_id} was proposed by {command.proposed_by}; only they or an admin may "
                "cancel it (an approver rejects instead)",
                code="forbidden",
            )
        outcome = self.commands.cancel(
            command_id, request.operator, _text(args, "reason"), now, request.signature_ref
        )
        return self._operator_commit(request, outcome, now, command_id, answer=None)

    def _operator_commit(
        self, request: VerifiedRequest, outcome: Outcome, now: int, subject: str, answer: Any
    ) -> _Answered:
        outcome.extend(self._settle(outcome, now))
        write = SyncWrite()
        events: list[AuditEvent] = []
        self._accepted(request, write, events, now, subject)
        self._command_write(outcome, write, events)
        effects = Effects()
        effects.publish.extend(self._send_due(outcome.send, now, write, events))
        self._store(write, events)
        return _Answered(effects, answer if answer is not None else self._command_view(subject))

    def op_alarm(self, request: VerifiedRequest, args: Mapping[str, Any], now: int) -> Any:
        alarm_id = _text(args, "alarm_id")
        reason = _text(args, "reason")
        book = self.alarm_book
        op = request.op
        if op == "alarm.ack":
            transition = book.acknowledge(alarm_id, request.operator, now, reason)
        elif op == "alarm.shelve":
            duration = args.get("duration")
            if not isinstance(duration, str):
                raise QueryError("shelving needs a duration such as 30m or 2h")
            until = now + queries.parse_duration_ms(duration)
            transition = book.shelve(alarm_id, request.operator, until, now, reason)
        else:
            transition = book.unshelve(alarm_id, request.operator, now, reason)
        write = SyncWrite(alarms=[transition.alarm.row()])
        events: list[AuditEvent] = []
        self._accepted(request, write, events, now, alarm_id)
        event = _alarm_event(transition)
        events.append(
            AuditEvent(
                event.ts_ms,
                event.actor,
                event.action,
                event.subject,
                {**event.detail, "request": request.signature_ref},
            )
        )
        _log_alarm(transition)
        self._store(write, events)
        row = transition.alarm.row()
        return _with_times(row)

    def op_query(self, request: VerifiedRequest, args: Mapping[str, Any], now: int) -> Any:
        op = request.op
        if op == "twin.entities":
            return self.entities(
                types=_texts(args, "types"),
                health=_texts(args, "health"),
                where=_texts(args, "where"),
                ids=_texts(args, "ids"),
            )
        if op == "twin.history":
            return self.history(
                _text(args, "entity"),
                _text(args, "attribute"),
                str(args.get("from", "1h")),
                str(args.get("to", "now")),
                _int(args, "limit", 1000),
            )
        if op == "twin.asof":
            return self.as_of(str(args.get("at", "now")))
        if op == "twin.diff":
            return self.diff(str(args.get("from", "5m")), str(args.get("to", "now")))
        if op == "twin.export":
            return self.export()
        if op == "alarm.list":
            return self.alarms(_texts(args, "states"))
        if op == "drift.list":
            return queries.open_drift(self.store)
        if op == "audit.tail":
            return self.audit_tail(_int(args, "limit", 50))
        if op == "audit.verify":
            return self.audit_verify()
        if op == "cmd.list":
            return self.command_list(_texts(args, "states"), _int(args, "limit", 100))
        if op == "cmd.show":
            return self.command_show(_text(args, "cmd_id"))
        if op == "hub.status":
            return self.status()
        if op == "twin.predict":
            return self.predict(
                _text(args, "target"), str(args.get("horizon", "")), str(args.get("at", ""))
            )
        if op == "twin.simulate":
            sets = args.get("set")
            if not isinstance(sets, Mapping) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in sets.values()
            ):
                raise OperatorRefused("set must map ENTITY.ATTRIBUTE to a number", code="invalid")
            return self.simulate(
                {str(k): float(v) for k, v in sets.items()}, str(args.get("horizon", ""))
            )
        if op == "twin.models":
            return self.model_list()
        if op == "twin.risk":
            return self.risk(str(args.get("horizon", "")))
        raise OperatorRefused(f"unknown query {op}", code="invalid")

    # -- console views (hub/views.py) --------------------------------------------------------

    def view_feed(self) -> ViewFeed:
        """The console feed (hub/views.py), created on first use."""
        from fieldtwin.hub.views import ViewFeed

        feed = self._view_feed
        if feed is None:
            feed = self._view_feed = ViewFeed(self)
        return feed

    def view_tick(self) -> list[Outbound]:
        """Signed view deltas since the last tick, for the runtime to publish (QoS 0).

        Of several workers only the view leader (the holder of partition 0) publishes,
        its view of the other workers' entities mirrored from the shared store; a worker
        that is not (or no longer) the leader drops its feed, so a later leadership
        starts fresh and consoles, seeing a new instance, take a new snapshot."""
        now = self.now_ms()
        if self._fence is not None:
            if not self.view_leader():
                self._view_feed = None
                return []
            if now - self._mirrored_ms >= MIRROR_INTERVAL_MS:
                self.mirror(now)
        return self.view_feed().tick(now)

    def view_leader(self) -> bool:
        """Whether this hub publishes the console views: a single hub always; of several
        workers the one holding partition 0 (every worker computes the same)."""
        fence = self._fence
        return fence is None or 0 in fence.held

    def visible_commands(self) -> Mapping[str, CommandRecord]:
        """Commands consoles see: this hub's book, plus (on a worker) the other workers'
        recent commands as last mirrored from the store."""
        if not self._command_mirror:
            return self.commands.commands
        return {**self._command_mirror, **self.commands.commands}

    def mirror(self, now: int) -> None:
        """The view leader's copy of what other workers own, from the shared store:
        attribute values newer than it holds, point metadata, gateway links, health,
        open alarms and recent commands. Nothing mirrored is judged here: drift, alarm
        and command decisions stay with each entity's owner."""
        store = self._shared
        assert store is not None
        self._mirrored_ms = now
        state = self.ingest.state
        mine = self.evaluates
        fresh: dict[tuple[str, str], CurrentValue] = {}
        for row in store.flushed_current_rows():
            entity, attribute, kind, num, txt, ts_ms, quality, gateway, received, changed = row
            if mine(entity):
                continue
            held = state.current.get((entity, attribute))
            if held is None or (held.ts_ms, held.received_ms) < (ts_ms, received):
                fresh[(entity, attribute)] = CurrentValue(
                    decode_value(kind, num, txt), ts_ms, quality, gateway, received, changed
                )
        state.current.update(fresh)  # the view feed sees these keys as changed
        points, links = store.points_and_links()
        state.points.update({(p.entity, p.attribute): p for p in points if not mine(p.entity)})
        fence = self._fence
        assert fence is not None
        for link in links:
            if not fence.owns(link.gateway):
                state.gateways[link.gateway] = link
        for entity, health in store.entity_health().items():
            if not mine(entity):
                self._health[entity] = health
        self.alarm_book.adopt(
            [Alarm.from_row(r) for r in store.open_alarms() if not mine(str(r["entity"]))],
            lambda entity: not mine(entity),
        )
        self.mirrored_silent = {
            alarm.entity
            for alarm in self.alarm_book.open.values()
            if alarm.rule == "temporal.gateway_silent"
            and alarm.state in ("active", "acknowledged", "shelved")
            and not mine(alarm.entity)
        }
        self._command_mirror = {
            c.id: c
            for c in map(CommandRecord.from_row, store.command_rows(limit=200))
            if not fence.owns(c.gateway)
        }

    def op_view_snapshot(self, request: VerifiedRequest, args: Mapping[str, Any], now: int) -> Any:
        return self.view_feed().snapshot(request.operator, args, now)

    def op_view_history(self, request: VerifiedRequest, args: Mapping[str, Any], now: int) -> Any:
        from fieldtwin.hub.views import HISTORY_BUCKETS, history_series

        self._queried()
        return history_series(
            self.store,
            _text(args, "entity"),
            _text(args, "attribute"),
            queries.parse_time(str(args.get("from", "1h")), now),
            queries.parse_time(str(args.get("to", "now")), now),
            _int(args, "buckets", HISTORY_BUCKETS),
        )

    # -- queries (API, CLI, consoles) --------------------------------------------------------

    def entities(
        self,
        *,
        types: Sequence[str] = (),
        health: Sequence[str] = (),
        where: Sequence[str] = (),
        ids: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        self._queried()
        return queries.current_entities(
            self.store,
            self.config,
            types=types,
            health=health,
            where=[queries.Predicate.parse(p) for p in where],
            entities=ids,
        )

    def history(
        self, entity: str, attribute: str, start: str, end: str, limit: int = 1000
    ) -> list[dict[str, Any]]:
        self._queried()
        now = self.now_ms()
        return queries.history(
            self.store,
            entity,
            attribute,
            queries.parse_time(start, now),
            queries.parse_time(end, now),
            limit,
        )

    def as_of(self, at: str) -> dict[str, dict[str, dict[str, Any]]]:
        self._queried()
        return queries.as_of(self.store, queries.parse_time(at, self.now_ms()))

    def diff(self, start: str, end: str) -> list[dict[str, Any]]:
        self._queried()
        now = self.now_ms()
        return queries.diff(
            self.store, queries.parse_time(start, now), queries.parse_time(end, now)
        )

    def _queried(self) -> None:
        """Queries read the store: bring its current table up to what ingest applied
        (a birth's state reaches the table only by a flush, normally each drift cycle),
        so an answer never lags the acks the gateway already has."""
        self.last_query_ms = self.now_ms()
        self.flush()

    def export(self) -> dict[str, Any]:
        document = twin_document(
            self.store,
            self.config,
            last_query_ms=self.last_query_ms,
            query_endpoints=self.query_endpoints(),
        )
        self.last_query_ms = self.now_ms()
        return document

    def query_endpoints(self) -> list[str]:
        """Where this hub answers queries: its loopback HTTP API once it listens (the
        runtime sets ``api_url``), and the operator channel when operators are configured
        (the runtime subscribes to their requests only then)."""
        endpoints = [self.api_url] if self.api_url else []
        if self.config.operators:
            endpoints.append(f"{self.config.broker.url}/{OPERATOR_REQUEST_FILTER}")
        return endpoints

    def alarms(self, states: Sequence[str] = ()) -> list[dict[str, Any]]:
        self._queried()
        return queries.alarms(self.store, states)

    def drift(self) -> list[dict[str, Any]]:
        self._queried()
        return queries.open_drift(self.store)

    def audit_tail(self, limit: int = 50) -> list[dict[str, Any]]:
        self._queried()
        return queries.audit_tail(self.store, limit)

    def audit_verify(self) -> dict[str, Any]:
        rows = self.store.audit_chain_rows()
        check = verify_chain(rows)
        return {
            "ok": check.ok,
            "records": check.records,
            "head_hash": check.head_hash,
            "first_bad_seq": check.first_bad_seq,
            "problem": check.problem,
            "head_seq": self.audit.head_seq,
        }

    def command_list(self, states: Sequence[str] = (), limit: int = 100) -> list[dict[str, Any]]:
        self._queried()
        return queries.commands(self.store, states, limit)

    def command_show(self, command_id: str) -> dict[str, Any]:
        """One command; while it awaits approval, with the predicted effect of sending it
        now (what an approver weighs)."""
        self._queried()
        row = queries.command(self.store, command_id)
        if row.get("state") in ("awaiting_approval", "approved"):
            row.update(self._prediction(row["entity"], row["attribute"], row["value"]))
        return row

    def _command_view(self, command_id: str) -> dict[str, Any]:
        return queries.command(self.store, command_id)

    def status(self) -> dict[str, Any]:
        state = self.ingest.state
        now = self.now_ms()
        silent = self.last_report.silent_gateways if self.last_report else set()
        gateways = []
        for gateway in sorted(set(self.config.gateways) | set(state.gateways)):
            link = state.gateways.get(gateway)
            gateways.append(
                {
                    "id": gateway,
                    "declared": gateway in self.config.gateways,
                    "up": link is not None and link.last_frame_ms > 0 and gateway not in silent,
                    "online": bool(link and link.online),
                    "epoch": link.epoch if link else None,
                    "birth_seq": link.birth_seq if link else None,
                    "frames": link.frames if link else 0,
                    "points": link.points if link else 0,
                    "last_frame": queries.iso(link.last_frame_ms) if link else None,
                    "last_frame_age_s": (now - link.last_frame_ms) / 1000
                    if link and link.last_frame_ms
                    else None,
                    "last_birth": queries.iso(link.last_birth_ms) if link else None,
                    "death_reason": link.death_reason if link else "",
                    "delivered": self.ingest.tracker.ranges(gateway)[-5:],
                    "gaps": self.ingest.tracker.gaps(gateway)[:5],
                    **_heartbeat_row(state.heartbeats.get(gateway), link, now),
                }
            )
        metrics = self.metrics
        return {
            "twin_id": self.config.twin_id,
            "instance": self.instance,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "database": self.store.location,
            "config": str(self.config.file),
            "broker": self.config.broker.url,
            "mqtt_connected": metrics.mqtt_connected,
            "started": queries.iso(int(metrics.started_s * 1000)),
            "now": queries.iso(now),
            "gateways": gateways,
            "frames_accepted": sum(metrics.frames_accepted.values()),
            "frames_rejected": dict(metrics.frames_rejected),
            "points_applied": metrics.points_applied,
            "points_stored": metrics.points_stored,
            "ingest_lag_s": metrics.ingest_lag_s,
            "alarms_active": self._alarms_active(),
            "commands_in_flight": len(self.commands.active()),
            "findings": len(self.last_report.findings) if self.last_report else 0,
            "health": dict(self.last_report.health) if self.last_report else {},
            "last_check": queries.iso(self.last_report.checked_ms) if self.last_report else None,
            "audit_head": [self.audit.head_seq, self.audit.head_hash],
            **self._worker_status(),
        }

    def _alarms_active(self) -> dict[str, int]:
        """Open alarms by severity: the book's on a single hub; on a worker, the whole
        site's as stored (its own book holds only its partitions' alarms current)."""
        if self._fence is None:
            return self.alarm_book.counts_by_severity()
        counts = {"warning": 0, "critical": 0}
        for row in self.store.open_alarms():
            severity = str(row["severity"])
            counts[severity] = counts.get(severity, 0) + 1
        return counts

    def _worker_status(self) -> dict[str, Any]:
        fence = self._fence
        if fence is None:
            return {}
        return {
            "worker": {
                "id": fence.holder,
                "partitions": sorted(fence.held),
                "gateways": sorted(g for g in self.config.gateways if fence.owns(g)),
                "alarms_active_own": self.alarm_book.counts_by_severity(self.evaluates),
            }
        }

    def metrics_text(self) -> str:
        report = self.last_report
        now = self.now_ms()
        state = self.ingest.state
        silent = report.silent_gateways if report else set()
        links = []
        for gateway in sorted(set(self.config.gateways) | set(state.gateways)):
            link = state.gateways.get(gateway)
            last = link.last_frame_ms if link else 0
            links.append(
                (
                    gateway,
                    bool(last) and gateway not in silent,
                    (now - last) / 1000 if last else -1.0,
                )
            )
        by_health: dict[str, int] = {}
        by_type: dict[str, int] = {}
        if report is not None:
            for health in report.health.values():
                by_health[health] = by_health.get(health, 0) + 1
            for finding in report.findings:
                by_type[finding.type] = by_type.get(finding.type, 0) + 1
        commands: dict[str, int] = {}
        for command in self.commands.active():
            commands[command.state] = commands.get(command.state, 0) + 1
        return render(
            self.metrics,
            # per worker, its own partitions' (summed over workers: the site's)
            alarms_by_severity=self.alarm_book.counts_by_severity(
                self.evaluates if self._fence is not None else None
            ),
            gateways=links,
            entities_by_health=by_health,
            findings_by_type=by_type,
            commands_by_state=commands,
        )


@dataclass(slots=True)
class _Answered:
    """Effects of an operator request plus the result its answer carries."""

    effects: Effects
    answer: Any = None


def _heartbeat_row(beat: Any, link: Any, now: int) -> dict[str, Any]:
    """The gateway's latest heartbeat of its live connection and its devices' links (a
    heartbeat of an older connection says nothing about this one, so it is left out)."""
    if beat is None or link is None or (beat.epoch, beat.session) != (link.epoch, link.session):
        return {"last_heartbeat": None, "devices": []}
    return {
        "last_heartbeat": queries.iso(beat.received_ms),
        "last_heartbeat_age_s": (now - beat.received_ms) / 1000,
        "devices": [
            {
                "id": d.id,
                "up": d.up,
                "since": queries.iso(d.since_ms) if d.since_ms else None,
                "error": d.error,
            }
            for d in beat.devices
        ],
    }


def _default_params() -> RuleParams:
    from fieldtwin.hub.config import AttributeSpec

    return RuleParams.of(AttributeSpec("?"))


def _without_self(facts: PolicyInput, command: CommandRecord) -> PolicyInput:
    """The policy input with ``command`` itself not counted as in flight."""
    in_flight = {
        key: text for key, text in facts.in_flight.items() if not text.startswith(command.id + " ")
    }
    return PolicyInput(
        facts.schema,
        facts.current,
        facts.dtypes,
        facts.stale_after_ms,
        facts.gateway,
        in_flight,
        facts.now_ms,
    )


def _check(name: str, text: str) -> Any:
    from fieldtwin.hub.policy import Check

    return Check(name, False, text)


def _checkpoint_row(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "value": checkpoint.value,
        "ts": queries.iso(checkpoint.ts_ms),
        "ts_ms": checkpoint.ts_ms,
        "quality": checkpoint.quality,
        "twin_hash": checkpoint.twin_hash,
        "taken": queries.iso(checkpoint.taken_ms),
    }


# -- argument helpers -------------------------------------------------------------------------


def _text(args: Mapping[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value.strip():
        raise QueryError(f"{name} is required (non-empty text)")
    return value.strip()


def _texts(args: Mapping[str, Any], name: str) -> list[str]:
    value = args.get(name, [])
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise QueryError(f"{name} must be a list of text")
    return list(value)


def _int(args: Mapping[str, Any], name: str, default: int) -> int:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > 100_000:
        raise QueryError(f"{name} must be a whole number between 1 and 100000")
    return value


def _target(args: Mapping[str, Any]) -> tuple[str, str]:
    target = _text(args, "target")
    entity, dot, attribute = target.rpartition(".")
    if not dot or not entity or not attribute:
        raise QueryError(f"{target!r}: name the point as ENTITY.ATTRIBUTE, e.g. pump-1.speed_sp")
    return entity, attribute


def _value(args: Mapping[str, Any]) -> Value:
    if "value" not in args:
        raise QueryError("value is required")
    value = args["value"]
    if not (value is None or isinstance(value, bool | int | float | str)):
        raise QueryError(f"{value!r} is not a point value (number, true/false or text)")
    return value


def _peek_op(payload: bytes) -> tuple[str, dict[str, Any]]:
    """The op and args of a request, unverified (for routing among workers only)."""
    import msgpack

    try:
        outer = msgpack.unpackb(payload, raw=False, max_bin_len=1 << 20, max_str_len=1 << 16)
        body = msgpack.unpackb(outer[0], raw=False, max_str_len=1 << 16)[7]
        op, args = body["op"], body["args"]
    except Exception:
        return "", {}
    if not isinstance(op, str) or not isinstance(args, dict):
        return "", {}
    return op, args


def _peek_req_id(payload: bytes) -> str:
    """The req_id of a request that failed verification, to address the refusal (the
    reply goes only to the operator the topic names, which the broker restricts)."""
    import msgpack

    try:
        outer = msgpack.unpackb(payload, raw=False, max_bin_len=1 << 20, max_str_len=1 << 16)
        inner = msgpack.unpackb(outer[0], raw=False, max_str_len=1 << 16)
        req_id = inner[7]["req_id"]
    except Exception:
        return "unknown"
    return req_id if isinstance(req_id, str) and 0 < len(req_id) <= 64 else "unknown"


def _plain(value: Any) -> Any:
    """JSON-ish plain data for answers and audit details (tuples to lists, bytes kept)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    return str(value)


def _redacted(args: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.hex()[:32] + "…" if isinstance(v, bytes) else v) for k, v in args.items()}


def _with_times(row: dict[str, Any]) -> dict[str, Any]:
    for name in ("raised_ms", "updated_ms", "cleared_ms", "acked_ms", "shelved_until_ms"):
        row[name.replace("_ms", "")] = queries.iso(row.get(name))
    return row


# -- alarm helpers ------------------------------------------------------------------------------


def _finding_detail(finding: Finding) -> dict[str, Any]:
    return {
        "rule": finding.rule,
        "entity": finding.entity,
        "attribute": finding.attribute,
        "severity": finding.severity,
        "strategy": finding.strategy,
        "description": finding.description,
        "value": finding.value,
        "since_ms": finding.since_ms,
    }


def _alarm_event(transition: Transition) -> AuditEvent:
    alarm = transition.alarm
    return AuditEvent(
        transition.at_ms,
        transition.actor,
        f"alarm_{transition.change}",
        alarm.id,
        {
            "rule": alarm.rule,
            "entity": alarm.entity,
            "attribute": alarm.attribute,
            "severity": alarm.severity,
            "state": alarm.state,
            "strategy": alarm.strategy,
            "description": alarm.description,
            **dict(transition.detail),
        },
    )


def _log_alarm(transition: Transition) -> None:
    alarm = transition.alarm
    level = (
        logging.WARNING
        if transition.change in ("raised", "escalated", "reraised")
        else logging.INFO
    )
    log.log(
        level,
        f"alarm {transition.change}",
        extra=fields(
            alarm=alarm.id,
            severity=alarm.severity,
            state=alarm.state,
            rule=alarm.rule,
            subject=alarm.entity + (f".{alarm.attribute}" if alarm.attribute else ""),
            actor=transition.actor if transition.actor != "hub" else None,
            text=alarm.description[:200],
        ),
    )


def _alarm_payload(transition: Transition, instance: str) -> bytes:
    alarm = transition.alarm
    return json.dumps(
        {
            "change": transition.change,
            "instance": instance,
            **alarm.row(),
            "raised": queries.iso(alarm.raised_ms),
        },
        default=str,
    ).encode()


# -- the operation table --------------------------------------------------------------------------

MIRROR_INTERVAL_MS = 1000
"""How often the view leader among workers mirrors the others' state (about one flush
interval: the shared ``current`` table is no fresher)."""

OPEN_COMMANDS_SQL = (
    "state NOT IN ('refused', 'rejected', 'cancelled', 'expired', 'verified', "
    "'failed_final', 'rolled_back', 'rollback_failed')"
)

_QUERIES = (
    "twin.entities",
    "twin.history",
    "twin.asof",
    "twin.diff",
    "twin.export",
    "alarm.list",
    "drift.list",
    "audit.tail",
    "audit.verify",
    "cmd.list",
    "cmd.show",
    "hub.status",
    "twin.predict",
    "twin.simulate",
    "twin.models",
    "twin.risk",
)

OPERATIONS: dict[str, Operation] = {
    "hub.whoami": Operation(READ, HubService.op_whoami, False),
    "cmd.dry_run": Operation(READ, HubService.op_dry_run, False),
    "cmd.propose": Operation("cmd.propose", HubService.op_propose, True),
    "cmd.approve": Operation("cmd.approve", HubService.op_approve, True),
    "cmd.reject": Operation("cmd.reject", HubService.op_reject, True),
    "cmd.cancel": Operation("cmd.cancel", HubService.op_cancel, True),
    "alarm.ack": Operation("alarm.ack", HubService.op_alarm, True),
    "alarm.shelve": Operation("alarm.shelve", HubService.op_alarm, True),
    "alarm.unshelve": Operation("alarm.unshelve", HubService.op_alarm, True),
    **{name: Operation(READ, HubService.op_query, False) for name in _QUERIES},
    "view.snapshot": Operation(READ, HubService.op_view_snapshot, False),
    "view.history": Operation(READ, HubService.op_view_history, False),
}
"""Every operation of the operator channel: the permission it needs and its handler."""
