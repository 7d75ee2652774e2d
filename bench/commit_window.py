"""What shortening the agent's pre-commit window (``[buffer] flush_ms``) costs.

Run: python bench/commit_window.py [--seconds 3]

A sample read by an agent lives only in memory until its batch is committed to the
DuckDB buffer: at most ``flush_ms`` plus one commit. A SIGKILL or power cut in that
window loses it (docs/agent.md, "Pre-commit window"). A shorter window means more,
smaller commits. This measures the cost of one group commit (``Outbox.commit_data``:
sign, encode, one INSERT with the seq counter in one transaction) by batch size on a
real buffer file (wall time, fsync included), then derives, for two gateway loads, how
many commits per second each ``flush_ms`` makes while samples arrive continuously and
how busy that keeps the buffer's one worker thread (over 100 %: it cannot keep up, and
batches grow until it can, so the window grows too):

* 48 samples/s: 12 points polled every 250 ms with deadband 0 (the chaos test's agent);
* 10,000 samples/s: 50 devices x 200 registers at 1 Hz.

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from fieldtwin.agent.outbox import Outbox  # noqa: E402
from fieldtwin.protocol.frames import FrameSigner  # noqa: E402
from fieldtwin.protocol.keys import KeyPair  # noqa: E402
from fieldtwin.protocol.messages import Quality, Sample  # noqa: E402

BATCH_SIZES = (1, 12, 100, 1000, 2000)
FLUSH_MS = (1, 10, 100, 1000)
LOADS = (48, 10_000)


def measure(seconds: float) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ft-commit-") as folder:
        outbox = Outbox(Path(folder) / "outbox.duckdb", FrameSigner("gw-bench", KeyPair.generate()))
        outbox.open()
        try:
            ts = 1_700_000_000_000
            for size in BATCH_SIZES:
                times: list[float] = []
                deadline = time.perf_counter() + seconds
                while time.perf_counter() < deadline or len(times) < 20:
                    batch = [
                        Sample("tank-1", f"p{i}", float(i) + len(times), ts + i, Quality.GOOD)
                        for i in range(size)
                    ]
                    started = time.perf_counter()
                    committed = outbox.commit_data([batch])
                    times.append(time.perf_counter() - started)
                    outbox.ack([(committed[0].seq, committed[0].seq)])  # keep the file small
                    ts += size
                times.sort()
                out[size] = {
                    "commits": len(times),
                    "p50_ms": statistics.median(times) * 1000,
                    "p99_ms": times[int(len(times) * 0.99) - 1] * 1000,
                }
        finally:
            outbox.close()
    return out


def cost_ms(costs: dict[int, dict[str, float]], size: float) -> float:
    """Median commit time for ``size`` samples, interpolated between measured sizes."""
    sizes = sorted(costs)
    if size <= sizes[0]:
        return costs[sizes[0]]["p50_ms"]
    for low, high in itertools.pairwise(sizes):
        if size <= high:
            share = (size - low) / (high - low)
            return costs[low]["p50_ms"] + share * (costs[high]["p50_ms"] - costs[low]["p50_ms"])
    top = sizes[-1]
    return costs[top]["p50_ms"] * size / top


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch size")
    args = parser.parse_args()
    costs = measure(args.seconds)
    print("commit cost by batch size (Outbox.commit_data, one transaction)")
    print(f"{'samples':>8} {'commits':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for size, row in costs.items():
        print(f"{size:>8} {row['commits']:>8} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f}")
    derived: list[dict[str, Any]] = []
    print()
    print("continuous load: commits/s and busy share of the buffer thread by flush_ms")
    print(f"{'samples/s':>10} {'flush_ms':>8} {'batch':>7} {'commits/s':>10} {'busy %':>7}")
    for load in LOADS:
        for flush in FLUSH_MS:
            commits = min(1000 / flush, load)  # a batch holds at least one sample
            batch = load / commits
            share = commits * cost_ms(costs, batch) / 1000 * 100
            derived.append(
                {"samples_per_s": load, "flush_ms": flush, "batch": round(batch, 1),
                 "commits_per_s": round(commits, 1), "busy_percent": round(share, 1)}
            )  # fmt: skip
            print(f"{load:>10} {flush:>8} {batch:>7.1f} {commits:>10.1f} {share:>7.1f}")
    print(
        json.dumps(
            {
                "benchmark": "commit_window",
                "machine": f"{platform.machine()} python {platform.python_version()}",
                "commit_cost": {str(k): v for k, v in costs.items()},
                "derived": derived,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
