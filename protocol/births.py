"""Births larger than one frame: split on the sender, assembled on the receiver (no I/O).

A 20,000-point gateway's birth is about 3 MB, over the 1 MiB frame limit. The sender
splits it into parts of whole points (each point's metadata travels with its state
sample), every part a signed ``birth`` frame with its own seq; part 0's seq names the
birth (``first`` in the later parts). The receiver holds parts until all have arrived
and applies the assembled birth once, so history stays exactly-once and the session
changes only when the birth is complete (docs/protocol.md, "Births in parts").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgpack

from fieldtwin.protocol.errors import FrameTooLarge, SchemaViolation
from fieldtwin.protocol.messages import MAX_BIRTH_PARTS, Birth, PointMeta, Sample

FRAME_OVERHEAD_BYTES = 512
"""Room for the signed header, the signature and the msgpack wrapping around a body."""


def body_size(birth: Birth) -> int:
    """Bytes of the birth's body as msgpack (the frame adds ``FRAME_OVERHEAD_BYTES`` at most)."""
    return len(msgpack.packb(birth.to_wire(), use_bin_type=True))


def split_birth(birth: Birth, first_seq: int, max_frame_bytes: int) -> tuple[Birth, ...]:
    """The birth as it goes on the wire: itself if it fits one frame, else parts.

    ``first_seq`` is the seq part 0 will take (the later parts name it). Points are kept
    whole and in order, each with its state samples; samples of points the birth does
    not describe travel as units of their own. Raises ``FrameTooLarge`` when even
    ``MAX_BIRTH_PARTS`` parts cannot hold it.
    """
    budget = max_frame_bytes - FRAME_OVERHEAD_BYTES
    if budget <= 0:
        raise FrameTooLarge(f"a frame limit of {max_frame_bytes} bytes leaves no room for a body")
    whole = body_size(birth)
    if whole <= budget:
        return (birth,)
    units = _units(birth)
    parts = max(2, math.ceil(whole / budget))
    while parts <= min(MAX_BIRTH_PARTS, len(units)):
        built = _build(birth, units, parts, first_seq)
        sizes = [body_size(part) for part in built]
        if max(sizes) <= budget:
            return built
        parts = max(parts + 1, math.ceil(parts * max(sizes) / budget))
    raise FrameTooLarge(
        f"a birth of {len(birth.points)} points and {len(birth.state)} samples ({whole} bytes) "
        f"does not fit {MAX_BIRTH_PARTS} frames of {max_frame_bytes} bytes"
    )


_Unit = tuple[PointMeta | None, list[int]]


def _units(birth: Birth) -> list[_Unit]:
    index = {(p.entity, p.attribute): i for i, p in enumerate(birth.points)}
    units: list[_Unit] = [(point, []) for point in birth.points]
    loose: list[_Unit] = []
    for j, sample in enumerate(birth.state):
        i = index.get((sample.entity, sample.attribute))
        if i is None:
            loose.append((None, [j]))
        else:
            units[i][1].append(j)
    return units + loose


def _build(birth: Birth, units: list[_Unit], parts: int, first_seq: int) -> tuple[Birth, ...]:
    out = []
    per_part = len(units) / parts
    for number in range(parts):
        chunk = units[round(number * per_part) : round((number + 1) * per_part)]
        indexes = [j for _, samples in chunk for j in samples]
        out.append(
            Birth(
                points=tuple(point for point, _ in chunk if point is not None),
                state=tuple(birth.state[j] for j in indexes),
                low_water=birth.low_water,
                info=birth.info,
                session=birth.session,
                state_seqs=tuple(birth.seq_of(j) for j in indexes) if birth.state_seqs else (),
                part=number,
                parts=parts,
                first=0 if number == 0 else first_seq,
            )
        )
    return tuple(out)


def check_same_birth(held: Birth, part: Birth) -> None:
    """Parts of one birth agree on what they all carry; raise ``SchemaViolation`` if not."""
    for name in ("parts", "low_water", "session"):
        if getattr(held, name) != getattr(part, name):
            raise SchemaViolation(
                f"body.{name}: birth part {part.part} says {getattr(part, name)}, part "
                f"{held.part} of the same birth said {getattr(held, name)}"
            )


def assemble_birth(parts: Sequence[Birth]) -> Birth:
    """One birth from all its parts (any order), as if it had travelled in one frame."""
    ordered = sorted(parts, key=lambda p: p.part)
    count = ordered[0].parts if ordered else 0
    if [p.part for p in ordered] != list(range(count)):
        raise SchemaViolation(
            f"birth parts {[p.part for p in ordered]} do not make a whole birth of {count}"
        )
    for part in ordered[1:]:
        check_same_birth(ordered[0], part)
    if count == 1:
        return ordered[0]
    state: list[Sample] = []
    seqs: list[int] = []
    with_seqs = any(p.state_seqs for p in ordered)
    for part in ordered:
        state.extend(part.state)
        if with_seqs:
            seqs.extend(part.seq_of(i) for i in range(len(part.state)))
    head = ordered[0]
    return Birth(
        points=tuple(point for part in ordered for point in part.points),
        state=tuple(state),
        low_water=head.low_water,
        info=head.info,
        session=head.session,
        state_seqs=tuple(seqs),
    )
