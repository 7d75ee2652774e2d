"""The agent as a real process, killed with SIGKILL mid-stream and started again."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import duckdb
import pytest
from support.agent_env import AgentEnv, devices_from_example
from support.broker import MosquittoBroker
from support.hub_peer import HubPeer, death_of
from support.sim import SimProcess

from fieldtwin.agent.status import read_status
from fieldtwin.protocol.frames import decode_frame
from fieldtwin.protocol.keys import KeyRegistry
from fieldtwin.protocol.messages import Birth, Data, Sample

AGENT = [sys.executable, "-c", "from fieldtwin.protocol.cli import main; raise SystemExit(main())"]


async def start_agent(config: Path, log: Path) -> asyncio.subprocess.Process:
    handle = log.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            *AGENT, "agent", "run", "-c", str(config), stdout=handle, stderr=handle
        )
    finally:
        handle.close()


def held_frames(buffer: Path, registry: KeyRegistry) -> dict[int, list[Sample]]:
    """What the dead agent left in its buffer, read the way the hub would read it."""
    db = duckdb.connect(str(buffer), read_only=True)
    try:
        rows = db.execute("SELECT seq, frame FROM frames WHERE kind = 'data'").fetchall()
    finally:
        db.close()
    held: dict[int, list[Sample]] = {}
    for seq, frame in rows:
        decoded = decode_frame(bytes(frame), registry)
        assert decoded.seq == seq
        assert isinstance(decoded.body, Data)
        held[seq] = list(decoded.body.samples)
    return held


@pytest.fixture
def env(tmp_path: Path, broker: MosquittoBroker) -> AgentEnv:
    return AgentEnv.create(tmp_path, "gw-sigkill", broker)


async def test_sigkill_and_restart_deliver_every_stored_sample_exactly_once(
    env: AgentEnv, broker: MosquittoBroker, plant: SimProcess
) -> None:
    pumps = devices_from_example("pumps", plant.endpoints)
    pumps[0]["interval_ms"] = 100
    config = env.write_config(pumps)
    log = env.root / "agent.log"
    registry = KeyRegistry.of({env.gateway: env.gateway_public})
    hub = HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key)
    await hub.start()
    process = await start_agent(config, log)
    try:
        view = hub.gateways[env.gateway]
        await hub.wait_for(lambda: len(view.applied) >= 20, 60, what="data flowing")
        hub.acking = False  # let unacknowledged frames pile up in the buffer...
        before = len(view.applied)
        await hub.wait_for(lambda: len(view.applied) >= before + 5, 30, what="more frames")
        hub.dropping = True  # ...and some never reach the hub at all
        await hub.wait_for(lambda: hub.dropped >= 5, 30, what="frames lost in transit")
        last_birth = view.births[-1]
        process.kill()  # SIGKILL: no flush, no goodbye
        assert await process.wait() == -signal.SIGKILL
        # The broker publishes the will: a death naming the birth it ends.
        await hub.wait_for(lambda: bool(view.deaths), 30, what="the will")
        death = death_of(view.deaths[-1])
        assert isinstance(last_birth.body, Birth)
        assert death.birth_seq == last_birth.body.session_seq(last_birth.seq)
        assert death.reason == "connection lost"

        held = held_frames(env.state_dir / "outbox.duckdb", registry)
        assert held, "the buffer should hold unacknowledged frames at the kill"
        applied_before = set(view.applied)

        assert set(held) - {seq for _, seq in applied_before}, "some held frames never arrived"
        hub.acking = True
        hub.dropping = False
        process = await start_agent(config, log)
        epoch = last_birth.epoch
        await hub.wait_for(lambda: len(view.births) >= 2, 60, what="birth after the restart")

        def low_water() -> int:
            status = read_status(env.state_dir / "status.json")
            if not status or status.get("pid") != process.pid:
                return 0
            return int(status["buffer"]["low_water"])

        await hub.wait_for(lambda: low_water() > max(held), 60, what="held frames acknowledged")
        assert all((epoch, seq) in set(view.applied) for seq in held)
        assert view.births[-1].epoch == epoch  # same durable state, same epoch
        assert view.births[-1].seq > max(s for _, s in applied_before)  # seqs never reused
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await hub.stop()

    assert len(view.applied) == len(set(view.applied)), "a frame was applied twice"
    received = {(s.entity, s.attribute, s.ts_ms): s for s in view.samples}
    assert len(received) == len(view.samples), "a sample was applied twice"
    for seq, samples in held.items():
        for sample in samples:
            assert received.get((sample.entity, sample.attribute, sample.ts_ms)) == sample, seq
    remaining = held_frames(env.state_dir / "outbox.duckdb", registry)
    assert not remaining or min(remaining) > max(held)
