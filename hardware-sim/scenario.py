"""Scenario files: the plant, its devices and points, load devices and a fault schedule.

A scenario is TOML read through ``fieldtwin.protocol.config``: every problem names the
file, the key and the fix, and unknown keys are refused with a suggestion. The file
format is documented in docs/simulator.md; examples/scenarios/water-plant.toml is the
reference scenario (its device contract is docs/water-plant.md).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from fieldtwin.protocol.config import ConfigError, Section, load_toml
from fieldtwin.sim.codec import REGISTER_TYPES, Order, RegisterCodec, register_count
from fieldtwin.sim.errors import FaultError
from fieldtwin.sim.faults import FaultRequest, Topology, check_request, read_params
from fieldtwin.sim.modbus import BIT_TABLES, TABLES
from fieldtwin.sim.physics import Plant, build_component

PROTOCOLS = ("modbus-tcp", "modbus-rtu", "serial-line", "opcua")
IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
POINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\.[A-Za-z0-9_][A-Za-z0-9_.-]*$")
TALKER = re.compile(r"^[A-Z0-9]{1,8}$")


@dataclass(frozen=True, slots=True)
class PointSpec:
    """One value a device serves: where it lives on the wire and which variable it shows."""

    name: str
    device: str
    source: str
    noise: float = 0.0
    same_as: str | None = None
    unit: str = ""
    writable: bool = False
    low: float | None = None
    high: float | None = None
    boolean: bool = False
    # Modbus
    unit_id: int | None = None
    table: str | None = None
    address: int | None = None
    dtype: str = "float64"
    codec: RegisterCodec | None = None
    # OPC-UA
    node_id: str | None = None
    browse_name: str | None = None
    # serial line
    decimals: int = 1

    @property
    def width(self) -> int:
        """Registers (or bits) the point occupies."""
        return 1 if self.codec is None else self.codec.count

    def quantize(self, value: float) -> float:
        """The value a client decodes after the device's encoding."""
        if self.boolean:
            return 1.0 if value >= 0.5 else 0.0
        if self.codec is not None:
            return self.codec.quantize(value)
        if self.node_id is None:
            return round(value, self.decimals)
        return value


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    id: str
    protocol: str
    points: tuple[PointSpec, ...]
    host: str = "127.0.0.1"
    port: int = 0
    link: Path | None = None
    baudrate: int = 9600
    framing: str = "8N1"
    talker: str = ""
    interval: float = 1.0
    path: str = "/"
    namespace: str = ""
    object_name: str = ""

    @property
    def unit_ids(self) -> list[int]:
        return sorted({p.unit_id for p in self.points if p.unit_id is not None})

    @property
    def url(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}{self.path}"


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """N synthetic Modbus TCP devices x M registers for benchmarks (see docs/simulator.md)."""

    devices: int = 0
    registers_per_device: int = 200
    point_type: str = "uint16"
    table: str = "input_registers"
    host: str = "127.0.0.1"
    base_port: int = 0
    id_prefix: str = "load-"
    record_served: bool = False

    def device_id(self, index: int) -> str:
        return f"{self.id_prefix}{index:03d}"

    @property
    def points_per_device(self) -> int:
        return self.registers_per_device // register_count(self.point_type)


@dataclass(frozen=True, slots=True)
class ScheduledFault:
    request: FaultRequest
    at: float
    duration: float | None


@dataclass(frozen=True)
class Scenario:
    path: Path
    name: str
    seed: int
    tick: float
    control_host: str
    control_port: int
    flush_interval: float
    record_served: bool
    process: tuple[tuple[str, Mapping[str, Any]], ...]
    devices: tuple[DeviceSpec, ...]
    load: LoadSpec
    faults: tuple[ScheduledFault, ...]
    sha256: str
    points: Mapping[str, PointSpec] = field(default_factory=dict)

    def build_plant(self, seed: int | None = None) -> Plant:
        """A fresh process model in its initial state, seeded with ``seed`` (or the file's)."""
        seed = self.seed if seed is None else seed
        components = [
            build_component(name, Section(data, self.path, f"process.{name}"), seed)
            for name, data in self.process
        ]
        plant = Plant(components)
        plant.check_references(str(self.path))
        plant.settle()
        return plant

    def topology(self) -> Topology:
        devices = {d.id: d.protocol for d in self.devices}
        units = {d.id: d.unit_ids for d in self.devices}
        for i in range(self.load.devices):
            devices[self.load.device_id(i)] = "modbus-tcp"
            units[self.load.device_id(i)] = [1]
        return Topology(
            devices=devices,
            unit_ids=units,
            points={p.name: (p.device, p.boolean) for p in self.points.values()},
            synthetic=frozenset(self.load.device_id(i) for i in range(self.load.devices)),
            writable=frozenset(p.name for p in self.points.values() if p.writable),
            components={name: str(data.get("type", "")) for name, data in self.process},
        )

    def device(self, device_id: str) -> DeviceSpec:
        for device in self.devices:
            if device.id == device_id:
                return device
        raise KeyError(device_id)


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_scenario(path: Path | str) -> Scenario:
    """Read and check a scenario file; raises ``ConfigError`` naming file, key and fix."""
    path = Path(path)
    root = load_toml(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    head = root.section("scenario", required=True)
    name = head.text("name")
    if not IDENT.match(name):
        raise head.error("name", f"{name!r} must match {IDENT.pattern}")
    seed = head.integer("seed", 1, min=0)
    tick = head.number("tick", 0.1, min=0.001, max=10.0)
    control = head.text("control", "127.0.0.1:17100")
    try:
        control_host, control_port = parse_hostport(control)
    except ValueError as exc:
        raise head.error("control", str(exc)) from None
    if not _is_loopback(control_host):
        raise head.error(
            "control",
            f"{control_host!r} is not a loopback address; the control interface has no "
            "authentication, so it only listens on 127.0.0.1 or ::1",
        )
    head.finish()

    truth = root.section("ground_truth")
    flush_interval = truth.number("flush_interval", 1.0, min=0.05, max=60.0)
    record_served = truth.flag("record_served", True)
    truth.finish()

    process = tuple((n, dict(s.data)) for n, s in root.table_items("process"))
    for comp_name, _ in process:
        if not IDENT.match(comp_name) or "." in comp_name:
            raise ConfigError(
                path, f"process.{comp_name}", "component names use letters, digits, - and _"
            )
    draft = Scenario(
        path=path,
        name=name,
        seed=seed,
        tick=tick,
        control_host=control_host,
        control_port=control_port,
        flush_interval=flush_interval,
        record_served=record_served,
        process=process,
        devices=(),
        load=LoadSpec(),
        faults=(),
        sha256=sha,
    )
    plant = draft.build_plant()

    devices = tuple(_read_device(s, plant) for s in root.sections("devices"))
    seen_devices: set[str] = set()
    points: dict[str, PointSpec] = {}
    links: dict[str, str] = {}
    ports: dict[tuple[str, int], str] = {}
    for index, device in enumerate(devices):
        where = f"devices[{index}]"
        if device.id in seen_devices:
            raise ConfigError(path, f"{where}.id", f"device id {device.id!r} is used twice")
        seen_devices.add(device.id)
        if device.link is not None:
            if str(device.link) in links:
                raise ConfigError(
                    path,
                    f"{where}.link",
                    f"{device.link} is also used by {links[str(device.link)]}",
                )
            links[str(device.link)] = device.id
        if device.port:
            key = (device.host, device.port)
            if key in ports:
                raise ConfigError(
                    path, f"{where}.port", f"port {device.port} is also used by {ports[key]}"
                )
            ports[key] = device.id
        for point in device.points:
            if point.name in points:
                raise ConfigError(
                    path,
                    f"{where}.points",
                    f"point {point.name!r} is also served by {points[point.name].device}; "
                    "point names (entity.attribute) are unique in a scenario",
                )
            points[point.name] = point

    load = _read_load(root.section("load"))
    for i in range(load.devices):
        if load.device_id(i) in seen_devices:
            raise ConfigError(
                path, "load.id_prefix", f"{load.device_id(i)} clashes with a device id"
            )
    if not devices and not load.devices:
        raise root.error("devices", "the scenario serves nothing: add [[devices]] or [load]")

    scenario = replace(draft, devices=devices, load=load, points=points)
    topology = scenario.topology()
    faults = tuple(_read_fault(s, topology) for s in root.sections("faults"))
    root.finish()
    return replace(scenario, faults=faults)


def _read_device(section: Section, plant: Plant) -> DeviceSpec:
    device_id = section.text("id")
    if not IDENT.match(device_id):
        raise section.error("id", f"{device_id!r} must match {IDENT.pattern}")
    protocol = section.text("protocol", choices=PROTOCOLS)
    kwargs: dict[str, Any] = {}
    if protocol in ("modbus-tcp", "opcua"):
        kwargs["host"] = section.text("host", "127.0.0.1")
        kwargs["port"] = section.integer("port", min=1, max=65535)
    if protocol in ("modbus-rtu", "serial-line"):
        kwargs["link"] = section.path("link")
        kwargs["baudrate"] = section.integer(
            "baudrate", 19200 if protocol == "modbus-rtu" else 9600, min=300, max=4_000_000
        )
        framing = section.text("framing", "8N1")
        if not re.fullmatch(r"[5-8][NEOMS][12]", framing):
            raise section.error(
                "framing", f"{framing!r} is not like 8N1 (data bits, parity, stop bits)"
            )
        kwargs["framing"] = framing
    if protocol == "serial-line":
        talker = section.text("talker", "AMB")
        if not TALKER.match(talker):
            raise section.error("talker", "use 1-8 upper-case letters or digits, e.g. AMB")
        kwargs["talker"] = talker
        kwargs["interval"] = section.number("interval", 1.0, min=0.01, max=3600.0)
    if protocol == "opcua":
        opc_path = section.text("path", f"/fieldtwin/{device_id}")
        if not opc_path.startswith("/"):
            raise section.error("path", "the endpoint path starts with '/', e.g. /fieldtwin/boiler")
        kwargs["path"] = opc_path
        kwargs["namespace"] = section.text("namespace")
        kwargs["object_name"] = section.text("object")
    point_sections = section.sections("points", required=True)
    points = tuple(_read_point(p, device_id, protocol, plant) for p in point_sections)
    by_name = {p.name: p for p in points}
    resolved = []
    for index, point in enumerate(points):
        if point.same_as is not None:
            original = by_name.get(point.same_as)
            if original is None or original.same_as is not None:
                raise ConfigError(
                    section.file,
                    f"{section.key_path('points')}[{index}].same_as",
                    f"{point.same_as!r} is not a point of this device "
                    "(a mirror cannot mirror a mirror)",
                )
            if original.boolean != point.boolean:
                raise ConfigError(
                    section.file,
                    f"{section.key_path('points')}[{index}].same_as",
                    "on/off and numeric points cannot mirror each other",
                )
            point = replace(point, source=original.source)
        resolved.append(point)
    points = tuple(resolved)
    section.finish()
    _check_layout(section, protocol, points)
    return DeviceSpec(id=device_id, protocol=protocol, points=points, **kwargs)


def _read_point(section: Section, device: str, protocol: str, plant: Plant) -> PointSpec:
    name = section.text("name")
    if not POINT_NAME.match(name):
        raise section.error("name", f"{name!r} is not '<entity>.<attribute>' (e.g. tank-1.level)")
    same_as = section.text("same_as", None)
    if same_as is not None and section.has("source"):
        raise section.error("same_as", "give either source or same_as, not both")
    source = section.text("source", name)
    if same_as is None and source not in plant.state:
        close = [v for v in plant.state if v.split(".")[0] == source.split(".")[0]]
        hint = f" (variables of that component: {', '.join(close)})" if close else ""
        if not plant.state:
            hint = "; the scenario has no [process.NAME] components yet"
        raise section.error("source", f"{source!r} is not a process variable{hint}")
    noise = section.number("noise", 0.0, min=0.0)
    unit = section.text("unit", "", allow_empty=True)
    writable = section.flag("writable", False)
    if same_as is not None and (noise or writable):
        raise section.error(
            "same_as",
            "a mirror point reports the other point's value exactly: no noise, not writable",
        )
    limits = plant.writable.get(source)
    if writable and limits is None:
        writable_vars = ", ".join(sorted(plant.writable))
        raise section.error(
            "writable", f"{source!r} is not a setpoint or command (writable: {writable_vars})"
        )
    low = section.number("min", None)
    high = section.number("max", None)
    if (low is not None or high is not None) and not writable:
        raise section.error(
            "min" if low is not None else "max", "limits apply to writable points only"
        )
    if limits is not None and writable:
        low = limits.low if low is None else low
        high = limits.high if high is None else high
        if low < limits.low or high > limits.high or low > high:
            raise section.error(
                "min", f"limits {low}..{high} must lie within {limits.low}..{limits.high}"
            )
    kwargs: dict[str, Any] = {}
    boolean = False
    if protocol in ("modbus-tcp", "modbus-rtu"):
        unit_id = section.integer("unit_id", 1, min=1, max=247)
        table = section.text("table", choices=TABLES)
        address = section.integer("address", min=0, max=65535)
        if table in BIT_TABLES:
            dtype = section.text("type", "bool", choices=["bool"])
            boolean = True
            codec = None
        else:
            dtype = section.text("type", choices=REGISTER_TYPES)
            byte_order = cast(Order, section.text("byte_order", "big", choices=["big", "little"]))
            word_order = cast(Order, section.text("word_order", "big", choices=["big", "little"]))
            scale = section.number("scale", 1.0)
            if scale == 0:
                raise section.error("scale", "scale must not be 0")
            offset = section.number("offset", 0.0)
            codec = RegisterCodec(dtype, byte_order, word_order, scale, offset)
            if address + codec.count > 65536:
                raise section.error("address", "the point runs past register 65535")
        if writable and table not in ("coils", "holding_registers"):
            raise section.error(
                "writable", f"{table} are read-only in Modbus; use holding_registers or coils"
            )
        if writable and limits is not None and limits.boolean != boolean:
            want = "coils" if limits.boolean else "holding_registers"
            what = "a command (on/off)" if limits.boolean else "a number"
            raise section.error("table", f"{source!r} is {what}; put it in {want}")
        kwargs.update(unit_id=unit_id, table=table, address=address, dtype=dtype, codec=codec)
    elif protocol == "opcua":
        kwargs["node_id"] = section.text("node_id", name)
        kwargs["browse_name"] = section.text("browse_name")
        dtype = section.text("type", "double", choices=["double", "boolean"])
        boolean = dtype == "boolean"
        kwargs["dtype"] = dtype
    else:
        kwargs["decimals"] = section.integer("decimals", 1, min=0, max=6)
        if writable:
            raise section.error(
                "writable", "a serial line sensor only talks; it has no writable points"
            )
    if boolean and noise:
        raise section.error("noise", "on/off points have no measurement noise")
    section.finish()
    return PointSpec(
        name=name,
        device=device,
        source=source,
        noise=noise,
        same_as=same_as,
        unit=unit,
        writable=writable,
        low=low,
        high=high,
        boolean=boolean,
        **kwargs,
    )


def _check_layout(section: Section, protocol: str, points: tuple[PointSpec, ...]) -> None:
    if protocol in ("modbus-tcp", "modbus-rtu"):
        used: dict[tuple[int | None, str | None, int], str] = {}
        for point in points:
            assert point.address is not None
            for offset in range(point.width):
                key = (point.unit_id, point.table, point.address + offset)
                if key in used:
                    raise section.error(
                        "points",
                        f"{point.name} overlaps {used[key]} at unit {point.unit_id} "
                        f"{point.table} address {point.address + offset}",
                    )
                used[key] = point.name
    if protocol == "opcua":
        for attr in ("node_id", "browse_name"):
            values = [getattr(p, attr) for p in points]
            dupes = {v for v in values if values.count(v) > 1}
            if dupes:
                raise section.error("points", f"{attr} {sorted(dupes)[0]!r} is used twice")


def _read_load(section: Section) -> LoadSpec:
    devices = section.integer("modbus_devices", 0, min=0, max=1000)
    registers = section.integer("registers_per_device", 200, min=1, max=10000)
    point_type = section.text("point_type", "uint16", choices=["uint16", "float32"])
    table = section.text(
        "table", "input_registers", choices=["input_registers", "holding_registers"]
    )
    host = section.text("host", "127.0.0.1")
    base_port = section.integer("base_port", 0, min=0, max=65535)
    prefix = section.text("id_prefix", "load-")
    record_served = section.flag("record_served", False)
    if devices and base_port and base_port + devices > 65536:
        raise section.error("base_port", "base_port + modbus_devices runs past port 65535")
    if devices and not base_port:
        raise section.error("base_port", "set the first port (device i listens on base_port + i)")
    if registers % register_count(point_type):
        raise section.error(
            "registers_per_device",
            f"must be a multiple of {register_count(point_type)} for {point_type}",
        )
    if not IDENT.match(prefix + "000"):
        raise section.error("id_prefix", f"{prefix!r} does not make valid device ids")
    section.finish()
    return LoadSpec(devices, registers, point_type, table, host, base_port, prefix, record_served)


def _read_fault(section: Section, topology: Topology) -> ScheduledFault:
    kind = section.text("kind")
    device = section.text("device", None)
    point = section.text("point", None)
    unit_id = section.integer("unit_id", None, min=0, max=247)
    component = section.text("component", None)
    at = section.number("at", 0.0, min=0.0)
    duration = section.number("duration", None, min=0.0)
    try:
        params = read_params(kind, lambda key, default: section.raw(key, default))
        request = check_request(
            FaultRequest(kind, device, point, unit_id, params, component), topology
        )
    except FaultError as exc:
        raise section.error(exc.key, exc.problem) from None
    section.finish()
    return ScheduledFault(request, at, duration)
