"""What every device server shares: the simulation, the ground truth and the counters."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from fieldtwin.protocol.logfmt import fields
from fieldtwin.sim.engine import AppliedWrite, Simulation
from fieldtwin.sim.errors import EndpointError, WriteRejected
from fieldtwin.sim.faults import LinkFaults
from fieldtwin.sim.truth import GroundTruth

log = logging.getLogger("fieldtwin.sim")


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class SimContext:
    """The single owner of the simulation state, used by servers on the event loop."""

    def __init__(
        self,
        sim: Simulation,
        truth: GroundTruth | None,
        *,
        record_served: bool = True,
        unrecorded_devices: frozenset[str] = frozenset(),
    ) -> None:
        self.sim = sim
        self.truth = truth
        self.record_served = record_served and truth is not None
        self.unrecorded_devices = unrecorded_devices
        self.counters: Counter[str] = Counter()
        self.writes_received = 0  # numbers every client write, accepted or not

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def served(
        self,
        device: str,
        protocol: str,
        point: str,
        value: float | None,
        status: str = "good",
        via: str = "read",
    ) -> None:
        """Record one value a client received (or could receive, for OPC-UA publishes)."""
        self.counters["served_values"] += 1
        if not self.record_served or device in self.unrecorded_devices or self.truth is None:
            return
        sim = self.sim
        self.truth.add_served(
            wall_ms(), sim.tick, sim.sim_s, device, protocol, point, value, status, via
        )

    def check_write(self, point: str, value: float, *, device: str, protocol: str) -> None:
        """Raise ``WriteRejected`` (and record the refusal) if the write is not allowed."""
        try:
            self.sim.check_write(point, value)
        except WriteRejected as exc:
            self._rejected(exc, value, device, protocol)
            raise

    def _rejected(self, exc: WriteRejected, value: float, device: str, protocol: str) -> None:
        sim = self.sim
        self.writes_received += 1
        self.counters["writes_rejected"] += 1
        log.info(
            "write rejected",
            extra=fields(device=device, point=exc.point, value=value, problem=exc.problem),
        )
        if self.truth is not None:
            spec = sim.points.get(exc.point)
            self.truth.add_write(
                wall_ms(), sim.tick, sim.sim_s, device, protocol, exc.point,
                spec.source if spec else "", value, "rejected", exc.problem,
                seq=self.writes_received,
            )  # fmt: skip

    def write(self, point: str, value: float, *, device: str, protocol: str) -> AppliedWrite:
        """Accept a client write for the next tick, or raise ``WriteRejected`` (recorded too).

        Returns the write with its outcome: an actuator fault may have decided that the
        actuator ignores it or goes elsewhere (the device still acknowledges it).
        """
        now = wall_ms()
        try:
            write = self.sim.request_write(
                point,
                value,
                device=device,
                protocol=protocol,
                wall_ms=now,
                seq=self.writes_received + 1,
            )
        except WriteRejected as exc:
            self._rejected(exc, value, device, protocol)
            raise
        self.writes_received += 1
        self.counters["writes_accepted"] += 1
        if write.outcome == "applied":
            log.info("write accepted", extra=fields(device=device, point=point, value=value))
        else:
            self.counters[f"writes_{write.outcome}"] += 1
            log.info(
                f"write {write.outcome} by actuator fault",
                extra=fields(
                    device=device,
                    point=point,
                    value=value,
                    result=write.result,
                    fault_id=write.fault_id,
                ),
            )
        return write


class DisconnectFollower:
    """Takes a device off the air while a ``disconnect`` fault is active.

    ``notify()`` after fault windows change; ``run()`` (one task per device) calls
    ``go_offline``/``go_online`` on transitions. Coming back can fail (the port was
    taken meanwhile): that is logged, counted and retried every second instead of
    stopping the simulator.
    """

    RETRY_S = 1.0

    def __init__(
        self,
        ctx: SimContext,
        device_id: str,
        go_offline: Callable[[], Awaitable[None]],
        go_online: Callable[[], Awaitable[None]],
        *,
        on_change: Callable[[LinkFaults], Awaitable[None]] | None = None,
    ) -> None:
        self.ctx = ctx
        self.device_id = device_id
        self.go_offline = go_offline
        self.go_online = go_online
        self.on_change = on_change
        self.offline = False
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            link = self.ctx.sim.faults.link(self.device_id)
            if self.on_change is not None:
                await self.on_change(link)
            try:
                if link.disconnected and not self.offline:
                    await self.go_offline()
                    self.offline = True
                    log.info("device disconnected", extra=fields(device=self.device_id))
                elif not link.disconnected and self.offline:
                    await self.go_online()
                    self.offline = False
                    log.info("device reconnected", extra=fields(device=self.device_id))
            except EndpointError as exc:
                self.count_retry(exc)
                await asyncio.sleep(self.RETRY_S)
                self._changed.set()

    def count_retry(self, exc: EndpointError) -> None:
        self.ctx.count("reconnect_failures")
        log.error("device cannot come back yet", extra=fields(device=self.device_id, error=exc))
