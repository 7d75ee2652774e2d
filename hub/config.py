"""The hub configuration: broker, keys, gateway registry and the twin schema.

One TOML file (see ``examples/hub.toml`` and docs/hub.md). It is read strictly with
``fieldtwin.protocol.config``: every error names the file, the dotted key and the fix,
and unknown keys are refused with a suggestion. Cross-references (an entity's type, a
relationship's ends, a structural rule's types, a desired value's limits, a physical
bound's ``static.KEY`` on every entity of its type, a plausibility check's points) are
checked here too, so a hub never starts on a schema that contradicts itself.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from fieldtwin.protocol.config import ConfigError, Section, load_toml
from fieldtwin.protocol.keys import KeyPair, KeyRegistry, load_private_key, load_public_key
from fieldtwin.protocol.messages import ID_PATTERN
from fieldtwin.protocol.topics import RESERVED_IDS

STRATEGIES = ("auto_correct", "alert", "investigate", "ignore")
SEVERITIES = ("warning", "critical")
FIDELITIES = ("low", "medium", "high")

DRIFT_RULES = (
    "threshold",
    "temporal.gateway_silent",
    "temporal.sensor_stale",
    "temporal.device_down",
    "structural.missing",
    "structural.undeclared",
    "structural.relationship",
    "structural.wrong_gateway",
    "semantic.rate",
    "semantic.frozen",
    "semantic.model",
    "semantic.implausible",
)
"""Every check the drift engine runs; reconciliation rules match these ids."""

DEFAULT_SEVERITY = {
    "threshold": "warning",
    "temporal.gateway_silent": "critical",
    "temporal.sensor_stale": "warning",
    "temporal.device_down": "critical",
    "structural.missing": "warning",
    "structural.undeclared": "warning",
    "structural.relationship": "warning",
    "structural.wrong_gateway": "warning",
    "semantic.rate": "warning",
    "semantic.frozen": "warning",
    "semantic.model": "warning",
    "semantic.implausible": "warning",
}

Scalar = bool | int | float | str


@dataclass(frozen=True, slots=True)
class Limits:
    """One side of a threshold: the value at which a warning and a critical level start."""

    warning: float | None = None
    critical: float | None = None

    @property
    def empty(self) -> bool:
        return self.warning is None and self.critical is None


@dataclass(frozen=True, slots=True)
class AttributeSpec:
    """What the twin expects of one attribute of an entity type."""

    name: str
    unit: str = ""
    description: str = ""
    interval_s: float | None = None
    stale_after_s: float | None = None
    high: Limits = Limits()
    low: Limits = Limits()
    deadband: float = 0.0
    on_delay_s: float = 0.0
    off_delay_s: float = 0.0
    max_rate: float | None = None
    frozen_after_s: float | None = None
    frozen_min_change: float = 0.0
    frozen_while: str | None = None
    writable: bool = False
    min: float | None = None
    max: float | None = None
    command: CommandRule | None = None
    """How commands on this attribute are checked, approved and verified (writable only)."""
    physical_min: float | str | None = None
    physical_max: float | str | None = None
    """What the physics allows: a number, or ``"static.KEY"`` resolved per entity (a
    tank's level cannot exceed that tank's ``height_m``). See ``TwinSchema.physical``."""
    physical_margin: float = 0.0

    @property
    def has_thresholds(self) -> bool:
        return not (self.high.empty and self.low.empty)


ROLLBACK_MODES = ("auto", "propose", "none")


@dataclass(frozen=True, slots=True)
class CommandRule:
    """The command policy of one writable attribute (``[types.T.attributes.A]`` keys).

    ``approvals`` distinct approvers must sign; with ``two_person`` the proposer's own
    approval does not count. ``max_step`` bounds one command's change. A sent command is
    verified when the reported value is within ``tolerance`` of the target before
    ``verify_timeout_s``; on failure it is rolled back to the checkpoint (``rollback``:
    ``auto`` sends the restore at once under the original approvals, ``propose`` queues
    it for approval, ``none`` only reports). An approved command not sent within
    ``select_window_s`` expires; a proposal nobody approves expires after
    ``approval_timeout_s``.
    """

    approvals: int = 1
    two_person: bool = False
    max_step: float | None = None
    tolerance: float | None = None
    verify_timeout_s: float = 30.0
    select_window_s: float = 30.0
    approval_timeout_s: float = 900.0
    expiry_s: float = 10.0
    rollback: str = "auto"

    def tolerance_for(self, spec: AttributeSpec) -> float:
        """Explicit tolerance, else 0.5 % of the writable range, else 1e-6."""
        if self.tolerance is not None:
            return self.tolerance
        if spec.min is not None and spec.max is not None and spec.max > spec.min:
            return (spec.max - spec.min) * 0.005
        return 1e-6


@dataclass(frozen=True, slots=True)
class Condition:
    """``ENTITY.ATTRIBUTE OP VALUE``, or ``OP VALUE`` on the commanded value itself."""

    entity: str
    attribute: str
    op: str
    value: Scalar

    def __str__(self) -> str:
        subject = f"{self.entity}.{self.attribute} " if self.entity else ""
        shown = "true" if self.value is True else "false" if self.value is False else self.value
        return f"{subject}{self.op} {describe_config_value(shown)}"


@dataclass(frozen=True, slots=True)
class PhysicalRange:
    """The resolved physical range of one attribute of one entity.

    ``low_source``/``high_source`` say where a bound came from (``"static.height_m"`` or
    ``""`` for a number in the type), so a finding can explain itself."""

    low: float | None
    high: float | None
    margin: float = 0.0
    low_source: str = ""
    high_source: str = ""

    def violation(self, value: float) -> str | None:
        """``"min"`` or ``"max"`` if ``value`` is beyond a bound by more than the margin."""
        if self.low is not None and value < self.low - self.margin:
            return "min"
        if self.high is not None and value > self.high + self.margin:
            return "max"
        return None


@dataclass(frozen=True, slots=True)
class PlausibilityCheck:
    """Two readings that must agree: whenever ``when`` holds, ``require`` must hold too.

    Same condition syntax as interlocks; judged only on fresh, good readings of both."""

    id: str
    when: Condition
    require: Condition
    description: str = ""


@dataclass(frozen=True, slots=True)
class Interlock:
    """A command on ``entity.attribute`` whose value satisfies ``when`` (always, if None)
    is refused unless ``require`` holds on a fresh, good reading of another attribute."""

    id: str
    entity: str
    attribute: str
    require: Condition
    when: Condition | None = None
    description: str = ""


OPERATOR_ROLES = ("viewer", "operator", "approver", "admin")


@dataclass(frozen=True, slots=True)
class OperatorSpec:
    """A person who may use the operator channel: their key(s) and roles."""

    id: str
    public_keys: tuple[Path, ...]
    roles: frozenset[str]
    name: str = ""


@dataclass(frozen=True, slots=True)
class EntityType:
    name: str
    description: str
    attributes: Mapping[str, AttributeSpec]


@dataclass(frozen=True, slots=True)
class EntitySpec:
    """A declared entity: the physical id is what agents report; the twin id is ours."""

    id: str
    twin_id: str
    type: str
    gateway: str | None = None
    name: str = ""
    static: Mapping[str, Scalar] = field(default_factory=dict)
    desired: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RelationshipSpec:
    source: str
    target: str
    type: str
    attributes: Mapping[str, Scalar] | None = None


@dataclass(frozen=True, slots=True)
class StructuralRule:
    """Each entity of ``entity_type`` has between ``min`` and ``max`` ``relationship``
    links to entities of ``target_type`` (outgoing, or incoming with direction "in")."""

    id: str
    description: str
    entity_type: str
    relationship: str
    target_type: str
    direction: str = "out"
    min: int = 1
    max: int | None = None


@dataclass(frozen=True, slots=True)
class StrategyRule:
    """Which reconciliation strategy applies to findings that match every given field."""

    drift: str
    strategy: str
    entity_type: str = "*"
    entity: str = "*"
    attribute: str = "*"
    severity: str | None = None
    auto_execute: bool = False
    """auto_correct only: send corrective commands without operator approval, within the
    attribute's limits and step (agents that require operator approvals still refuse)."""

    def matches(self, rule: str, entity_type: str, entity: str, attribute: str) -> bool:
        drift_ok = (
            self.drift == "*"
            or rule == self.drift
            or rule.startswith(self.drift + ".")
            or fnmatch.fnmatchcase(rule, self.drift)
        )
        return (
            drift_ok
            and fnmatch.fnmatchcase(entity_type, self.entity_type)
            and fnmatch.fnmatchcase(entity, self.entity)
            and fnmatch.fnmatchcase(attribute, self.attribute)
        )


@dataclass(frozen=True, slots=True)
class ReconciliationConfig:
    default: str = "alert"
    rules: tuple[StrategyRule, ...] = ()

    def resolve(
        self, rule: str, entity_type: str, entity: str, attribute: str
    ) -> tuple[str, str | None]:
        """The strategy (and severity override) for one finding: first matching rule wins."""
        for candidate in self.rules:
            if candidate.matches(rule, entity_type, entity, attribute):
                return candidate.strategy, candidate.severity
        return self.default, None

    def auto_execute(self, rule: str, entity_type: str, entity: str, attribute: str) -> bool:
        for candidate in self.rules:
            if candidate.matches(rule, entity_type, entity, attribute):
                return candidate.auto_execute
        return False


@dataclass(frozen=True, slots=True)
class DriftConfig:
    interval_s: float = 1.0
    stale_factor: float = 3.0
    default_interval_s: float = 10.0
    gateway_silent_s: float = 15.0
    missing_after_s: float = 30.0
    rate_hold_s: float = 10.0


@dataclass(frozen=True, slots=True)
class IngestConfig:
    batch_max_frames: int = 500
    batch_window_ms: int = 5
    ack_interval_ms: int = 100
    gap_timeout_s: float = 5.0
    rebirth_min_interval_s: float = 10.0
    audit_rejections_per_minute: int = 60
    max_frame_bytes: int = 1 << 20
    queue_max_frames: int = 10_000
    """Frames received but not yet stored; beyond it the hub stops reading the broker."""


@dataclass(frozen=True, slots=True)
class Influence:
    """``target`` is driven by ``inputs`` (all ``(entity, attribute)``): the structure
    the hub's learned model of ``target`` is given; its coefficients are fitted."""

    target: tuple[str, str]
    inputs: tuple[tuple[str, str], ...]
    description: str = ""


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    """``[workers]``: this hub is one of several sharing the gateways of a PostgreSQL
    store through partition leases (hub/workers.py, docs/scale.md)."""

    partitions: int = 16
    lease_s: float = 5.0
    worker_id: str = ""
    """Holder name in the lease table; empty: the process's random instance id."""


@dataclass(frozen=True, slots=True)
class PredictionConfig:
    """``[prediction]`` and ``[[influences]]``: learned dynamics (docs/prediction.md)."""

    enabled: bool = True
    step_s: float = 1.0
    """Grid the models run on: history is resampled (zero-order hold) to this step."""
    history_s: float = 6 * 3600.0
    """How much history a fit uses (the newest part of it)."""
    refit_s: float = 600.0
    horizon_s: float = 600.0
    """Default forecast horizon (``twin predict``, ``twin simulate``, dry runs). The
    forecasted risk looks to the next sync instead (``predict.sync_horizon_s``)."""
    residual_window_s: float = 60.0
    residual_k: float = 4.0
    residual_hold_s: float = 20.0
    min_r2: float = 0.5
    """Predictions of a model that explains less than this at its horizon are flagged
    and kept out of dry runs and approvals (model drift uses its σ instead)."""
    influences: tuple[Influence, ...] = ()

    def inputs_of(self, entity: str, attribute: str) -> tuple[tuple[str, str], ...] | None:
        for influence in self.influences:
            if influence.target == (entity, attribute):
                return influence.inputs
        return None


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    username: str = "hub"
    password: str | None = None
    client_id: str = "hub"
    """Defaults to the username: a site broker (``fieldtwin broker config``) binds the
    client id to the username anyway (``use_username_as_clientid``)."""
    keepalive_s: int = 15

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    id: str
    public_keys: tuple[Path, ...]
    description: str = ""


@dataclass(frozen=True, slots=True)
class TwinSchema:
    types: Mapping[str, EntityType]
    entities: Mapping[str, EntitySpec]
    relationships: tuple[RelationshipSpec, ...] = ()
    structural: tuple[StructuralRule, ...] = ()
    interlocks: tuple[Interlock, ...] = ()
    plausibility: tuple[PlausibilityCheck, ...] = ()
    physical: Mapping[tuple[str, str], PhysicalRange] = field(default_factory=dict)
    """(entity, attribute) → physical range, ``static.KEY`` bounds already resolved."""

    def interlocks_for(self, entity: str, attribute: str) -> list[Interlock]:
        return [i for i in self.interlocks if i.entity == entity and i.attribute == attribute]

    def spec(self, entity: str, attribute: str) -> AttributeSpec | None:
        declared = self.entities.get(entity)
        if declared is None:
            return None
        return self.types[declared.type].attributes.get(attribute)

    def type_of(self, entity: str) -> str:
        declared = self.entities.get(entity)
        return declared.type if declared is not None else "undeclared"

    def declared_points(self) -> list[tuple[str, str]]:
        return [
            (entity.id, name)
            for entity in self.entities.values()
            for name in self.types[entity.type].attributes
        ]


@dataclass(frozen=True, slots=True)
class HubConfig:
    file: Path
    twin_id: str
    domain: str
    fidelity: str
    database: Path
    key_file: Path
    api_port: int
    memory_limit: str
    threads: int
    broker: BrokerConfig
    gateways: Mapping[str, GatewaySpec]
    schema: TwinSchema
    drift: DriftConfig
    ingest: IngestConfig
    reconciliation: ReconciliationConfig
    operators: Mapping[str, OperatorSpec] = field(default_factory=dict)
    prediction: PredictionConfig = PredictionConfig()
    store_url: str = ""
    """A PostgreSQL URL from ``[hub] store``: the store lives there, not in ``database``
    (which then only places the run files: API endpoint, lock)."""
    workers: WorkersConfig | None = None
    """``[workers]`` given: share the gateways with other workers (PostgreSQL only)."""

    @property
    def state_dir(self) -> Path:
        """Where the hub keeps its database and its run files (API endpoint, lock)."""
        return self.database.parent

    @property
    def endpoint_file(self) -> Path:
        return self.database.with_name(self.database.name + ".api.json")

    def load_key(self) -> KeyPair:
        return load_private_key(self.key_file)

    def operator_registry(self) -> KeyRegistry:
        """Operator public keys, loaded now; a missing or bad key file names the operator."""
        registry = KeyRegistry()
        for operator in self.operators.values():
            for index, path in enumerate(operator.public_keys):
                try:
                    registry.add(operator.id, load_public_key(path))
                except ConfigError:
                    raise
                except Exception as exc:
                    key = f"operators.{operator.id}.public_key"
                    if len(operator.public_keys) > 1:
                        key = f"operators.{operator.id}.public_keys[{index}]"
                    raise ConfigError(self.file, key, str(exc)) from None
        return registry

    def registry(self) -> KeyRegistry:
        """Gateway public keys, loaded now; a missing or bad key file names the gateway."""
        registry = KeyRegistry()
        for gateway in self.gateways.values():
            for index, path in enumerate(gateway.public_keys):
                try:
                    registry.add(gateway.id, load_public_key(path))
                except ConfigError:
                    raise
                except Exception as exc:
                    key = f"gateways.{gateway.id}.public_key"
                    if len(gateway.public_keys) > 1:
                        key = f"gateways.{gateway.id}.public_keys[{index}]"
                    raise ConfigError(self.file, key, str(exc)) from None
        return registry


# -- loading ---------------------------------------------------------------------------


def _store_url(hub: Section, text: str) -> str:
    """A PostgreSQL URL for ``[hub] store``, checked enough to fail here, not at start."""
    example = "postgresql://postgres@127.0.0.1:5432/fieldtwin"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise hub.error("store", f"{text!r} is not a valid URL ({exc}); e.g. {example!r}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise hub.error(
            "store",
            f"{parts.scheme}:// is not a store this hub knows; give a PostgreSQL URL such as "
            f"{example!r}, or a DuckDB file path",
        )
    database = unquote(parts.path.lstrip("/"))
    if not parts.hostname or not database or "/" in database:
        raise hub.error("store", f"{text!r} needs a host and a database name, e.g. {example!r}")
    if port == 0:
        raise hub.error("store", f"{text!r}: port 0 is not a port")
    return text


def load_hub_config(path: Path | str) -> HubConfig:
    """Read and validate a hub config, or raise ``ConfigError`` naming file, key and fix."""
    root = load_toml(path)
    file = Path(path)
    hub = root.section("hub", required=True)
    twin_id = _ident(hub, "twin_id")
    domain = hub.text("domain", "industrial process")
    fidelity = hub.text("fidelity", "high", choices=FIDELITIES)
    database = hub.path("database", None) or file.parent / "hub.duckdb"
    store_url = ""
    if hub.has("store"):
        store_text = hub.text("store")
        if "://" in store_text:
            store_url = _store_url(hub, store_text)
        elif hub.has("database"):
            raise hub.error(
                "store",
                "give the DuckDB file either as store or as database, not both "
                "(store also takes a postgresql:// URL)",
            )
        else:
            database = hub.path("store")
    key_file = hub.path("key")
    assert key_file is not None
    api_port = hub.integer("api_port", 0, min=0, max=65535)
    memory_limit = hub.text("memory_limit", "512MB")
    threads = hub.integer("threads", 2, min=1, max=64)
    hub.finish()

    broker = _broker(root.section("broker"))
    gateways = _gateways(root)
    types = _types(root)
    entities = _entities(root, types, gateways, twin_id)
    relationships = _relationships(root, entities)
    structural = _structural(root, types)
    interlocks = _interlocks(root, types, entities)
    physical = _physical_ranges(root, types, entities)
    plausibility = _plausibility(root, types, entities)
    drift = _drift(root.section("drift"))
    ingest = _ingest(root.section("ingest"))
    reconciliation = _reconciliation(root.section("reconciliation"))
    operators = _operators(root, gateways)
    prediction = _prediction(root, types, entities)
    workers = _workers(root, store_url)
    root.finish()
    return HubConfig(
        file=file,
        twin_id=twin_id,
        domain=domain,
        fidelity=fidelity,
        database=database,
        key_file=key_file,
        api_port=api_port,
        memory_limit=memory_limit,
        threads=threads,
        broker=broker,
        gateways=gateways,
        schema=TwinSchema(
            types=types,
            entities=entities,
            relationships=tuple(relationships),
            structural=tuple(structural),
            interlocks=tuple(interlocks),
            plausibility=tuple(plausibility),
            physical=physical,
        ),
        drift=drift,
        ingest=ingest,
        reconciliation=reconciliation,
        operators=operators,
        prediction=prediction,
        store_url=store_url,
        workers=workers,
    )


def _workers(root: Section, store_url: str) -> WorkersConfig | None:
    """``[workers]``, which needs a store every worker shares: a PostgreSQL URL."""
    if not root.has("workers"):
        return None
    section = root.section("workers")
    config = WorkersConfig(
        partitions=section.integer("partitions", 16, min=1, max=4096),
        lease_s=section.number("lease_s", 5.0, min=0.5, max=300.0),
        worker_id=section.text("id", "", allow_empty=True),
    )
    if config.worker_id and ID_PATTERN.fullmatch(config.worker_id) is None:
        raise section.error(
            "id", f"{config.worker_id!r} must be 1-64 letters, digits, '_', '.' or '-'"
        )
    section.finish()
    if not store_url:
        raise section.error(
            "",
            'workers share one store: set [hub] store = "postgresql://..." (a DuckDB file '
            "belongs to one hub process)",
        )
    return config


def _ident(section: Section, key: str) -> str:
    value = section.text(key)
    if ID_PATTERN.fullmatch(value) is None:
        raise section.error(
            key, f"{value!r} must be 1-64 letters, digits, '_', '.' or '-', starting alphanumeric"
        )
    return value


def _broker(section: Section) -> BrokerConfig:
    url = section.text("url", "mqtt://127.0.0.1:1883")
    host, port, tls = parse_broker_url(url, section)
    password = section.text("password", None, allow_empty=True)
    if password is not None and section.has("password_file"):
        raise section.error("password_file", "give either password or password_file, not both")
    if section.has("password_file"):
        password = section.secret_file("password_file")
    username = section.text("username", "hub")
    config = BrokerConfig(
        host=host,
        port=port,
        tls=tls,
        username=username,
        password=password,
        client_id=section.text("client_id", username),
        keepalive_s=section.integer("keepalive_s", 15, min=5, max=3600),
    )
    section.finish()
    return config


def parse_broker_url(url: str, section: Section | None = None) -> tuple[str, int, bool]:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` → (host, port, tls)."""

    def fail(problem: str) -> Exception:
        if section is not None:
            return section.error("url", problem)
        return ConfigError("--broker", "", problem)

    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp"):
        raise fail(f"{url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
    if not parts.hostname:
        raise fail(f"{url!r} names no host; expected mqtt://HOST:PORT")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise fail(f"{url!r} has an invalid port") from None
    return unquote(parts.hostname), port, tls


def _gateways(root: Section) -> dict[str, GatewaySpec]:
    gateways: dict[str, GatewaySpec] = {}
    for name, section in root.table_items("gateways"):
        if ID_PATTERN.fullmatch(name) is None or name in RESERVED_IDS:
            raise section.error("", f"{name!r} is not a valid gateway id")
        single = section.path("public_key", None)
        several = section.text_list("public_keys", None)
        if single is None and not several:
            raise section.error("public_key", "required key is missing (the gateway's .pub file)")
        keys: list[Path] = [single] if single is not None else []
        for item in several or []:
            candidate = Path(item).expanduser()
            keys.append(candidate if candidate.is_absolute() else root.file.parent / candidate)
        gateways[name] = GatewaySpec(
            id=name, public_keys=tuple(keys), description=section.text("description", "")
        )
        section.finish()
    if not gateways:
        raise root.error("gateways", "declare at least one [gateways.ID] with its public_key")
    return gateways


def _limits(section: Section, key: str, high: bool) -> Limits:
    if not section.has(key):
        section.raw(key, None)
        return Limits()
    table = section.section(key)
    limits = Limits(
        warning=table.number("warning", None),
        critical=table.number("critical", None),
    )
    table.finish()
    if limits.warning is not None and limits.critical is not None:
        if high and limits.critical < limits.warning:
            raise table.error("critical", "a high critical limit must be >= the warning limit")
        if not high and limits.critical > limits.warning:
            raise table.error("critical", "a low critical limit must be <= the warning limit")
    if limits.empty:
        raise table.error("", "give warning, critical or both")
    return limits


def _attribute(name: str, section: Section) -> AttributeSpec:
    spec = AttributeSpec(
        name=name,
        unit=section.text("unit", "", allow_empty=True),
        description=section.text("description", "", allow_empty=True),
        interval_s=section.number("interval_s", None, min=0.001),
        stale_after_s=section.number("stale_after_s", None, min=0.001),
        high=_limits(section, "high", True),
        low=_limits(section, "low", False),
        deadband=section.number("deadband", 0.0, min=0.0),
        on_delay_s=section.number("on_delay_s", 0.0, min=0.0),
        off_delay_s=section.number("off_delay_s", 0.0, min=0.0),
        max_rate=section.number("max_rate", None, min=0.0),
        frozen_after_s=section.number("frozen_after_s", None, min=0.001),
        frozen_min_change=section.number("frozen_min_change", 0.0, min=0.0),
        frozen_while=section.text("frozen_while", None),
        writable=section.flag("writable", False),
        min=section.number("min", None),
        max=section.number("max", None),
        physical_min=_physical_bound(section, "physical_min"),
        physical_max=_physical_bound(section, "physical_max"),
        physical_margin=section.number("physical_margin", 0.0, min=0.0),
    )
    command = _command_rule(section, spec.writable)
    if command is not None:
        spec = replace(spec, command=command)
    section.finish()
    if spec.min is not None and spec.max is not None and spec.min > spec.max:
        raise section.error("max", f"max ({spec.max}) is below min ({spec.min})")
    if (
        spec.high.warning is not None
        and spec.low.warning is not None
        and spec.low.warning >= spec.high.warning
    ):
        raise section.error("low", "the low warning limit must be below the high one")
    if (
        isinstance(spec.physical_min, float)
        and isinstance(spec.physical_max, float)
        and spec.physical_min > spec.physical_max
    ):
        raise section.error(
            "physical_max",
            f"physical_max ({spec.physical_max:g}) is below physical_min ({spec.physical_min:g})",
        )
    return spec


STATIC_PREFIX = "static."


def _physical_bound(section: Section, key: str) -> float | str | None:
    """A number, or ``"static.KEY"`` (checked against each entity in ``_physical_ranges``)."""
    value = section.raw(key, None)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str) and value.startswith(STATIC_PREFIX) and value[len(STATIC_PREFIX) :]:
        return value
    raise section.error(
        key,
        f'expected a number or "static.KEY" naming a static attribute of the entity, got {value!r}',
    )


_COMMAND_KEYS = (
    "approvals",
    "two_person",
    "max_step",
    "tolerance",
    "verify_timeout_s",
    "select_window_s",
    "approval_timeout_s",
    "command_expiry_s",
    "rollback",
)


def _command_rule(section: Section, writable: bool) -> CommandRule | None:
    if not writable:
        for key in _COMMAND_KEYS:
            if section.has(key):
                raise section.error(
                    key, "command settings need 'writable = true' on this attribute"
                )
        return None
    return CommandRule(
        approvals=section.integer("approvals", 1, min=0, max=8),
        two_person=section.flag("two_person", False),
        max_step=section.number("max_step", None, min=0.0),
        tolerance=section.number("tolerance", None, min=0.0),
        verify_timeout_s=section.number("verify_timeout_s", 30.0, min=0.1, max=86_400),
        select_window_s=section.number("select_window_s", 30.0, min=0.1, max=3600),
        approval_timeout_s=section.number("approval_timeout_s", 900.0, min=1.0, max=7 * 86_400),
        expiry_s=section.number("command_expiry_s", 10.0, min=0.1, max=3600),
        rollback=section.text("rollback", "auto", choices=ROLLBACK_MODES),
    )


def _types(root: Section) -> dict[str, EntityType]:
    types: dict[str, EntityType] = {}
    for name, section in root.table_items("types"):
        attributes: dict[str, AttributeSpec] = {}
        for attr_name, attr_section in section.table_items("attributes"):
            attributes[attr_name] = _attribute(attr_name, attr_section)
        for attr in attributes.values():
            ref = attr.frozen_while
            if ref is not None and "." not in ref and ref not in attributes:
                raise section.error(
                    f"attributes.{attr.name}.frozen_while",
                    f"{ref!r} is not an attribute of type {name!r}; name one "
                    "of its attributes or ENTITY.ATTRIBUTE",
                )
        types[name] = EntityType(
            name=name,
            description=section.text("description", "", allow_empty=True),
            attributes=attributes,
        )
        section.finish()
    if not types:
        raise root.error("types", "declare at least one entity type ([types.NAME])")
    return types


def _scalars(section: Section, key: str) -> dict[str, Scalar]:
    value = section.raw(key, {})
    if not isinstance(value, dict):
        raise section.error(key, "expected a table of name = value")
    for name, item in value.items():
        if not isinstance(item, bool | int | float | str) or (
            isinstance(item, float) and not math.isfinite(item)
        ):
            raise section.error(f"{key}.{name}", f"expected a number, text or bool, got {item!r}")
    return dict(value)


def _entities(
    root: Section,
    types: Mapping[str, EntityType],
    gateways: Mapping[str, GatewaySpec],
    twin_id: str,
) -> dict[str, EntitySpec]:
    entities: dict[str, EntitySpec] = {}
    twin_ids: set[str] = set()
    for section in root.sections("entities"):
        physical = section.text("id")
        if physical in entities:
            raise section.error("id", f"entity {physical!r} is declared twice")
        type_name = section.text("type", choices=types)
        gateway = section.text("gateway", None)
        if gateway is not None and gateway not in gateways:
            raise section.error(
                "gateway", f"{gateway!r} is not a declared gateway ({', '.join(sorted(gateways))})"
            )
        entity = EntitySpec(
            id=physical,
            twin_id=section.text("twin_id", f"{twin_id}/{physical}"),
            type=type_name,
            gateway=gateway,
            name=section.text("name", "", allow_empty=True),
            static=_scalars(section, "static"),
            desired=_scalars(section, "desired"),
        )
        section.finish()
        if entity.twin_id in twin_ids:
            raise section.error("twin_id", f"twin id {entity.twin_id!r} is used twice")
        twin_ids.add(entity.twin_id)
        attributes = types[type_name].attributes
        for name, value in entity.desired.items():
            spec = attributes.get(name)
            if spec is None or not spec.writable:
                raise section.error(
                    f"desired.{name}", f"{name!r} is not a writable attribute of type {type_name!r}"
                )
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if numeric and (
                (spec.min is not None and value < spec.min)  # type: ignore[operator]
                or (spec.max is not None and value > spec.max)  # type: ignore[operator]
            ):
                raise section.error(
                    f"desired.{name}",
                    f"{value} is outside the writable limits [{spec.min}, {spec.max}]",
                )
        entities[physical] = entity
    if not entities:
        raise root.error("entities", "declare at least one [[entities]] table")
    for entity in entities.values():
        for attr in types[entity.type].attributes.values():
            ref = attr.frozen_while
            if ref is not None and "." in ref:
                other, _, other_attr = ref.partition(".")
                if (
                    other not in entities
                    or other_attr not in types[entities[other].type].attributes
                ):
                    raise root.error(
                        f"types.{entity.type}.attributes.{attr.name}.frozen_while",
                        f"{ref!r} is not a declared ENTITY.ATTRIBUTE",
                    )
    return entities


def _relationships(root: Section, entities: Mapping[str, EntitySpec]) -> list[RelationshipSpec]:
    out: list[RelationshipSpec] = []
    for section in root.sections("relationships"):
        source = section.text("source", choices=entities)
        target = section.text("target", choices=entities)
        attributes = _scalars(section, "attributes") if section.has("attributes") else None
        out.append(
            RelationshipSpec(
                source=source, target=target, type=section.text("type"), attributes=attributes
            )
        )
        section.finish()
    return out


def _structural(root: Section, types: Mapping[str, EntityType]) -> list[StructuralRule]:
    out: list[StructuralRule] = []
    for section in root.sections("structural"):
        rule = StructuralRule(
            id=section.text("id"),
            description=section.text("description", "", allow_empty=True),
            entity_type=section.text("entity_type", choices=types),
            relationship=section.text("relationship"),
            target_type=section.text("target_type", choices=types),
            direction=section.text("direction", "out", choices=("in", "out")),
            min=section.integer("min", 1, min=0),
            max=section.integer("max", None, min=0),
        )
        section.finish()
        if rule.max is not None and rule.max < rule.min:
            raise section.error("max", f"max ({rule.max}) is below min ({rule.min})")
        out.append(rule)
    return out


_OPS = ("==", "!=", ">=", "<=", ">", "<")


def parse_condition(text: str, *, subject: bool) -> tuple[str, str, str, Scalar]:
    """``"tank-1.level > 0.3"`` (``subject``) or ``"> 0"`` → (entity, attribute, op, value).

    Raises ValueError with a message that says what is expected."""
    body = text.strip()
    for op in _OPS:
        left, found, right = body.partition(op)
        if not found:
            continue
        left, right = left.strip(), right.strip()
        if subject:
            entity, dot, attribute = left.rpartition(".")
            if not dot or not entity or not attribute:
                raise ValueError(f"{text!r}: expected ENTITY.ATTRIBUTE {op} VALUE")
        elif left:
            raise ValueError(f"{text!r}: expected '{op} VALUE' (the commanded value)")
        else:
            entity = attribute = ""
        if not right:
            raise ValueError(f"{text!r}: a value must follow {op}")
        value: Scalar
        if right in ("true", "false"):
            value = right == "true"
        else:
            try:
                value = float(right)
            except ValueError:
                value = right.strip("'\"")
            else:
                if not math.isfinite(value):
                    raise ValueError(f"{text!r}: {right} is not a finite number")
        return entity, attribute, op, value
    raise ValueError(f"{text!r}: expected a comparison with one of {' '.join(_OPS)}")


def _interlocks(
    root: Section, types: Mapping[str, EntityType], entities: Mapping[str, EntitySpec]
) -> list[Interlock]:
    out: list[Interlock] = []
    ids: set[str] = set()

    def point(section: Section, key: str, entity: str, attribute: str) -> None:
        _check_point(section, key, entity, attribute, types, entities)

    for section in root.sections("interlocks"):
        interlock_id = section.text("id")
        if interlock_id in ids:
            raise section.error("id", f"interlock {interlock_id!r} is declared twice")
        ids.add(interlock_id)
        target = section.text("target")
        entity, dot, attribute = target.rpartition(".")
        if not dot:
            raise section.error("target", f"{target!r}: expected ENTITY.ATTRIBUTE")
        point(section, "target", entity, attribute)
        spec = types[entities[entity].type].attributes[attribute]
        if not spec.writable:
            raise section.error("target", f"{target} is not writable; interlocks guard commands")
        when: Condition | None = None
        if section.has("when"):
            try:
                _, _, op, value = parse_condition(section.text("when"), subject=False)
            except ValueError as exc:
                raise section.error("when", str(exc)) from None
            when = Condition("", "", op, value)
        try:
            other, other_attr, op, value = parse_condition(section.text("require"), subject=True)
        except ValueError as exc:
            raise section.error("require", str(exc)) from None
        point(section, "require", other, other_attr)
        out.append(
            Interlock(
                id=interlock_id,
                entity=entity,
                attribute=attribute,
                require=Condition(other, other_attr, op, value),
                when=when,
                description=section.text("description", "", allow_empty=True),
            )
        )
        section.finish()
    return out


def _check_point(
    section: Section,
    key: str,
    entity: str,
    attribute: str,
    types: Mapping[str, EntityType],
    entities: Mapping[str, EntitySpec],
) -> None:
    """``entity.attribute`` must be a declared entity and an attribute of its type."""
    declared = entities.get(entity)
    if declared is None:
        raise section.error(
            key, f"{entity!r} is not a declared entity ({', '.join(sorted(entities))})"
        )
    if attribute not in types[declared.type].attributes:
        raise section.error(
            key,
            f"{attribute!r} is not an attribute of {entity} (type {declared.type}: "
            f"{', '.join(sorted(types[declared.type].attributes))})",
        )


def _physical_ranges(
    root: Section, types: Mapping[str, EntityType], entities: Mapping[str, EntitySpec]
) -> dict[tuple[str, str], PhysicalRange]:
    """Resolve ``physical_min``/``physical_max`` per entity (``static.KEY`` → its number).

    A reference is kept in the type so one declaration serves tanks of any height; an
    entity that lacks the static attribute is a config error, not a silently open range."""
    out: dict[tuple[str, str], PhysicalRange] = {}
    for entity in entities.values():
        for attr in types[entity.type].attributes.values():
            if attr.physical_min is None and attr.physical_max is None:
                continue
            bounds: dict[str, tuple[float | None, str]] = {}
            for side, bound in (
                ("physical_min", attr.physical_min),
                ("physical_max", attr.physical_max),
            ):
                key = f"types.{entity.type}.attributes.{attr.name}.{side}"
                if bound is None or isinstance(bound, float):
                    bounds[side] = (bound, "")
                    continue
                static_key = bound[len(STATIC_PREFIX) :]
                value = entity.static.get(static_key)
                if value is None:
                    raise root.error(
                        key,
                        f"{bound!r}: entity {entity.id!r} (type {entity.type}) has no static "
                        f"attribute {static_key!r}; add it to that entity "
                        f"(static = {{ {static_key} = ... }}) or give a number here",
                    )
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise root.error(
                        key,
                        f"{bound!r}: static {static_key} of entity {entity.id!r} is "
                        f"{value!r}, not a number",
                    )
                bounds[side] = (float(value), bound)
            (low, low_source), (high, high_source) = bounds["physical_min"], bounds["physical_max"]
            if low is not None and high is not None and low > high:
                raise root.error(
                    f"types.{entity.type}.attributes.{attr.name}.physical_max",
                    f"for entity {entity.id!r} physical_max ({high:g}) is below "
                    f"physical_min ({low:g})",
                )
            out[(entity.id, attr.name)] = PhysicalRange(
                low, high, attr.physical_margin, low_source, high_source
            )
    return out


def _plausibility(
    root: Section, types: Mapping[str, EntityType], entities: Mapping[str, EntitySpec]
) -> list[PlausibilityCheck]:
    """``[[plausibility]]``: cross-checks between readings, in the interlock syntax."""
    out: list[PlausibilityCheck] = []
    ids: set[str] = set()
    for section in root.sections("plausibility"):
        check_id = section.text("id")
        if check_id in ids:
            raise section.error("id", f"plausibility check {check_id!r} is declared twice")
        ids.add(check_id)
        conditions: dict[str, Condition] = {}
        for key in ("when", "require"):
            try:
                entity, attribute, op, value = parse_condition(section.text(key), subject=True)
            except ValueError as exc:
                raise section.error(key, str(exc)) from None
            _check_point(section, key, entity, attribute, types, entities)
            conditions[key] = Condition(entity, attribute, op, value)
        out.append(
            PlausibilityCheck(
                id=check_id,
                when=conditions["when"],
                require=conditions["require"],
                description=section.text("description", "", allow_empty=True),
            )
        )
        section.finish()
    return out


def _operators(root: Section, gateways: Mapping[str, GatewaySpec]) -> dict[str, OperatorSpec]:
    operators: dict[str, OperatorSpec] = {}
    for name, section in root.table_items("operators"):
        if ID_PATTERN.fullmatch(name) is None or name in RESERVED_IDS:
            raise section.error("", f"{name!r} is not a valid operator id")
        if name in gateways:
            raise section.error(
                "", f"{name!r} is also a gateway id; operators and gateways need distinct ids"
            )
        single = section.path("public_key", None)
        several = section.text_list("public_keys", None)
        if single is None and not several:
            raise section.error("public_key", "required key is missing (the operator's .pub file)")
        keys: list[Path] = [single] if single is not None else []
        for item in several or []:
            candidate = Path(item).expanduser()
            keys.append(candidate if candidate.is_absolute() else root.file.parent / candidate)
        roles = section.text_list("roles")
        for role in roles:
            if role not in OPERATOR_ROLES:
                raise section.error(
                    "roles", f"{role!r} is not a role ({', '.join(OPERATOR_ROLES)})"
                )
        if not roles:
            raise section.error("roles", f"give at least one role ({', '.join(OPERATOR_ROLES)})")
        operators[name] = OperatorSpec(
            id=name,
            public_keys=tuple(keys),
            roles=frozenset(roles),
            name=section.text("name", "", allow_empty=True),
        )
        section.finish()
    return operators


def _prediction(
    root: Section, types: Mapping[str, EntityType], entities: Mapping[str, EntitySpec]
) -> PredictionConfig:
    section = root.section("prediction")
    settings = PredictionConfig(
        enabled=section.flag("enabled", True),
        step_s=section.number("step_s", 1.0, min=0.05, max=3600),
        history_s=section.number("history_s", 6 * 3600.0, min=60, max=90 * 86_400),
        refit_s=section.number("refit_s", 600.0, min=1.0, max=7 * 86_400),
        horizon_s=section.number("horizon_s", 600.0, min=1.0, max=7 * 86_400),
        residual_window_s=section.number("residual_window_s", 60.0, min=0.1, max=86_400),
        residual_k=section.number("residual_k", 4.0, min=1.0, max=100.0),
        residual_hold_s=section.number("residual_hold_s", 20.0, min=0.0, max=86_400),
        min_r2=section.number("min_r2", 0.5, min=-1.0, max=1.0),
    )
    section.finish()

    def point(where: Section, key: str, text: str) -> tuple[str, str]:
        entity, dot, attribute = text.rpartition(".")
        if not dot:
            raise where.error(key, f"{text!r}: expected ENTITY.ATTRIBUTE")
        declared = entities.get(entity)
        if declared is None:
            raise where.error(key, f"{entity!r} is not a declared entity")
        if attribute not in types[declared.type].attributes:
            raise where.error(
                key, f"{attribute!r} is not an attribute of {entity} (type {declared.type})"
            )
        return entity, attribute

    influences: list[Influence] = []
    targets: set[tuple[str, str]] = set()
    for item in root.sections("influences"):
        target = point(item, "target", item.text("target"))
        if target in targets:
            raise item.error("target", f"{'.'.join(target)} has two [[influences]] entries")
        targets.add(target)
        names = item.text_list("inputs", [])
        if not names:
            raise item.error("inputs", "name at least one ENTITY.ATTRIBUTE that drives the target")
        inputs = tuple(point(item, "inputs", name) for name in names)
        if target in inputs:
            raise item.error("inputs", "a target's own past is always used; do not list it")
        influences.append(Influence(target, inputs, item.text("description", "", allow_empty=True)))
        item.finish()
    return replace(settings, influences=tuple(influences))


def _drift(section: Section) -> DriftConfig:
    config = DriftConfig(
        interval_s=section.number("interval_s", 1.0, min=0.05, max=3600),
        stale_factor=section.number("stale_factor", 3.0, min=1.0),
        default_interval_s=section.number("default_interval_s", 10.0, min=0.001),
        gateway_silent_s=section.number("gateway_silent_s", 15.0, min=0.1),
        missing_after_s=section.number("missing_after_s", 30.0, min=0.0),
        rate_hold_s=section.number("rate_hold_s", 10.0, min=0.0),
    )
    section.finish()
    return config


def _ingest(section: Section) -> IngestConfig:
    config = IngestConfig(
        batch_max_frames=section.integer("batch_max_frames", 500, min=1, max=100_000),
        batch_window_ms=section.integer("batch_window_ms", 5, min=0, max=10_000),
        ack_interval_ms=section.integer("ack_interval_ms", 100, min=0, max=60_000),
        gap_timeout_s=section.number("gap_timeout_s", 5.0, min=0.0),
        rebirth_min_interval_s=section.number("rebirth_min_interval_s", 10.0, min=0.0),
        audit_rejections_per_minute=section.integer(
            "audit_rejections_per_minute", 60, min=0, max=1_000_000
        ),
        max_frame_bytes=section.integer("max_frame_bytes", 1 << 20, min=1024, max=64 << 20),
        queue_max_frames=section.integer("queue_max_frames", 10_000, min=10, max=1_000_000),
    )
    section.finish()
    return config


def _reconciliation(section: Section) -> ReconciliationConfig:
    default = section.text("default", "alert", choices=STRATEGIES)
    rules: list[StrategyRule] = []
    for item in section.sections("rules"):
        drift = item.text("drift")
        known = drift == "*" or any(
            rule == drift or rule.startswith(drift + ".") or fnmatch.fnmatchcase(rule, drift)
            for rule in DRIFT_RULES
        )
        if not known:
            raise item.error(
                "drift", f"{drift!r} matches no drift check ({', '.join(DRIFT_RULES)})"
            )
        rules.append(
            StrategyRule(
                drift=drift,
                strategy=item.text("strategy", choices=STRATEGIES),
                entity_type=item.text("entity_type", "*"),
                entity=item.text("entity", "*"),
                attribute=item.text("attribute", "*"),
                severity=item.text("severity", None, choices=SEVERITIES),
                auto_execute=item.flag("auto_execute", False),
            )
        )
        if rules[-1].auto_execute and rules[-1].strategy != "auto_correct":
            raise item.error("auto_execute", "only an auto_correct rule executes commands")
        item.finish()
    section.finish()
    return ReconciliationConfig(default=default, rules=tuple(rules))


def describe_config_value(value: Any) -> str:
    """Compact text for a config value in exports (numbers without trailing .0)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
