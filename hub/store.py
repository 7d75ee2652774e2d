"""The twin store: one DuckDB file holding entities, relationships, state and history.

Only the hub writes it, from one thread, in batches. Every DML statement costs DuckDB
about a millisecond here (plus about a microsecond per row and column), so an ingest
batch is one transaction of as few statements as possible: the accepted ``frames``
(gateway, epoch, seq, birth low water) and their samples in ``history`` — plus audit,
point metadata and gateway changes when there are any.

The ``frames`` rows double as the journal of the delivery tracker and of the current
state: the tracker snapshot and the ``current`` table (stamped in ``checkpoint`` with
the last frame id they cover) and the ``gateways`` table (each row stamped likewise)
are brought up to date once per drift cycle (``write_sync``). Loading replays the
journal past those stamps, and queries of the current state read ``current`` plus the
history rows of the frames after its stamp, so a crash between two flushes loses
nothing and a restart never applies a frame twice: a frame is delivered exactly when
its row exists.

Tables (see docs/hub.md for the columns): ``meta``, ``entities``, ``relationships``,
``points`` (metadata from births), ``current`` (last-writer-wins state), ``history``
(every sample with the frame that delivered it), ``frames`` (one row per accepted
frame), ``gateways`` (link state), ``checkpoint`` (tracker snapshot, the frame it
covers, last drift check), ``audit`` (hash-chained), ``alarms``,
``drift_events``, ``investigations``, ``proposals``, ``actions``, ``cmd_results``.

A DuckDB file is locked by the process that opens it for writing. Readers such as
``fieldtwin twin`` therefore ask a running hub over its loopback API and open the
file (read-only) only when no hub holds it.

A damaged write-ahead log (a torn disk, a bad sector, a file mangled by hand) would
make every start fail, and systemd would restart the hub into the same failure. So a
writing ``open`` that fails while replaying the WAL moves the WAL aside
(``hub.duckdb.wal.damaged-<ms>``, kept for inspection), opens the file as of its last
checkpoint, and reports it in ``TwinStore.recovery``; the hub turns that into an
audit record, an error log line and a metric (docs/reliability.md). What the WAL
held after the checkpoint is gone from the hub; the gateways' births restore the
current state, and history has a hole for that stretch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from fieldtwin.hub.audit import AuditEvent, AuditRecord
from fieldtwin.hub.errors import StoreError, StoreLocked, StoreSchemaError
from fieldtwin.hub.state import (
    CurrentValue,
    GatewayLink,
    Key,
    PointInfo,
    encode_columns,
)
from fieldtwin.hub.storage import ALARM_COLUMNS, StoreReads, sequence_block
from fieldtwin.protocol.logfmt import fields
from fieldtwin.protocol.tracker import DeliveryTracker

__all__ = ["ALARM_COLUMNS", "CURRENT_STATE_SQL", "SCHEMA_VERSION", "TwinStore"]

log = logging.getLogger("fieldtwin.hub.store")

SCHEMA_VERSION = 4

_DDL = (
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS entities (
        physical_id VARCHAR PRIMARY KEY, twin_id VARCHAR, type VARCHAR, declared BOOLEAN,
        gateway VARCHAR, name VARCHAR, static_attributes VARCHAR, first_seen_ms BIGINT,
        health VARCHAR, health_ms BIGINT)""",
    """CREATE TABLE IF NOT EXISTS relationships (
        source VARCHAR, target VARCHAR, type VARCHAR, attributes VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS points (
        entity VARCHAR, attribute VARCHAR, gateway VARCHAR, dtype VARCHAR, unit VARCHAR,
        writable BOOLEAN, min DOUBLE, max DOUBLE, interval_ms BIGINT, source VARCHAR,
        updated_ms BIGINT)""",
    """CREATE TABLE IF NOT EXISTS current (
        entity VARCHAR, attribute VARCHAR, kind UTINYINT, num DOUBLE, txt VARCHAR,
        ts_ms BIGINT, quality UTINYINT, gateway VARCHAR, received_ms BIGINT,
        last_change_ms BIGINT)""",
    """CREATE TABLE IF NOT EXISTS frames (
        id BIGINT, gateway VARCHAR, kind VARCHAR, epoch BIGINT, seq BIGINT,
        sent_at_ms BIGINT, received_ms BIGINT, samples INTEGER, low_water BIGINT)""",
    """CREATE TABLE IF NOT EXISTS history (
        entity VARCHAR, attribute VARCHAR, kind UTINYINT, num DOUBLE, txt VARCHAR,
        ts_ms BIGINT, quality UTINYINT, frame_id BIGINT)""",
    """CREATE TABLE IF NOT EXISTS gateways (
        gateway VARCHAR, epoch BIGINT, birth_seq BIGINT, online BOOLEAN,
        last_frame_ms BIGINT, last_birth_ms BIGINT, death_ms BIGINT, death_reason VARCHAR,
        frames BIGINT, points BIGINT, info VARCHAR, upto_frame BIGINT,
        death_birth_seq BIGINT, session BIGINT)""",
    """CREATE TABLE IF NOT EXISTS checkpoint (
        tracker BLOB, upto_frame BIGINT, last_check_ms BIGINT)""",
    """CREATE TABLE IF NOT EXISTS audit (
        seq BIGINT PRIMARY KEY, ts_ms BIGINT, actor VARCHAR, action VARCHAR, subject VARCHAR,
        detail VARCHAR, prev_hash VARCHAR, hash VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS alarms (
        id VARCHAR PRIMARY KEY, rule VARCHAR, drift_type VARCHAR, entity VARCHAR,
        attribute VARCHAR, severity VARCHAR, state VARCHAR, strategy VARCHAR,
        description VARCHAR, value VARCHAR, gateway VARCHAR, raised_ms BIGINT,
        updated_ms BIGINT, cleared_ms BIGINT, acked_by VARCHAR, acked_ms BIGINT,
        shelved_by VARCHAR, shelved_until_ms BIGINT, present BOOLEAN, shelve_reason VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS drift_events (
        id BIGINT PRIMARY KEY, rule VARCHAR, drift_type VARCHAR, entity VARCHAR,
        attribute VARCHAR, severity VARCHAR, strategy VARCHAR, description VARCHAR,
        detected_ms BIGINT, cleared_ms BIGINT)""",
    """CREATE TABLE IF NOT EXISTS investigations (
        id VARCHAR PRIMARY KEY, opened_ms BIGINT, alarm_id VARCHAR, rule VARCHAR,
        entity VARCHAR, attribute VARCHAR, description VARCHAR, status VARCHAR,
        snapshot VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS proposals (
        id VARCHAR PRIMARY KEY, created_ms BIGINT, alarm_id VARCHAR, entity VARCHAR,
        attribute VARCHAR, gateway VARCHAR, current_value VARCHAR, desired_value VARCHAR,
        status VARCHAR, reason VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS actions (
        ts_ms BIGINT, entity VARCHAR, action VARCHAR, result VARCHAR, detail VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS cmd_results (
        received_ms BIGINT, gateway VARCHAR, cmd_id VARCHAR, status VARCHAR, detail VARCHAR,
        readback VARCHAR, readback_ts_ms BIGINT)""",
    """CREATE TABLE IF NOT EXISTS commands (
        id VARCHAR PRIMARY KEY, entity VARCHAR, attribute VARCHAR, gateway VARCHAR,
        state VARCHAR, proposed_by VARCHAR, proposed_ms BIGINT, updated_ms BIGINT,
        closed_ms BIGINT, record VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS command_events (
        cmd_id VARCHAR, at_ms BIGINT, change VARCHAR, before VARCHAR, after VARCHAR,
        actor VARCHAR, request VARCHAR, detail VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS operator_requests (
        operator VARCHAR, req_id VARCHAR, op VARCHAR, expires_ms BIGINT, received_ms BIGINT)""",
    """CREATE TABLE IF NOT EXISTS models (
        target VARCHAR PRIMARY KEY, fitted_ms BIGINT, record VARCHAR)""",
)


def _error(exc: BaseException, path: Path, what: str) -> StoreError:
    text = str(exc)
    if "lock" in text.lower() and "conflicting" in text.lower():
        return StoreLocked(
            f"{path} is in use by another process (normally a running hub): {text.splitlines()[0]}"
        )
    return StoreError(f"{what} {path}: {text.splitlines()[0] if text else type(exc).__name__}")


@dataclass(slots=True)
class HistoryColumns:
    """Columns of history rows, appended frame by frame and inserted in one statement."""

    entity: list[str] = field(default_factory=list)
    attribute: list[str] = field(default_factory=list)
    kind: list[int] = field(default_factory=list)
    num: list[float | None] = field(default_factory=list)
    txt: list[str | None] = field(default_factory=list)
    ts_ms: list[int] = field(default_factory=list)
    quality: list[int] = field(default_factory=list)
    frame_id: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entity)

    def columns(self) -> list[list[Any]]:
        return [
            self.entity,
            self.attribute,
            self.kind,
            self.num,
            self.txt,
            self.ts_ms,
            self.quality,
            self.frame_id,
        ]


@dataclass(slots=True)
class FrameRow:
    id: int
    gateway: str
    kind: str
    epoch: int
    seq: int
    sent_at_ms: int
    received_ms: int
    samples: int
    low_water: int | None = None


@dataclass(slots=True)
class IngestWrite:
    """Everything one ingest batch stores, in one transaction."""

    frames: list[FrameRow] = field(default_factory=list)
    history: HistoryColumns = field(default_factory=HistoryColumns)
    points: list[PointInfo] = field(default_factory=list)
    gateways: list[GatewayLink] = field(default_factory=list)
    new_entities: dict[str, tuple[int, str]] = field(default_factory=dict)
    audit: list[AuditRecord] = field(default_factory=list)
    cmd_results: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass(slots=True)
class SyncWrite:
    """What one drift/reconciliation cycle stores."""

    alarms: list[dict[str, Any]] = field(default_factory=list)
    drift_started: list[dict[str, Any]] = field(default_factory=list)
    drift_cleared: list[tuple[int, int]] = field(default_factory=list)
    health: dict[str, str] = field(default_factory=dict)
    investigations: list[dict[str, Any]] = field(default_factory=list)
    proposals: list[dict[str, Any]] = field(default_factory=list)
    actions: list[tuple[int, str, str, str, str]] = field(default_factory=list)
    audit: list[AuditRecord] = field(default_factory=list)
    checked_ms: int = 0
    flush: Flush | None = None
    commands: list[dict[str, Any]] = field(default_factory=list)
    """Command rows (``CommandRecord.row()``); the latest of each id wins."""
    command_events: list[tuple[Any, ...]] = field(default_factory=list)
    """(cmd_id, at_ms, change, before, after, actor, request, detail JSON)."""
    nonces: list[tuple[str, str, str, int, int]] = field(default_factory=list)
    """(operator, req_id, op, expires_ms, received_ms) of accepted mutating requests."""
    owners: set[str] = field(default_factory=set)
    """Gateways whose entities' alarms, drift events and health this write changes: a
    worker commits it only while it still holds their partitions (store_pg's fence)."""


@dataclass(slots=True)
class Flush:
    """Tracker snapshot, current state and gateway links, up to frame ``upto_frame``."""

    upto_frame: int
    tracker: bytes
    current_new: dict[Key, CurrentValue] = field(default_factory=dict)
    current_changed: dict[Key, CurrentValue] = field(default_factory=dict)
    gateways: list[GatewayLink] = field(default_factory=list)


def _value_text(value: Any) -> str:
    return json.dumps(value)


@dataclass(frozen=True, slots=True)
class StoreRecovery:
    """The store was opened from its last checkpoint because its WAL was damaged."""

    wal: Path
    moved_to: Path
    wal_bytes: int
    error: str
    checkpoint_ms: int | None
    """When the last checkpoint was written (the WAL's stretch starts there), if known."""

    def describe(self) -> str:
        return (
            f"the write-ahead log {self.wal} was damaged ({self.error}); the store was opened "
            f"from its last checkpoint and the damaged log ({self.wal_bytes} bytes) kept as "
            f"{self.moved_to}: frames stored after that checkpoint are missing from history"
        )


def _is_wal_damage(exc: BaseException) -> bool:
    text = str(exc)
    return "replaying WAL" in text or "Corrupt WAL" in text


CURRENT_STATE_SQL = """
WITH upto AS (SELECT coalesce(max(upto_frame), 0) AS frame FROM checkpoint),
merged AS (
    SELECT entity, attribute, kind, num, txt, ts_ms, quality, gateway, received_ms,
           last_change_ms
    FROM current
    UNION ALL
    SELECT h.entity, h.attribute, h.kind, h.num, h.txt, h.ts_ms, h.quality, f.gateway,
           f.received_ms, h.ts_ms
    FROM history h JOIN frames f ON f.id = h.frame_id
    WHERE h.frame_id > (SELECT frame FROM upto)
)
SELECT {columns} FROM merged
QUALIFY row_number() OVER (
    PARTITION BY entity, attribute
    ORDER BY ts_ms DESC, (quality = 3) DESC, quality ASC, kind DESC, coalesce(num, 0) DESC,
             coalesce(txt, '') DESC
) = 1
ORDER BY entity, attribute
"""
"""Current state = the ``current`` table plus the frames journaled after its last flush,
decided by the same last-writer-wins order as live ingest."""


class TwinStore(StoreReads):
    """A DuckDB connection with the twin's schema; one instance per process.

    The storage port's default adapter (hub/storage.py)."""

    CURRENT_STATE_SQL = CURRENT_STATE_SQL
    AS_OF_SQL = """SELECT entity, attribute, kind, num, txt, ts_ms, quality FROM history
    WHERE ts_ms <= ?
    QUALIFY row_number() OVER (PARTITION BY entity, attribute
        ORDER BY ts_ms DESC, (quality = 3) DESC, quality ASC, kind DESC,
                 coalesce(num, 0) DESC, coalesce(txt, '') DESC) = 1
    ORDER BY entity, attribute"""
    LATENCY_SQL = """SELECT gateway, list(received_ms - sent_at_ms) FROM (
        SELECT gateway, received_ms, sent_at_ms, row_number() OVER
            (PARTITION BY gateway ORDER BY id DESC) AS n FROM frames)
    WHERE n <= ? GROUP BY gateway"""
    COMMAND_EVENTS_SQL = (
        "SELECT cmd_id, at_ms, change, before, after, actor, request, detail "
        "FROM command_events WHERE list_contains(?, cmd_id) ORDER BY at_ms, rowid"
    )
    NUMERIC_BEFORE_SQL = """SELECT entity, attribute, arg_max(ts_ms, ts_ms),
        arg_max({value}, ts_ms)
    FROM history
    WHERE entity IN ({entities}) AND attribute IN ({attributes})
      AND ts_ms <= ? AND quality <= 1
    GROUP BY entity, attribute"""
    BUCKETS_SQL = """SELECT (ts_ms - ?) // ? AS b, count(*), min(num), max(num), avg(num),
           arg_max(num, ts_ms), max(ts_ms), max(quality)
    FROM history
    WHERE entity = ? AND attribute = ? AND ts_ms BETWEEN ? AND ? AND num IS NOT NULL
    GROUP BY b ORDER BY b"""
    INT_AS_DOUBLE = "TRY_CAST(txt AS DOUBLE)"

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> None:
        self.con = con
        self.path = path
        self.read_only = read_only
        self.recovery: StoreRecovery | None = None

    @property
    def location(self) -> str:
        return str(self.path)

    def evidence_anchor(self) -> str:
        return f"duckdb:{self.path.resolve()}"

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        read_only: bool = False,
        memory_limit: str = "512MB",
        threads: int = 2,
    ) -> TwinStore:
        if read_only and not path.exists():
            raise StoreError(f"{path} does not exist; has this hub ever run?")
        config: dict[str, str | bool | int | float | list[str]] = {
            "memory_limit": memory_limit,
            "threads": threads,
        }
        recovery: StoreRecovery | None = None
        try:
            if not read_only:
                path.parent.mkdir(parents=True, exist_ok=True)
            try:
                con = duckdb.connect(str(path), read_only=read_only, config=config)
            except duckdb.Error as exc:
                if read_only or not _is_wal_damage(exc):
                    raise
                recovery = _set_wal_aside(path, exc)
                con = duckdb.connect(str(path), read_only=False, config=config)
        except duckdb.Error as exc:
            raise _error(exc, path, "cannot open") from None
        except OSError as exc:
            raise StoreError(f"cannot open {path}: {exc}") from None
        store = cls(con, path, read_only)
        store.recovery = recovery
        try:
            if read_only:
                store._check_version()
            else:
                store._create()
        except BaseException:
            con.close()
            raise
        return store

    def recovery_events(self, now_ms: int) -> list[AuditEvent]:
        """The audit record of a recovery at open (none when the open was clean)."""
        recovery = self.recovery
        if recovery is None:
            return []
        return [
            AuditEvent(
                now_ms,
                "hub",
                "store_wal_damaged",
                str(self.path),
                {
                    "moved_to": str(recovery.moved_to),
                    "wal_bytes": recovery.wal_bytes,
                    "checkpoint_ms": recovery.checkpoint_ms,
                    "error": recovery.error,
                    "description": recovery.describe(),
                },
            )
        ]

    def close(self) -> None:
        try:
            if not self.read_only:
                self.con.execute("CHECKPOINT")
        except duckdb.Error:
            pass
        self.con.close()

    def _create(self) -> None:
        try:
            self.con.execute("BEGIN")
            for statement in _DDL:
                self.con.execute(statement)
            version = self.meta("schema_version")
            if version is None:
                self.set_meta("schema_version", str(SCHEMA_VERSION))
                self.set_meta("created_ms", str(int(time.time() * 1000)))
            elif version in ("1", "2", "3"):
                # 1 -> 2: the seq of the birth that opened each gateway's connection.
                self.con.execute(
                    "ALTER TABLE gateways ADD COLUMN IF NOT EXISTS session BIGINT DEFAULT 0"
                )
                # 2 -> 3: commands, their events and operator request nonces (new tables,
                # created above), and the reason an alarm was shelved.
                self.con.execute(
                    "ALTER TABLE alarms ADD COLUMN IF NOT EXISTS shelve_reason VARCHAR"
                )
                # 3 -> 4: the learned models (a new table, created above).
                self.set_meta("schema_version", str(SCHEMA_VERSION))
            elif version != str(SCHEMA_VERSION):
                raise StoreSchemaError(
                    f"{self.path} has schema version {version}; this hub reads version "
                    f"{SCHEMA_VERSION}"
                )
            if self.con.execute("SELECT count(*) FROM checkpoint").fetchone() == (0,):
                self.con.execute(
                    "INSERT INTO checkpoint VALUES (?, 0, 0)", [DeliveryTracker().dumps()]
                )
            self.con.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(duckdb.Error):
                self.con.execute("ROLLBACK")
            if isinstance(exc, duckdb.Error):
                raise _error(exc, self.path, "cannot create the schema in") from None
            raise

    def _check_version(self) -> None:
        version = self.meta("schema_version")
        if version != str(SCHEMA_VERSION):
            raise StoreSchemaError(
                f"{self.path} has schema version {version}; this build reads {SCHEMA_VERSION}"
            )

    # -- learned models (hub/predict.py) ------------------------------------------------

    def save_models(self, rows: Sequence[tuple[str, int, Mapping[str, Any]]]) -> None:
        """Replace the stored model of each target (one statement)."""
        if not rows:
            return
        try:
            self.con.execute(
                """INSERT OR REPLACE INTO models
                   SELECT unnest(?), unnest(?), unnest(?)""",
                [
                    [r[0] for r in rows],
                    [r[1] for r in rows],
                    [json.dumps(r[2], sort_keys=True) for r in rows],
                ],
            )
        except duckdb.Error as exc:
            raise _error(exc, self.path, "cannot store models in") from None

    # -- small helpers ---------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        try:
            return self.con.execute(sql, params or []).fetchall()
        except duckdb.Error as exc:
            raise _error(exc, self.path, "query failed on") from None

    def meta(self, key: str) -> str | None:
        try:
            row = self.con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        except duckdb.CatalogException:
            return None
        except duckdb.Error as exc:
            raise _error(exc, self.path, "cannot read") from None
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self.con
        try:
            con.execute("BEGIN")
        except duckdb.Error as exc:
            raise _error(exc, self.path, "cannot begin a transaction on") from None
        try:
            yield con
            con.execute("COMMIT")
        except BaseException as exc:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
            if isinstance(exc, duckdb.Error):
                raise _error(exc, self.path, "cannot write to") from None
            raise

    # -- hub identity ----------------------------------------------------------------

    def hub_sequence(self, block: int) -> tuple[int, int, int]:
        """(epoch, first seq to use, ceiling) for the hub's own frames.

        Seqs are reserved in blocks: the ceiling is stored before any seq below it is
        used, so a crash can skip seqs but never reuse one.
        """
        with self.transaction():
            stored = self.meta("hub_epoch")
            epoch, start, ceiling = sequence_block(
                stored, self.meta("hub_seq_ceiling"), block, int(time.time() * 1000)
            )
            if stored is None:
                self.set_meta("hub_epoch", str(epoch))
            self.set_meta("hub_seq_ceiling", str(ceiling))
        return epoch, start, ceiling

    def reserve_hub_seqs(self, ceiling: int) -> None:
        with self.transaction():
            self.set_meta("hub_seq_ceiling", str(ceiling))

    # -- declared schema -------------------------------------------------------------

    def sync_declared(
        self,
        entities: Sequence[tuple[str, str, str, str | None, str, str]],
        relationships: Sequence[tuple[str, str, str, str | None]],
        twin_meta: dict[str, str],
        audit: list[AuditRecord],
    ) -> None:
        """Write the configured entities and relationships (the schema may have changed)."""
        now = int(time.time() * 1000)
        with self.transaction() as con:
            declared_ids = [row[0] for row in entities]
            con.execute(
                "UPDATE entities SET declared = false WHERE NOT list_contains(?, physical_id)",
                [declared_ids],
            )
            if entities:
                columns = [list(col) for col in zip(*entities, strict=True)]
                con.execute(
                    """INSERT INTO entities SELECT unnest(?), unnest(?), unnest(?), true,
                           unnest(?), unnest(?), unnest(?), NULL, 'unknown', ?
                       ON CONFLICT (physical_id) DO UPDATE SET twin_id = excluded.twin_id,
                       type = excluded.type, declared = true, gateway = excluded.gateway,
                       name = excluded.name, static_attributes = excluded.static_attributes""",
                    [*columns, now],
                )
            con.execute("DELETE FROM relationships")
            if relationships:
                con.execute(
                    "INSERT INTO relationships SELECT unnest(?), unnest(?), unnest(?), unnest(?)",
                    [list(col) for col in zip(*relationships, strict=True)],
                )
            for key, value in twin_meta.items():
                self.set_meta(key, value)
            self._insert_audit(con, audit)

    # -- ingest ----------------------------------------------------------------------

    def write_ingest(self, batch: IngestWrite) -> None:
        with self.transaction() as con:
            if batch.frames:
                rows = [
                    (
                        f.id,
                        f.gateway,
                        f.kind,
                        f.epoch,
                        f.seq,
                        f.sent_at_ms,
                        f.received_ms,
                        f.samples,
                        f.low_water,
                    )
                    for f in batch.frames
                ]
                if len(rows) == 1:
                    con.execute("INSERT INTO frames VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows[0])
                else:
                    con.execute(
                        "INSERT INTO frames SELECT " + ", ".join(["unnest(?)"] * 9),
                        [list(col) for col in zip(*rows, strict=True)],
                    )
            if len(batch.history):
                con.execute(
                    "INSERT INTO history SELECT unnest(?), unnest(?), unnest(?), unnest(?), "
                    "unnest(?), unnest(?), unnest(?), unnest(?)",
                    batch.history.columns(),
                )
            if batch.points:
                keys = [[p.entity for p in batch.points], [p.attribute for p in batch.points]]
                con.execute(
                    "DELETE FROM points WHERE (entity, attribute) IN (SELECT unnest(?), unnest(?))",
                    keys,
                )
                point_rows = [
                    (
                        p.entity,
                        p.attribute,
                        p.gateway,
                        p.dtype,
                        p.unit,
                        p.writable,
                        p.min,
                        p.max,
                        p.interval_ms,
                        p.source,
                        p.updated_ms,
                    )
                    for p in batch.points
                ]
                con.execute(
                    "INSERT INTO points SELECT " + ", ".join(["unnest(?)"] * 11),
                    [list(col) for col in zip(*point_rows, strict=True)],
                )
            self._write_gateways(con, batch.gateways)
            for entity, (first_seen, gateway) in batch.new_entities.items():
                con.execute(
                    """INSERT INTO entities VALUES (?, ?, 'undeclared', false, ?, '', '{}', ?,
                       'unknown', ?) ON CONFLICT (physical_id) DO UPDATE SET
                       first_seen_ms = coalesce(entities.first_seen_ms, excluded.first_seen_ms)""",
                    [entity, entity, gateway, first_seen, first_seen],
                )
            for row in batch.cmd_results:
                con.execute("INSERT INTO cmd_results VALUES (?, ?, ?, ?, ?, ?, ?)", list(row))
            self._insert_audit(con, batch.audit)

    def _write_gateways(self, con: duckdb.DuckDBPyConnection, links: Sequence[GatewayLink]) -> None:
        if not links:
            return
        rows = [
            (
                link.gateway,
                link.epoch,
                link.birth_seq,
                link.online,
                link.last_frame_ms,
                link.last_birth_ms,
                link.death_ms,
                link.death_reason,
                link.frames,
                link.points,
                json.dumps(link.info, sort_keys=True),
                link.upto_frame,
                link.death_birth_seq,
                link.session,
            )
            for link in links
        ]
        # DELETE + INSERT: an upsert on a keyed DuckDB table costs several milliseconds
        con.execute("DELETE FROM gateways WHERE list_contains(?, gateway)", [[r[0] for r in rows]])
        con.execute(
            "INSERT INTO gateways SELECT " + ", ".join(["unnest(?)"] * 14),
            [list(col) for col in zip(*rows, strict=True)],
        )

    def _write_flush(self, con: duckdb.DuckDBPyConnection, flush: Flush) -> None:
        if flush.current_changed:
            con.execute(
                """UPDATE current SET kind = u.kind, num = u.num, txt = u.txt,
                   ts_ms = u.ts_ms, quality = u.quality, gateway = u.gateway,
                   received_ms = u.received_ms, last_change_ms = u.last_change_ms
                   FROM (SELECT unnest(?) AS entity, unnest(?) AS attribute,
                         unnest(?) AS kind, unnest(?) AS num, unnest(?) AS txt,
                         unnest(?) AS ts_ms, unnest(?) AS quality, unnest(?) AS gateway,
                         unnest(?) AS received_ms, unnest(?) AS last_change_ms) AS u
                   WHERE current.entity = u.entity AND current.attribute = u.attribute""",
                _current_columns(flush.current_changed),
            )
        if flush.current_new:
            con.execute(
                "INSERT INTO current SELECT " + ", ".join(["unnest(?)"] * 10),
                _current_columns(flush.current_new),
            )
        self._write_gateways(con, flush.gateways)
        con.execute(
            "UPDATE checkpoint SET tracker = ?, upto_frame = ?",
            [flush.tracker, flush.upto_frame],
        )

    def _insert_audit(self, con: duckdb.DuckDBPyConnection, records: Sequence[AuditRecord]) -> None:
        if not records:
            return
        con.execute(
            "INSERT INTO audit SELECT " + ", ".join(["unnest(?)"] * 8),
            [
                [r.seq for r in records],
                [r.ts_ms for r in records],
                [r.actor for r in records],
                [r.action for r in records],
                [r.subject for r in records],
                [r.detail for r in records],
                [r.prev_hash for r in records],
                [r.hash for r in records],
            ],
        )

    def write_audit(self, records: Sequence[AuditRecord]) -> None:
        with self.transaction() as con:
            self._insert_audit(con, records)

    # -- drift / reconciliation ------------------------------------------------------

    def write_sync(self, batch: SyncWrite) -> None:
        with self.transaction() as con:
            if batch.flush is not None:
                self._write_flush(con, batch.flush)
            if batch.alarms:
                # one row per alarm id: the latest transition of each wins
                latest = {alarm["id"]: alarm for alarm in batch.alarms}
                con.execute(
                    "INSERT OR REPLACE INTO alarms SELECT "
                    + ", ".join(["unnest(?)"] * len(ALARM_COLUMNS)),
                    [[alarm[name] for alarm in latest.values()] for name in ALARM_COLUMNS],
                )
            if batch.drift_started:
                names = (
                    "id",
                    "rule",
                    "drift_type",
                    "entity",
                    "attribute",
                    "severity",
                    "strategy",
                    "description",
                    "detected_ms",
                )
                con.execute(
                    "INSERT INTO drift_events SELECT "
                    + ", ".join(["unnest(?)"] * len(names))
                    + ", NULL",
                    [[event[name] for event in batch.drift_started] for name in names],
                )
            if batch.drift_cleared:
                con.execute(
                    """UPDATE drift_events SET cleared_ms = u.cleared FROM
                       (SELECT unnest(?) AS id, unnest(?) AS cleared) AS u
                       WHERE drift_events.id = u.id""",
                    [[c[0] for c in batch.drift_cleared], [c[1] for c in batch.drift_cleared]],
                )
            if batch.health:
                con.execute(
                    """UPDATE entities SET health = u.health, health_ms = ? FROM
                       (SELECT unnest(?) AS id, unnest(?) AS health) AS u
                       WHERE entities.physical_id = u.id""",
                    [batch.checked_ms, list(batch.health), list(batch.health.values())],
                )
            for item in batch.investigations:
                con.execute(
                    "INSERT INTO investigations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        item["id"],
                        item["opened_ms"],
                        item["alarm_id"],
                        item["rule"],
                        item["entity"],
                        item["attribute"],
                        item["description"],
                        item["status"],
                        json.dumps(item["snapshot"], default=str, sort_keys=True),
                    ],
                )
            for item in batch.proposals:
                con.execute(
                    "INSERT INTO proposals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        item["id"],
                        item["created_ms"],
                        item["alarm_id"],
                        item["entity"],
                        item["attribute"],
                        item["gateway"],
                        _value_text(item["current_value"]),
                        _value_text(item["desired_value"]),
                        item["status"],
                        item["reason"],
                    ],
                )
            for action in batch.actions:
                con.execute("INSERT INTO actions VALUES (?, ?, ?, ?, ?)", list(action))
            if batch.commands:
                latest = {row["id"]: row for row in batch.commands}
                con.execute("DELETE FROM commands WHERE list_contains(?, id)", [list(latest)])
                con.execute(
                    "INSERT INTO commands SELECT " + ", ".join(["unnest(?)"] * 10),
                    [
                        [r["id"] for r in latest.values()],
                        [r["entity"] for r in latest.values()],
                        [r["attribute"] for r in latest.values()],
                        [r["gateway"] for r in latest.values()],
                        [r["state"] for r in latest.values()],
                        [r["proposed_by"] for r in latest.values()],
                        [r["proposed_ms"] for r in latest.values()],
                        [r["updated_ms"] for r in latest.values()],
                        [r["closed_ms"] for r in latest.values()],
                        [json.dumps(r, default=str, sort_keys=True) for r in latest.values()],
                    ],
                )
            if batch.command_events:
                con.execute(
                    "INSERT INTO command_events SELECT " + ", ".join(["unnest(?)"] * 8),
                    [list(col) for col in zip(*batch.command_events, strict=True)],
                )
            if batch.nonces:
                con.execute(
                    "INSERT INTO operator_requests SELECT " + ", ".join(["unnest(?)"] * 5),
                    [list(col) for col in zip(*batch.nonces, strict=True)],
                )
            if batch.checked_ms:
                con.execute("UPDATE checkpoint SET last_check_ms = ?", [batch.checked_ms])
            self._insert_audit(con, batch.audit)


def _set_wal_aside(path: Path, exc: BaseException) -> StoreRecovery:
    """Move a WAL that DuckDB cannot replay out of the way, keeping it for inspection."""
    wal = path.with_name(path.name + ".wal")
    if not wal.exists():
        raise exc
    moved = wal.with_name(f"{wal.name}.damaged-{int(time.time() * 1000)}")
    size = wal.stat().st_size
    checkpoint_ms: int | None = None
    with contextlib.suppress(OSError):
        checkpoint_ms = int(path.stat().st_mtime * 1000)
    os.replace(wal, moved)
    error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    recovery = StoreRecovery(wal, moved, size, error, checkpoint_ms)
    log.error(
        "twin store opened from its last checkpoint: the WAL was damaged",
        extra=fields(
            alarm="store_wal_damaged",
            path=path,
            moved_to=moved,
            wal_bytes=size,
            checkpoint_ms=checkpoint_ms,
            error=error,
        ),
    )
    return recovery


def _current_columns(rows: dict[Key, CurrentValue]) -> list[list[Any]]:
    values = [c.value for c in rows.values()]
    kinds, nums, txts = encode_columns(values)
    return [
        [k[0] for k in rows],
        [k[1] for k in rows],
        kinds,
        nums,
        txts,
        [c.ts_ms for c in rows.values()],
        [c.quality for c in rows.values()],
        [c.gateway for c in rows.values()],
        [c.received_ms for c in rows.values()],
        [c.last_change_ms for c in rows.values()],
    ]
