"""Births in parts: split on the sender, assembled on the receiver, checked on the wire."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.keys import gateway_key, registry

from fieldtwin.protocol.births import (
    FRAME_OVERHEAD_BYTES,
    assemble_birth,
    body_size,
    split_birth,
)
from fieldtwin.protocol.errors import FrameTooLarge, SchemaViolation
from fieldtwin.protocol.frames import DEFAULT_MAX_FRAME_BYTES, decode_frame, encode_frame
from fieldtwin.protocol.messages import MAX_BIRTH_PARTS, Birth, PointMeta, Quality, Sample


def big_birth(points: int, *, state_every: int = 1, loose: int = 0) -> Birth:
    metas = tuple(
        PointMeta(
            f"plc-{i // 100:03d}",
            f"r{i % 100}",
            "uint16",
            "",
            False,
            None,
            None,
            1000,
            f"plc unit 1 hr {i}",
            f"dev-{i // 1000}",
        )
        for i in range(points)
    )
    state = [
        Sample(m.entity, m.attribute, i, 1_700_000_000_000 + i, Quality.GOOD)
        for i, m in enumerate(metas)
        if i % state_every == 0
    ]
    state += [Sample("extra", f"a{i}", 1.5, 1_700_000_000_000, Quality.GOOD) for i in range(loose)]
    return Birth(
        metas,
        tuple(state),
        low_water=11,
        info={"agent": "test"},
        session=3,
        state_seqs=tuple(5 + (i % 7) for i in range(len(state))),
    )


def test_a_small_birth_travels_whole() -> None:
    birth = big_birth(10)
    assert split_birth(birth, 40, DEFAULT_MAX_FRAME_BYTES) == (birth,)


def test_a_20000_point_birth_splits_into_frames_under_the_limit_and_assembles_back() -> None:
    birth = big_birth(20_000)
    assert body_size(birth) > DEFAULT_MAX_FRAME_BYTES  # the case of the issue
    parts = split_birth(birth, 40, DEFAULT_MAX_FRAME_BYTES)
    assert 2 <= len(parts) <= 4
    for number, part in enumerate(parts):
        assert (part.part, part.parts) == (number, len(parts))
        assert part.first == (0 if number == 0 else 40)
        assert (part.low_water, part.session, dict(part.info)) == (11, 3, {"agent": "test"})
        frame = encode_frame(gateway_key, "gw-01", 1, 40 + number, 5, part)
        assert len(frame) <= DEFAULT_MAX_FRAME_BYTES
        assert decode_frame(frame, registry()).body == part
    # every point's state sample travels in the part that describes the point
    for part in parts:
        described = {(p.entity, p.attribute) for p in part.points}
        assert {(s.entity, s.attribute) for s in part.state} <= described
    assert assemble_birth(list(reversed(parts))) == birth


def test_samples_without_metadata_travel_too() -> None:
    birth = big_birth(12_000, state_every=3, loose=50)
    parts = split_birth(birth, 9, DEFAULT_MAX_FRAME_BYTES)
    assert len(parts) > 1
    assert assemble_birth(parts) == birth


def test_a_birth_that_cannot_fit_the_part_limit_is_refused_with_figures() -> None:
    birth = big_birth(3000)
    assert body_size(birth) > MAX_BIRTH_PARTS * 1024
    with pytest.raises(FrameTooLarge, match=f"does not fit {MAX_BIRTH_PARTS} frames of 1024 bytes"):
        split_birth(birth, 2, 1024)


def test_missing_or_inconsistent_parts_do_not_assemble() -> None:
    parts = split_birth(big_birth(20_000), 40, DEFAULT_MAX_FRAME_BYTES)
    with pytest.raises(SchemaViolation, match="do not make a whole birth"):
        assemble_birth(parts[:-1])
    other = Birth(
        parts[1].points,
        parts[1].state,
        low_water=12,
        info=parts[1].info,
        session=3,
        state_seqs=parts[1].state_seqs,
        part=1,
        parts=parts[1].parts,
        first=40,
    )
    with pytest.raises(SchemaViolation, match="low_water"):
        assemble_birth([parts[0], other, *parts[2:]])


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"part": 2, "parts": 2}, "part 2 of 2"),
        ({"part": 0, "parts": MAX_BIRTH_PARTS + 1}, "1 to 64 parts"),
        ({"part": 1, "parts": 2, "first": 0}, "body.first"),
        ({"part": 0, "parts": 2, "first": 4}, "body.first"),
    ],
)
def test_part_numbering_is_validated(changes: dict[str, int], error: str) -> None:
    with pytest.raises(SchemaViolation, match=error):
        Birth((), (), **changes)  # type: ignore[arg-type]


def _signed_birth_body(seq: int, body: dict[str, object]) -> bytes:
    base = Birth((), ()).to_wire()
    base.update(body)
    signed = msgpack.packb(
        [1, "birth", "gw-01", gateway_key.key_id, 1, seq, 5, base], use_bin_type=True
    )
    return msgpack.packb([signed, gateway_key.sign(signed)], use_bin_type=True)


@pytest.mark.parametrize(
    ("seq", "body", "error"),
    [
        (7, {"part": 1, "parts": 2, "first": 7}, "not earlier than its own seq"),
        (7, {"part": 1, "parts": 2, "first": 9}, "not earlier than its own seq"),
        (7, {"part": 1, "parts": 2, "first": 5, "session": 6}, "later than this birth 5"),
        (7, {"part": 3, "parts": 2, "first": 5}, r"body.part"),
        (7, {"parts": 0}, r"body.parts"),
    ],
)
def test_a_receiver_refuses_inconsistent_parts(
    seq: int, body: dict[str, object], error: str
) -> None:
    with pytest.raises(SchemaViolation, match=error):
        decode_frame(_signed_birth_body(seq, body), registry())


def test_births_of_older_senders_without_part_fields_still_decode() -> None:
    raw = Birth((), ()).to_wire()
    for key in ("part", "parts", "first"):
        del raw[key]
    assert Birth.from_wire(raw) == Birth((), ())


@settings(max_examples=40, deadline=None)
@given(
    points=st.integers(0, 3000),
    every=st.integers(1, 4),
    loose=st.integers(0, 30),
    limit=st.integers(8_000, 200_000),
)
def test_split_then_assemble_is_the_identity(
    points: int, every: int, loose: int, limit: int
) -> None:
    birth = big_birth(points, state_every=every, loose=loose)
    try:
        parts = split_birth(birth, 9, limit)
    except FrameTooLarge:
        assert body_size(birth) > limit - FRAME_OVERHEAD_BYTES
        return
    assert all(body_size(p) <= limit - FRAME_OVERHEAD_BYTES for p in parts)
    assert assemble_birth(parts) == birth
