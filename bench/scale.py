"""Scale benchmark (issue 13): simulated gateways through Mosquitto into the hub.

Run: python bench/scale.py [--gateways 1000] [--points 50] [--rate 1] [--seconds 60]

What runs today is the reference the issue asks for: the **single DuckDB hub** (one
``fieldtwin hub run`` process). The PostgreSQL store and the hub workers that share the
gateways do not exist yet (issue 13 items 1-2), so no ``pg_*`` figure and no failover
time is reported: they are left out of the table and the JSON line, not zero.

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
        fleet = load_fleet(fleet_dir)
        options = LoadOptions(
            rate=args.rate,
            duration_s=args.seconds,
            usernames=("loadgen",),
            password=password,
            connections=4,
            drain_s=60.0,
        )
        generator = LoadGenerator(fleet, broker.url, options)
        task = asyncio.create_task(generator.run(), name="bench-loadgen")
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
    expected = expected_history(generator.ledger)
    # Only an acked sample can be lost: the hub acks after the commit. A frame still
    # unacked at the end was not lost, the hub had not taken it yet (the generator, like
    # an agent, still holds it and would resend it): that is the backlog.
    unacked = {(gw.id, seq) for gw in generator.gateways for seq in gw.unacked}
    acked_ledger = Ledger(
        spec, [f for f in generator.ledger.frames if (f.gateway, f.seq) not in unacked]
    )
    acked = expected_history(acked_ledger)
    lost = sum((acked - stored).values())
    backlog = sum(expected.values()) - sum(acked.values())
    duplicated = sum(n - 1 for n in stored.values() if n > 1)
    unexpected = sum((stored - expected).values()) - duplicated
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateways", type=int, default=1000)
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--rate", type=float, default=1.0, help="frames per gateway per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
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
        ("PostgreSQL workers", "not built yet (issue 13): no pg_* figures"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.keep:
        print(f"work folder: {workdir}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
