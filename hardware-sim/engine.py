"""The simulation core: process, sensors and faults stepped tick by tick (sans-I/O).

Determinism is the point of this module. A run is fully described by the scenario, the
seed, and the list of client writes and runtime faults *with the tick at which they
took effect*; ``Simulation`` replays such a list exactly (see ``replay``). Nothing in
here reads a clock or touches a socket: the runner decides when a tick happens.

Per tick, in order: fault windows open and close (process faults set the components'
impairments), pending client writes are applied to the process, the process steps by
``dt``, and every point's reported value is computed: ``true value + measurement
noise`` followed by the point's active value faults in id order. A client reading twice
within one tick sees the same value, like a transmitter that updates its output once
per cycle.

Writes: a client write is checked against the point's limits, then the point's actuator
fault (if one covers the tick the write takes effect) decides what the actuator does:
``applied`` (moves to the written value), ``ignored`` (stays where it was) or
``altered`` (moves to another value). The outcome is decided when the write arrives, so
the register or node shows it at once and a read-back straight after the write already
tells the truth. Every write is reported with what was written, what the variable was
before and what it became (``AppliedWrite``), which the ground truth records.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from fieldtwin.sim.errors import WriteRejected
from fieldtwin.sim.faults import (
    ACTUATOR_KINDS,
    PROCESS_KINDS,
    Fault,
    FaultBook,
    FaultRequest,
    check_request,
)
from fieldtwin.sim.scenario import PointSpec, Scenario

OUTCOMES = ("applied", "ignored", "altered")


@dataclass(frozen=True, slots=True)
class AppliedWrite:
    """A client write as it took effect: the tick it was applied at, and who sent it.

    ``value`` is what the client wrote; ``result`` what the variable became (``None``
    until the tick for an ignored write) and ``before`` what it was just before (set at
    the tick). ``outcome`` is ``applied``, ``ignored`` or ``altered``; ``fault_id`` the
    actuator fault that decided an ignored or altered write.
    """

    tick: int
    point: str
    variable: str
    value: float
    device: str = ""
    protocol: str = ""
    wall_ms: int = 0
    outcome: str = "applied"
    result: float | None = None
    before: float | None = None
    fault_id: int | None = None
    seq: int = 0  # arrival order among all client writes of a run (0: not numbered)

    @property
    def moves(self) -> bool:
        """Whether the write reaches the process (applied or altered)."""
        return self.outcome != "ignored"

    @property
    def target(self) -> float:
        """The value the actuator goes to when the write moves it."""
        return self.value if self.result is None else self.result


@dataclass(slots=True)
class TickResult:
    tick: int
    sim_s: float
    writes: list[AppliedWrite] = field(default_factory=list)
    started: list[Fault] = field(default_factory=list)
    ended: list[Fault] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """A runtime fault as it happened, for replay: injected for ticks [start, end)."""

    request: FaultRequest
    start_tick: int
    end_tick: int | None


class Simulation:
    def __init__(self, scenario: Scenario, seed: int | None = None) -> None:
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        self.dt = scenario.tick
        self.plant = scenario.build_plant(self.seed)
        # Mirrors (same_as) come after the points they repeat, so they see this tick's value.
        ordered = sorted(scenario.points.values(), key=lambda p: p.same_as is not None)
        self.points: dict[str, PointSpec] = {p.name: p for p in ordered}
        self.topology = scenario.topology()
        self._rngs = {name: random.Random(f"{self.seed}:point:{name}") for name in self.points}
        self.faults = FaultBook(self.seed)
        self.tick = 0
        self.reported: dict[str, float] = {}
        self._pending: list[AppliedWrite] = []
        self._shadow: dict[str, float] = {}
        for scheduled in scenario.faults:
            start = max(1, round(scheduled.at / self.dt))
            end = self._end_tick(start, scheduled.duration, scheduled.request.kind)
            self.faults.add(scheduled.request, start, end, "scenario")
        self._measure()
        self._actuator_faults = any(f.kind in ACTUATOR_KINDS for f in self.faults.faults.values())

    # -- time --------------------------------------------------------------------------

    @property
    def sim_s(self) -> float:
        return self.tick * self.dt

    def ticks_for(self, seconds: float) -> int:
        return max(1, round(seconds / self.dt))

    def _end_tick(self, start: int, duration: float | None, kind: str) -> int | None:
        if duration is None:
            return start + 1 if kind == "spike" else None
        return start + self.ticks_for(duration)

    def step(self) -> TickResult:
        """Advance one tick and return what happened in it."""
        self.tick += 1
        result = TickResult(self.tick, self.sim_s)
        started, ended = self.faults.advance(self.tick)
        if any(f.kind in PROCESS_KINDS for f in (*started, *ended)):
            self._impair()
        state = self.plant.state
        for write in self._pending:
            before = state[write.variable]
            after = write.target if write.moves else before
            self.plant.set(write.variable, after)
            result.writes.append(replace(write, tick=self.tick, before=before, result=after))
        self._pending.clear()
        self._shadow.clear()
        self.plant.step(self.dt)
        for fault in started:
            if fault.kind == "stuck" and fault.request.point is not None:
                given = fault.request.params.get("value")
                fault.frozen = (
                    float(given) if given is not None else self.reported[fault.request.point]
                )
        result.started = started
        result.ended = ended
        self._measure()
        return result

    def _impair(self) -> None:
        by_component: dict[str, list[tuple[str, Any]]] = {}
        for fault in self.faults.process_faults():
            by_component.setdefault(fault.request.component or "", []).append(
                (fault.kind, fault.request.params)
            )
        self.plant.impair(by_component)

    def _measure(self) -> None:
        state = self.plant.state
        t = self.sim_s
        active = bool(self.faults.active)
        for name, point in self.points.items():
            value = self.reported[point.same_as] if point.same_as else state[point.source]
            if point.noise > 0.0:
                value += self._rngs[name].gauss(0.0, point.noise)
            if active:
                for fault in self.faults.value_faults(name):
                    value = fault.apply(value, t, self.dt)
            self.reported[name] = value

    # -- values ------------------------------------------------------------------------

    def true_value(self, point: str) -> float:
        return self.plant.state[self.points[point].source]

    def noise(self, point: str) -> float:
        """Standard deviation of the measurement noise on ``point`` (through ``same_as``),
        so a client comparing reported with true values knows what spread to expect."""
        variance = 0.0
        name: str | None = point
        while name:
            spec = self.points[name]
            variance += spec.noise**2
            name = spec.same_as or None
        return float(variance**0.5)

    def truth_json(self, point: str) -> dict[str, float]:
        return {
            "true": self.true_value(point),
            "reported": self.value(point),
            "noise": self.noise(point),
        }

    def value(self, point: str) -> float:
        """What the device reports for ``point`` now (a pending write shows at once)."""
        spec = self.points[point]
        if spec.writable and spec.source in self._shadow:
            return self._shadow[spec.source]
        return self.reported[point]

    def truth_rows(self) -> Iterable[tuple[str, float]]:
        state = self.plant.state
        return ((name, state[p.source]) for name, p in self.points.items())

    # -- writes ------------------------------------------------------------------------

    def check_write(self, point: str, value: float) -> float:
        """The value a write would set, or ``WriteRejected`` saying why it cannot."""
        spec = self.points.get(point)
        if spec is None:
            raise WriteRejected(point, "no such point")
        if not spec.writable:
            raise WriteRejected(point, "read-only")
        if not math.isfinite(value):
            raise WriteRejected(point, f"{value} is not a finite number")
        if spec.boolean:
            return 1.0 if value >= 0.5 else 0.0
        if spec.low is not None and spec.high is not None and not spec.low <= value <= spec.high:
            raise WriteRejected(point, f"{value:g} is outside {spec.low:g}..{spec.high:g}")
        return value

    def request_write(
        self,
        point: str,
        value: float,
        *,
        device: str = "",
        protocol: str = "",
        wall_ms: int = 0,
        seq: int = 0,
        actuator_faults: bool = True,
    ) -> AppliedWrite:
        """Queue a client write for the next tick; raises ``WriteRejected`` if not allowed.

        The point's actuator fault (if any covers the next tick) decides what the write
        does; ``actuator_faults=False`` applies it as given (``replay`` of recorded
        results, which already carry the faults' effect).
        """
        value = self.check_write(point, value)
        spec = self.points[point]
        tick = self.tick + 1
        write = AppliedWrite(
            tick, point, spec.source, value, device, protocol, wall_ms, result=value, seq=seq
        )
        if actuator_faults and self._actuator_faults:
            fault = self.faults.actuator_fault(point, tick)
            if fault is not None:
                write = self._actuate(write, spec, fault)
        self._pending.append(write)
        if write.moves:
            self._shadow[spec.source] = write.target
        return write

    def _actuate(self, write: AppliedWrite, spec: PointSpec, fault: Fault) -> AppliedWrite:
        """What a faulty actuator does with ``write``; counts the write against the fault."""
        fault.writes_affected += 1
        if fault.exhausted:
            self.faults.end(fault.id, write.tick + 1)  # its last write: the window closes
        if fault.kind == "ignore_writes":
            return replace(write, outcome="ignored", result=None, fault_id=fault.id)
        given = fault.request.params.get("value")
        target = write.value + float(fault.param("offset")) if given is None else float(given)
        limits = self.plant.writable[spec.source]
        if limits.boolean:
            target = 1.0 if target >= 0.5 else 0.0
        target = min(max(target, limits.low), limits.high)  # the actuator's travel ends here
        return replace(write, outcome="altered", result=target, fault_id=fault.id)

    # -- faults ------------------------------------------------------------------------

    def inject(
        self,
        request: FaultRequest,
        duration: float | None = None,
        *,
        start_tick: int | None = None,
        end_tick: int | None = None,
    ) -> Fault:
        """Add a runtime fault from the next tick on (or at explicit ticks, for replay)."""
        request = check_request(request, self.topology)
        start = self.tick + 1 if start_tick is None else start_tick
        end = self._end_tick(start, duration, request.kind) if end_tick is None else end_tick
        if request.kind in ACTUATOR_KINDS:
            self._actuator_faults = True
        return self.faults.add(request, start, end, "runtime")

    def clear(self, fault_id: int) -> Fault:
        """End a fault at the next tick boundary."""
        return self.faults.end(fault_id, self.tick + 1)

    def state_json(self) -> dict[str, Any]:
        return {
            "tick": self.tick,
            "sim_s": round(self.sim_s, 6),
            "points": {name: self.truth_json(name) for name in self.points},
        }


def replay(
    scenario: Scenario,
    ticks: int,
    *,
    seed: int | None = None,
    writes: Iterable[AppliedWrite] = (),
    faults: Iterable[FaultEvent] = (),
) -> list[tuple[int, str, float]]:
    """Run the model alone for ``ticks`` ticks with writes and faults at their recorded
    ticks; returns the ground truth as (tick, point, true value) rows.

    ``writes`` are what reached the process: the ground truth's writes that moved
    (``status IN ('applied', 'altered')``) with their ``result`` as the value. Actuator
    faults among ``faults`` therefore do not act on them again; process faults do act.
    """
    sim = Simulation(scenario, seed)
    by_tick: dict[int, list[AppliedWrite]] = {}
    for write in writes:
        by_tick.setdefault(write.tick, []).append(write)
    for event in faults:
        sim.inject(event.request, start_tick=event.start_tick, end_tick=event.end_tick)
    rows = [(0, name, value) for name, value in sim.truth_rows()]
    for _ in range(ticks):
        for write in by_tick.get(sim.tick + 1, []):
            sim.request_write(write.point, write.value, actuator_faults=False)
        sim.step()
        rows.extend((sim.tick, name, value) for name, value in sim.truth_rows())
    return rows
