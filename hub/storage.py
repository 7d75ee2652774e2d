"""The storage port: every operation the hub performs on its twin store.

Two adapters implement it: ``TwinStore`` (hub/store.py, DuckDB, the default) and
``PgTwinStore`` (hub/store_pg.py, PostgreSQL). The rest of the hub calls the methods
named in ``TwinStorePort`` and writes no SQL of its own, so a query that only one
database understands (DuckDB's ``QUALIFY``, ``list()``, ``arg_max``) lives in the
adapter that needs it.

``StoreReads`` holds the reads both adapters share. Its SQL is written once with ``?``
placeholders (the PostgreSQL adapter translates them); the few statements that differ
between the databases are class attributes each adapter sets.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from fieldtwin.hub.audit import GENESIS_HASH, AuditEvent, AuditRecord
from fieldtwin.hub.state import (
    KIND_BOOL,
    KIND_FLOAT,
    KIND_INT,
    CurrentValue,
    GatewayLink,
    PointInfo,
    TwinState,
    decode_value,
)
from fieldtwin.protocol.errors import StaleEpoch
from fieldtwin.protocol.tracker import DeliveryTracker

if TYPE_CHECKING:
    from fieldtwin.hub.config import HubConfig
    from fieldtwin.hub.store import IngestWrite, StoreRecovery, SyncWrite

Row = tuple[Any, ...]


def sequence_block(
    stored_epoch: str | None, stored_ceiling: str | None, block: int, now_ms: int
) -> tuple[int, int, int]:
    """The hub's signing epoch and the next block of seqs, (epoch, first, ceiling), from
    what the store holds. The caller stores epoch and ceiling before using any seq in
    the block, so a crash can skip seqs but never reuse one (both adapters)."""
    if stored_epoch is None:
        epoch, start = now_ms, 1
    else:
        epoch, start = int(stored_epoch), int(stored_ceiling or "0") + 1
    return epoch, start, start + block - 1


CURRENT_COLUMNS = (
    "entity, attribute, kind, num, txt, ts_ms, quality, gateway, received_ms, last_change_ms"
)

ALARM_COLUMNS = (
    "id",
    "rule",
    "drift_type",
    "entity",
    "attribute",
    "severity",
    "state",
    "strategy",
    "description",
    "value",
    "gateway",
    "raised_ms",
    "updated_ms",
    "cleared_ms",
    "acked_by",
    "acked_ms",
    "shelved_by",
    "shelved_until_ms",
    "present",
    "shelve_reason",
)


GATEWAY_COLUMNS = (
    "gateway, epoch, birth_seq, online, last_frame_ms, last_birth_ms, death_ms, death_reason, "
    "frames, points, info, upto_frame, death_birth_seq, session"
)


def link_of_row(row: Sequence[Any]) -> GatewayLink:
    """A gateway link from a row of ``GATEWAY_COLUMNS``."""
    gateway, epoch, birth_seq, online, last_frame, last_birth, death, why = row[:8]
    return GatewayLink(
        gateway,
        epoch,
        birth_seq,
        online,
        last_frame,
        last_birth,
        death,
        why,
        row[8],
        row[9],
        json.loads(row[10]) if row[10] else {},
        int(row[11] or 0),
        int(row[12] or 0),
        int(row[13] or 0),
    )


def marks(items: Sequence[Any]) -> str:
    return ", ".join("?" for _ in items)


class TwinStorePort(Protocol):
    """What the hub needs from a twin store (see the adapters for how each keeps it)."""

    read_only: bool
    recovery: StoreRecovery | None

    @property
    def location(self) -> str:
        """Where the store lives, for status lines and messages (no password)."""
        ...

    def evidence_anchor(self) -> str: ...
    def close(self) -> None: ...
    def recovery_events(self, now_ms: int) -> list[AuditEvent]: ...
    def meta(self, key: str) -> str | None: ...
    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[Row]:
        """Run one portable statement (``?`` placeholders); for tests and diagnostics."""
        ...

    def transaction(self) -> AbstractContextManager[Any]: ...

    # writes
    def hub_sequence(self, block: int) -> tuple[int, int, int]: ...
    def reserve_hub_seqs(self, ceiling: int) -> None: ...
    def sync_declared(
        self,
        entities: Sequence[tuple[str, str, str, str | None, str, str]],
        relationships: Sequence[tuple[str, str, str, str | None]],
        twin_meta: dict[str, str],
        audit: list[AuditRecord],
    ) -> None: ...
    def write_ingest(self, batch: IngestWrite) -> None: ...
    def write_sync(self, batch: SyncWrite) -> None: ...
    def write_audit(self, records: Sequence[AuditRecord]) -> None: ...
    def save_models(self, rows: Sequence[tuple[str, int, Mapping[str, Any]]]) -> None: ...

    # reads at start
    def load_state(self) -> tuple[TwinState, DeliveryTracker]: ...
    def points_and_links(self) -> tuple[list[PointInfo], list[GatewayLink]]: ...
    def flushed_current_rows(self) -> list[Row]: ...
    def next_ids(self) -> dict[str, int]: ...
    def next_command_number(self) -> int: ...
    def live_nonces(self, now_ms: int) -> list[tuple[str, str, int]]: ...
    def open_alarms(self) -> list[dict[str, Any]]: ...
    def open_drift_events(self) -> dict[tuple[str, str, str], int]: ...
    def load_models(self) -> list[dict[str, Any]]: ...
    def entity_health(self) -> dict[str, str]: ...

    # reads for queries, views and exports
    def last_check_ms(self) -> int: ...
    def audit_head(self) -> tuple[int, str]: ...
    def alarm_rows(
        self, where: str = "true", params: Sequence[Any] = ()
    ) -> list[dict[str, Any]]: ...
    def command_rows(
        self, where: str = "true", params: Sequence[Any] = (), limit: int = 1000
    ) -> list[dict[str, Any]]: ...
    def command_events(self, cmd_ids: Sequence[str]) -> list[Row]: ...
    def entity_rows(self) -> list[Row]: ...
    def twin_ids(self) -> dict[str, str]: ...
    def point_rows(self) -> list[Row]: ...
    def current_rows(self) -> list[Row]: ...
    def history_rows(
        self, entity: str, attribute: str, start_ms: int, end_ms: int, limit: int
    ) -> list[Row]: ...
    def as_of_rows(self, at_ms: int) -> list[Row]: ...
    def open_drift_rows(self) -> list[Row]: ...
    def finding_spans(
        self,
        rules: Sequence[str],
        entities: Sequence[str],
        attributes: Sequence[str],
        start_ms: int,
        end_ms: int,
    ) -> list[Row]: ...
    def audit_tail_rows(self, limit: int) -> list[Row]: ...
    def audit_chain_rows(self) -> list[Row]: ...
    def gateway_rows(self) -> list[Row]: ...
    def relationship_rows(self) -> list[Row]: ...
    def recent_actions(self, limit: int) -> list[Row]: ...
    def point_intervals(self) -> dict[str, int]: ...
    def point_sources(self) -> dict[str, tuple[int, int]]: ...
    def frame_latencies(self, per_gateway: int) -> dict[str, list[int]]: ...
    def failure_times(self) -> dict[str, int]: ...
    def operator_activity(self) -> tuple[Row, Row]: ...
    def model_count(self) -> int: ...
    def numeric_samples(
        self, entities: Sequence[str], attributes: Sequence[str], start_ms: int, end_ms: int
    ) -> list[Row]: ...
    def numeric_before(
        self, entities: Sequence[str], attributes: Sequence[str], at_ms: int
    ) -> list[Row]: ...
    def history_buckets(
        self, entity: str, attribute: str, start_ms: int, end_ms: int, width: int
    ) -> list[Row]: ...
    def history_text_count(
        self, entity: str, attribute: str, start_ms: int, end_ms: int
    ) -> int: ...


class StoreReads:
    """Reads both adapters share; ``query`` is the adapter's own."""

    CURRENT_STATE_SQL: str
    """The current state (``{columns}``): the ``current`` table plus the frames journaled
    after its last flush, decided by the same last-writer-wins order as live ingest."""
    AS_OF_SQL: str
    """The latest history sample of each attribute at or before ``?`` (same order)."""
    LATENCY_SQL: str
    """(gateway, list of received - sent) over each gateway's newest ``?`` frames."""
    COMMAND_EVENTS_SQL: str
    """Events of the commands in the list ``?``, in the order they were stored."""
    NUMERIC_BEFORE_SQL: str
    """(entity, attribute, ts_ms, value) of the newest sample at or before a time;
    ``{value}``, ``{entities}`` and ``{attributes}`` are filled in."""
    BUCKETS_SQL: str
    """Per time bucket: count, min, max, mean, last value, last time, worst quality."""
    INT_AS_DOUBLE: str
    """An expression turning ``txt`` of an integer sample into a double (NULL if not)."""

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[Row]:
        """Run one read on the adapter's own connection (each adapter defines it; the
        shared reads below are written once on top of it)."""
        raise NotImplementedError(f"{type(self).__name__} must define query()")

    # -- loading at start ------------------------------------------------------------

    def current_rows(self) -> list[Row]:
        """(entity, attribute, kind, num, txt, ts_ms, quality, gateway, received_ms,
        last_change_ms) of every attribute, by entity and attribute."""
        return self.query(self.CURRENT_STATE_SQL.format(columns=CURRENT_COLUMNS))

    def flushed_current_rows(self) -> list[Row]:
        """The same columns from the ``current`` table alone, as last flushed: what
        workers read of each other (their journals merge with the shared checkpoint's
        frame id, which is any worker's, so ``current_rows`` would scan a worker's whole
        id block of history)."""
        return self.query(f"SELECT {CURRENT_COLUMNS} FROM current ORDER BY entity, attribute")

    def load_state(self) -> tuple[TwinState, DeliveryTracker]:
        """The twin state and delivery tracker as of the last committed frame."""
        state = TwinState()
        for row in self.current_rows():
            entity, attribute, kind, num, txt, ts_ms, quality, gateway, received, changed = row
            state.current[(entity, attribute)] = CurrentValue(
                decode_value(kind, num, txt), ts_ms, quality, gateway, received, changed
            )
        table = {
            (str(entity), str(attribute)): (ts_ms, quality, decode_value(kind, num, txt))
            for entity, attribute, kind, num, txt, ts_ms, quality in self.query(
                "SELECT entity, attribute, kind, num, txt, ts_ms, quality FROM current"
            )
        }
        state.persisted = set(table)
        # Values that come from the journal (frames after the last flush) are not in the
        # ``current`` table yet: the next flush must write them, or a flush that moves the
        # checkpoint past their frames would lose them.
        state.unflushed = {
            key
            for key, value in state.current.items()
            if table.get(key) != (value.ts_ms, value.quality, value.value)
        }
        for row in self.query(
            "SELECT entity, attribute, gateway, dtype, unit, writable, min, max, interval_ms, "
            "source, updated_ms FROM points"
        ):
            point = PointInfo(*row)
            state.points[(point.entity, point.attribute)] = point
        for row in self.query(f"SELECT {GATEWAY_COLUMNS} FROM gateways"):
            state.gateways[row[0]] = link_of_row(row)
        for physical, first_seen in self.query(
            "SELECT physical_id, first_seen_ms FROM entities WHERE first_seen_ms IS NOT NULL"
        ):
            state.first_seen[physical] = first_seen
        blob = self.query("SELECT tracker, upto_frame FROM checkpoint")
        tracker = DeliveryTracker.loads(bytes(blob[0][0])) if blob else DeliveryTracker()
        upto = int(blob[0][1] or 0) if blob else 0
        # Replay the journal: frames committed after the last flush.
        for frame_id, gateway, kind, epoch, seq, received, samples, low_water in self.query(
            "SELECT id, gateway, kind, epoch, seq, received_ms, samples, low_water FROM frames "
            "WHERE id > ? ORDER BY id",
            [min([upto, *(link.upto_frame for link in state.gateways.values())])],
        ):
            if frame_id > upto:
                try:
                    tracker.record(gateway, epoch, seq)
                    if low_water:
                        tracker.close_below(gateway, epoch, low_water)
                except StaleEpoch:
                    continue
            link = state.link(gateway)
            if frame_id <= link.upto_frame:
                continue
            link.upto_frame = frame_id
            link.epoch = max(link.epoch, epoch)
            link.last_frame_ms = max(link.last_frame_ms, received)
            link.frames += 1
            link.points += samples
            if kind == "birth":
                link.birth_seq = seq
                link.session = 0  # not journaled: deaths fall back to the seq-window rule
                link.online = True
                link.last_birth_ms = received
        return state, tracker

    def points_and_links(self) -> tuple[list[PointInfo], list[GatewayLink]]:
        """Point metadata (from births) and gateway links, as stored (by several
        workers: each stores its own gateways')."""
        points = [
            PointInfo(*row)
            for row in self.query(
                "SELECT entity, attribute, gateway, dtype, unit, writable, min, max, "
                "interval_ms, source, updated_ms FROM points"
            )
        ]
        links = [link_of_row(row) for row in self.query(f"SELECT {GATEWAY_COLUMNS} FROM gateways")]
        return points, links

    def next_ids(self) -> dict[str, int]:
        """Next free frame id, drift event id and alarm/investigation/proposal numbers."""

        def one(sql: str) -> int:
            row = self.query(sql)
            return int(row[0][0] or 0) + 1

        return {
            "frame": one("SELECT max(id) FROM frames"),
            "drift": one("SELECT max(id) FROM drift_events"),
            "alarm": one("SELECT max(CAST(substr(id, 3) AS BIGINT)) FROM alarms"),
            "investigation": one("SELECT max(CAST(substr(id, 3) AS BIGINT)) FROM investigations"),
            "proposal": one("SELECT max(CAST(substr(id, 3) AS BIGINT)) FROM proposals"),
        }

    def command_rows(
        self, where: str = "true", params: Sequence[Any] = (), limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Command records (newest first), as ``CommandRecord.row()`` wrote them."""
        rows = self.query(
            f"SELECT record FROM commands WHERE {where} ORDER BY proposed_ms DESC, id DESC LIMIT ?",
            [*params, limit],
        )
        return [json.loads(row[0]) for row in rows]

    def command_events(self, cmd_ids: Sequence[str]) -> list[Row]:
        return self.query(self.COMMAND_EVENTS_SQL, [list(cmd_ids)])

    def next_command_number(self) -> int:
        row = self.query(
            "SELECT max(CAST(split_part(substr(id, 3), '.', 1) AS BIGINT)) FROM commands"
        )
        return int(row[0][0] or 0) + 1

    def live_nonces(self, now_ms: int) -> list[tuple[str, str, int]]:
        rows = self.query(
            "SELECT operator, req_id, expires_ms FROM operator_requests WHERE expires_ms >= ?",
            [now_ms],
        )
        return [(str(a), str(b), int(c)) for a, b, c in rows]

    def last_check_ms(self) -> int:
        row = self.query("SELECT last_check_ms FROM checkpoint")
        return int(row[0][0] or 0) if row else 0

    def audit_head(self) -> tuple[int, str]:
        row = self.query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        return (int(row[0][0]), str(row[0][1])) if row else (0, GENESIS_HASH)

    def open_alarms(self) -> list[dict[str, Any]]:
        return self.alarm_rows("state <> 'cleared'")

    def open_drift_events(self) -> dict[tuple[str, str, str], int]:
        return {
            (rule, entity, attribute): event_id
            for event_id, rule, entity, attribute in self.query(
                "SELECT id, rule, entity, attribute FROM drift_events WHERE cleared_ms IS NULL"
            )
        }

    def alarm_rows(self, where: str = "true", params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        rows = self.query(
            f"SELECT {', '.join(ALARM_COLUMNS)} FROM alarms WHERE {where} ORDER BY raised_ms",
            list(params),
        )
        return [dict(zip(ALARM_COLUMNS, row, strict=True)) for row in rows]

    def load_models(self) -> list[dict[str, Any]]:
        return [json.loads(record) for (record,) in self.query("SELECT record FROM models")]

    def entity_health(self) -> dict[str, str]:
        return {
            physical: health or "unknown"
            for physical, health in self.query("SELECT physical_id, health FROM entities")
        }

    # -- queries, views, exports -------------------------------------------------------

    def entity_rows(self) -> list[Row]:
        """(physical_id, twin_id, type, declared, gateway, name, static_attributes,
        first_seen_ms, health, health_ms) by physical id."""
        return self.query(
            "SELECT physical_id, twin_id, type, declared, gateway, name, static_attributes, "
            "first_seen_ms, health, health_ms FROM entities ORDER BY physical_id"
        )

    def twin_ids(self) -> dict[str, str]:
        return {row[0]: row[1] for row in self.query("SELECT physical_id, twin_id FROM entities")}

    def point_rows(self) -> list[Row]:
        """(entity, attribute, unit, source, gateway) of every point a birth declared."""
        return self.query("SELECT entity, attribute, unit, source, gateway FROM points")

    def history_rows(
        self, entity: str, attribute: str, start_ms: int, end_ms: int, limit: int
    ) -> list[Row]:
        """The newest ``limit`` samples in [start, end] (newest first), with their frame."""
        return self.query(
            """SELECT h.ts_ms, h.kind, h.num, h.txt, h.quality, f.gateway, f.epoch, f.seq,
                      f.received_ms
               FROM history h LEFT JOIN frames f ON f.id = h.frame_id
               WHERE h.entity = ? AND h.attribute = ? AND h.ts_ms BETWEEN ? AND ?
               ORDER BY h.ts_ms DESC, h.frame_id DESC LIMIT ?""",
            [entity, attribute, start_ms, end_ms, limit],
        )

    def as_of_rows(self, at_ms: int) -> list[Row]:
        """(entity, attribute, kind, num, txt, ts_ms, quality) as known at ``at_ms``."""
        return self.query(self.AS_OF_SQL, [at_ms])

    def open_drift_rows(self) -> list[Row]:
        return self.query(
            "SELECT id, rule, drift_type, entity, attribute, severity, strategy, description, "
            "detected_ms FROM drift_events WHERE cleared_ms IS NULL "
            "ORDER BY entity, attribute, rule"
        )

    def finding_spans(
        self,
        rules: Sequence[str],
        entities: Sequence[str],
        attributes: Sequence[str],
        start_ms: int,
        end_ms: int,
    ) -> list[Row]:
        """(rule, entity, attribute, detected_ms, cleared_ms) of the drift findings of
        ``rules`` on those entities and attributes that were detected by ``end_ms`` and
        open at some time after ``start_ms`` (cleared_ms None: still open). The model
        fits leave out the history they flag (hub/predict.py)."""
        if not rules or not entities or not attributes:
            return []
        return self.query(
            f"""SELECT rule, entity, attribute, detected_ms, cleared_ms FROM drift_events
                WHERE rule IN ({marks(rules)}) AND entity IN ({marks(entities)})
                  AND attribute IN ({marks(attributes)}) AND detected_ms <= ?
                  AND (cleared_ms IS NULL OR cleared_ms >= ?)
                ORDER BY detected_ms, id""",
            [*rules, *entities, *attributes, end_ms, start_ms],
        )

    def audit_tail_rows(self, limit: int) -> list[Row]:
        return self.query(
            "SELECT seq, ts_ms, actor, action, subject, detail, hash FROM audit "
            "ORDER BY seq DESC LIMIT ?",
            [limit],
        )

    def audit_chain_rows(self) -> list[Row]:
        return self.query(
            "SELECT seq, ts_ms, actor, action, subject, detail, prev_hash, hash FROM audit "
            "ORDER BY seq"
        )

    def gateway_rows(self) -> list[Row]:
        """(gateway, epoch, online, last_frame_ms, death_ms, frames) by gateway."""
        return self.query(
            "SELECT gateway, epoch, online, last_frame_ms, death_ms, frames FROM gateways "
            "ORDER BY gateway"
        )

    def relationship_rows(self) -> list[Row]:
        return self.query(
            "SELECT source, target, type, attributes FROM relationships ORDER BY source, target"
        )

    def recent_actions(self, limit: int) -> list[Row]:
        return self.query(
            "SELECT ts_ms, entity, action, result FROM actions ORDER BY ts_ms DESC LIMIT ?",
            [limit],
        )

    def point_intervals(self) -> dict[str, int]:
        return dict(
            self.query(
                "SELECT gateway, min(interval_ms) FROM points WHERE interval_ms > 0 "
                "GROUP BY gateway"
            )
        )

    def point_sources(self) -> dict[str, tuple[int, int]]:
        """Per gateway: (points its birth announced, those naming a device source)."""
        return {
            gateway: (int(points), int(with_source or 0))
            for gateway, points, with_source in self.query(
                "SELECT gateway, count(*), "
                "sum(CASE WHEN coalesce(source, '') <> '' THEN 1 ELSE 0 END) "
                "FROM points GROUP BY gateway"
            )
        }

    def frame_latencies(self, per_gateway: int) -> dict[str, list[int]]:
        return {
            gateway: list(values or [])
            for gateway, values in self.query(self.LATENCY_SQL, [per_gateway])
        }

    def failure_times(self) -> dict[str, int]:
        return dict(
            self.query(
                "SELECT subject, max(ts_ms) FROM audit "
                "WHERE action IN ('death', 'frame_rejected') GROUP BY subject"
            )
        )

    def operator_activity(self) -> tuple[Row, Row]:
        """(count, last ms) of accepted operator requests and of refused ones."""
        accepted = self.query("SELECT count(*), max(received_ms) FROM operator_requests")[0]
        refused = self.query(
            "SELECT count(*), max(ts_ms) FROM audit WHERE action = 'operator_refused'"
        )[0]
        return accepted, refused

    def model_count(self) -> int:
        return int(self.query("SELECT count(*) FROM models")[0][0])

    def _numeric_value(self) -> str:
        return (
            f"CASE WHEN kind IN ({KIND_FLOAT}, {KIND_BOOL}) THEN num "
            f"WHEN kind = {KIND_INT} THEN {self.INT_AS_DOUBLE} END"
        )

    def numeric_samples(
        self, entities: Sequence[str], attributes: Sequence[str], start_ms: int, end_ms: int
    ) -> list[Row]:
        """(entity, attribute, ts_ms, value) of good/uncertain samples in (start, end]."""
        return self.query(
            f"""SELECT entity, attribute, ts_ms, {self._numeric_value()} AS v FROM history
                WHERE entity IN ({marks(entities)}) AND attribute IN ({marks(attributes)})
                  AND ts_ms > ? AND ts_ms <= ? AND quality <= 1
                ORDER BY entity, attribute, ts_ms""",
            [*entities, *attributes, start_ms, end_ms],
        )

    def numeric_before(
        self, entities: Sequence[str], attributes: Sequence[str], at_ms: int
    ) -> list[Row]:
        """(entity, attribute, ts_ms, value) of the last good/uncertain sample at or
        before ``at_ms``."""
        return self.query(
            self.NUMERIC_BEFORE_SQL.format(
                value=self._numeric_value(), entities=marks(entities), attributes=marks(attributes)
            ),
            [*entities, *attributes, at_ms],
        )

    def history_buckets(
        self, entity: str, attribute: str, start_ms: int, end_ms: int, width: int
    ) -> list[Row]:
        """(bucket, count, min, max, mean, last, last ts, worst quality) of numeric samples."""
        return self.query(self.BUCKETS_SQL, [start_ms, width, entity, attribute, start_ms, end_ms])

    def history_text_count(self, entity: str, attribute: str, start_ms: int, end_ms: int) -> int:
        rows = self.query(
            "SELECT count(*) FROM history WHERE entity = ? AND attribute = ? "
            "AND ts_ms BETWEEN ? AND ? AND num IS NULL",
            [entity, attribute, start_ms, end_ms],
        )
        return int(rows[0][0]) if rows else 0


def open_store(
    config: HubConfig, *, read_only: bool = False, threads: int | None = None
) -> TwinStorePort:
    """The store the config names: PostgreSQL for a ``store`` URL, else the DuckDB file."""
    if config.store_url:
        from fieldtwin.hub.store_pg import PgTwinStore

        return PgTwinStore.open(config.store_url, read_only=read_only)
    from fieldtwin.hub.store import TwinStore

    return TwinStore.open(
        config.database,
        read_only=read_only,
        memory_limit=config.memory_limit,
        threads=threads or config.threads,
    )
