"""Simulator load mode: how fast N synthetic Modbus TCP devices answer full-table polls.

Run: python bench/sim_load.py [--devices 50] [--registers 200] [--seconds 10]

Starts ``fieldtwin sim run`` on a generated load scenario (--ephemeral --no-truth), then
polls every device as fast as it answers with one pymodbus async client per device
(reads of at most 125 registers, the Modbus limit), checks every value against the
documented pattern, and reports polls, registers per second and latency. The client
and the simulator share this machine's cores, so the figure is a floor for the
simulator, not a ceiling. Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pymodbus.client import AsyncModbusTcpClient

SCENARIO = """
[scenario]
name = "bench-load"
control = "127.0.0.1:0"

[load]
modbus_devices = {devices}
registers_per_device = {registers}
base_port = 15100
"""


def start_simulator(
    folder: Path, devices: int, registers: int
) -> tuple[subprocess.Popen[bytes], Any]:
    scenario = folder / "load.toml"
    scenario.write_text(SCENARIO.format(devices=devices, registers=registers))
    command = [
        sys.executable, "-m", "fieldtwin.protocol.cli", "--log-level", "warning", "sim", "run",
        str(scenario), "--ephemeral", "--json", "--no-truth",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise SystemExit(f"simulator exited with {process.wait()}")
    return process, json.loads(line)


async def poll(
    device: dict[str, Any], registers: int, until: float, latencies: list[float]
) -> tuple[int, int, int]:
    """Full-table polls of one device until ``until``: (polls, registers, bad values)."""
    client = AsyncModbusTcpClient("127.0.0.1", port=device["port"], timeout=10, retries=0)
    await client.connect()
    index = device["synthetic"]["index"]
    polls = moved = bad = 0
    try:
        while time.monotonic() < until:
            started = time.perf_counter()
            for start in range(0, registers, 125):
                count = min(125, registers - start)
                response = await client.read_input_registers(start, count=count, device_id=1)
                words = response.registers
                ticks = {(w - index * 1000 - (start + k)) % 65536 for k, w in enumerate(words)}
                bad += len(ticks) - 1  # one read is one tick: a single offset
                moved += len(words)
            latencies.append(time.perf_counter() - started)
            polls += 1
    finally:
        client.close()
    return polls, moved, bad


async def measure(endpoints: Any, registers: int, seconds: float) -> dict[str, Any]:
    devices = [d for d in endpoints["devices"] if "synthetic" in d]
    latencies: list[float] = []
    until = time.monotonic() + seconds
    started = time.monotonic()
    results = await asyncio.gather(*(poll(d, registers, until, latencies) for d in devices))
    elapsed = time.monotonic() - started
    polls = sum(r[0] for r in results)
    moved = sum(r[1] for r in results)
    latencies.sort()
    return {
        "devices": len(devices),
        "registers_per_device": registers,
        "seconds": round(elapsed, 2),
        "polls": polls,
        "polls_per_s": round(polls / elapsed, 1),
        "registers_per_s": round(moved / elapsed),
        "poll_latency_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "poll_latency_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        "bad_values": sum(r[2] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--registers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ft-bench-sim-") as folder:
        process, endpoints = start_simulator(Path(folder), args.devices, args.registers)
        try:
            result = asyncio.run(measure(endpoints, args.registers, args.seconds))
        finally:
            process.send_signal(signal.SIGINT)
            result_code = process.wait(60)
    result["simulator_exit"] = result_code
    result["cpus"] = os.cpu_count()
    print(f"{'figure':<24} value")
    for key, value in result.items():
        print(f"{key:<24} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
