"""The durable outbox: every frame that must reach the hub, in one DuckDB file.

Design (see docs/agent.md, "Outbox"):

* One ``data`` frame = one outbox row = one seq. A batch of samples is encoded and
  signed with the next seq and inserted *before* it is published; several batches
  that are ready together go in one ``INSERT ... SELECT unnest(?)`` statement, in the
  same transaction as the persisted seq counter. The row keeps the exact frame bytes,
  so a retransmission after a restart is byte-identical (same seq, same signature).
* ``cmd_result`` frames are stored the same way (a command outcome must not be lost);
  births are not stored (a newer birth always supersedes an older one), but their seq
  is persisted before use so it is never reused.
* A row leaves only when a verified hub ``ack`` covers its seq.
* Size cap (samples and bytes) with an overflow policy: ``drop_oldest`` deletes the
  oldest data frames to make room, ``drop_newest`` refuses the new batch. Both count
  what they dropped; the birth's ``low_water`` tells the hub what will never come.
* A file that is not a usable database is moved aside (``*.corrupt-<ms>``), an
  alarm-level log line is written, and a new file with a new epoch is started: the
  agent never crash-loops on its buffer. A file locked by another process is *not*
  quarantined: that is a second agent on the same state, and startup fails clearly.

``Outbox`` is synchronous and owned by one thread; ``AsyncOutbox`` runs every call on
one dedicated worker thread so the event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import msgpack

from fieldtwin.agent.errors import OutboxCorrupt, OutboxError
from fieldtwin.agent.util import Throttle, now_ms
from fieldtwin.protocol.frames import FrameSigner
from fieldtwin.protocol.logfmt import fields
from fieldtwin.protocol.messages import AnyBody, CommandResult, Data, Sample, Value

log = logging.getLogger("fieldtwin.agent.outbox")

FORMAT_VERSION = 1
OVERFLOW_POLICIES = ("drop_oldest", "drop_newest")


def duckdb_core() -> Any:
    """DuckDB's compiled engine without its Python query-builder layer.

    duckdb 2.x ships the engine as the top-level extension ``_duckdb`` and wraps it in
    a pure-Python package (relations, expressions, Arrow/Polars adapters) that the
    outbox never uses; importing only the engine saves about 5 MB of anonymous memory
    on a gateway (docs/benchmarks.md, "Agent"). Where there is no ``_duckdb`` (older
    versions) the package is imported as before.
    Exceptions are the same classes either way (``duckdb.Error is _duckdb.Error``).
    """
    try:
        import _duckdb
    except ImportError:
        import duckdb

        return duckdb
    return _duckdb


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value BIGINT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS frames (
        seq BIGINT PRIMARY KEY,
        kind VARCHAR NOT NULL,
        samples INTEGER NOT NULL,
        first_ts_ms BIGINT,
        created_ms BIGINT NOT NULL,
        frame BLOB NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS commands (
        cmd_id VARCHAR PRIMARY KEY,
        received_ms BIGINT NOT NULL,
        status VARCHAR NOT NULL,
        detail VARCHAR NOT NULL,
        readback BLOB,
        readback_ts_ms BIGINT)""",
)
COMMAND_RETENTION_MS = 30 * 86_400_000


@dataclass(frozen=True, slots=True)
class Committed:
    """A frame that is durably stored and may now be published."""

    seq: int
    kind: str
    samples: int
    frame: bytes
    batch: Sequence[Sample] = ()
    """The samples of a ``data`` frame (in memory only, for the agent's birth state)."""


@dataclass(slots=True)
class _Row:
    kind: str
    samples: int
    nbytes: int
    first_ts_ms: int | None


@dataclass(frozen=True, slots=True)
class CommandRecord:
    cmd_id: str
    status: str
    detail: str
    readback: Value
    readback_ts_ms: int | None


@dataclass(slots=True)
class OutboxCounters:
    committed_frames: int = 0
    committed_samples: int = 0
    acked_frames: int = 0
    acked_samples: int = 0
    dropped_frames: int = 0
    dropped_samples: int = 0
    overflow_events: int = 0
    commit_failures: int = 0
    quarantined: int = 0
    reopens: int = 0
    reopen_failures: int = 0


@dataclass(frozen=True, slots=True)
class OutboxStats:
    epoch: int
    next_seq: int
    low_water: int
    frames: int
    samples: int
    bytes: int
    oldest_seq: int | None
    oldest_ts_ms: int | None
    max_samples: int
    max_bytes: int
    overflow: str
    counters: dict[str, int] = field(default_factory=dict)


class Outbox:
    """The buffer file. Not thread-safe: one thread owns it (see ``AsyncOutbox``)."""

    def __init__(
        self,
        path: Path,
        signer: FrameSigner,
        *,
        max_samples: int = 5_000_000,
        max_bytes: int = 512 * 1024 * 1024,
        overflow: str = "drop_oldest",
        memory_limit_mb: int = 64,
        checkpoint_mb: int = 1,
        threads: int = 1,
        reopen_every: int = 1_000,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        if overflow not in OVERFLOW_POLICIES:
            raise OutboxError(f"overflow policy must be one of {', '.join(OVERFLOW_POLICIES)}")
        self.path = path
        self.signer = signer
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.overflow = overflow
        self.memory_limit_mb = memory_limit_mb
        self.checkpoint_mb = checkpoint_mb
        self.threads = threads
        if reopen_every < 1:
            raise OutboxError("reopen_every must be at least 1 transaction")
        self.reopen_every = reopen_every
        self.clock = clock
        self.counters = OutboxCounters()
        self.epoch = 0
        self.next_seq = 1
        self.quarantined_to: Path | None = None
        self._db: Any = None
        self._seqs: list[int] = []
        self._rows: dict[int, _Row] = {}
        self._samples = 0
        self._bytes = 0
        self._overflow_log = Throttle(60.0)
        self._reopen_log = Throttle(60.0)
        self._opened = False  # the buffer was opened once: a lost connection is reconnected
        self._since_open = 0

    # -- opening, quarantine ----------------------------------------------------------

    def open(self) -> None:
        """Open (or create) the buffer; a corrupt file is quarantined and replaced."""
        duckdb = duckdb_core()

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(
                f"cannot create the state directory {self.path.parent}: {exc}"
            ) from None
        try:
            self._open_existing()
        except OutboxCorrupt as exc:
            try:
                self._quarantine(str(exc))
            except OSError as move:
                raise OutboxError(
                    f"buffer {self.path} is corrupt and cannot be moved aside: {move}"
                ) from None
            try:
                self._open_existing()
            except duckdb.Error as again:
                raise OutboxError(f"cannot create a new buffer at {self.path}: {again}") from None

    def _connect(self) -> Any:
        duckdb = duckdb_core()

        config: dict[str, Any] = {
            "memory_limit": f"{self.memory_limit_mb}MB",
            "checkpoint_threshold": f"{self.checkpoint_mb}MB",
            "threads": self.threads,
            # DuckDB (1.3+) starts 8 threads for asynchronous I/O on remote files by
            # default; a local buffer never uses them (docs/benchmarks.md, "Edge footprint").
            "async_threads": 0,
        }
        try:
            try:
                return duckdb.connect(str(self.path), config=config)
            except duckdb.InvalidInputException as exc:
                if "async_threads" not in str(exc):
                    raise
                del config["async_threads"]  # a DuckDB without the setting
                return duckdb.connect(str(self.path), config=config)
        except duckdb.Error as exc:
            text = str(exc)
            if "lock" in text.lower():
                raise OutboxError(
                    f"buffer {self.path} is held by another process (is a second agent running "
                    f"with the same state directory?): {text}"
                ) from None
            if isinstance(exc, duckdb.PermissionException) or "Permission denied" in text:
                raise OutboxError(f"cannot open buffer {self.path}: {text}") from None
            raise OutboxCorrupt(text) from None

    def _open_existing(self) -> None:
        duckdb = duckdb_core()

        db = self._connect()
        try:
            db.execute("BEGIN")
            for statement in _SCHEMA:
                db.execute(statement)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                meta = {"format": FORMAT_VERSION, "epoch": self.clock(), "next_seq": 1}
                db.execute(
                    "INSERT INTO meta SELECT unnest(?::VARCHAR[]), unnest(?::BIGINT[])",
                    [list(meta), list(meta.values())],
                )
                log.info(
                    "new buffer",
                    extra=fields(path=self.path, epoch=meta["epoch"]),
                )
            if meta.get("format") != FORMAT_VERSION or "epoch" not in meta:
                raise OutboxCorrupt(f"unexpected buffer format {meta.get('format')!r}")
            rows = db.execute(
                "SELECT seq, kind, samples, octet_length(frame), first_ts_ms "
                "FROM frames ORDER BY seq"
            ).fetchall()
            db.execute(
                "DELETE FROM commands WHERE received_ms < ?",
                [self.clock() - COMMAND_RETENTION_MS],
            )
            db.execute("COMMIT")
        except duckdb.Error as exc:
            db.close()
            raise OutboxCorrupt(str(exc)) from None
        except OutboxCorrupt:
            db.close()
            raise
        self._db = db
        self._opened = True
        self._since_open = 0
        self.epoch = int(meta["epoch"])
        self.next_seq = int(meta["next_seq"])
        self._seqs = []
        self._rows = {}
        self._samples = self._bytes = 0
        for seq, kind, samples, nbytes, first_ts in rows:
            self._index(seq, _Row(kind, samples, nbytes, first_ts))
        if self._seqs and self._seqs[-1] >= self.next_seq:
            # Only possible if the counter row was damaged: never reuse a stored seq.
            self.next_seq = self._seqs[-1] + 1
        for key in ("dropped_frames", "dropped_samples", "overflow_events"):
            setattr(self.counters, key, int(meta.get(key, 0)))

    def _quarantine(self, why: str) -> None:
        stamp = self.clock()
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        moved = []
        for suffix in ("", ".wal"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                os.replace(source, Path(str(target) + suffix))
                moved.append(str(source))
        self.quarantined_to = target
        self.counters.quarantined += 1
        log.error(
            "buffer is corrupt; moved aside, starting a new epoch",
            extra=fields(
                alarm="outbox_quarantined",
                path=self.path,
                moved_to=target,
                reason=why,
                files=len(moved),
            ),
        )

    def close(self) -> None:
        self._opened = False
        if self._db is not None:
            try:
                self._db.close()
            finally:
                self._db = None

    def _reopen(self) -> None:
        """Close the connection and open it again, handing back what DuckDB kept.

        DuckDB's memory on the buffer's thread grows with every transaction while it
        reports 2-3 MB in use; closing the connection returns all of it (docs/agent.md,
        `reopen_every`). The held-frame index stays in memory: the file is the same.
        A failed reconnect leaves the buffer closed; the next call tries again and,
        until one succeeds, fails like any storage error (samples are kept, retried).
        """
        duckdb = duckdb_core()

        self._since_open = 0
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except duckdb.Error as exc:
                self._reopen_failed(f"closing: {exc}")
        self._reconnect()

    def _reconnect(self) -> None:
        try:
            self._db = self._connect()
        except (OutboxError, OutboxCorrupt) as exc:
            self._reopen_failed(str(exc))
            raise OutboxError(f"buffer {self.path} could not be reopened: {exc}") from None
        self.counters.reopens += 1

    def _reopen_failed(self, why: str) -> None:
        self.counters.reopen_failures += 1
        if self._reopen_log.ready():
            log.error(
                "buffer could not be reopened; retrying on the next write",
                extra=fields(
                    alarm="outbox_reopen_failed",
                    path=self.path,
                    reason=why,
                    failures_total=self.counters.reopen_failures,
                ),
            )

    # -- index ------------------------------------------------------------------------

    def _index(self, seq: int, row: _Row) -> None:
        if self._seqs and seq < self._seqs[-1]:
            bisect.insort(self._seqs, seq)
        else:
            self._seqs.append(seq)
        self._rows[seq] = row
        self._samples += row.samples
        self._bytes += row.nbytes

    def _unindex(self, seqs: Iterable[int]) -> tuple[int, int]:
        removed = set(seqs)
        frames = samples = 0
        for seq in removed:
            row = self._rows.pop(seq, None)
            if row is not None:
                frames += 1
                samples += row.samples
                self._samples -= row.samples
                self._bytes -= row.nbytes
        if frames:
            self._seqs = [s for s in self._seqs if s not in removed]
        return frames, samples

    # -- queries ----------------------------------------------------------------------

    def low_water(self) -> int:
        """Lowest seq still held unacknowledged, or the next seq when none is."""
        return self._seqs[0] if self._seqs else self.next_seq

    def unacked(self, below: int | None = None) -> list[int]:
        if below is None:
            return list(self._seqs)
        return self._seqs[: bisect.bisect_left(self._seqs, below)]

    def is_unacked(self, seq: int) -> bool:
        return seq in self._rows

    def row_kind(self, seq: int) -> str:
        row = self._rows.get(seq)
        return row.kind if row is not None else "data"

    def row_samples(self, seq: int) -> int:
        row = self._rows.get(seq)
        return row.samples if row is not None else 0

    def stats(self) -> OutboxStats:
        oldest_seq = oldest_ts = None
        for seq in self._seqs:
            row = self._rows[seq]
            if row.first_ts_ms is not None:
                oldest_seq, oldest_ts = seq, row.first_ts_ms
                break
        return OutboxStats(
            epoch=self.epoch,
            next_seq=self.next_seq,
            low_water=self.low_water(),
            frames=len(self._seqs),
            samples=self._samples,
            bytes=self._bytes,
            oldest_seq=oldest_seq,
            oldest_ts_ms=oldest_ts,
            max_samples=self.max_samples,
            max_bytes=self.max_bytes,
            overflow=self.overflow,
            counters=asdict(self.counters),
        )

    def frames(self, seqs: Sequence[int]) -> list[tuple[int, bytes]]:
        """Stored frame bytes for the given seqs that are still held, in seq order."""
        wanted = [s for s in seqs if s in self._rows]
        if not wanted:
            return []
        rows = self._execute(
            "SELECT seq, frame FROM frames WHERE seq IN (SELECT unnest(?::BIGINT[])) ORDER BY seq",
            [wanted],
        ).fetchall()
        return [(int(seq), bytes(frame)) for seq, frame in rows]

    # -- writes -----------------------------------------------------------------------

    def _execute(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        duckdb = duckdb_core()

        if self._db is None:
            if not self._opened:
                raise OutboxError("the buffer is not open")
            self._reconnect()
        try:
            return self._db.execute(sql, params) if params is not None else self._db.execute(sql)
        except duckdb.Error as exc:
            raise OutboxError(f"buffer {self.path}: {exc}") from None

    def _transaction(self, work: Callable[[], None]) -> None:
        self._execute("BEGIN")
        try:
            work()
            self._execute("COMMIT")
        except BaseException:
            try:
                self._execute("ROLLBACK")
            except OutboxError:
                pass
            raise
        self._since_open += 1
        if self._since_open >= self.reopen_every:
            # The transaction is committed whatever the reopen does: a failure is counted
            # and logged by _reopen, and the next call connects again.
            with contextlib.suppress(OutboxError):
                self._reopen()

    def reserve_seq(self) -> int:
        """Take the next seq for a frame that is not stored (a birth), persisting the counter."""
        seq = self.next_seq
        try:
            self._transaction(lambda: self._set_meta({"next_seq": seq + 1}))
        except OutboxError:
            self.counters.commit_failures += 1
            raise
        self.next_seq = seq + 1
        return seq

    def encode(self, seq: int, body: AnyBody) -> bytes:
        return self.signer.encode(self.epoch, seq, self.clock(), body)

    def _set_meta(self, values: dict[str, int]) -> None:
        self._execute(
            "INSERT OR REPLACE INTO meta SELECT unnest(?::VARCHAR[]), unnest(?::BIGINT[])",
            [list(values), list(values.values())],
        )

    def commit_data(self, batches: Sequence[Sequence[Sample]]) -> list[Committed]:
        """Store each non-empty batch as one signed ``data`` frame, all in one transaction.

        Returns what was stored (``drop_newest`` may refuse batches that do not fit).
        On a storage error nothing is stored, the seq counter is unchanged, and
        ``OutboxError`` is raised so the caller keeps the samples and retries.
        """
        stamp = self.clock()
        seq = self.next_seq
        out: list[Committed] = []
        rows: list[_Row] = []
        victims: list[int] = []
        refused = 0
        # What the buffer would hold after this commit, as the policy is applied.
        held_samples, held_bytes = self._samples, self._bytes
        candidates = iter(s for s in self._seqs if self._rows[s].kind == "data")
        for batch in batches:
            if not batch:
                continue
            frame = self.signer.encode(self.epoch, seq, stamp, Data.of(batch))
            row = _Row("data", len(batch), len(frame), min(s.ts_ms for s in batch))
            if row.samples > self.max_samples or row.nbytes > self.max_bytes:
                refused += row.samples  # larger than the whole buffer: cannot be kept
                continue
            while (
                held_samples + row.samples > self.max_samples
                or held_bytes + row.nbytes > self.max_bytes
            ):
                if self.overflow == "drop_newest":
                    break
                victim = next(candidates, None)
                if victim is None:
                    break
                victims.append(victim)
                held_samples -= self._rows[victim].samples
                held_bytes -= self._rows[victim].nbytes
            if (
                held_samples + row.samples > self.max_samples
                or held_bytes + row.nbytes > self.max_bytes
            ):
                refused += row.samples
                continue
            held_samples += row.samples
            held_bytes += row.nbytes
            out.append(Committed(seq, "data", row.samples, frame, batch))
            rows.append(row)
            seq += 1
        dropped_samples = refused + sum(self._rows[s].samples for s in victims)
        if not out and not dropped_samples:
            return []
        next_seq = seq

        def work() -> None:
            if victims:
                self._execute(
                    "DELETE FROM frames WHERE seq IN (SELECT unnest(?::BIGINT[]))", [victims]
                )
            if out:
                self._execute(
                    "INSERT INTO frames SELECT unnest(?::BIGINT[]), unnest(?::VARCHAR[]), "
                    "unnest(?::INTEGER[]), unnest(?::BIGINT[]), ?, unnest(?::BLOB[])",
                    [
                        [c.seq for c in out],
                        [c.kind for c in out],
                        [c.samples for c in out],
                        [r.first_ts_ms for r in rows],
                        stamp,
                        [c.frame for c in out],
                    ],
                )
            meta = {"next_seq": next_seq}
            if dropped_samples:
                meta.update(
                    dropped_frames=self.counters.dropped_frames + len(victims),
                    dropped_samples=self.counters.dropped_samples + dropped_samples,
                    overflow_events=self.counters.overflow_events + 1,
                )
            self._set_meta(meta)

        try:
            self._transaction(work)
        except OutboxError:
            self.counters.commit_failures += 1
            raise
        self.next_seq = next_seq
        if dropped_samples:
            self._unindex(victims)
            self.counters.dropped_frames += len(victims)
            self.counters.dropped_samples += dropped_samples
            self.counters.overflow_events += 1
            if self._overflow_log.ready():
                log.warning(
                    "buffer full: overflow policy applied",
                    extra=fields(
                        alarm="outbox_overflow",
                        policy=self.overflow,
                        dropped_samples_total=self.counters.dropped_samples,
                        dropped_frames_total=self.counters.dropped_frames,
                        held_samples=self._samples,
                        max_samples=self.max_samples,
                    ),
                )
        for committed, row in zip(out, rows, strict=True):
            self._index(committed.seq, row)
            self.counters.committed_frames += 1
            self.counters.committed_samples += committed.samples
        return out

    def ack(self, ranges: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """Delete every held frame the ranges cover; returns (frames, samples) removed."""
        if not self._seqs:
            return 0, 0
        covered: list[int] = []
        for first, last in ranges:
            lo = bisect.bisect_left(self._seqs, first)
            hi = bisect.bisect_right(self._seqs, last)
            covered.extend(self._seqs[lo:hi])
        if not covered:
            return 0, 0
        self._transaction(
            lambda: self._execute(
                "DELETE FROM frames WHERE seq IN (SELECT unnest(?::BIGINT[]))", [covered]
            )
        )
        frames, samples = self._unindex(covered)
        self.counters.acked_frames += frames
        self.counters.acked_samples += samples
        return frames, samples

    # -- commands ---------------------------------------------------------------------

    def command(self, cmd_id: str) -> CommandRecord | None:
        row = self._execute(
            "SELECT status, detail, readback, readback_ts_ms FROM commands WHERE cmd_id = ?",
            [cmd_id],
        ).fetchone()
        if row is None:
            return None
        status, detail, readback, readback_ts = row
        value = msgpack.unpackb(readback, raw=False) if readback is not None else None
        return CommandRecord(cmd_id, status, detail, value, readback_ts)

    def command_begin(self, cmd_id: str) -> None:
        """Persist that a command is being executed, before touching the device."""
        self._transaction(
            lambda: self._execute(
                "INSERT INTO commands VALUES (?, ?, 'pending', '', NULL, NULL)",
                [cmd_id, self.clock()],
            )
        )

    def command_finish(self, result: CommandResult, *, record: bool = True) -> Committed:
        """Store the outcome and its signed ``cmd_result`` frame in one transaction."""
        seq = self.next_seq
        frame = self.encode(seq, result)
        readback = (
            msgpack.packb(result.readback, use_bin_type=True)
            if result.readback is not None
            else None
        )

        def work() -> None:
            if record:
                self._execute(
                    "INSERT OR REPLACE INTO commands VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        result.cmd_id,
                        self.clock(),
                        result.status,
                        result.detail,
                        readback,
                        result.readback_ts_ms,
                    ],
                )
            self._execute(
                "INSERT INTO frames VALUES (?, 'cmd_result', 0, NULL, ?, ?)",
                [seq, self.clock(), frame],
            )
            self._set_meta({"next_seq": seq + 1})

        try:
            self._transaction(work)
        except OutboxError:
            self.counters.commit_failures += 1
            raise
        self.next_seq = seq + 1
        self._index(seq, _Row("cmd_result", 0, len(frame), None))
        return Committed(seq, "cmd_result", 0, frame)


def read_summary(path: Path) -> dict[str, Any]:
    """What ``agent status`` shows when no agent holds the file (opened read-only)."""
    duckdb = duckdb_core()

    try:
        db = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        raise OutboxError(f"cannot read buffer {path}: {exc}") from None
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        row = db.execute(
            "SELECT count(*), coalesce(sum(samples), 0), coalesce(sum(octet_length(frame)), 0), "
            "min(seq), min(first_ts_ms) FROM frames"
        ).fetchone()
        assert row is not None  # an aggregate always yields one row
        frames, samples, nbytes, oldest_seq, oldest_ts = row
    except duckdb.Error as exc:
        raise OutboxError(f"cannot read buffer {path}: {exc}") from None
    finally:
        db.close()
    next_seq = int(meta.get("next_seq", 1))
    return {
        "epoch": int(meta.get("epoch", 0)),
        "next_seq": next_seq,
        "low_water": int(oldest_seq) if oldest_seq is not None else next_seq,
        "frames": int(frames),
        "samples": int(samples),
        "bytes": int(nbytes),
        "oldest_ts_ms": int(oldest_ts) if oldest_ts is not None else None,
        "dropped_samples": int(meta.get("dropped_samples", 0)),
        "dropped_frames": int(meta.get("dropped_frames", 0)),
    }


P = ParamSpec("P")
T = TypeVar("T")


class AsyncOutbox:
    """Runs every ``Outbox`` call on one worker thread, in submission order."""

    def __init__(self, outbox: Outbox) -> None:
        self.sync = outbox
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def open(self) -> None:
        await self.call(self.sync.open)

    async def close(self) -> None:
        try:
            await self.call(self.sync.close)
        finally:
            self._executor.shutdown(wait=True)
