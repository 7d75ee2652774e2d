"""The running agent: drivers → sampler → batcher → outbox → uplink, and cmd → driver.

One event loop; DuckDB work runs on the outbox's single worker thread. Shutdown order
(SIGTERM/SIGINT, or ``Agent.stop()``): stop the drivers, commit every sample still in
memory, let the uplink drain its live lane briefly and publish a ``death``, close the
buffer, tell systemd ``STOPPING=1``. Nothing read from a device is dropped on a clean
stop; on a crash or SIGKILL, at most the samples of the open batch (``flush_ms``) are
lost, since every committed batch is in the buffer and is sent again after restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from dataclasses import asdict
from importlib import metadata
from typing import Any

from fieldtwin.agent.commands import Approvers, CommandExecutor, WriteOutcome
from fieldtwin.agent.config import AgentConfig, PointConfig
from fieldtwin.agent.drivers import Driver, make_driver
from fieldtwin.agent.errors import AgentError, OutboxError
from fieldtwin.agent.outbox import AsyncOutbox, Committed, Outbox
from fieldtwin.agent.plausible import tiny_threshold
from fieldtwin.agent.sampler import FilterSpec, Sampler
from fieldtwin.agent.sdnotify import Notifier
from fieldtwin.agent.status import STATUS_FORMAT, write_status
from fieldtwin.agent.takeover import TakeoverDetector
from fieldtwin.agent.uplink import Uplink
from fieldtwin.agent.util import Backoff, Throttle, cancel_and_wait, now_ms, within
from fieldtwin.protocol.births import split_birth
from fieldtwin.protocol.config import ConfigError
from fieldtwin.protocol.errors import FrameTooLarge, ProtocolError
from fieldtwin.protocol.frames import DEFAULT_MAX_FRAME_BYTES, FrameSigner
from fieldtwin.protocol.keys import KeyRegistry, PublicKey, load_private_key, load_public_key
from fieldtwin.protocol.logfmt import fields
from fieldtwin.protocol.messages import (
    MAX_BIRTH_PARTS,
    MAX_INT,
    MIN_INT,
    Birth,
    DeviceLink,
    PointMeta,
    Quality,
    Sample,
    Value,
)

log = logging.getLogger("fieldtwin.agent")

IMPLAUSIBLE_LOG_INTERVAL_S = 30.0
"""At most one ``implausible_value`` log line this often (the rest are counted)."""


def _version() -> str:
    try:
        return metadata.version("fieldtwin")
    except metadata.PackageNotFoundError:
        return "unknown"


class SamplerSink:
    """The drivers' ``Sink``: stamps ``now`` and hands readings to the sampler.

    Wire integers are signed 64-bit; a uint64 reading above 2^63-1 goes on as the
    nearest float with UNCERTAIN quality (docs/protocol.md, "Values"), never as a value
    the hub would refuse (a refused frame would be resent forever).
    """

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def offer(self, index: int, value: Value, ts_ms: int, quality: Quality) -> None:
        if type(value) is int and not MIN_INT <= value <= MAX_INT:
            value = float(value)
            if quality == Quality.GOOD:
                quality = Quality.UNCERTAIN
        self.sampler.offer(index, value, ts_ms, quality, now_ms())

    def fail(self, index: int) -> None:
        self.sampler.fail(index, now_ms())


class Batcher:
    """Collects samples into batches and commits them (group commit) before publishing.

    A batch closes when it reaches ``max_samples`` or ``flush_ms`` after its first
    sample. If the buffer cannot be written (disk full, I/O error) the samples stay in
    memory and the commit is retried with backoff; beyond ``max_pending`` samples in
    memory the oldest are dropped and counted, so a dead disk cannot exhaust RAM.
    """

    def __init__(
        self,
        outbox: AsyncOutbox,
        deliver: Any,
        *,
        max_samples: int,
        flush_ms: int,
        max_pending: int = 1_000_000,
    ) -> None:
        self.outbox = outbox
        self.deliver = deliver
        self.max_samples = max_samples
        self.flush_s = flush_ms / 1000
        self.max_pending = max(max_pending, max_samples)
        self.pending: list[Sample] = []
        self.dropped_in_memory = 0
        self.commit_errors = 0
        self.last_commit_ms: int | None = None
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._error_log = Throttle(30.0)

    def add(self, sample: Sample) -> None:
        pending = self.pending
        pending.append(sample)
        if len(pending) == 1:
            self._idle.clear()
            self._wake.set()
        elif len(pending) >= self.max_samples:
            self._full.set()
        if len(pending) > self.max_pending:
            excess = len(pending) - self.max_pending
            del pending[:excess]
            self.dropped_in_memory += excess

    async def run(self) -> None:
        backoff = Backoff(0.2, 10.0)
        while True:
            if not self.pending:
                self._idle.set()
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self.pending) < self.max_samples and not self._stopping:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await within(self.flush_s, self._full.wait())
            taken, self.pending = self.pending, []
            chunks = [
                taken[i : i + self.max_samples] for i in range(0, len(taken), self.max_samples)
            ]
            try:
                committed = await self.outbox.call(self.outbox.sync.commit_data, chunks)
            except OutboxError as exc:
                self.commit_errors += 1
                self.pending[:0] = taken
                if len(self.pending) > self.max_pending:
                    excess = len(self.pending) - self.max_pending
                    del self.pending[:excess]
                    self.dropped_in_memory += excess
                if self._error_log.ready():
                    log.error(
                        "cannot write the buffer; samples kept in memory",
                        extra=fields(
                            alarm="outbox_write_failed",
                            error=str(exc),
                            pending=len(self.pending),
                            dropped_in_memory=self.dropped_in_memory,
                        ),
                    )
                if self._stopping and backoff.attempts >= 3:
                    log.error(
                        "stopping with samples that could not be stored",
                        extra=fields(alarm="samples_lost", samples=len(self.pending)),
                    )
                    self.pending = []
                    continue
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self.last_commit_ms = now_ms()
            if committed:
                self.deliver(committed)

    async def drain(self) -> None:
        """Commit everything pending, then let ``run`` return."""
        self._stopping = True
        self._wake.set()
        self._full.set()
        await self._idle.wait()


class Agent:
    def __init__(self, config: AgentConfig, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.started_at_ms = now_ms()
        self._stop = asyncio.Event()
        self.point_list: list[tuple[str, PointConfig]] = [
            (device.id, point) for device, point in config.points()
        ]
        self.points = {point.key: point for _, point in self.point_list}
        key = load_private_key(config.private_key)
        hub_key = load_public_key(config.hub_public_key)
        self.signer = FrameSigner(config.gateway, key)
        self.hub_keys = KeyRegistry.of({"hub": hub_key})
        buffer = config.buffer
        self.outbox = AsyncOutbox(
            Outbox(
                buffer.path,
                self.signer,
                max_samples=buffer.max_samples,
                max_bytes=buffer.max_bytes,
                overflow=buffer.overflow,
                memory_limit_mb=buffer.memory_limit_mb,
                checkpoint_mb=buffer.checkpoint_mb,
                threads=buffer.threads,
                reopen_every=buffer.reopen_every,
            )
        )
        self.batcher = Batcher(
            self.outbox,
            self._deliver,
            max_samples=buffer.batch_max_samples,
            flush_ms=buffer.flush_ms,
        )
        self.sampler = Sampler(
            [
                FilterSpec(
                    p.entity,
                    p.attribute,
                    p.deadband,
                    p.max_silence_ms,
                    p.valid_min,
                    p.valid_max,
                    Quality[p.out_of_range.upper()],
                    tiny_threshold(p),
                )
                for _, p in self.point_list
            ],
            self.batcher.add,
            self._on_implausible,
        )
        self._implausible_log = Throttle(IMPLAUSIBLE_LOG_INTERVAL_S)
        self.sink = SamplerSink(self.sampler)
        self.drivers: list[Driver] = []
        self._driver_of: dict[tuple[str, str], Driver] = {}
        index = 0
        for device in config.devices:
            indexed = []
            for point in device.points:
                indexed.append((index, point))
                index += 1
            driver = make_driver(device, indexed)
            self.drivers.append(driver)
            for _, point in indexed:
                self._driver_of[point.key] = driver
        self.uplink = Uplink(
            gateway=config.gateway,
            broker=config.broker,
            outbox=self.outbox,
            hub_keys=self.hub_keys,
            birth_factory=self.birth,
            on_command=self._on_command,
            backlog_samples_per_s=buffer.backlog_samples_per_s,
            ack_timeout_s=buffer.ack_timeout_s,
            device_states=self.device_states,
        )
        self._device_since: dict[str, tuple[bool, int]] = {}
        approvals = config.approvals
        approver_keys: dict[str, tuple[PublicKey, ...]] = {}
        for operator, files in approvals.keys.items():
            try:
                approver_keys[operator] = tuple(load_public_key(p) for p in files)
            except ProtocolError as exc:
                raise ConfigError(
                    config.file, f"approvals.operators.{operator}", str(exc)
                ) from None
        self.executor = CommandExecutor(
            gateway=config.gateway,
            points=self.points,
            outbox=self.outbox,
            writer=self._write,
            deliver=self._deliver,
            approvers=Approvers(
                approver_keys,
                approvals.required,
                approvals.unattended,
            )
            if approvals.enabled
            else None,
        )
        self._metas = tuple(
            PointMeta(
                entity=p.entity,
                attribute=p.attribute,
                dtype=p.dtype,
                unit=p.unit,
                writable=p.writable,
                min=p.min,
                max=p.max,
                interval_ms=p.interval_ms,
                source=p.source[:512],
                device=device_id,
            )
            for device_id, p in self.point_list
        )
        self._info = {
            "agent": "fieldtwin-agent",
            "version": _version(),
            "host": socket.gethostname(),
            "started_at_ms": str(self.started_at_ms),
            **config.info,
        }
        self.takeover = TakeoverDetector()
        self.metrics: Any = None
        self._command_tasks: set[asyncio.Task[None]] = set()
        self._birth_state: dict[tuple[str, str], tuple[Sample, int]] = {}
        self._state = "running"
        self._check_birth_size()

    # -- wiring -----------------------------------------------------------------------

    def _check_birth_size(self) -> None:
        """Refuse at start a gateway whose birth cannot travel even in parts."""
        worst = Birth(
            self._metas,
            tuple(
                Sample(
                    p.entity,
                    p.attribute,
                    "x" * 32 if p.dtype == "string" else 0.0,
                    2**62,
                    Quality.GOOD,
                )
                for _, p in self.point_list
            ),
            2**62,
            self._info,
            session=2**62,
            state_seqs=tuple(2**62 for _ in self.point_list),
        )
        try:
            split_birth(worst, 2**62, DEFAULT_MAX_FRAME_BYTES)
        except FrameTooLarge as exc:
            raise AgentError(
                f"{self.config.file}: {len(self._metas)} points make a birth too large for "
                f"{MAX_BIRTH_PARTS} frames of {DEFAULT_MAX_FRAME_BYTES} bytes ({exc}); split "
                "the devices over two gateways"
            ) from None

    def device_states(self) -> tuple[DeviceLink, ...]:
        """Each device's link state for heartbeats; ``since_ms`` is when it last changed.

        Up while connected and not failing. Failing means no request succeeded for three
        polling intervals (at least 5 s) and the latest one failed: one dead unit on a bus
        whose other units answer does not take the bus down (its points go BAD instead).
        """
        now = now_ms()
        links = []
        for driver in self.drivers:
            stats = driver.stats
            window = max(5000, 3 * min((p.interval_ms for _, p in driver.points), default=0))
            success = stats.last_success_ms or 0
            failing = (stats.last_failure_ms or 0) > success and now - success > window
            up = stats.connected and not failing
            held = self._device_since.get(driver.id)
            if held is None or held[0] != up:
                # down: since it last answered; up: since now (it answers again)
                changed = now if up else (stats.last_success_ms or now)
                held = self._device_since[driver.id] = (up, changed)
            error = "" if up else (stats.last_error or "not connected")[:512]
            links.append(DeviceLink(driver.id, up, held[1], error))
        return tuple(links)

    def birth(self, low_water: int) -> Birth:
        """Point metadata plus the last *committed* sample of each point, with its frame.

        Only committed samples: one still in the batcher's memory may die with the
        process, and the hub must never learn a value from a birth that no data frame
        will carry. The seq lets the hub store each sample in history exactly once.
        """
        held = self._birth_state.values()
        return Birth(
            self._metas,
            tuple(sample for sample, _ in held),
            low_water,
            self._info,
            state_seqs=tuple(seq for _, seq in held),
        )

    def _deliver(self, committed: list[Committed]) -> None:
        state = self._birth_state
        for item in committed:
            for sample in item.batch:
                state[(sample.entity, sample.attribute)] = (sample, item.seq)
        self.uplink.committed(committed)

    def _on_implausible(self, entity: str, attribute: str, value: Value, ts_ms: int) -> None:
        """A reading outside its valid range: one log line per interval, with a count."""
        if not self._implausible_log.ready():
            return
        point = self.points[(entity, attribute)]
        hint = ""
        if point.table in ("holding", "input") and point.dtype != "string":
            hint = "a wrong byte_order/word_order? compare the orders with `fieldtwin agent check`"
        log.warning(
            "implausible value: outside the point's valid range",
            extra=fields(
                alarm="implausible_value",
                point=point.name,
                value=value,
                valid_min=point.valid_min,
                valid_max=point.valid_max,
                sent_as=point.out_of_range,
                source=point.source,
                hint=hint,
                total=self.sampler.counters.implausible,
                suppressed=self._implausible_log.take_suppressed(),
            ),
        )

    async def _write(self, point: PointConfig, value: Value) -> WriteOutcome:
        return await self._driver_of[point.key].write(point, value)

    async def _on_command(self, frame: Any) -> None:
        task = asyncio.create_task(self.executor.handle(frame), name="command")
        self._command_tasks.add(task)
        task.add_done_callback(self._command_tasks.discard)

    def stop(self) -> None:
        self._stop.set()

    # -- running ----------------------------------------------------------------------

    async def run(self) -> int:
        try:
            await self.outbox.open()
        except BaseException:
            await self.outbox.close()
            raise
        loop = asyncio.get_running_loop()
        # Signal handlers exist only in the main thread of a POSIX process; an agent
        # run in-process (tests, the benchmark) is stopped through ``stop()`` instead.
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop)
        sync = self.outbox.sync
        log.info(
            "agent starting",
            extra=fields(
                gateway=self.config.gateway,
                epoch=sync.epoch,
                next_seq=sync.next_seq,
                held_frames=len(sync.unacked()),
                devices=len(self.drivers),
                points=len(self.point_list),
                buffer=sync.path,
            ),
        )
        try:
            await self._start_metrics()
            async with asyncio.TaskGroup() as group:
                uplink_task = group.create_task(self.uplink.run(), name="uplink")
                batcher_task = group.create_task(self.batcher.run(), name="batcher")
                helpers = [
                    group.create_task(self._tick_loop(), name="sampler-tick"),
                    group.create_task(self._status_loop(), name="status"),
                    group.create_task(
                        self._watchdog_loop(uplink_task, batcher_task), name="watchdog"
                    ),
                ]
                drivers = [
                    group.create_task(self._supervise(driver), name=f"driver:{driver.id}")
                    for driver in self.drivers
                ]
                self.notifier.ready(f"running: {len(self.point_list)} points")
                await self._stop.wait()
                log.info("agent stopping")
                self.notifier.stopping()
                await self._settle(drivers, "driver")
                if self._command_tasks:
                    await asyncio.wait(list(self._command_tasks), timeout=5)
                await self.batcher.drain()
                self.uplink.stop()
                await asyncio.wait([uplink_task], timeout=10)
                await self._settle([uplink_task, *helpers], "task")
                self._state = "stopped"
                await self._write_status()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
            if self.metrics is not None:
                await self.metrics.stop()
            await self.outbox.close()
        log.info("agent stopped", extra=fields(gateway=self.config.gateway))
        return 0

    async def _settle(self, tasks: list[asyncio.Task[Any]], what: str) -> None:
        left = await cancel_and_wait(tasks, 15.0)
        for task in left:
            log.error(
                "did not stop; exiting without it", extra=fields(kind=what, task=task.get_name())
            )

    async def _supervise(self, driver: Driver) -> None:
        """Drivers handle device trouble themselves; this catches their bugs."""
        backoff = Backoff(1.0, 60.0)
        while True:
            started = time.monotonic()
            try:
                await driver.run(self.sink)
            except Exception:
                log.exception("driver crashed; restarting it", extra=fields(device=driver.id))
            if time.monotonic() - started > 60:
                backoff.reset()
            await asyncio.sleep(backoff.next_delay())

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sampler.tick(now_ms())
            self._watch_uplink()

    def _watch_uplink(self) -> None:
        """Say so when the broker's behaviour points at a second agent with our id."""
        stats = self.uplink.stats
        suspicion = self.takeover.observe(
            time.monotonic(),
            connects=stats.connects,
            connected=stats.connected,
            foreign_acks=stats.rejected.get("other_epoch", 0),
        )
        if suspicion is None:
            return
        gateway = self.config.gateway
        log.error(
            "the broker keeps ending this gateway's connections: probably another agent "
            "is running with the same gateway id",
            extra=fields(
                alarm="gateway_id_conflict",
                gateway=gateway,
                client_id=self.uplink.client_id,
                short_sessions=suspicion.short_sessions,
                window_s=int(suspicion.window_s),
                acks_for_another_epoch=suspicion.foreign_acks,
                why=(
                    "MQTT allows one connection per client id; the broker drops the older "
                    "one whenever the other agent connects, so both keep kicking each "
                    "other off"
                ),
                fix=(
                    f"run exactly one agent with gateway = {gateway!r} (a copied config, a "
                    "second host or a forgotten test run?); give any other its own gateway "
                    "id, key and broker login"
                ),
            ),
        )

    async def _start_metrics(self) -> None:
        config = self.config
        if not config.metrics_host:
            return
        from fieldtwin.agent.metrics import MetricsServer

        server = MetricsServer(
            config.metrics_host, config.metrics_port, self._metrics_status, now_ms
        )
        try:
            await server.start()
        except OSError as exc:
            raise AgentError(f"{config.file}: metrics.listen: {exc}") from None
        self.metrics = server

    def _metrics_url(self) -> str | None:
        if self.metrics is None:
            return None
        host = self.config.metrics_host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.metrics.bound_port}/metrics"

    async def _metrics_status(self) -> dict[str, Any]:
        stats = await within(5, self.outbox.call(self.outbox.sync.stats))
        return self.status(asdict(stats))

    async def _watchdog_loop(self, *critical: asyncio.Task[Any]) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        unhealthy = Throttle(30.0)
        while True:
            await asyncio.sleep(interval)
            problem = ""
            if any(task.done() for task in critical):
                problem = "a core task has stopped"
            else:
                try:
                    await within(interval, self.outbox.call(lambda: None))
                except TimeoutError:
                    problem = "the buffer worker is not responding"
            if problem:
                if unhealthy.ready():
                    log.error(
                        "unhealthy: not feeding the systemd watchdog", extra=fields(problem=problem)
                    )
                continue
            self.notifier.watchdog()

    def status(self, buffer: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": STATUS_FORMAT,
            "state": self._state,
            "gateway": self.config.gateway,
            "version": self._info["version"],
            "pid": os.getpid(),
            "started_at_ms": self.started_at_ms,
            "written_at_ms": now_ms(),
            "interval_s": self.config.status_interval_s,
            "epoch": self.outbox.sync.epoch,
            "broker_url": self.config.broker.url,
            "metrics_url": self._metrics_url(),
            "buffer": {
                **buffer,
                "pending_in_memory": len(self.batcher.pending),
                "dropped_in_memory": self.batcher.dropped_in_memory,
                "last_commit_ms": self.batcher.last_commit_ms,
            },
            "uplink": self.uplink.stats.as_dict(),
            "sampler": asdict(self.sampler.counters),
            **self._plausibility_status(),
            "gateway_id_conflict_suspected": self.takeover.suspected_at_s is not None
            and time.monotonic() - self.takeover.suspected_at_s < self.takeover.window_s,
            "commands": dict(self.executor.outcomes),
            "sources": {
                driver.id: {
                    "protocol": driver.device.protocol,
                    "endpoint": driver.device.endpoint,
                    "points": len(driver.points),
                    **driver.status(),
                }
                for driver in self.drivers
            },
        }

    def _plausibility_status(self) -> dict[str, Any]:
        """Readings outside their valid range, by device and by point (only those with any)."""
        by_point: dict[str, int] = {}
        by_device: dict[str, int] = {d.id: 0 for d in self.config.devices if _has_range(d)}
        for index, count in self.sampler.implausible_counts().items():
            device_id, point = self.point_list[index]
            by_point[point.name] = count
            by_device[device_id] = by_device.get(device_id, 0) + count
        return {"implausible_by_device": by_device, "implausible_points": by_point}

    async def _write_status(self) -> None:
        try:
            stats = await within(10, self.outbox.call(self.outbox.sync.stats))
            status = self.status(asdict(stats))
            await asyncio.to_thread(write_status, self.config.status_file, status)
        except (OSError, TimeoutError, RuntimeError) as exc:
            log.warning("cannot write the status file", extra=fields(error=str(exc)))
            return
        uplink = "connected" if self.uplink.connected else "broker disconnected"
        self.notifier.status(
            f"{uplink}; {stats.samples} samples buffered; "
            f"{self.uplink.stats.published_frames} frames published"
        )

    async def _status_loop(self) -> None:
        while True:
            await self._write_status()
            await asyncio.sleep(self.config.status_interval_s)


def _has_range(device: Any) -> bool:
    return any(point.has_valid_range for point in device.points)


async def run_agent(config: AgentConfig) -> int:
    agent = Agent(config)
    return await agent.run()
