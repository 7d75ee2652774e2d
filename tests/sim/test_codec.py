"""Register codec: round trips, saturation, and agreement with pymodbus's own conversion."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.client.mixin import ModbusClientMixin

from fieldtwin.sim.codec import REGISTER_TYPES, RegisterCodec

orders = st.sampled_from(["big", "little"])
INT_RANGES = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
PYMODBUS_TYPES = {
    "int16": ModbusClientMixin.DATATYPE.INT16,
    "uint16": ModbusClientMixin.DATATYPE.UINT16,
    "int32": ModbusClientMixin.DATATYPE.INT32,
    "uint32": ModbusClientMixin.DATATYPE.UINT32,
    "int64": ModbusClientMixin.DATATYPE.INT64,
    "uint64": ModbusClientMixin.DATATYPE.UINT64,
    "float32": ModbusClientMixin.DATATYPE.FLOAT32,
    "float64": ModbusClientMixin.DATATYPE.FLOAT64,
}


@given(dtype=st.sampled_from(sorted(INT_RANGES)), data=st.data(), byte=orders, word=orders)
def test_integers_round_trip_in_every_order(
    dtype: str, data: st.DataObject, byte: str, word: str
) -> None:
    lo, hi = INT_RANGES[dtype]
    raw = data.draw(st.integers(lo, hi))
    codec = RegisterCodec(dtype, byte, word)  # type: ignore[arg-type]
    registers = codec.encode(raw)
    assert len(registers) == codec.count
    assert all(0 <= r <= 0xFFFF for r in registers)
    assert codec.decode(registers) == raw


@given(value=st.floats(allow_nan=False, allow_infinity=False, width=32), byte=orders, word=orders)
def test_float32_round_trips_exactly(value: float, byte: str, word: str) -> None:
    codec = RegisterCodec("float32", byte, word)  # type: ignore[arg-type]
    assert codec.decode(codec.encode(value)) == value


@given(dtype=st.sampled_from(REGISTER_TYPES), data=st.data(), word=orders)
def test_agrees_with_pymodbus_conversion(dtype: str, data: st.DataObject, word: str) -> None:
    # pymodbus's client conversion is what agents use: byte order big, word order either.
    if dtype in INT_RANGES:
        value: float = data.draw(st.integers(*INT_RANGES[dtype]))
    else:
        width = 32 if dtype == "float32" else 64
        value = data.draw(st.floats(allow_nan=False, allow_infinity=False, width=width))
    codec = RegisterCodec(dtype, "big", word)  # type: ignore[arg-type]
    decoded = ModbusClientMixin.convert_from_registers(
        codec.encode(value),
        PYMODBUS_TYPES[dtype],
        word_order=word,  # type: ignore[arg-type]
    )
    assert decoded == value


@pytest.mark.parametrize(
    ("byte", "word", "expected"),
    [
        ("big", "big", [0x4120, 0x0000]),  # ABCD
        ("big", "little", [0x0000, 0x4120]),  # CDAB
        ("little", "big", [0x2041, 0x0000]),  # BADC
        ("little", "little", [0x0000, 0x2041]),  # DCBA
    ],
)
def test_byte_and_word_order_vocabulary(byte: str, word: str, expected: list[int]) -> None:
    # 10.0 as float32 is 0x41200000 (A=41 B=20 C=00 D=00).
    assert RegisterCodec("float32", byte, word).encode(10.0) == expected  # type: ignore[arg-type]


def test_scale_offset_and_saturation() -> None:
    current = RegisterCodec("int16", scale=0.01)
    assert current.encode(12.34) == [1234]
    assert current.decode([1234]) == pytest.approx(12.34)
    assert current.encode(-1.0) == [struct.unpack(">H", struct.pack(">h", -100))[0]]
    assert current.decode(current.encode(1e9)) == pytest.approx(327.67)  # pinned at the rail
    assert current.decode(current.encode(-1e9)) == pytest.approx(-327.68)
    position = RegisterCodec("uint16", scale=0.1)
    assert position.encode(-5.0) == [0]
    assert position.quantize(45.04) == pytest.approx(45.0)
    shifted = RegisterCodec("uint16", scale=0.5, offset=-20.0)
    assert shifted.decode(shifted.encode(10.0)) == 10.0
    assert RegisterCodec("uint16").encode(math.nan) == [0]


def test_rejects_bad_definitions() -> None:
    with pytest.raises(ValueError, match="unknown register type"):
        RegisterCodec("int8")
    with pytest.raises(ValueError, match="scale"):
        RegisterCodec("uint16", scale=0.0)
    with pytest.raises(ValueError, match="needs 2 registers"):
        RegisterCodec("float32").decode([1])
