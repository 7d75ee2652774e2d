"""Modbus PDUs and framings, checked against pymodbus as the reference implementation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.framer.rtu import FramerRTU
from pymodbus.pdu.decoders import DecodePDU

from fieldtwin.sim.modbus import (
    ExceptionCode,
    FrameError,
    MbapDecoder,
    ModbusException,
    Request,
    RtuDecoder,
    crc16,
    encode_exception,
    encode_read_response,
    encode_request,
    encode_write_response,
    mbap_frame,
    parse_request,
    rtu_frame,
)

reads = st.builds(
    Request,
    function=st.sampled_from([3, 4]),
    address=st.integers(0, 65535 - 125),
    count=st.integers(1, 125),
)
bit_reads = st.builds(
    Request,
    function=st.sampled_from([1, 2]),
    address=st.integers(0, 65535 - 2000),
    count=st.integers(1, 2000),
)


@st.composite
def writes(draw: st.DrawFn) -> Request:
    function = draw(st.sampled_from([5, 6, 15, 16]))
    if function == 5:
        return Request(5, draw(st.integers(0, 65535)), 1, (draw(st.booleans()),))
    if function == 6:
        return Request(6, draw(st.integers(0, 65535)), 1, (draw(st.integers(0, 65535)),))
    if function == 15:
        bits = tuple(draw(st.lists(st.booleans(), min_size=1, max_size=1968)))
        return Request(15, draw(st.integers(0, 65536 - len(bits))), len(bits), bits)
    words = tuple(draw(st.lists(st.integers(0, 65535), min_size=1, max_size=123)))
    return Request(16, draw(st.integers(0, 65536 - len(words))), len(words), words)


@given(request=st.one_of(reads, bit_reads, writes()))
def test_requests_round_trip(request: Request) -> None:
    assert parse_request(encode_request(request)) == request


@given(request=writes())
def test_pymodbus_server_decoder_reads_our_requests(request: Request) -> None:
    pdu = DecodePDU(is_server=True).decode(encode_request(request))
    assert pdu is not None
    assert pdu.function_code == request.function
    assert pdu.address == request.address


@given(request=reads, data=st.data())
def test_pymodbus_client_decodes_register_responses(request: Request, data: st.DataObject) -> None:
    words = data.draw(
        st.lists(st.integers(0, 65535), min_size=request.count, max_size=request.count)
    )
    pdu = DecodePDU(is_server=False).decode(encode_read_response(request, words))
    assert pdu is not None
    assert pdu.registers == words


@given(request=bit_reads, data=st.data())
def test_pymodbus_client_decodes_bit_responses(request: Request, data: st.DataObject) -> None:
    bits = data.draw(st.lists(st.booleans(), min_size=request.count, max_size=request.count))
    pdu = DecodePDU(is_server=False).decode(encode_read_response(request, bits))
    assert pdu is not None
    assert pdu.bits[: request.count] == bits


@given(request=writes())
def test_pymodbus_client_decodes_write_echoes(request: Request) -> None:
    pdu = DecodePDU(is_server=False).decode(encode_write_response(request))
    assert pdu is not None
    assert pdu.function_code == request.function
    assert pdu.address == request.address


def test_exceptions_for_bad_requests() -> None:
    cases = [
        (bytes([3, 0, 0, 0, 0]), ExceptionCode.ILLEGAL_DATA_VALUE),  # quantity 0
        (bytes([3, 0, 0, 0, 126]), ExceptionCode.ILLEGAL_DATA_VALUE),  # quantity > 125
        (bytes([4, 0xFF, 0xFF, 0, 2]), ExceptionCode.ILLEGAL_DATA_ADDRESS),  # past 65535
        (bytes([5, 0, 0, 0x12, 0x34]), ExceptionCode.ILLEGAL_DATA_VALUE),  # coil not 0/FF00
        (bytes([16, 0, 0, 0, 2, 3, 0, 0, 0]), ExceptionCode.ILLEGAL_DATA_VALUE),  # byte count
        (bytes([43, 14, 1, 0]), ExceptionCode.ILLEGAL_FUNCTION),
        (bytes([3, 0]), ExceptionCode.ILLEGAL_DATA_VALUE),
    ]
    for pdu, code in cases:
        with pytest.raises(ModbusException) as caught:
            parse_request(pdu)
        assert caught.value.code == code, pdu
    with pytest.raises(FrameError):
        parse_request(b"")
    assert encode_exception(4, ExceptionCode.SERVER_DEVICE_FAILURE) == bytes([0x84, 4])


@given(data=st.binary(max_size=256))
def test_crc_matches_pymodbus(data: bytes) -> None:
    # pymodbus returns the CRC byte-swapped, ready to pack big-endian; on the wire both
    # are the same two bytes, low byte first.
    assert crc16(data).to_bytes(2, "little") == FramerRTU.compute_CRC(data).to_bytes(2, "big")


def test_rtu_frames_and_corruption() -> None:
    frame = rtu_frame(1, bytes([4, 0, 0, 0, 2]))
    assert frame == bytes([1, 4, 0, 0, 0, 2, 0x71, 0xCB])  # the classic example frame
    assert crc16(frame) == 0
    bad = rtu_frame(1, bytes([4, 0, 0, 0, 2]), corrupt=True)
    assert bad[:-2] == frame[:-2]
    assert crc16(bad) != 0


@given(
    units=st.lists(st.integers(1, 247), min_size=1, max_size=5),
    cut=st.integers(0, 40),
)
def test_rtu_decoder_reassembles_split_requests(units: list[int], cut: int) -> None:
    requests = [rtu_frame(u, encode_request(Request(16, 10, 2, (1, 2)))) for u in units]
    stream = b"".join(requests)
    cut = min(cut, len(stream))
    decoder = RtuDecoder()
    frames = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
    assert [f.unit for f in frames] == units
    assert all(parse_request(f.pdu) == Request(16, 10, 2, (1, 2)) for f in frames)
    assert decoder.pending == 0


def test_rtu_decoder_counts_and_drops_bad_crc() -> None:
    decoder = RtuDecoder()
    bad = rtu_frame(2, bytes([3, 0, 0, 0, 1]), corrupt=True)
    assert decoder.feed(bad) == []
    assert decoder.crc_errors == 1
    assert decoder.pending == 0
    good = rtu_frame(2, bytes([3, 0, 0, 0, 1]))
    assert [f.unit for f in decoder.feed(good)] == [2]
    # An unknown function is accepted when its CRC is right, so it can get exception 1.
    assert decoder.feed(rtu_frame(3, bytes([43, 14, 1, 0]))) == [
        type(decoder.feed(good)[0])(3, bytes([43, 14, 1, 0]))
    ]
    decoder.feed(b"\x01\x03\x00")
    assert decoder.pending == 3
    assert decoder.flush() == 3


def test_mbap_framing() -> None:
    decoder = MbapDecoder()
    stream = mbap_frame(7, 1, bytes([3, 0, 0, 0, 2])) + mbap_frame(8, 2, bytes([4, 0, 1, 0, 1]))
    frames = decoder.feed(stream[:9]) + decoder.feed(stream[9:])
    assert [(f.transaction, f.unit, f.pdu) for f in frames] == [
        (7, 1, bytes([3, 0, 0, 0, 2])),
        (8, 2, bytes([4, 0, 1, 0, 1])),
    ]
    with pytest.raises(FrameError, match="protocol id"):
        MbapDecoder().feed(b"\x00\x01\x00\x05\x00\x06\x01\x03\x00\x00\x00\x01")
    with pytest.raises(FrameError, match="length"):
        MbapDecoder().feed(b"\x00\x01\x00\x00\x04\x00\x01")
