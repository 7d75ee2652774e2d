"""The agent's TOML configuration, validated up front.

Every error names the file, the key (``devices[1].points[3].word_order``) and what
would be valid (``fieldtwin.protocol.config``), and unknown keys are refused, so a typo
on a gateway fails at start-up instead of silently doing nothing. The reference with
every key and its default is docs/agent.md.

Paths: key files and ``password_file`` are relative to the config file's folder; the
buffer and status files live in the state directory. ``$VARS`` in paths are expanded,
so a systemd unit can point at ``$CREDENTIALS_DIRECTORY/gateway.key``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fieldtwin.agent.blocks import BIT_TABLES, MAX_REGISTERS_PER_READ, REGISTER_TABLES, TABLES
from fieldtwin.agent.codec import (
    FLOAT_DTYPES,
    INTEGER_DTYPES,
    ORDERS,
    REGISTER_DTYPES,
    RegisterCodec,
    shared_codec,
)
from fieldtwin.agent.errors import CodecError
from fieldtwin.agent.outbox import OVERFLOW_POLICIES
from fieldtwin.protocol.config import ConfigError, Section, load_toml
from fieldtwin.protocol.errors import BadTopic
from fieldtwin.protocol.messages import DTYPES, MAX_NAME_LEN
from fieldtwin.protocol.topics import check_gateway_id

PROTOCOLS = ("modbus-tcp", "modbus-rtu", "opcua", "serial-line")
NUMERIC_DTYPES = INTEGER_DTYPES | FLOAT_DTYPES
ENTITY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
ATTRIBUTE_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")
NODE_ID_PATTERN = re.compile(r"(?:(?:ns=\d+|nsu=[^;]+);)?(?:s=.+|i=\d+|g=[0-9a-fA-F-]{36}|b=.+)")
PARITIES = ("N", "E", "O")
OUT_OF_RANGE_QUALITIES = ("bad", "uncertain")


_INTERNED = (
    "entity",
    "attribute",
    "dtype",
    "unit",
    "out_of_range",
    "table",
    "byte_order",
    "word_order",
)


@dataclass(frozen=True, slots=True)
class PointConfig:
    """One attribute of one entity, and where the agent finds it."""

    entity: str
    attribute: str
    dtype: str
    unit: str = ""
    interval_ms: int = 1000
    deadband: float = 0.0
    max_silence_ms: int = 60_000
    writable: bool = False
    min: float | None = None
    max: float | None = None
    # Plausibility of readings (agent/plausible.py): outside [valid_min, valid_max] a
    # reading is sent with quality ``out_of_range`` ("bad": no value; "uncertain").
    valid_min: float | None = None
    valid_max: float | None = None
    out_of_range: str = "bad"
    # Modbus
    unit_id: int = 1
    table: str = ""
    address: int = 0
    byte_order: str = "big"
    word_order: str = "big"
    scale: float = 1.0
    offset: float = 0.0
    length: int = 1
    # OPC-UA
    node: str = ""
    # Serial line
    field_index: int = -1
    source: str = ""
    """Human-readable origin for births and the check table (``ir 0-1 @ unit 1``)."""
    key: tuple[str, str] = field(init=False, repr=False, compare=False)
    """``(entity, attribute)``: one tuple per point, shared by every map keyed by it."""

    def __post_init__(self) -> None:
        # One copy of each repeated name: 5,000 points share a few entity, type and
        # table strings (docs/benchmarks.md, "Edge footprint").
        for name in _INTERNED:
            object.__setattr__(self, name, sys.intern(getattr(self, name)))
        object.__setattr__(self, "key", (self.entity, self.attribute))

    @property
    def name(self) -> str:
        return f"{self.entity}.{self.attribute}"

    def codec(self) -> RegisterCodec:
        return shared_codec(
            self.dtype, self.byte_order, self.word_order, self.scale, self.offset, self.length
        )

    @property
    def register_count(self) -> int:
        return 1 if self.table in BIT_TABLES else self.codec().count

    @property
    def has_valid_range(self) -> bool:
        return self.valid_min is not None or self.valid_max is not None


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    id: str
    protocol: str
    points: tuple[PointConfig, ...]
    timeout_s: float = 1.0
    # TCP (Modbus TCP)
    host: str = ""
    port: int = 0
    # Serial (Modbus RTU, serial line)
    path: str = ""
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: int = 1
    # Modbus
    max_gap: int = 8
    max_block: int = MAX_REGISTERS_PER_READ
    breaker_threshold: int = 3
    breaker_cooldown_s: float = 1.0
    breaker_max_cooldown_s: float = 60.0
    # OPC-UA
    url: str = ""
    mode: str = "subscribe"
    publishing_interval_ms: int = 500
    username: str = ""
    password: str = ""
    # Serial line
    sentence: str = ""
    checksum: bool = True
    request: str = ""
    seq_field: int = -1

    @property
    def endpoint(self) -> str:
        if self.protocol == "modbus-tcp":
            return f"{self.host}:{self.port}"
        if self.protocol == "opcua":
            return self.url
        return self.path


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    url: str = "mqtt://127.0.0.1:1883"
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    username: str = ""
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    publish_timeout_s: float = 15.0
    live_window: int = 32
    backlog_window: int = 8
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    heartbeat_s: float = 5.0
    """How often the agent tells the hub it is alive, with its devices' link states."""


@dataclass(frozen=True, slots=True)
class BufferConfig:
    path: Path
    max_samples: int = 5_000_000
    max_mb: float = 512.0
    overflow: str = "drop_oldest"
    batch_max_samples: int = 2000
    flush_ms: int = 100
    backlog_samples_per_s: float = 50_000.0
    ack_timeout_s: float = 60.0
    memory_limit_mb: int = 64
    checkpoint_mb: int = 1
    threads: int = 1
    reopen_every: int = 1000

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 1024 * 1024)


@dataclass(frozen=True, slots=True)
class ApprovalConfig:
    """Operators whose approvals this gateway accepts, and how many a command needs.

    With approvers configured, a ``cmd`` is written only if it carries ``required``
    valid approvals from distinct listed operators over its digest, so a compromised
    hub alone cannot actuate. Points listed in ``unattended`` take commands without
    operator approval (automatic corrections within the point's limits)."""

    keys: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)
    required: int = 1
    unattended: frozenset[str] = frozenset()

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    file: Path
    gateway: str
    state_dir: Path
    private_key: Path
    hub_public_key: Path
    broker: BrokerConfig
    buffer: BufferConfig
    devices: tuple[DeviceConfig, ...]
    status_file: Path
    status_interval_s: float = 5.0
    info: dict[str, str] = field(default_factory=dict)
    metrics_host: str = ""
    """Loopback address of the Prometheus endpoint (``[metrics] listen``); "" = off."""
    metrics_port: int = 0
    approvals: ApprovalConfig = field(default_factory=ApprovalConfig)

    def points(self) -> list[tuple[DeviceConfig, PointConfig]]:
        return [(device, point) for device in self.devices for point in device.points]


# -- loading ------------------------------------------------------------------------------


def default_state_dir(gateway: str) -> Path:
    """systemd's ``$STATE_DIRECTORY`` when set, else ``$XDG_STATE_HOME/fieldtwin/GATEWAY``."""
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fieldtwin" / gateway


def load_config(path: Path | str, *, state_dir: Path | None = None) -> AgentConfig:
    """Read and validate an agent config; ``state_dir`` overrides the file's choice."""
    root = load_toml(path)
    gateway = root.text("gateway")
    try:
        check_gateway_id(gateway)
    except BadTopic as exc:
        raise root.error("gateway", str(exc)) from None
    # Read the key even when --state-dir overrides it, so it counts as known.
    configured_state = root.path("state_dir", None)
    chosen_state = state_dir or configured_state or default_state_dir(gateway)

    keys = root.section("keys", required=True)
    private_key = keys.path("private")
    hub_public_key = keys.path("hub_public")
    keys.finish()

    broker = _broker(root.section("broker"), gateway)
    buffer = _buffer(root.section("buffer"), chosen_state)

    status = root.section("status")
    status_file = status.path("file", None) or (chosen_state / "status.json")
    status_interval = status.number("interval_s", 5.0, min=0.5, max=3600)
    status.finish()

    metrics_host, metrics_port = metrics_listen(root.section("metrics"))
    approvals = _approvals(root.section("approvals"))

    info_section = root.section("info")
    info = {k: info_section.text(k) for k in list(info_section.data)}
    info_section.finish()

    devices = tuple(
        _device(section, index) for index, section in enumerate(root.sections("devices"))
    )
    if not devices:
        raise root.error("devices", "at least one [[devices]] table is required")
    _check_unique(root, devices)
    root.finish()
    return AgentConfig(
        file=Path(path),
        gateway=gateway,
        state_dir=chosen_state,
        private_key=private_key,
        hub_public_key=hub_public_key,
        broker=broker,
        buffer=buffer,
        devices=devices,
        status_file=status_file,
        status_interval_s=status_interval,
        info=info,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        approvals=approvals,
    )


def metrics_listen(section: Section) -> tuple[str, int]:
    """``[metrics] listen = "127.0.0.1:9471"``: where to serve Prometheus text, or off.

    Loopback only: the endpoint has no authentication; a scraper on the gateway
    (Prometheus agent, Telegraf, Grafana Alloy) reads it locally."""
    listen = section.text("listen", "")
    section.finish()
    if not listen:
        return "", 0
    host, sep, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise section.error("listen", f"{listen!r} is not HOST:PORT, e.g. '127.0.0.1:9471'")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise section.error(
            "listen",
            f"{host!r} is not a loopback address; the metrics endpoint has no authentication, "
            "so it listens on 127.0.0.1 or ::1 only (scrape it from the gateway itself)",
        )
    return host, int(port_text)


def _approvals(section: Section) -> ApprovalConfig:
    """``[approvals]``: ``operators = { bob = "keys/bob.pub", ... }``, ``required``,
    ``unattended = ["ENTITY.ATTRIBUTE", ...]``."""
    raw = section.raw("operators", {})
    if not isinstance(raw, dict):
        raise section.error("operators", "expected a table of operator id = public key file")
    keys: dict[str, tuple[Path, ...]] = {}
    for operator, value in raw.items():
        files = [value] if isinstance(value, str) else value
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise section.error(
                f"operators.{operator}", "expected a public key file (or a list of them)"
            )
        paths = []
        for item in files:
            candidate = Path(os.path.expandvars(item)).expanduser()
            paths.append(candidate if candidate.is_absolute() else section.file.parent / candidate)
        keys[operator] = tuple(paths)
    required = section.integer("required", 1, min=1, max=8)
    unattended = section.text_list("unattended", [])
    section.finish()
    if keys and required > len(keys):
        raise section.error(
            "required", f"{required} approvals needed but only {len(keys)} approvers are listed"
        )
    return ApprovalConfig(keys=keys, required=required, unattended=frozenset(unattended))


def _broker(section: Section, gateway: str) -> BrokerConfig:
    url = section.text("url", "mqtt://127.0.0.1:1883")
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise section.error(
            "url", f"{url!r} is not a broker URL; use mqtt://HOST:PORT or mqtts://HOST:PORT (TLS)"
        )
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise section.error("url", f"{url!r} has an invalid port") from None
    username = section.text("username", gateway)
    if username != gateway:
        raise section.error(
            "username",
            f"must be the gateway id {gateway!r}: the broker ACL gives each gateway its own "
            "topics by MQTT username (leave the key out to use the gateway id)",
        )
    password: str | None = None
    if section.has("password") and section.has("password_file"):
        raise section.error("password", "give either password or password_file, not both")
    if section.has("password"):
        password = section.text("password")
    if section.has("password_file"):
        password = section.secret_file("password_file")
        if not password:
            raise section.error("password_file", f"{section.path('password_file')} is empty")
    ca_file = section.path("ca_file", None)
    cert_file = section.path("cert_file", None)
    key_file = section.path("key_file", None)
    if (ca_file or cert_file or key_file) and not tls:
        raise section.error("url", "TLS files are set but the URL is mqtt://; use mqtts://")
    if (cert_file is None) != (key_file is None):
        raise section.error("cert_file", "a client certificate needs both cert_file and key_file")
    for key, tls_path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if tls_path is not None and not tls_path.is_file():
            raise section.error(key, f"{tls_path} does not exist")
    config = BrokerConfig(
        url=url,
        host=parts.hostname,
        port=port,
        tls=tls,
        username=username,
        password=password,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        keepalive_s=section.integer("keepalive_s", 30, min=5, max=3600),
        connect_timeout_s=section.number("connect_timeout_s", 10.0, min=0.5, max=300),
        publish_timeout_s=section.number("publish_timeout_s", 15.0, min=0.5, max=300),
        live_window=section.integer("live_window", 32, min=1, max=1000),
        backlog_window=section.integer("backlog_window", 8, min=1, max=1000),
        reconnect_min_s=section.number("reconnect_min_s", 0.5, min=0.05, max=60),
        reconnect_max_s=section.number("reconnect_max_s", 30.0, min=0.1, max=3600),
        heartbeat_s=section.number("heartbeat_s", 5.0, min=0.5, max=300),
    )
    if config.reconnect_max_s < config.reconnect_min_s:
        raise section.error("reconnect_max_s", "must be at least reconnect_min_s")
    section.finish()
    return config


def _buffer(section: Section, state_dir: Path) -> BufferConfig:
    file = section.path("file", None) or Path("outbox.duckdb")
    path = file if file.is_absolute() else state_dir / file
    config = BufferConfig(
        path=path,
        max_samples=section.integer("max_samples", 5_000_000, min=100),
        max_mb=section.number("max_mb", 512.0, min=1),
        overflow=section.text("overflow", "drop_oldest", choices=OVERFLOW_POLICIES),
        batch_max_samples=section.integer("batch_max_samples", 2000, min=1, max=10_000),
        flush_ms=section.integer("flush_ms", 100, min=1, max=60_000),
        backlog_samples_per_s=section.number("backlog_samples_per_s", 50_000.0, min=1),
        ack_timeout_s=section.number("ack_timeout_s", 60.0, min=1, max=86_400),
        memory_limit_mb=section.integer("memory_limit_mb", 64, min=16, max=65_536),
        # 1 MB: frames written between checkpoints sit in DuckDB's memory, and a 4 MB
        # cycle left the process ~10 MB/h bigger (docs/benchmarks.md, "Edge footprint").
        checkpoint_mb=section.integer("checkpoint_mb", 1, min=1, max=1024),
        threads=section.integer("threads", 1, min=1, max=64),
        # DuckDB's memory grows with every transaction until the connection closes
        # (docs/agent.md, `[buffer]` `reopen_every`): reopen it every this many transactions.
        reopen_every=section.integer("reopen_every", 1000, min=1, max=100_000_000),
    )
    section.finish()
    return config


_DEVICE_DEFAULT_KEYS = ("interval_ms", "max_silence_s", "deadband")


def _device(section: Section, index: int) -> DeviceConfig:
    device_id = section.text("id")
    if ENTITY_PATTERN.fullmatch(device_id) is None:
        raise section.error("id", "use letters, digits, '-', '_', '.' (e.g. 'pump-station')")
    protocol = section.text("protocol", choices=PROTOCOLS)
    kwargs: dict[str, Any] = {
        "id": device_id,
        "protocol": protocol,
        "timeout_s": section.number("timeout_s", 1.0, min=0.05, max=60),
    }
    defaults = {
        "interval_ms": section.integer("interval_ms", 1000, min=10, max=86_400_000),
        "max_silence_s": section.number("max_silence_s", 60.0, min=0, max=86_400),
        "deadband": section.number("deadband", 0.0, min=0),
        "unit_id": 1,
        "byte_order": "big",
        "word_order": "big",
        "out_of_range": section.text("out_of_range", "bad", choices=OUT_OF_RANGE_QUALITIES),
    }
    if protocol in ("modbus-tcp", "modbus-rtu"):
        defaults["unit_id"] = section.integer("unit_id", 1, min=0, max=247)
        defaults["byte_order"] = section.text("byte_order", "big", choices=("big", "little"))
        defaults["word_order"] = section.text("word_order", "big", choices=("big", "little"))
        kwargs.update(
            max_gap=section.integer("max_gap", 8, min=0, max=MAX_REGISTERS_PER_READ),
            max_block=section.integer("max_block", MAX_REGISTERS_PER_READ, min=1, max=125),
            breaker_threshold=section.integer("breaker_threshold", 3, min=1, max=1000),
            breaker_cooldown_s=section.number("breaker_cooldown_s", 1.0, min=0.01, max=3600),
            breaker_max_cooldown_s=section.number(
                "breaker_max_cooldown_s", 60.0, min=0.01, max=86_400
            ),
        )
        if kwargs["breaker_max_cooldown_s"] < kwargs["breaker_cooldown_s"]:
            raise section.error("breaker_max_cooldown_s", "must be at least breaker_cooldown_s")
    if protocol == "modbus-tcp":
        kwargs.update(
            host=section.text("host"), port=section.integer("port", 502, min=1, max=65535)
        )
    if protocol in ("modbus-rtu", "serial-line"):
        kwargs.update(
            path=str(section.path("path")),
            baudrate=section.integer(
                "baudrate", 19200 if protocol == "modbus-rtu" else 9600, min=50, max=4_000_000
            ),
            bytesize=section.integer("bytesize", 8, min=5, max=8),
            parity=section.text("parity", "N", choices=PARITIES),
            stopbits=section.integer("stopbits", 1, min=1, max=2),
        )
    if protocol == "opcua":
        url = section.text("url")
        if not url.startswith("opc.tcp://"):
            raise section.error("url", f"{url!r} is not an OPC-UA URL (opc.tcp://HOST:PORT/PATH)")
        password = section.secret_file("password_file") or ""
        kwargs.update(
            url=url,
            mode=section.text("mode", "subscribe", choices=("subscribe", "poll")),
            publishing_interval_ms=section.integer(
                "publishing_interval_ms", 500, min=10, max=3_600_000
            ),
            username=section.text("username", ""),
            password=password,
        )
        if kwargs["username"] and not password:
            raise section.error("password_file", "an OPC-UA username needs a password_file")
    if protocol == "serial-line":
        sentence = section.text("sentence")
        if not sentence.isalnum():
            raise section.error("sentence", "the sentence tag is letters and digits, e.g. 'AMB'")
        request = section.text("request", "", allow_empty=True)
        kwargs.update(
            sentence=sentence,
            checksum=section.flag("checksum", True),
            request=request,
            seq_field=section.integer("seq_field", -1, min=-1, max=64),
        )
    points = tuple(
        point
        for p in section.sections("points", required=True)
        for point in _points(p, protocol, defaults, device_id)
    )
    section.finish()
    return DeviceConfig(points=points, **kwargs)


def _point(section: Section, protocol: str, defaults: dict[str, Any], device: str) -> PointConfig:
    entity = section.text("entity")
    if ENTITY_PATTERN.fullmatch(entity) is None:
        raise section.error("entity", "an entity id is letters, digits, '-', '_', '.', ':'")
    attribute = section.text("attribute")
    if ATTRIBUTE_PATTERN.fullmatch(attribute) is None or len(attribute) > MAX_NAME_LEN:
        raise section.error(
            "attribute", "an attribute starts with a letter or '_' (e.g. 'level', 'speed_sp')"
        )
    modbus = protocol in ("modbus-tcp", "modbus-rtu")
    default_dtype = "float64" if protocol in ("opcua", "serial-line") else None
    table = section.text("table", choices=sorted(TABLES)) if modbus else ""
    if modbus and table in BIT_TABLES:
        dtype = section.text("type", "bool", choices=["bool"])
    elif default_dtype is None:
        dtype = section.text("type", choices=sorted(REGISTER_DTYPES))
    else:
        dtype = section.text("type", default_dtype, choices=sorted(DTYPES - {"int64", "uint64"}))
    values: dict[str, Any] = {
        "entity": entity,
        "attribute": attribute,
        "dtype": dtype,
        "unit": section.text("unit", "", allow_empty=True),
        "interval_ms": section.integer("interval_ms", defaults["interval_ms"], min=10),
        "deadband": section.number("deadband", defaults["deadband"], min=0),
        "max_silence_ms": int(
            1000 * section.number("max_silence_s", defaults["max_silence_s"], min=0, max=86_400)
        ),
        "writable": section.flag("writable", False),
    }
    if len(values["unit"]) > 32:
        raise section.error("unit", "a unit is at most 32 characters")
    if values["interval_ms"] > 86_400_000:
        raise section.error("interval_ms", "at most one day (86400000)")
    if values["deadband"] and dtype not in NUMERIC_DTYPES:
        raise section.error("deadband", f"a deadband applies to numbers, not to {dtype} points")
    lo = section.number("min", None)
    hi = section.number("max", None)
    if (lo is not None or hi is not None) and dtype not in NUMERIC_DTYPES:
        raise section.error("min", f"limits apply to numbers, not to {dtype} points")
    if lo is not None and hi is not None and lo > hi:
        raise section.error("max", f"max ({hi}) is below min ({lo})")
    values.update(min=lo, max=hi)
    values.update(_valid_range(section, dtype, defaults))
    if modbus:
        values.update(_modbus_point(section, table, dtype, defaults))
        where = f"{_TABLE_SHORT[table]} {values['address']}"
        count = values.pop("_count")
        if count > 1:
            where += f"-{values['address'] + count - 1}"
        values["source"] = f"{device} unit {values['unit_id']} {where}"
    elif protocol == "opcua":
        node = section.text("node")
        if NODE_ID_PATTERN.fullmatch(node) is None:
            raise section.error(
                "node",
                f"{node!r} is not a node id; use 'nsu=URI;s=NAME', 'ns=2;s=NAME' or 'ns=2;i=42'",
            )
        values.update(node=node, source=f"{device} {node}")
    else:
        field_index = section.integer("field", min=0, max=64)
        values.update(field_index=field_index, source=f"{device} field {field_index}")
        if values["writable"]:
            raise section.error("writable", "serial line sensors are read-only")
    section.finish()
    return PointConfig(**values)


def _valid_range(section: Section, dtype: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """``valid_min``/``valid_max``/``out_of_range``: what a believable reading looks like."""
    lo = section.number("valid_min", None)
    hi = section.number("valid_max", None)
    out_of_range = section.text(
        "out_of_range", defaults["out_of_range"], choices=OUT_OF_RANGE_QUALITIES
    )
    if (lo is not None or hi is not None) and dtype not in NUMERIC_DTYPES:
        raise section.error(
            "valid_min" if lo is not None else "valid_max",
            f"a valid range applies to numbers, not to {dtype} points",
        )
    if lo is not None and hi is not None and lo > hi:
        raise section.error("valid_max", f"valid_max ({hi}) is below valid_min ({lo})")
    return {"valid_min": lo, "valid_max": hi, "out_of_range": out_of_range}


_TABLE_SHORT = {"holding": "hr", "input": "ir", "coil": "co", "discrete": "di"}

# -- register ranges ----------------------------------------------------------------------

RANGE_PLACEHOLDER = re.compile(r"\{(i|n|address)(?::0([1-9]))?\}")
"""``{i}`` (0-based index in the range), ``{n}`` (1-based), ``{address}``; ``{i:03}``
pads with zeros to 3 digits (docs/agent.md, "Register ranges")."""


def _points(
    section: Section, protocol: str, defaults: dict[str, Any], device: str
) -> list[PointConfig]:
    """One ``[[devices.points]]`` entry: a point, or with ``count`` a register range."""
    if not section.has("count"):
        return [_point(section, protocol, defaults, device)]
    return _point_range(section, protocol, defaults, device)


def _expand(template: str, index: int, address: int) -> str:
    def value(match: re.Match[str]) -> str:
        name, width = match.groups()
        number = {"i": index, "n": index + 1, "address": address}[name]
        return f"{number:0{width}d}" if width else str(number)

    return RANGE_PLACEHOLDER.sub(value, template)


def _point_range(
    section: Section, protocol: str, defaults: dict[str, Any], device: str
) -> list[PointConfig]:
    """``count`` points at ``address``, ``address + stride``, …, named by patterns.

    The entry is validated as one point (its first), so every error names the entry's
    keys; each expanded name is then checked like a hand-written one.
    """
    if protocol not in ("modbus-tcp", "modbus-rtu"):
        raise section.error(
            "count", "a register range (count) is for Modbus points; list other points one by one"
        )
    count = section.integer("count", min=1, max=65536)
    stride_key = section.integer("stride", None, min=1, max=MAX_REGISTERS_PER_READ)
    templates = {}
    for key in ("entity", "attribute"):
        text = section.text(key)
        leftover = RANGE_PLACEHOLDER.sub("", text)
        if "{" in leftover or "}" in leftover:
            raise section.error(
                key,
                f"{text!r}: a range names its points with {{i}}, {{n}} or {{address}} "
                "(zero-padded: {i:03}); other braces are not allowed",
            )
        templates[key] = text
    if count > 1 and not any(RANGE_PLACEHOLDER.search(t) for t in templates.values()):
        raise section.error(
            "attribute",
            f"a range of {count} points needs {{i}}, {{n}} or {{address}} in entity or "
            "attribute, or every point would have the same name (e.g. attribute = 'hr{address}')",
        )
    address = section.integer("address", min=0, max=65535)
    first = dict(section.data)
    for key in ("count", "stride"):
        first.pop(key, None)
    first["entity"] = _expand(templates["entity"], 0, address)
    first["attribute"] = _expand(templates["attribute"], 0, address)
    # Validated as one point: the copy refuses unknown keys with this entry's key path.
    template = _point(Section(first, section.file, section.prefix), protocol, defaults, device)
    stride = stride_key or template.register_count
    last = address + (count - 1) * stride
    if last + template.register_count > 65536:
        raise section.error(
            "count",
            f"{count} points from address {address} every {stride} run past address 65535",
        )
    where = _TABLE_SHORT[template.table]
    points = []
    for index in range(count):
        at = address + index * stride
        entity = _expand(templates["entity"], index, at)
        attribute = _expand(templates["attribute"], index, at)
        if ENTITY_PATTERN.fullmatch(entity) is None:
            raise section.error("entity", f"point {index} would be named {entity!r}: not an id")
        if ATTRIBUTE_PATTERN.fullmatch(attribute) is None or len(attribute) > MAX_NAME_LEN:
            raise section.error(
                "attribute", f"point {index} would be named {attribute!r}: not an attribute"
            )
        end = at + template.register_count - 1
        span = f"{at}-{end}" if end > at else f"{at}"
        points.append(
            replace(
                template,
                entity=entity,
                attribute=attribute,
                address=at,
                source=f"{device} unit {template.unit_id} {where} {span}",
            )
        )
    return points


def _modbus_point(
    section: Section, table: str, dtype: str, defaults: dict[str, Any]
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "table": table,
        "unit_id": section.integer("unit_id", defaults["unit_id"], min=0, max=247),
        "address": section.integer("address", min=0, max=65535),
    }
    if table in REGISTER_TABLES:
        values.update(
            byte_order=section.text("byte_order", defaults["byte_order"], choices=ORDERS),
            word_order=section.text("word_order", defaults["word_order"], choices=ORDERS),
            scale=section.number("scale", 1.0),
            offset=section.number("offset", 0.0),
            length=section.integer("length", 1, min=1, max=MAX_REGISTERS_PER_READ)
            if dtype == "string"
            else (section.raw("length", None) or 1),
        )
        if values["scale"] == 0:
            raise section.error("scale", "scale must not be 0 (raw * scale + offset)")
        if dtype != "string" and section.has("length"):
            raise section.error("length", "length is only for string points (registers)")
        try:
            count = RegisterCodec(
                dtype,
                values["byte_order"],
                values["word_order"],
                values["scale"],
                values["offset"],
                values["length"],
            ).count
        except CodecError as exc:
            raise section.error("type", str(exc)) from None
    else:
        count = 1
    if values["address"] + count > 65536:
        raise section.error("address", f"the point's {count} items run past address 65535")
    if section.flag("writable", False) and table not in ("holding", "coil"):
        raise section.error(
            "writable",
            f"{table} is a read-only table; only holding registers and coils are writable",
        )
    values["_count"] = count
    return values


def _check_unique(root: Section, devices: tuple[DeviceConfig, ...]) -> None:
    seen_ids: dict[str, int] = {}
    seen_endpoints: dict[str, str] = {}
    seen_points: dict[tuple[str, str], str] = {}
    for index, device in enumerate(devices):
        if device.id in seen_ids:
            raise ConfigError(
                root.file,
                f"devices[{index}].id",
                f"device id {device.id!r} is already used by devices[{seen_ids[device.id]}]",
            )
        seen_ids[device.id] = index
        if device.endpoint in seen_endpoints:
            raise ConfigError(
                root.file,
                f"devices[{index}]",
                f"{device.endpoint} is also used by device {seen_endpoints[device.endpoint]!r}; "
                "one endpoint is one device (list all unit ids' points under it)",
            )
        seen_endpoints[device.endpoint] = device.id
        for point_index, point in enumerate(device.points):
            if point.key in seen_points:
                raise ConfigError(
                    root.file,
                    f"devices[{index}].points[{point_index}]",
                    f"{point.name} is already read by {seen_points[point.key]}; "
                    "each entity attribute has exactly one source",
                )
            seen_points[point.key] = device.id
