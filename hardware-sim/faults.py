"""The fault catalogue, fault requests and the book of fault windows (sans-I/O).

Four families:

- Value faults change what a sensor reports (the process itself is untouched, so
  ground truth stays true): ``stuck``, ``drift``, ``spike``, ``noise``.
- Link faults change how a device answers: ``dropout``, ``slow``, ``disconnect``,
  ``corrupt``, ``exception`` (Modbus) and ``bad_status`` (OPC-UA).
- Actuator faults change what a client *write* does to a writable point:
  ``ignore_writes`` (the write is acknowledged, nothing moves) and ``wrong_value`` (the
  actuator goes to another value: the written one plus an offset, or a fixed value).
  The device answers the write normally; only a read-back shows the truth, so a
  command's verification can fail for real.
- Process faults change the plant itself, while every sensor stays truthful: ``leak``
  (an extra outflow from a tank) and ``fouling`` (a boiler's heater transfers only part
  of its power to the water). They target a process component, not a device.

A fault is active on the ticks ``[start_tick, end_tick)``; windows open and close only
at tick boundaries, so a replay of the same windows gives the same served values.
"""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fieldtwin.sim.errors import FaultError, UnknownFault

VALUE_KINDS = ("stuck", "drift", "spike", "noise")
LINK_KINDS = ("dropout", "slow", "disconnect", "corrupt", "exception", "bad_status")
ACTUATOR_KINDS = ("ignore_writes", "wrong_value")
PROCESS_KINDS = ("leak", "fouling")
KINDS = VALUE_KINDS + LINK_KINDS + ACTUATOR_KINDS + PROCESS_KINDS

# The process component type each process fault applies to.
PROCESS_TARGETS = {"leak": "tank", "fouling": "boiler"}

SUPPORT: dict[str, tuple[str, ...]] = {
    "stuck": ("modbus-tcp", "modbus-rtu", "serial-line", "opcua"),
    "drift": ("modbus-tcp", "modbus-rtu", "serial-line", "opcua"),
    "spike": ("modbus-tcp", "modbus-rtu", "serial-line", "opcua"),
    "noise": ("modbus-tcp", "modbus-rtu", "serial-line", "opcua"),
    "dropout": ("modbus-tcp", "modbus-rtu", "serial-line", "opcua"),
    "slow": ("modbus-tcp", "modbus-rtu", "serial-line", "opcua"),
    "disconnect": ("modbus-tcp", "modbus-rtu", "serial-line", "opcua"),
    "corrupt": ("modbus-rtu", "serial-line"),
    "exception": ("modbus-tcp", "modbus-rtu"),
    "bad_status": ("opcua",),
    # Writable points exist on Modbus and OPC-UA devices only.
    "ignore_writes": ("modbus-tcp", "modbus-rtu", "opcua"),
    "wrong_value": ("modbus-tcp", "modbus-rtu", "opcua"),
}

MODBUS_EXCEPTION_CODES = (1, 2, 3, 4, 5, 6, 8, 10, 11)


@dataclass(frozen=True, slots=True)
class Param:
    default: float | int | str | None
    kind: type = float
    low: float | None = None
    high: float | None = None
    doc: str = ""


PARAMS: dict[str, dict[str, Param]] = {
    "stuck": {
        "value": Param(None, doc="value to report (default: the last value before the fault)")
    },
    "drift": {
        "rate": Param(0.01, doc="bias growth in engineering units per simulated second"),
        "offset": Param(0.0, doc="bias present from the first tick of the fault"),
    },
    "spike": {"magnitude": Param(10.0, doc="added to the value while the spike lasts")},
    "noise": {"sigma": Param(1.0, low=0.0, doc="standard deviation of the extra noise")},
    "dropout": {},
    "slow": {"delay_ms": Param(2000.0, low=0.0, high=600_000.0, doc="wall-clock delay per answer")},
    "disconnect": {},
    "corrupt": {"probability": Param(1.0, low=0.0, high=1.0, doc="share of frames corrupted")},
    "exception": {"code": Param(4, kind=int, doc="Modbus exception code (1-6, 8, 10, 11)")},
    "bad_status": {"status": Param("BadSensorFailure", kind=str, doc="OPC-UA status code name")},
    "ignore_writes": {
        "count": Param(None, kind=int, low=1, doc="only the first COUNT writes (default: all)"),
    },
    "wrong_value": {
        "offset": Param(None, doc="the actuator goes to the written value plus this"),
        "value": Param(None, doc="the actuator goes to this value whatever is written"),
        "count": Param(None, kind=int, low=1, doc="only the first COUNT writes (default: all)"),
    },
    "leak": {
        "cv": Param(2.0, low=0.0, high=1e6, doc="leak flow in m3/h per sqrt(m) of level"),
    },
    "fouling": {
        "efficiency": Param(
            0.5, low=0.0, high=1.0, doc="share of the heater's power that reaches the water"
        ),
    },
}


@dataclass(frozen=True, slots=True)
class FaultRequest:
    """What to break: a kind, where (device / unit / point, or a process component for
    process faults) and the kind's parameters."""

    kind: str
    device: str | None = None
    point: str | None = None
    unit_id: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    component: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "device": self.device,
            "point": self.point,
            "unit_id": self.unit_id,
            "component": self.component,
            "params": dict(self.params),
        }


@dataclass(frozen=True, slots=True)
class Topology:
    """What exists in a scenario, for checking fault requests."""

    devices: Mapping[str, str]  # device id -> protocol
    unit_ids: Mapping[str, list[int]]
    points: Mapping[str, tuple[str, bool]]  # point -> (device, boolean)
    synthetic: frozenset[str] = frozenset()
    writable: frozenset[str] = frozenset()  # points clients may write
    components: Mapping[str, str] = field(default_factory=dict)  # process component -> type


def suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def read_params(kind: str, get: Callable[[str, Any], Any]) -> dict[str, Any]:
    """Read ``kind``'s parameters through ``get(key, default)``, checking types and ranges."""
    if kind not in PARAMS:
        raise FaultError(
            "kind",
            f"unknown fault kind {kind!r}{suggest(kind, KINDS)} (kinds: {', '.join(KINDS)})",
        )
    params: dict[str, Any] = {}
    for key, spec in PARAMS[kind].items():
        value = get(key, spec.default)
        if value is None:
            continue
        if spec.kind is str:
            if not isinstance(value, str) or not value:
                raise FaultError(key, f"expected a non-empty string, got {value!r}")
        elif spec.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise FaultError(key, f"expected an integer, got {value!r}")
            if spec.low is not None and value < spec.low:
                raise FaultError(key, f"{value} is below the minimum {spec.low:g}")
        else:
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise FaultError(key, f"expected a number, got {value!r}")
            value = float(value)
            if (spec.low is not None and value < spec.low) or (
                spec.high is not None and value > spec.high
            ):
                raise FaultError(key, f"{value} is out of range {spec.low}..{spec.high}")
        params[key] = value
    if kind == "exception" and params["code"] not in MODBUS_EXCEPTION_CODES:
        raise FaultError(
            "code", f"{params['code']} is not a Modbus exception code {MODBUS_EXCEPTION_CODES}"
        )
    if kind == "bad_status":
        _check_status_name(params["status"])
    if kind == "wrong_value" and ("offset" in params) == ("value" in params):
        raise FaultError(
            "offset",
            "wrong_value needs exactly one of offset (the actuator goes to the written value "
            "plus offset) or value (it goes to that value whatever is written)",
        )
    return params


def _check_status_name(name: str) -> None:
    # The OPC-UA stack owns the list of status codes.
    from asyncua.ua.status_codes import StatusCodes

    if not name.startswith("Bad") or not hasattr(StatusCodes, name):
        raise FaultError(
            "status", f"{name!r} is not an OPC-UA Bad status code (e.g. BadSensorFailure)"
        )


def params_from_mapping(kind: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters from a JSON object; unknown names are refused."""
    known = PARAMS.get(kind, {})
    for key in given:
        if key not in known:
            valid = ", ".join(known) or "(none)"
            raise FaultError(
                key, f"{kind} takes no parameter {key!r}{suggest(key, known)} (valid: {valid})"
            )
    return read_params(kind, lambda key, default: given.get(key, default))


def check_request(request: FaultRequest, topology: Topology) -> FaultRequest:
    """Resolve the device from the point and refuse scopes the fault kind cannot have."""
    kind = request.kind
    if kind not in KINDS:
        raise FaultError("kind", f"unknown fault kind {kind!r}{suggest(kind, KINDS)}")
    if kind in PROCESS_KINDS:
        return _check_process_request(request, topology)
    if request.component is not None:
        raise FaultError(
            "component",
            f"{kind} happens on a device; component applies to process faults "
            f"({', '.join(PROCESS_KINDS)}) only",
        )
    device = request.device
    if request.point is not None:
        if request.point not in topology.points:
            raise FaultError(
                "point",
                f"unknown point {request.point!r}{suggest(request.point, topology.points)}",
            )
        owner = topology.points[request.point][0]
        if device is not None and device != owner:
            raise FaultError(
                "device", f"point {request.point!r} is served by {owner!r}, not {device!r}"
            )
        device = owner
    if device is None:
        raise FaultError("device", "name the device (or, for value faults, the point)")
    if device not in topology.devices:
        raise FaultError("device", f"unknown device {device!r}{suggest(device, topology.devices)}")
    protocol = topology.devices[device]
    if protocol not in SUPPORT[kind]:
        raise FaultError(
            "kind",
            f"{kind} cannot happen on a {protocol} device "
            f"(it works on: {', '.join(SUPPORT[kind])})",
        )
    params = params_from_mapping(kind, request.params)
    if kind in VALUE_KINDS:
        if request.point is None:
            raise FaultError("point", f"{kind} changes one point's value: name the point")
        if topology.points[request.point][1] and kind != "stuck":
            raise FaultError("kind", f"{request.point} is on/off; only 'stuck' applies to it")
    elif kind in ACTUATOR_KINDS:
        _check_actuator_request(kind, request.point, params, topology)
    elif request.point is not None and kind not in ("exception", "bad_status"):
        raise FaultError("point", f"{kind} affects a whole device (or unit): drop the point")
    if request.unit_id is not None:
        if kind in VALUE_KINDS or kind in ACTUATOR_KINDS or kind in ("disconnect", "bad_status"):
            raise FaultError("unit_id", f"{kind} does not take a unit id")
        if protocol not in ("modbus-tcp", "modbus-rtu"):
            raise FaultError("unit_id", f"{device} is not a Modbus device")
        if request.unit_id not in topology.unit_ids.get(device, []):
            raise FaultError(
                "unit_id",
                f"{device} has no unit {request.unit_id} (units: {topology.unit_ids.get(device)})",
            )
    return FaultRequest(kind, device, request.point, request.unit_id, params)


def _check_actuator_request(
    kind: str, point: str | None, params: Mapping[str, Any], topology: Topology
) -> None:
    writable = ", ".join(sorted(topology.writable)) or "none in this scenario"
    if point is None:
        raise FaultError(
            "point", f"{kind} acts on one writable point: name it (writable: {writable})"
        )
    if point not in topology.writable:
        raise FaultError(
            "point", f"{point} is read-only; {kind} needs a writable point (writable: {writable})"
        )
    if kind == "wrong_value" and topology.points[point][1]:
        if "offset" in params:
            raise FaultError("offset", f"{point} is on/off: give value = 0 or 1, not an offset")
        if params["value"] not in (0.0, 1.0):
            raise FaultError("value", f"{point} is on/off: value must be 0 or 1")


def _check_process_request(request: FaultRequest, topology: Topology) -> FaultRequest:
    kind = request.kind
    for key in ("device", "point", "unit_id"):
        if getattr(request, key) is not None:
            raise FaultError(
                key,
                f"{kind} is a fault of the process, not of a device: name only the "
                f"component (e.g. a {PROCESS_TARGETS[kind]})",
            )
    want = PROCESS_TARGETS[kind]
    fitting = sorted(name for name, type_ in topology.components.items() if type_ == want)
    component = request.component
    if component is None:
        raise FaultError(
            "component", f"name the {want} that has the {kind} ({want}s: {', '.join(fitting)})"
        )
    if component not in topology.components:
        raise FaultError(
            "component",
            f"unknown process component {component!r}{suggest(component, topology.components)}",
        )
    if topology.components[component] != want:
        raise FaultError(
            "component",
            f"{component} is a {topology.components[component]}; {kind} happens to a {want} "
            f"({want}s: {', '.join(fitting) or 'none in this scenario'})",
        )
    params = params_from_mapping(kind, request.params)
    return FaultRequest(kind, params=params, component=component)


@dataclass
class Fault:
    """One fault window and its runtime state."""

    id: int
    request: FaultRequest
    source: str  # "scenario" or "runtime"
    start_tick: int
    end_tick: int | None
    rng: random.Random
    status: str = "scheduled"  # scheduled -> active -> ended (or cancelled)
    frozen: float | None = None
    start_wall_ms: int | None = None
    end_wall_ms: int | None = None
    writes_affected: int = 0  # actuator faults: writes this fault decided

    @property
    def kind(self) -> str:
        return self.request.kind

    def param(self, key: str) -> Any:
        return self.request.params.get(key, PARAMS[self.kind][key].default)

    def apply(self, value: float, t: float, dt: float) -> float:
        """The reported value while this value fault is active at simulated time ``t``."""
        kind = self.kind
        if kind == "stuck":
            return value if self.frozen is None else self.frozen
        if kind == "drift":
            elapsed = t - self.start_tick * dt
            return value + float(self.param("offset")) + float(self.param("rate")) * elapsed
        if kind == "spike":
            return value + float(self.param("magnitude"))
        if kind == "noise":
            return value + self.rng.gauss(0.0, float(self.param("sigma")))
        return value

    def covers(self, tick: int) -> bool:
        """Whether ``tick`` lies in this fault's window (known before the window opens)."""
        return (
            self.status != "cancelled"
            and self.start_tick <= tick
            and (self.end_tick is None or tick < self.end_tick)
        )

    @property
    def exhausted(self) -> bool:
        """An actuator fault limited to ``count`` writes that has had them all."""
        count = self.request.params.get("count")
        return count is not None and self.writes_affected >= int(count)

    def to_json(self, dt: float) -> dict[str, Any]:
        out = self.request.to_json()
        out.update(
            id=self.id,
            source=self.source,
            status=self.status,
            start_tick=self.start_tick,
            end_tick=self.end_tick,
            start_sim_s=round(self.start_tick * dt, 6),
            end_sim_s=None if self.end_tick is None else round(self.end_tick * dt, 6),
            start_wall_ms=self.start_wall_ms,
            end_wall_ms=self.end_wall_ms,
        )
        if self.kind in ACTUATOR_KINDS:
            out["writes_affected"] = self.writes_affected
        return out


@dataclass(frozen=True, slots=True)
class LinkFaults:
    """How a device (or one unit on a bus) answers right now."""

    dropout: bool = False
    delay_ms: float = 0.0
    corrupt: float = 0.0
    exception: int | None = None
    disconnected: bool = False

    @property
    def healthy(self) -> bool:
        return self == _HEALTHY


_HEALTHY = LinkFaults()


class FaultBook:
    """Every fault of a run: scheduled, active and ended, in id order."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.faults: dict[int, Fault] = {}
        self._active: list[Fault] = []
        self._next_id = 1

    def add(
        self, request: FaultRequest, start_tick: int, end_tick: int | None, source: str
    ) -> Fault:
        fault = Fault(
            id=self._next_id,
            request=request,
            source=source,
            start_tick=start_tick,
            end_tick=end_tick,
            rng=random.Random(f"{self.seed}:fault:{self._next_id}"),
        )
        self.faults[fault.id] = fault
        self._next_id += 1
        return fault

    def end(self, fault_id: int, tick: int) -> Fault:
        """Make a fault end at ``tick`` (the next tick boundary when cleared at run time)."""
        fault = self.faults.get(fault_id)
        if fault is None:
            raise UnknownFault(fault_id)
        if fault.status in ("ended", "cancelled"):
            return fault
        if fault.end_tick is None or fault.end_tick > tick:
            fault.end_tick = max(tick, fault.start_tick)
        return fault

    def advance(self, tick: int) -> tuple[list[Fault], list[Fault]]:
        """Open and close windows for ``tick``; returns (started, ended)."""
        started: list[Fault] = []
        ended: list[Fault] = []
        for fault in self.faults.values():
            if fault.status == "scheduled":
                if fault.end_tick is not None and fault.end_tick <= fault.start_tick:
                    fault.status = "cancelled"
                elif fault.start_tick <= tick:
                    fault.status = "active"
                    started.append(fault)
            if fault.status == "active" and fault.end_tick is not None and fault.end_tick <= tick:
                fault.status = "ended"
                ended.append(fault)
        if started or ended:
            self._active = [f for f in self.faults.values() if f.status == "active"]
        return started, ended

    @property
    def active(self) -> list[Fault]:
        return self._active

    def actuator_fault(self, point: str, tick: int) -> Fault | None:
        """The actuator fault that decides a write to ``point`` taking effect at ``tick``.

        Looks at windows, not at ``active``: a write received now reaches the process at
        the next tick, and a fault injected now starts at that tick too. If several are
        in force, the most recently injected decides.
        """
        deciding = None
        for fault in self.faults.values():
            if (
                fault.kind in ACTUATOR_KINDS
                and fault.request.point == point
                and fault.covers(tick)
                and not fault.exhausted
            ):
                deciding = fault
        return deciding

    def process_faults(self) -> list[Fault]:
        """Active process faults (leak, fouling), in id order."""
        return [f for f in self._active if f.kind in PROCESS_KINDS]

    def value_faults(self, point: str) -> list[Fault]:
        return [f for f in self._active if f.request.point == point and f.kind in VALUE_KINDS]

    def link(self, device: str, unit_id: int | None = None) -> LinkFaults:
        """Device- or unit-wide link faults in force for ``device`` (and ``unit_id``)."""
        if not self._active:
            return _HEALTHY
        dropout = disconnected = False
        delay = corrupt = 0.0
        exception: int | None = None
        for fault in self._active:
            req = fault.request
            if req.device != device or fault.kind in VALUE_KINDS or req.point is not None:
                continue
            if req.unit_id is not None and unit_id is not None and req.unit_id != unit_id:
                continue
            if req.unit_id is not None and unit_id is None and fault.kind != "disconnect":
                continue
            if fault.kind == "dropout":
                dropout = True
            elif fault.kind == "disconnect":
                disconnected = True
            elif fault.kind == "slow":
                delay = max(delay, float(fault.param("delay_ms")))
            elif fault.kind == "corrupt":
                corrupt = max(corrupt, float(fault.param("probability")))
            elif fault.kind == "exception":
                exception = int(fault.param("code"))
        return LinkFaults(dropout, delay, corrupt, exception, disconnected)

    def point_exception(self, point: str) -> int | None:
        for fault in self._active:
            if fault.kind == "exception" and fault.request.point == point:
                return int(fault.param("code"))
        return None

    def point_status(self, device: str, point: str) -> str | None:
        for fault in self._active:
            req = fault.request
            if fault.kind == "bad_status" and req.device == device and req.point in (None, point):
                return str(fault.param("status"))
        return None

    def corrupt_now(self, device: str, unit_id: int | None = None) -> bool:
        """Draw whether this frame is corrupted (from the fault's own random stream)."""
        for fault in self._active:
            req = fault.request
            if fault.kind == "corrupt" and req.device == device and req.unit_id in (None, unit_id):
                return fault.rng.random() < float(fault.param("probability"))
        return False
