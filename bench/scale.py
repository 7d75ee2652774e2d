"""Scale benchmark (issue 13): simulated gateways through Mosquitto into the hub.

Run: python bench/scale.py [--gateways 1000] [--points 50] [--rate 1] [--seconds 60]
     [--store postgresql://postgres@127.0.0.1:5432/postgres --workers 1,2,4]

Without ``--store``: the reference, the **single DuckDB hub** (one ``fieldtwin hub run``
process). With ``--store`` (a URL of a maintenance database: each run creates and drops
its own database there): for each count in ``--workers``, that many ``fieldtwin hub
run`` worker processes sharing the gateways through partition leases (``[workers]``,
hub/workers.py) on one PostgreSQL database; ingest is the sum of the workers' counters.
In the run with the most workers (at least 2), one worker is SIGKILLed at the middle of
the run, and ``failover_s`` is the time from the kill until, for each of its gateways,
everything sent before the kill is acknowledged and so is a frame sent after it (which
only the worker that took its partitions over can have acknowledged).

1. ``fieldtwin sim gateways`` (hardware-sim/loadgen.py) writes N gateway keys and a hub
   config declaring them; a Mosquitto started here with the project's generated config
   (``fieldtwin broker config``; a benchmark-only ``loadgen`` user writes every
   gateway's uplink, the hub still verifies every frame's per-gateway signature).
2. The hub runs as its own process; the load generator plays every gateway in this
   one (births, one signed data frame per gateway per tick with all its points,
   heartbeats, acks verified, unacked frames resent, deaths at the end).
3. Figures:
   - offered: points/s the generator published;
   - ingest: points/s the hub applied (its ``fieldtwin_hub_points_applied_total``
     counter, over the middle of the run, after the births);
   - publish-to-ack p50/p99: from just before ``publish`` to the verified ``ack``. The
     hub acks a frame after the batch holding it is committed, at most every
     ``ack_interval_ms``, so this bounds publish-to-twin from above;
   - lost / duplicated: the hub's ``history`` against the generator's ledger of every
     sample it sent (after the run, with the hub stopped); lost counts only samples of
     frames the hub acknowledged (it acks after the commit), and the samples of frames
     still unacknowledged when the generator stops are reported apart, as the backlog a
     hub that cannot keep up leaves (the generator, like an agent, still holds them);
   - the hub's peak RSS and CPU share.

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.broker import MosquittoBroker  # noqa: E402

from fieldtwin.hub.api import Endpoint  # noqa: E402
from fieldtwin.hub.store import TwinStore  # noqa: E402
from fieldtwin.hub.workers import gateways_of  # noqa: E402
from fieldtwin.sim.loadgen import (  # noqa: E402
    Ledger,
    LoadGenerator,
    LoadOptions,
    expected_history,
    history_sql,
    init_fleet,
    load_fleet,
)

FIELDTWIN = [sys.executable, "-m", "fieldtwin.protocol.cli"]


def hub_config(fleet: Path, broker: MosquittoBroker, database: Path) -> Path:
    """The fleet's generated hub config with this broker's hub login."""
    text = (fleet / "hub.toml").read_text()
    text = text.replace(
        "[broker]\n",
        f'[broker]\nusername = "hub"\npassword = "{broker.passwords["hub"]}"\n',
        1,
    )
    text = text.replace(
        'twin_id = "loadgen"\n',
        f'twin_id = "loadgen"\napi_port = 0\nmemory_limit = "1GB"\ndatabase = "{database}"\n',
        1,
    )
    # the generated database line comes after ours; drop it (first key wins is not TOML)
    lines = text.splitlines()
    seen = False
    out = []
    for line in lines:
        if line.startswith("database = "):
            if seen:
                continue
            seen = True
        out.append(line)
    path = fleet / "bench-hub.toml"
    path.write_text(
        "\n".join(out)
        + "\n[drift]\ninterval_s = 1.0\ngateway_silent_s = 30.0\nmissing_after_s = 60.0\n"
    )
    return path


def applied(endpoint: Endpoint) -> int:
    """The hub's ``fieldtwin_hub_points_applied_total`` (its Prometheus text)."""
    with urllib.request.urlopen(f"{endpoint.base_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("fieldtwin_hub_points_applied_total "):
            return int(float(line.split()[1]))
    raise SystemExit("the hub's /metrics has no fieldtwin_hub_points_applied_total")


def start_generator(
    args: argparse.Namespace, fleet_dir: Path, broker_url: str, password: str
) -> tuple[LoadGenerator, asyncio.Task[dict[str, Any]]]:
    """The fleet played at ``--rate`` for ``--seconds`` over 4 connections of the
    benchmark's ``loadgen`` user, with a minute to drain the acks."""
    options = LoadOptions(
        rate=args.rate,
        duration_s=args.seconds,
        usernames=("loadgen",),
        password=password,
        connections=4,
        drain_s=60.0,
    )
    generator = LoadGenerator(load_fleet(fleet_dir), broker_url, options)
    return generator, asyncio.create_task(generator.run(), name="bench-loadgen")


def start_hub(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``fieldtwin hub run`` as its own process (its output in ``log``)."""
    with log.open("w") as out:
        return subprocess.Popen(
            [*FIELDTWIN, "hub", "run", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT
        )


def proc_stats(pid: int) -> tuple[float, float]:
    """(RSS MB now, CPU seconds so far) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    fleet_dir = workdir / "fleet"
    broker = MosquittoBroker(workdir / "mosquitto")
    broker.start()
    spec = init_fleet(fleet_dir, args.gateways, args.points, "gw-load", broker.url)
    password = broker.add_user("loadgen", role="loadgen")
    database = workdir / "state" / "hub.duckdb"
    config = hub_config(fleet_dir, broker, database)
    hub = start_hub(config, workdir / "hub.log")
    samples: list[tuple[float, int]] = []
    peak_rss = 0.0
    cpu_start = cpu_end = 0.0
    try:
        endpoint_file = database.with_name(database.name + ".api.json")
        deadline = time.monotonic() + 60
        endpoint = None
        while time.monotonic() < deadline:
            endpoint = Endpoint.read(endpoint_file)
            if endpoint is not None and endpoint.pid == hub.pid:
                break
            if hub.poll() is not None:
                raise SystemExit(f"the hub exited: see {workdir / 'hub.log'}")
            await asyncio.sleep(0.2)
        assert endpoint is not None
        generator, task = start_generator(args, fleet_dir, broker.url, password)
        started = time.monotonic()
        _, cpu_start = proc_stats(hub.pid)
        while not task.done():
            await asyncio.sleep(2.0)
            with contextlib.suppress(Exception):
                count = await asyncio.to_thread(applied, endpoint)
                samples.append((time.monotonic() - started, count))
            rss, cpu_end = proc_stats(hub.pid)
            peak_rss = max(peak_rss, rss)
        stats = task.result()
        cpu_seconds = cpu_end - cpu_start
        elapsed = time.monotonic() - started
    finally:
        hub.send_signal(signal.SIGTERM)
        try:
            hub.wait(60)
        except subprocess.TimeoutExpired:
            hub.kill()
        broker.stop()
    # the middle of the run: births done, before the drain
    window = [s for s in samples if args.seconds * 0.2 <= s[0] <= args.seconds * 0.9]
    ingest = None
    if len(window) >= 2 and window[-1][0] > window[0][0]:
        ingest = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])
    store = TwinStore.open(database, read_only=True, memory_limit="1GB", threads=2)
    try:
        sql, params = history_sql(spec)
        stored = Counter((e, a, int(ts), float(v)) for e, a, ts, v in store.query(sql, params))
    finally:
        store.close()
    expected, lost, backlog, duplicated, unexpected = checked(spec, generator, stored)
    return {
        "gateways": args.gateways,
        "points_per_gateway": args.points,
        "rate_hz": args.rate,
        "seconds": args.seconds,
        "offered_points_per_s": stats["points_per_s"],
        "duckdb_ingest_points_per_s_1hub": None if ingest is None else round(ingest),
        "duckdb_ack_p50_ms": stats["ack_latency_p50_ms"],
        "duckdb_ack_p99_ms": stats["ack_latency_p99_ms"],
        "frames_resent": stats["frames_resent"],
        "loadgen_lag_s": stats["lag_s"],
        "in_flight_at_end": stats["in_flight"],
        "hub_peak_rss_mb": round(peak_rss, 1),
        "hub_cpu_share": round(cpu_seconds / elapsed, 3) if elapsed else None,
        "lost": lost,
        "duplicated": duplicated,
        "unexpected": unexpected,
        "unacked_samples_at_end": backlog,
        "samples_sent": sum(expected.values()),
    }


PARTITIONS = 16
LEASE_S = 5.0


def worker_config(base: Path, name: str, store: str) -> tuple[Path, Path]:
    """(config, endpoint file) of worker ``name`` on ``store`` (its run files apart)."""
    state = base.parent / f"state-{name}"
    state.mkdir(exist_ok=True)
    database = state / "run.duckdb"
    lines = [
        f'database = "{database}"' if line.startswith("database = ") else line
        for line in base.read_text().splitlines()
    ]
    text = "\n".join(lines).replace("[hub]\n", f'[hub]\nstore = "{store}"\n', 1)
    text += f'\n[workers]\npartitions = {PARTITIONS}\nlease_s = {LEASE_S}\nid = "{name}"\n'
    path = base.parent / f"{name}.toml"
    path.write_text(text)
    return path, database.with_name(database.name + ".api.json")


def pg_query(url: str, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as con:
        return list(con.execute(sql, params).fetchall())


async def run_workers(
    args: argparse.Namespace, workdir: Path, count: int, kill: bool
) -> dict[str, Any]:
    """One run with ``count`` workers on a fresh database; ``kill``: SIGKILL one midway."""
    import psycopg
    from support.pg import with_database

    fleet_dir = workdir / "fleet"
    broker = MosquittoBroker(workdir / f"mosquitto-{count}w")
    broker.start()
    spec = init_fleet(fleet_dir, args.gateways, args.points, "gw-load", broker.url)
    password = broker.add_user("loadgen", role="loadgen")
    base = hub_config(fleet_dir, broker, workdir / "state" / "hub.duckdb")
    name = f"ft_bench_{os.getpid()}_{count}w"
    with psycopg.connect(args.store, autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        con.execute(f'CREATE DATABASE "{name}"')
    url = with_database(args.store, name)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    endpoints: dict[str, Path] = {}
    samples: list[tuple[float, int]] = []
    failover: float | None = None
    failed = False
    try:
        for i in range(count):
            worker = f"w{i + 1}"
            config, endpoints[worker] = worker_config(base, worker, url)
            procs[worker] = start_hub(config, workdir / f"{worker}-{count}w.log")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(psycopg.Error):
                held = dict(
                    pg_query(
                        url,
                        "SELECT holder, count(*) FROM leases WHERE holder <> '' GROUP BY holder",
                    )
                )
                if len(held) == count and sum(held.values()) == PARTITIONS:
                    break
            for worker, proc in procs.items():
                if proc.poll() is not None:
                    raise SystemExit(f"worker {worker} exited: see its log in {workdir}")
            await asyncio.sleep(0.5)
        else:
            raise SystemExit(f"{count} workers did not share the partitions within 90 s")
        found = {w: Endpoint.read(f) for w, f in endpoints.items()}
        live = {w: e for w, e in found.items() if e is not None}
        generator, task = start_generator(args, fleet_dir, broker.url, password)
        started = time.monotonic()
        killed_at: float | None = None
        victims: set[str] = set()
        sent_at_kill: dict[str, int] = {}
        while not task.done():
            await asyncio.sleep(0.25 if killed_at is not None and failover is None else 1.0)
            now = time.monotonic() - started
            if kill and killed_at is None and now >= args.seconds / 2:
                victim = f"w{count}"
                partitions = [
                    int(p)
                    for (p,) in pg_query(
                        url, "SELECT partition FROM leases WHERE holder = %s", [victim]
                    )
                ]
                victims = set(gateways_of(spec.gateways, PARTITIONS, partitions))
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait(10)
                killed_at = time.monotonic()
                live.pop(victim, None)
                sent_at_kill = {gw.id: gw.seq for gw in generator.gateways if gw.id in victims}
            if (
                killed_at is not None
                and failover is None
                and all(
                    served_again(gw, sent_at_kill[gw.id])
                    for gw in generator.gateways
                    if gw.id in victims
                )
            ):
                failover = time.monotonic() - killed_at
            if killed_at is None:
                with contextlib.suppress(Exception):
                    total = 0
                    for endpoint in live.values():
                        total += await asyncio.to_thread(applied, endpoint)
                    samples.append((now, total))
        stats = task.result()
    except BaseException:
        failed = True
        raise
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
        if failed:  # the run's database goes with it
            with psycopg.connect(args.store, autocommit=True) as con:
                con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    end = args.seconds * (0.45 if kill else 0.9)
    window = [s for s in samples if args.seconds * 0.2 <= s[0] <= end]
    ingest = None
    if len(window) >= 2 and window[-1][0] > window[0][0]:
        ingest = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])
    try:
        sql, params = history_sql(spec)
        stored = Counter(
            (e, a, int(ts), float(v))
            for e, a, ts, v in pg_query(url, sql.replace("?", "%s"), params)
        )
    finally:
        with psycopg.connect(args.store, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    expected, lost, backlog, duplicated, unexpected = checked(spec, generator, stored)
    return {
        "workers": count,
        "ingest": None if ingest is None else round(ingest),
        "ack_p50_ms": stats["ack_latency_p50_ms"],
        "ack_p99_ms": stats["ack_latency_p99_ms"],
        "offered": stats["points_per_s"],
        "in_flight": stats["in_flight"],
        "failover_s": None if failover is None else round(failover, 2),
        "killed": kill,
        "lost": lost,
        "duplicated": duplicated,
        "unexpected": unexpected,
        "backlog": backlog,
        "samples_sent": sum(expected.values()),
    }


def served_again(gw: Any, seq_at_kill: int) -> bool:
    """Everything a gateway sent before the kill is acknowledged, and so is a frame it
    sent after it (which only the survivor can have acknowledged)."""
    unacked = gw.unacked
    return not any(seq <= seq_at_kill for seq in unacked) and any(
        seq not in unacked for seq in range(seq_at_kill + 1, gw.seq + 1)
    )


def checked(
    spec: Any, generator: LoadGenerator, stored: Counter[tuple[str, str, int, float]]
) -> tuple[Counter[tuple[str, str, int, float]], int, int, int, int]:
    """The generator's ledger against the stored history: (expected, lost, backlog,
    duplicated, unexpected). Only an acked sample can be lost: the hub acks after the
    commit. A frame still unacked at the end was not lost, the hub had not taken it yet
    (the generator, like an agent, still holds it and would resend it): the backlog."""
    expected = expected_history(generator.ledger)
    unacked = {(gw.id, seq) for gw in generator.gateways for seq in gw.unacked}
    acked = expected_history(
        Ledger(spec, [f for f in generator.ledger.frames if (f.gateway, f.seq) not in unacked])
    )
    duplicated = sum(n - 1 for n in stored.values() if n > 1)
    return (
        expected,
        sum((acked - stored).values()),
        sum(expected.values()) - sum(acked.values()),
        duplicated,
        sum((stored - expected).values()) - duplicated,
    )


def main_workers(args: argparse.Namespace) -> None:
    counts = sorted({int(n) for n in args.workers.split(",")})
    workdir = Path(tempfile.mkdtemp(prefix="fieldtwin-bench-scale-pg-"))
    result: dict[str, Any] = {
        "gateways": args.gateways,
        "points_per_gateway": args.points,
        "rate_hz": args.rate,
        "seconds": args.seconds,
        "partitions": PARTITIONS,
        "lease_s": LEASE_S,
        "lost": 0,
        "duplicated": 0,
        "unexpected": 0,
        "failover_s": None,
    }
    rows: list[tuple[str, Any]] = [
        ("gateways x points x rate", f"{args.gateways} x {args.points} x {args.rate:g} Hz")
    ]
    for count in counts:
        kill = count == counts[-1] and count >= 2
        one = asyncio.run(run_workers(args, workdir, count, kill))
        n = f"{count}w"
        result[f"pg_ingest_points_per_s_{n}"] = one["ingest"]
        per = None if one["ingest"] is None else round(one["ingest"] / count)
        result[f"pg_ingest_points_per_s_per_worker_{n}"] = per
        result[f"pg_ack_p50_ms_{n}"] = one["ack_p50_ms"]
        result[f"pg_ack_p99_ms_{n}"] = one["ack_p99_ms"]
        result["offered_points_per_s"] = one["offered"]
        result["lost"] += one["lost"]
        result["duplicated"] += one["duplicated"]
        result["unexpected"] += one["unexpected"]
        result[f"pg_unacked_samples_at_end_{n}"] = one["backlog"]
        if kill:
            result["failover_s"] = one["failover_s"]
        rows.append(
            (
                f"{count} worker(s): ingest (per worker), ack p50/p99 ms",
                f"{one['ingest']} ({per}), {one['ack_p50_ms']} / {one['ack_p99_ms']}",
            )
        )
        rows.append(
            (
                f"{count} worker(s): sent / unacked at end / lost / duplicated"
                + (", failover" if kill else ""),
                f"{one['samples_sent']} / {one['backlog']} / {one['lost']} / {one['duplicated']}"
                + (f", {one['failover_s']} s" if kill else ""),
            )
        )
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    if args.keep:
        print(f"work folder: {workdir}")
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateways", type=int, default=1000)
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--rate", type=float, default=1.0, help="frames per gateway per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--store", default="", help="PostgreSQL maintenance database URL: run hub workers"
    )
    parser.add_argument("--workers", default="1,2", help="worker counts to run, e.g. 1,2,4")
    args = parser.parse_args()
    if args.store:
        main_workers(args)
        return
    workdir = Path(tempfile.mkdtemp(prefix="fieldtwin-bench-scale-"))
    result = asyncio.run(run(args, workdir))
    rows = [
        ("gateways x points x rate", f"{args.gateways} x {args.points} x {args.rate:g} Hz"),
        ("offered (points/s)", result["offered_points_per_s"]),
        ("DuckDB hub ingest (points/s)", result["duckdb_ingest_points_per_s_1hub"]),
        (
            "publish-to-ack p50 / p99 (ms)",
            f"{result['duckdb_ack_p50_ms']} / {result['duckdb_ack_p99_ms']}",
        ),
        ("frames resent", result["frames_resent"]),
        (
            "hub peak RSS (MB) / CPU share",
            f"{result['hub_peak_rss_mb']} / {result['hub_cpu_share']}",
        ),
        (
            "samples sent / unacked at end / lost / duplicated",
            f"{result['samples_sent']} / {result['unacked_samples_at_end']} / "
            f"{result['lost']} / {result['duplicated']}",
        ),
        ("PostgreSQL workers", "run with --store postgresql://... --workers 1,2,4"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.keep:
        print(f"work folder: {workdir}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
