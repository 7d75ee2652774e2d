"""Console benchmark: 5,000 entities, 20,000 attributes, 10,000 updates/s from the hub.

Run: python bench/console.py [--entities N] [--attributes M] [--rate UPDATES_PER_S]
                             [--seconds S]

1. Hub side (``ViewFeed`` on a real ``HubService``, database thread work only): the
   cost of one delta tick over 20,000 current attributes with nothing changed and with
   a quarter-second of changes (rate / 4 attributes replaced, as ingest replaces
   them), and of building a full snapshot (all parts).
2. Console side, headless (``App.run_test``, 160x48): the console follows a hub played
   by ``SyntheticHub`` — every frame is signed beforehand, as the hub does, and
   verified and decoded in the loop, as ``OperatorClient`` does on receipt.
   - time to first full render: from app start until the snapshot of all entities is
     applied and the overview table holds every row (after a screen refresh);
   - sustained: delta frames of rate / 4 changed attributes every 250 ms (the hub's
     tick) for S seconds; updates applied per second, and the lag from each frame's
     hub stamp to the screen flush that showed it (p50, p99, max);
   - memory: peak RSS of the process, and RSS before, a third into and after the
     sustained phase (flat after the first third means nothing queues up).

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.hub_env import write_hub_config  # noqa: E402

from fieldtwin.hub.config import load_hub_config  # noqa: E402
from fieldtwin.hub.console.app import ConsoleApp  # noqa: E402
from fieldtwin.hub.console.synthetic import SyntheticHub  # noqa: E402
from fieldtwin.hub.console.widgets import VirtualTable  # noqa: E402
from fieldtwin.hub.metrics import HubMetrics  # noqa: E402
from fieldtwin.hub.service import HubService  # noqa: E402
from fieldtwin.hub.state import CurrentValue  # noqa: E402
from fieldtwin.hub.store import TwinStore  # noqa: E402
from fieldtwin.hub.views import ATTR_COLS, table  # noqa: E402
from fieldtwin.protocol.frames import decode_frame  # noqa: E402
from fieldtwin.protocol.messages import View  # noqa: E402

TICK_S = 0.25


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- hub side -------------------------------------------------------------------------------


def hub_side(entities: int, attributes: int, changed: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        files = write_hub_config(Path(tmp) / "hub")
        config = load_hub_config(files.config)
        store = TwinStore.open(config.database, memory_limit="512MB", threads=1)
        service = HubService(config, store, instance="bench", metrics=HubMetrics())
        try:
            state = service.ingest.state
            now = service.now_ms()
            keys = [(f"s-{i:05d}", f"a{j}") for i in range(entities) for j in range(attributes)]
            for key in keys:
                state.current[key] = CurrentValue(1.0, now, 0, "gw-01", now, now)
            feed = service.view_feed()
            rng = random.Random(1)
            idle, busy = [], []
            for _ in range(20):
                started = time.perf_counter()
                service.view_tick()
                idle.append(time.perf_counter() - started)
                for key in rng.sample(keys, changed):
                    state.current[key] = CurrentValue(rng.random(), now, 0, "gw-01", now, now)
                started = time.perf_counter()
                service.view_tick()
                busy.append(time.perf_counter() - started)
            started = time.perf_counter()
            first = feed.snapshot("bench", {}, service.now_ms())
            for part in range(1, first["parts"]):
                feed.snapshot("bench", {"snapshot": first["snapshot"], "part": part}, now)
            snapshot_s = time.perf_counter() - started
        finally:
            service.close()
    return {
        "hub_tick_idle_ms": statistics.median(idle) * 1000,
        "hub_tick_ms": statistics.median(busy) * 1000,
        "hub_snapshot_ms": snapshot_s * 1000,
        "snapshot_parts": float(first["parts"]),
    }


# -- console side -----------------------------------------------------------------------


async def console_side(
    entities: int, attributes: int, rate: int, seconds: float
) -> dict[str, float]:
    now = int(time.time() * 1000)
    hub = SyntheticHub.large(entities, attributes, now, roles=("viewer",), operator="bench")
    per_tick = rate * TICK_S
    ticks = int(seconds / TICK_S)
    # the hub signs; prepare the frames (with their planned stamps) before the clock runs
    app = ConsoleApp(lambda: hub)
    started = time.perf_counter()
    async with app.run_test(size=(160, 48)) as pilot:
        table_widget = None
        while True:
            screen = app.screen
            if app.model.synced and getattr(screen, "ready", False):
                table_widget = screen.query_one("#entities", VirtualTable)
                if table_widget.row_count >= entities:
                    break
            await pilot.pause(0.01)
        await pilot.pause()  # one refresh: the first screen is drawn
        first_render_s = time.perf_counter() - started
        assert table_widget is not None

        batches = [hub.delta_rows(int(per_tick), 0) for _ in range(ticks)]
        t0 = int(time.time() * 1000) + 1500  # stamps planned after the rows are made
        payloads = []
        for n, rows in enumerate(batches):
            stamp = t0 + int(n * TICK_S * 1000)
            for row in rows:
                row[3] = row[5] = stamp
            hub.seq["twin"] += 1
            body = View(
                "twin",
                hub.instance,
                hub.seq["twin"],
                {"now_ms": stamp, "tables": {"attrs": table(ATTR_COLS, rows)}},
            )
            hub.frame_seq += 1
            payloads.append((stamp, hub.signer.encode(1, hub.frame_seq, stamp, body)))
        late_ms = max(0.0, time.time() * 1000 - t0)
        await asyncio.sleep(max(0.0, t0 / 1000 - time.time()))
        app.lags.clear()
        applied_before = app.model.updates_applied
        rss_before = rss_mb()
        sent_at = time.perf_counter()
        rss_third = rss_before
        for n, (stamp, payload) in enumerate(payloads):
            if n == len(payloads) // 3:
                rss_third = rss_mb()
            delay = stamp / 1000 - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            # what OperatorClient does with each frame it receives
            decoded = decode_frame(payload, hub.registry).body
            hub.queue.put_nowait(decoded)  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        while app.model.updates_applied - applied_before < ticks * int(per_tick):
            assert time.monotonic() < deadline, "the console did not catch up"
            await pilot.pause(0.05)
        await pilot.pause(0.3)
        elapsed = time.perf_counter() - sent_at
        applied = app.model.updates_applied - applied_before
        lags = [float(v) for v in app.lags]
        rss_after = rss_mb()
        gaps = app.model.gaps + app.session.dropped
    return {
        "first_render_ms": first_render_s * 1000,
        "updates_offered": float(ticks * int(per_tick)),
        "updates_applied_per_s": applied / elapsed,
        "lag_p50_ms": percentile(lags, 0.5),
        "lag_p99_ms": percentile(lags, 0.99),
        "lag_max_ms": max(lags) if lags else float("nan"),
        "rss_before_mb": rss_before,
        "rss_third_mb": rss_third,
        "rss_after_mb": rss_after,
        "gaps_or_drops": float(gaps),
        "flushes": float(app.flushes),
        "late_start_ms": late_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entities", type=int, default=5000)
    parser.add_argument("--attributes", type=int, default=4, help="per entity")
    parser.add_argument("--rate", type=int, default=10_000, help="attribute updates per s")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    hub = hub_side(args.entities, args.attributes, int(args.rate * TICK_S))
    console = asyncio.run(console_side(args.entities, args.attributes, args.rate, args.seconds))
    total = args.entities * args.attributes
    rows = [
        ("hub: delta tick, nothing changed", f"{hub['hub_tick_idle_ms']:.1f} ms"),
        (
            f"hub: delta tick, {int(args.rate * TICK_S)} of {total} changed",
            f"{hub['hub_tick_ms']:.1f} ms",
        ),
        (
            f"hub: full snapshot ({int(hub['snapshot_parts'])} parts)",
            f"{hub['hub_snapshot_ms']:.0f} ms",
        ),
        (
            f"console: first full render, {args.entities} entities",
            f"{console['first_render_ms']:.0f} ms",
        ),
        (
            f"console: updates applied/s (offered {args.rate}/s)",
            f"{console['updates_applied_per_s']:,.0f}",
        ),
        (
            "console: lag hub stamp → screen p50 / p99 / max",
            f"{console['lag_p50_ms']:.0f} / {console['lag_p99_ms']:.0f} / "
            f"{console['lag_max_ms']:.0f} ms",
        ),
        (
            "console: RSS before / a third in / after the sustained phase",
            f"{console['rss_before_mb']:.0f} / {console['rss_third_mb']:.0f} / "
            f"{console['rss_after_mb']:.0f} MB",
        ),
        ("peak RSS", f"{peak_rss_mb():.0f} MB"),
        ("gaps or dropped frames", f"{int(console['gaps_or_drops'])}"),
        ("schedule started late by (should be 0)", f"{console['late_start_ms']:.0f} ms"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"console benchmark on {platform.python_implementation()} {platform.python_version()}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    result = {
        f"first_render_ms_{args.entities}": round(console["first_render_ms"], 1),
        "updates_applied_per_s": round(console["updates_applied_per_s"], 1),
        "lag_p50_ms": round(console["lag_p50_ms"], 1),
        "lag_p99_ms": round(console["lag_p99_ms"], 1),
        "lag_max_ms": round(console["lag_max_ms"], 1),
        "rss_before_mb": round(console["rss_before_mb"], 1),
        "rss_third_mb": round(console["rss_third_mb"], 1),
        "rss_after_mb": round(console["rss_after_mb"], 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "gaps_or_drops": int(console["gaps_or_drops"]),
        "hub_tick_ms": round(hub["hub_tick_ms"], 2),
        "hub_tick_idle_ms": round(hub["hub_tick_idle_ms"], 2),
        "hub_snapshot_ms": round(hub["hub_snapshot_ms"], 1),
        "entities": args.entities,
        "attributes": total,
        "rate": args.rate,
        "seconds": args.seconds,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
