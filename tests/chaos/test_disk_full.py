"""A full disk under the agent's buffer and under the hub's store: a clear error,
nothing acknowledged that is not stored, and recovery when space returns.

Each test mounts a small tmpfs (we run as root in CI) and fills it with a file until
the kernel says ENOSPC, so DuckDB meets a real full filesystem; freeing the file gives
the space back. Without permission to mount, the tests skip and say why.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import duckdb
import pytest
from support.agent_env import AgentEnv, devices_from_example, running_agent
from support.broker import MosquittoBroker
from support.hub_env import GatewaySigner, now_ms, running_hub, wait_for, write_hub_config
from support.hub_peer import HubPeer
from support.sim import SimProcess

from fieldtwin.protocol.frames import decode_frame
from fieldtwin.protocol.keys import KeyRegistry
from fieldtwin.protocol.logfmt import _FIELDS_ATTR
from fieldtwin.protocol.messages import Ack, PointMeta, Quality, Sample

pytestmark = pytest.mark.slow


def logged(record: logging.LogRecord) -> dict[str, object]:
    """The key/value fields of a log line (fieldtwin.protocol.logfmt)."""
    values: dict[str, object] = getattr(record, _FIELDS_ATTR, {})
    return values


class SmallDisk:
    """A tmpfs of ``size`` at ``path``; ``fill()`` takes every free byte, ``free()``
    gives them back."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        self.size = size
        self.filler = path / "filler"

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            pytest.skip(
                f"cannot mount a small tmpfs for the full-disk test ({result.stderr.strip()}); "
                "it needs root (CI runs as root)"
            )

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)

    def fill(self) -> None:
        chunk = b"\0" * (64 * 1024)
        with self.filler.open("ab") as handle:
            try:
                while True:
                    handle.write(chunk)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        with contextlib.suppress(OSError), self.filler.open("ab") as handle:
            for _ in range(64):  # the last partial blocks
                handle.write(b"\0" * 512)
                handle.flush()

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    small = SmallDisk(tmp_path / "small-disk", "24m")
    small.mount()
    try:
        yield small
    finally:
        small.unmount()


@pytest.fixture(scope="module")
def plant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    folder = tmp_path_factory.mktemp("plant")
    sim = SimProcess.start(
        Path(__file__).resolve().parents[2] / "examples" / "scenarios" / "water-plant.toml",
        "--no-truth",
        stderr_path=folder / "simulator.log",
    )
    try:
        yield sim
    finally:
        sim.stop()


# -- the agent -----------------------------------------------------------------------------


async def test_agent_buffer_on_a_full_disk_keeps_samples_and_recovers(
    disk: SmallDisk,
    broker: MosquittoBroker,
    plant: SimProcess,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    env = AgentEnv.create(disk.path / "gw", "gw-disk", broker)
    devices = devices_from_example("pumps", plant.endpoints)
    devices[0]["interval_ms"] = 100
    devices[0]["max_silence_s"] = 0
    for point in devices[0]["points"]:
        point["deadband"] = 0
    config = env.write_config(devices, buffer={"flush_ms": 50})
    async with (
        HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub,
        running_agent(config) as agent,
    ):
        view = hub.gateways[env.gateway]
        await hub.wait_for(lambda: view.sample_count >= 20, 60, what="samples flowing")
        sync = agent.outbox.sync
        await asyncio.to_thread(disk.fill)
        await hub.wait_for(lambda: agent.batcher.commit_errors >= 2, 60, what="commits failing")
        # While the disk is full nothing new is stored, so nothing new is sent or acked.
        stored_upto = sync.next_seq
        await asyncio.sleep(2.0)
        assert sync.next_seq == stored_upto
        assert agent.batcher.pending, "the samples read meanwhile wait in memory"
        assert all(seq < stored_upto for _, seq in view.applied)
        assert agent.batcher.dropped_in_memory == 0
        errors = [r for r in caplog.records if "cannot write the buffer" in r.getMessage()]
        assert errors, "a clear error is logged"
        assert logged(errors[0])["alarm"] == "outbox_write_failed"
        assert "No space left on device" in str(logged(errors[0])["error"])
        assert len(errors) <= 3, "the error is throttled, not a flood"
        waiting = len(agent.batcher.pending)
        await asyncio.to_thread(disk.free)
        await hub.wait_for(
            lambda: not agent.batcher.pending and sync.next_seq > stored_upto,
            60,
            what="the samples kept in memory committed once space returned",
        )
        await hub.wait_for(lambda: not sync.unacked(), 60, what="everything acknowledged")
        assert waiting > 0
    reported = agent.sampler.counters.reported
    assert sync.counters.dropped_samples == 0
    assert len(view.applied) == len(set(view.applied)), "a frame was applied twice"
    keys = [(s.entity, s.attribute, s.ts_ms) for s in view.samples]
    assert len(keys) == len(set(keys)), "a sample was applied twice"
    assert view.sample_count == reported, "every sample read reached the hub"


WRITE_AND_CRASH = r"""
import os, sys
from pathlib import Path
from fieldtwin.agent.outbox import Outbox
from fieldtwin.protocol.frames import FrameSigner
from fieldtwin.protocol.keys import KeyPair
from fieldtwin.protocol.messages import Quality, Sample
outbox = Outbox(Path(sys.argv[1]), FrameSigner("gw-disk", KeyPair.generate()))
outbox.open()
for i in range(100):
    outbox.commit_data([[Sample("t", f"p{j}", float(i), 1_700_000_000_000 + i, Quality.GOOD)
                         for j in range(20)]])
os._exit(0)  # SIGKILL-like: the last commits live only in the WAL
"""


def test_an_agent_restarted_on_a_full_disk_keeps_its_buffer(disk: SmallDisk) -> None:
    """Opening a buffer (and replaying its WAL) on a full disk must not mistake the
    write errors for corruption: a quarantine would abandon every unacknowledged frame."""
    from fieldtwin.agent.outbox import Outbox
    from fieldtwin.protocol.frames import FrameSigner
    from fieldtwin.protocol.keys import KeyPair

    path = disk.path / "outbox.duckdb"
    subprocess.run([sys.executable, "-c", WRITE_AND_CRASH, str(path)], check=True, timeout=60)
    disk.fill()
    outbox = Outbox(path, FrameSigner("gw-disk", KeyPair.generate()))
    outbox.open()
    try:
        assert len(outbox.unacked()) == 100
        assert outbox.counters.quarantined == 0
        assert not list(disk.path.glob("outbox.duckdb.corrupt-*"))
    finally:
        outbox.close()


# -- the hub -------------------------------------------------------------------------------


class Gateway:
    """Signs and publishes frames as gw-01 and collects the hub's acks."""

    def __init__(self, broker: MosquittoBroker, signer: GatewaySigner, hub_keys: KeyRegistry):
        self.broker = broker
        self.signer = signer
        self.hub_keys = hub_keys
        self.acks: list[Ack] = []
        self.client: aiomqtt.Client | None = None
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Gateway:
        self.client = await self.broker.gateway_session("gw-01", "disk-gw-01")
        self.task = asyncio.create_task(self._receive())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        assert self.client is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.client.__aexit__(None, None, None)

    async def _receive(self) -> None:
        assert self.client is not None
        async for message in self.client.messages:
            frame = decode_frame(bytes(message.payload), self.hub_keys)  # type: ignore[arg-type]
            if isinstance(frame.body, Ack):
                self.acks.append(frame.body)

    async def send(self, message: tuple[str, bytes]) -> None:
        assert self.client is not None
        await self.client.publish(message[0], message[1], qos=1)

    def acked(self, seq: int) -> bool:
        return any(a.epoch == self.signer.epoch and a.covers(seq) for a in self.acks)


async def test_hub_store_on_a_full_disk_acks_nothing_unstored_and_recovers(
    disk: SmallDisk, broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    files = write_hub_config(
        disk.path / "hub",
        broker_url=broker.url,
        password=broker.passwords["hub"],
        client_id="ft-hub-disk",
        silent_s=300,
        missing_s=300,
    )
    signer = GatewaySigner("gw-01", files.gateway_keys["gw-01"])
    t0 = now_ms()
    level: list[Sample] = []

    def next_frame(samples: int = 1) -> int:
        """The next data frame with ``samples`` new level samples; returns its seq."""
        batch = [
            Sample(
                "tank-1", "level", 2.0 + (len(level) + i) / 1000, t0 + len(level) + i, Quality.GOOD
            )
            for i in range(samples)
        ]
        level.extend(batch)
        seq = signer.next_seq()
        frames[seq] = signer.data(batch, seq=seq)
        return seq

    frames: dict[int, tuple[str, bytes]] = {}
    async with (
        running_hub(files.config) as hub,
        Gateway(broker, signer, KeyRegistry.of({"hub": files.hub_key.public})) as gw,
    ):
        await gw.send(signer.birth([PointMeta("tank-1", "level", "float", "m")], [], low_water=1))
        for _ in range(10):
            await gw.send(frames[next_frame()])
        await wait_for(lambda: all(gw.acked(s) for s in frames), within=30)
        await asyncio.to_thread(disk.fill)
        # DuckDB may still fit commits in blocks its WAL already holds (how many depends
        # on where the last checkpoint left it); those are stored and acknowledged. So
        # the gateway keeps sending, with growing frames, until the store refuses one.
        full = []
        for round_ in range(40):
            for _ in range(5):
                seq = next_frame(samples=1 + 20 * round_)
                full.append(seq)
                await gw.send(frames[seq])
            with contextlib.suppress(AssertionError):
                await wait_for(lambda: hub.metrics.store_errors > 0, within=0.5)
            if hub.metrics.store_errors:
                break
        assert hub.metrics.store_errors, "the full disk refused no ingest batch"
        # the drift cycle (every 0.2 s here) cannot store its flush either: it fails
        # again and again, counted each time, logged a few times only (checked below)
        await wait_for(lambda: hub.metrics.loop_failures["drift"] >= 10, within=30)
        await asyncio.sleep(1.0)  # acks are due every 50 ms
        # The refused frames are not acknowledged; the history check below proves that
        # every acknowledged frame was stored, since only the unacknowledged ones are
        # sent again.
        unacked = [s for s in full if not gw.acked(s)]
        assert unacked, "the full disk refused nothing"
        errors = [r for r in caplog.records if "ingest batch not stored" in r.getMessage()]
        assert errors
        assert "No space left on device" in str(logged(errors[0])["error"])
        await asyncio.to_thread(disk.free)
        # the gateway resends what was never acknowledged (an agent does on its ack timeout)
        for seq in unacked:
            await gw.send(frames[seq])
        for _ in range(10):
            await gw.send(frames[next_frame()])
        await wait_for(lambda: all(gw.acked(s) for s in frames), within=60)
        status = await asyncio.to_thread(_get_json, hub.api_port, "/api/status")
        assert status["mqtt_connected"]
        await wait_for(
            lambda: any(
                r.getMessage() == "loop recovered" and logged(r).get("loop") == "drift"
                for r in caplog.records
            ),
            within=10,
        )
        # however long the disk stayed full, each failing loop logged a few lines only
        for message in ("ingest batch not stored", "drift cycle not stored"):
            lines = [r for r in caplog.records if message in r.getMessage()]
            assert len(lines) <= 3, f"{len(lines)} lines of {message!r}"
    con = duckdb.connect(str(files.database), read_only=True)
    try:
        rows = con.execute(
            "SELECT ts_ms, count(*) FROM history WHERE entity = 'tank-1' GROUP BY ts_ms"
        ).fetchall()
    finally:
        con.close()
    assert sorted(ts for ts, _ in rows) == [s.ts_ms for s in level]
    assert all(count == 1 for _, count in rows)


def _get_json(port: int, path: str) -> dict[str, object]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        data: dict[str, object] = json.loads(response.read())
        return data
