"""The running hub: wiring only. The broker in and out, the database thread, timers, the API.

What the hub knows and does is ``HubService`` (hub/service.py); this module starts the
loops that feed it and carries out the ``Effects`` it returns.

Threads: the asyncio event loop owns the network (MQTT, HTTP API); one database thread
owns DuckDB *and* the in-memory twin (the service). Every service call runs on that
thread, one at a time, so there are no locks and no torn reads.

Tasks (one TaskGroup, each named; ``hub-models`` refits and checks the learned
models): ``hub-mqtt`` (connect, subscribe to gateways' uplink
and operators' requests, receive, reconnect with jittered exponential backoff),
``hub-ingest`` (drain the bounded receive queue into batches), ``hub-acks`` (one
signed ack per gateway at most every ``ack_interval_ms``), ``hub-drift`` (the sync
cycle every ``drift.interval_s``), ``hub-commands`` (command deadlines and
verification, four times a second), ``hub-operators`` (the operator channel),
``hub-watchdog`` (systemd notify, when run under systemd), ``hub-views`` (signed console
view deltas, hub/views.py). The API is served by aiohttp on the same loop. A worker
(``[workers]``, hub/workers.py) runs ``hub-mqtt``, ``hub-ingest``, ``hub-acks`` and
``hub-watchdog`` plus ``hub-leases`` (the lease cycle, adoption, subscriptions) and
``hub-flush`` (the journal flush on the drift beat), and subscribes to its partitions'
gateways only, as ``<client_id>-<worker id>``.

Back-pressure: the receive queue holds at most ``ingest.queue_max_frames`` frames. When
the database falls behind, the MQTT reader waits for room instead of reading on, so the
broker keeps the rest (QoS 1) and memory stays bounded; each pause is counted
(``fieldtwin_hub_ingest_paused_total``) and logged at most once a minute.

Session behaviour (docs/protocol.md): username and client id ``hub``, QoS 1,
persistent session (so the broker queues uplink while the hub restarts), a retained
signed ``hub_state`` frame (online, naming the connection's session) on
``ft/v1/hub/state`` after subscribing, and a signed offline state naming that session as
the will and on a clean stop (``fieldtwin.protocol.presence``).
"""

from __future__ import annotations

import asyncio
import contextlib
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

from fieldtwin.hub.api import ApiServer, Endpoint
from fieldtwin.hub.config import HubConfig
from fieldtwin.hub.drift import DriftReport
from fieldtwin.hub.errors import HubError, StoreError
from fieldtwin.hub.ingest import Inbound
from fieldtwin.hub.metrics import HubMetrics
from fieldtwin.hub.service import Effects, HubService, Outbound
from fieldtwin.hub.storage import open_store
from fieldtwin.hub.workers import Fence, LeaseTable, gateways_of
from fieldtwin.protocol.aio import within
from fieldtwin.protocol.logfmt import RateLimitedLog, fields
from fieldtwin.protocol.presence import HubPresence
from fieldtwin.protocol.topics import (
    HUB_STATE_TOPIC,
    HUB_UPLINK_FILTER,
    OPERATOR_REQUEST_FILTER,
    PREFIX,
)

log = logging.getLogger("fieldtwin.hub")
T = TypeVar("T")

_OPERATOR_PREFIX = f"{PREFIX}/op/"


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
        self.listeners: list[Callable[[Any], None]] = []
        self.queue: asyncio.Queue[Inbound] = asyncio.Queue(config.ingest.queue_max_frames)
        self.operator_queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(1000)
        self.client: aiomqtt.Client | None = None
        self.api_port = 0
        self.service: HubService
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-db")
        self._ack_event = asyncio.Event()
        self._stopping = False
        self._last_rebirth: dict[str, float] = {}
        self._last_pause_log = 0.0
        workers = config.workers
        self.worker_id = (workers.worker_id if workers else "") or self.instance
        self.fence: Fence | None = None
        """Set when this hub is one of several workers (``[workers]``): what it owns."""
        self._leases: LeaseTable | None = None
        self.adopted: dict[int, int] = {}
        """Partitions this worker owns and has adopted (their fences)."""
        self.lease_changes = 0
        self._subscribed: set[int] = set()
        """Partitions whose gateways the current MQTT connection is subscribed to."""
        self._subscription_lock = asyncio.Lock()
        self.failure_log = RateLimitedLog(
            log, "loop failures (summary)", key_names=("loop", "kind")
        )
        """A store that keeps failing (a full disk) fails every cycle: a few lines per
        loop and minute, then one summary; the counters stay exact."""
        self._failing: dict[str, int] = {}

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _failed(self, loop: str, message: str, exc: BaseException) -> None:
        """Count a failed cycle of ``loop`` and log it, rate-limited per loop and error."""
        self.metrics.loop_failures[loop] += 1
        self._failing[loop] = self._failing.get(loop, 0) + 1
        self.failure_log.flush()
        self.failure_log.log(
            (loop, type(exc).__name__), logging.ERROR, message, error=str(exc)[:500]
        )

    def _succeeded(self, loop: str) -> None:
        """A loop that failed works again: one line saying how many cycles it lost."""
        failures = self._failing.pop(loop, 0)
        if failures:
            self.failure_log.flush()
            log.warning("loop recovered", extra=fields(loop=loop, failed_cycles=failures))

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db, partial(fn, *args))

    @property
    def last_report(self) -> DriftReport | None:
        service = getattr(self, "service", None)
        return None if service is None else service.last_report

    # -- start and stop ----------------------------------------------------------------

    def _open(self) -> None:
        config = self.config
        store = open_store(config)
        try:
            self.service = HubService(
                config, store, instance=self.instance, metrics=self.metrics, clock=self.clock
            )
        except BaseException:
            store.close()
            raise

    def _share(self) -> None:
        workers = self.config.workers
        assert workers is not None
        self.fence = Fence(self.worker_id, workers.partitions)
        self.service.share(self.fence)
        self._leases = LeaseTable(
            self.config.store_url, self.worker_id, workers.partitions, workers.lease_s
        )

    def _close(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()

    async def run(self) -> None:
        """Run until cancelled. Raises ``HubError`` if the store or key cannot be used."""
        try:
            await self.db(self._open)
            if self.config.workers is not None:
                await self.db(self._share)
                assert self._leases is not None
                await asyncio.to_thread(self._leases.create)
        except BaseException:
            if getattr(self, "service", None) is not None:
                await self.db(self._close)
            self._db.shutdown(wait=True)
            raise
        endpoint_file = self.config.endpoint_file
        api = ApiServer(self.service, self.db, self.config.api_port)
        try:
            self.api_port = await api.start()
            self.service.api_url = f"http://127.0.0.1:{self.api_port}/api"
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
                    operators=len(self.config.operators),
                ),
            )
            self.ready.set()
            _sd_notify("READY=1")
            async with asyncio.TaskGroup() as group:
                group.create_task(self._mqtt_loop(), name="hub-mqtt")
                group.create_task(self._ingest_loop(), name="hub-ingest")
                group.create_task(self._ack_loop(), name="hub-acks")
                group.create_task(self._watchdog(), name="hub-watchdog")
                if self.fence is not None:
                    # A worker: ingest, acks, flushes, drift and alarms of its partitions'
                    # gateways and entities (docs/scale.md says what workers do not do yet).
                    group.create_task(self._lease_loop(), name="hub-leases")
                    group.create_task(self._drift_loop(), name="hub-drift")
                    group.create_task(self._command_loop(), name="hub-commands")
                    group.create_task(self._view_loop(), name="hub-views")
                    if self.config.prediction.enabled:
                        group.create_task(self._model_loop(), name="hub-models")
                    if self.config.operators:
                        group.create_task(self._operator_loop(), name="hub-operators")
                else:
                    group.create_task(self._drift_loop(), name="hub-drift")
                    group.create_task(self._command_loop(), name="hub-commands")
                    group.create_task(self._operator_loop(), name="hub-operators")
                    group.create_task(self._view_loop(), name="hub-views")
                    if self.config.prediction.enabled:
                        group.create_task(self._model_loop(), name="hub-models")
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
            if self._leases is not None:
                # After the last flush: the next owner must not flush before it.
                leases = self._leases
                try:
                    await asyncio.shield(asyncio.to_thread(leases.release_all))
                except StoreError as exc:
                    log.warning("leases not released", extra=fields(error=str(exc)))
                finally:
                    leases.close()
            log.info("hub stopped", extra=fields(instance=self.instance))

    # -- MQTT --------------------------------------------------------------------------

    def _state_payload(self, online: bool) -> bytes:
        """Signed hub state: ``True`` opens a new session (call it first, before the will),
        ``False`` is the offline state naming the current session (will, clean stop)."""
        presence = getattr(self, "_presence", None)
        if presence is None:
            signer = self.service.signer
            presence = self._presence = HubPresence(
                signer.frames, self.instance, signer.take, self.now_ms
            )
        if online:
            return presence.open()
        stopping = self._stopping or _cancelling()
        return presence.offline("shutdown" if stopping else "connection lost")

    async def _mqtt_loop(self) -> None:
        broker = self.config.broker
        backoff = 0.5
        tls = aiomqtt.TLSParameters() if broker.tls else None
        while True:
            _stop_if_cancelled()
            online_state = self._state_payload(True)
            try:
                client = aiomqtt.Client(
                    broker.host,
                    broker.port,
                    username=broker.username,
                    password=broker.password,
                    identifier=broker.client_id
                    if self.fence is None
                    else f"{broker.client_id}-{self.worker_id}",
                    clean_session=False,
                    keepalive=broker.keepalive_s,
                    timeout=10,
                    tls_params=tls,
                    will=aiomqtt.Will(
                        HUB_STATE_TOPIC, self._state_payload(False), qos=1, retain=True
                    ),
                )
                # Back-pressure: QoS 1 messages are acknowledged to the broker only once
                # they are in the bounded ingest queue. While the queue is full nothing is
                # acknowledged, so the broker stops at its in-flight window
                # (max_inflight_messages) and keeps the rest. (aiomqtt exposes no manual
                # ack; paho's is used directly.)
                client._client.manual_ack_set(True)
                async with client:
                    if self.fence is None:
                        await client.subscribe(HUB_UPLINK_FILTER, qos=1)
                    else:
                        await self._sync_subscriptions(client, fresh=True)
                    if self.config.operators:
                        # Workers too: each receives every request and one answers it
                        # (HubService.answers). Not an MQTT shared subscription: a
                        # stopped worker's persistent session would keep its share.
                        await client.subscribe(OPERATOR_REQUEST_FILTER, qos=1)
                    await client.publish(HUB_STATE_TOPIC, online_state, qos=1, retain=True)
                    self.client = client
                    if self.fence is not None:
                        # Partitions adopted while connecting (the lease loop saw no client).
                        await self._rebirth(await self._sync_subscriptions(client))
                    self.metrics.mqtt_connected = True
                    self.metrics.mqtt_connects += 1
                    self.mqtt_ready.set()
                    backoff = 0.5
                    log.info("connected to broker", extra=fields(broker=broker.url))
                    try:
                        await self._receive(client)
                    finally:
                        self.client = None
                        self.metrics.mqtt_connected = False
                        self.mqtt_ready.clear()
                        if self._stopping or _cancelling():
                            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                                await within(
                                    2,
                                    client.publish(
                                        HUB_STATE_TOPIC,
                                        self._state_payload(False),
                                        qos=1,
                                        retain=True,
                                    ),
                                )
            except aiomqtt.MqttError as exc:
                delay = backoff * (0.5 + random.random())
                log.warning(
                    "broker connection lost; reconnecting",
                    extra=fields(broker=broker.url, error=str(exc), retry_s=round(delay, 2)),
                )
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 30.0)

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = str(message.topic)
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                payload = str(payload).encode()
            if topic.startswith(_OPERATOR_PREFIX):
                try:
                    self.operator_queue.put_nowait((topic, bytes(payload)))
                except asyncio.QueueFull:
                    self.metrics.operator_refused["busy"] += 1
                _ack(client, message)
                continue
            if not self._owns(topic):
                _ack(client, message)  # another worker's gateway (a subscription ending)
                continue
            inbound = Inbound(topic, bytes(payload), self.now_ms(), time.time_ns())
            if self.queue.full():
                # Back-pressure: stop reading from the broker until the database catches
                # up; QoS 1 keeps the rest at the broker.
                self.metrics.ingest_paused += 1
                now = time.monotonic()
                if now - self._last_pause_log >= 60:
                    self._last_pause_log = now
                    log.warning(
                        "ingest queue full; pausing reads from the broker",
                        extra=fields(queue=self.queue.qsize(), pauses=self.metrics.ingest_paused),
                    )
                await self.queue.put(inbound)
            else:
                self.queue.put_nowait(inbound)
            _ack(client, message)
            self.metrics.ingest_queue = self.queue.qsize()

    async def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        client = self.client
        if client is None:
            return False
        try:
            await within(10, client.publish(topic, payload, qos=1, retain=retain))
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.warning("publish failed", extra=fields(topic=topic, error=str(exc)))
            return False
        return True

    async def perform(self, effects: Effects) -> None:
        """Publish what the service asked for, then its rebirth requests."""
        for item in effects.publish:
            await self._publish(item.topic, item.payload, retain=item.retain)
        for gateway, reason, entity in effects.rebirths:
            outcome = await self.send_rebirth(gateway, reason)
            action = f"rebirth requested from {gateway}: {reason}"
            if outcome == "limited":
                action = f"resync of {gateway} already requested: {reason}"
            self.service.note_action(
                (
                    self.now_ms(),
                    entity,
                    action,
                    "failed" if outcome == "failed" else "success",
                    gateway,
                )
            )
        for gateway, reason in effects.gap_rebirths:
            if await self.send_rebirth(gateway, reason) == "sent":
                await self.db(self.service.ingest.note_rebirth, gateway, self.now_ms())

    async def send_rebirth(self, gateway: str, reason: str) -> str:
        """Ask for a birth: ``sent``, ``failed``, or ``limited`` when one was asked for
        less than ``rebirth_min_interval_s`` ago (that birth answers this need too)."""
        now = time.monotonic()
        last = self._last_rebirth.get(gateway)
        if last is not None and now - last < self.config.ingest.rebirth_min_interval_s:
            return "limited"
        frame: Outbound = self.service.rebirth_frame(gateway, reason)
        if not await self._publish(frame.topic, frame.payload):
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
                    batch.append(await within(remaining, self.queue.get()))
                except TimeoutError:
                    break
            self.metrics.ingest_queue = self.queue.qsize()
            if self.fence is not None:
                batch = [item for item in batch if self._owns(item.topic)]
                if not batch:
                    continue
            started = time.perf_counter()
            outcome, effects = await self.db(self.service.ingest_batch, batch)
            self.metrics.batch_seconds = time.perf_counter() - started
            if outcome.ack_due:
                self._ack_event.set()
            await self.perform(effects)
            for listener in list(self.listeners):
                listener(outcome)

    async def _ack_loop(self) -> None:
        interval = self.config.ingest.ack_interval_ms / 1000
        while True:
            _stop_if_cancelled()
            await self._ack_event.wait()
            self._ack_event.clear()
            pending = await self.db(self.service.take_acks)
            for gateway, (epoch, ranges) in sorted(pending.items()):
                if not ranges:
                    continue
                frame = self.service.ack_frame(gateway, epoch, ranges)
                if await self._publish(frame.topic, frame.payload):
                    self.metrics.acks_sent += 1
                _stop_if_cancelled()
            if interval:
                await asyncio.sleep(interval)

    # -- workers sharing the gateways (hub/workers.py) ---------------------------------

    def _owns(self, topic: str) -> bool:
        """Whether this hub processes an uplink topic: always, unless it is a worker and
        the topic's gateway is in a partition it has not adopted."""
        fence = self.fence
        if fence is None:
            return True
        parts = topic.split("/")
        return len(parts) < 3 or fence.owns(parts[2])

    async def _subscribe(self, client: aiomqtt.Client, partitions: Any, *, subscribe: bool) -> None:
        workers = self.config.workers
        assert workers is not None
        topics = [
            f"{PREFIX}/{gateway}/up/#"
            for gateway in gateways_of(self.config.gateways, workers.partitions, partitions)
        ]
        for start in range(0, len(topics), 100):
            chunk = topics[start : start + 100]
            if subscribe:
                await client.subscribe([(topic, 1) for topic in chunk])
            else:
                await client.unsubscribe(chunk)

    async def _sync_subscriptions(
        self, client: aiomqtt.Client, *, fresh: bool = False
    ) -> list[int]:
        """Subscribe to the adopted partitions' gateways, unsubscribe from the others;
        the partitions newly subscribed. ``fresh`` (a new connection): the persistent
        session may hold subscriptions from before a restart, so every other partition
        is unsubscribed. Serialised, so the MQTT and lease loops cannot interleave."""
        workers = self.config.workers
        assert workers is not None
        async with self._subscription_lock:
            if fresh:
                self._subscribed = set()
                drop = set(range(workers.partitions)) - set(self.adopted)
            else:
                drop = self._subscribed - set(self.adopted)
            add = set(self.adopted) - self._subscribed
            if drop:
                await self._subscribe(client, drop, subscribe=False)
                self._subscribed -= drop
            if add:
                await self._subscribe(client, add, subscribe=True)
                self._subscribed |= add
            return sorted(add)

    async def _rebirth(self, partitions: Any) -> None:
        """Ask the gateways of newly adopted partitions for a birth: frames the previous
        owner never acknowledged come again now, not after their ack timeout."""
        workers = self.config.workers
        assert workers is not None
        for gateway in gateways_of(self.config.gateways, workers.partitions, partitions):
            await self.send_rebirth(gateway, f"partition adopted by {self.worker_id}")

    async def _lease_loop(self) -> None:
        """Renew, claim and release partition leases every third of the lease time."""
        workers = self.config.workers
        leases = self._leases
        assert workers is not None
        assert leases is not None
        while True:
            _stop_if_cancelled()
            try:
                held = await asyncio.to_thread(leases.cycle)
            except StoreError as exc:
                # Not renewed: the fence check stops our commits once the leases expire.
                self._failed("leases", "lease cycle failed", exc)
            else:
                try:
                    await self._apply_leases(held)
                except HubError as exc:
                    # Not adopted: the next cycle tries again (nothing of theirs is taken
                    # before adoption succeeds).
                    self._failed("adoption", "partitions not adopted", exc)
            await asyncio.sleep(workers.lease_s / 3)

    async def _apply_leases(self, held: dict[int, int]) -> None:
        """Drop partitions lost (or retaken by someone meanwhile: fence changed), then
        adopt those gained: their trackers are loaded before their frames are taken."""
        fence = self.fence
        assert fence is not None
        lost = [p for p, f in self.adopted.items() if held.get(p) != f]
        gained = {p: f for p, f in held.items() if self.adopted.get(p) != f}
        if not lost and not gained:
            return
        if lost:
            self.adopted = {p: f for p, f in self.adopted.items() if p not in lost}
            fence.held = dict(self.adopted)
            workers = self.config.workers
            assert workers is not None
            await self.db(
                self.service.release, gateways_of(self.config.gateways, workers.partitions, lost)
            )
        if gained:
            workers = self.config.workers
            assert workers is not None
            gateways = gateways_of(self.config.gateways, workers.partitions, gained)
            await self.db(self.service.adopt, gateways)
            self.adopted = {**self.adopted, **gained}
            fence.held = dict(self.adopted)
        client = self.client
        if client is not None:
            # (else the MQTT loop subscribes when it has connected)
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await within(30, self._sync_subscriptions(client))
            await self._rebirth(gained)
        self.lease_changes += 1
        log.info(
            "partitions changed",
            extra=fields(
                worker=self.worker_id,
                held=len(self.adopted),
                gained=",".join(map(str, sorted(gained))),
                lost=",".join(map(str, sorted(lost))),
            ),
        )
        for listener in list(self.listeners):
            listener(("partitions", dict(self.adopted)))

    # -- drift, commands, operators ----------------------------------------------------

    async def _drift_loop(self) -> None:
        interval = self.config.drift.interval_s
        while True:
            _stop_if_cancelled()
            await asyncio.sleep(interval)
            try:
                await self.run_sync_cycle()
            except StoreError as exc:
                self._failed("drift", "drift cycle not stored", exc)
            else:
                self._succeeded("drift")

    async def run_sync_cycle(self) -> DriftReport:
        now = self.now_ms()
        started = time.perf_counter()
        # Two database-thread calls (the cycle, then the flush), so an ingest batch that
        # arrives meanwhile waits for half a cycle at most.
        report, effects = await self.db(self.service.sync_cycle, now)
        await self.db(self.service.flush)
        self.metrics.drift_seconds = time.perf_counter() - started
        self.metrics.drift_checks += 1
        for item in effects.publish:
            if item.topic == "ft/v1/hub/alarms":
                self.metrics.alarms_published += 1
        await self.perform(effects)
        return report

    async def _command_loop(self) -> None:
        while True:
            _stop_if_cancelled()
            await asyncio.sleep(0.25)
            try:
                effects = await self.db(self.service.command_tick)
            except StoreError as exc:
                self._failed("commands", "command cycle not stored", exc)
                continue
            self._succeeded("commands")
            await self.perform(effects)

    async def _operator_loop(self) -> None:
        # Requests are handled one at a time on the database thread; their answers (and
        # command frames) are published concurrently, up to 32 in flight, so one slow
        # broker round trip does not hold up the next operator.
        in_flight = asyncio.Semaphore(32)
        pending: set[asyncio.Task[None]] = set()

        async def publish(effects: Effects) -> None:
            try:
                await self.perform(effects)
            finally:
                in_flight.release()

        while True:
            _stop_if_cancelled()
            topic, payload = await self.operator_queue.get()
            try:
                effects = await self.db(self.service.handle_request, topic, payload)
            except StoreError as exc:
                self._failed("operators", "operator request not stored", exc)
                continue
            except HubError as exc:
                log.error("operator request failed", extra=fields(error=str(exc)))
                continue
            await in_flight.acquire()
            task = asyncio.create_task(publish(effects), name="hub-operator-answer")
            pending.add(task)
            task.add_done_callback(pending.discard)

    # -- learned models (hub/predict.py) ------------------------------------------------

    async def _model_loop(self) -> None:
        """Refit the models when due (history read on the database thread, the fit on a
        worker thread so ingest never waits for numpy), and every few seconds measure
        their misses for the drift engine's ``semantic.model`` findings."""
        service = self.service
        check_s = max(self.config.drift.interval_s, 2.0)
        while True:
            _stop_if_cancelled()
            now = self.now_ms()
            try:
                if await self.db(service.models_due, now):
                    history = await self.db(service.models.load, service.store, now)
                    fitted, errors = await asyncio.to_thread(service.fit_models, history, now)
                    known = set(service.models.errors) | set(service.models.models)
                    await self.db(service.install_models, fitted, errors, now)
                    for target, error in sorted(errors.items()):
                        if target not in known:  # once per target, not every retry
                            log.info("no model yet", extra=fields(target=target, reason=error))
                await self.db(service.measure_models, self.now_ms())
            except HubError as exc:
                self._failed("models", "model update failed", exc)
            else:
                self._succeeded("models")
            await asyncio.sleep(check_s)

    # -- console views (hub/views.py) -------------------------------------------------

    async def _view_loop(self) -> None:
        """Publish coalesced, signed view deltas a few times a second, at QoS 0.

        Nothing queues: a tick computes what changed since the last one, and while the
        broker is unreachable ticks go on (so no backlog builds up); consoles that miss
        frames see the seq gap and take a fresh snapshot."""
        from fieldtwin.hub.views import INTERVAL_S

        while True:
            _stop_if_cancelled()
            await asyncio.sleep(INTERVAL_S)
            try:
                frames = await self.db(self.service.view_tick)
            except HubError as exc:
                self._failed("views", "view tick failed", exc)
                continue
            self._succeeded("views")
            client = self.client
            if client is None:
                continue
            for frame in frames:
                try:
                    await within(5, client.publish(frame.topic, frame.payload, qos=0))
                except (aiomqtt.MqttError, TimeoutError):
                    break

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


def _ack(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
    if message.qos > 0:
        client._client.ack(message.mid, message.qos)


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


async def run_hub(config: HubConfig) -> None:
    """Run a hub until cancelled (SIGINT/SIGTERM are turned into cancellation by the CLI)."""
    hub = Hub(config)
    try:
        await hub.run()
    except* HubError as group:
        raise group.exceptions[0] from None
