"""Mutation fuzzing: any byte string decodes or raises a ProtocolError, nothing else.

Two layers are attacked. Raw mutations (flips, truncations, extensions, insertions)
of valid frames exercise the outer parser and the signature check; re-signed
mutations of the signed part get past the signature, so the header and body
validators see arbitrary structures too. Seeded, so a failure reproduces.
"""

from __future__ import annotations

import os
import random

import msgpack
import pytest
from support.keys import gateway_key, key_for, registry

from fieldtwin.protocol import ProtocolError
from fieldtwin.protocol.frames import decode_frame, encode_frame
from fieldtwin.protocol.keys import KeyPair
from fieldtwin.protocol.messages import Data, Sample

from .test_golden import EPOCH, SENT_AT, VECTORS

RAW_MUTATIONS = int(os.environ.get("FIELDTWIN_FUZZ_RAW", "100000"))
RESIGNED_MUTATIONS = int(os.environ.get("FIELDTWIN_FUZZ_RESIGNED", "20000"))


def _signed_seeds() -> list[tuple[bytes, KeyPair]]:
    """Every golden vector plus one large frame, each with the key its sender signs with."""
    seeds = []
    for sender, seq, body in VECTORS.values():
        key = key_for(sender)
        seeds.append((encode_frame(key, sender, EPOCH, seq, SENT_AT, body), key))
    big = Data.of(tuple(Sample(f"e{i}", "a", i * 0.5, SENT_AT, 0) for i in range(50)))  # type: ignore[arg-type]
    seeds.append((encode_frame(gateway_key, "gw-01", EPOCH, 99, SENT_AT, big), gateway_key))
    return seeds


def _seed_frames() -> list[bytes]:
    return [raw for raw, _ in _signed_seeds()]


def test_every_seed_decodes_so_every_kind_is_fuzzed() -> None:
    """A seed the registry refuses would only ever exercise the signature check."""
    kinds = {type(decode_frame(raw, registry()).body).__name__ for raw in _seed_frames()}
    expected = {type(body).__name__ for _, _, body in VECTORS.values()}
    assert kinds == expected


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    op = rng.randrange(6)
    if op == 0:  # flip one to four bytes
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] ^= rng.randint(1, 255)
    elif op == 1:  # single bit flip
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif op == 2:  # truncate
        del buf[rng.randrange(len(buf)) :]
    elif op == 3:  # extend
        buf.extend(rng.randbytes(rng.randint(1, 16)))
    elif op == 4:  # insert
        at = rng.randrange(len(buf) + 1)
        buf[at:at] = rng.randbytes(rng.randint(1, 8))
    else:  # replace a byte with a msgpack type marker, the most confusing values
        buf[rng.randrange(len(buf))] = rng.choice(
            [
                0xC0,
                0xC1,
                0xC2,
                0xC3,
                0xC4,
                0xC5,
                0xC6,
                0xC7,
                0xCB,
                0xCF,
                0xD3,
                0xD9,
                0xDB,
                0xDC,
                0xDD,
                0xDE,
                0xDF,
                0x90,
                0x80,
                0xA0,
                0xFF,
            ]
        )
    return bytes(buf)


def _check(raw: bytes, original: bytes | None) -> bool:
    try:
        frame = decode_frame(raw, registry())
    except ProtocolError:
        return False
    if original is not None and raw != original:
        # A mutation that still decodes must not have changed what was signed.
        reference = decode_frame(original, registry())
        assert frame == reference or frame.body == reference.body
    return True


@pytest.mark.slow
def test_raw_mutations_decode_or_raise_protocol_error() -> None:
    rng = random.Random(20261121)
    frames = _seed_frames()
    decoded = 0
    for _ in range(RAW_MUTATIONS):
        original = rng.choice(frames)
        decoded += _check(_mutate(rng, original), original)
    # Practically every mutation must be refused: a bit flip that still verifies
    # would mean the signature does not cover what it should.
    assert decoded < RAW_MUTATIONS * 0.001


@pytest.mark.slow
def test_resigned_mutations_exercise_the_validators() -> None:
    rng = random.Random(4242)
    signed_parts = []
    for raw, key in _signed_seeds():
        signed, _ = msgpack.unpackb(raw)
        signed_parts.append((signed, key))
    outcomes: dict[str, int] = {}
    for _ in range(RESIGNED_MUTATIONS):
        signed, key = rng.choice(signed_parts)
        mutated = _mutate(rng, signed)
        raw = msgpack.packb([mutated, key.sign(mutated)])
        try:
            decode_frame(raw, registry())
            outcome = "decoded"
        except ProtocolError as exc:
            outcome = exc.reason
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # The validators, not just the parser, must have been reached and must have said no.
    assert outcomes.get("schema", 0) > RESIGNED_MUTATIONS * 0.05, outcomes
    assert outcomes.get("not_msgpack", 0) > 0, outcomes
