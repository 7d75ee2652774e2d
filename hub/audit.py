"""The append-only, hash-chained audit log.

Every record carries the SHA-256 of its predecessor, so changing, inserting or deleting
any earlier record breaks every hash after it, and ``verify_chain`` finds the first
broken link. The record hash covers a canonical JSON encoding (sorted keys, no spaces)
of ``[seq, ts_ms, actor, action, subject, detail]`` plus the previous hash.

The chain head lives in memory; records are hashed as a batch is written and the head
moves on only after the batch commits, so a failed transaction leaves no hole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GENESIS_HASH = "0" * 64


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """Something that happened, before it is numbered and chained."""

    ts_ms: int
    actor: str
    action: str
    subject: str
    detail: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    ts_ms: int
    actor: str
    action: str
    subject: str
    detail: str
    prev_hash: str
    hash: str


def record_hash(
    prev_hash: str, seq: int, ts_ms: int, actor: str, action: str, subject: str, detail: str
) -> str:
    body = canonical_json([seq, ts_ms, actor, action, subject, detail])
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


class AuditChain:
    """Numbers and chains events; ``commit`` advances the head once they are stored."""

    def __init__(self, head_seq: int = 0, head_hash: str = GENESIS_HASH) -> None:
        self.head_seq = head_seq
        self.head_hash = head_hash

    def chain(self, events: Iterable[AuditEvent]) -> list[AuditRecord]:
        records: list[AuditRecord] = []
        seq, prev = self.head_seq, self.head_hash
        for event in events:
            seq += 1
            detail = canonical_json(dict(event.detail))
            digest = record_hash(
                prev, seq, event.ts_ms, event.actor, event.action, event.subject, detail
            )
            records.append(
                AuditRecord(
                    seq, event.ts_ms, event.actor, event.action, event.subject, detail, prev, digest
                )
            )
            prev = digest
        return records

    def commit(self, records: Sequence[AuditRecord]) -> None:
        if records:
            self.head_seq = records[-1].seq
            self.head_hash = records[-1].hash


@dataclass(frozen=True, slots=True)
class ChainCheck:
    ok: bool
    records: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str = ""


def verify_chain(records: Iterable[Sequence[Any]]) -> ChainCheck:
    """Check rows of ``(seq, ts_ms, actor, action, subject, detail, prev_hash, hash)``."""
    prev = GENESIS_HASH
    expected_seq = 1
    count = 0
    for row in records:
        seq, ts_ms, actor, action, subject, detail, prev_hash, digest = row
        count += 1
        if seq != expected_seq:
            return ChainCheck(False, count, prev, seq, f"expected seq {expected_seq}, found {seq}")
        if prev_hash != prev:
            return ChainCheck(False, count, prev, seq, "prev_hash does not match the record before")
        if record_hash(prev, seq, ts_ms, actor, action, subject, detail) != digest:
            return ChainCheck(False, count, prev, seq, "record content does not match its hash")
        prev = digest
        expected_seq += 1
    return ChainCheck(True, count, prev)
