"""Workers that share the gateways (issue 13): partitions, leases and their fences.

Several ``fieldtwin hub run`` processes on one PostgreSQL store split the gateways.
Each gateway belongs to one of ``partitions`` fixed partitions (``partition_of``, a
stable hash, so every worker computes the same mapping). A worker holds partitions
through rows of the ``leases`` table: ``(partition, holder, expires_ms, fence)``, with
times from the database's clock so workers need no synchronised clocks.

Every ``lease_s / 3`` a worker runs one lease cycle in one transaction (``LeaseTable``):
it marks itself live in ``lease_workers``, locks the lease rows, and ``plan`` decides,
from those rows alone, which partitions to renew, claim (free or expired) and release
(more than its fair share ``ceil(partitions / live workers)``). A claim of a partition
another worker held increments its ``fence``.

Exactly-once rests on the fence, not on timing: an ingest transaction locks the lease
rows of the partitions it writes (``FOR SHARE``) and commits only if this worker still
holds each with the fence it adopted and an unexpired lease (``PgTwinStore``'s fence
check). A worker that was paused past its lease therefore cannot commit frames the new
owner has also stored; its batch rolls back, is not acknowledged, and the gateway sends
it again to the new owner, whose tracker (loaded from the frames table after its claim
committed) decides what is a replay.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from fieldtwin.hub.errors import StoreError

LEASE_LOCK = 0x66_74_77_69_6E + 2
"""Advisory lock serialising the lease tables' creation (workers starting together)."""


def partition_of(gateway: str, partitions: int) -> int:
    """The partition of a gateway: the same on every worker and across restarts."""
    return zlib.crc32(gateway.encode()) % partitions


def gateways_of(gateways: Iterable[str], partitions: int, held: Iterable[int]) -> list[str]:
    """The gateways (of ``gateways``) that fall in the ``held`` partitions, sorted."""
    wanted = set(held)
    return sorted(g for g in gateways if partition_of(g, partitions) in wanted)


@dataclass(frozen=True, slots=True)
class LeaseRow:
    partition: int
    holder: str
    expires_ms: int
    fence: int


@dataclass(slots=True)
class LeasePlan:
    """What one lease cycle does: renew keeps the fence, claim increments it when the
    partition was someone else's, release frees it for a worker short of its share."""

    renew: list[int] = field(default_factory=list)
    claim: list[int] = field(default_factory=list)
    release: list[int] = field(default_factory=list)


def fair_share(partitions: int, live_workers: int) -> int:
    return math.ceil(partitions / max(live_workers, 1))


def plan(rows: Sequence[LeaseRow], me: str, now_ms: int, live_workers: int) -> LeasePlan:
    """Decide a cycle from the lease rows (sans I/O, so it is unit and property tested).

    A lease still held by me is renewed even if it expired meanwhile: nobody claimed it
    (the holder is still me), so nothing was written by another worker and my state of
    it is current. Free and expired partitions are claimed up to my fair share, lowest
    first; beyond the share, my highest partitions are released."""
    share = fair_share(len(rows), live_workers)
    mine = sorted(r.partition for r in rows if r.holder == me)
    out = LeasePlan()
    if len(mine) > share:
        out.release = mine[share:]
        mine = mine[:share]
    out.renew = mine
    free = sorted(
        r.partition for r in rows if r.holder != me and (not r.holder or r.expires_ms <= now_ms)
    )
    out.claim = free[: max(share - len(mine), 0)]
    return out


class LeaseTable:
    """The ``leases`` and ``lease_workers`` tables, on a connection of its own (so a
    lease cycle never waits behind the ingest thread)."""

    DDL = (
        """CREATE TABLE IF NOT EXISTS leases (
            partition INTEGER PRIMARY KEY, holder TEXT NOT NULL DEFAULT '',
            expires_ms BIGINT NOT NULL DEFAULT 0, fence BIGINT NOT NULL DEFAULT 0)""",
        """CREATE TABLE IF NOT EXISTS lease_workers (
            worker TEXT PRIMARY KEY, seen_ms BIGINT NOT NULL)""",
    )
    NOW = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"

    def __init__(self, url: str, me: str, partitions: int, lease_s: float) -> None:
        self.url = url
        self.me = me
        self.partitions = partitions
        self.lease_ms = int(lease_s * 1000)
        self._con: psycopg.Connection[Any] | None = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._con is None or self._con.closed:
            self._con = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        return self._con

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def create(self) -> None:
        """Create the tables and one row per partition (idempotent, any worker)."""
        try:
            con = self._connection()
            with con.transaction():
                con.execute("SELECT pg_advisory_xact_lock(%s)", [LEASE_LOCK])
                for statement in self.DDL:
                    con.execute(statement)
                con.execute(
                    "INSERT INTO leases (partition) SELECT generate_series(0, %s - 1) "
                    "ON CONFLICT DO NOTHING",
                    [self.partitions],
                )
                count = con.execute("SELECT count(*) FROM leases").fetchone()
            if count is None or int(count[0]) != self.partitions:
                raise StoreError(
                    f"the store's leases table has {count[0] if count else 0} partitions; "
                    f"this worker is configured for {self.partitions} ([workers] partitions "
                    "must be the same on every worker of a store)"
                )
        except psycopg.Error as exc:
            self.close()
            raise StoreError(f"lease table: {_first_line(exc)}") from None

    def cycle(self) -> dict[int, int]:
        """One lease cycle; the partitions held afterwards, with their fences."""
        try:
            con = self._connection()
            with con.transaction():
                con.execute("SET LOCAL lock_timeout = '2s'")
                now = _one(con.execute(f"SELECT {self.NOW}").fetchone())
                con.execute(
                    "INSERT INTO lease_workers VALUES (%s, %s) "
                    "ON CONFLICT (worker) DO UPDATE SET seen_ms = excluded.seen_ms",
                    [self.me, now],
                )
                live = _one(
                    con.execute(
                        "SELECT count(*) FROM lease_workers WHERE seen_ms > %s",
                        [now - self.lease_ms],
                    ).fetchone()
                )
                rows = [
                    LeaseRow(int(p), str(h), int(e), int(f))
                    for p, h, e, f in con.execute(
                        "SELECT partition, holder, expires_ms, fence FROM leases "
                        "ORDER BY partition FOR UPDATE"
                    ).fetchall()
                ]
                decided = plan(rows, self.me, now, live)
                expires = now + self.lease_ms
                if decided.release:
                    con.execute(
                        "UPDATE leases SET holder = '', expires_ms = 0 "
                        "WHERE partition = ANY(%s) AND holder = %s",
                        [decided.release, self.me],
                    )
                if decided.renew:
                    con.execute(
                        "UPDATE leases SET expires_ms = %s WHERE partition = ANY(%s) "
                        "AND holder = %s",
                        [expires, decided.renew, self.me],
                    )
                if decided.claim:
                    con.execute(
                        "UPDATE leases SET holder = %s, expires_ms = %s, fence = fence + 1 "
                        "WHERE partition = ANY(%s)",
                        [self.me, expires, decided.claim],
                    )
                held = con.execute(
                    "SELECT partition, fence FROM leases WHERE holder = %s", [self.me]
                ).fetchall()
            return {int(p): int(f) for p, f in held}
        except psycopg.Error as exc:
            self.close()
            raise StoreError(f"lease cycle: {_first_line(exc)}") from None

    def release_all(self) -> None:
        """On a clean stop: free my partitions at once (no wait for expiry)."""
        try:
            con = self._connection()
            with con.transaction():
                con.execute(
                    "UPDATE leases SET holder = '', expires_ms = 0 WHERE holder = %s", [self.me]
                )
                con.execute("DELETE FROM lease_workers WHERE worker = %s", [self.me])
        except psycopg.Error as exc:
            self.close()
            raise StoreError(f"lease release: {_first_line(exc)}") from None


@dataclass(slots=True)
class Fence:
    """The partitions a worker has adopted, with their fences: the ingest transaction
    commits only frames of these, and only while the lease rows still say so.

    ``held`` is replaced (never mutated) by the event loop and read by the database
    thread, so each reader sees one consistent map."""

    holder: str
    partitions: int
    held: Mapping[int, int] = field(default_factory=dict)

    def owns(self, gateway: str) -> bool:
        return partition_of(gateway, self.partitions) in self.held

    def check_sql(self) -> str:
        return (
            "SELECT partition, holder, fence, expires_ms > "
            f"{LeaseTable.NOW} FROM leases WHERE partition = ANY(%s) FOR SHARE"
        )

    def verify(self, gateways: Iterable[str], rows: Sequence[Sequence[Any]]) -> None:
        """Raise ``StoreError`` unless every partition of ``gateways`` is still mine."""
        held = self.held
        found = {int(r[0]): (str(r[1]), int(r[2]), bool(r[3])) for r in rows}
        for partition in sorted({partition_of(g, self.partitions) for g in gateways}):
            holder, fence, live = found.get(partition, ("", -1, False))
            if holder != self.holder or fence != held.get(partition) or not live:
                raise StoreError(
                    f"lease of partition {partition} lost (holder {holder or 'none'}, fence "
                    f"{fence}, mine {held.get(partition)}); batch not stored"
                )

    def partitions_of(self, gateways: Iterable[str]) -> list[int]:
        return sorted({partition_of(g, self.partitions) for g in gateways})


def _one(row: Sequence[Any] | None) -> int:
    assert row is not None
    return int(row[0])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
