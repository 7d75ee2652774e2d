"""Typed message bodies, one per frame kind, with validation from the wire.

Bodies are msgpack maps with short string keys. Keys a body does not know are
ignored, so a sender may add optional fields without breaking older receivers;
a missing or mistyped known field is a ``SchemaViolation`` that names the field.
Samples travel as columns (``{"entity": [...], "attribute": [...], "value": [...],
"ts_ms": [...], "quality": [...]}``): data frames carry many of them, and columns are
both the cheapest to validate and what batched database inserts want.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, NamedTuple, Protocol, TypeAlias

from fieldtwin.protocol.errors import SchemaViolation

Value: TypeAlias = bool | int | float | str | None
"""A point value on the wire. ``None`` means "no value" (a bad-quality read)."""

MAX_NAME_LEN = 128
MAX_TEXT_LEN = 4096
MAX_SAMPLES_PER_FRAME = 10_000
MAX_POINTS_PER_BIRTH = 100_000
MAX_RANGES = 10_000
MAX_BIRTH_PARTS = 64
"""A birth larger than one frame travels in at most this many parts (docs/protocol.md)."""
MAX_DEVICES_PER_HEARTBEAT = 1024
MAX_INT = 2**63 - 1
MIN_INT = -(2**63)
"""Integer point values are signed 64-bit: [MIN_INT, MAX_INT] (docs/protocol.md, "Values")."""

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Sender, gateway and operator ids: safe inside an MQTT topic level and a file name."""

DTYPES = frozenset(
    {
        "bool",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float32",
        "float64",
        "string",
    }
)


class Quality(IntEnum):
    """OPC-style quality of a sample. A stale sample keeps its original timestamp."""

    GOOD = 0
    UNCERTAIN = 1
    BAD = 2
    STALE = 3


_QUALITY_BY_CODE: tuple[Quality, ...] = tuple(Quality)


class Sample(NamedTuple):
    """One reading of one attribute, stamped by its source."""

    entity: str
    attribute: str
    value: Value
    ts_ms: int
    quality: Quality


class Body(Protocol):
    KIND: ClassVar[str]

    def to_wire(self) -> dict[str, Any]: ...


# -- validation helpers -------------------------------------------------------------


def _fail(path: str, expected: str, got: object) -> SchemaViolation:
    shown = repr(got)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return SchemaViolation(f"{path}: expected {expected}, got {shown}")


def _map(obj: object, path: str) -> Mapping[str, Any]:
    if type(obj) is not dict:
        raise _fail(path, "a map", obj)
    return obj


def _get(obj: Mapping[str, Any], key: str, path: str) -> Any:
    try:
        return obj[key]
    except KeyError:
        raise SchemaViolation(f"{path}.{key}: required field is missing") from None


def _str(
    obj: Mapping[str, Any], key: str, path: str, *, max_len: int = MAX_NAME_LEN, empty: bool = False
) -> str:
    value = _get(obj, key, path)
    if type(value) is not str or len(value) > max_len or (not empty and not value):
        size = "" if empty else "non-empty "
        raise _fail(f"{path}.{key}", f"a {size}string of at most {max_len} characters", value)
    return value


def _id(obj: Mapping[str, Any], key: str, path: str) -> str:
    value = _get(obj, key, path)
    if type(value) is not str or ID_PATTERN.fullmatch(value) is None:
        raise _fail(f"{path}.{key}", "an id matching [A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value)
    return value


def _int(obj: Mapping[str, Any], key: str, path: str, lo: int = 0, hi: int = MAX_INT) -> int:
    value = _get(obj, key, path)
    if type(value) is not int or not lo <= value <= hi:
        raise _fail(f"{path}.{key}", f"an integer in [{lo}, {hi}]", value)
    return value


def _opt_int(obj: Mapping[str, Any], key: str, path: str) -> int | None:
    if obj.get(key) is None:
        return None
    return _int(obj, key, path)


def _bool(obj: Mapping[str, Any], key: str, path: str) -> bool:
    value = _get(obj, key, path)
    if type(value) is not bool:
        raise _fail(f"{path}.{key}", "true or false", value)
    return value


def _opt_number(obj: Mapping[str, Any], key: str, path: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _fail(f"{path}.{key}", "a finite number or nil", value)
    return float(value)


def _list(obj: Mapping[str, Any], key: str, path: str, max_len: int) -> list[Any]:
    value = _get(obj, key, path)
    if type(value) is not list or len(value) > max_len:
        raise _fail(f"{path}.{key}", f"an array of at most {max_len} items", value)
    return value


def check_value(value: object, path: str) -> Value:
    """A point value must be nil, a bool, a signed 64-bit int, a finite float or text.

    Unsigned 64-bit readings above 2^63-1 do not fit; the agent sends them as floats
    with UNCERTAIN quality (docs/protocol.md, "Values"), so a receiver refuses them.
    """
    kind = type(value)
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise _fail(path, "a finite number", value)
    elif kind is int:
        if not MIN_INT <= value <= MAX_INT:  # type: ignore[operator]
            raise _fail(path, "a signed 64-bit integer", value)
    elif kind is str:
        if len(value) > MAX_TEXT_LEN:  # type: ignore[arg-type]
            raise _fail(path, f"text of at most {MAX_TEXT_LEN} characters", value)
    elif value is not None and kind is not bool:
        raise _fail(path, "nil, bool, int, float or string", value)
    return value  # type: ignore[return-value]


_VALUE_TYPES = frozenset({bool, int, float, str, type(None)})
_INT = frozenset({int})
_STR = frozenset({str})
_QUALITY_CODES = frozenset({0, 1, 2, 3})
SAMPLE_COLUMNS = ("entity", "attribute", "value", "ts_ms", "quality")


def _check_columns(m: Mapping[str, Any], path: str, max_len: int) -> tuple[list[Any], ...]:
    """Validate a columnar sample block; every column is checked in C-speed passes.

    Ingest throughput is bounded by this function, so no Python-level loop runs per
    sample unless the block holds ints or text (range and length checks), and the
    slow, precise diagnosis runs only once something is already known to be wrong.
    """
    columns = tuple(_list(m, name, path, max_len) for name in SAMPLE_COLUMNS)
    entities, attributes, values, stamps, qualities = columns
    count = len(entities)
    if any(len(column) != count for column in columns):
        lengths = ", ".join(f"{n}={len(c)}" for n, c in zip(SAMPLE_COLUMNS, columns, strict=True))
        raise SchemaViolation(f"{path}: sample columns differ in length ({lengths})")
    if not count:
        return columns
    for name, column in (("entity", entities), ("attribute", attributes)):
        if not set(map(type, column)) <= _STR:
            raise _diagnose(
                column, f"{path}.{name}", "a non-empty string", lambda v: type(v) is str
            )
        lengths_seen = set(map(len, column))
        if min(lengths_seen) < 1 or max(lengths_seen) > MAX_NAME_LEN:
            raise _diagnose(
                column,
                f"{path}.{name}",
                f"a non-empty string of at most {MAX_NAME_LEN}",
                lambda v: 0 < len(v) <= MAX_NAME_LEN,
            )
    if not set(map(type, stamps)) <= _INT or min(stamps) < 0 or max(stamps) > MAX_INT:
        raise _diagnose(
            stamps,
            f"{path}.ts_ms",
            "a non-negative integer (ms since 1970)",
            lambda v: type(v) is int and 0 <= v <= MAX_INT,
        )
    if not set(map(type, qualities)) <= _INT or not set(qualities) <= _QUALITY_CODES:
        raise _diagnose(
            qualities,
            f"{path}.quality",
            "0 (good), 1 (uncertain), 2 (bad) or 3 (stale)",
            lambda v: type(v) is int and 0 <= v <= 3,
        )
    kinds = set(map(type, values))
    if not kinds <= _VALUE_TYPES:
        raise _diagnose(
            values,
            f"{path}.value",
            "nil, bool, int, float or string",
            lambda v: type(v) in _VALUE_TYPES,
        )
    if float in kinds:
        floats = [v for v in values if type(v) is float]
        if not all(map(math.isfinite, floats)):
            raise _diagnose(
                values,
                f"{path}.value",
                "a finite number",
                lambda v: type(v) is not float or math.isfinite(v),
            )
    if int in kinds or str in kinds:
        for index, value in enumerate(values):
            if type(value) is int or type(value) is str:
                check_value(value, f"{path}.value[{index}]")
    return columns


def _diagnose(column: list[Any], path: str, expected: str, valid: Any) -> SchemaViolation:
    for index, value in enumerate(column):
        if not valid(value):
            return _fail(f"{path}[{index}]", expected, value)
    return _fail(path, expected, column)  # pragma: no cover - caller saw an invalid value


def _columns_to_wire(samples: Sequence[Sample]) -> dict[str, list[Any]]:
    return {
        "entity": [s.entity for s in samples],
        "attribute": [s.attribute for s in samples],
        "value": [s.value for s in samples],
        "ts_ms": [s.ts_ms for s in samples],
        "quality": [int(s.quality) for s in samples],
    }


def _samples_from_columns(columns: tuple[list[Any], ...]) -> tuple[Sample, ...]:
    qualities = _QUALITY_BY_CODE
    return tuple(
        Sample(entity, attribute, value, ts_ms, qualities[quality])
        for entity, attribute, value, ts_ms, quality in zip(*columns, strict=True)
    )


def make_sample(
    entity: str, attribute: str, value: Value, ts_ms: int, quality: Quality = Quality.GOOD
) -> Sample:
    """Build a sample, validating it exactly as a receiver would."""
    columns = _check_columns(
        _columns_to_wire([Sample(entity, attribute, value, ts_ms, quality)]), "sample", 1
    )
    return _samples_from_columns(columns)[0]


# -- bodies ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PointMeta:
    """What a birth declares about one point, so the hub can check it against its model."""

    entity: str
    attribute: str
    dtype: str
    unit: str = ""
    writable: bool = False
    min: float | None = None
    max: float | None = None
    interval_ms: int = 1000
    source: str = ""
    device: str = ""
    """The id of the agent's device (endpoint) that serves the point, as heartbeats name
    it; empty when unknown. Lets the hub tell a dead device from a silent gateway."""

    def to_wire(self) -> dict[str, Any]:
        return {
            "entity": self.entity,
            "attribute": self.attribute,
            "dtype": self.dtype,
            "unit": self.unit,
            "writable": self.writable,
            "min": self.min,
            "max": self.max,
            "interval_ms": self.interval_ms,
            "source": self.source,
            "device": self.device,
        }

    @classmethod
    def from_wire(cls, obj: object, path: str) -> PointMeta:
        m = _map(obj, path)
        dtype = _str(m, "dtype", path)
        if dtype not in DTYPES:
            raise _fail(f"{path}.dtype", "one of " + ", ".join(sorted(DTYPES)), dtype)
        return cls(
            entity=_str(m, "entity", path),
            attribute=_str(m, "attribute", path),
            dtype=dtype,
            unit=_str(m, "unit", path, max_len=32, empty=True),
            writable=_bool(m, "writable", path),
            min=_opt_number(m, "min", path),
            max=_opt_number(m, "max", path),
            interval_ms=_int(m, "interval_ms", path, 0, 86_400_000),
            source=_str(m, "source", path, max_len=512, empty=True),
            device=_str(m, "device", path, empty=True) if "device" in m else "",
        )


@dataclass(frozen=True, slots=True)
class Birth:
    """Full state and point metadata, sent on every (re)connect and on request.

    ``low_water`` is the lowest seq of this epoch the sender still holds unacknowledged;
    everything below it was acknowledged or dropped by the overflow policy, so the
    receiver can stop waiting for it.

    ``session`` is the seq of the birth that opened the sender's MQTT connection, the
    one its will (``death``) names; 0 means this birth opened it. A rebirth within the
    connection takes a fresh seq but keeps the session, so the receiver can tell the
    genuine will of the live connection from a replayed one of an earlier connection.

    A birth too large for one frame travels as ``parts`` frames (``part`` 0 .. parts-1),
    each with its own seq and a slice of ``points`` and ``state``; every part carries the
    same ``low_water``, ``session`` and ``info``, and ``first``, the seq of part 0, which
    identifies the birth (0 in part 0 itself). A receiver applies the birth once every
    part has arrived (docs/protocol.md, "Births in parts").
    """

    KIND: ClassVar[str] = "birth"
    points: tuple[PointMeta, ...]
    state: tuple[Sample, ...]
    low_water: int = 1
    info: Mapping[str, str] = field(default_factory=dict)
    session: int = 0
    state_seqs: tuple[int, ...] = ()
    """For each ``state`` sample, the seq of the data frame of this epoch that carries it.

    A birth repeats samples that travel in data frames too; the seq tells the receiver
    whether that frame was delivered (history has the sample), will still come (it is
    at or above ``low_water``), or never will (below ``low_water`` and not delivered:
    dropped by the overflow policy), so each sample reaches history exactly once.
    Empty, or shorter than ``state``, when the sender does not know (seq 0 on the wire).
    """
    part: int = 0
    parts: int = 1
    first: int = 0

    def __post_init__(self) -> None:
        if self.state_seqs and len(self.state_seqs) != len(self.state):
            raise SchemaViolation(
                f"body.state.seq: {len(self.state_seqs)} seqs for {len(self.state)} samples"
            )
        if not 1 <= self.parts <= MAX_BIRTH_PARTS or not 0 <= self.part < self.parts:
            raise SchemaViolation(
                f"body.part: part {self.part} of {self.parts}; a birth has 1 to "
                f"{MAX_BIRTH_PARTS} parts numbered from 0"
            )
        if (self.part == 0) != (self.first == 0):
            raise SchemaViolation(
                f"body.first: part {self.part} names first part seq {self.first}; part 0 "
                "carries 0, every later part the seq of part 0"
            )

    def seq_of(self, index: int) -> int:
        """The data frame seq carrying ``state[index]``, or 0 if unknown."""
        return self.state_seqs[index] if self.state_seqs else 0

    def birth_id(self, seq: int) -> int:
        """The seq of part 0, which names the whole birth, given this frame's seq."""
        return self.first or seq

    def session_seq(self, seq: int) -> int:
        """The seq of the birth that opened the connection, given this birth's own seq."""
        return self.session or self.birth_id(seq)

    def to_wire(self) -> dict[str, Any]:
        state: dict[str, list[Any]] = _columns_to_wire(self.state)
        state["seq"] = [self.seq_of(i) for i in range(len(self.state))]
        return {
            "points": [p.to_wire() for p in self.points],
            "state": state,
            "low_water": self.low_water,
            "info": dict(self.info),
            "session": self.session,
            "part": self.part,
            "parts": self.parts,
            "first": self.first,
        }

    @classmethod
    def from_wire(cls, obj: object) -> Birth:
        m = _map(obj, "body")
        points = _list(m, "points", "body", MAX_POINTS_PER_BIRTH)
        info = _map(_get(m, "info", "body"), "body.info")
        for key, value in info.items():
            if type(value) is not str or len(value) > MAX_TEXT_LEN:
                raise _fail(f"body.info.{key}", "a string", value)
        state_map = _map(_get(m, "state", "body"), "body.state")
        columns = _check_columns(state_map, "body.state", MAX_POINTS_PER_BIRTH)
        seqs = _list(state_map, "seq", "body.state", MAX_POINTS_PER_BIRTH)
        if len(seqs) != len(columns[0]):
            raise SchemaViolation(
                f"body.state: sample columns differ in length (seq={len(seqs)}, "
                f"entity={len(columns[0])})"
            )
        if seqs and (not set(map(type, seqs)) <= _INT or min(seqs) < 0 or max(seqs) > MAX_INT):
            raise _diagnose(
                seqs,
                "body.state.seq",
                "an integer in [0, 2^63) (0: unknown)",
                lambda v: type(v) is int and 0 <= v <= MAX_INT,
            )
        parts = _int(m, "parts", "body", 1, MAX_BIRTH_PARTS) if "parts" in m else 1
        return cls(
            points=tuple(PointMeta.from_wire(p, f"body.points[{i}]") for i, p in enumerate(points)),
            state=_samples_from_columns(columns),
            low_water=_int(m, "low_water", "body", 1),
            info=dict(info),
            session=_int(m, "session", "body"),
            state_seqs=tuple(seqs) if any(seqs) else (),
            part=_int(m, "part", "body", 0, parts - 1) if "part" in m else 0,
            parts=parts,
            first=_int(m, "first", "body") if "first" in m else 0,
        )


@dataclass(frozen=True, slots=True)
class Data:
    """A batch of samples: the unit the outbox commits, publishes and gets acknowledged.

    Held and sent as columns (one list per field), which is both the cheapest form to
    validate and the form batched database inserts take (``INSERT ... SELECT unnest(?)``).
    ``samples`` gives the row view when one is wanted.
    """

    KIND: ClassVar[str] = "data"
    entities: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    values: tuple[Value, ...] = ()
    ts_ms: tuple[int, ...] = ()
    qualities: tuple[int, ...] = ()

    @classmethod
    def of(cls, samples: Iterable[Sample]) -> Data:
        rows = list(samples)
        return cls(
            entities=tuple(s.entity for s in rows),
            attributes=tuple(s.attribute for s in rows),
            values=tuple(s.value for s in rows),
            ts_ms=tuple(s.ts_ms for s in rows),
            qualities=tuple(int(s.quality) for s in rows),
        )

    @property
    def samples(self) -> tuple[Sample, ...]:
        return _samples_from_columns(
            (
                list(self.entities),
                list(self.attributes),
                list(self.values),
                list(self.ts_ms),
                list(self.qualities),
            )
        )

    def __len__(self) -> int:
        return len(self.entities)

    def to_wire(self) -> dict[str, Any]:
        return {
            "entity": list(self.entities),
            "attribute": list(self.attributes),
            "value": list(self.values),
            "ts_ms": list(self.ts_ms),
            "quality": list(self.qualities),
        }

    @classmethod
    def from_wire(cls, obj: object) -> Data:
        entities, attributes, values, stamps, qualities = _check_columns(
            _map(obj, "body"), "body", MAX_SAMPLES_PER_FRAME
        )
        return cls(
            tuple(entities), tuple(attributes), tuple(values), tuple(stamps), tuple(qualities)
        )


@dataclass(frozen=True, slots=True)
class Death:
    """The MQTT will. It cannot carry a fresh seq (it is signed at connect time), so it
    names the connection it ends by the seq of the birth that opened it (a birth's
    ``session``); a replayed death names an older connection and is ignored.
    """

    KIND: ClassVar[str] = "death"
    birth_seq: int
    reason: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"birth_seq": self.birth_seq, "reason": self.reason}

    @classmethod
    def from_wire(cls, obj: object) -> Death:
        m = _map(obj, "body")
        return cls(
            birth_seq=_int(m, "birth_seq", "body", 1),
            reason=_str(m, "reason", "body", max_len=MAX_TEXT_LEN, empty=True),
        )


def _ranges(items: list[Any], path: str) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for index, item in enumerate(items):
        if (
            type(item) is not list
            or len(item) != 2
            or type(item[0]) is not int
            or type(item[1]) is not int
            or not 1 <= item[0] <= item[1] <= MAX_INT
        ):
            raise _fail(f"{path}[{index}]", "[first, last] with 1 <= first <= last", item)
        out.append((item[0], item[1]))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Ack:
    """Hub → agent: the seq ranges of ``epoch`` that are durably stored at the hub."""

    KIND: ClassVar[str] = "ack"
    to: str
    epoch: int
    ranges: tuple[tuple[int, int], ...]

    def to_wire(self) -> dict[str, Any]:
        return {"to": self.to, "epoch": self.epoch, "ranges": [list(r) for r in self.ranges]}

    @classmethod
    def from_wire(cls, obj: object) -> Ack:
        m = _map(obj, "body")
        return cls(
            to=_id(m, "to", "body"),
            epoch=_int(m, "epoch", "body"),
            ranges=_ranges(_list(m, "ranges", "body", MAX_RANGES), "body.ranges"),
        )

    def covers(self, seq: int) -> bool:
        return any(first <= seq <= last for first, last in self.ranges)


@dataclass(frozen=True, slots=True)
class Rebirth:
    """Hub → agent: send a full birth (gap detected, unknown state, resync)."""

    KIND: ClassVar[str] = "rebirth"
    to: str
    reason: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"to": self.to, "reason": self.reason}

    @classmethod
    def from_wire(cls, obj: object) -> Rebirth:
        m = _map(obj, "body")
        return cls(
            to=_id(m, "to", "body"),
            reason=_str(m, "reason", "body", max_len=MAX_TEXT_LEN, empty=True),
        )


@dataclass(frozen=True, slots=True)
class Approval:
    """One operator's signature over a command's digest (see ``fieldtwin.protocol.approvals``)."""

    operator: str
    key_id: str
    signature: bytes

    def to_wire(self) -> list[Any]:
        return [self.operator, self.key_id, self.signature]

    @classmethod
    def from_wire(cls, obj: object, path: str) -> Approval:
        if type(obj) is not list or len(obj) != 3:
            raise _fail(path, "[operator, key_id, signature]", obj)
        operator, key_id, signature = obj
        if type(operator) is not str or ID_PATTERN.fullmatch(operator) is None:
            raise _fail(f"{path}[0]", "an operator id", operator)
        if type(key_id) is not str or len(key_id) != 16:
            raise _fail(f"{path}[1]", "a 16-digit key id", key_id)
        if type(signature) is not bytes or len(signature) != 64:
            raise _fail(f"{path}[2]", "a 64-byte signature", signature)
        return cls(operator, key_id, signature)


@dataclass(frozen=True, slots=True)
class Command:
    """Hub → agent: write one attribute. The agent still applies its own allow-list.

    ``approvals`` are the operators' signatures over the command's digest, so an agent
    that knows the operators' keys can refuse what no operator approved. The digest
    covers ``restore_value`` (the checkpoint a failed command is rolled back to), so the
    same approvals authorise exactly one rollback: a command with ``rollback_of`` set
    writes the parent's ``restore_value`` and carries the parent's approvals, verified
    against the parent's digest (``rollback_from`` is the parent's value).
    """

    KIND: ClassVar[str] = "cmd"
    to: str
    cmd_id: str
    entity: str
    attribute: str
    value: Value
    expires_at_ms: int
    approvals: tuple[Approval, ...] = ()
    reason: str = ""
    restore_value: Value = None
    rollback_of: str = ""
    rollback_from: Value = None

    @property
    def approved_by(self) -> tuple[str, ...]:
        return tuple(a.operator for a in self.approvals)

    def to_wire(self) -> dict[str, Any]:
        return {
            "to": self.to,
            "cmd_id": self.cmd_id,
            "entity": self.entity,
            "attribute": self.attribute,
            "value": self.value,
            "expires_at_ms": self.expires_at_ms,
            "approvals": [a.to_wire() for a in self.approvals],
            "reason": self.reason,
            "restore_value": self.restore_value,
            "rollback_of": self.rollback_of,
            "rollback_from": self.rollback_from,
        }

    @classmethod
    def from_wire(cls, obj: object) -> Command:
        m = _map(obj, "body")
        approvals = _list(m, "approvals", "body", 16)
        return cls(
            to=_id(m, "to", "body"),
            cmd_id=_str(m, "cmd_id", "body", max_len=64),
            entity=_str(m, "entity", "body"),
            attribute=_str(m, "attribute", "body"),
            value=check_value(_get(m, "value", "body"), "body.value"),
            expires_at_ms=_int(m, "expires_at_ms", "body"),
            approvals=tuple(
                Approval.from_wire(a, f"body.approvals[{i}]") for i, a in enumerate(approvals)
            ),
            reason=_str(m, "reason", "body", max_len=MAX_TEXT_LEN, empty=True),
            restore_value=check_value(_get(m, "restore_value", "body"), "body.restore_value"),
            rollback_of=_str(m, "rollback_of", "body", max_len=64, empty=True),
            rollback_from=check_value(_get(m, "rollback_from", "body"), "body.rollback_from"),
        )


CMD_STATUSES = frozenset({"ok", "rejected", "failed", "expired", "duplicate"})


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Agent → hub: what happened to a command, with the value read back afterwards."""

    KIND: ClassVar[str] = "cmd_result"
    cmd_id: str
    status: str
    detail: str = ""
    readback: Value = None
    readback_ts_ms: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "cmd_id": self.cmd_id,
            "status": self.status,
            "detail": self.detail,
            "readback": self.readback,
            "readback_ts_ms": self.readback_ts_ms,
        }

    @classmethod
    def from_wire(cls, obj: object) -> CommandResult:
        m = _map(obj, "body")
        status = _str(m, "status", "body", max_len=16)
        if status not in CMD_STATUSES:
            raise _fail("body.status", "one of " + ", ".join(sorted(CMD_STATUSES)), status)
        return cls(
            cmd_id=_str(m, "cmd_id", "body", max_len=64),
            status=status,
            detail=_str(m, "detail", "body", max_len=MAX_TEXT_LEN, empty=True),
            readback=check_value(m.get("readback"), "body.readback"),
            readback_ts_ms=_opt_int(m, "readback_ts_ms", "body"),
        )


@dataclass(frozen=True, slots=True)
class DeviceLink:
    """One device (endpoint) of a gateway as its agent sees it right now."""

    id: str
    up: bool
    since_ms: int = 0
    """When the device last changed between up and down (0: unknown)."""
    error: str = ""
    """Why it is down (the driver's last error), empty when up."""

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "up": self.up, "since_ms": self.since_ms, "error": self.error}

    @classmethod
    def from_wire(cls, obj: object, path: str) -> DeviceLink:
        m = _map(obj, path)
        return cls(
            id=_str(m, "id", path),
            up=_bool(m, "up", path),
            since_ms=_int(m, "since_ms", path),
            error=_str(m, "error", path, max_len=512, empty=True),
        )


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Agent → hub, every few seconds: "this agent and its connection are alive", with
    the link state of each device, whether or not any device has data to send.

    Like ``death`` it is unsequenced (seq 0): it is not stored, resent or acknowledged,
    so it never opens a gap in the sender's seqs. Its replay protection is its body: it
    names the connection (``session``, as a death does) and counts up within it
    (``beat``); a receiver takes only a beat above the last one it saw for the live
    connection of the current epoch.
    """

    KIND: ClassVar[str] = "heartbeat"
    session: int
    beat: int
    interval_ms: int
    devices: tuple[DeviceLink, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "beat": self.beat,
            "interval_ms": self.interval_ms,
            "devices": [d.to_wire() for d in self.devices],
        }

    @classmethod
    def from_wire(cls, obj: object) -> Heartbeat:
        m = _map(obj, "body")
        devices = _list(m, "devices", "body", MAX_DEVICES_PER_HEARTBEAT)
        return cls(
            session=_int(m, "session", "body", 1),
            beat=_int(m, "beat", "body", 1),
            interval_ms=_int(m, "interval_ms", "body", 1, 86_400_000),
            devices=tuple(
                DeviceLink.from_wire(d, f"body.devices[{i}]") for i, d in enumerate(devices)
            ),
        )

    def down(self) -> tuple[DeviceLink, ...]:
        return tuple(d for d in self.devices if not d.up)


@dataclass(frozen=True, slots=True)
class HubState:
    """Hub → every agent, retained on ``ft/v1/hub/state``: is the hub online.

    Each broker connection of the hub is a session named by the seq of its ``online``
    frame (``session`` 0 in that frame, as in a birth). The MQTT will, signed when the
    connection is made, and the clean-stop message are ``online = false`` frames that
    name that session, so an agent applies exactly the offline state of the live session
    and refuses a replayed one (docs/protocol.md, "Hub state").
    """

    KIND: ClassVar[str] = "hub_state"
    online: bool
    instance: str
    session: int = 0
    reason: str = ""

    def __post_init__(self) -> None:
        if not self.online and not self.session:
            raise SchemaViolation("body.session: an offline state names the session it ends")

    def session_seq(self, seq: int) -> int:
        return self.session or seq

    def to_wire(self) -> dict[str, Any]:
        return {
            "online": self.online,
            "instance": self.instance,
            "session": self.session,
            "reason": self.reason,
        }

    @classmethod
    def from_wire(cls, obj: object) -> HubState:
        m = _map(obj, "body")
        return cls(
            online=_bool(m, "online", "body"),
            instance=_str(m, "instance", "body", max_len=64, empty=True),
            session=_int(m, "session", "body"),
            reason=_str(m, "reason", "body", max_len=MAX_TEXT_LEN, empty=True),
        )


# -- the operator channel -------------------------------------------------------------

REQ_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,64}")
OP_PATTERN = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
MAX_ARGS = 64


_PLAIN_SCALARS = frozenset({type(None), bool, int, float, str, bytes})


def _plain(value: object, path: str, depth: int = 0) -> Any:
    """Arguments and results are plain data: nil, bool, int, float, text, bytes, lists
    and string-keyed maps, nested at most 8 deep (msgpack has already bounded sizes)."""
    if value is None or isinstance(value, bool | int | str | bytes):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(path, "a finite number", value)
        return value
    if depth >= 8:
        raise _fail(path, "data nested at most 8 deep", value)
    if isinstance(value, list):
        # fast path (C-speed passes): a list of scalars, e.g. a view's table row or column
        kinds = set(map(type, value))
        if kinds <= _PLAIN_SCALARS and (
            float not in kinds or all(math.isfinite(v) for v in value if type(v) is float)
        ):
            return value
        return [_plain(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _fail(path, "a map with string keys", key)
            out[key] = _plain(item, f"{path}.{key}", depth + 1)
        return out
    raise _fail(path, "plain data", value)


@dataclass(frozen=True, slots=True)
class OperatorRequest:
    """Operator → hub on ``ft/v1/op/{operator}/req``: one signed action or query.

    Replay protection is ``req_id`` (a nonce, unique per operator) plus ``expires_at_ms``:
    operators run many short-lived clients (CLI calls, consoles), so unlike gateways
    they hold no durable sequence; the hub remembers each nonce until it expires and
    refuses expiries too far ahead.
    """

    KIND: ClassVar[str] = "op_req"
    req_id: str
    expires_at_ms: int
    op: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "req_id": self.req_id,
            "expires_at_ms": self.expires_at_ms,
            "op": self.op,
            "args": dict(self.args),
        }

    @classmethod
    def from_wire(cls, obj: object) -> OperatorRequest:
        m = _map(obj, "body")
        req_id = _get(m, "req_id", "body")
        if type(req_id) is not str or REQ_ID_PATTERN.fullmatch(req_id) is None:
            raise _fail("body.req_id", "16-64 characters of [A-Za-z0-9_-]", req_id)
        op = _str(m, "op", "body", max_len=64)
        if OP_PATTERN.fullmatch(op) is None:
            raise _fail("body.op", "an operation name such as cmd.propose", op)
        args = _map(_get(m, "args", "body"), "body.args")
        if len(args) > MAX_ARGS:
            raise _fail("body.args", f"at most {MAX_ARGS} arguments", len(args))
        return cls(
            req_id=req_id,
            expires_at_ms=_int(m, "expires_at_ms", "body"),
            op=op,
            args=_plain(args, "body.args"),
        )


@dataclass(frozen=True, slots=True)
class OperatorResponse:
    """Hub → operator on ``ft/v1/op/{operator}/resp``: the answer to one request.

    ``to`` and ``req_id`` are inside the signed bytes, so an answer cannot be replayed to
    another operator or another request. ``code`` is empty on success, else a short
    machine-readable reason (``unknown_operator``, ``bad_signature``, ``expired``,
    ``replay``, ``forbidden``, ``invalid``, ``not_found``, ``conflict``, ``refused``,
    ``unavailable``, ``error``) and ``error`` says it for a person.
    """

    KIND: ClassVar[str] = "op_resp"
    to: str
    req_id: str
    ok: bool
    code: str = ""
    error: str = ""
    result: Any = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "to": self.to,
            "req_id": self.req_id,
            "ok": self.ok,
            "code": self.code,
            "error": self.error,
            "result": self.result,
        }

    @classmethod
    def from_wire(cls, obj: object) -> OperatorResponse:
        m = _map(obj, "body")
        return cls(
            to=_id(m, "to", "body"),
            req_id=_str(m, "req_id", "body", max_len=64),
            ok=_bool(m, "ok", "body"),
            code=_str(m, "code", "body", max_len=32, empty=True),
            error=_str(m, "error", "body", max_len=MAX_TEXT_LEN, empty=True),
            result=_plain(m.get("result"), "body.result"),
        )


@dataclass(frozen=True, slots=True)
class View:
    """Hub → consoles on ``ft/v1/hub/view/{stream}``: a signed part of the live view.

    ``view_seq`` is dense per (hub instance, stream): a console that sees a gap asks for
    a fresh snapshot. ``data`` is plain data whose shape the stream defines.
    """

    KIND: ClassVar[str] = "view"
    stream: str
    instance: str
    view_seq: int
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "instance": self.instance,
            "view_seq": self.view_seq,
            "data": dict(self.data),
        }

    @classmethod
    def from_wire(cls, obj: object) -> View:
        m = _map(obj, "body")
        return cls(
            stream=_id(m, "stream", "body"),
            instance=_str(m, "instance", "body", max_len=64),
            view_seq=_int(m, "view_seq", "body"),
            data=_plain(_map(_get(m, "data", "body"), "body.data"), "body.data"),
        )


AnyBody: TypeAlias = (
    Birth
    | Data
    | Death
    | Ack
    | Rebirth
    | Command
    | CommandResult
    | Heartbeat
    | HubState
    | OperatorRequest
    | OperatorResponse
    | View
)

BODY_TYPES: dict[str, Any] = {
    cls.KIND: cls
    for cls in (
        Birth,
        Data,
        Death,
        Ack,
        Rebirth,
        Command,
        CommandResult,
        Heartbeat,
        HubState,
        OperatorRequest,
        OperatorResponse,
        View,
    )
}
"""Frame kind → body class (each has ``from_wire``)."""

KINDS: tuple[str, ...] = tuple(BODY_TYPES)

UPLINK_KINDS = frozenset({"birth", "data", "death", "cmd_result", "heartbeat"})
DOWNLINK_KINDS = frozenset({"ack", "rebirth", "cmd"})
HUB_KINDS = frozenset({"hub_state"})
"""Kinds the hub publishes for every agent on ``ft/v1/hub/...`` rather than per gateway."""
UNSEQUENCED_KINDS = frozenset({"death", "heartbeat"})
"""Kinds signed with seq 0: not stored, resent or tracked; their bodies name the session."""
OPERATOR_KINDS = frozenset({"op_req"})
"""What operators send (on their own request topic)."""
HUB_VIEW_KINDS = frozenset({"op_resp", "view"})
"""What the hub sends to operators and consoles."""
