"""Coalescing Modbus reads: every point in exactly one block, limits respected."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from fieldtwin.agent.blocks import Span, plan_blocks


def span(
    address: int, count: int = 1, *, unit: int = 1, table: str = "input", ms: int = 1000
) -> Span[int]:
    return Span(unit, table, address, count, ms, address)


def test_water_plant_pump_station_is_four_reads() -> None:
    spans = [
        span(0, 2),
        span(2, 2),
        span(4),
        span(5),
        span(0, table="holding"),
        span(1, table="holding"),
        span(0, table="coil"),
        span(0, table="discrete"),
    ]
    blocks = plan_blocks(spans)
    assert [(b.table, b.address, b.count) for b in blocks] == [
        ("coil", 0, 1),
        ("discrete", 0, 1),
        ("holding", 0, 2),
        ("input", 0, 6),
    ]
    inputs = blocks[-1]
    # the payload of these spans is their address
    assert list(inputs.members) == [(0, 0), (2, 2), (4, 4), (5, 5)]


def test_gap_limit_splits_blocks() -> None:
    blocks = plan_blocks([span(0), span(10), span(30)], max_gap=10)
    assert [(b.address, b.count) for b in blocks] == [(0, 11), (30, 1)]
    assert len(plan_blocks([span(0), span(2)], max_gap=0)) == 2


def test_units_tables_and_intervals_never_mix() -> None:
    blocks = plan_blocks(
        [span(0, unit=1), span(1, unit=2), span(2, ms=500), span(3, table="holding")]
    )
    assert len(blocks) == 4


def test_block_size_limit() -> None:
    blocks = plan_blocks([span(a, 2) for a in range(0, 300, 2)], max_gap=8)
    assert [b.count for b in blocks] == [124, 124, 52]
    bits = plan_blocks([span(a, table="coil") for a in range(4000)])
    assert [b.count for b in bits] == [2000, 2000]


@given(
    points=st.lists(
        st.tuples(
            st.integers(1, 3),
            st.sampled_from(["input", "holding", "coil"]),
            st.integers(0, 2000),
            st.sampled_from([1, 2, 4]),
            st.sampled_from([500, 1000]),
        ),
        max_size=60,
    ),
    max_gap=st.integers(0, 20),
    max_registers=st.integers(4, 125),
)
def test_plan_properties(
    points: list[tuple[int, str, int, int, int]], max_gap: int, max_registers: int
) -> None:
    spans = [
        Span(unit, table, address, 1 if table == "coil" else count, ms, index)
        for index, (unit, table, address, count, ms) in enumerate(points)
    ]
    blocks = plan_blocks(spans, max_gap=max_gap, max_registers=max_registers, max_bits=100)
    served = sorted(p for b in blocks for _, p in b.members)
    assert served == list(range(len(spans)))  # each point exactly once
    for block in blocks:
        limit = 100 if block.table == "coil" else max_registers
        assert block.count <= limit
        for offset, index in block.members:
            member = spans[index]  # the payload is the span's index
            assert (member.unit_id, member.table, member.interval_ms) == (
                block.unit_id,
                block.table,
                block.interval_ms,
            )
            assert offset == member.address - block.address
            assert offset >= 0
            assert offset + member.count <= block.count
        # no hole wider than max_gap inside a block
        covered = sorted(
            {
                a
                for _, i in block.members
                for a in range(spans[i].address, spans[i].address + spans[i].count)
            }
        )
        holes = [b - a - 1 for a, b in itertools.pairwise(covered)]
        assert all(h <= max_gap for h in holes)
