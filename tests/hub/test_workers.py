"""Workers sharing the gateways of one PostgreSQL store (issue 13, hub/workers.py).

The lease plan alone (sans I/O, with a property test of a simulated fleet of workers),
the fence against a real database (a worker whose lease was taken commits nothing), and
two ``fieldtwin hub run`` processes splitting a load generator's fleet, one of them
SIGKILLed mid-stream: the other takes its partitions over and the history is exactly
what the generator sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.broker import MosquittoBroker
from support.hub_env import (
    GatewaySigner,
    HubFiles,
    now_ms,
    register_operators,
    write_hub_config,
)
from support.pg import pg_database

from fieldtwin.hub.config import load_hub_config
from fieldtwin.hub.errors import StoreError
from fieldtwin.hub.store import Flush, FrameRow, IngestWrite, SyncWrite
from fieldtwin.hub.store_pg import FRAME_BLOCK, PgTwinStore
from fieldtwin.hub.workers import (
    Fence,
    LeaseRow,
    LeaseTable,
    fair_share,
    gateways_of,
    partition_of,
    plan,
)
from fieldtwin.protocol.aio import within
from fieldtwin.protocol.config import ConfigError
from fieldtwin.protocol.frames import decode_frame
from fieldtwin.protocol.keys import KeyRegistry
from fieldtwin.protocol.messages import (
    Command,
    CommandResult,
    PointMeta,
    Quality,
    Rebirth,
    Sample,
)
from fieldtwin.protocol.topics import uplink_topic
from fieldtwin.protocol.tracker import DeliveryTracker
from fieldtwin.sim.loadgen import (
    LoadGenerator,
    LoadOptions,
    expected_history,
    init_fleet,
    load_fleet,
)

FIELDTWIN = [sys.executable, "-m", "fieldtwin.protocol.cli"]

# -- the plan, sans I/O ---------------------------------------------------------------------


def test_partition_of_is_stable_and_spreads() -> None:
    assert partition_of("gw-01", 16) == partition_of("gw-01", 16)
    gateways = [f"lg-{i:04d}" for i in range(1, 1001)]
    counts = Counter(partition_of(g, 16) for g in gateways)
    assert set(counts) == set(range(16))
    assert max(counts.values()) < 2 * 1000 / 16
    assert gateways_of(gateways, 16, [3]) == [g for g in gateways if partition_of(g, 16) == 3]


def _cycle(rows: list[LeaseRow], me: str, now: int, live: int, lease_ms: int) -> list[LeaseRow]:
    """Apply one worker's plan to the rows, as ``LeaseTable.cycle`` does in SQL."""
    decided = plan(rows, me, now, live)
    out = []
    for r in rows:
        if r.partition in decided.release:
            r = LeaseRow(r.partition, "", 0, r.fence)
        elif r.partition in decided.renew:
            r = LeaseRow(r.partition, me, now + lease_ms, r.fence)
        elif r.partition in decided.claim:
            r = LeaseRow(r.partition, me, now + lease_ms, r.fence + 1)
        out.append(r)
    return out


def _held(rows: list[LeaseRow], me: str) -> int:
    return sum(r.holder == me for r in rows)


def test_two_workers_split_sixteen_and_a_survivor_takes_all() -> None:
    rows = [LeaseRow(p, "", 0, 0) for p in range(16)]
    rows = _cycle(rows, "a", 0, 1, 5000)
    assert _held(rows, "a") == 16
    for now in (1000, 2000, 3000):  # b joins: a gives up half, b claims it
        rows = _cycle(rows, "b", now, 2, 5000)
        rows = _cycle(rows, "a", now, 2, 5000)
    assert _held(rows, "a") == _held(rows, "b") == 8
    fences = {r.partition: r.fence for r in rows if r.holder == "b"}
    # b dies: its leases expire; once a counts one live worker it claims them all
    rows = _cycle(rows, "a", 7000, 2, 5000)
    assert _held(rows, "a") == 8
    rows = _cycle(rows, "a", 9001, 1, 5000)
    assert _held(rows, "a") == 16
    assert all(r.fence == fences[r.partition] + 1 for r in rows if r.partition in fences)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=60),
    st.integers(1, 40),
)
def test_simulated_workers_converge_to_fair_shares(
    steps: list[tuple[int, bool]], partitions: int
) -> None:
    """Whatever order workers run cycles in (some dying), every partition ends held by
    one live worker, none above its fair share, and a fence only grows."""
    lease = 5000
    rows = [LeaseRow(p, "", 0, 0) for p in range(partitions)]
    alive = {f"w{i}" for i in range(4)}
    now = 0
    for index, kills in steps:
        now += 700
        me = f"w{index}"
        if kills and len(alive) > 1 and me in alive:
            alive.discard(me)
            continue
        if me not in alive:
            continue
        before = {r.partition: r.fence for r in rows}
        rows = _cycle(rows, me, now, len(alive), lease)
        assert all(r.fence >= before[r.partition] for r in rows)
    now += lease + 1  # the dead workers' leases expire
    for _ in range(3):
        for me in sorted(alive):
            rows = _cycle(rows, me, now, len(alive), lease)
            now += 100
    share = fair_share(partitions, len(alive))
    assert all(r.holder in alive for r in rows)
    assert all(_held(rows, me) <= share for me in alive)


def test_workers_need_a_postgresql_store(tmp_path: Path) -> None:
    files = write_hub_config(tmp_path, extra="[workers]\npartitions = 8\n")
    with pytest.raises(ConfigError, match="postgresql"):
        load_hub_config(files.config)
    text = files.config.read_text()
    url = "postgresql://postgres@127.0.0.1:5432/x"
    files.config.write_text(text.replace("[hub]\n", f'[hub]\nstore = "{url}"\n', 1))
    config = load_hub_config(files.config)
    assert config.workers is not None
    assert config.workers.partitions == 8
    assert config.workers.lease_s == 5.0


# -- the fence, against PostgreSQL ------------------------------------------------------------


def _one_frame(frame_id: int, gateway: str, seq: int) -> IngestWrite:
    write = IngestWrite()
    write.frames.append(FrameRow(frame_id, gateway, "data", 1, seq, 0, 0, 0, None))
    return write


def test_a_worker_whose_lease_was_taken_commits_nothing(tmp_path: Path) -> None:
    with pg_database() as url:
        store = PgTwinStore.open(url)
        a = LeaseTable(url, "a", 2, 0.5)
        b = LeaseTable(url, "b", 2, 0.5)
        try:
            a.create()
            fence = Fence("a", 2)
            store.share(fence)
            fence.held = a.cycle()
            assert sorted(fence.held) == [0, 1]
            gateway = next(g for g in (f"g{i}" for i in range(50)) if partition_of(g, 2) == 0)
            first = store.frame_block()
            store.write_ingest(_one_frame(first, gateway, 1))
            time.sleep(0.6)  # a pauses past its lease; b takes everything
            assert sorted(b.cycle()) == [0, 1]
            with pytest.raises(StoreError, match="lease of partition 0 lost"):
                store.write_ingest(_one_frame(first + 1, gateway, 2))
            # a cannot renew what b holds, and its stale fence stays refused
            fence.held = {**fence.held, **a.cycle()}
            with pytest.raises(StoreError, match="lost"):
                store.write_ingest(_one_frame(first + 2, gateway, 3))
            assert store.query("SELECT seq FROM frames") == [(1,)]
            assert store.frame_block() > first  # blocks only grow
            _, tracker = store.load_gateways([gateway])
            assert tracker.ranges(gateway) == [(1, 1)]
        finally:
            a.close()
            b.close()
            store.close()


def test_adoption_replays_only_the_frames_after_a_gateways_tracker_snapshot(
    tmp_path: Path,
) -> None:
    """A worker's flush stores each owned gateway's tracker; the next owner starts from
    it and replays only later frames: frames before the snapshot may be gone (pruned)
    and the tracker is still whole."""
    with pg_database() as url:
        store = PgTwinStore.open(url)
        leases = LeaseTable(url, "a", 2, 30.0)
        try:
            leases.create()
            fence = Fence("a", 2)
            store.share(fence)
            fence.held = leases.cycle()
            gateway = "gw-a"
            first = store.frame_block()
            tracker = DeliveryTracker()
            for seq in range(1, 6):
                store.write_ingest(_one_frame(first + seq, gateway, seq))
                tracker.record(gateway, 1, seq)
            store.write_sync(SyncWrite(flush=Flush(first + 5, tracker.dumps())))
            store.write_ingest(_one_frame(first + 6, gateway, 7))  # seq 6 still missing
            store.query("DELETE FROM frames WHERE id <= ?", [first + 5])  # pruned
            _, adopted = store.load_gateways([gateway])
            assert adopted.ranges(gateway) == [(1, 5), (7, 7)]
            assert adopted.gaps(gateway) == [(6, 6)]
            # a former owner flushing late cannot put an older snapshot back
            store.write_sync(SyncWrite(flush=Flush(first + 2, DeliveryTracker().dumps())))
            _, again = store.load_gateways([gateway])
            assert again.ranges(gateway) == [(1, 5), (7, 7)]
        finally:
            leases.close()
            store.close()


def test_a_store_run_by_workers_refuses_a_single_hub(tmp_path: Path) -> None:
    from fieldtwin.hub.metrics import HubMetrics
    from fieldtwin.hub.service import HubService

    files = write_hub_config(tmp_path)
    with pg_database() as url:
        text = files.config.read_text()
        files.config.write_text(text.replace("[hub]\n", f'[hub]\nstore = "{url}"\n', 1))
        config = load_hub_config(files.config)
        store = PgTwinStore.open(url)
        try:
            store.share(Fence("w7", 2))
            with pytest.raises(StoreError, match=r"run by hub workers \(first: w7\).*\[workers\]"):
                HubService(config, store, instance="single", metrics=HubMetrics())
        finally:
            store.close()


# -- two worker processes and a load generator -------------------------------------------------

GATEWAYS = 20
POINTS = 10
LEASE_S = 2.0


def _worker_config(base: Path, name: str, url: str) -> Path:
    text = base.read_text()
    text = text.replace("[hub]\n", f'[hub]\nstore = "{url}"\n', 1)
    state = base.parent / f"state-{name}"
    state.mkdir(exist_ok=True)
    lines = [
        f'database = "{state / "run.duckdb"}"' if line.startswith("database = ") else line
        for line in text.splitlines()
    ]
    lines += ["", "[workers]", "partitions = 16", f"lease_s = {LEASE_S}", f'id = "{name}"']
    path = base.parent / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _holders(url: str) -> Counter[str]:
    """Who holds unexpired leases (nobody before the first worker made the table)."""
    with psycopg.connect(url, autocommit=True) as con:
        try:
            rows = con.execute(
                "SELECT holder FROM leases WHERE expires_ms > "
                "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return Counter()
    return Counter(str(r[0]) for r in rows)


async def _until(check: object, within: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if check():  # type: ignore[operator]
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {within} s: {what}")


def _site(tmp_path: Path, broker: MosquittoBroker, **settings: Any) -> HubFiles:
    """The workers' shared hub config (test broker, the hub's login) and the operators'
    broker logins."""
    files = write_hub_config(
        tmp_path / "hub",
        broker_url=broker.url,
        password=broker.passwords["hub"],
        client_id=f"ft-hub-{tmp_path.name[-12:]}",
        **settings,
    )
    register_operators(broker, files)
    return files


@dataclass
class Workers:
    """Two ``fieldtwin hub run`` worker processes on one store, as a test drives them."""

    folder: Path
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    configs: dict[str, Path] = field(default_factory=dict)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")


@contextlib.asynccontextmanager
async def two_workers(folder: Path, base: Path, url: str) -> AsyncIterator[Workers]:
    """Start w1 (it takes all 16 partitions), then w2, until they split 8/8; on exit
    print what they logged above info and stop them (SIGTERM, then SIGKILL)."""
    workers = Workers(folder)
    try:
        for name in ("w1", "w2"):
            workers.configs[name] = _worker_config(base, name, url)
            with (folder / f"{name}.log").open("wb") as log:
                workers.procs[name] = await asyncio.create_subprocess_exec(
                    *FIELDTWIN,
                    "hub",
                    "run",
                    "-c",
                    str(workers.configs[name]),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            await _until(lambda: sum(_holders(url).values()) == 16, 30, "16 partitions held")
        await _until(lambda: _holders(url) == Counter({"w1": 8, "w2": 8}), 15, "an 8/8 split")
        yield workers
    finally:
        for name in workers.procs:  # shown when the test fails
            lines = workers.log(name).splitlines()
            notable = [line for line in lines if "level=info" not in line]
            print(f"--- {name}: {len(lines)} lines, not info:", *notable[-30:], sep="\n")
        for proc in workers.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in workers.procs.values():
            try:
                await within(15, proc.wait())
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.mark.timeout(90)
async def test_two_workers_split_the_fleet_and_one_survives_a_sigkill(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    init_fleet(tmp_path / "fleet", GATEWAYS, POINTS, prefix="lw")
    fragment = (tmp_path / "fleet" / "gateways.toml").read_text()
    files = write_hub_config(
        tmp_path / "hub",
        broker_url=broker.url,
        password=broker.passwords["hub"],
        client_id=f"ft-hub-{tmp_path.name[-12:]}",
        extra=fragment,
        silent_s=30.0,
    )
    password = broker.passwords.get("loadgen") or broker.add_user("loadgen", role="loadgen")
    with pg_database() as url:
        async with two_workers(tmp_path, files.config, url) as workers:
            fleet = load_fleet(tmp_path / "fleet", files.keys / "hub.pub")
            gen = LoadGenerator(
                fleet,
                broker.url,
                LoadOptions(
                    password=password,
                    rate=2.0,
                    duration_s=10.0,
                    ack_timeout_s=1.0,
                    heartbeat_s=1.0,
                    drain_s=25.0,
                    connections=2,
                ),
            )
            run = asyncio.create_task(gen.run(), name="test-loadgen")
            await _until(lambda: gen.stats.frames_acked >= GATEWAYS * 4, 20, "acks flow")
            victims = gateways_of(fleet.spec.gateways, 16, _partitions_of(url, "w2"))
            assert victims
            workers.procs["w2"].send_signal(signal.SIGKILL)
            await workers.procs["w2"].wait()
            killed = time.monotonic()
            sent_at_kill = {gw.id: gw.seq for gw in gen.gateways if gw.id in victims}
            takeover = await _until(
                lambda: _holders(url) == Counter({"w1": 16}), 15, "w1 takes all 16"
            )

            def caught_up() -> bool:
                """Everything the victims sent before the kill is acked, and so is a
                frame each sent after it (only the survivor can have acked that)."""
                return all(
                    not any(seq <= sent_at_kill[gw.id] for seq in gw.unacked)
                    and any(
                        seq not in gw.unacked for seq in range(sent_at_kill[gw.id] + 1, gw.seq + 1)
                    )
                    for gw in gen.gateways
                    if gw.id in victims
                )

            await _until(caught_up, 20, "the victims' frames acked by the survivor")
            failover = time.monotonic() - killed
            stats = await run
            print(f"takeover {takeover:.2f} s, failover (acks again) {failover:.2f} s")
            assert stats["in_flight"] == 0, stats
            assert stats["frames_acked"] == stats["frames_sent"] == GATEWAYS * 20
            assert takeover < 10
            assert failover < 10
            with psycopg.connect(url, autocommit=True) as con:
                rows = con.execute(
                    "SELECT entity, attribute, ts_ms, num FROM history "
                    "WHERE starts_with(entity, 'lw-')"
                ).fetchall()
                chain = con.execute("SELECT seq FROM audit ORDER BY seq").fetchall()
                # the victims' frames were stored by w2, then by w1 (a later id block)
                blocks = con.execute(
                    "SELECT count(DISTINCT id / %s) FROM frames WHERE gateway = ANY(%s)",
                    [FRAME_BLOCK, victims],
                ).fetchone()
            assert blocks is not None
            assert blocks[0] >= 2
            # the current table: one row per point, its newest sample (flushed by w1)
            newest: dict[tuple[str, str], tuple[int, float]] = {}
            for _gw, entity, attr, ts, value in gen.ledger.rows():
                if (entity, attr) not in newest or ts > newest[(entity, attr)][0]:
                    newest[(entity, attr)] = (ts, value)

            def current() -> dict[tuple[str, str], tuple[int, float]]:
                with psycopg.connect(url, autocommit=True) as con:
                    found = con.execute(
                        "SELECT entity, attribute, ts_ms, num FROM current "
                        "WHERE starts_with(entity, 'lw-')"
                    ).fetchall()
                assert len(found) == len({(e, a) for e, a, _, _ in found})
                return {(e, a): (int(ts), float(v)) for e, a, ts, v in found}

            await _until(lambda: current() == newest, 5, "current holds the newest samples")
            history = Counter((e, a, int(ts), float(v)) for e, a, ts, v in rows)
            expected = expected_history(gen.ledger)
            assert history - expected == Counter(), "duplicated or unknown samples"
            assert expected - history == Counter(), "lost samples"
            assert [s for (s,) in chain] == list(range(1, len(chain) + 1))


def _partitions_of(url: str, holder: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as con:
        rows = con.execute("SELECT partition FROM leases WHERE holder = %s", [holder]).fetchall()
    return [int(r[0]) for r in rows]


# -- drift and alarms by the partition owner ---------------------------------------------------

GHOSTS = 8


def _open_alarms(url: str) -> list[tuple[str, str, str, str]]:
    """(id, rule, entity, attribute) of every open alarm of the ghost fleet."""
    with psycopg.connect(url, autocommit=True) as con:
        try:
            rows = con.execute(
                "SELECT id, rule, entity, attribute FROM alarms "
                "WHERE state <> 'cleared' AND starts_with(entity, 'gh-') ORDER BY id"
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return []
    return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FIELDTWIN, *args], capture_output=True, text=True, timeout=60, check=False
    )


def _cli_json(*args: str) -> dict[str, object]:
    out = _cli(*args, "--format", "json")
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


def _open_alarm_count(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as con:
        row = con.execute("SELECT count(*) FROM alarms WHERE state <> 'cleared'").fetchone()
    assert row is not None
    return int(row[0])


def _cli_alarms(config: Path) -> list[str]:
    """The open alarm ids as ``fieldtwin twin alarms -c CONFIG`` lists them."""
    out = subprocess.run(
        [*FIELDTWIN, "twin", "alarms", "-c", str(config), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return sorted(
        str(alarm["id"])
        for alarm in json.loads(out.stdout)
        if str(alarm["entity"]).startswith("gh-")
    )


@pytest.mark.timeout(120)
async def test_each_entity_is_judged_once_by_its_partition_owner(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """Gateways that never connect (and their declared entities, never reported) give
    alarms: with two workers each alarm exists once, raised by the owner of the entity's
    partition; every worker's API and CLI list all of them; the survivor of a SIGKILL
    goes on with the victim's alarms (same ids) instead of raising them again."""
    init_fleet(tmp_path / "ghosts", GHOSTS, 1, prefix="gh")
    files = _site(
        tmp_path,
        broker,
        extra=(tmp_path / "ghosts" / "gateways.toml").read_text(),
        silent_s=4.0,
        missing_s=4.0,
    )
    ghosts = [f"gh-{i:04d}" for i in range(1, GHOSTS + 1)]
    with pg_database() as url:
        async with two_workers(tmp_path, files.config, url) as workers:
            owners = {
                g: "w1" if partition_of(g, 16) in _partitions_of(url, "w1") else "w2"
                for g in ghosts
            }
            assert set(owners.values()) == {"w1", "w2"}, owners
            # every ghost gateway silent and its declared entity missing, once each
            wanted = {("temporal.gateway_silent", g, "") for g in ghosts} | {
                ("structural.missing", f"{g}-dev", "") for g in ghosts
            }
            await _until(
                lambda: {a[1:] for a in _open_alarms(url)} >= wanted, 30, "the ghosts' alarms"
            )
            await asyncio.sleep(2.0)  # a few more cycles of both workers
            before = _open_alarms(url)
            assert len(before) == len({a[1:] for a in before}), f"an alarm raised twice: {before}"
            assert {a[1:] for a in before} == wanted
            ids = sorted(a[0] for a in before)
            # each worker judges its own partitions' entities (its status says which);
            # together they hold every open alarm of the site once
            site = _open_alarm_count(url)
            own_total = 0
            for name in ("w1", "w2"):
                status = json.loads(await _api(workers.configs[name], "/api/status"))
                mine = sorted(g for g in ghosts if owners[g] == name)
                assert [g for g in status["worker"]["gateways"] if g.startswith("gh-")] == mine
                own_total += sum(status["worker"]["alarms_active_own"].values())
                assert sum(status["alarms_active"].values()) == site
                # the CLI through either worker lists the site's alarms
                assert await asyncio.to_thread(_cli_alarms, workers.configs[name]) == ids
            assert own_total == site
            # operators act through the broker: every worker receives each request and
            # one answers it; an alarm action is applied by the owner of the alarm's entity
            by_owner = {
                name: [
                    a[0]
                    for a in before
                    if a[1] == "temporal.gateway_silent" and owners[a[2]] == name
                ]
                for name in ("w1", "w2")
            }
            picked = by_owner["w2"][:2] + by_owner["w1"][:2]
            for alarm_id in picked:
                acked = await asyncio.to_thread(
                    _cli_json,
                    "twin",
                    "alarms",
                    "ack",
                    alarm_id,
                    "-c",
                    str(workers.configs["w1"]),
                    "--operator",
                    "olga",
                    "--reason",
                    "ghost gateway, known",
                )
                assert (acked["id"], acked["state"], acked["acked_by"]) == (
                    alarm_id,
                    "acknowledged",
                    "olga",
                )
            # each acknowledgement was applied by the owner of the alarm's entity only
            logs = {n: workers.log(n) for n in ("w1", "w2")}
            for name, other in (("w1", "w2"), ("w2", "w1")):
                for alarm_id in by_owner[name][:2]:
                    line = f'msg="alarm acknowledged" alarm={alarm_id} '
                    assert line in logs[name], (name, alarm_id)
                    assert line not in logs[other], (other, alarm_id)
            await asyncio.sleep(1.0)  # the owners' next cycles keep the acknowledgements
            states = {
                a["id"]: a["state"]
                for a in json.loads(await _api(workers.configs["w2"], "/api/alarms"))
            }
            assert all(states[a] == "acknowledged" for a in picked), states
            workers.procs["w2"].send_signal(signal.SIGKILL)
            await workers.procs["w2"].wait()
            await _until(lambda: _holders(url) == Counter({"w1": 16}), 15, "w1 takes all 16")
            await asyncio.sleep(3.0)  # w1 judges the victim's entities for a few cycles
            after = _open_alarms(url)
            assert sorted(a[0] for a in after) == ids, "the survivor raised alarms again"
            status = json.loads(await _api(workers.configs["w1"], "/api/status"))
            assert sum(status["worker"]["alarms_active_own"].values()) == _open_alarm_count(url)


async def _api(config: Path, path: str) -> str:
    """GET ``path`` from the API of the worker run with ``config`` (its endpoint file)."""
    import urllib.request

    from fieldtwin.hub.api import Endpoint

    endpoint = Endpoint.read(load_hub_config(config).endpoint_file)
    assert endpoint is not None

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}{path}", timeout=10) as r:
            return str(r.read().decode())

    return await asyncio.to_thread(get)


# -- commands by the partition owner ---------------------------------------------------------


class PumpGateway:
    """gw-01 as an agent would behave for this test: tank level and pump setpoint every
    0.3 s, a birth when asked, and each command written, answered and read back (the
    commands it received are kept, to prove each was written at most once)."""

    def __init__(self, broker: MosquittoBroker, files: HubFiles) -> None:
        self.broker = broker
        self.signer = GatewaySigner("gw-01", files.gateway_keys["gw-01"])
        self.hub_keys = KeyRegistry.of({"hub": files.hub_key.public})
        self.speed_sp: float = 900.0
        self.level: float = 2.5
        self.commands: list[Command] = []
        self.client: aiomqtt.Client | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> PumpGateway:
        self.client = await self.broker.gateway_session("gw-01", "gw-01")
        await self._birth()
        self.tasks = [
            asyncio.create_task(self._receive(), name="test-gw-receive"),
            asyncio.create_task(self._report(), name="test-gw-report"),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        assert self.client is not None
        await self.client.__aexit__(None, None, None)

    def _samples(self) -> list[Sample]:
        now = now_ms()
        level = self.level + (now % 1000) / 10_000  # moves a little: not frozen
        return [
            Sample("pump-1", "speed_sp", self.speed_sp, now, Quality.GOOD),
            Sample("tank-1", "level", level, now, Quality.GOOD),
        ]

    async def _send(self, message: tuple[str, bytes]) -> None:
        assert self.client is not None
        await self.client.publish(message[0], message[1], qos=1)

    async def _birth(self) -> None:
        points = [
            PointMeta("pump-1", "speed_sp", "float32", "rpm", writable=True, min=0, max=1800),
            PointMeta("tank-1", "level", "float32", "m"),
        ]
        await self._send(self.signer.birth(points, rebirth=bool(self.signer.session)))
        await self._send(self.signer.data(self._samples()))

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(0.3)
            await self._send(self.signer.data(self._samples()))

    async def _receive(self) -> None:
        assert self.client is not None
        async for message in self.client.messages:
            frame = decode_frame(bytes(message.payload), self.hub_keys)  # type: ignore[arg-type]
            body = frame.body
            if isinstance(body, Rebirth):
                await self._birth()
            elif isinstance(body, Command):
                self.commands.append(body)
                assert isinstance(body.value, int | float)
                self.speed_sp = float(body.value)
                result = CommandResult(body.cmd_id, "ok", "", self.speed_sp, now_ms())
                seq = self.signer.next_seq()
                await self._send(
                    (
                        uplink_topic("gw-01", "cmd_result"),
                        self.signer.signer.encode(self.signer.epoch, seq, now_ms(), result),
                    )
                )
                await self._send(self.signer.data(self._samples()))


@pytest.mark.timeout(120)
async def test_a_command_is_run_by_its_partition_owner_and_survives_its_death(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """A proposal through either worker lands with the owner of the target's partition
    (ids from its block); the owner is SIGKILLed while the command awaits approval; the
    survivor adopts it, the approval through the other worker's config reaches the
    survivor, which sends it: written once, read back, verified."""
    files = _site(
        tmp_path,
        broker,
        silent_s=30.0,
        missing_s=60.0,
        stale_s=10.0,
        frozen_s=60.0,
    )
    with pg_database() as url:
        async with two_workers(tmp_path, files.config, url) as workers:
            owner = "w1" if partition_of("gw-01", 16) in _partitions_of(url, "w1") else "w2"
            other = "w2" if owner == "w1" else "w1"
            async with PumpGateway(broker, files) as gw:
                identity = ("--operator", "olga")

                def dry_run_ok() -> bool:
                    out = _cli(
                        "cmd",
                        "propose",
                        "pump-1.speed_sp",
                        "1200",
                        "--dry-run",
                        "-c",
                        str(workers.configs[other]),
                        *identity,
                        "--format",
                        "json",
                    )
                    return out.returncode == 0 and bool(json.loads(out.stdout)["allowed"])

                await _until(dry_run_ok, 30, "the policy allows the command (gateway online)")
                proposed = await asyncio.to_thread(
                    _cli_json,
                    "cmd",
                    "propose",
                    "pump-1.speed_sp",
                    "1200",
                    "-c",
                    str(workers.configs[other]),
                    *identity,
                    "--reason",
                    "more flow",
                )
                cmd_id = str(proposed["id"])
                assert proposed["state"] == "awaiting_approval", proposed
                # proposed through the other worker's config, run by the owner only
                line = f'msg="command proposed" cmd={cmd_id} '
                assert line in workers.log(owner)
                assert line not in workers.log(other)
                workers.procs[owner].send_signal(signal.SIGKILL)
                await workers.procs[owner].wait()
                survivor = other
                await _until(
                    lambda: _holders(url) == Counter({survivor: 16}), 15, "the survivor takes all"
                )
                approved = await asyncio.to_thread(
                    _cli,
                    "cmd",
                    "approve",
                    cmd_id,
                    "-c",
                    str(workers.configs[survivor]),
                    "--operator",
                    "piet",
                )
                assert approved.returncode == 0, approved.stderr

                def state() -> str:
                    out = _cli(
                        "cmd",
                        "show",
                        cmd_id,
                        "-c",
                        str(workers.configs[survivor]),
                        *identity,
                        "--format",
                        "json",
                    )
                    return str(json.loads(out.stdout)["state"]) if out.returncode == 0 else ""

                await _until(lambda: state() == "verified", 30, f"{cmd_id} verified")
                assert [c.cmd_id for c in gw.commands] == [cmd_id], "written more than once"
                assert gw.speed_sp == 1200.0


@pytest.mark.timeout(120)
async def test_the_console_sees_the_whole_site_through_the_workers(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """The console (Textual, run_test) logged in as an operator: its snapshot and deltas
    come from the view leader (w1, partition 0), while gw-01's values and the alarms on
    its entities are w2's (partition 15): a changed level and both workers' alarms reach
    the console."""
    from fieldtwin.hub.console.app import ConsoleApp
    from fieldtwin.hub.opclient import OperatorClient, OperatorProfile

    assert partition_of("gw-01", 16) >= 8  # w2's half; w1 keeps 0-7 after the split
    files = _site(
        tmp_path,
        broker,
        silent_s=4.0,
        missing_s=4.0,
        stale_s=10.0,
        frozen_s=60.0,
        extra="[prediction]\nstep_s = 0.2\nrefit_s = 3.0\nhistory_s = 600.0\n",
    )
    profile = OperatorProfile(
        operator="olga",
        key_file=files.keys / "olga.key",
        hub_key_file=files.keys / "hub.pub",
        broker_url=broker.url,
        username="olga",
        password=broker.passwords["olga"],
    )
    with pg_database() as url:
        async with (
            two_workers(tmp_path, files.config, url) as workers,
            PumpGateway(broker, files) as gw,
        ):
            assert partition_of("gw-01", 16) in _partitions_of(url, "w2")
            app = ConsoleApp(lambda: OperatorClient(profile))
            async with app.run_test(size=(120, 40)) as pilot:
                model = app.model

                def level() -> float | None:
                    tank = model.entities.get("tank-1")
                    attr = tank.attrs.get("level") if tank else None
                    return float(attr.value) if attr else None

                async def until(check: Callable[[], object], within: float, what: str) -> None:
                    deadline = time.monotonic() + within
                    while not check():
                        assert time.monotonic() < deadline, f"not within {within} s: {what}"
                        await pilot.pause(0.1)

                await until(lambda: model.synced and (level() or 0) > 2.4, 30, "tank-1.level")
                instance = model.instance
                gw.level = 3.5  # on w2's gateway; the console follows w1's deltas
                await until(lambda: (level() or 0) > 3.4, 15, "the new level")
                assert model.instance == instance, "a fresh snapshot, not a delta"

                # alarms of both workers: gw-02 is silent (w1's), pump-1.running was
                # never reported (w2's)
                def alarmed(rule: str, entity: str) -> bool:
                    return any(
                        a.get("rule") == rule and a.get("entity") == entity
                        for a in model.alarms.values()
                    )

                await until(
                    lambda: (
                        alarmed("temporal.gateway_silent", "gw-02")
                        and alarmed("structural.missing", "pump-1")
                    ),
                    30,
                    "both workers' alarms",
                )

                # tank-1.level's model is fitted and stored by w2 (its owner) only, and
                # w1 lists it and forecasts with it, reading it from the store
                fitted = 'msg="model fitted" target=tank-1.level '
                await until(lambda: fitted in workers.log("w2"), 40, "w2 fits tank-1.level")
                assert fitted not in workers.log("w1")

                def listed() -> bool:
                    out = _cli(
                        "twin", "models", "-c", str(workers.configs["w1"]), "--format", "json"
                    )
                    rows = json.loads(out.stdout) if out.returncode == 0 else []
                    return any(r.get("target") == "tank-1.level" and "error" not in r for r in rows)

                await until(listed, 15, "w1 lists w2's model")
                predicted = await asyncio.to_thread(
                    _cli_json,
                    "twin",
                    "predict",
                    "tank-1.level",
                    "--horizon",
                    "5s",
                    "-c",
                    str(workers.configs["w1"]),
                )
                assert predicted["forecast"]
                # the view leader dies: w2 takes partition 0 and with it the views; the
                # console sees a new instance and takes a fresh snapshot from w2
                workers.procs["w1"].send_signal(signal.SIGKILL)
                await workers.procs["w1"].wait()
                await until(
                    lambda: model.synced and model.instance != instance,
                    30,
                    "a snapshot from the new view leader",
                )
                gw.level = 1.5
                await until(lambda: 0 < (level() or 0) < 1.6, 15, "the level through w2")
                assert alarmed("temporal.gateway_silent", "gw-02")
