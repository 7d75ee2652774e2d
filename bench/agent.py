"""Edge-agent benchmarks against the simulator's load mode and a real Mosquitto.

Run: python bench/agent.py [--outage-s 600] [--throughput-s 30] [--idle-s 60]

Everything is real: the simulator serves examples/scenarios/load-50x200.toml (synthetic
Modbus TCP devices whose registers change every 0.1 s tick), the agent runs as its own
process (``fieldtwin agent run -c FILE``), a Mosquitto started here on a free port
carries the frames, and the acknowledging hub peer (tests/support/hub_peer.py)
verifies, de-duplicates and acks them in this process. Agent CPU and memory come from
/proc/<agent pid> (utime+stime, VmHWM); they are the agent's alone.

1. Sustained points/s: 25 devices x 200 points (5,000 points) polled every 100 ms,
   i.e. 50,000 changed points/s offered. After a warm-up, the rate of samples the hub
   peer applies (and acks) over the window is the sustained rate; the agent's CPU share
   over the same window says whether one core carried it.
2. A 500-point gateway at 1 Hz (3 devices: 200 + 200 + 100 points): CPU share of one
   core and peak RSS over the window.
3. A 5,000-point gateway at 1 Hz (25 devices x 200 points): peak RSS.
4. Backlog drain: the same 500-point gateway, the broker stopped for ``--outage-s``
   while the agent keeps reading (live data keeps flowing into the buffer), then
   started again. Drain rate = samples read during the outage / time from the agent's
   first birth after the outage to the arrival of the last of those samples, while
   live samples keep arriving.
5. Soak (only with ``--soak-s``): the 500-point gateway for that long; RSS and
   anonymous memory after warm-up, at the end, and the growth in between.

Memory: peak RSS is the kernel's VmHWM for the agent process; anonymous memory is the
``Anonymous`` line of /proc/<pid>/smaps_rollup (heaps, DuckDB's buffers, thread
stacks: what no other process can share), its maximum over the window.

``--phases`` picks phases (default: all but soak). Prints a table, then one JSON
object as the last line, with a key for each figure measured in this run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.agent_env import AgentEnv, toml_dumps  # noqa: E402
from support.broker import MosquittoBroker  # noqa: E402
from support.hub_peer import HubPeer  # noqa: E402
from support.sim import SimProcess  # noqa: E402

from fieldtwin.protocol.frames import Frame  # noqa: E402
from fieldtwin.protocol.messages import Data  # noqa: E402

MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
LOAD_SCENARIO = ROOT / "examples" / "scenarios" / "load-50x200.toml"
CLK_TCK = os.sysconf("SC_CLK_TCK")
AGENT = [sys.executable, "-c", "from fieldtwin.protocol.cli import main; raise SystemExit(main())"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def memory_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def memory_breakdown(pid: int) -> dict[str, float]:
    """Anonymous (heap) memory and DuckDB's resident library pages, in MB."""
    out = {"anon_mb": 0.0, "file_mb": 0.0, "duckdb_lib_mb": 0.0}
    rollup: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            rollup[key] = int(rest.split()[0]) / 1024
    out["anon_mb"] = rollup.get("Anonymous", 0.0)
    out["file_mb"] = rollup.get("Rss", 0.0) - out["anon_mb"]
    current = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if MAPPING.match(line):
            parts = line.split()
            current = parts[5] if len(parts) > 5 else ""
        elif line.startswith("Rss:") and "_duckdb" in current:
            out["duckdb_lib_mb"] += int(line.split()[1]) / 1024
    return out


def load_devices(
    sim: SimProcess, count: int, interval_ms: int, points_last: int | None = None
) -> list[dict[str, Any]]:
    """Agent ``[[devices]]`` for the first ``count`` load devices, from the endpoints JSON."""
    devices = []
    synthetic = [d for d in sim.endpoints["devices"] if "synthetic" in d][:count]
    for n, device in enumerate(synthetic):
        info = device["synthetic"]
        points = info["points"]
        if points_last is not None and n == len(synthetic) - 1:
            points = points_last
        devices.append(
            {
                "id": device["id"],
                "protocol": "modbus-tcp",
                "host": device["host"],
                "port": device["port"],
                "timeout_s": 1.0,
                "interval_ms": interval_ms,
                "max_silence_s": 60,
                "points": [
                    {
                        "entity": device["id"],
                        "attribute": f"p{k}",
                        "table": "input",
                        "address": k,
                        "type": "uint16",
                    }
                    for k in range(points)
                ],
            }
        )
    return devices


@dataclass
class Arrivals:
    """What the hub peer applied, with arrival times (monotonic)."""

    samples: int = 0
    births: list[float] = field(default_factory=list)
    frames: list[tuple[float, int, int, int]] = field(default_factory=list)
    """(arrival monotonic, arrival wall ms, newest source ts in the frame, samples)."""

    def __call__(self, frame: Frame) -> None:
        now = time.monotonic()
        if frame.kind == "birth":
            self.births.append(now)
        elif isinstance(frame.body, Data) and len(frame.body):
            self.samples += len(frame.body)
            wall = time.time_ns() // 1_000_000
            self.frames.append((now, wall, max(frame.body.ts_ms), len(frame.body)))


class Gateway:
    """One agent process with its files, its hub peer and its measurements."""

    def __init__(self, root: Path, name: str, broker: MosquittoBroker) -> None:
        self.env = AgentEnv.create(root / name, name, broker)
        self.broker = broker
        self.arrivals = Arrivals()
        self.peer = HubPeer(
            broker,
            {name: self.env.gateway_public},
            self.env.hub_key,
            keep_samples=False,
            on_apply=self.arrivals,
            ack_interval_s=0.05,
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, devices: list[dict[str, Any]], **buffer: Any) -> None:
        config = self.env.config(
            devices, buffer={"flush_ms": 100, **buffer}, broker={"reconnect_max_s": 2.0}
        )
        config["status"] = {"interval_s": 2.0}
        self.env.config_path.write_text(toml_dumps(config))
        log = (self.env.root / "agent.log").open("ab")
        self.process = subprocess.Popen(
            [*AGENT, "--log-level", "warning", "agent", "run", "-c", str(self.env.config_path)],
            stdout=log,
            stderr=log,
        )
        log.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


async def wait(condition: Any, deadline_s: float, what: str) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {deadline_s}s waiting for {what}")
        await asyncio.sleep(0.1)


async def measure_window(gateway: Gateway, seconds: float) -> dict[str, float]:
    start_cpu, start = cpu_seconds(gateway.pid), time.monotonic()
    start_samples = gateway.arrivals.samples
    memory = {"anon_mb": 0.0, "file_mb": 0.0, "duckdb_lib_mb": 0.0}
    while time.monotonic() - start < seconds:
        await asyncio.sleep(min(1.0, seconds))
        for key, value in memory_breakdown(gateway.pid).items():
            memory[key] = max(memory[key], value)
    elapsed = time.monotonic() - start
    cpu = cpu_seconds(gateway.pid) - start_cpu
    rss, peak = memory_mb(gateway.pid)
    return {
        "points_per_s": (gateway.arrivals.samples - start_samples) / elapsed,
        "cpu_share": cpu / elapsed,
        "rss_mb": rss,
        "peak_rss_mb": peak,
        "seconds": elapsed,
        **memory,
    }


async def throughput(
    root: Path, broker: MosquittoBroker, sim: SimProcess, seconds: float, interval_ms: int
) -> dict[str, float]:
    gateway = Gateway(root, "gw-bench-rate", broker)
    await gateway.peer.start()
    try:
        gateway.start(load_devices(sim, 25, interval_ms), batch_max_samples=2000)
        await wait(lambda: gateway.arrivals.samples > 50_000, 120, "data flowing")
        await asyncio.sleep(5)  # warm-up: connections and the first frames
        start_frames = len(gateway.arrivals.frames)
        result = await measure_window(gateway, seconds)
        ticks_per_s = 10 * float(sim.endpoints.get("speed", 1.0))
        result["offered_points_per_s"] = 5_000 * min(ticks_per_s, 1000 / interval_ms)
        window = gateway.arrivals.frames[start_frames:]
        lags = sorted(wall - newest for _, wall, newest, _ in window)
        result["latency_ms_p50"] = float(lags[len(lags) // 2])
        result["latency_ms_p99"] = float(lags[int(len(lags) * 0.99)])
    finally:
        gateway.stop()
        await gateway.peer.stop()
    return result


async def idle_gateway(
    root: Path, broker: MosquittoBroker, sim: SimProcess, seconds: float
) -> dict[str, float]:
    gateway = Gateway(root, "gw-bench-500", broker)
    await gateway.peer.start()
    try:
        gateway.start(load_devices(sim, 3, 1000, points_last=100))
        await wait(lambda: gateway.arrivals.samples > 2_000, 120, "data flowing")
        await asyncio.sleep(5)
        result = await measure_window(gateway, seconds)
    finally:
        gateway.stop()
        await gateway.peer.stop()
    return result


async def gateway_5000(
    root: Path, broker: MosquittoBroker, sim: SimProcess, seconds: float
) -> dict[str, float]:
    gateway = Gateway(root, "gw-bench-5000", broker)
    await gateway.peer.start()
    try:
        gateway.start(load_devices(sim, 25, 1000))
        await wait(lambda: gateway.arrivals.samples > 20_000, 120, "data flowing")
        await asyncio.sleep(5)
        result = await measure_window(gateway, seconds)
    finally:
        gateway.stop()
        await gateway.peer.stop()
    return result


async def soak(
    root: Path, broker: MosquittoBroker, sim: SimProcess, seconds: float
) -> dict[str, float]:
    """RSS and anonymous memory of the 500-point gateway after warm-up and at the end."""
    gateway = Gateway(root, "gw-bench-soak", broker)
    await gateway.peer.start()
    try:
        gateway.start(load_devices(sim, 3, 1000, points_last=100))
        await wait(lambda: gateway.arrivals.samples > 2_000, 120, "data flowing")
        await asyncio.sleep(60)  # warm-up: first checkpoint, first ack cycles
        start_rss, _ = memory_mb(gateway.pid)
        start_anon = memory_breakdown(gateway.pid)["anon_mb"]
        end = time.monotonic() + seconds
        trace: list[tuple[float, float]] = []
        while time.monotonic() < end:
            await asyncio.sleep(min(10.0, seconds))
            rss, _ = memory_mb(gateway.pid)
            trace.append((time.monotonic(), rss))
        samples = gateway.arrivals.samples
        end_rss, peak = memory_mb(gateway.pid)
        end_anon = memory_breakdown(gateway.pid)["anon_mb"]
        # Growth as the least-squares slope over the window, per hour: robust to one
        # sample taken just before or after a DuckDB checkpoint.
        slope = 0.0
        if len(trace) >= 2:
            t0 = trace[0][0]
            xs = [(t - t0) / 3600 for t, _ in trace]
            ys = [r for _, r in trace]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            var = sum((x - mx) ** 2 for x in xs)
            if var > 0:
                slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
        result = {
            "seconds": seconds,
            "start_rss_mb": start_rss,
            "end_rss_mb": end_rss,
            "peak_rss_mb": peak,
            "start_anon_mb": start_anon,
            "end_anon_mb": end_anon,
            "rss_growth_mb": end_rss - start_rss,
            "rss_slope_mb_per_h": slope,
            "samples": float(samples),
        }
    finally:
        gateway.stop()
        await gateway.peer.stop()
    return result


async def backlog_drain(
    root: Path, broker: MosquittoBroker, sim: SimProcess, outage_s: float
) -> dict[str, float]:
    gateway = Gateway(root, "gw-bench-drain", broker)
    await gateway.peer.start()
    try:
        gateway.start(load_devices(sim, 3, 1000, points_last=100))
        await wait(lambda: gateway.arrivals.samples > 2_000, 120, "data flowing")
        await asyncio.sleep(3)
        broker.stop()
        outage_started_ms = time.time_ns() // 1_000_000
        await asyncio.sleep(outage_s)
        births_before = len(gateway.arrivals.births)
        frames_before = len(gateway.arrivals.frames)
        restart_ms = time.time_ns() // 1_000_000
        broker.start()
        await wait(lambda: len(gateway.arrivals.births) > births_before, 120, "birth after outage")
        reconnected = gateway.arrivals.births[births_before]

        def backlog_frames() -> list[tuple[float, int, int, int]]:
            return [
                f
                for f in gateway.arrivals.frames[frames_before:]
                if outage_started_ms <= f[2] < restart_ms
            ]

        expected = 500 * outage_s * 0.98  # read during the outage (1 Hz, 500 points)
        await wait(
            lambda: sum(f[3] for f in backlog_frames()) >= expected,
            max(120.0, outage_s),
            "the backlog",
        )
        await asyncio.sleep(3)  # let stragglers land, then take the exact figures
        frames = backlog_frames()
        backlog_samples = sum(f[3] for f in frames)
        last = max(f[0] for f in frames)
        live_during = sum(
            f[3]
            for f in gateway.arrivals.frames[frames_before:]
            if f[2] >= restart_ms and f[0] <= last
        )
        _, peak = memory_mb(gateway.pid)
        result = {
            "outage_s": outage_s,
            "backlog_samples": float(backlog_samples),
            "drain_s": last - reconnected,
            "backlog_drain_points_per_s": backlog_samples / max(last - reconnected, 1e-9),
            "live_samples_during_drain": float(live_during),
            "peak_rss_mb": peak,
        }
    finally:
        gateway.stop()
        await gateway.peer.stop()
    return result


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="fieldtwin-bench-agent-"))
    broker = MosquittoBroker(root / "mosquitto")
    broker.add_user("hub")
    broker.start()
    sim = SimProcess.start(
        LOAD_SCENARIO,
        "--no-truth",
        "--speed",
        str(args.speed),
        timeout=120,
        stderr_path=root / "sim.log",
    )
    results: dict[str, Any] = {}
    phases = args.phases
    try:
        if "throughput" in phases:
            results["throughput"] = await throughput(
                root, broker, sim, args.throughput_s, args.interval_ms
            )
        if "gateway_500" in phases:
            results["gateway_500"] = await idle_gateway(root, broker, sim, args.idle_s)
        if "gateway_5000" in phases:
            results["gateway_5000"] = await gateway_5000(root, broker, sim, args.idle_s)
        if "drain" in phases:
            results["drain"] = await backlog_drain(root, broker, sim, args.outage_s)
        if "soak" in phases:
            results["soak"] = await soak(root, broker, sim, args.soak_s)
    finally:
        sim.stop()
        broker.stop()
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    print(
        f"fieldtwin agent benchmark: {platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} cores, {platform.machine()}"
    )
    print()
    rows = [("measurement", "result", "target")]
    summary: dict[str, Any] = {}
    rate = results.get("throughput")
    if rate:
        rows += [
            (
                f"sustained points/s (5,000 points every {args.interval_ms} ms, "
                f"{rate['offered_points_per_s']:,.0f} changes/s offered)",
                f"{rate['points_per_s']:,.0f}",
                ">= 20,000",
            ),
            ("agent CPU meanwhile (share of one core)", f"{rate['cpu_share']:.2f}", "<= 1.00"),
            (
                "read-to-hub latency of a frame's newest sample, p50 / p99",
                f"{rate['latency_ms_p50']:.0f} / {rate['latency_ms_p99']:.0f} ms",
                "",
            ),
        ]
        summary.update(
            points_per_s=round(rate["points_per_s"]),
            cpu_share_sustained=round(rate["cpu_share"], 3),
            latency_ms_p50=rate["latency_ms_p50"],
            latency_ms_p99=rate["latency_ms_p99"],
        )
    idle = results.get("gateway_500")
    if idle:
        rows += [
            (
                "500 points at 1 Hz: CPU share of one core",
                f"{100 * idle['cpu_share']:.2f} %",
                "<= 5 %",
            ),
            ("500 points at 1 Hz: peak RSS", f"{idle['peak_rss_mb']:.1f} MB", "<= 90 MB"),
            (
                "  of it: file-backed library pages / of which DuckDB's library",
                f"{idle['file_mb']:.1f} / {idle['duckdb_lib_mb']:.1f} MB",
                "",
            ),
            (
                "  of it: anonymous memory (heaps, buffers)",
                f"{idle['anon_mb']:.1f} MB",
                "<= 30 MB",
            ),
        ]
        summary.update(
            cpu_share_500pts_1hz=round(idle["cpu_share"], 4),
            rss_mb_500pts_1hz=round(idle["peak_rss_mb"], 1),
            anon_mb_500pts_1hz=round(idle["anon_mb"], 1),
        )
    big = results.get("gateway_5000")
    if big:
        rows += [
            ("5,000 points at 1 Hz: CPU share of one core", f"{100 * big['cpu_share']:.2f} %", ""),
            ("5,000 points at 1 Hz: peak RSS", f"{big['peak_rss_mb']:.1f} MB", "<= 100 MB"),
            ("  of it: anonymous memory", f"{big['anon_mb']:.1f} MB", ""),
        ]
        summary.update(
            rss_mb_5000pts=round(big["peak_rss_mb"], 1),
            anon_mb_5000pts=round(big["anon_mb"], 1),
        )
    drain = results.get("drain")
    if drain:
        rows += [
            (
                f"backlog after a {drain['outage_s']:.0f} s broker outage",
                f"{drain['backlog_samples']:,.0f} samples",
                "",
            ),
            (
                "backlog drain rate, live data flowing",
                f"{drain['backlog_drain_points_per_s']:,.0f} points/s",
                ">= 20,000",
            ),
            (
                "live samples delivered during the drain",
                f"{drain['live_samples_during_drain']:,.0f}",
                "",
            ),
            ("peak RSS of the draining agent", f"{drain['peak_rss_mb']:.1f} MB", ""),
        ]
        summary.update(
            backlog_drain_points_per_s=round(drain["backlog_drain_points_per_s"]),
            backlog_samples=round(drain["backlog_samples"]),
            outage_s=args.outage_s,
        )
    soaked = results.get("soak")
    if soaked:
        rows += [
            (
                f"soak, 500 points at 1 Hz for {soaked['seconds']:.0f} s: RSS after warm-up -> end",
                f"{soaked['start_rss_mb']:.1f} -> {soaked['end_rss_mb']:.1f} MB",
                "no growth",
            ),
            (
                "  RSS trend (least squares) / anonymous memory start -> end",
                f"{soaked['rss_slope_mb_per_h']:+.2f} MB/h / "
                f"{soaked['start_anon_mb']:.1f} -> {soaked['end_anon_mb']:.1f} MB",
                "",
            ),
        ]
        summary.update(
            soak_s=soaked["seconds"],
            soak_rss_growth_mb=round(soaked["rss_growth_mb"], 1),
            soak_rss_slope_mb_per_h=round(soaked["rss_slope_mb_per_h"], 2),
            soak_peak_rss_mb=round(soaked["peak_rss_mb"], 1),
        )
    for index, (name, result, target) in enumerate(rows):
        print(f"| {name} | {result} | {target} |")
        if index == 0:
            print("|---|---:|---:|")
    print()
    print(json.dumps(summary))
    return summary


PHASES = ("throughput", "gateway_500", "gateway_5000", "drain", "soak")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage-s", type=float, default=600.0, help="broker outage (default 600)")
    parser.add_argument("--throughput-s", type=float, default=30.0, help="throughput window")
    parser.add_argument("--idle-s", type=float, default=60.0, help="500-point window")
    parser.add_argument(
        "--interval-ms", type=int, default=100, help="poll interval of the throughput phase"
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="simulator speed: registers change 10 x speed times a second (default 1)",
    )
    parser.add_argument(
        "--phases",
        default="throughput,gateway_500,gateway_5000,drain",
        help=f"comma-separated phases to run, of {', '.join(PHASES)} (soak also needs --soak-s)",
    )
    parser.add_argument(
        "--soak-s", type=float, default=0.0, help="length of the soak phase (default: no soak)"
    )
    arguments = parser.parse_args()
    arguments.phases = {p.strip() for p in arguments.phases.split(",") if p.strip()}
    unknown = arguments.phases - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    if arguments.soak_s > 0:
        arguments.phases.add("soak")
    elif "soak" in arguments.phases:
        parser.error("the soak phase needs --soak-s")
    measured = asyncio.run(main(arguments))
    print("raw: " + json.dumps(measured), file=sys.stderr)
    report(measured, arguments)
