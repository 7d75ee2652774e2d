"""The serial sensor's ASCII line protocol."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fieldtwin.sim.lineproto import LineError, checksum, format_line, format_number, parse_line


def test_documented_example() -> None:
    line = format_line("AMB", 0, [18.14, 55.2], [1, 1])
    payload = "AMB,0,18.1,55.2"
    assert line == f"${payload}*{checksum(payload)}\r\n".encode()
    value = 0
    for byte in payload.encode():
        value ^= byte
    assert checksum(payload) == f"{value:02X}"
    parsed = parse_line(line)
    assert (parsed.talker, parsed.seq, parsed.values) == ("AMB", 0, (18.1, 55.2))


@given(
    seq=st.integers(0, 10**6),
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=5),
    decimals=st.integers(0, 4),
)
def test_round_trip(seq: int, values: list[float], decimals: int) -> None:
    line = format_line("AMB", seq, values, [decimals] * len(values))
    assert line.endswith(b"\r\n")
    parsed = parse_line(line)
    assert parsed.seq == seq % 65536
    assert parsed.values == pytest.approx([round(v, decimals) for v in values], abs=10**-decimals)


@given(values=st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=3))
def test_corrupt_lines_fail_the_checksum(values: list[float]) -> None:
    with pytest.raises(LineError, match="checksum"):
        parse_line(format_line("AMB", 1, values, [1] * len(values), corrupt=True))


def test_malformed_lines() -> None:
    for raw in [b"", b"AMB,1,2*00", b"$AMB,1,2", b"$AMB*41", b"\xff\xfe", "$AMB,x,1.0*" + "00"]:
        with pytest.raises(LineError):
            parse_line(raw)
    assert format_number(-0.04, 1) == "0.0"
    assert format_number(-10.0, 1) == "-10.0"
