"""Serial line sentences: framing, NMEA checksum, bounded buffering."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fieldtwin.agent.errors import LineError
from fieldtwin.agent.lineproto import LineSplitter, checksum, make_sentence, parse_sentence


def test_ambient_sentence_from_the_device_contract() -> None:
    line = make_sentence("AMB", ["12", "21.5", "48.0"])
    payload = b"AMB,12,21.5,48.0"
    assert line == b"$" + payload + b"*" + f"{checksum(payload):02X}".encode() + b"\r\n"
    sentence = parse_sentence(line)
    assert sentence.tag == "AMB"
    assert sentence.fields == ("12", "21.5", "48.0")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"AMB,1,2,3*00\r\n", "does not start"),
        (b"$AMB,1,2,3\r\n", "no '\\*XX' checksum"),
        (b"$AMB,1,2,3*ZZ\r\n", "not two hex digits"),
        (b"$AMB,1,2,3*00\r\n", "checksum mismatch"),
        (b"$\xff\xfe*01\r\n", "checksum mismatch|not ASCII"),
    ],
)
def test_bad_lines_are_refused(line: bytes, message: str) -> None:
    with pytest.raises(LineError, match=message):
        parse_sentence(line)


def test_checksum_can_be_switched_off() -> None:
    assert parse_sentence(b"$AMB,1,2\r\n", verify_checksum=False).fields == ("1", "2")


def test_splitter_reassembles_and_bounds_garbage() -> None:
    splitter = LineSplitter(max_line=64)
    line = make_sentence("AMB", ["1", "20.0", "50.0"])
    assert splitter.feed(line[:5]) == []
    assert splitter.feed(line[5:] + line) == [line, line]
    assert splitter.feed(b"x" * 500) == []
    assert splitter.overflows >= 1
    assert splitter.feed(line) == [line]  # recovers at the next sentence


@given(
    fields=st.lists(st.from_regex(r"[A-Za-z0-9.+-]{0,8}", fullmatch=True), max_size=6),
    flip=st.integers(1, 200),
)
def test_any_corrupted_byte_is_detected(fields: list[str], flip: int) -> None:
    line = make_sentence("AMB", fields)
    assert parse_sentence(line).fields == tuple(fields)
    body_end = line.index(b"*")
    position = 1 + flip % (body_end - 1)  # a byte covered by the checksum
    corrupted = bytearray(line)
    corrupted[position] ^= 1 << (flip % 7)
    if corrupted[position] in b"\r\n*$":
        return
    with pytest.raises(LineError):
        parse_sentence(bytes(corrupted))


@given(chunks=st.lists(st.integers(1, 30), min_size=1, max_size=20))
def test_splitting_is_independent_of_chunking(chunks: list[int]) -> None:
    stream = b"".join(make_sentence("AMB", [str(i), "1.0", "2.0"]) for i in range(10))
    splitter = LineSplitter()
    lines: list[bytes] = []
    position = 0
    for size in chunks * 50:
        if position >= len(stream):
            break
        lines += splitter.feed(stream[position : position + size])
        position += size
    lines += splitter.feed(stream[position:])
    assert [parse_sentence(line).fields[0] for line in lines] == [str(i) for i in range(10)]
