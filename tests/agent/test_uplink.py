"""Outbox + uplink against a real Mosquitto and the acknowledging hub peer.

Samples enter through the batcher exactly as the sampler hands them over, so these
tests cover commit-before-publish, acks, the two lanes, reconnects and the downlink
checks without needing devices (the driver tests do that against the simulator).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.agent_env import AgentEnv
from support.broker import MosquittoBroker
from support.hub_env import wait_for
from support.hub_peer import HubPeer, death_of
from support.tls import TlsFiles, make_pki

from fieldtwin.agent.config import BrokerConfig
from fieldtwin.agent.outbox import AsyncOutbox, Outbox
from fieldtwin.agent.runtime import Batcher
from fieldtwin.agent.status import render_status
from fieldtwin.agent.uplink import Uplink
from fieldtwin.agent.util import now_ms
from fieldtwin.protocol.frames import FrameSigner, encode_frame
from fieldtwin.protocol.keys import KeyPair, KeyRegistry, load_private_key
from fieldtwin.protocol.messages import (
    Ack,
    Birth,
    DeviceLink,
    Heartbeat,
    HubState,
    PointMeta,
    Quality,
    Sample,
)
from fieldtwin.protocol.topics import HUB_STATE_TOPIC, downlink_topic

META = (PointMeta("tank-1", "level", "float64", "m"),)


@dataclass
class Pipeline:
    env: AgentEnv
    outbox: AsyncOutbox
    uplink: Uplink
    batcher: Batcher
    produced: list[Sample]

    def add(self, count: int) -> None:
        base = len(self.produced)
        for i in range(base, base + count):
            sample = Sample("tank-1", "level", float(i), 1_000_000 + i, Quality.GOOD)
            self.produced.append(sample)
            self.batcher.add(sample)


@contextlib.asynccontextmanager
async def pipeline(
    env: AgentEnv,
    *,
    backlog_rate: float = 50_000.0,
    ack_timeout_s: float = 60.0,
    tls_ca: Path | None = None,
    heartbeat_s: float | None = None,
    device_states: Any = None,
) -> AsyncIterator[Pipeline]:
    """With ``tls_ca``, the uplink uses the broker's TLS listener and trusts that CA."""
    key = load_private_key(env.gateway_key_path)
    outbox = AsyncOutbox(Outbox(env.state_dir / "outbox.duckdb", FrameSigner(env.gateway, key)))
    await outbox.open()
    tls_port = env.broker.tls_port if tls_ca else None
    broker = BrokerConfig(
        url=env.broker.tls_url if tls_ca else env.broker.url,
        host=env.broker.host,
        port=tls_port or env.broker.port,
        tls=tls_ca is not None,
        ca_file=tls_ca,
        username=env.gateway,
        password=env.password_file.read_text(),
        reconnect_min_s=0.1,
        reconnect_max_s=1.0,
        connect_timeout_s=5.0,
        publish_timeout_s=5.0,
    )

    async def no_commands(frame: object) -> None:
        raise AssertionError("no command expected")

    uplink = Uplink(
        gateway=env.gateway,
        broker=broker,
        outbox=outbox,
        hub_keys=KeyRegistry.of({"hub": env.hub_key.public}),
        birth_factory=lambda low_water: Birth(META, (), low_water, {"test": "yes"}),
        on_command=no_commands,
        backlog_samples_per_s=backlog_rate,
        ack_timeout_s=ack_timeout_s,
        heartbeat_s=heartbeat_s,
        device_states=device_states,
    )
    batcher = Batcher(outbox, uplink.committed, max_samples=200, flush_ms=20)
    tasks = [
        asyncio.create_task(uplink.run(), name="test-uplink"),
        asyncio.create_task(batcher.run(), name="test-batcher"),
    ]
    try:
        yield Pipeline(env, outbox, uplink, batcher, [])
    finally:
        await batcher.drain()
        uplink.stop()
        await asyncio.wait_for(tasks[0], 20)
        await asyncio.wait_for(tasks[1], 20)
        await outbox.close()


@pytest.fixture
def env(tmp_path: Path, broker: MosquittoBroker, request: pytest.FixtureRequest) -> AgentEnv:
    name = "gw-" + request.node.name.replace("test_", "")[:20].replace("_", "-").strip("-")
    return AgentEnv.create(tmp_path, name, broker)


def values_at(hub: HubPeer, gateway: str) -> list[float]:
    return [s.value for s in hub.gateways[gateway].samples]  # type: ignore[misc]


def assert_exactly_once(hub: HubPeer, gateway: str, produced: list[Sample]) -> None:
    view = hub.gateways[gateway]
    assert len(view.applied) == len(set(view.applied)), "a frame was applied twice"
    assert sorted(values_at(hub, gateway)) == [s.value for s in produced]


async def test_samples_flow_and_acks_empty_the_outbox(
    env: AgentEnv, broker: MosquittoBroker
) -> None:
    async with HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub:
        async with pipeline(env) as pipe:
            await hub.wait_for(lambda: len(hub.gateways[env.gateway].births) == 1, what="birth")
            pipe.add(1000)
            await hub.wait_for(
                lambda: len(hub.gateways[env.gateway].samples) == 1000, what="1000 samples"
            )
            await hub.wait_for(lambda: not pipe.outbox.sync.unacked(), what="outbox emptied")
            assert_exactly_once(hub, env.gateway, pipe.produced)
            birth = hub.gateways[env.gateway].births[0]
            assert isinstance(birth.body, Birth)
            assert birth.body.points == META
            assert birth.seq == 1
            assert birth.body.low_water == 1
            assert pipe.uplink.stats.published_samples >= 1000
            assert pipe.outbox.sync.counters.acked_samples == 1000
        # a clean stop says goodbye with a death naming the birth it ends
        await hub.wait_for(lambda: bool(hub.gateways[env.gateway].deaths), what="death")
        death = death_of(hub.gateways[env.gateway].deaths[-1])
        assert death.birth_seq == birth.seq
        assert death.reason == "shutdown"


async def test_broker_restart_mid_stream_loses_nothing(
    env: AgentEnv, broker: MosquittoBroker
) -> None:
    async with (
        HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub,
        pipeline(env) as pipe,
    ):
        if True:
            await hub.wait_for(lambda: pipe.uplink.connected, what="agent connected")

            async def produce(seconds: float) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    pipe.add(20)
                    await asyncio.sleep(0.02)

            await produce(1.0)
            broker.stop()
            await produce(1.5)  # committed while the broker is gone
            assert not pipe.uplink.connected
            broker.start()
            await produce(1.0)
            await hub.wait_for(
                lambda: len(hub.gateways[env.gateway].samples) >= len(pipe.produced),
                45,
                what="every sample after the restart",
            )
            await hub.wait_for(lambda: not pipe.outbox.sync.unacked(), 30, what="all acked")
            assert_exactly_once(hub, env.gateway, pipe.produced)
            assert pipe.uplink.stats.connects >= 2
            assert len(hub.gateways[env.gateway].births) >= 2


async def test_backlog_drains_on_its_own_lane_while_live_goes_first(
    env: AgentEnv, broker: MosquittoBroker
) -> None:
    hub = HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key)
    async with pipeline(env, backlog_rate=2_000.0) as pipe:
        pipe.add(8_000)  # nobody to ack: this becomes backlog
        await hub.start()
        try:
            await hub.wait_for(
                lambda: len(hub.gateways[env.gateway].samples) >= 8_000,
                30,
                what="backlog delivered",
            )
            # Force a reconnect so everything unacknowledged is backlog for the session.
            hub.acking = False
            pipe.add(6_000)
            await hub.wait_for(
                lambda: len(hub.gateways[env.gateway].samples) >= 14_000, 30, what="live"
            )
            first_backlog = len(hub.gateways[env.gateway].applied)
            broker.restart()
            hub.acking = True
            await hub.wait_connected()
            for _ in range(10):  # live data during the bounded-rate drain
                pipe.add(10)
                await asyncio.sleep(0.1)
            await hub.wait_for(lambda: not pipe.outbox.sync.unacked(), 60, what="drained")
        finally:
            await hub.stop()
    view = hub.gateways[env.gateway]
    assert_exactly_once(hub, env.gateway, pipe.produced)
    assert view.duplicates > 0  # the backlog resent frames the hub already had
    assert pipe.uplink.stats.backlog_frames > 0
    # Live frames (highest seqs) arrived while backlog frames were still draining.
    after = [seq for _, seq in view.applied[first_backlog:]]
    live = [seq for seq in after if seq > max(after) - 10]
    assert live
    assert min(after.index(s) for s in live) < len(after) - len(live)


async def test_rebirth_and_new_hub_instance_bring_a_birth(
    env: AgentEnv, broker: MosquittoBroker
) -> None:
    async with HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub:
        async with pipeline(env) as pipe:
            view = hub.gateways[env.gateway]
            await hub.wait_for(lambda: len(view.births) == 1, what="first birth")
            await hub.send_rebirth(env.gateway, "gap at 7")
            await hub.wait_for(lambda: len(view.births) == 2, what="birth after rebirth")
            assert pipe.uplink.stats.rebirths == 1
            await hub.restart(new_instance=True)
            await hub.wait_for(lambda: len(hub.gateways[env.gateway].births) >= 3, what="birth")
            pipe.add(10)
            await hub.wait_for(lambda: not pipe.outbox.sync.unacked(), what="acked")
            births = hub.gateways[env.gateway].births
            seqs = [frame.seq for frame in births]
            assert seqs == sorted(set(seqs))  # every birth took a fresh seq
            # ...but all belong to the connection the first one opened, which the will names
            first = births[0]
            assert isinstance(first.body, Birth)
            assert first.body.session == 0
            for later in births[1:]:
                assert isinstance(later.body, Birth)
                assert later.body.session == first.seq
        # the goodbye names that connection too, not the latest rebirth
        await hub.wait_for(lambda: bool(hub.gateways[env.gateway].deaths), what="death")
        assert death_of(hub.gateways[env.gateway].deaths[-1]).birth_seq == first.seq


async def test_forged_foreign_and_stale_downlink_is_refused(
    env: AgentEnv, broker: MosquittoBroker
) -> None:
    hub = HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key, ack=False)
    async with hub, pipeline(env) as pipe:
        await hub.wait_for(lambda: pipe.uplink.connected, what="connected")
        pipe.add(50)
        await hub.wait_for(lambda: len(hub.gateways[env.gateway].samples) == 50, what="samples")
        held = pipe.outbox.sync.unacked()
        assert held
        epoch = pipe.outbox.sync.epoch
        everything = ((1, 10_000),)
        topic = downlink_topic(env.gateway, "ack")
        impostor = KeyPair.generate()
        forged = [
            encode_frame(impostor, "hub", 1, 1, 1, Ack(env.gateway, epoch, everything)),
            encode_frame(env.hub_key, "hub", 1, 2, 1, Ack("gw-other", epoch, everything)),
            encode_frame(env.hub_key, "hub", 1, 3, 1, Ack(env.gateway, epoch - 1, everything)),
            b"\x93not a frame",
        ]
        for payload in forged:
            await hub.publish(topic, payload)
        rejected = pipe.uplink.stats.rejected
        await hub.wait_for(lambda: sum(rejected.values()) == 4, what="four rejections")
        assert rejected == {
            "unknown_key": 1,
            "wrong_recipient": 1,
            "other_epoch": 1,
            "not_msgpack": 1,
        }
        assert pipe.outbox.sync.unacked() == held  # nothing was let go
        await hub.send_ack(env.gateway)  # the genuine one
        await hub.wait_for(lambda: not pipe.outbox.sync.unacked(), what="genuine ack")


async def test_unacknowledged_frames_are_resent_after_the_ack_timeout(
    env: AgentEnv, broker: MosquittoBroker
) -> None:
    hub = HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key, ack=False)
    async with hub, pipeline(env, ack_timeout_s=1.0) as pipe:
        await hub.wait_for(lambda: pipe.uplink.connected, what="connected")
        pipe.add(30)
        view = hub.gateways[env.gateway]
        await hub.wait_for(lambda: view.duplicates > 0, 30, what="a resend")
        assert pipe.uplink.stats.resent_frames > 0
        hub.acking = True
        await hub.send_ack(env.gateway)
        await hub.wait_for(lambda: not pipe.outbox.sync.unacked(), what="acked")
        assert_exactly_once(hub, env.gateway, pipe.produced)


async def test_unsigned_forged_and_replayed_hub_states_are_refused(
    env: AgentEnv, broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Agents act on the hub state (a new session makes them resend everything), so
    they believe only a signed state of a later session: counted, logged sparingly."""
    hub = HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key)
    async with hub, pipeline(env) as pipe:
        view = hub.gateways[env.gateway]
        stats = pipe.uplink.stats
        await hub.wait_for(lambda: len(view.births) == 1, what="first birth")
        await hub.wait_for(lambda: stats.hub_online is True, what="hub online")
        first_session = stats.hub_session
        old_online = hub._online_state
        unsigned = json.dumps({"online": True, "ts_ms": 1, "instance": "evil"}).encode()
        forged = encode_frame(
            KeyPair.generate(), "hub", hub.epoch, 10**9, 1, HubState(True, "evil")
        )
        with caplog.at_level(logging.INFO, logger="fieldtwin.agent.uplink"):
            for _ in range(100):
                await hub.publish(HUB_STATE_TOPIC, unsigned)
            await hub.publish(HUB_STATE_TOPIC, forged)
            await hub.wait_for(lambda: stats.hub_state_rejected == 101, what="refusals")
        assert stats.rejected == {"hub_state_not_msgpack": 100, "hub_state_unknown_key": 1}
        lines = [r for r in caplog.records if r.getMessage() == "downlink frame rejected"]
        assert 2 <= len(lines) <= 2 * 3  # at most 3 a minute per reason
        assert len(view.births) == 1  # nothing was acted on
        assert stats.hub_session == first_session
        # a genuine new session of the hub: birth and resend
        await hub.restart(new_instance=False)
        await hub.wait_for(lambda: len(view.births) == 2, what="birth for the new session")
        assert stats.hub_session > first_session
        # the old session's online state, replayed live: refused, no birth
        await hub.publish(HUB_STATE_TOPIC, old_online)
        await hub.wait_for(lambda: stats.rejected["hub_state_replay"] == 1, what="replay")
        pipe.add(5)
        await hub.wait_for(lambda: not pipe.outbox.sync.unacked(), what="acked")
        assert len(view.births) == 2
        assert stats.hub_online is True


async def test_without_acks_resends_back_off_and_status_says_since_when(
    env: AgentEnv, broker: MosquittoBroker
) -> None:
    hub = HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key, ack=False)
    async with hub, pipeline(env, ack_timeout_s=1.0) as pipe:
        await hub.wait_for(lambda: pipe.uplink.connected, what="connected")
        started = time.monotonic()
        before_ms = now_ms()
        pipe.add(30)
        stats = pipe.uplink.stats
        await hub.wait_for(lambda: stats.resend_rounds >= 3, 90, what="three resend rounds")
        elapsed = time.monotonic() - started
        # 1 s, then 2 s, then 4 s (±10 %): without backoff three rounds take about 3 s
        assert elapsed >= 0.9 * (1 + 2 + 4)
        await hub.wait_for(lambda: stats.resend_interval_s >= 8.0, what="the wait doubled")
        since = stats.no_ack_since_ms
        assert since is not None
        assert before_ms <= since <= now_ms()
        shown = render_status(
            {"uplink": stats.as_dict(), "buffer": {"frames": len(pipe.outbox.sync.unacked())}},
            live=True,
        )
        assert "NO HUB HAS ACKNOWLEDGED since" in shown
        assert "frames waiting, resent after 8 s" in shown
        hub.acking = True
        await hub.send_ack(env.gateway)
        await hub.wait_for(lambda: not pipe.outbox.sync.unacked(), what="acked")
        assert stats.no_ack_since_ms is None
        assert stats.last_ack_ms is not None
        shown = render_status({"uplink": stats.as_dict(), "buffer": {}}, live=True)
        assert "last ack from the hub" in shown
        assert_exactly_once(hub, env.gateway, pipe.produced)


async def test_heartbeats_carry_device_states_and_name_the_connection(
    env: AgentEnv, broker: MosquittoBroker
) -> None:
    states = (DeviceLink("plc", True, 5), DeviceLink("boiler", False, 7, "connection refused"))
    hub = HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key)
    async with hub, pipeline(env, heartbeat_s=0.5, device_states=lambda: states) as pipe:
        view = hub.gateways[env.gateway]
        await hub.wait_for(lambda: len(view.heartbeats) >= 3, what="three heartbeats")
        beats = [frame.body for frame in view.heartbeats]
        assert all(isinstance(b, Heartbeat) for b in beats)
        assert [b.beat for b in beats] == sorted({b.beat for b in beats})  # counting up
        assert {b.session for b in beats} == {view.births[0].seq}
        assert beats[-1].devices == states
        assert beats[-1].interval_ms == 500
        assert all(frame.seq == 0 for frame in view.heartbeats)
        assert pipe.outbox.sync.unacked() == []  # nothing stored or waiting for an ack


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, TlsFiles]]:
    # the generator's CA and server certificate; gateways log in with a password only
    instance = MosquittoBroker(tmp_path / "mosquitto-tls", tls=True, require_client_certs=False)
    instance.start()
    try:
        yield instance, instance.tls_files
    finally:
        instance.stop()


async def test_uplink_over_tls_verifies_the_broker_and_delivers(
    tmp_path: Path, tls_broker: tuple[MosquittoBroker, TlsFiles]
) -> None:
    broker, pki = tls_broker
    env = AgentEnv.create(tmp_path / "gw", "gw-tls", broker)
    # the hub peer uses the plain listener; the gateway speaks TLS to the same broker
    async with HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub:
        async with pipeline(env, tls_ca=pki.ca_file) as pipe:
            pipe.add(500)
            counters = pipe.outbox.sync.counters
            await hub.wait_for(lambda: counters.acked_samples == 500, what="acked over TLS")
            assert pipe.uplink.stats.connects == 1
        assert_exactly_once(hub, env.gateway, pipe.produced)


async def test_uplink_refuses_a_broker_its_ca_did_not_sign(
    tmp_path: Path, tls_broker: tuple[MosquittoBroker, TlsFiles]
) -> None:
    broker, _ = tls_broker
    stranger = make_pki(tmp_path / "other-pki", ca_name="some other CA")
    env = AgentEnv.create(tmp_path / "gw", "gw-tls-bad", broker)
    async with pipeline(env, tls_ca=stranger.ca_file) as pipe:
        pipe.add(10)
        await wait_for(lambda: pipe.uplink.stats.connect_failures >= 2, within=20)
        assert pipe.uplink.stats.connects == 0
        assert pipe.uplink.stats.connect_failures >= 2
        assert "certificate" in pipe.uplink.stats.last_error.lower()
        # nothing is lost while the broker cannot be trusted: the samples stay buffered
        sync = pipe.outbox.sync
        assert sum(sync.row_samples(seq) for seq in sync.unacked()) == 10
