"""Ingest on a real DuckDB file with frames signed by the protocol package."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
from support.hub_env import GatewaySigner, HubFiles, now_ms, point, sample, write_hub_config

from fieldtwin.hub.audit import AuditChain, verify_chain
from fieldtwin.hub.config import HubConfig, load_hub_config
from fieldtwin.hub.ingest import Inbound, IngestCore
from fieldtwin.hub.metrics import HubMetrics
from fieldtwin.hub.store import CURRENT_STATE_SQL, SyncWrite, TwinStore
from fieldtwin.protocol.keys import KeyPair
from fieldtwin.protocol.topics import uplink_topic


@dataclass
class Rig:
    files: HubFiles
    config: HubConfig
    store: TwinStore
    core: IngestCore
    gw: GatewaySigner

    def feed(self, *messages: tuple[str, bytes]) -> object:
        stamp = now_ms()
        return self.core.process([Inbound(topic, payload, stamp) for topic, payload in messages])

    def reopen(self) -> None:
        self.store.close()
        self.store, self.core = _open(self.config)

    def flush(self) -> None:
        write = SyncWrite(flush=self.core.flush_plan())
        self.store.write_sync(write)
        assert write.flush is not None
        self.core.flushed(write.flush)

    def count(self, sql: str) -> int:
        return int(self.store.query(sql)[0][0])


def _open(config: HubConfig) -> tuple[TwinStore, IngestCore]:
    store = TwinStore.open(config.database, memory_limit="256MB", threads=1)
    state, tracker = store.load_state()
    core = IngestCore(
        config,
        store,
        state,
        tracker,
        config.registry(),
        AuditChain(*store.audit_head()),
        HubMetrics(),
        next_frame_id=store.next_ids()["frame"],
    )
    return store, core


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    files = write_hub_config(tmp_path)
    config = load_hub_config(files.config)
    store, core = _open(config)
    gw = GatewaySigner("gw-01", files.gateway_keys["gw-01"])
    rig = Rig(files, config, store, core, gw)
    yield rig
    rig.store.close()


def test_data_is_stored_applied_and_acked(rig: Rig) -> None:
    t = now_ms()
    outcome = rig.feed(
        rig.gw.data([sample("tank-1", "level", 2.5, t), sample("pump-1", "running", True, t)])
    )
    assert outcome.ack_due == {"gw-01": rig.gw.epoch}  # type: ignore[attr-defined]
    assert rig.core.state.current[("tank-1", "level")].value == 2.5
    assert rig.core.state.current[("pump-1", "running")].value is True
    assert rig.core.tracker.ranges("gw-01") == [(1, 1)]
    assert rig.count("SELECT count(*) FROM history") == 2
    assert rig.count("SELECT count(*) FROM frames") == 1
    state_sql = CURRENT_STATE_SQL.format(columns="attribute, kind, num, txt")
    assert ("running", 1, 1.0, None) in rig.store.query(state_sql)
    assert rig.core.metrics.frames_accepted[("gw-01", "data")] == 1


def test_last_writer_wins_by_source_time_and_backfill_goes_to_history(rig: Rig) -> None:
    t = now_ms()
    rig.feed(rig.gw.data([sample("tank-1", "level", 3.0, t)]))
    rig.feed(rig.gw.data([sample("tank-1", "level", 1.0, t - 5000)]))  # late backfill
    current = rig.core.state.current[("tank-1", "level")]
    assert (current.value, current.ts_ms) == (3.0, t)
    assert rig.count("SELECT count(*) FROM history WHERE attribute = 'level'") == 2
    rig.flush()
    assert rig.store.query("SELECT num FROM current WHERE attribute = 'level'") == [(3.0,)]
    # within one frame too: the newest sample wins whatever its position
    rig.feed(rig.gw.data([sample("tank-1", "temp", 9.0, t + 10), sample("tank-1", "temp", 7.0, t)]))
    assert rig.core.state.current[("tank-1", "temp")].value == 9.0


def test_replay_is_refused_counted_and_audited(rig: Rig) -> None:
    message = rig.gw.data([sample("tank-1", "level", 2.0)])
    rig.feed(message)
    outcome = rig.feed(message)
    assert outcome.rejected == {"replay": 1}  # type: ignore[attr-defined]
    assert rig.count("SELECT count(*) FROM history") == 1
    assert rig.core.metrics.frames_rejected["replay"] == 1
    rows = rig.store.query(
        "SELECT action, subject, detail FROM audit WHERE action = 'frame_rejected'"
    )
    assert len(rows) == 1
    assert rows[0][1] == "gw-01"
    assert '"reason":"replay"' in rows[0][2]
    # the same frame twice within one batch: the second is a replay as well
    again = rig.gw.data([sample("tank-1", "level", 2.1)])
    outcome = rig.feed(again, again)
    assert outcome.rejected == {"replay": 1}  # type: ignore[attr-defined]
    assert rig.count("SELECT count(*) FROM history") == 2


def test_tampered_unknown_and_misrouted_frames_are_refused(rig: Rig) -> None:
    topic, payload = rig.gw.data([sample("tank-1", "level", 2.0)])
    signed, signature = msgpack.unpackb(payload)
    tampered = bytearray(signed)
    tampered[-3] ^= 0x01
    bad_sig = msgpack.packb([bytes(tampered), signature])
    stranger = GatewaySigner("gw-01", KeyPair.generate())
    other = GatewaySigner("gw-02", rig.files.gateway_keys["gw-02"])
    misrouted = other.data([sample("tank-1", "level", 9.9)])
    outcome = rig.feed(
        (topic, bad_sig),
        stranger.data([sample("tank-1", "level", 9.9)]),
        (uplink_topic("gw-01", "data"), misrouted[1]),  # gw-02's frame on gw-01's topic
        (topic, b"\x00garbage"),
        ("ft/v1/gw-01/down/ack", payload),
    )
    assert outcome.rejected == {  # type: ignore[attr-defined]
        "bad_signature": 1,
        "unknown_key": 1,
        "topic_mismatch": 2,
        "not_msgpack": 1,
    }
    assert rig.count("SELECT count(*) FROM history") == 0
    assert rig.count("SELECT count(*) FROM audit WHERE action = 'frame_rejected'") == 5
    # the genuine frame still goes through afterwards: a rejection costs nothing
    assert rig.feed((topic, payload)).accepted  # type: ignore[attr-defined]


def test_rejection_audit_is_capped_per_minute(tmp_path: Path) -> None:
    files = write_hub_config(tmp_path, extra="")
    text = files.config.read_text().replace(
        "batch_window_ms = 2", "batch_window_ms = 2\naudit_rejections_per_minute = 3"
    )
    files.config.write_text(text)
    config = load_hub_config(files.config)
    store, core = _open(config)
    try:
        junk = [Inbound("ft/v1/gw-01/up/data", b"junk", now_ms()) for _ in range(10)]
        outcome = core.process(junk)
        assert outcome.rejected == {"not_msgpack": 10}
        assert core.metrics.frames_rejected["not_msgpack"] == 10
        assert store.query("SELECT count(*) FROM audit WHERE action = 'frame_rejected'") == [(3,)]
    finally:
        store.close()


def test_stale_epoch_is_refused_and_new_epoch_replaces(rig: Rig) -> None:
    old = GatewaySigner("gw-01", rig.files.gateway_keys["gw-01"], epoch=rig.gw.epoch - 10_000)
    rig.feed(rig.gw.data([sample("tank-1", "level", 2.0)]))
    assert rig.feed(old.data([sample("tank-1", "level", 2.0)])).rejected == {"stale_epoch": 1}  # type: ignore[attr-defined]
    newer = GatewaySigner("gw-01", rig.files.gateway_keys["gw-01"], epoch=rig.gw.epoch + 1)
    outcome = rig.feed(newer.data([sample("tank-1", "level", 2.2)]))
    assert outcome.ack_due == {"gw-01": newer.epoch}  # type: ignore[attr-defined]
    assert rig.count("SELECT count(*) FROM audit WHERE action = 'epoch_changed'") == 1


def test_birth_sets_points_closes_gaps_and_death_needs_the_live_connection(rig: Rig) -> None:
    t = now_ms()
    rig.gw.seq = 40  # the agent had sent 1..40 before; 1..39 were acked earlier
    rig.feed(
        rig.gw.birth(
            [point("tank-1", "level", unit="m", interval_ms=1000, source="modbus ir 0")],
            [sample("tank-1", "level", 2.0, t)],
            low_water=41,
            state_seqs=[39],  # its data frame was dropped by the agent's overflow policy
        )
    )
    birth_seq = rig.gw.birth_seq
    assert rig.core.tracker.ranges("gw-01") == [(1, 41)]
    assert rig.core.tracker.gaps("gw-01") == []
    link = rig.core.state.gateways["gw-01"]
    assert link.online
    assert link.birth_seq == birth_seq
    assert link.session == birth_seq
    assert rig.core.state.points[("tank-1", "level")].source == "modbus ir 0"
    # its data frame will never come, so the birth stores the sample in history, once
    assert rig.count("SELECT count(*) FROM history") == 1
    # a rebirth of the same state (same connection) adds nothing to history
    rig.feed(
        rig.gw.birth(
            [], [sample("tank-1", "level", 2.0, t)], low_water=43, rebirth=True, state_seqs=[39]
        )
    )
    assert rig.count("SELECT count(*) FROM history") == 1
    assert rig.core.state.gateways["gw-01"].session == birth_seq
    # a death naming the rebirth is not this connection's will
    outcome = rig.feed(rig.gw.death(birth_seq=rig.gw.birth_seq))
    assert outcome.rejected == {"stale_death": 1}  # type: ignore[attr-defined]
    # the will names the birth that opened the connection, even after a rebirth: applied
    rig.feed(rig.gw.death(reason="connection lost"))
    link = rig.core.state.gateways["gw-01"]
    assert not link.online
    assert link.death_reason == "connection lost"
    # replaying that death changes nothing
    assert rig.feed(rig.gw.death(birth_seq=birth_seq)).rejected == {"stale_death": 1}  # type: ignore[attr-defined]
    rig.feed(rig.gw.birth([], [], low_water=45))  # the next connection
    assert rig.core.state.gateways["gw-01"].online
    outcome = rig.feed(rig.gw.death(birth_seq=birth_seq))
    assert outcome.rejected == {"stale_death": 1}  # type: ignore[attr-defined]
    assert rig.core.state.gateways["gw-01"].online
    rig.feed(rig.gw.death())  # this connection's will
    assert not rig.core.state.gateways["gw-01"].online
    assert rig.count("SELECT count(*) FROM audit WHERE action = 'death'") == 2


def test_a_will_the_hub_never_saw_cannot_end_a_later_connection(rig: Rig) -> None:
    rig.feed(rig.gw.birth())
    first = rig.gw.session
    # that connection dropped while the hub was away; its will was captured, not applied
    rig.feed(rig.gw.birth())  # a new connection, opened by a newer birth
    assert rig.gw.session > first
    outcome = rig.feed(rig.gw.death(birth_seq=first))
    assert outcome.rejected == {"stale_death": 1}  # type: ignore[attr-defined]
    assert rig.core.state.gateways["gw-01"].online
    assert rig.count("SELECT count(*) FROM audit WHERE action = 'frame_rejected'") >= 1


def test_without_a_known_session_a_death_needs_a_birth_after_the_last_death(rig: Rig) -> None:
    rig.feed(rig.gw.birth())
    opened = rig.gw.session
    rig.feed(rig.gw.birth(rebirth=True))
    rig.core.state.gateways["gw-01"].session = 0  # restored from a store without it
    outcome = rig.feed(rig.gw.death(birth_seq=rig.gw.birth_seq + 1))  # not sent yet
    assert outcome.rejected == {"stale_death": 1}  # type: ignore[attr-defined]
    rig.feed(rig.gw.death(birth_seq=opened))
    assert not rig.core.state.gateways["gw-01"].online


def test_gap_past_timeout_asks_for_rebirth(rig: Rig) -> None:
    rig.feed(rig.gw.data([sample("tank-1", "level", 2.0)]))
    rig.gw.seq += 3  # seqs 2..4 lost
    rig.feed(rig.gw.data([sample("tank-1", "level", 2.1)]))
    assert rig.core.tracker.gaps("gw-01") == [(2, 4)]
    start = rig.core.gap_since["gw-01"]
    assert rig.core.due_rebirths(start + 100) == []
    due = rig.core.due_rebirths(start + 600)
    assert [gw for gw, _ in due] == ["gw-01"]
    assert "3 seqs missing" in due[0][1]
    rig.core.note_rebirth("gw-01", start + 600)
    assert rig.core.due_rebirths(start + 700) == []  # rate limited
    # the late frames arrive: gap closed, nothing due any more
    for seq in (2, 3, 4):
        rig.feed(rig.gw.data([sample("tank-1", "level", 2.0)], seq=seq))
    assert rig.core.tracker.gaps("gw-01") == []
    assert rig.core.due_rebirths(start + 5000) == []


@pytest.mark.parametrize("flushed", [True, False], ids=["after-flush", "journal-only"])
def test_restart_restores_tracker_so_nothing_is_applied_twice(rig: Rig, flushed: bool) -> None:
    t = now_ms()
    frames = [rig.gw.data([sample("tank-1", "level", 2.0 + i / 10, t + i)]) for i in range(5)]
    rig.feed(frames[0])
    if flushed:
        rig.flush()  # tracker snapshot and current table now cover frame 1
    for message in frames[1:3]:
        rig.feed(message)
    rig.reopen()  # as after a crash: the later frames are only in the journal
    assert rig.core.tracker.ranges("gw-01") == [(1, 3)]
    assert rig.core.state.current[("tank-1", "level")].value == pytest.approx(2.2)
    outcome = rig.feed(*frames)  # the broker redelivers everything after a restart
    assert outcome.rejected == {"replay": 3}  # type: ignore[attr-defined]
    assert rig.count("SELECT count(*) FROM history") == 5
    assert rig.count("SELECT count(*) FROM (SELECT DISTINCT gateway, epoch, seq FROM frames)") == 5
    assert rig.core.state.current[("tank-1", "level")].value == pytest.approx(2.4)
    assert rig.core.state.gateways["gw-01"].frames == 5
    chain = verify_chain(rig.store.query("SELECT * FROM audit ORDER BY seq"))
    assert chain.ok, chain.problem


def test_failed_write_applies_and_acks_nothing(rig: Rig) -> None:
    message = rig.gw.data([sample("tank-1", "level", 2.0)])
    rig.store.con.close()  # the database is gone (as with a failed disk)
    outcome = rig.feed(message)
    assert outcome.error is not None
    assert outcome.ack_due == {}
    assert rig.core.state.current == {}
    assert rig.core.tracker.ranges("gw-01") == []
    assert rig.core.metrics.store_errors == 1
    rig.store, rig.core = _open(rig.config)  # database back: the resent frame is not a replay
    assert rig.feed(message).accepted  # type: ignore[attr-defined]


def test_undeclared_entities_are_stored_and_listed(rig: Rig) -> None:
    rig.feed(rig.gw.data([sample("mystery-9", "x", 1.0)]))
    rows = rig.store.query("SELECT type, declared FROM entities WHERE physical_id = 'mystery-9'")
    assert rows == [("undeclared", False)]
