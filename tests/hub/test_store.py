"""The twin store: its schema (created, versioned, migrated in place), and the same
suite of writes and reads on both adapters of the storage port (DuckDB, PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from support.pg import BACKENDS, Opener, store_opener

from fieldtwin.hub.audit import AuditChain, AuditEvent
from fieldtwin.hub.errors import StoreSchemaError
from fieldtwin.hub.state import GatewayLink, encode_value
from fieldtwin.hub.storage import ALARM_COLUMNS
from fieldtwin.hub.store import (
    SCHEMA_VERSION,
    Flush,
    FrameRow,
    IngestWrite,
    SyncWrite,
    TwinStore,
)

T0 = 1_800_000_000_000


def test_a_version_1_store_is_migrated_and_keeps_its_gateways(tmp_path: Path) -> None:
    path = tmp_path / "twin.duckdb"
    TwinStore.open(path, threads=1).close()
    # Make it what a version 1 hub left behind: no session column, one gateway row.
    con = duckdb.connect(str(path))
    con.execute("ALTER TABLE gateways DROP COLUMN session")
    con.execute(
        "INSERT INTO gateways VALUES ('gw-01', 7, 12, true, 1, 1, 0, '', 3, 30, '{}', 0, 4)"
    )
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.close()

    store = TwinStore.open(path, threads=1)
    try:
        assert store.meta("schema_version") == str(SCHEMA_VERSION)
        state, _ = store.load_state()
        link = state.gateways["gw-01"]
        assert (link.epoch, link.birth_seq, link.death_birth_seq) == (7, 12, 4)
        assert link.session == 0  # unknown: deaths fall back to the seq-window rule
        with store.transaction() as tx:
            store._write_gateways(tx, [GatewayLink("gw-01", 7, 13, True, session=13)])
        state, _ = store.load_state()
        assert state.gateways["gw-01"].session == 13
    finally:
        store.close()


def test_a_store_from_a_newer_hub_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "twin.duckdb"
    TwinStore.open(path, threads=1).close()
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(StoreSchemaError, match="schema version 99"):
        TwinStore.open(path, threads=1)


# -- the same store suite on both adapters ------------------------------------------------


@pytest.fixture(params=BACKENDS)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    with store_opener(request.param, tmp_path) as (open_store, _):
        yield open_store


def _frames(first: int, count: int, gateway: str = "gw-01") -> IngestWrite:
    batch = IngestWrite()
    for n in range(first, first + count):
        batch.frames.append(FrameRow(n, gateway, "data", 7, n, T0 + n, T0 + n + 5, 2))
        for attribute, value in (("level", float(n)), ("mode", f"m{n}")):
            kind, num, txt = encode_value(value)
            batch.history.entity.append("tank-1")
            batch.history.attribute.append(attribute)
            batch.history.kind.append(kind)
            batch.history.num.append(num)
            batch.history.txt.append(txt)
            batch.history.ts_ms.append(T0 + n * 1000)
            batch.history.quality.append(0)
            batch.history.frame_id.append(n)
    return batch


def test_a_fresh_store_has_the_schema_and_refuses_a_newer_one(opener: Opener) -> None:
    store = opener()
    assert store.meta("schema_version") == str(SCHEMA_VERSION)
    assert store.next_ids() == dict.fromkeys(
        ("frame", "drift", "alarm", "investigation", "proposal"), 1
    )
    store.query("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    store.close()
    with pytest.raises(StoreSchemaError, match="schema version 99"):
        opener()


def test_journaled_frames_are_the_current_state_until_flushed_and_after(opener: Opener) -> None:
    store = opener()
    try:
        store.write_ingest(_frames(1, 3))
        store.write_ingest(_frames(4, 2))
        state, tracker = store.load_state()
        assert state.current[("tank-1", "level")].value == 5.0
        assert state.current[("tank-1", "mode")].value == "m5"
        assert state.unflushed == {("tank-1", "level"), ("tank-1", "mode")}
        assert tracker.ranges("gw-01", 7) == [(1, 5)]
        assert state.gateways["gw-01"].frames == 5
        rows = store.history_rows("tank-1", "level", T0, T0 + 10_000, 2)
        assert [r[0] for r in rows] == [T0 + 5000, T0 + 4000]  # newest first
        assert [r[5:8] for r in rows] == [("gw-01", 7, 5), ("gw-01", 7, 4)]
        assert [r[:2] for r in store.as_of_rows(T0 + 2500)] == [
            ("tank-1", "level"),
            ("tank-1", "mode"),
        ]
        assert store.as_of_rows(T0 + 2500)[0][3] == 2.0

        flush = Flush(5, tracker.dumps(), current_new=dict(state.current))
        store.write_sync(SyncWrite(checked_ms=T0 + 9000, flush=flush))
        store.write_ingest(_frames(6, 1))
    finally:
        store.close()
    store = opener()  # a restart: the flushed state plus the journal after it
    try:
        state, tracker = store.load_state()
        assert state.current[("tank-1", "level")].value == 6.0
        assert state.unflushed == {("tank-1", "level"), ("tank-1", "mode")}
        assert tracker.ranges("gw-01", 7) == [(1, 6)]
        assert store.last_check_ms() == T0 + 9000
        assert store.next_ids()["frame"] == 7
        assert store.query("SELECT count(*) FROM history")[0][0] == 12
        assert store.frame_latencies(200) == {"gw-01": [5] * 6}
    finally:
        store.close()


def test_a_sync_cycle_stores_alarms_drift_commands_and_audit_together(opener: Opener) -> None:
    store = opener()
    try:
        store.sync_declared(
            [("tank-1", "plant/tank-1", "tank", "gw-01", "Tank", '{"volume": 3}')],
            [("pump-1", "tank-1", "feeds", None)],
            {"twin": "plant"},
            [],
        )
        alarm = dict.fromkeys(ALARM_COLUMNS) | {
            "id": "A-1",
            "rule": "threshold",
            "entity": "tank-1",
            "attribute": "level",
            "state": "active",
            "raised_ms": T0,
            "present": True,
        }
        chain = AuditChain()
        records = chain.chain([AuditEvent(T0, "hub", "alarm_raised", "tank-1", {"id": "A-1"})])
        command = {
            "id": "C-1",
            "entity": "pump-1",
            "attribute": "speed_sp",
            "gateway": "gw-01",
            "state": "proposed",
            "proposed_by": "alice",
            "proposed_ms": T0,
            "updated_ms": T0,
            "closed_ms": None,
        }
        store.write_sync(
            SyncWrite(
                alarms=[alarm, alarm | {"state": "acked", "acked_by": "bob"}],
                drift_started=[
                    {
                        "id": 1,
                        "rule": "threshold",
                        "drift_type": "value",
                        "entity": "tank-1",
                        "attribute": "level",
                        "severity": "warning",
                        "strategy": "alert",
                        "description": "high",
                        "detected_ms": T0,
                    }
                ],
                health={"tank-1": "drifted"},
                actions=[(T0, "tank-1", "alert", "ok", "{}")],
                commands=[command, command | {"state": "approved"}],
                command_events=[
                    ("C-1", T0, "proposed", "", "proposed", "alice", "r1", "{}"),
                    ("C-1", T0, "approved", "proposed", "approved", "bob", "r2", "{}"),
                ],
                nonces=[("alice", "r1", "cmd.propose", T0 + 60_000, T0)],
                audit=records,
                checked_ms=T0 + 1,
            )
        )
        assert [(a["id"], a["state"], a["acked_by"]) for a in store.open_alarms()] == [
            ("A-1", "acked", "bob")
        ]
        assert store.open_drift_events() == {("threshold", "tank-1", "level"): 1}
        assert store.entity_health() == {"tank-1": "drifted"}
        assert store.twin_ids() == {"tank-1": "plant/tank-1"}
        assert [r["state"] for r in store.command_rows("state IN (?)", ["approved"])] == [
            "approved"
        ]
        assert [e[2] for e in store.command_events(["C-1"])] == ["proposed", "approved"]
        assert store.next_command_number() == 2
        assert store.live_nonces(T0) == [("alice", "r1", T0 + 60_000)]
        assert store.audit_head() == (1, records[0].hash)
        assert store.recent_actions(20) == [(T0, "tank-1", "alert", "ok")]
        assert store.relationship_rows() == [("pump-1", "tank-1", "feeds", None)]
        store.write_sync(SyncWrite(drift_cleared=[(1, T0 + 5)]))
        assert store.open_drift_events() == {}
        assert store.next_ids()["alarm"] == 2
    finally:
        store.close()


def test_finding_spans_are_the_findings_open_in_a_window(opener: Opener) -> None:
    """What a model fit leaves out: findings of the rules asked for, on the points asked
    for, detected by the end of the window and not cleared before its start."""

    def event(number: int, rule: str, attribute: str, detected: int) -> dict[str, object]:
        return {
            "id": number,
            "rule": rule,
            "drift_type": rule.split(".")[0],
            "entity": "tank-1",
            "attribute": attribute,
            "severity": "warning",
            "strategy": "alert",
            "description": rule,
            "detected_ms": T0 + detected,
        }

    store = opener()
    try:
        store.write_sync(
            SyncWrite(
                drift_started=[
                    event(1, "semantic.frozen", "level", 100),  # cleared at 200
                    event(2, "semantic.frozen", "level", 1000),  # still open
                    event(3, "threshold", "level", 150),  # another rule
                    event(4, "semantic.rate", "temp", 150),  # another point
                    event(5, "semantic.rate", "level", 5000),  # after the window
                ],
                drift_cleared=[(1, T0 + 200), (3, T0 + 300), (4, T0 + 300)],
            )
        )
        rules = ("semantic.frozen", "semantic.rate")
        found = store.finding_spans(rules, ["tank-1"], ["level"], T0 + 150, T0 + 2000)
        assert found == [
            ("semantic.frozen", "tank-1", "level", T0 + 100, T0 + 200),
            ("semantic.frozen", "tank-1", "level", T0 + 1000, None),
        ]
        assert store.finding_spans(rules, ["tank-1"], ["level"], T0 + 201, T0 + 999) == []
    finally:
        store.close()


def test_hub_seqs_are_reserved_in_blocks_across_restarts(opener: Opener) -> None:
    store = opener()
    epoch, start, ceiling = store.hub_sequence(100)
    assert (start, ceiling) == (1, 100)
    store.reserve_hub_seqs(250)
    store.close()
    store = opener()
    try:
        assert store.hub_sequence(100) == (epoch, 251, 350)
    finally:
        store.close()


def test_models_and_numeric_reads(opener: Opener) -> None:
    store = opener()
    try:
        store.save_models([("tank-1.level", T0, {"kind": "trend", "r2": 0.5})])
        store.save_models([("tank-1.level", T0 + 1, {"kind": "trend", "r2": 0.9})])
        assert store.load_models() == [{"kind": "trend", "r2": 0.9}]
        assert store.model_count() == 1
        store.write_ingest(_frames(1, 4))
        samples = store.numeric_samples(["tank-1"], ["level", "mode"], T0 + 1000, T0 + 4000)
        assert [(r[1], r[2], r[3]) for r in samples] == [
            ("level", T0 + 2000, 2.0),
            ("level", T0 + 3000, 3.0),
            ("level", T0 + 4000, 4.0),
            ("mode", T0 + 2000, None),
            ("mode", T0 + 3000, None),
            ("mode", T0 + 4000, None),
        ]
        before = store.numeric_before(["tank-1"], ["level"], T0 + 2500)
        assert [(r[1], r[2], r[3]) for r in before] == [("level", T0 + 2000, 2.0)]
        buckets = store.history_buckets("tank-1", "level", T0, T0 + 4000, 2000)
        assert [(b, n, lo, hi, last) for b, n, lo, hi, _, last, *_ in buckets] == [
            (0, 1, 1.0, 1.0, 1.0),
            (1, 2, 2.0, 3.0, 3.0),
            (2, 1, 4.0, 4.0, 4.0),
        ]
        assert store.history_text_count("tank-1", "mode", T0, T0 + 4000) == 4
    finally:
        store.close()


def test_a_version_1_postgresql_store_is_migrated(tmp_path: Path) -> None:
    with store_opener("postgresql", tmp_path) as (opener, _):
        opener().close()
        store = opener()
        store.query("ALTER TABLE gateways DROP COLUMN session")
        store.query(
            "INSERT INTO gateways VALUES ('gw-01', 7, 12, true, 1, 1, 0, '', 3, 30, '{}', 0, 4)"
        )
        store.query("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        store.close()
        store = opener()
        try:
            assert store.meta("schema_version") == str(SCHEMA_VERSION)
            link = store.load_state()[0].gateways["gw-01"]
            assert (link.epoch, link.birth_seq, link.death_birth_seq, link.session) == (
                7,
                12,
                4,
                0,
            )
        finally:
            store.close()
