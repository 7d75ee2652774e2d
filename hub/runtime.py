"""The running hub: MQTT in and out, the database thread, drift cycles, the API.

Threads: the asyncio event loop owns the network (MQTT, HTTP API); one database
thread owns DuckDB *and* the in-memory twin state. Everything that reads or writes
either (ingest batches, drift cycles, queries, alarm operations) runs on that thread,
one call at a time, so there are no locks and no torn reads.

Tasks (one TaskGroup, each named): ``mqtt`` (connect, subscribe, receive, reconnect
with jittered exponential backoff), ``ingest`` (drain the receive queue into batches:
messages that arrive while a batch is being stored form the next batch), ``acks``
(one signed ack per gateway at most every ``ack_interval_ms``, listing every delivered
range of its epoch), ``drift`` (drift evaluation, alarms, reconciliation, gap
rebirths every ``drift.interval_s``), ``api`` (loopback HTTP), ``watchdog`` (systemd
notify, when run under systemd).

Session behaviour (docs/protocol.md): username and client id ``hub``, QoS 1,
persistent session (so the broker queues uplink while the hub restarts), retained
``{"online": true, "ts_ms", "instance"}`` on ``ft/v1/hub/state`` after subscribing,
and the matching ``{"online": false}`` as the will and on a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import aiomqtt

from fieldtwin.hub import queries
from fieldtwin.hub.alarms import Alarm, AlarmBook, Transition, planned_actions
from fieldtwin.hub.api import ApiServer, Endpoint, Params, json_response
from fieldtwin.hub.audit import AuditChain, AuditEvent
from fieldtwin.hub.config import HubConfig
from fieldtwin.hub.drift import DriftEngine, DriftReport, Finding
from fieldtwin.hub.errors import HubError, QueryError, StoreError
from fieldtwin.hub.export import twin_document
from fieldtwin.hub.ingest import HubSequence, Inbound, IngestCore, IngestOutcome
from fieldtwin.hub.metrics import HubMetrics, render
from fieldtwin.hub.state import numeric
from fieldtwin.hub.store import SyncWrite, TwinStore
from fieldtwin.protocol.frames import FrameSigner
from fieldtwin.protocol.logfmt import fields
from fieldtwin.protocol.messages import MAX_RANGES, Ack, AnyBody, Rebirth
from fieldtwin.protocol.topics import HUB_STATE_TOPIC, HUB_UPLINK_FILTER, downlink_topic

log = logging.getLogger("fieldtwin.hub")
T = TypeVar("T")

ALARM_TOPIC = "ft/v1/hub/alarms"
"""Alarm transitions of ``alert`` and ``investigate`` rules are published here (JSON)."""


class Hub:
    """One hub process. ``await hub.run()`` until cancelled; ``hub.ready`` is set once
    the API listens and the store is loaded."""

    def __init__(self, config: HubConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.instance = secrets.token_hex(6)
        self.metrics = HubMetrics()
        self.ready = asyncio.Event()
        self.mqtt_ready = asyncio.Event()
        self.listeners: list[Callable[[IngestOutcome], None]] = []
        self.queue: asyncio.Queue[Inbound] = asyncio.Queue()
        self.client: aiomqtt.Client | None = None
        self.api_port = 0
        self.last_query_ms: int | None = None
        self.last_report: DriftReport | None = None
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-db")
        self._ack_pending: dict[str, tuple[int, list[tuple[int, int]]]] = {}
        self._ack_event = asyncio.Event()
        self._pending_actions: list[tuple[int, str, str, str, str]] = []
        self._stopping = False
        self.store: TwinStore
        self.ingest: IngestCore
        self.engine: DriftEngine
        self.alarm_book: AlarmBook
        self.sequence: HubSequence
        self.signer = FrameSigner("hub", config.load_key())
        self._open_events: dict[tuple[str, str, str], int] = {}
        self._next_drift_id = 1
        self._next_investigation = 1
        self._next_proposal = 1
        self._health: dict[str, str] = {}
        self._last_rebirth: dict[str, float] = {}

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db, partial(fn, *args))

    # -- start and stop ----------------------------------------------------------------

    def _open(self) -> None:
        config = self.config
        registry = config.registry()
        store = TwinStore.open(
            config.database, memory_limit=config.memory_limit, threads=config.threads
        )
        try:
            state, tracker = store.load_state()
            ids = store.next_ids()
            head_seq, head_hash = store.audit_head()
            chain = AuditChain(head_seq, head_hash)
            epoch, first, ceiling = store.hub_sequence(HubSequence.BLOCK)
            schema = config.schema
            declared = [
                (
                    e.id,
                    e.twin_id,
                    e.type,
                    e.gateway,
                    e.name,
                    json.dumps(dict(e.static), sort_keys=True),
                )
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
            now = self.now_ms()
            records = chain.chain(
                [
                    AuditEvent(
                        now,
                        "hub",
                        "hub_started",
                        config.twin_id,
                        {
                            "instance": self.instance,
                            "pid": os.getpid(),
                            "config": str(config.file),
                            "entities": len(declared),
                            "hub_epoch": epoch,
                        },
                    ),
                    *store.recovery_events(now),  # a damaged WAL was set aside (store.py)
                ]
            )
            self.metrics.store_recoveries += store.recovery is not None
            store.sync_declared(
                declared,
                relationships,
                {"twin_id": config.twin_id, "domain": config.domain},
                records,
            )
            chain.commit(records)
            self.store = store
            self.sequence = HubSequence(epoch, first, ceiling)
            self.ingest = IngestCore(
                config,
                store,
                state,
                tracker,
                registry,
                chain,
                self.metrics,
                next_frame_id=ids["frame"],
                clock=self.clock,
            )
            self.engine = DriftEngine(
                schema, config.drift, config.reconciliation, config.gateways, now
            )
            self.alarm_book = AlarmBook(
                [Alarm.from_row(row) for row in store.open_alarms()], ids["alarm"]
            )
            self._open_events = store.open_drift_events()
            self._next_drift_id = ids["drift"]
            self._next_investigation = ids["investigation"]
            self._next_proposal = ids["proposal"]
            self._health = {
                physical: health or "unknown"
                for physical, health in store.query("SELECT physical_id, health FROM entities")
            }
        except BaseException:
            store.close()
            raise

    def _close(self) -> None:
        store = getattr(self, "store", None)
        if store is None:
            return
        try:
            write = SyncWrite(flush=self.ingest.flush_plan())
            write.audit = self.ingest.audit.chain(
                [
                    AuditEvent(
                        self.now_ms(),
                        "hub",
                        "hub_stopped",
                        self.config.twin_id,
                        {"instance": self.instance},
                    )
                ]
            )
            store.write_sync(write)
            self.ingest.audit.commit(write.audit)
        except StoreError as exc:
            log.error("could not flush and audit the stop", extra=fields(error=str(exc)))
        store.close()

    async def run(self) -> None:
        """Run until cancelled. Raises ``HubError`` if the store or key cannot be used."""
        try:
            await self.db(self._open)
        except BaseException:
            self._db.shutdown(wait=True)
            raise
        endpoint_file = self.config.endpoint_file
        api = ApiServer(self._api, self.config.api_port)
        try:
            self.api_port = await api.start()
            Endpoint(
                os.getpid(), self.api_port, self.instance, str(self.config.database), self.now_ms()
            ).write(endpoint_file)
            log.info(
                "hub started",
                extra=fields(
                    twin=self.config.twin_id,
                    instance=self.instance,
                    api=f"http://127.0.0.1:{self.api_port}",
                    broker=self.config.broker.url,
                    database=self.config.database,
                ),
            )
            self.ready.set()
            _sd_notify("READY=1")
            async with asyncio.TaskGroup() as group:
                group.create_task(self._mqtt_loop(), name="hub-mqtt")
                group.create_task(self._ingest_loop(), name="hub-ingest")
                group.create_task(self._ack_loop(), name="hub-acks")
                group.create_task(self._drift_loop(), name="hub-drift")
                group.create_task(self._watchdog(), name="hub-watchdog")
        finally:
            self._stopping = True
            _sd_notify("STOPPING=1")
            await api.close()
            with contextlib.suppress(OSError):
                current = Endpoint.read(endpoint_file)
                if current is not None and current.instance == self.instance:
                    endpoint_file.unlink()
            await asyncio.shield(self.db(self._close))
            self._db.shutdown(wait=True)
            log.info("hub stopped", extra=fields(instance=self.instance))

    # -- MQTT --------------------------------------------------------------------------

    def _state_payload(self, online: bool) -> bytes:
        return json.dumps(
            {"online": online, "ts_ms": self.now_ms(), "instance": self.instance}
        ).encode()

    async def _mqtt_loop(self) -> None:
        broker = self.config.broker
        backoff = 0.5
        tls = aiomqtt.TLSParameters() if broker.tls else None
        while True:
            _stop_if_cancelled()
            try:
                async with aiomqtt.Client(
                    broker.host,
                    broker.port,
                    username=broker.username,
                    password=broker.password,
                    identifier=broker.client_id,
                    clean_session=False,
                    keepalive=broker.keepalive_s,
                    timeout=10,
                    tls_params=tls,
                    will=aiomqtt.Will(
                        HUB_STATE_TOPIC, self._state_payload(False), qos=1, retain=True
                    ),
                ) as client:
                    await client.subscribe(HUB_UPLINK_FILTER, qos=1)
                    await client.publish(
                        HUB_STATE_TOPIC, self._state_payload(True), qos=1, retain=True
                    )
                    self.client = client
                    self.metrics.mqtt_connected = True
                    self.metrics.mqtt_connects += 1
                    self.mqtt_ready.set()
                    backoff = 0.5
                    log.info("connected to broker", extra=fields(broker=broker.url))
                    try:
                        async for message in client.messages:
                            payload = message.payload
                            if not isinstance(payload, bytes | bytearray):
                                payload = str(payload).encode()
                            self.queue.put_nowait(
                                Inbound(
                                    str(message.topic),
                                    bytes(payload),
                                    self.now_ms(),
                                    time.time_ns(),
                                )
                            )
                            self.metrics.ingest_queue = self.queue.qsize()
                    finally:
                        self.client = None
                        self.metrics.mqtt_connected = False
                        self.mqtt_ready.clear()
                        if self._stopping or _cancelling():
                            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                                await asyncio.wait_for(
                                    client.publish(
                                        HUB_STATE_TOPIC,
                                        self._state_payload(False),
                                        qos=1,
                                        retain=True,
                                    ),
                                    2,
                                )
            except aiomqtt.MqttError as exc:
                delay = backoff * (0.5 + random.random())
                log.warning(
                    "broker connection lost; reconnecting",
                    extra=fields(broker=broker.url, error=str(exc), retry_s=round(delay, 2)),
                )
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 30.0)

    async def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        client = self.client
        if client is None:
            return False
        try:
            await asyncio.wait_for(client.publish(topic, payload, qos=1, retain=retain), 10)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.warning("publish failed", extra=fields(topic=topic, error=str(exc)))
            return False
        return True

    async def _send(self, gateway: str, body: AnyBody) -> bool:
        if self.sequence.remaining < HubSequence.BLOCK // 2:
            ceiling = self.sequence.ceiling + HubSequence.BLOCK
            await self.db(self.store.reserve_hub_seqs, ceiling)
            self.sequence.ceiling = ceiling
        frame = self.signer.encode(self.sequence.epoch, self.sequence.take(), self.now_ms(), body)
        return await self._publish(downlink_topic(gateway, body.KIND), frame)

    async def send_rebirth(self, gateway: str, reason: str) -> str:
        """Ask for a birth: ``sent``, ``failed``, or ``limited`` when one was asked for
        less than ``rebirth_min_interval_s`` ago (that birth answers this need too)."""
        now = time.monotonic()
        last = self._last_rebirth.get(gateway)
        if last is not None and now - last < self.config.ingest.rebirth_min_interval_s:
            return "limited"
        if not await self._send(gateway, Rebirth(to=gateway, reason=reason)):
            return "failed"
        self._last_rebirth[gateway] = now
        self.metrics.rebirths_sent[gateway] += 1
        log.info("rebirth requested", extra=fields(gateway=gateway, reason=reason))
        return "sent"

    # -- ingest and acks ---------------------------------------------------------------

    async def _ingest_loop(self) -> None:
        ingest = self.config.ingest
        window = ingest.batch_window_ms / 1000
        loop = asyncio.get_running_loop()
        while True:
            _stop_if_cancelled()
            batch = [await self.queue.get()]
            deadline = loop.time() + window
            while len(batch) < ingest.batch_max_frames:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            self.metrics.ingest_queue = self.queue.qsize()
            started = time.perf_counter()
            outcome = await self.db(self._process, batch)
            self.metrics.batch_seconds = time.perf_counter() - started
            if outcome.ack_due:
                self._ack_event.set()
            for listener in list(self.listeners):
                listener(outcome)

    def _process(self, batch: list[Inbound]) -> IngestOutcome:
        outcome = self.ingest.process(batch)
        tracker = self.ingest.tracker
        for gateway, epoch in outcome.ack_due.items():
            ranges = tracker.ranges(gateway, epoch)[-MAX_RANGES:]
            self._ack_pending[gateway] = (epoch, ranges)
        return outcome

    async def _ack_loop(self) -> None:
        interval = self.config.ingest.ack_interval_ms / 1000
        while True:
            _stop_if_cancelled()
            await self._ack_event.wait()
            self._ack_event.clear()
            pending, self._ack_pending = self._ack_pending, {}
            for gateway, (epoch, ranges) in sorted(pending.items()):
                if not ranges:
                    continue
                if await self._send(gateway, Ack(to=gateway, epoch=epoch, ranges=tuple(ranges))):
                    self.metrics.acks_sent += 1
                _stop_if_cancelled()
            if interval:
                await asyncio.sleep(interval)

    # -- drift, alarms, reconciliation -------------------------------------------------

    async def _drift_loop(self) -> None:
        interval = self.config.drift.interval_s
        while True:
            _stop_if_cancelled()
            await asyncio.sleep(interval)
            try:
                await self.run_sync_cycle()
            except StoreError as exc:
                log.error("drift cycle not stored", extra=fields(error=str(exc)))

    async def run_sync_cycle(self) -> DriftReport:
        now = self.now_ms()
        started = time.perf_counter()
        # Three database-thread calls (evaluate, store, flush the journal), so an ingest
        # batch that arrives meanwhile waits for a third of a cycle at most.
        report, write, events, publish, rebirths = await self.db(self._evaluate, now)
        gaps = await self.db(self._commit_sync, now, write, events)
        await self.db(self._flush)
        self.metrics.drift_seconds = time.perf_counter() - started
        self.metrics.drift_checks += 1
        self.last_report = report
        for payload in publish:
            if await self._publish(ALARM_TOPIC, payload):
                self.metrics.alarms_published += 1
        for gateway, reason, entity in rebirths:
            outcome = await self.send_rebirth(gateway, reason)
            action = f"rebirth requested from {gateway}: {reason}"
            if outcome == "limited":
                action = f"resync of {gateway} already requested: {reason}"
            self._pending_actions.append(
                (now, entity, action, "failed" if outcome == "failed" else "success", gateway)
            )
        for gateway, reason in gaps:
            if await self.send_rebirth(gateway, reason) == "sent":
                await self.db(self.ingest.note_rebirth, gateway, now)
        return report

    def _evaluate(
        self, now: int
    ) -> tuple[DriftReport, SyncWrite, list[AuditEvent], list[bytes], list[tuple[str, str, str]]]:
        """Drift, alarms and reconciliation plans (no writes; audit chained at commit)."""
        state = self.ingest.state
        report = self.engine.evaluate(state, now)
        transitions = self.alarm_book.reconcile(report.findings, now)
        write = SyncWrite(checked_ms=now)
        events: list[AuditEvent] = []
        publish: list[bytes] = []
        rebirths: list[tuple[str, str, str]] = []
        write.actions.extend(self._pending_actions)
        self._pending_actions = []
        # drift events: every finding, whatever its strategy (ignore records only this)
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
            write.drift_cleared.append((self._open_events.pop(key), now))
        for transition in transitions:
            write.alarms.append(transition.alarm.row())
            events.append(_alarm_event(transition))
            for action in planned_actions(transition):
                if action == "publish":
                    publish.append(_alarm_payload(transition, self.instance))
                elif action == "rebirth":
                    gateway = transition.alarm.gateway or self.engine.gateway_of(
                        transition.alarm.entity
                    )
                    if gateway in self.config.gateways:
                        rebirths.append(
                            (
                                gateway,
                                f"resync: {transition.alarm.rule} on {transition.alarm.entity}",
                                transition.alarm.entity,
                            )
                        )
                elif action == "propose":
                    self._propose(transition, now, write, events)
                elif action == "investigate":
                    self._investigate(transition, now, write, events)
        changed = {e: h for e, h in report.health.items() if self._health.get(e) != h}
        self._health.update(changed)
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
        return report, write, events, publish, rebirths

    def _commit_sync(
        self, now: int, write: SyncWrite, events: list[AuditEvent]
    ) -> list[tuple[str, str]]:
        """Store one cycle's alarms, drift events and health; returns gateways due a gap
        rebirth."""
        write.audit = self.ingest.audit.chain(events)
        self.store.write_sync(write)
        self.ingest.audit.commit(write.audit)
        return self.ingest.due_rebirths(now)

    def _flush(self) -> None:
        """Bring tracker snapshot, current table and gateway rows up to the journal."""
        flush = self.ingest.flush_plan()
        if flush is not None:
            self.store.write_sync(SyncWrite(flush=flush))
            self.ingest.flushed(flush)

    def _propose(
        self, transition: Transition, now: int, write: SyncWrite, events: list[AuditEvent]
    ) -> None:
        alarm = transition.alarm
        declared = self.config.schema.entities.get(alarm.entity)
        if declared is None or not declared.desired:
            return
        state = self.ingest.state
        for attribute, desired in sorted(declared.desired.items()):
            current = state.current.get((alarm.entity, attribute))
            value = current.value if current is not None else None
            if value == desired or (
                numeric(value) is not None
                and numeric(desired) is not None
                and abs((numeric(value) or 0) - (numeric(desired) or 0)) < 1e-9
            ):
                continue
            proposal_id = f"P-{self._next_proposal:06d}"
            self._next_proposal += 1
            write.proposals.append(
                {
                    "id": proposal_id,
                    "created_ms": now,
                    "alarm_id": alarm.id,
                    "entity": alarm.entity,
                    "attribute": attribute,
                    "gateway": declared.gateway or self.engine.gateway_of(alarm.entity),
                    "current_value": value,
                    "desired_value": desired,
                    "status": "proposed",
                    "reason": f"auto_correct for {alarm.rule}: {alarm.description}",
                }
            )
            write.actions.append(
                (
                    now,
                    alarm.entity,
                    f"proposed command {attribute} := {desired} ({proposal_id})",
                    "success",
                    proposal_id,
                )
            )
            events.append(
                AuditEvent(
                    now,
                    "hub",
                    "command_proposed",
                    f"{alarm.entity}.{attribute}",
                    {"proposal": proposal_id, "alarm": alarm.id, "from": value, "to": desired},
                )
            )

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

    # -- operator alarm operations -----------------------------------------------------

    def _alarm_op(self, op: str, alarm_id: str, by: str, until_ms: int | None) -> dict[str, Any]:
        now = self.now_ms()
        book = self.alarm_book
        if op == "ack":
            transition = book.acknowledge(alarm_id, by, now)
        elif op == "shelve":
            assert until_ms is not None
            transition = book.shelve(alarm_id, by, until_ms, now)
        else:
            transition = book.unshelve(alarm_id, by, now)
        write = SyncWrite(alarms=[transition.alarm.row()])
        write.audit = self.ingest.audit.chain([_alarm_event(transition)])
        self.store.write_sync(write)
        self.ingest.audit.commit(write.audit)
        return transition.alarm.row()

    # -- API ---------------------------------------------------------------------------

    def _status(self) -> dict[str, Any]:
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
                }
            )
        metrics = self.metrics
        return {
            "twin_id": self.config.twin_id,
            "instance": self.instance,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "database": str(self.config.database),
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
            "alarms_active": self.alarm_book.counts_by_severity(),
            "findings": len(self.last_report.findings) if self.last_report else 0,
            "health": dict(self.last_report.health) if self.last_report else {},
            "last_check": queries.iso(self.last_report.checked_ms) if self.last_report else None,
            "audit_head": self.store.audit_head(),
        }

    def _metrics_text(self) -> str:
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
        return render(
            self.metrics,
            alarms_by_severity=self.alarm_book.counts_by_severity(),
            gateways=links,
            entities_by_health=by_health,
            findings_by_type=by_type,
        )

    async def _api(self, method: str, path: str, params: Params) -> tuple[int, str, bytes]:
        def one(name: str, default: str | None = None) -> str | None:
            values = params.get(name)
            return values[-1] if values else default

        now = self.now_ms()
        if path == "/metrics" and method == "GET":
            text = await self.db(self._metrics_text)
            return 200, "text/plain; version=0.0.4; charset=utf-8", text.encode()
        if path == "/api/status":
            return json_response(await self.db(self._status))
        if path.startswith("/api/alarms/") and method == "POST":
            parts = path.split("/")
            if len(parts) != 5 or parts[4] not in ("ack", "shelve", "unshelve"):
                return json_response({"error": "POST /api/alarms/ID/{ack,shelve,unshelve}"}, 404)
            by = one("by") or "operator"
            until = None
            if parts[4] == "shelve":
                duration = one("for")
                if not duration:
                    raise QueryError("shelving needs ?for=DURATION (e.g. 30m)")
                until = now + queries.parse_duration_ms(duration)
            return json_response(await self.db(self._alarm_op, parts[4], parts[3], by, until))
        if method != "GET":
            return json_response({"error": f"{method} {path} is not supported"}, 405)
        self.last_query_ms = now
        store, config = self.store, self.config
        if path == "/api/twin":
            predicates = [queries.Predicate.parse(p) for p in params.get("where", [])]
            result = await self.db(
                partial(
                    queries.current_entities,
                    store,
                    config,
                    types=params.get("type", []),
                    health=params.get("health", []),
                    where=predicates,
                    entities=params.get("entity", []),
                )
            )
            return json_response(result)
        if path == "/api/history":
            entity, attribute = one("entity"), one("attribute")
            if not entity or not attribute:
                raise QueryError("history needs entity= and attribute=")
            start = queries.parse_time(one("from", "-1h") or "-1h", now)
            end = queries.parse_time(one("to", "now") or "now", now)
            limit = int(one("limit", "1000") or "1000")
            return json_response(
                await self.db(queries.history, store, entity, attribute, start, end, limit)
            )
        if path == "/api/asof":
            at = queries.parse_time(one("at", "now") or "now", now)
            return json_response(await self.db(queries.as_of, store, at))
        if path == "/api/diff":
            start = queries.parse_time(one("from") or "-5m", now)
            end = queries.parse_time(one("to", "now") or "now", now)
            return json_response(await self.db(queries.diff, store, start, end))
        if path == "/api/export":
            return json_response(
                await self.db(
                    partial(twin_document, store, config, last_query_ms=self.last_query_ms)
                )
            )
        if path == "/api/alarms":
            return json_response(await self.db(queries.alarms, store, params.get("state", [])))
        if path == "/api/drift":
            return json_response(await self.db(queries.open_drift, store))
        if path == "/api/audit":
            limit = int(one("limit", "50") or "50")
            return json_response(await self.db(queries.audit_tail, store, limit))
        return json_response({"error": f"no route {path}"}, 404)

    # -- systemd -----------------------------------------------------------------------

    async def _watchdog(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        if not usec or not os.environ.get("NOTIFY_SOCKET"):
            await asyncio.Event().wait()
        interval = max(int(usec or "0") / 2e6, 0.5)
        while True:
            _stop_if_cancelled()
            # Prove the database thread is alive too, not just the event loop.
            await self.db(lambda: None)
            _sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _stop_if_cancelled() -> None:
    """Re-raise a cancellation that an ``asyncio.wait_for`` swallowed.

    On Python 3.11, ``wait_for`` (which aiomqtt's publish uses) returns the result when
    the inner awaitable completes just as the task is cancelled, and the cancellation
    is lost; a ``while True`` loop then runs on and the hub never stops. The request is
    still counted by ``Task.cancelling()``, so each loop checks it once per turn.
    """
    if _cancelling():
        raise asyncio.CancelledError


def _sd_notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


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


async def run_hub(config: HubConfig) -> None:
    """Run a hub until cancelled (SIGINT/SIGTERM are turned into cancellation by the CLI)."""
    hub = Hub(config)
    try:
        await hub.run()
    except* HubError as group:
        raise group.exceptions[0] from None
