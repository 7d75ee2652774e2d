"""Runtime pieces: the batcher under storage faults, births, and the birth-size guard."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from support.agent_env import AgentEnv, toml_dumps
from support.broker import MosquittoBroker
from support.keys import gateway_key, registry

from fieldtwin.agent.config import load_config
from fieldtwin.agent.errors import AgentError, OutboxError
from fieldtwin.agent.outbox import AsyncOutbox, Committed, Outbox
from fieldtwin.agent.runtime import Agent, Batcher, SamplerSink
from fieldtwin.agent.sampler import FilterSpec, Sampler
from fieldtwin.agent.util import now_ms
from fieldtwin.protocol.births import split_birth
from fieldtwin.protocol.frames import DEFAULT_MAX_FRAME_BYTES, FrameSigner, decode_frame
from fieldtwin.protocol.messages import Data, Quality, Sample


def sample(i: int) -> Sample:
    return Sample("tank-1", "level", float(i), 1_000 + i, Quality.GOOD)


async def test_batcher_keeps_samples_through_storage_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = AsyncOutbox(Outbox(tmp_path / "o.duckdb", FrameSigner("gw-01", gateway_key)))
    await outbox.open()
    delivered: list[Committed] = []
    batcher = Batcher(outbox, delivered.extend, max_samples=100, flush_ms=10)
    real = outbox.sync.commit_data
    failures = 0

    def flaky(batches: object) -> list[Committed]:
        # A full disk cannot be provoked portably; the fault is injected where DuckDB raises.
        nonlocal failures
        if failures < 2:
            failures += 1
            raise OutboxError("IO Error: No space left on device")
        return real(batches)  # type: ignore[arg-type]

    monkeypatch.setattr(outbox.sync, "commit_data", flaky)
    task = asyncio.create_task(batcher.run())
    for i in range(250):
        batcher.add(sample(i))
    await batcher.drain()
    await asyncio.wait_for(task, 10)
    await outbox.close()
    assert batcher.commit_errors == 2
    assert [c.samples for c in delivered] == [100, 100, 50]
    assert [c.seq for c in delivered] == [1, 2, 3]  # failed attempts burned no seq


async def test_batcher_memory_is_bounded(tmp_path: Path) -> None:
    outbox = AsyncOutbox(Outbox(tmp_path / "o.duckdb", FrameSigner("gw-01", gateway_key)))
    batcher = Batcher(outbox, lambda c: None, max_samples=10, flush_ms=10, max_pending=50)
    for i in range(80):
        batcher.add(sample(i))
    assert len(batcher.pending) == 50
    assert batcher.dropped_in_memory == 30
    assert batcher.pending[0] == sample(30)  # the oldest went first


def test_a_large_gateway_births_in_parts_and_an_impossible_birth_is_refused(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """9,000 points (one register-range entry) no longer exceed a frame: the birth goes
    in parts. Only a birth that cannot fit even 64 parts is refused at start-up."""
    env = AgentEnv.create(tmp_path, "gw-huge", broker)
    device = {
        "id": "plc",
        "protocol": "modbus-tcp",
        "host": "127.0.0.1",
        "port": 1502,
        "points": [
            {
                "entity": "tank-{i:05}",
                "attribute": "level_of_the_liquid_in_metres",
                "table": "holding",
                "address": 0,
                "count": 9000,
                "type": "uint16",
                "unit": "m",
                "writable": True,
                "min": 0,
                "max": 10,
            }
        ],
    }
    agent = Agent(load_config(env.write_config([device])))
    birth = agent.birth(1)
    assert len(birth.points) == 9000
    assert {p.device for p in birth.points} == {"plc"}
    assert len(split_birth(birth, 1, DEFAULT_MAX_FRAME_BYTES)) >= 2
    config = env.config([device])
    config["info"] = {"site": "x" * (DEFAULT_MAX_FRAME_BYTES + 1000)}  # repeated in every part
    env.config_path.write_text(toml_dumps(config))
    with pytest.raises(AgentError, match=r"too large for 64 frames.*split the devices"):
        Agent(load_config(env.config_path))


async def test_birth_carries_metadata_committed_state_and_low_water(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    env = AgentEnv.create(tmp_path, "gw-birth", broker)
    device = {
        "id": "plc",
        "protocol": "modbus-tcp",
        "host": "127.0.0.1",
        "port": 1502,
        "points": [
            {
                "entity": "tank-1",
                "attribute": "level",
                "table": "input",
                "address": 0,
                "type": "float32",
                "unit": "m",
            }
        ],
    }
    agent = Agent(load_config(env.write_config([device])))
    assert agent.birth(7).low_water == 7
    assert agent.birth(7).state == ()
    stamp = now_ms()
    agent.sink.offer(0, 2.5, stamp, Quality.GOOD)
    # read, but not committed yet: a crash now loses it, so no birth may announce it
    assert agent.birth(9).state == ()
    await agent.outbox.open()
    try:
        committed = await agent.outbox.call(agent.outbox.sync.commit_data, [agent.batcher.pending])
        agent._deliver(committed)
    finally:
        await agent.outbox.close()
    birth = agent.birth(9)
    assert birth.state == (Sample("tank-1", "level", 2.5, stamp, Quality.GOOD),)
    assert birth.state_seqs == (committed[0].seq,)
    assert birth.points[0].source == "plc unit 1 ir 0-1"
    assert birth.info["agent"] == "fieldtwin-agent"


def test_uint64_readings_above_the_signed_range_travel_as_uncertain_floats() -> None:
    """Wire integers are signed 64-bit (docs/protocol.md, "Values"): a uint64 reading above
    2^63-1 becomes the nearest float, UNCERTAIN, and passes the receiver's validation."""
    sent: list[Sample] = []
    specs = [FilterSpec("meter-1", "count"), FilterSpec("meter-1", "small")]
    sink = SamplerSink(Sampler(specs, sent.append))
    sink.offer(0, 2**64 - 1, now_ms(), Quality.GOOD)
    sink.offer(1, 2**63 - 1, now_ms(), Quality.GOOD)
    big, small = sent
    assert (big.value, big.quality) == (float(2**64 - 1), Quality.UNCERTAIN)
    assert type(big.value) is float
    assert (small.value, small.quality) == (2**63 - 1, Quality.GOOD)  # exact, still an int
    frame = FrameSigner("gw-01", gateway_key).encode(1, 1, 1, Data.of(sent))
    decoded = decode_frame(frame, registry())
    assert decoded.body == Data.of(sent)


def test_device_states_for_heartbeats(tmp_path: Path, broker: MosquittoBroker) -> None:
    """Up while connected and answering; a bus with one dead unit among answering ones
    stays up; a device whose requests all fail for three intervals is down."""
    env = AgentEnv.create(tmp_path, "gw-states", broker)

    def device(name: str, port: int) -> dict[str, object]:
        return {
            "id": name,
            "protocol": "modbus-tcp",
            "host": "127.0.0.1",
            "port": port,
            "interval_ms": 1000,
            "points": [
                {"entity": name, "attribute": "r", "table": "input", "address": 0, "type": "uint16"}
            ],
        }

    agent = Agent(
        load_config(
            env.write_config(
                [device("a", 1502), device("b", 1503), device("c", 1504), device("d", 1505)]
            )
        )
    )
    now = now_ms()
    a, b, c, d = (driver.stats for driver in agent.drivers)
    a.connected, a.last_success_ms = True, now
    b.connected, b.last_success_ms, b.last_failure_ms = True, now - 10_000, now
    b.last_error = "timeout"
    c.connected, c.last_success_ms, c.last_failure_ms = True, now - 500, now  # one dead unit
    d.connected, d.last_failure_ms, d.last_error = False, now, "connection refused"
    states = {link.id: link for link in agent.device_states()}
    assert [states[x].up for x in "abcd"] == [True, False, True, False]
    assert states["b"].since_ms == now - 10_000  # the last time it answered
    assert states["b"].error == "timeout"
    assert states["d"].error == "connection refused"
    assert agent.device_states() == tuple(states.values())  # stable while nothing changes
