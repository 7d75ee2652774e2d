"""The console feed: signed snapshots and deltas of the live twin for operator consoles.

Consoles (hub/console/) never open the hub's database: they ask for a snapshot over the
operator channel (``view.snapshot``), then follow signed deltas the hub publishes on
``ft/v1/hub/view/{stream}``. docs/console.md and docs/protocol.md ("Views") describe the
protocol; in short:

- Streams: ``twin`` (entities, point metadata, attribute values, health, gateway links),
  ``alarms`` (open alarms; a cleared alarm comes once with state ``cleared``),
  ``commands`` (command rows; timelines are asked for with ``cmd.show``), ``hub``
  (audit chain head and hub counters; at least once a second, so it is the heartbeat).
- Every frame is a ``View`` (stream, instance, view_seq, data) signed by the hub.
  ``view_seq`` is dense per (hub instance, stream), from 1. A console that sees a gap,
  or a new instance, asks for a fresh snapshot.
- ``data`` is ``{"now_ms": hub clock, "tables": {NAME: {"cols": [...], "rows": [[...]]}}}``.
  Rows are upserts keyed by their first column(s), so applying one twice changes
  nothing: a snapshot taken between two deltas may already hold part of the next one.
- Snapshot: the first ``view.snapshot`` call builds the whole view at one instant and
  answers its first part, with ``seq`` (the last published ``view_seq`` of every
  stream at that instant) and ``parts``; the console fetches the other parts with
  ``{"snapshot": ID, "part": N}``. Parts stay under ``PART_BYTES`` (frames are at most
  1 MiB). A snapshot replaces the console's view; deltas with ``view_seq <= seq`` are
  already in it.

Cost and bounds: ``ViewFeed.tick`` runs on the database thread every ``INTERVAL_S`` and
costs in proportion to what changed, not to the size of the twin: the feed swaps the
twin's current-value and point dicts for ``WatchedDict``s (plain dicts that also note
which keys were written; ingest writes them with ``update``), so a tick reads the keys
written since the last one. Changes are coalesced between ticks (an attribute that
changed ten times is sent once, with its latest value). A tick never queues frames: the
runtime publishes them at QoS 0, and a console that falls behind loses frames, sees the
gap and takes a fresh snapshot; the hub never waits for it.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from fieldtwin.hub.errors import QueryError
from fieldtwin.hub.state import QUALITY_NAMES, CurrentValue, PointInfo
from fieldtwin.hub.storage import ALARM_COLUMNS
from fieldtwin.protocol.messages import View
from fieldtwin.protocol.topics import view_topic

if TYPE_CHECKING:
    from fieldtwin.hub.service import HubService, Outbound
    from fieldtwin.hub.storage import TwinStorePort

STREAMS = ("twin", "alarms", "commands", "hub")
INTERVAL_S = 0.25
"""How often deltas are computed and published (coalescing window)."""
HEARTBEAT_MS = 1000
"""The ``hub`` stream is published at least this often, so consoles see the hub alive."""
PART_BYTES = 600 * 1024
"""A snapshot part or delta frame stays below this (the frame limit is 1 MiB)."""
DELTA_ROWS = 6000
"""At most this many attribute rows per delta frame (each well under 100 bytes)."""
SNAPSHOT_TTL_MS = 60_000
MAX_SNAPSHOTS = 8
SNAPSHOT_REUSE_MS = 1000
"""An operator asking again within this gets the snapshot just built (no rebuild storm)."""
HISTORY_BUCKETS = 240

ENTITY_COLS = ("id", "twin_id", "type", "gateway", "name", "declared", "static")
POINT_COLS = ("entity", "attribute", "unit", "source", "gateway", "dtype", "writable", "min", "max")
ATTR_COLS = ("entity", "attribute", "value", "ts_ms", "quality", "received_ms")
HEALTH_COLS = ("entity", "health")
LINK_COLS = (
    "gateway",
    "declared",
    "online",
    "up",
    "last_frame_ms",
    "last_birth_ms",
    "death_ms",
    "death_reason",
    "epoch",
    "frames",
    "points",
)
SCHEMA_COLS = (
    "type",
    "attribute",
    "order",
    "unit",
    "description",
    "writable",
    "min",
    "max",
    "max_step",
    "high_warning",
    "high_critical",
    "low_warning",
    "low_critical",
    "stale_after_s",
    "approvals",
    "two_person",
)
RELATIONSHIP_COLS = ("source", "target", "type")
ALARM_COLS = tuple(c for c in ALARM_COLUMNS if c != "present")
"""The alarm columns consoles see: the stored ones but the engine's ``present`` flag."""
COMMAND_COLS = (
    "id",
    "state",
    "state_label",
    "gateway",
    "entity",
    "attribute",
    "value",
    "reason",
    "source",
    "proposed_by",
    "proposed_ms",
    "updated_ms",
    "approvals_required",
    "two_person",
    "digest",
    "checkpoint",
    "policy",
    "approvals",
    "approved_ms",
    "sent_ms",
    "result_status",
    "result_detail",
    "verified_ms",
    "closed_ms",
    "outcome",
    "alarm_id",
    "rollback_of",
    "rollback_id",
    "rollback_from",
    "approval_deadline_ms",
)
HUB_COLS = (
    "twin_id",
    "audit_seq",
    "audit_hash",
    "points_applied",
    "frames_accepted",
    "ingest_lag_s",
    "commands_in_flight",
    "alarms_open",
    "interval_ms",
    "heartbeat_ms",
)


def table(cols: Sequence[str], rows: Iterable[Sequence[Any]]) -> dict[str, Any]:
    return {"cols": list(cols), "rows": [list(r) for r in rows]}


class WatchedDict(dict[Any, Any]):
    """A dict that notes the keys written to it (``update`` and item assignment)."""

    def __init__(self, data: Mapping[Any, Any]) -> None:
        super().__init__(data)
        self.written: set[Any] = set()

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.written.add(key)

    def update(self, other: Any = (), /, **kw: Any) -> None:
        super().update(other, **kw)
        self.written.update(other.keys() if isinstance(other, Mapping) else dict(other))
        self.written.update(kw)

    def take(self) -> set[Any]:
        written, self.written = self.written, set()
        return written


def watch(holder: Any, name: str) -> WatchedDict:
    """Swap ``holder.name`` for a ``WatchedDict`` with the same content (once)."""
    current = getattr(holder, name)
    if not isinstance(current, WatchedDict):
        current = WatchedDict(current)
        setattr(holder, name, current)
    return current


@dataclass(slots=True)
class _Snapshot:
    id: str
    operator: str
    built_ms: int
    seq: dict[str, int]
    parts: list[dict[str, dict[str, Any]]] = field(default_factory=list)


class ViewFeed:
    """What consoles see, and what changed since they were last told (database thread)."""

    def __init__(self, service: HubService) -> None:
        self.service = service
        self.seq: dict[str, int] = dict.fromkeys(STREAMS, 0)
        self._snapshots: OrderedDict[str, _Snapshot] = OrderedDict()
        self._last_hub_ms = 0
        self._last_hub_row: tuple[Any, ...] = ()
        # baselines: what the published deltas have told consoles (primed to now: a
        # console starts from a snapshot, never from the first delta)
        state = service.ingest.state
        self._current = watch(state, "current")
        self._points = watch(state, "points")
        self._health_report: object = service.last_report
        self._sent_health: dict[str, str] = dict(self._health())
        self._sent_entities: set[str] = set(self._entity_ids())
        self._sent_links: dict[str, tuple[Any, ...]] = {
            row[0]: self._link_key(row) for row in self._link_rows()
        }
        self._sent_alarms: dict[str, tuple[Any, ...]] = {
            a.id: _alarm_key(a.row()) for a in service.alarm_book.open.values()
        }
        self._sent_commands: dict[str, tuple[Any, ...]] = {
            c.id: (c.state, c.updated_ms, len(c.approvals))
            for c in service.visible_commands().values()
        }
        self.frames_published = 0

    # -- sources -------------------------------------------------------------------------

    def _health(self) -> Mapping[str, str]:
        report = self.service.last_report
        known = dict(self.service._health)
        if report is not None:
            known.update(report.health)
        return known

    def _entity_ids(self) -> list[str]:
        declared = self.service.config.schema.entities
        seen = self.service.ingest.state.entities()
        return sorted(set(declared) | seen)

    def _entity_rows(self, ids: Iterable[str]) -> list[list[Any]]:
        config = self.service.config
        declared = config.schema.entities
        rows = []
        for entity in ids:
            spec = declared.get(entity)
            if spec is not None:
                rows.append(
                    [
                        entity,
                        spec.twin_id,
                        spec.type,
                        spec.gateway or self.service.engine.gateway_of(entity) or "",
                        spec.name,
                        True,
                        dict(spec.static),
                    ]
                )
            else:
                rows.append(
                    [
                        entity,
                        entity,  # as the store names an undeclared entity's twin id
                        "undeclared",
                        self.service.engine.gateway_of(entity) or "",
                        "",
                        False,
                        {},
                    ]
                )
        return rows

    @staticmethod
    def _point_row(info: PointInfo) -> list[Any]:
        return [
            info.entity,
            info.attribute,
            info.unit,
            info.source,
            info.gateway,
            info.dtype,
            info.writable,
            info.min,
            info.max,
        ]

    @staticmethod
    def _attr_row(key: tuple[str, str], current: CurrentValue) -> list[Any]:
        return [
            key[0],
            key[1],
            current.value,
            current.ts_ms,
            QUALITY_NAMES[current.quality],
            current.received_ms,
        ]

    def _link_rows(self) -> list[list[Any]]:
        service = self.service
        state = service.ingest.state
        silent = service.last_report.silent_gateways if service.last_report else set()
        silent = silent | service.mirrored_silent
        rows = []
        for gateway in sorted(set(service.config.gateways) | set(state.gateways)):
            link = state.gateways.get(gateway)
            last = link.last_frame_ms if link else 0
            rows.append(
                [
                    gateway,
                    gateway in service.config.gateways,
                    bool(link and link.online),
                    bool(last) and gateway not in silent,
                    last,
                    link.last_birth_ms if link else 0,
                    link.death_ms if link else 0,
                    link.death_reason if link else "",
                    link.epoch if link else 0,
                    link.frames if link else 0,
                    link.points if link else 0,
                ]
            )
        return rows

    @staticmethod
    def _link_key(row: Sequence[Any]) -> tuple[Any, ...]:
        # last_frame_ms to the second: consoles tick ages themselves
        return (row[1], row[2], row[3], row[4] // 1000, row[5], row[6], row[7], row[8])

    def _schema_rows(self) -> list[list[Any]]:
        rows = []
        for type_name, entity_type in sorted(self.service.config.schema.types.items()):
            for order, (name, spec) in enumerate(entity_type.attributes.items()):
                rule = spec.command
                rows.append(
                    [
                        type_name,
                        name,
                        order,
                        spec.unit,
                        spec.description,
                        spec.writable,
                        spec.min,
                        spec.max,
                        rule.max_step if rule else None,
                        spec.high.warning,
                        spec.high.critical,
                        spec.low.warning,
                        spec.low.critical,
                        spec.stale_after_s,
                        rule.approvals if rule else None,
                        rule.two_person if rule else None,
                    ]
                )
        return rows

    def _hub_row(self) -> list[Any]:
        service = self.service
        metrics = service.metrics
        return [
            service.config.twin_id,
            service.audit.head_seq,
            service.audit.head_hash,
            metrics.points_applied,
            sum(metrics.frames_accepted.values()),
            round(metrics.ingest_lag_s, 3),
            sum(not c.terminal for c in service.visible_commands().values()),
            len(service.alarm_book.open),
            int(INTERVAL_S * 1000),
            HEARTBEAT_MS,
        ]

    # -- deltas --------------------------------------------------------------------------

    def tick(self, now_ms: int) -> list[Outbound]:
        """Signed delta frames for everything that changed since the last tick."""
        frames: list[Outbound] = []
        frames.extend(self._twin_delta(now_ms))
        frames.extend(self._alarm_delta(now_ms))
        frames.extend(self._command_delta(now_ms))
        hub_row = self._hub_row()
        hub_key = tuple(hub_row[1:3]) + tuple(hub_row[6:8])
        if now_ms - self._last_hub_ms >= HEARTBEAT_MS or hub_key != self._last_hub_row:
            self._last_hub_ms = now_ms
            self._last_hub_row = hub_key
            frames.append(self._frame("hub", now_ms, {"hub": table(HUB_COLS, [hub_row])}))
        self.frames_published += len(frames)
        return frames

    def _frame(self, stream: str, now_ms: int, tables: dict[str, Any]) -> Outbound:
        from fieldtwin.hub.service import Outbound

        self.seq[stream] += 1
        body = View(
            stream=stream,
            instance=self.service.instance,
            view_seq=self.seq[stream],
            data={"now_ms": now_ms, "tables": tables},
        )
        return Outbound(view_topic(stream), self.service.sign(body))

    def _twin_delta(self, now_ms: int) -> list[Outbound]:
        state = self.service.ingest.state
        tables: dict[str, Any] = {}
        changed = self._current.take()
        point_keys = self._points.take()
        seen = {entity for entity, _ in changed} | {entity for entity, _ in point_keys}
        new_ids = sorted(e for e in seen if e not in self._sent_entities)
        if new_ids:
            self._sent_entities.update(new_ids)
            tables["entities"] = table(ENTITY_COLS, self._entity_rows(new_ids))
        points = [state.points[key] for key in point_keys if key in state.points]
        if points:
            tables["points"] = table(POINT_COLS, (self._point_row(p) for p in points))
        report = self.service.last_report
        if report is not self._health_report:
            # health moves only with the sync cycle: compare once per new report
            self._health_report = report
            health = self._health()
            changed_health = [(e, h) for e, h in health.items() if self._sent_health.get(e) != h]
            if changed_health:
                self._sent_health.update(changed_health)
                tables["health"] = table(HEALTH_COLS, sorted(changed_health))
        links = [r for r in self._link_rows() if self._sent_links.get(r[0]) != self._link_key(r)]
        if links:
            for row in links:
                self._sent_links[row[0]] = self._link_key(row)
            tables["links"] = table(LINK_COLS, links)
        current = state.current
        rows = [self._attr_row(key, current[key]) for key in changed if key in current]
        frames: list[Outbound] = []
        first = rows[:DELTA_ROWS]
        if first:
            tables["attrs"] = table(ATTR_COLS, first)
        if tables:
            frames.append(self._frame("twin", now_ms, tables))
        for start in range(DELTA_ROWS, len(rows), DELTA_ROWS):
            chunk = rows[start : start + DELTA_ROWS]
            frames.append(self._frame("twin", now_ms, {"attrs": table(ATTR_COLS, chunk)}))
        return frames

    def _alarm_delta(self, now_ms: int) -> list[Outbound]:
        book = self.service.alarm_book
        rows = []
        open_ids = set()
        for alarm in book.open.values():
            open_ids.add(alarm.id)
            data = alarm.row()
            key = _alarm_key(data)
            if self._sent_alarms.get(alarm.id) != key:
                self._sent_alarms[alarm.id] = key
                rows.append([data[c] for c in ALARM_COLS])
        gone = [alarm_id for alarm_id in self._sent_alarms if alarm_id not in open_ids]
        if gone:
            # settled since the last tick: tell consoles once, as cleared
            stored = {
                row["id"]: row
                for row in self.service.store.alarm_rows(
                    f"id IN ({', '.join('?' for _ in gone)})", gone
                )
            }
            for alarm_id in gone:
                del self._sent_alarms[alarm_id]
                known = stored.get(alarm_id)
                row: dict[str, Any] = dict(known) if known else dict.fromkeys(ALARM_COLS)
                row.update(id=alarm_id, state="cleared")
                rows.append([row.get(c) for c in ALARM_COLS])
        if not rows:
            return []
        return [self._frame("alarms", now_ms, {"alarms": table(ALARM_COLS, rows)})]

    def _command_delta(self, now_ms: int) -> list[Outbound]:
        rows = []
        known = self.service.visible_commands()
        for command in known.values():
            key = (command.state, command.updated_ms, len(command.approvals))
            if self._sent_commands.get(command.id) != key:
                self._sent_commands[command.id] = key
                rows.append(_command_row(command.row()))
        for command_id in [c for c in self._sent_commands if c not in known]:
            del self._sent_commands[command_id]  # forgotten once settled; the store keeps it
        if not rows:
            return []
        return [self._frame("commands", now_ms, {"commands": table(COMMAND_COLS, rows)})]

    # -- snapshots -----------------------------------------------------------------------

    def build_tables(self) -> dict[str, dict[str, Any]]:
        """The whole view, now, as tables (for snapshots)."""
        service = self.service
        state = service.ingest.state
        current = state.current
        alarms = [a.row() for a in service.alarm_book.open.values()]
        commands = sorted(service.visible_commands().values(), key=lambda c: c.id)
        return {
            "hub": table(HUB_COLS, [self._hub_row()]),
            "schema": table(SCHEMA_COLS, self._schema_rows()),
            "relationships": table(
                RELATIONSHIP_COLS,
                ([r.source, r.target, r.type] for r in service.config.schema.relationships),
            ),
            "entities": table(ENTITY_COLS, self._entity_rows(self._entity_ids())),
            "points": table(POINT_COLS, (self._point_row(p) for p in state.points.values())),
            "health": table(HEALTH_COLS, sorted(self._health().items())),
            "links": table(LINK_COLS, self._link_rows()),
            "alarms": table(ALARM_COLS, ([a[c] for c in ALARM_COLS] for a in alarms)),
            "commands": table(COMMAND_COLS, (_command_row(c.row()) for c in commands)),
            "attrs": table(ATTR_COLS, (self._attr_row(k, v) for k, v in current.items())),
        }

    def snapshot(self, operator: str, args: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
        """``view.snapshot``: build a snapshot and answer its first part, or answer part N."""
        self._expire(now_ms)
        wanted = args.get("snapshot")
        if wanted is not None:
            if not isinstance(wanted, str):
                raise QueryError("snapshot must be the id a first view.snapshot answered")
            snap = self._snapshots.get(wanted)
            if snap is None or snap.operator != operator:
                raise QueryError(
                    f"snapshot {wanted} expired or unknown; ask for a new one (no snapshot id)"
                )
            part = args.get("part", 0)
            if (
                isinstance(part, bool)
                or not isinstance(part, int)
                or not (0 <= part < len(snap.parts))
            ):
                raise QueryError(f"part must be a whole number in [0, {len(snap.parts)})")
            return self._answer(snap, part)
        for snap in reversed(self._snapshots.values()):
            if snap.operator == operator and now_ms - snap.built_ms < SNAPSHOT_REUSE_MS:
                return self._answer(snap, 0)
        snap = _Snapshot(secrets.token_hex(8), operator, now_ms, dict(self.seq))
        snap.parts = split_tables(self.build_tables(), PART_BYTES)
        self._snapshots[snap.id] = snap
        while len(self._snapshots) > MAX_SNAPSHOTS:
            self._snapshots.popitem(last=False)
        return self._answer(snap, 0)

    def _answer(self, snap: _Snapshot, part: int) -> dict[str, Any]:
        return {
            "snapshot": snap.id,
            "instance": self.service.instance,
            "seq": dict(snap.seq),
            "now_ms": snap.built_ms,
            "part": part,
            "parts": len(snap.parts),
            "tables": snap.parts[part],
        }

    def _expire(self, now_ms: int) -> None:
        for snap_id in [
            s.id for s in self._snapshots.values() if now_ms - s.built_ms > SNAPSHOT_TTL_MS
        ]:
            del self._snapshots[snap_id]


def _alarm_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        row["state"],
        row["severity"],
        row["updated_ms"],
        row["acked_ms"],
        row["shelved_until_ms"],
        row["description"],
    )


def _command_row(row: Mapping[str, Any]) -> list[Any]:
    return [row.get(c) for c in COMMAND_COLS]


def split_tables(tables: Mapping[str, dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Cut tables into parts whose msgpack encoding stays under ``limit`` bytes.

    Small tables travel whole in the first parts; a large one is cut by rows, each
    part carrying the same ``cols``. Every row is sized once (msgpack is fast)."""
    parts: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    size = 0
    overhead = 64
    for name, data in tables.items():
        cols = data["cols"]
        rows: list[Any] = data["rows"]
        chunk: list[Any] = []
        head = len(msgpack.packb({"cols": cols}, use_bin_type=True)) + overhead
        if size + head > limit and current:
            parts.append(current)
            current, size = {}, 0
        size += head
        for row in rows:
            row_size = len(msgpack.packb(row, use_bin_type=True))
            if row_size + head > limit:
                raise QueryError(f"a {name} row of {row_size} bytes does not fit a frame")
            if size + row_size > limit:
                if chunk:
                    current[name] = {"cols": cols, "rows": chunk}
                parts.append(current)
                current, chunk, size = {}, [], head
            chunk.append(row)
            size += row_size
        current[name] = {"cols": cols, "rows": chunk}
    parts.append(current)
    return parts


# -- history for plots -------------------------------------------------------------------


def history_series(
    store: TwinStorePort, entity: str, attribute: str, start_ms: int, end_ms: int, buckets: int
) -> dict[str, Any]:
    """One attribute's history in [start, end], as at most ``buckets`` time buckets with
    min, max, mean and last value each (numbers and booleans; text has no plot)."""
    if end_ms <= start_ms:
        raise QueryError("the end of the window is before its start")
    buckets = max(10, min(buckets, 2000))
    width = max(1, -(-(end_ms - start_ms) // buckets))
    rows = store.history_buckets(entity, attribute, start_ms, end_ms, width)
    non_numeric = store.history_text_count(entity, attribute, start_ms, end_ms)
    return {
        "entity": entity,
        "attribute": attribute,
        "from_ms": start_ms,
        "to_ms": end_ms,
        "bucket_ms": width,
        "ts_ms": [start_ms + int(b) * width for b, *_ in rows],
        "count": [int(r[1]) for r in rows],
        "min": [float(r[2]) for r in rows],
        "max": [float(r[3]) for r in rows],
        "mean": [float(r[4]) for r in rows],
        "last": [float(r[5]) for r in rows],
        "last_ts_ms": [int(r[6]) for r in rows],
        "worst_quality": [QUALITY_NAMES[int(r[7])] for r in rows],
        "samples": sum(int(r[1]) for r in rows),
        "non_numeric": non_numeric,
    }
