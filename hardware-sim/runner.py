"""Runs a scenario: the tick clock, every device server, ground truth and the control API.

Time: simulated time advances ``speed`` times faster than wall time, in fixed ticks of
``scenario.tick`` simulated seconds. The clock computes every tick that is due (catching
up after a stall rather than skipping, so the trajectory never depends on machine load)
and stamps tick ``k`` with the nominal wall time ``started_wall_ms + k·tick/speed·1000``.

Lifecycle: open the ground truth, start every server (all ports bound, ptys linked),
report the endpoints, run until SIGINT/SIGTERM (or ``stop_after``), then stop the
servers, close fault windows, flush and close the ground truth, and remove the pty
symlinks and the ephemeral folder. Nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from fieldtwin.protocol.aio import within
from fieldtwin.protocol.logfmt import fields
from fieldtwin.sim.context import SimContext, wall_ms
from fieldtwin.sim.control import ControlServer
from fieldtwin.sim.engine import Simulation, TickResult
from fieldtwin.sim.errors import NoGroundTruth
from fieldtwin.sim.faults import Fault, FaultRequest
from fieldtwin.sim.modbus_server import ModbusRtuServer, ModbusTcpServer
from fieldtwin.sim.opcua_server import OpcUaDevice
from fieldtwin.sim.registers import PlantRegisterMap, SyntheticRegisterMap
from fieldtwin.sim.scenario import DeviceSpec, Scenario
from fieldtwin.sim.serial_server import SerialLineServer
from fieldtwin.sim.truth import GroundTruth

log = logging.getLogger("fieldtwin.sim")

MAX_CATCHUP_TICKS = 2000
FLUSH_ROWS = 20_000


@dataclass(frozen=True)
class RunOptions:
    speed: float = 1.0
    seed: int | None = None
    ephemeral: bool = False
    truth_path: Path | None = None
    record_truth: bool = True
    stop_after: float | None = None


class _Stop(Exception):
    pass


class DeviceServer(Protocol):
    """What the runner needs from every device server."""

    device_id: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def faults_changed(self) -> None: ...

    async def supervise(self) -> None: ...


def default_truth_path(scenario: Scenario) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = Path(tempfile.gettempdir()) / "fieldtwin-sim" / "runs"
    return base / f"{scenario.name}-{stamp}-{os.getpid()}" / "ground-truth.duckdb"


class Runner:
    def __init__(self, scenario: Scenario, options: RunOptions) -> None:
        self.options = options
        self.ephemeral_dir: Path | None = None
        if options.ephemeral:
            self.ephemeral_dir = Path(tempfile.mkdtemp(prefix="fieldtwin-sim-"))
            scenario = self._ephemeral(scenario, self.ephemeral_dir)
        self.scenario = scenario
        try:
            self.sim = Simulation(scenario, options.seed)
        except BaseException:
            if self.ephemeral_dir is not None:
                shutil.rmtree(self.ephemeral_dir, ignore_errors=True)
            raise
        self.seed = self.sim.seed
        self.truth: GroundTruth | None = None
        if options.record_truth:
            self.truth = GroundTruth(options.truth_path or default_truth_path(scenario))
        synthetic = frozenset(scenario.load.device_id(i) for i in range(scenario.load.devices))
        self.ctx = SimContext(
            self.sim,
            self.truth,
            record_served=scenario.record_served,
            unrecorded_devices=frozenset() if scenario.load.record_served else synthetic,
        )
        self.control = ControlServer(
            scenario.control_host,
            scenario.control_port,
            self,
            on_refused=lambda: self.ctx.count("control_refused"),
        )
        self.servers: list[DeviceServer] = []
        self.load_servers: list[ModbusTcpServer] = []
        self._opcua: list[OpcUaDevice] = []
        self._flush_now = asyncio.Event()
        self.started_wall_ms = 0
        self._t0 = 0.0
        self.behind_ticks = 0
        self._behind_warned = 0.0

    @staticmethod
    def _ephemeral(scenario: Scenario, folder: Path) -> Scenario:
        devices = []
        for device in scenario.devices:
            changes: dict[str, Any] = {}
            if device.port:
                changes["port"] = 0
            if device.link is not None:
                changes["link"] = folder / device.link.name
            devices.append(replace(device, **changes))
        return replace(scenario, devices=tuple(devices), control_port=0)

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, on_ready: Callable[[dict[str, Any]], None]) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        handled = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
        try:
            await self._open()
            on_ready(self.endpoints())
            try:
                async with asyncio.TaskGroup() as group:
                    self._start_tasks(group)
                    group.create_task(self._until_stop(stop), name="sim-stop")
            except* _Stop:
                pass
        finally:
            try:
                await self._close()
            finally:
                for sig in handled:
                    loop.remove_signal_handler(sig)

    async def _until_stop(self, stop: asyncio.Event) -> None:
        if self.options.stop_after is None:
            await stop.wait()
        else:
            with contextlib.suppress(TimeoutError):
                await within(self.options.stop_after, stop.wait())
        log.info("stopping", extra=fields(tick=self.sim.tick, sim_s=round(self.sim.sim_s, 3)))
        raise _Stop

    async def _open(self) -> None:
        scenario = self.scenario
        if self.truth is not None:
            await self.truth.open(scenario)
        for device in scenario.devices:
            server = self._make_server(device)
            self.servers.append(server)
            await server.start()
        load = scenario.load
        for index in range(load.devices):
            port = 0 if self.options.ephemeral else load.base_port + index
            device_id = load.device_id(index)
            regmap = SyntheticRegisterMap(index, load, self.ctx)
            server = ModbusTcpServer(device_id, load.host, port, regmap, self.ctx)
            self.load_servers.append(server)
            await server.start()
        await self.control.start()
        # The clock starts when every device is reachable, so tick 0 is the moment the
        # endpoints are announced (OPC-UA start-up takes seconds).
        self._t0 = asyncio.get_running_loop().time()
        self.started_wall_ms = wall_ms()
        if self.truth is not None:
            await self.truth.record_start(
                scenario, self.seed, self.options.speed, self.started_wall_ms
            )
            self.truth.add_truth(0, 0.0, self.started_wall_ms, self.sim.truth_rows())
        log.info(
            "simulator running",
            extra=fields(
                scenario=scenario.name,
                seed=self.seed,
                speed=self.options.speed,
                control=self.control.address,
            ),
        )

    def _make_server(self, device: DeviceSpec) -> DeviceServer:
        if device.protocol == "modbus-tcp":
            return ModbusTcpServer(
                device.id, device.host, device.port, PlantRegisterMap(device, self.ctx), self.ctx
            )
        if device.protocol == "modbus-rtu":
            assert device.link is not None
            return ModbusRtuServer(
                device.id, device.link, PlantRegisterMap(device, self.ctx), self.ctx
            )
        if device.protocol == "serial-line":
            return SerialLineServer(device, self.ctx)
        opcua = OpcUaDevice(device, self.ctx, port=device.port)  # imports asyncua on start
        self._opcua.append(opcua)
        return opcua

    def _start_tasks(self, group: asyncio.TaskGroup) -> None:
        group.create_task(self._clock(), name="sim-clock")
        if self.truth is not None:
            group.create_task(self._flusher(), name="sim-truth-flush")
        for server in [*self.servers, *self.load_servers]:
            name = server.device_id
            group.create_task(server.supervise(), name=f"sim-{name}-link")
            if isinstance(server, OpcUaDevice):
                group.create_task(server.publish(), name=f"sim-{name}-publish")
            if isinstance(server, ModbusRtuServer):
                group.create_task(server.serve(), name=f"sim-{name}-bus")
            if isinstance(server, SerialLineServer):
                group.create_task(server.periodic(), name=f"sim-{name}-lines")
                group.create_task(server.answer_queries(), name=f"sim-{name}-answers")

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self.control.close()
        for server in [*self.servers, *self.load_servers]:
            try:
                await server.close()
            except Exception:
                log.exception("server close failed")
        now = wall_ms()
        last = self.sim.tick
        for fault in list(self.sim.faults.active):
            fault.end_tick = last + 1
            fault.end_wall_ms = now
            fault.status = "ended"
            if self.truth is not None:
                self.truth.fault_ended(fault, self.sim.dt)
        if self.truth is not None:
            try:
                await self.truth.close(now, last)
            except Exception:
                log.exception("ground truth close failed", extra=fields(path=self.truth.path))
        if self.ephemeral_dir is not None:
            shutil.rmtree(self.ephemeral_dir, ignore_errors=True)
        log.info("simulator stopped", extra=fields(tick=last, **dict(self.ctx.counters)))

    # -- time --------------------------------------------------------------------------

    def tick_wall_ms(self, tick: int) -> int:
        return self.started_wall_ms + round(tick * self.sim.dt * 1000.0 / self.options.speed)

    async def _clock(self) -> None:
        loop = asyncio.get_running_loop()
        seconds_per_tick = self.sim.dt / self.options.speed
        while True:
            due = int((loop.time() - self._t0) / seconds_per_tick)
            changed = False
            ran = 0
            while self.sim.tick < due and ran < MAX_CATCHUP_TICKS:
                changed |= self._tick(self.sim.step())
                ran += 1
            self.behind_ticks = max(0, due - self.sim.tick)
            if (
                self.behind_ticks * seconds_per_tick > 5.0
                and loop.time() - self._behind_warned > 30
            ):
                self._behind_warned = loop.time()
                log.warning(
                    "simulation falling behind wall time; lower --speed",
                    extra=fields(behind_ticks=self.behind_ticks, speed=self.options.speed),
                )
            if ran:
                tick_ms = self.tick_wall_ms(self.sim.tick)
                for device in self._opcua:
                    device.ticked(tick_ms)
            if changed:
                for server in [*self.servers, *self.load_servers]:
                    server.faults_changed()
            if self.truth is not None and self.truth.buffered > FLUSH_ROWS:
                self._flush_now.set()
            next_at = self._t0 + (self.sim.tick + 1) * seconds_per_tick
            await asyncio.sleep(max(next_at - loop.time(), 0.005))

    def _tick(self, result: TickResult) -> bool:
        """Record one tick; returns whether a fault window opened or closed."""
        tick_ms = self.tick_wall_ms(result.tick)
        truth = self.truth
        for write in result.writes:
            if truth is not None:
                truth.add_write(
                    write.wall_ms, result.tick, result.sim_s, write.device, write.protocol,
                    write.point, write.variable, write.value, write.outcome,
                    result=write.result, before=write.before, fault_id=write.fault_id,
                    seq=write.seq,
                )  # fmt: skip
        for fault in result.started:
            fault.start_wall_ms = tick_ms
            log.info(
                "fault started", extra=fields(id=fault.id, kind=fault.kind, **self._where(fault))
            )
            if truth is not None:
                truth.fault_started(fault, self.sim.dt)
        for fault in result.ended:
            fault.end_wall_ms = tick_ms
            log.info(
                "fault ended", extra=fields(id=fault.id, kind=fault.kind, **self._where(fault))
            )
            if truth is not None:
                truth.fault_ended(fault, self.sim.dt)
        if truth is not None:
            truth.add_truth(result.tick, result.sim_s, tick_ms, self.sim.truth_rows())
        return bool(result.started or result.ended)

    @staticmethod
    def _where(fault: Fault) -> dict[str, Any]:
        req = fault.request
        return {
            k: v
            for k, v in (
                ("device", req.device),
                ("point", req.point),
                ("unit_id", req.unit_id),
                ("component", req.component),
            )
            if v is not None
        }

    async def _flusher(self) -> None:
        assert self.truth is not None
        interval = self.scenario.flush_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await within(interval, self._flush_now.wait())
            self._flush_now.clear()
            try:
                await self.truth.flush()
            except Exception as exc:
                self.ctx.count("truth_flush_errors")
                log.error(
                    "ground truth flush failed", extra=fields(path=self.truth.path, error=exc)
                )

    # -- endpoints ---------------------------------------------------------------------

    def endpoints(self) -> dict[str, Any]:
        devices: list[dict[str, Any]] = []
        for server in self.servers:
            if isinstance(server, ModbusTcpServer):
                spec = self.scenario.device(server.device_id)
                devices.append(
                    {
                        "id": spec.id,
                        "protocol": "modbus-tcp",
                        "host": spec.host,
                        "port": server.port,
                        "unit_ids": spec.unit_ids,
                    }
                )
            elif isinstance(server, ModbusRtuServer):
                spec = self.scenario.device(server.device_id)
                devices.append(
                    {
                        "id": spec.id,
                        "protocol": "modbus-rtu",
                        "path": str(server.port.link),
                        "pty": server.port.pty_name,
                        "baudrate": spec.baudrate,
                        "unit_ids": spec.unit_ids,
                    }
                )
            elif isinstance(server, SerialLineServer):
                spec = server.device
                devices.append(
                    {
                        "id": spec.id,
                        "protocol": "serial-line",
                        "path": str(server.port.link),
                        "pty": server.port.pty_name,
                        "baudrate": spec.baudrate,
                    }
                )
            elif isinstance(server, OpcUaDevice):
                spec = server.device
                devices.append(
                    {
                        "id": spec.id,
                        "protocol": "opcua",
                        "url": server.url,
                        "namespace": spec.namespace,
                    }
                )
        load = self.scenario.load
        for index, server in enumerate(self.load_servers):
            width = 1 if load.point_type == "uint16" else 2
            devices.append(
                {
                    "id": server.device_id,
                    "protocol": "modbus-tcp",
                    "host": load.host,
                    "port": server.port,
                    "unit_ids": [1],
                    "synthetic": {
                        "index": index,
                        "table": load.table,
                        "address": 0,
                        "registers": load.registers_per_device,
                        "type": load.point_type,
                        "registers_per_point": width,
                        "points": load.points_per_device,
                        "point_prefix": f"{server.device_id}.p",
                    },
                }
            )
        return {
            "scenario": self.scenario.name,
            "seed": self.seed,
            "speed": self.options.speed,
            "tick_s": self.sim.dt,
            "started_wall_ms": self.started_wall_ms,
            "control": self.control.address,
            "ground_truth": None if self.truth is None else str(self.truth.path),
            "devices": devices,
        }

    # -- control service (called by the control interface) ------------------------------

    def point_names(self) -> Collection[str]:
        return self.sim.points.keys()

    def status(self) -> dict[str, Any]:
        sim = self.sim
        return {
            "scenario": self.scenario.name,
            "seed": self.seed,
            "speed": self.options.speed,
            "tick": sim.tick,
            "sim_s": round(sim.sim_s, 6),
            "wall_ms": wall_ms(),
            "behind_ticks": self.behind_ticks,
            "active_faults": len(sim.faults.active),
            "counters": dict(self.ctx.counters),
            "truth_rows_written": 0 if self.truth is None else self.truth.rows_written,
            "served_rows_dropped": 0 if self.truth is None else self.truth.dropped_served,
            "endpoints": self.endpoints(),
        }

    def faults(self) -> list[dict[str, Any]]:
        return [f.to_json(self.sim.dt) for f in self.sim.faults.faults.values()]

    def inject(self, request: FaultRequest, duration: float | None) -> dict[str, Any]:
        """Check and add a runtime fault (``FaultError`` says what is wrong with it)."""
        fault = self.sim.inject(request, duration)
        log.info(
            "fault injected",
            extra=fields(
                id=fault.id, kind=fault.kind, start_tick=fault.start_tick, **self._where(fault)
            ),
        )
        return fault.to_json(self.sim.dt)

    def clear(self, fault_id: int) -> dict[str, Any]:
        return self.sim.clear(fault_id).to_json(self.sim.dt)

    def clear_all(self) -> list[dict[str, Any]]:
        cleared = []
        for fault in list(self.sim.faults.faults.values()):
            if fault.status in ("scheduled", "active"):
                cleared.append(self.sim.clear(fault.id).to_json(self.sim.dt))
        return cleared

    def truth_now(self, points: list[str]) -> dict[str, Any]:
        sim = self.sim
        return {
            "tick": sim.tick,
            "sim_s": round(sim.sim_s, 6),
            "wall_ms": self.tick_wall_ms(sim.tick),
            "points": {n: sim.truth_json(n) for n in points},
        }

    def _recorded(self) -> GroundTruth:
        if self.truth is None:
            raise NoGroundTruth("this run records no ground truth (--no-truth)")
        return self.truth

    async def truth_history(self, point: str, since_tick: int, limit: int) -> list[list[Any]]:
        rows = await self._recorded().query(
            "SELECT tick, sim_s, wall_ms, value FROM truth "
            "WHERE point = ? AND tick >= ? ORDER BY tick LIMIT ?",
            [point, since_tick, limit],
        )
        return [list(r) for r in rows]

    async def truth_writes(
        self, points: list[str], since_tick: int, limit: int
    ) -> list[dict[str, Any]]:
        return await self._recorded().writes_of(points, since_tick, limit)
