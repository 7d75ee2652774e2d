"""Births in parts, heartbeats and rejection floods through the real ingest core."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.hub_env import GatewaySigner, now_ms, point, sample, write_hub_config

from fieldtwin.hub.audit import AuditChain
from fieldtwin.hub.config import HubConfig, load_hub_config
from fieldtwin.hub.drift import DriftEngine
from fieldtwin.hub.ingest import Inbound, IngestCore, IngestOutcome
from fieldtwin.hub.metrics import HubMetrics
from fieldtwin.hub.store import TwinStore
from fieldtwin.protocol.keys import KeyPair
from fieldtwin.protocol.messages import DeviceLink

POINTS = 3000
LIMIT = 64 * 1024  # small frames, so a 3,000-point birth needs several parts


class Rig:
    def __init__(self, config: HubConfig, gw: GatewaySigner) -> None:
        self.config = config
        self.gw = gw
        self.open()

    def open(self) -> None:
        self.store = TwinStore.open(self.config.database, memory_limit="256MB", threads=1)
        state, tracker = self.store.load_state()
        self.core = IngestCore(
            self.config,
            self.store,
            state,
            tracker,
            self.config.registry(),
            AuditChain(*self.store.audit_head()),
            HubMetrics(),
            next_frame_id=self.store.next_ids()["frame"],
        )

    def feed(self, *messages: tuple[str, bytes]) -> IngestOutcome:
        stamp = now_ms()
        outcome = self.core.process([Inbound(t, p, stamp) for t, p in messages])
        assert outcome.error is None
        return outcome

    def count(self, sql: str) -> int:
        return int(self.store.query(sql)[0][0])

    @property
    def link(self):  # type: ignore[no-untyped-def]
        return self.core.state.gateways.get("gw-01")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    files = write_hub_config(tmp_path)
    config = load_hub_config(files.config)
    rig = Rig(config, GatewaySigner("gw-01", files.gateway_keys["gw-01"]))
    yield rig
    rig.store.close()


def big_points(count: int = POINTS) -> list:  # type: ignore[type-arg]
    return [point(f"plc-{i // 100}", f"r{i % 100}", "uint16", device="plc") for i in range(count)]


def test_a_birth_in_parts_applies_once_when_its_last_part_arrives(rig: Rig) -> None:
    t = now_ms()
    data = rig.gw.data([sample("plc-0", "r0", 1.0, t)])
    parts = rig.gw.birth_parts(
        big_points(),
        [sample("plc-0", "r0", 1.0, t), sample("plc-29", "r99", 5.0, t)],
        low_water=2,
        max_frame_bytes=LIMIT,
        state_seqs=[1, 1],
    )
    assert len(parts) >= 3
    first_seq = rig.gw.session
    order = list(parts)
    random.Random(7).shuffle(order)
    rig.feed(data, *order[:-1])  # every part but one, in any order
    assert rig.core.state.points == {}
    assert rig.link.birth_seq == 0
    assert rig.core.tracker.ranges("gw-01") == [(1, 1)]  # held parts are not delivered
    assert rig.count("SELECT count(*) FROM frames WHERE kind = 'birth'") == 0
    outcome = rig.feed(order[-1])
    assert outcome.births == ["gw-01"]
    assert len(rig.core.state.points) == POINTS
    assert rig.core.state.points[("plc-3", "r7")].device == "plc"
    assert (rig.link.birth_seq, rig.link.session, rig.link.online) == (first_seq, first_seq, True)
    assert rig.core.tracker.ranges("gw-01") == [(1, rig.gw.seq)]
    assert rig.count("SELECT count(*) FROM frames WHERE kind = 'birth'") == len(parts)
    assert rig.count("SELECT count(*) FROM audit WHERE action = 'birth'") == 1
    assert rig.count("SELECT count(*) FROM points") == POINTS
    # the sample from data frame 1 is in history once, the birth did not repeat it
    assert rig.count("SELECT count(*) FROM history") == 1
    assert rig.core.state.current[("plc-29", "r99")].value == 5.0


def test_a_repeated_part_is_a_replay_and_a_disagreeing_part_is_refused(rig: Rig) -> None:
    parts = rig.gw.birth_parts(big_points(), max_frame_bytes=LIMIT)
    outcome = rig.feed(parts[0], parts[0])
    assert outcome.rejected == {"replay": 1}
    assert rig.core.pending_births["gw-01"].received.keys() == {0}
    rig.feed(*parts[1:])
    assert len(rig.core.state.points) == POINTS
    assert rig.feed(parts[1]).rejected == {"replay": 1}  # delivered now: a plain replay


def test_a_lost_part_means_no_birth_a_rebirth_request_and_no_lasting_gap(rig: Rig) -> None:
    parts = rig.gw.birth_parts(big_points(), max_frame_bytes=LIMIT)
    rig.feed(*parts[:-1])
    assert rig.link is None or not rig.link.online
    later = now_ms() + 10_000
    due = rig.core.due_rebirths(later)
    assert len(due) == 1
    gateway, reason = due[0]
    assert gateway == "gw-01"
    assert f"{len(parts) - 1} of {len(parts)} parts arrived" in reason
    # the rebirth: a complete birth supersedes the incomplete one, whose parts are
    # stored as delivered (never applied); the lost one is below the new birth's low
    # water (the agent holds nothing), so no seq is left missing
    again = rig.gw.birth_parts(big_points(), low_water=rig.gw.seq + 1, max_frame_bytes=LIMIT)
    rig.feed(*again)
    assert rig.link.online
    assert rig.link.birth_seq == rig.gw.session
    assert rig.core.pending_births == {}
    assert rig.core.tracker.gaps("gw-01") == []
    assert rig.count("SELECT count(*) FROM frames WHERE kind = 'birth'") == 2 * len(parts) - 1
    assert rig.count("SELECT count(*) FROM audit WHERE action = 'birth'") == 1


def test_a_late_part_of_an_older_birth_is_stored_but_not_applied(rig: Rig) -> None:
    old = rig.gw.birth_parts(big_points(10), max_frame_bytes=LIMIT)
    new = rig.gw.birth_parts(big_points(POINTS), max_frame_bytes=LIMIT, rebirth=True)
    rig.feed(*new)
    rig.feed(*old)
    assert rig.link.birth_seq == rig.gw.birth_seq
    assert len(rig.core.state.points) == POINTS
    assert rig.count("SELECT count(*) FROM audit WHERE action = 'birth'") == 1
    assert rig.core.tracker.gaps("gw-01") == []


def test_the_death_of_a_connection_whose_birth_is_arriving_ends_it(rig: Rig) -> None:
    rig.feed(rig.gw.birth([point("tank-1", "level")]))
    assert rig.link.online
    parts = rig.gw.birth_parts(big_points(), max_frame_bytes=LIMIT)  # a new connection
    rig.feed(*parts[:2])
    outcome = rig.feed(rig.gw.death())  # names the new connection's session
    assert outcome.deaths == ["gw-01"]
    assert not rig.link.online
    assert rig.core.pending_births == {}
    rig.feed(*parts[2:])  # late parts of the dead connection change nothing
    assert not rig.link.online
    assert rig.core.pending_births == {}
    assert rig.core.tracker.gaps("gw-01") == []


def test_orphans_of_a_birth_in_parts_reach_history_exactly_once(rig: Rig) -> None:
    t = now_ms() - 1000
    # frames 1-3 were dropped by the agent's overflow policy: the birth is their only way
    samples = [sample(f"plc-{i // 100}", f"r{i % 100}", float(i), t + i) for i in range(POINTS)]
    seqs = [1 + i % 3 for i in range(POINTS)]
    rig.gw.seq = 3
    first = rig.gw.birth_parts(
        big_points(), samples, low_water=4, max_frame_bytes=LIMIT, state_seqs=seqs
    )
    rig.feed(*first)
    assert rig.count("SELECT count(*) FROM history") == POINTS
    again = rig.gw.birth_parts(
        big_points(), samples, low_water=4, max_frame_bytes=LIMIT, state_seqs=seqs, rebirth=True
    )
    rig.feed(*again)
    assert rig.count("SELECT count(*) FROM history") == POINTS


def test_heartbeats_of_the_live_connection_only_and_in_order(rig: Rig) -> None:
    stale = rig.feed(rig.gw.heartbeat(1, session=1))
    assert stale.rejected == {"stale_heartbeat": 1}  # no connection yet
    rig.feed(rig.gw.birth([point("tank-1", "level", device="plc")]))
    ok = rig.feed(
        rig.gw.heartbeat(1), rig.gw.heartbeat(2, [DeviceLink("plc", False, 5, "refused")])
    )
    assert ok.rejected == {}
    assert ok.ack_due == {}  # never acknowledged
    beat = rig.core.state.heartbeats["gw-01"]
    assert (beat.beat, beat.session) == (2, rig.gw.session)
    assert beat.down() == {"plc": DeviceLink("plc", False, 5, "refused")}
    replay = rig.feed(rig.gw.heartbeat(2), rig.gw.heartbeat(1))
    assert replay.rejected == {"stale_heartbeat": 2}
    old = rig.feed(rig.gw.heartbeat(9, session=rig.gw.session + 5))
    assert old.rejected == {"stale_heartbeat": 1}
    assert rig.count("SELECT count(*) FROM frames WHERE kind = 'heartbeat'") == 0
    assert rig.core.tracker.gaps("gw-01") == []


def test_an_alive_gateway_with_a_dead_device_is_not_silent(rig: Rig) -> None:
    """The seeds' distinction: heartbeats keep the gateway alive; its dead device's
    entities get ``temporal.device_down``, not ``gateway_silent`` or per-sensor staleness."""
    t0 = now_ms()
    rig.feed(
        rig.gw.birth(
            [
                point("tank-1", "level", device="plc"),
                point("tank-1", "temp", device="plc"),
                point("pump-1", "speed", device="drive"),
            ],
            [sample("tank-1", "level", 2.0, t0), sample("tank-1", "temp", 20.0, t0)],
        )
    )
    config = rig.config
    engine = DriftEngine(config.schema, config.drift, config.reconciliation, ["gw-01"], t0)
    silent_ms = round(config.drift.gateway_silent_s * 1000)
    later = t0 + silent_ms + 2000
    report = engine.evaluate(rig.core.state, later)  # no heartbeat: silent
    assert "gw-01" in report.silent_gateways
    rig.core.state.heartbeats.clear()
    rig.feed(
        rig.gw.heartbeat(
            1, [DeviceLink("plc", False, t0, "connection refused"), DeviceLink("drive", True, t0)]
        )
    )
    beat = rig.core.state.heartbeats["gw-01"]
    report = engine.evaluate(rig.core.state, beat.received_ms + silent_ms - 100)
    assert report.silent_gateways == set()
    found = {(f.rule, f.entity, f.attribute) for f in report.findings}
    assert ("temporal.device_down", "tank-1", "") in found
    assert not any(f.rule == "temporal.gateway_silent" for f in report.findings)
    assert not any(
        f.rule == "temporal.sensor_stale" and f.entity == "tank-1" for f in report.findings
    )
    down = next(f for f in report.findings if f.rule == "temporal.device_down")
    assert down.severity == "critical"
    assert "connection refused" in down.description
    assert down.detail["attributes"] == ["level", "temp"]
    assert report.health["tank-1"] == "stale"
    # the heartbeats stop: the gateway is silent again, and says so instead
    report = engine.evaluate(rig.core.state, beat.received_ms + silent_ms + 1000)
    assert report.silent_gateways == {"gw-01"}
    assert not any(f.rule == "temporal.device_down" for f in report.findings)


def test_a_flood_of_bad_frames_logs_a_bounded_number_of_lines_and_counts_exactly(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.feed(rig.gw.birth([point("tank-1", "level")]))
    data = rig.gw.data([sample("tank-1", "level", 1.0)])
    rig.feed(data)
    forger = GatewaySigner("gw-01", KeyPair.generate(), epoch=rig.gw.epoch)
    forged = [forger.data([sample("tank-1", "level", 9.0)]) for _ in range(20)]
    flood = 0
    with caplog.at_level(logging.INFO, logger="fieldtwin.hub.ingest"):
        for _ in range(50):
            messages = [
                *forged,
                data,
                ("ft/v1/gw-01/up/nonsense", b"x"),
                ("ft/v1/gw-02/up/data", b"\xc1"),
            ]
            flood += len(messages)
            rig.feed(*messages)
        lines = [r for r in caplog.records if r.name == "fieldtwin.hub.ingest"]
    metrics = rig.core.metrics
    assert metrics.frames_rejected["unknown_key"] == 50 * 20
    assert metrics.frames_rejected["replay"] == 50
    assert metrics.frames_rejected["bad_topic"] == 50
    assert metrics.frames_rejected["not_msgpack"] == 50
    assert sum(metrics.frames_rejected.values()) == flood
    # 4 (gateway, reason) keys x 3 lines each; summaries come when the minute is over
    assert len(lines) <= 4 * 3
    replay_lines = [r for r in lines if "replay" in r.getMessage() or r.levelno == logging.INFO]
    assert all(r.levelno == logging.INFO for r in replay_lines)
    rig.core.reject_log.clock = lambda: float("inf")
    with caplog.at_level(logging.INFO, logger="fieldtwin.hub.ingest"):
        caplog.clear()
        assert rig.core.reject_log.flush() == 4
        summaries = caplog.records
    assert len(summaries) == 4
    assert rig.core.reject_log.suppressed == flood - len(lines)
