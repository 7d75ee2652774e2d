"""Ground truth in a DuckDB file: true values, served values, fault windows, writes.

Rows are buffered in memory as columns and written in one ``INSERT ... SELECT
unnest(?), ...`` per table per flush (DuckDB does ~90k rows/s that way against ~1.3k/s
with one INSERT per row). All DuckDB calls run on one dedicated thread so the event
loop never blocks on disk. The schema is documented in docs/simulator.md.

A DuckDB file has one writing process: while the simulator runs, other processes ask
it through the control interface (``fieldtwin sim truth``); after it stops, they open
the file.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fieldtwin.protocol.logfmt import fields
from fieldtwin.sim.errors import GroundTruthError
from fieldtwin.sim.faults import Fault
from fieldtwin.sim.scenario import Scenario

log = logging.getLogger("fieldtwin.sim.truth")

SCHEMA = """
CREATE TABLE run (
    scenario VARCHAR, scenario_path VARCHAR, scenario_sha256 VARCHAR, seed BIGINT,
    speed DOUBLE, tick_s DOUBLE, started_wall_ms BIGINT, stopped_wall_ms BIGINT,
    last_tick BIGINT
);
CREATE TABLE points (
    point VARCHAR PRIMARY KEY, device VARCHAR, protocol VARCHAR, source VARCHAR,
    unit VARCHAR, unit_id INTEGER, table_name VARCHAR, address INTEGER, type VARCHAR,
    byte_order VARCHAR, word_order VARCHAR, scale DOUBLE, "offset" DOUBLE,
    node_id VARCHAR, browse_name VARCHAR, decimals INTEGER, noise DOUBLE,
    writable BOOLEAN, min DOUBLE, max DOUBLE
);
CREATE TABLE truth (tick BIGINT, sim_s DOUBLE, wall_ms BIGINT, point VARCHAR, value DOUBLE);
CREATE TABLE served (
    wall_ms BIGINT, tick BIGINT, sim_s DOUBLE, device VARCHAR, protocol VARCHAR,
    point VARCHAR, value DOUBLE, status VARCHAR, via VARCHAR
);
CREATE TABLE faults (
    id INTEGER PRIMARY KEY, source VARCHAR, kind VARCHAR, device VARCHAR, unit_id INTEGER,
    point VARCHAR, params VARCHAR, start_tick BIGINT, start_sim_s DOUBLE,
    start_wall_ms BIGINT, end_tick BIGINT, end_sim_s DOUBLE, end_wall_ms BIGINT,
    component VARCHAR
);
CREATE TABLE writes (
    wall_ms BIGINT, tick BIGINT, sim_s DOUBLE, device VARCHAR, protocol VARCHAR,
    point VARCHAR, variable VARCHAR, value DOUBLE, status VARCHAR, detail VARCHAR,
    result DOUBLE, before DOUBLE, fault_id INTEGER, seq BIGINT
);
"""

# What a write record answers (``GET /truth/writes``, ``fieldtwin sim truth --writes``).
WRITE_FIELDS = (
    "seq", "wall_ms", "tick", "sim_s", "device", "protocol", "point", "variable", "value",
    "result", "before", "status", "fault_id", "detail",
)  # fmt: skip

_TRUTH_COLS = ("tick", "sim_s", "wall_ms", "point", "value")
_SERVED_COLS = ("wall_ms", "tick", "sim_s", "device", "protocol", "point", "value", "status", "via")
_WRITE_COLS = (
    "wall_ms", "tick", "sim_s", "device", "protocol", "point", "variable", "value",
    "status", "detail", "result", "before", "fault_id", "seq",
)  # fmt: skip


def _insert_sql(table: str, cols: Iterable[str]) -> str:
    names = list(cols)
    quoted = ", ".join(f'"{c}"' for c in names)
    return f"INSERT INTO {table} ({quoted}) SELECT " + ", ".join("unnest(?)" for _ in names)


class _Columns:
    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.data: list[list[Any]] = [[] for _ in names]

    def __len__(self) -> int:
        return len(self.data[0])

    def take(self) -> list[list[Any]]:
        data = self.data
        self.data = [[] for _ in self.names]
        return data


class GroundTruth:
    """Buffers rows from the event loop and writes them in batches on a worker thread."""

    def __init__(self, path: Path, *, max_buffer: int = 50_000) -> None:
        self.path = path
        self.max_buffer = max_buffer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ft-sim-truth")
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self.truth = _Columns(_TRUTH_COLS)
        self.served = _Columns(_SERVED_COLS)
        self.writes = _Columns(_WRITE_COLS)
        self._fault_rows: list[tuple[str, tuple[Any, ...]]] = []
        self.rows_written = 0
        self.flushes = 0
        self.dropped_served = 0
        self.closed = False

    async def _call(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def open(self, scenario: Scenario) -> None:
        """Create the file and its tables (fails fast, before any device starts)."""
        if self.path.exists():
            raise GroundTruthError(
                f"{self.path} already exists; pass another --truth path or delete the old run"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GroundTruthError(f"cannot create {self.path.parent}: {exc}") from None
        await self._call(self._open_sync, scenario)

    async def record_start(
        self, scenario: Scenario, seed: int, speed: float, started_wall_ms: int
    ) -> None:
        """Write the run's metadata once the clock starts."""
        async with self._lock:
            await self._call(
                self._execute,
                "INSERT INTO run VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                [
                    scenario.name,
                    str(scenario.path),
                    scenario.sha256,
                    seed,
                    speed,
                    scenario.tick,
                    started_wall_ms,
                ],
            )

    def _execute(self, sql: str, params: list[Any]) -> None:
        self._conn.execute(sql, params)

    def _open_sync(self, scenario: Scenario) -> None:
        import duckdb

        try:
            conn = duckdb.connect(str(self.path))
        except duckdb.Error as exc:
            raise GroundTruthError(f"cannot create {self.path}: {exc}") from None
        conn.execute("SET memory_limit = '256MB'")
        conn.execute("SET threads = 1")
        conn.execute(SCHEMA)
        rows = []
        for p in scenario.points.values():
            codec = p.codec
            protocol = scenario.device(p.device).protocol
            rows.append(
                (
                    p.name, p.device, protocol, p.source, p.unit, p.unit_id, p.table, p.address,
                    p.dtype if protocol != "serial-line" else "decimal",
                    codec.byte_order if codec else None, codec.word_order if codec else None,
                    codec.scale if codec else None, codec.offset if codec else None,
                    p.node_id, p.browse_name, p.decimals if protocol == "serial-line" else None,
                    p.noise, p.writable, p.low, p.high,
                )
            )  # fmt: skip
        if rows:
            conn.executemany("INSERT INTO points VALUES (" + ", ".join("?" * 20) + ")", rows)
        self._conn = conn

    # -- buffering (called from the event loop, never blocks) ---------------------------

    def add_truth(
        self, tick: int, sim_s: float, wall_ms: int, rows: Iterable[tuple[str, float]]
    ) -> None:
        ticks, sims, walls, points, values = self.truth.data
        for point, value in rows:
            ticks.append(tick)
            sims.append(sim_s)
            walls.append(wall_ms)
            points.append(point)
            values.append(value)

    def add_served(
        self,
        wall_ms: int,
        tick: int,
        sim_s: float,
        device: str,
        protocol: str,
        point: str,
        value: float | None,
        status: str,
        via: str,
    ) -> None:
        if len(self.served) >= self.max_buffer:
            self.dropped_served += 1
            return
        for column, item in zip(
            self.served.data,
            (wall_ms, tick, sim_s, device, protocol, point, value, status, via),
            strict=True,
        ):
            column.append(item)

    def add_write(
        self,
        wall_ms: int,
        tick: int,
        sim_s: float,
        device: str,
        protocol: str,
        point: str,
        variable: str,
        value: float,
        status: str,
        detail: str = "",
        *,
        result: float | None = None,
        before: float | None = None,
        fault_id: int | None = None,
        seq: int = 0,
    ) -> None:
        """One client write: ``value`` as written, ``result`` what the variable became
        (``None`` for a rejected write), ``before`` what it was just before, ``seq`` its
        arrival order."""
        row = (
            wall_ms, tick, sim_s, device, protocol, point, variable, value, status, detail,
            result, before, fault_id, seq,
        )  # fmt: skip
        for column, item in zip(self.writes.data, row, strict=True):
            column.append(item)

    def fault_started(self, fault: Fault, dt: float) -> None:
        req = fault.request
        row = (
            fault.id, fault.source, fault.kind, req.device, req.unit_id, req.point,
            json.dumps(dict(req.params), sort_keys=True), fault.start_tick,
            fault.start_tick * dt, fault.start_wall_ms, req.component,
        )  # fmt: skip
        self._fault_rows.append(("start", row))

    def fault_ended(self, fault: Fault, dt: float) -> None:
        end = fault.end_tick if fault.end_tick is not None else fault.start_tick
        row = (end, end * dt, fault.end_wall_ms, fault.id)
        self._fault_rows.append(("end", row))

    @property
    def buffered(self) -> int:
        return len(self.truth) + len(self.served) + len(self.writes)

    # -- writing ------------------------------------------------------------------------

    async def flush(self) -> int:
        """Write everything buffered so far; returns the number of rows written."""
        if self._conn is None:
            return 0
        batches = [
            ("truth", _TRUTH_COLS, self.truth.take() if len(self.truth) else None),
            ("served", _SERVED_COLS, self.served.take() if len(self.served) else None),
            ("writes", _WRITE_COLS, self.writes.take() if len(self.writes) else None),
        ]
        fault_rows, self._fault_rows = self._fault_rows, []
        if not fault_rows and all(data is None for _, _, data in batches):
            return 0
        async with self._lock:
            written: int = await self._call(self._write_sync, batches, fault_rows)
        self.rows_written += written
        self.flushes += 1
        return written

    def _write_sync(
        self,
        batches: list[tuple[str, tuple[str, ...], list[list[Any]] | None]],
        fault_rows: list[tuple[str, tuple[Any, ...]]],
    ) -> int:
        conn = self._conn
        written = 0
        conn.execute("BEGIN")
        try:
            for table, cols, data in batches:
                if data is None:
                    continue
                conn.execute(_insert_sql(table, cols), data)
                written += len(data[0])
            for what, row in fault_rows:
                if what == "start":
                    conn.execute(
                        "INSERT INTO faults (id, source, kind, device, unit_id, point, params, "
                        "start_tick, start_sim_s, start_wall_ms, component) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        list(row),
                    )
                else:
                    conn.execute(
                        "UPDATE faults SET end_tick = ?, end_sim_s = ?, end_wall_ms = ? "
                        "WHERE id = ?",
                        list(row),
                    )
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
        return written

    async def query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a read query on the writer's connection (after a flush)."""
        await self.flush()
        async with self._lock:
            result: list[tuple[Any, ...]] = await self._call(self._query_sync, sql, params or [])
        return result

    async def writes_of(
        self, points: list[str] | None, since_tick: int, limit: int
    ) -> list[dict[str, Any]]:
        """Recorded client writes (every status) in arrival order, optionally per point."""
        cols = ", ".join(f'"{c}"' for c in WRITE_FIELDS)
        where = "tick >= ?"
        params: list[Any] = [since_tick]
        if points:
            where += f" AND point IN ({', '.join('?' for _ in points)})"
            params += points
        rows = await self.query(
            f"SELECT {cols} FROM writes WHERE {where} ORDER BY seq, rowid LIMIT ?",
            [*params, limit],
        )
        return [dict(zip(WRITE_FIELDS, row, strict=True)) for row in rows]

    def _query_sync(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self._conn.execute(sql, params).fetchall()
        return rows

    async def close(self, stopped_wall_ms: int, last_tick: int) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self._conn is not None:
                await self.flush()
                async with self._lock:
                    await self._call(self._close_sync, stopped_wall_ms, last_tick)
                log.info(
                    "ground truth closed",
                    extra=fields(path=self.path, rows=self.rows_written, flushes=self.flushes),
                )
        finally:
            self._executor.shutdown(wait=True)

    def _close_sync(self, stopped_wall_ms: int, last_tick: int) -> None:
        self._conn.execute(
            "UPDATE run SET stopped_wall_ms = ?, last_tick = ?", [stopped_wall_ms, last_tick]
        )
        self._conn.execute("CHECKPOINT")
        self._conn.close()
        self._conn = None
