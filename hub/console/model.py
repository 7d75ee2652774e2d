"""The console's copy of the hub's view: snapshots and deltas in, rows to show out.

Pure (no Textual, no sockets, the clock passed in), so it is tested on its own. The
session (session.py) feeds it verified ``View`` frames and snapshot parts; the screens
read it and take the sets of what changed (``take_dirty``) a few times a second, so a
burst of deltas costs one screen update (coalescing per frame).

Sequence rules (docs/console.md): each stream's ``view_seq`` must follow the last one
applied; a frame at or below it is already in the view (a snapshot may run ahead of
the deltas), a frame above ``seq + 1`` means frames were lost (``GAP``), and a frame of
another hub instance means the hub restarted (``NEW_INSTANCE``): both need a fresh
snapshot, and nothing is applied until it arrives.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fieldtwin.protocol.messages import View

APPLIED, OLD, GAP, NEW_INSTANCE, UNSYNCED = "applied", "old", "gap", "new_instance", "unsynced"

HEALTH_RANK = {"stale": 0, "degraded": 1, "unknown": 2, "healthy": 3}
SEVERITY_RANK = {"critical": 0, "warning": 1}
OPEN_ALARM_STATES = ("active", "returned", "acknowledged", "shelved")
AWAITING = "awaiting_approval"
SETTLED_COMMAND_STATES = frozenset(
    {
        "refused",
        "rejected",
        "cancelled",
        "expired",
        "verified",
        "failed_final",
        "rolled_back",
        "rollback_failed",
    }
)
FLOOD_WINDOW_MS = 10 * 60_000
FLOOD_THRESHOLD = 10
"""ISA-18.2: more than 10 alarms raised in 10 minutes (per operator) is a flood."""
KEEP_SETTLED_COMMANDS = 200


@dataclass(slots=True)
class Attr:
    value: Any
    ts_ms: int
    quality: str
    received_ms: int


@dataclass(slots=True)
class Entity:
    id: str
    twin_id: str
    type: str
    gateway: str
    name: str
    declared: bool
    static: Mapping[str, Any]
    health: str = "unknown"
    attrs: dict[str, Attr] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AttrSpec:
    """What the schema says of one attribute of a type (units, limits, thresholds)."""

    type: str
    attribute: str
    order: int
    unit: str = ""
    description: str = ""
    writable: bool = False
    min: float | None = None
    max: float | None = None
    max_step: float | None = None
    high_warning: float | None = None
    high_critical: float | None = None
    low_warning: float | None = None
    low_critical: float | None = None
    stale_after_s: float | None = None
    approvals: int | None = None
    two_person: bool | None = None


def rows_of(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    cols = data["cols"]
    return [dict(zip(cols, row, strict=True)) for row in data["rows"]]


class LiveModel:
    """Everything the console shows, keyed as the hub keys it."""

    def __init__(self) -> None:
        self.instance: str | None = None
        self.seq: dict[str, int] = {}
        self.entities: dict[str, Entity] = {}
        self.points: dict[tuple[str, str], dict[str, Any]] = {}
        self.schema: dict[str, dict[str, AttrSpec]] = {}
        self.relationships: list[dict[str, Any]] = []
        self.links: dict[str, dict[str, Any]] = {}
        self.alarms: dict[str, dict[str, Any]] = {}
        self.commands: dict[str, dict[str, Any]] = {}
        self.hub: dict[str, Any] = {}
        self.offset_ms = 0
        """Hub clock minus local clock, estimated from frame stamps (for ages)."""
        self._offsets: deque[int] = deque(maxlen=20)
        self.synced = False
        self.last_view_ms = 0
        """Local time the last frame from the hub arrived (the hub link's heartbeat)."""
        self.snapshots = 0
        self.gaps = 0
        self.updates_applied = 0
        self.stamps: list[int] = []
        """Hub times of the frames applied since the last ``take_dirty`` (for lag)."""
        self.dirty_entities: set[str] = set()
        self.dirty: set[str] = set()
        """Which other parts changed: entities (membership), alarms, commands, links, hub."""
        self.recent_raises: deque[tuple[str, int]] = deque(maxlen=1000)
        self._alarm_counts: dict[str, int] | None = None

    # -- time ----------------------------------------------------------------------------

    def hub_now(self, local_ms: int) -> int:
        return local_ms + self.offset_ms

    def _clock(self, hub_ms: int, local_ms: int) -> None:
        self._offsets.append(hub_ms - local_ms)
        # the hub stamped the frame before sending: the largest value is the least delayed
        self.offset_ms = max(self._offsets)
        self.last_view_ms = local_ms

    # -- input -----------------------------------------------------------------------------

    def load_snapshot(
        self, first: Mapping[str, Any], parts: Sequence[Mapping[str, Any]], local_ms: int
    ) -> None:
        """Replace the whole view with a snapshot (``first`` answer plus every part)."""
        self.instance = str(first["instance"])
        self.seq = {str(k): int(v) for k, v in first["seq"].items()}
        self.entities.clear()
        self.points.clear()
        self.schema.clear()
        self.relationships = []
        self.links.clear()
        self.alarms.clear()
        self._alarm_counts = None
        self.commands.clear()
        self.hub = {}
        self.recent_raises.clear()
        self._offsets.clear()
        self._clock(int(first["now_ms"]), local_ms)
        for part in parts:
            self._apply_tables(part)
        self.synced = True
        self.snapshots += 1
        self.dirty_entities = set(self.entities)
        self.dirty.update(("entities", "alarms", "commands", "links", "hub"))

    def unsync(self) -> None:
        """Frames were lost (or the hub changed): ignore deltas until the next snapshot."""
        self.synced = False

    def apply_view(self, view: View, local_ms: int) -> str:
        """Apply one verified delta frame; say whether a snapshot is needed."""
        if self.instance is None or not self.synced:
            if view.stream == "hub":
                self.last_view_ms = local_ms
            return UNSYNCED
        if view.instance != self.instance:
            self.synced = False
            return NEW_INSTANCE
        last = self.seq.get(view.stream, 0)
        self.last_view_ms = local_ms
        if view.view_seq <= last:
            return OLD
        if view.view_seq != last + 1:
            self.gaps += 1
            self.synced = False
            return GAP
        self.seq[view.stream] = view.view_seq
        now_ms = view.data.get("now_ms")
        if isinstance(now_ms, int):
            self._clock(now_ms, local_ms)
            self.stamps.append(now_ms)
        tables = view.data.get("tables")
        if isinstance(tables, Mapping):
            self._apply_tables(tables)
        return APPLIED

    def _apply_tables(self, tables: Mapping[str, Any]) -> None:
        for name, handler in (
            ("schema", self._schema),
            ("relationships", self._relationships),
            ("entities", self._entities),
            ("points", self._points),
            ("health", self._health),
            ("attrs", self._attrs),
            ("links", self._links),
            ("alarms", self._alarms),
            ("commands", self._commands),
            ("hub", self._hub),
        ):
            data = tables.get(name)
            if isinstance(data, Mapping):
                handler(data)

    def _schema(self, data: Mapping[str, Any]) -> None:
        names = AttrSpec.__dataclass_fields__
        for row in rows_of(data):
            spec = AttrSpec(**{k: v for k, v in row.items() if k in names})
            self.schema.setdefault(spec.type, {})[spec.attribute] = spec
        for type_name, specs in self.schema.items():
            self.schema[type_name] = dict(sorted(specs.items(), key=lambda kv: kv[1].order))

    def _relationships(self, data: Mapping[str, Any]) -> None:
        self.relationships = rows_of(data)

    def _entities(self, data: Mapping[str, Any]) -> None:
        for row in rows_of(data):
            entity = self.entities.get(row["id"])
            if entity is None:
                self.entities[row["id"]] = Entity(
                    row["id"],
                    row["twin_id"],
                    row["type"],
                    row["gateway"],
                    row["name"],
                    bool(row["declared"]),
                    row["static"] or {},
                )
                self.dirty.add("entities")
            else:
                entity.twin_id, entity.type = row["twin_id"], row["type"]
                entity.gateway, entity.name = row["gateway"], row["name"]
                entity.declared, entity.static = bool(row["declared"]), row["static"] or {}
            self.dirty_entities.add(row["id"])

    def _entity(self, entity_id: str) -> Entity:
        entity = self.entities.get(entity_id)
        if entity is None:
            # values may name an entity before its row arrives (same frame, or it is new)
            entity = self.entities[entity_id] = Entity(
                entity_id, entity_id, "undeclared", "", "", False, {}
            )
            self.dirty.add("entities")
        return entity

    def _points(self, data: Mapping[str, Any]) -> None:
        for row in rows_of(data):
            self.points[(row["entity"], row["attribute"])] = row
            self.dirty_entities.add(row["entity"])

    def _health(self, data: Mapping[str, Any]) -> None:
        for entity_id, health in data["rows"]:
            self._entity(entity_id).health = health
            self.dirty_entities.add(entity_id)

    def _attrs(self, data: Mapping[str, Any]) -> None:
        cols = data["cols"]
        rows = data["rows"]
        entities = self.entities
        dirty = self.dirty_entities
        if list(cols) != ["entity", "attribute", "value", "ts_ms", "quality", "received_ms"]:
            rows = [
                [r[k] for k in ("entity", "attribute", "value", "ts_ms", "quality", "received_ms")]
                for r in rows_of(data)
            ]
        for entity_id, attribute, value, ts_ms, quality, received_ms in rows:
            entity = entities.get(entity_id) or self._entity(entity_id)
            entity.attrs[attribute] = Attr(value, ts_ms, quality, received_ms)
            dirty.add(entity_id)
        self.updates_applied += len(rows)

    def _links(self, data: Mapping[str, Any]) -> None:
        for row in rows_of(data):
            self.links[row["gateway"]] = row
        self.dirty.add("links")
        # every entity of a gateway shows its link
        changed = {row[0] for row in data["rows"]}
        self.dirty_entities.update(e.id for e in self.entities.values() if e.gateway in changed)

    def _alarms(self, data: Mapping[str, Any]) -> None:
        for row in rows_of(data):
            previous = self.alarms.get(row["id"])
            if row["state"] == "cleared" or row["state"] is None:
                self.alarms.pop(row["id"], None)
            else:
                self.alarms[row["id"]] = row
            if previous is None and row.get("raised_ms"):
                self.recent_raises.append((row["id"], int(row["raised_ms"])))
            if row.get("entity"):
                self.dirty_entities.add(row["entity"])
        self._alarm_counts = None
        self.dirty.add("alarms")

    def _commands(self, data: Mapping[str, Any]) -> None:
        for row in rows_of(data):
            self.commands[row["id"]] = row
        settled = sorted(
            (c for c in self.commands.values() if c["state"] in SETTLED_COMMAND_STATES),
            key=lambda c: c["id"],
        )
        for row in settled[:-KEEP_SETTLED_COMMANDS]:
            del self.commands[row["id"]]
        self.dirty.add("commands")

    def _hub(self, data: Mapping[str, Any]) -> None:
        rows = rows_of(data)
        if rows:
            self.hub = rows[-1]
        self.dirty.add("hub")

    def take_dirty(self) -> tuple[set[str], set[str], list[int]]:
        """(changed entities, changed parts, hub stamps) since the last call."""
        entities, parts, stamps = self.dirty_entities, self.dirty, self.stamps
        self.dirty_entities, self.dirty, self.stamps = set(), set(), []
        return entities, parts, stamps

    # -- reading ---------------------------------------------------------------------------

    def spec(self, entity: Entity, attribute: str) -> AttrSpec | None:
        return self.schema.get(entity.type, {}).get(attribute)

    def attribute_names(self, entity: Entity) -> list[str]:
        """Declared attributes in schema order, then reported undeclared ones."""
        declared = list(self.schema.get(entity.type, {}))
        extra = sorted(set(entity.attrs) - set(declared))
        return declared + extra

    def primary(self, entity: Entity) -> str | None:
        """The attribute the overview shows: the type's first declared one that reports."""
        for name in self.schema.get(entity.type, {}):
            if name in entity.attrs:
                return name
        return min(entity.attrs) if entity.attrs else None

    def unit(self, entity: Entity, attribute: str) -> str:
        spec = self.spec(entity, attribute)
        if spec is not None and spec.unit:
            return spec.unit
        point = self.points.get((entity.id, attribute))
        return str(point.get("unit") or "") if point else ""

    def link(self, gateway: str) -> dict[str, Any] | None:
        return self.links.get(gateway)

    def alarms_on(self, entity_id: str) -> int:
        """Open alarms of one entity (counted once per alarms change, not per row drawn)."""
        if self._alarm_counts is None:
            counts: dict[str, int] = {}
            for alarm in self.alarms.values():
                counts[alarm["entity"]] = counts.get(alarm["entity"], 0) + 1
            self._alarm_counts = counts
        return self._alarm_counts.get(entity_id, 0)

    def entity_alarms(self, entity_id: str) -> list[dict[str, Any]]:
        return sort_alarms(a for a in self.alarms.values() if a["entity"] == entity_id)

    def alarm_counts(self) -> dict[str, int]:
        counts = {"total": 0, "critical": 0, "warning": 0, "unacked": 0, "shelved": 0}
        for alarm in self.alarms.values():
            counts["total"] += 1
            counts[alarm["severity"]] = counts.get(alarm["severity"], 0) + 1
            if alarm["state"] in ("active", "returned"):
                counts["unacked"] += 1
            if alarm["state"] == "shelved":
                counts["shelved"] += 1
        return counts

    def flood(self, local_ms: int) -> int:
        """Alarms raised in the last 10 minutes when that is a flood (ISA-18.2), else 0."""
        since = self.hub_now(local_ms) - FLOOD_WINDOW_MS
        raised = sum(1 for _, at in self.recent_raises if at >= since)
        raised = max(raised, sum(1 for a in self.alarms.values() if (a["raised_ms"] or 0) >= since))
        return raised if raised > FLOOD_THRESHOLD else 0

    def pending_approvals(self) -> list[dict[str, Any]]:
        return sorted(
            (c for c in self.commands.values() if c["state"] == AWAITING), key=lambda c: c["id"]
        )

    def commands_sorted(self) -> list[dict[str, Any]]:
        """In flight first (oldest first), then settled (newest first)."""
        open_ = [c for c in self.commands.values() if c["state"] not in SETTLED_COMMAND_STATES]
        done = [c for c in self.commands.values() if c["state"] in SETTLED_COMMAND_STATES]
        return sorted(open_, key=lambda c: c["id"]) + sorted(
            done, key=lambda c: c["id"], reverse=True
        )

    def current_value(self, entity_id: str, attribute: str) -> Attr | None:
        entity = self.entities.get(entity_id)
        return entity.attrs.get(attribute) if entity else None


def sort_alarms(alarms: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Critical before warning, then newest first; shelved ones last."""
    return sorted(
        alarms,
        key=lambda a: (
            a["state"] == "shelved",
            SEVERITY_RANK.get(a["severity"], 9),
            -(a["raised_ms"] or 0),
            a["id"],
        ),
    )


# -- filtering and sorting of the overview ------------------------------------------------


def matches(entity: Entity, query: str) -> bool:
    """``/`` filter: every word must match. ``type:X``, ``health:X``, ``gw:X`` match that
    field exactly (X may be a prefix); a plain word matches id, twin id, name, type,
    health or gateway as a substring. Case does not matter."""
    for word in query.lower().split():
        field_name, colon, wanted = word.partition(":")
        if colon and field_name in ("type", "health", "gw", "gateway"):
            value = {
                "type": entity.type,
                "health": entity.health,
                "gw": entity.gateway,
                "gateway": entity.gateway,
            }[field_name].lower()
            if not value.startswith(wanted):
                return False
            continue
        haystack = " ".join(
            (entity.id, entity.twin_id, entity.name, entity.type, entity.health, entity.gateway)
        ).lower()
        if word not in haystack:
            return False
    return True


SORTS = ("entity", "health", "type", "age")


def sort_key(sort: str, model: LiveModel, now_ms: int) -> Any:
    def by(entity: Entity) -> Any:
        if sort == "health":
            return (HEALTH_RANK.get(entity.health, 9), entity.id)
        if sort == "type":
            return (entity.type, entity.id)
        if sort == "age":
            primary = model.primary(entity)
            ts = entity.attrs[primary].ts_ms if primary else 0
            return (ts, entity.id)  # oldest first
        return entity.id

    return by


def local_ms() -> int:
    return int(time.time() * 1000)
