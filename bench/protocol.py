"""Wire protocol throughput: encode+sign and verify+decode of data frames.

Run: python bench/protocol.py [--seconds S]. Single-threaded, so the figures are for
one core. Prints a table, then one JSON object as the last line; the number after the
last underscore of a key is the points per frame.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator

from fieldtwin.protocol.frames import Frame, decode_frame, encode_frame
from fieldtwin.protocol.keys import KeyPair, KeyRegistry
from fieldtwin.protocol.messages import Data, Quality, Sample

POINTS_PER_FRAME = (1, 10, 100)


def _rate(operation: Callable[[], object], seconds: float, rounds: int) -> float:
    """Median of ``rounds`` measurements; the machine is shared, so single runs wander."""
    return statistics.median(_rate_once(operation, seconds) for _ in range(rounds))


def _rate_once(operation: Callable[[], object], seconds: float) -> float:
    """Operations per second, measured over whole batches for at least ``seconds``."""
    operation()  # warm caches
    batch = 1
    while True:
        start = time.perf_counter()
        for _ in range(batch):
            operation()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return batch / elapsed
        batch = max(batch * 2, int(batch * seconds / max(elapsed, 1e-6) * 1.1))


def _frame_body(points: int, now_ms: int) -> Data:
    return Data.of(
        tuple(
            Sample(f"tank-{i % 50}", f"attr-{i}", 20.0 + i * 0.125, now_ms - i, Quality.GOOD)
            for i in range(points)
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per figure (median)")
    args = parser.parse_args()

    key = KeyPair.generate()
    registry = KeyRegistry.of({"gw-bench": key.public})
    now_ms = int(time.time() * 1000)
    results: dict[str, float] = {}
    rows = []
    for points in POINTS_PER_FRAME:
        body = _frame_body(points, now_ms)
        seqs = iter(range(1, 1 << 62))
        raw = encode_frame(key, "gw-bench", 1, 1, now_ms, body)

        def encode(body: Data = body, seqs: Iterator[int] = seqs) -> bytes:
            return encode_frame(key, "gw-bench", 1, next(seqs), now_ms, body)

        def decode(raw: bytes = raw) -> Frame:
            return decode_frame(raw, registry)

        encode_rate = _rate(encode, args.seconds, args.rounds)
        decode_rate = _rate(decode, args.seconds, args.rounds)
        results[f"sign_encode_frames_per_s_{points}"] = round(encode_rate)
        results[f"sign_encode_points_per_s_{points}"] = round(encode_rate * points)
        results[f"verify_decode_frames_per_s_{points}"] = round(decode_rate)
        results[f"verify_decode_points_per_s_{points}"] = round(decode_rate * points)
        rows.append(
            (points, len(raw), encode_rate, encode_rate * points, decode_rate, decode_rate * points)
        )

    # The floor under verify+decode: one bare Ed25519 verification of a small message.
    signed = b"x" * 150
    signature = key.sign(signed)
    verify_rate = _rate(lambda: key.public.key.verify(signature, signed), args.seconds, args.rounds)
    results["ed25519_verify_only_per_s"] = round(verify_rate)

    print(
        f"fieldtwin protocol benchmark — {platform.python_implementation()} "
        f"{platform.python_version()}, one core, median of {args.rounds} x {args.seconds:g} s"
    )
    header = (
        "points/frame",
        "bytes",
        "sign+enc fr/s",
        "sign+enc pt/s",
        "verify+dec fr/s",
        "verify+dec pt/s",
    )
    print("  ".join(f"{h:>15}" for h in header))
    for points, size, enc, enc_pts, dec, dec_pts in rows:
        print("  ".join(f"{v:>15,.0f}" for v in (points, size, enc, enc_pts, dec, dec_pts)))
    print(
        f"bare Ed25519 verify (cryptography/OpenSSL), the ceiling for verify+decode: "
        f"{verify_rate:,.0f}/s"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
