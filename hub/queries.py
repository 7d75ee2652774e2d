"""Twin queries over the store: current state, history, as-of, diff, alarms.

The same functions serve the hub's loopback API (run on the hub's database thread)
and ``fieldtwin twin`` when no hub is running (on a read-only connection), so both
paths give identical answers. Results are plain JSON-ready dicts.

Times: every instant is shown as ISO 8601 UTC with milliseconds, next to its
``*_ms`` epoch value. ``parse_time`` accepts ``now``, durations ago (``30s``,
``5m``, ``2h``, ``1d``, optionally with a leading ``-`` or a trailing ``ago``), epoch
milliseconds, and ISO 8601 (a time without an
offset is taken as UTC).
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fieldtwin.hub.config import HubConfig
from fieldtwin.hub.errors import QueryError
from fieldtwin.hub.state import QUALITY_NAMES, decode_value, numeric
from fieldtwin.hub.storage import TwinStorePort
from fieldtwin.protocol.messages import Value

_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def iso(ms: int | None) -> str | None:
    if ms is None or ms <= 0:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def parse_duration_ms(text: str) -> int:
    """``30s``, ``5m``, ``2h``, ``1d``, ``250ms`` → milliseconds."""
    match = _RELATIVE.match(text.strip())
    if match is None:
        raise QueryError(f"cannot read duration {text!r}; write e.g. 30s, 5m, 2h or 1d")
    return int(float(match.group(1)) * _UNIT_MS[match.group(2)])


def parse_time(text: str, now_ms: int) -> int:
    """An instant: ``now``; a duration ago (``5m``, ``-5m``, ``5m ago``); epoch ms; ISO 8601."""
    value = text.strip()
    if value == "now":
        return now_ms
    if value.endswith(" ago"):
        value = value[:-4].strip()
    match = _RELATIVE.match(value)
    if match is not None:
        return now_ms - parse_duration_ms(value.lstrip("-"))
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(
            f"cannot read time {text!r}; use now, 30s/5m/2h/1d (ago), epoch ms or ISO 8601 "
            "such as 2024-05-01T12:00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


# -- predicates ------------------------------------------------------------------------

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "!=": operator.ne,
    "==": operator.eq,
    "=": operator.eq,
    ">": operator.gt,
    "<": operator.lt,
}
_PREDICATE = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(>=|<=|!=|==|=|>|<)\s*([^<>=!\s].*?)\s*$")


@dataclass(frozen=True, slots=True)
class Predicate:
    attribute: str
    op: str
    operand: Value

    @classmethod
    def parse(cls, text: str) -> Predicate:
        match = _PREDICATE.match(text)
        if match is None:
            raise QueryError(
                f"cannot read predicate {text!r}; write ATTRIBUTE OP VALUE with OP one of "
                "= != < <= > >=, e.g. 'level>4.5' or 'running=true'"
            )
        attribute, op, raw = match.groups()
        return cls(attribute, op, _literal(raw))

    def holds(self, value: Value) -> bool:
        test = _OPS[self.op]
        left, right = numeric(value), numeric(self.operand)
        if left is not None and right is not None and not isinstance(self.operand, str):
            return bool(test(left, right))
        if self.op in ("=", "==", "!="):
            return bool(test(_text(value), _text(self.operand)))
        return False

    def __str__(self) -> str:
        return f"{self.attribute}{self.op}{self.operand}"


def _literal(raw: str) -> Value:
    text = raw.strip().strip("'\"")
    lowered = text.lower()
    if lowered in ("true", "on"):
        return True
    if lowered in ("false", "off"):
        return False
    if lowered in ("null", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _text(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


# -- current state ---------------------------------------------------------------------


def _unit(config: HubConfig, entity: str, attribute: str, point_units: dict[Any, str]) -> str:
    spec = config.schema.spec(entity, attribute)
    if spec is not None and spec.unit:
        return spec.unit
    return point_units.get((entity, attribute), "")


def current_entities(
    store: TwinStorePort,
    config: HubConfig,
    *,
    types: Sequence[str] = (),
    health: Sequence[str] = (),
    where: Sequence[Predicate] = (),
    entities: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Entities with their current attributes, filtered by type, health and predicates."""
    rows = store.entity_rows()
    point_rows = store.point_rows()
    point_units = {(e, a): unit for e, a, unit, _, _ in point_rows}
    sources = {(e, a): (source, gateway) for e, a, _, source, gateway in point_rows}
    values: dict[str, dict[str, dict[str, Any]]] = {}
    for row in store.current_rows():
        entity, attribute, kind, num, txt, ts_ms, quality, gateway, received_ms = row[:9]
        source = sources.get((entity, attribute))
        values.setdefault(entity, {})[attribute] = {
            "value": decode_value(kind, num, txt),
            "unit": _unit(config, entity, attribute, point_units),
            "ts": iso(ts_ms),
            "ts_ms": ts_ms,
            "quality": QUALITY_NAMES[quality],
            "gateway": gateway,
            "source": source[0] if source and source[0] else gateway,
            "received_ms": received_ms,
        }
    wanted_types = set(types)
    wanted_health = set(health)
    wanted_ids = set(entities)
    out: list[dict[str, Any]] = []
    for (
        physical,
        twin_id,
        type_name,
        declared,
        gateway,
        name,
        static,
        first_seen,
        hlth,
        hlth_ms,
    ) in rows:
        attrs = values.get(physical, {})
        if wanted_ids and physical not in wanted_ids and twin_id not in wanted_ids:
            continue
        if wanted_types and type_name not in wanted_types:
            continue
        if wanted_health and hlth not in wanted_health:
            continue
        if any(p.attribute not in attrs or not p.holds(attrs[p.attribute]["value"]) for p in where):
            continue
        last = max((a["received_ms"] for a in attrs.values()), default=None)
        out.append(
            {
                "physical_id": physical,
                "twin_id": twin_id,
                "type": type_name,
                "declared": bool(declared),
                "gateway": gateway,
                "name": name or "",
                "static_attributes": json.loads(static) if static else {},
                "health": hlth or "unknown",
                "health_checked": iso(hlth_ms),
                "first_seen": iso(first_seen),
                "last_updated": iso(last),
                "last_updated_ms": last,
                "attributes": attrs,
            }
        )
    if wanted_ids and not out and not (wanted_types or wanted_health or where):
        raise QueryError(f"no entity {', '.join(sorted(wanted_ids))} in the twin")
    return out


# -- history, as-of, diff --------------------------------------------------------------


def _known_point(store: TwinStorePort, entity: str, attribute: str) -> None:
    """An empty answer must not hide a typo: raise ``QueryError`` (with the closest
    names) unless the twin has reported ``entity.attribute``."""
    import difflib

    known = {(str(row[0]), str(row[1])) for row in store.current_rows()}
    if (entity, attribute) in known:
        return
    entities = sorted({e for e, _ in known})
    if entity not in entities:
        close = difflib.get_close_matches(entity, entities, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise QueryError(f"no entity {entity!r} in the twin{hint}")
    attributes = sorted(a for e, a in known if e == entity)
    close = difflib.get_close_matches(attribute, attributes, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise QueryError(
        f"{entity} has no reported attribute {attribute!r}; {hint}"
        f"its attributes: {', '.join(attributes)}"
    )


def history(
    store: TwinStorePort,
    entity: str,
    attribute: str,
    start_ms: int,
    end_ms: int,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Samples of one attribute in [start, end] by source time, oldest first."""
    if end_ms < start_ms:
        raise QueryError("the end of the window is before its start")
    rows = store.history_rows(entity, attribute, start_ms, end_ms, limit)
    if not rows:
        _known_point(store, entity, attribute)
    return [
        {
            "ts": iso(ts_ms),
            "ts_ms": ts_ms,
            "value": decode_value(kind, num, txt),
            "quality": QUALITY_NAMES[quality],
            "gateway": gateway,
            "frame": f"{gateway}/{epoch}/{seq}" if gateway else None,
            "received": iso(received_ms),
        }
        for ts_ms, kind, num, txt, quality, gateway, epoch, seq, received_ms in reversed(rows)
    ]


def as_of(store: TwinStorePort, at_ms: int) -> dict[str, dict[str, dict[str, Any]]]:
    """The whole twin as it was known at ``at_ms`` (latest sample by source time, with
    the same last-writer-wins tie-break as live ingest)."""
    rows = store.as_of_rows(at_ms)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for entity, attribute, kind, num, txt, ts_ms, quality in rows:
        out.setdefault(entity, {})[attribute] = {
            "value": decode_value(kind, num, txt),
            "ts": iso(ts_ms),
            "ts_ms": ts_ms,
            "quality": QUALITY_NAMES[quality],
        }
    return out


def diff(store: TwinStorePort, from_ms: int, to_ms: int) -> list[dict[str, Any]]:
    """What changed between two instants: added, removed and changed attributes."""
    before = as_of(store, from_ms)
    after = as_of(store, to_ms)
    changes: list[dict[str, Any]] = []
    for entity in sorted(set(before) | set(after)):
        old_attrs = before.get(entity, {})
        new_attrs = after.get(entity, {})
        for attribute in sorted(set(old_attrs) | set(new_attrs)):
            old = old_attrs.get(attribute)
            new = new_attrs.get(attribute)
            if old is None and new is not None:
                change = "added"
            elif new is None and old is not None:
                change = "removed"
            elif (
                old is not None
                and new is not None
                and (
                    old["value"] != new["value"]
                    or type(old["value"]) is not type(new["value"])
                    or old["quality"] != new["quality"]
                )
            ):
                change = "changed"
            else:
                continue
            changes.append(
                {
                    "entity": entity,
                    "attribute": attribute,
                    "change": change,
                    "before": None if old is None else old["value"],
                    "after": None if new is None else new["value"],
                    "before_ts": None if old is None else old["ts"],
                    "after_ts": None if new is None else new["ts"],
                    "before_quality": None if old is None else old["quality"],
                    "after_quality": None if new is None else new["quality"],
                }
            )
    return changes


# -- alarms and drift ------------------------------------------------------------------


def alarms(
    store: TwinStorePort, states: Sequence[str] = (), limit: int = 200
) -> list[dict[str, Any]]:
    if states:
        marks = ", ".join("?" for _ in states)
        rows = store.alarm_rows(f"state IN ({marks})", list(states))
    else:
        rows = store.alarm_rows()
    rows = rows[-limit:]
    for row in rows:
        for name in ("raised_ms", "updated_ms", "cleared_ms", "acked_ms", "shelved_until_ms"):
            row[name.replace("_ms", "")] = iso(row[name])
    return rows


def open_drift(store: TwinStorePort) -> list[dict[str, Any]]:
    rows = store.open_drift_rows()
    names = ("id", "rule", "type", "entity", "attribute", "severity", "strategy", "description")
    out = []
    for row in rows:
        item = dict(zip(names, row[:8], strict=True))
        item["detected_ms"] = row[8]
        item["detected_at"] = iso(row[8])
        out.append(item)
    return out


def audit_tail(store: TwinStorePort, limit: int = 50) -> list[dict[str, Any]]:
    rows = store.audit_tail_rows(limit)
    return [
        {
            "seq": seq,
            "ts": iso(ts_ms),
            "actor": actor,
            "action": action,
            "subject": subject,
            "detail": json.loads(detail) if detail else {},
            "hash": digest,
        }
        for seq, ts_ms, actor, action, subject, detail, digest in reversed(rows)
    ]


# -- commands ----------------------------------------------------------------------------

COMMAND_STATES = (
    "awaiting_approval",
    "approved",
    "sent",
    "executed",
    "failed",
    "rolling_back",
    "refused",
    "rejected",
    "cancelled",
    "expired",
    "verified",
    "failed_final",
    "rolled_back",
    "rollback_failed",
)
OPEN_COMMAND_STATES = COMMAND_STATES[:6]


def _command_times(row: dict[str, Any]) -> dict[str, Any]:
    for name in (
        "proposed_ms",
        "updated_ms",
        "approved_ms",
        "sent_ms",
        "verified_ms",
        "closed_ms",
        "result_ms",
        "approval_deadline_ms",
        "send_deadline_ms",
        "verify_deadline_ms",
        "expires_at_ms",
    ):
        row[name[:-3]] = iso(row.get(name))
    checkpoint = row.get("checkpoint")
    if checkpoint:
        checkpoint["ts"] = iso(checkpoint.get("ts_ms"))
        checkpoint["taken"] = iso(checkpoint.get("taken_ms"))
    for approval in row.get("approvals", []):
        approval["at"] = iso(approval.get("at_ms"))
    return row


def commands(
    store: TwinStorePort, states: Sequence[str] = (), limit: int = 100
) -> list[dict[str, Any]]:
    """Commands, newest first; ``states`` may include ``open`` for every unsettled state."""
    wanted: list[str] = []
    for state in states:
        if state == "open":
            wanted.extend(OPEN_COMMAND_STATES)
        elif state == "failed":
            wanted.extend(["failed", "failed_final"])
        elif state in COMMAND_STATES:
            wanted.append(state)
        else:
            raise QueryError(
                f"{state!r} is not a command state (open, {', '.join(COMMAND_STATES)})"
            )
    if wanted:
        marks = ", ".join("?" for _ in wanted)
        rows = store.command_rows(f"state IN ({marks})", wanted, limit=limit)
    else:
        rows = store.command_rows(limit=limit)
    return [_command_times(row) for row in rows]


def command(store: TwinStorePort, command_id: str) -> dict[str, Any]:
    """One command with its timeline (every transition) and its rollback's, if any."""
    rows = store.command_rows("id = ?", [command_id], limit=1)
    if not rows:
        raise QueryError(f"no command {command_id}")
    row = _command_times(rows[0])
    ids = [command_id] + ([row["rollback_id"]] if row.get("rollback_id") else [])
    row["timeline"] = [
        {
            "command": cmd_id,
            "at": iso(at_ms),
            "at_ms": at_ms,
            "change": change,
            "before": before,
            "after": after,
            "actor": actor,
            "request": request,
            "detail": json.loads(detail) if detail else {},
        }
        for cmd_id, at_ms, change, before, after, actor, request, detail in store.command_events(
            ids
        )
    ]
    return row
