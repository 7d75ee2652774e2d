"""History is exactly-once per sample, whatever order births, data and backfill arrive in.

A model agent commits samples into data frames (its outbox), drops the oldest frames
when its buffer overflows, publishes frames in any order and any number of times
(live and backfill interleaved, resends after a missed ack), and sends births carrying
the last committed sample of each point with the seq of its data frame, in one frame
or in parts; any frame in flight may be lost (a lost birth part: that birth is never
applied). The hub's real
ingest core, on a real DuckDB file, takes random batches of what is in flight, and is
restarted at random (with or without flushing). At the end the agent reconnects (a birth
and every unacknowledged frame), and the hub must hold:

- every sample once at most in history;
- every sample of a frame that was not dropped, and nothing that was never committed;
- a current state equal to the newest history sample of each attribute.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.hub_env import GatewaySigner, now_ms, write_hub_config

from fieldtwin.hub.audit import AuditChain
from fieldtwin.hub.config import HubConfig, load_hub_config
from fieldtwin.hub.ingest import Inbound, IngestCore
from fieldtwin.hub.metrics import HubMetrics
from fieldtwin.hub.state import precedence
from fieldtwin.hub.store import SyncWrite, TwinStore
from fieldtwin.protocol.messages import Birth, Data, Quality, Sample
from fieldtwin.protocol.topics import uplink_topic

POINTS = (("tank-1", "level"), ("tank-1", "temp"), ("pump-1", "speed"))


@dataclass
class ModelAgent:
    """Just enough of an agent: outbox, overflow drops, births with committed state."""

    signer: GatewaySigner
    ts: int
    next_seq: int = 1
    outbox: dict[int, tuple[Sample, ...]] = field(default_factory=dict)
    committed: dict[tuple[str, str], tuple[Sample, int]] = field(default_factory=dict)
    dropped: set[int] = field(default_factory=set)
    frames: dict[int, tuple[Sample, ...]] = field(default_factory=dict)

    def commit(self, points: list[int], bad: list[bool]) -> None:
        samples = []
        for index, is_bad in zip(points, bad, strict=True):
            entity, attribute = POINTS[index]
            self.ts += 7
            if is_bad:
                samples.append(Sample(entity, attribute, None, self.ts, Quality.BAD))
            else:
                value = float(self.ts % 997)
                samples.append(Sample(entity, attribute, value, self.ts, Quality.GOOD))
        seq = self.next_seq
        self.next_seq += 1
        self.outbox[seq] = self.frames[seq] = tuple(samples)
        for sample in samples:
            self.committed[(sample.entity, sample.attribute)] = (sample, seq)

    def drop_oldest(self) -> None:
        if self.outbox:
            seq = min(self.outbox)
            del self.outbox[seq]
            self.dropped.add(seq)

    def data(self, seq: int) -> tuple[str, bytes]:
        body = Data.of(self.frames[seq])
        return uplink_topic("gw-01", "data"), self.signer.signer.encode(
            self.signer.epoch, seq, now_ms(), body
        )

    def birth(self, parts: int = 1) -> list[tuple[str, bytes]]:
        """A birth in ``parts`` frames (fewer if there are fewer samples), seqs in a row."""
        seq = self.next_seq
        low_water = min(self.outbox, default=seq)
        held = list(self.committed.values())
        count = max(1, min(parts, len(held)))
        chunks = [held[i::count] for i in range(count)]
        self.next_seq += count
        out = []
        for number, chunk in enumerate(chunks):
            body = Birth(
                (),
                tuple(sample for sample, _ in chunk),
                low_water,
                {"agent": "model"},
                state_seqs=tuple(frame for _, frame in chunk),
                part=number,
                parts=count,
                first=0 if number == 0 else seq,
            )
            out.append(
                (
                    uplink_topic("gw-01", "birth"),
                    self.signer.signer.encode(self.signer.epoch, seq + number, now_ms(), body),
                )
            )
        return out

    def acked(self, core: IngestCore) -> None:
        for first, last in core.tracker.ranges("gw-01", self.signer.epoch):
            for seq in [s for s in self.outbox if first <= s <= last]:
                del self.outbox[seq]


@dataclass
class Hub:
    config: HubConfig
    store: TwinStore
    core: IngestCore

    @classmethod
    def open(cls, config: HubConfig) -> Hub:
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
        return cls(config, store, core)

    def process(self, messages: list[tuple[str, bytes]]) -> None:
        stamp = now_ms()
        outcome = self.core.process([Inbound(t, p, stamp) for t, p in messages])
        assert outcome.error is None

    def flush(self) -> None:
        plan = self.core.flush_plan()
        if plan is not None:
            self.store.write_sync(SyncWrite(flush=plan))
            self.core.flushed(plan)

    def restart(self, flush: bool) -> Hub:
        if flush:
            self.flush()
        self.store.close()
        return Hub.open(self.config)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exactly-once")


RUNS = itertools.count()
OPS = st.sampled_from(
    ["commit", "commit", "send", "send", "birth", "process", "drop", "restart", "lose"]
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_history_is_exactly_once_whatever_the_order(base: Path, data: st.DataObject) -> None:
    folder = base / f"run-{next(RUNS)}"
    files = write_hub_config(folder)
    config = load_hub_config(files.config)
    hub = Hub.open(config)
    agent = ModelAgent(GatewaySigner("gw-01", files.gateway_keys["gw-01"]), ts=now_ms() - 60_000)
    in_flight: list[tuple[str, bytes]] = []
    try:
        for op in data.draw(st.lists(OPS, min_size=5, max_size=30), label="ops"):
            if op == "commit":
                count = data.draw(st.integers(1, 4), label="samples")
                points = data.draw(st.lists(st.integers(0, 2), min_size=count, max_size=count))
                bad = data.draw(st.lists(st.booleans(), min_size=count, max_size=count))
                agent.commit(points, bad)
            elif op == "send" and agent.outbox:
                seq = data.draw(st.sampled_from(sorted(agent.outbox)), label="send seq")
                in_flight.append(agent.data(seq))
            elif op == "birth":
                in_flight.extend(agent.birth(data.draw(st.integers(1, 3), label="parts")))
            elif op == "lose" and in_flight:
                # lost in transit: a data frame is resent from the outbox at the end; a
                # lost birth part means that birth is never applied
                in_flight.pop(data.draw(st.integers(0, len(in_flight) - 1), label="lost"))
            elif op == "drop":
                agent.drop_oldest()
            elif op == "process" and in_flight:
                order = data.draw(st.permutations(in_flight), label="arrival order")
                taken = data.draw(st.integers(1, len(order)), label="batch")
                hub.process(list(order[:taken]))
                in_flight = list(order[taken:])
                agent.acked(hub.core)
            elif op == "restart":
                hub = hub.restart(flush=data.draw(st.booleans(), label="flush first"))
        # Reconnect: a birth, then everything unacknowledged; whatever was in flight
        # arrives too (late), in any order.
        parts = data.draw(st.integers(1, 3), label="final parts")
        final = [*agent.birth(parts), *(agent.data(seq) for seq in sorted(agent.outbox))]
        hub.process(final)
        if in_flight:
            hub.process(list(data.draw(st.permutations(in_flight), label="late")))
        hub = hub.restart(flush=data.draw(st.booleans(), label="flush at the end"))

        rows = hub.store.query(
            "SELECT entity, attribute, ts_ms, quality, num FROM history ORDER BY ts_ms"
        )
        keys = [(e, a, ts) for e, a, ts, _, _ in rows]
        assert len(keys) == len(set(keys)), "a sample is stored twice"
        committed = {
            (s.entity, s.attribute, s.ts_ms): s for frame in agent.frames.values() for s in frame
        }
        assert set(keys) <= set(committed), "history holds a sample that was never committed"
        kept = {
            (s.entity, s.attribute, s.ts_ms)
            for seq, frame in agent.frames.items()
            if seq not in agent.dropped
            for s in frame
        }
        assert kept <= set(keys), "a sample of a frame that was not dropped is missing"
        newest: dict[tuple[str, str], Sample] = {}
        for entity, attribute, ts, _, _ in rows:
            sample = committed[(entity, attribute, ts)]
            held = newest.get((entity, attribute))
            if held is None or precedence(ts, sample.quality, sample.value) > precedence(
                held.ts_ms, held.quality, held.value
            ):
                newest[(entity, attribute)] = sample
        current = {
            key: (value.value, value.ts_ms, value.quality)
            for key, value in hub.core.state.current.items()
        }
        assert current == {key: (s.value, s.ts_ms, int(s.quality)) for key, s in newest.items()}, (
            "current state is not the newest history sample"
        )
    finally:
        hub.store.close()
