"""Hub benchmarks: ingest throughput and publish-to-twin latency.

Run: python bench/hub.py [--seconds S] [--rate POINTS_PER_S] [--duration S]

1. Ingest points/s on one core: signed ``data`` frames of 100 points (prepared before
   the clock starts) go through ``IngestCore.process`` in batches, as the hub's
   ingest loop hands them over: verify + decode, replay check, last-writer-wins
   merge, one DuckDB transaction (frames, history, current state, tracker, audit),
   and the ack ranges. DuckDB runs with one thread.
2. Publish-to-twin latency: a separate process signs and publishes 100-point frames
   at the given rate through a real Mosquitto (started here on a free port) to a
   complete hub (``fieldtwin.hub.runtime.Hub``, drift cycle every second over the
   benchmark's 1,000 declared points); for each frame, latency is the time from just
   before ``publish`` to the commit of the batch that holds it (both stamped with the
   wall clock of this machine). The first 10 % of frames (connection warm-up) are
   not counted.

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.broker import MosquittoBroker  # noqa: E402
from support.hub_env import write_hub_config  # noqa: E402

from fieldtwin.hub.audit import AuditChain  # noqa: E402
from fieldtwin.hub.config import HubConfig, load_hub_config  # noqa: E402
from fieldtwin.hub.ingest import Inbound, IngestCore, IngestOutcome  # noqa: E402
from fieldtwin.hub.metrics import HubMetrics  # noqa: E402
from fieldtwin.hub.runtime import Hub  # noqa: E402
from fieldtwin.hub.store import TwinStore  # noqa: E402
from fieldtwin.protocol.frames import FrameSigner  # noqa: E402
from fieldtwin.protocol.keys import KeyPair, load_private_key  # noqa: E402
from fieldtwin.protocol.messages import Data  # noqa: E402
from fieldtwin.protocol.topics import uplink_topic  # noqa: E402

POINTS_PER_FRAME = 100
ENTITIES = 50
ATTRIBUTES_PER_ENTITY = 20


def _schema() -> str:
    """The benchmark's twin: 50 declared tanks of 20 numeric attributes (1,000 points)."""
    attributes = "".join(
        f"\n[types.bench_tank.attributes.a{i}]\ninterval_s = 1.0\nhigh = {{ warning = 1000.0 }}\n"
        for i in range(ATTRIBUTES_PER_ENTITY)
    )
    entities = "".join(
        f'\n[[entities]]\nid = "bt-{n}"\ntype = "bench_tank"\ngateway = "gw-01"\n'
        for n in range(ENTITIES)
    )
    return attributes + entities


def _frames(
    key: KeyPair, gateway: str, epoch: int, first_seq: int, count: int
) -> list[tuple[str, bytes]]:
    signer = FrameSigner(gateway, key)
    topic = uplink_topic(gateway, "data")
    now = int(time.time() * 1000)
    out = []
    for n in range(count):
        seq = first_seq + n
        base = seq * POINTS_PER_FRAME
        body = Data(
            tuple(f"bt-{(base + i) // ATTRIBUTES_PER_ENTITY % ENTITIES}" for i in range(100)),
            tuple(f"a{(base + i) % ATTRIBUTES_PER_ENTITY}" for i in range(100)),
            tuple(20.0 + ((base + i) % 997) * 0.01 for i in range(100)),
            tuple(now + seq for _ in range(100)),
            tuple(0 for _ in range(100)),
        )
        out.append((topic, signer.encode(epoch, seq, now, body)))
    return out


def _core(config: HubConfig) -> tuple[TwinStore, IngestCore]:
    store = TwinStore.open(config.database, memory_limit="512MB", threads=1)
    state, tracker = store.load_state()
    return store, IngestCore(
        config,
        store,
        state,
        tracker,
        config.registry(),
        AuditChain(*store.audit_head()),
        HubMetrics(),
        next_frame_id=store.next_ids()["frame"],
    )


def ingest_rate(workdir: Path, batch_frames: int, seconds: float) -> float:
    """Points per second through IngestCore at ``batch_frames`` frames per batch."""
    files = write_hub_config(workdir / f"ingest-{batch_frames}", extra=_schema())
    config = load_hub_config(files.config)
    store, core = _core(config)
    key = files.gateway_keys["gw-01"]
    epoch = int(time.time() * 1000)
    seq = 1
    warm = _frames(key, "gw-01", epoch, seq, batch_frames)
    core.process([Inbound(t, p, 0) for t, p in warm])
    seq += batch_frames
    points = 0
    elapsed = 0.0
    try:
        while elapsed < seconds:
            messages = [
                Inbound(t, p, int(time.time() * 1000))
                for t, p in _frames(key, "gw-01", epoch, seq, batch_frames)
            ]
            seq += batch_frames
            start = time.perf_counter()
            outcome = core.process(messages)
            core.tracker.ranges("gw-01")  # what the ack would carry
            elapsed += time.perf_counter() - start
            if outcome.error is not None or outcome.rejected:
                raise RuntimeError(f"ingest failed: {outcome.error} {outcome.rejected}")
            points += sum(a.samples for a in outcome.accepted)
    finally:
        store.close()
    return points / elapsed


# -- latency ---------------------------------------------------------------------------------


def _publisher(
    url: str, password: str, key_path: str, rate: float, duration: float, pipe: Connection
) -> None:
    asyncio.run(_publish(url, password, key_path, rate, duration, pipe))


async def _publish(
    url: str, password: str, key_path: str, rate: float, duration: float, pipe: Connection
) -> None:
    import aiomqtt

    host, port = url.removeprefix("mqtt://").split(":")
    key = load_private_key(key_path)
    frames_per_s = rate / POINTS_PER_FRAME
    count = int(frames_per_s * duration)
    epoch = int(time.time() * 1000)
    sent: dict[int, int] = {}
    async with aiomqtt.Client(
        host, int(port), username="gw-01", password=password, timeout=10, max_inflight_messages=100
    ) as client:
        pipe.send("ready")
        pipe.recv()
        start = time.perf_counter()
        pending: set[asyncio.Task[None]] = set()
        for index in range(count):
            due = start + index / frames_per_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            # signed when sent, so source timestamps are current (the twin checks them)
            ((topic, payload),) = _frames(key, "gw-01", epoch, index + 1, 1)
            sent[index + 1] = time.time_ns()
            task = asyncio.create_task(client.publish(topic, payload, qos=1))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
    pipe.send((epoch, sent))


async def latency(workdir: Path, rate: float, duration: float) -> dict[str, float]:
    broker = MosquittoBroker(workdir / "mosquitto")
    hub_password = broker.add_user("hub")
    gw_password = broker.add_user("gw-01")
    broker.start()
    try:
        files = write_hub_config(
            workdir / "latency",
            broker_url=broker.url,
            password=hub_password,
            client_id="ft-hub-bench",
            silent_s=600,
            missing_s=600,
            drift_interval_s=1.0,
            extra=_schema(),
        )
        hub = Hub(load_hub_config(files.config))
        applied: dict[int, int] = {}
        received: dict[int, int] = {}

        expected: list[int] = []
        all_applied = asyncio.Event()

        def on_batch(outcome: IngestOutcome) -> None:
            for accepted in outcome.accepted:
                applied[accepted.seq] = outcome.committed_ns
                received[accepted.seq] = accepted.received_ns
            if expected and len(applied) >= expected[0]:
                all_applied.set()

        hub.listeners.append(on_batch)
        task = asyncio.create_task(hub.run(), name="bench-hub")
        try:
            while not hub.mqtt_ready.is_set():
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
            ours, theirs = multiprocessing.Pipe()
            process = multiprocessing.get_context("spawn").Process(
                target=_publisher,
                args=(
                    broker.url,
                    gw_password,
                    str(files.config.parent / "keys" / "gw-01.key"),
                    rate,
                    duration,
                    theirs,
                ),
            )
            process.start()
            await asyncio.to_thread(ours.recv)
            ours.send("go")
            _, sent = await asyncio.to_thread(ours.recv)
            process.join(30)
            expected.append(len(sent))
            if len(applied) < len(sent):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(all_applied.wait(), 30)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        broker.stop()
    warmup = max(1, len(sent) // 10)  # the first second includes connection set-up
    samples = [
        (applied[seq] - sent[seq]) / 1e6 for seq in sorted(sent) if seq > warmup and seq in applied
    ]
    if len(samples) < len(sent) - warmup:
        raise RuntimeError(f"only {len(samples)} of {len(sent) - warmup} frames reached the twin")
    samples.sort()
    hop = sorted((received[s] - sent[s]) / 1e6 for s in sent if s > warmup and s in received)
    return {
        "broker_p50": statistics.median(hop),
        "broker_p99": hop[min(len(hop) - 1, int(len(hop) * 0.99))],
        "frames": len(samples),
        "p50": statistics.median(samples),
        "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "max": samples[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per ingest measurement")
    parser.add_argument("--rounds", type=int, default=3, help="ingest measurements (median)")
    parser.add_argument("--rate", type=float, default=10_000, help="points/s for the latency run")
    parser.add_argument("--duration", type=float, default=20.0, help="latency run length (s)")
    args = parser.parse_args()

    rows: list[tuple[str, str]] = []
    result: dict[str, Any] = {"python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="ft-bench-hub-") as tmp:
        workdir = Path(tmp)
        rates = {}
        for batch in (1, 10, 100):
            figures = [
                ingest_rate(workdir / f"r{round_}", batch, args.seconds)
                for round_ in range(args.rounds)
            ]
            rates[batch] = statistics.median(figures)
            rows.append(
                (
                    f"ingest, {batch} frame(s) of 100 points per batch",
                    f"{rates[batch]:,.0f} points/s",
                )
            )
        lat = asyncio.run(latency(workdir, args.rate, args.duration))
    at = f"at {args.rate:,.0f} points/s"
    rows.append((f"publish-to-twin latency p50 {at}", f"{lat['p50']:.1f} ms"))
    rows.append((f"publish-to-twin latency p99 {at}", f"{lat['p99']:.1f} ms"))
    rows.append(("publish-to-twin latency max", f"{lat['max']:.1f} ms"))
    rows.append(
        (
            "  of which publish-to-hub (broker hop) p50 / p99",
            f"{lat['broker_p50']:.1f} / {lat['broker_p99']:.1f} ms",
        )
    )
    width = max(len(name) for name, _ in rows)
    print(f"{'measurement'.ljust(width)}  result")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    result.update(
        {
            "ingest_points_per_s": round(rates[100]),
            "ingest_points_per_s_batch_1": round(rates[1]),
            "ingest_points_per_s_batch_10": round(rates[10]),
            "latency_rate_points_per_s": args.rate,
            "latency_frames": lat["frames"],
            "latency_p50_ms": round(lat["p50"], 2),
            "latency_p99_ms": round(lat["p99"], 2),
            "latency_max_ms": round(lat["max"], 2),
            "broker_hop_p50_ms": round(lat["broker_p50"], 2),
            "broker_hop_p99_ms": round(lat["broker_p99"], 2),
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
