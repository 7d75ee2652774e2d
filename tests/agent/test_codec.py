"""The register codec: one description serves reads and writes, in every byte/word order."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fieldtwin.agent.codec import (
    ORDER_NAMES,
    RegisterCodec,
    decode_all_orders,
    pack_registers,
    shortest_float32,
)
from fieldtwin.agent.errors import CodecError

ORDERS = list(ORDER_NAMES)
orders = st.sampled_from(ORDERS)
INT_RANGES = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


@pytest.mark.parametrize(
    ("byte_order", "word_order", "registers"),
    [
        ("big", "big", [0x4020, 0x0000]),  # ABCD
        ("big", "little", [0x0000, 0x4020]),  # CDAB
        ("little", "big", [0x2040, 0x0000]),  # BADC
        ("little", "little", [0x0000, 0x2040]),  # DCBA
    ],
)
def test_float32_2_5_in_each_order(byte_order: str, word_order: str, registers: list[int]) -> None:
    codec = RegisterCodec("float32", byte_order, word_order)
    assert codec.decode(registers) == 2.5
    assert codec.encode(2.5) == registers


def test_water_plant_scaled_registers() -> None:
    current = RegisterCodec("int16", scale=0.01)
    assert current.decode([1234]) == 12.34
    assert current.decode([0xFFFF]) == -0.01
    assert current.encode(12.34) == [1234]
    position = RegisterCodec("uint16", scale=0.1)
    assert position.decode([455]) == 45.5
    assert position.encode(45.5) == [455]
    total = RegisterCodec("uint32", scale=0.001)
    assert total.decode([0x0001, 0x0000]) == 65.536


def test_unscaled_integers_stay_integers() -> None:
    value = RegisterCodec("uint16").decode([1500])
    assert value == 1500
    assert type(value) is int


def test_float32_decodes_to_its_shortest_decimal() -> None:
    registers = list(struct.unpack(">2H", struct.pack(">f", 2.3)))
    assert RegisterCodec("float32").decode(registers) == 2.3


@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_decode_to_none(special: float) -> None:
    for dtype, fmt, count in (("float32", ">f", 2), ("float64", ">d", 4)):
        registers = list(struct.unpack(f">{count}H", struct.pack(fmt, special)))
        assert RegisterCodec(dtype).decode(registers) is None


def test_strings_and_bools() -> None:
    text = RegisterCodec("string", length=3)
    assert text.encode("AB1") == [0x4142, 0x3100, 0x0000]
    assert text.decode([0x4142, 0x3100, 0x0000]) == "AB1"
    swapped = RegisterCodec("string", byte_order="little", length=2)
    assert swapped.decode(swapped.encode("PUMP")) == "PUMP"
    assert RegisterCodec("bool").decode([7]) is True
    assert RegisterCodec("bool").encode(False) == [0]


@pytest.mark.parametrize(
    ("codec", "value", "message"),
    [
        (RegisterCodec("uint16"), 70000, "outside the uint16 range"),
        (RegisterCodec("int16", scale=0.01), 400.0, "outside the int16 range"),
        (RegisterCodec("uint16"), -1, "outside the uint16 range"),
        (RegisterCodec("float32"), 1e40, "does not fit"),
        (RegisterCodec("uint16"), "7", "takes a number"),
        (RegisterCodec("uint16"), True, "takes a number"),
        (RegisterCodec("bool"), 1, "true or false"),
        (RegisterCodec("string", length=1), "ABC", "exceeds"),
        (RegisterCodec("float64"), math.nan, "finite"),
    ],
)
def test_unencodable_values_are_refused(codec: RegisterCodec, value: object, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        codec.encode(value)  # type: ignore[arg-type]


def test_bad_descriptions_are_refused() -> None:
    with pytest.raises(CodecError):
        RegisterCodec("complex")
    with pytest.raises(CodecError):
        RegisterCodec("int16", byte_order="middle")
    with pytest.raises(CodecError):
        RegisterCodec("int16", scale=0.0)


def test_short_read_is_an_error() -> None:
    with pytest.raises(CodecError, match="needs 2 registers"):
        RegisterCodec("float32").decode_from(pack_registers([1]), 0)


def test_decode_all_orders_exposes_a_swapped_word() -> None:
    registers = RegisterCodec("float32", "big", "little").encode(2.5)
    values = decode_all_orders(RegisterCodec("float32"), registers)
    assert values["CDAB"] == 2.5
    assert values["ABCD"] != 2.5


@given(
    dtype=st.sampled_from(sorted(INT_RANGES)),
    order=orders,
    data=st.data(),
)
def test_integers_round_trip(dtype: str, order: tuple[str, str], data: st.DataObject) -> None:
    lo, hi = INT_RANGES[dtype]
    value = data.draw(st.integers(lo, hi))
    codec = RegisterCodec(dtype, *order)
    registers = codec.encode(value)
    assert len(registers) == codec.count
    assert all(0 <= r <= 0xFFFF for r in registers)
    assert codec.decode(registers) == value


@given(order=orders, value=st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_float32_round_trip(order: tuple[str, str], value: float) -> None:
    codec = RegisterCodec("float32", *order)
    decoded = codec.decode(codec.encode(value))
    assert decoded == shortest_float32(value)
    assert struct.pack(">f", decoded) == struct.pack(">f", value)  # the same float32


@given(order=orders, value=st.floats(allow_nan=False, allow_infinity=False))
def test_float64_round_trip(order: tuple[str, str], value: float) -> None:
    codec = RegisterCodec("float64", *order)
    assert codec.decode(codec.encode(value)) == value


@given(
    raw=st.integers(-(2**15), 2**15 - 1),
    scale=st.sampled_from([0.1, 0.01, 0.001, 0.5, 2.0, 10.0]),
    offset=st.sampled_from([0.0, -40.0, 273.15, 1.5]),
)
def test_scaled_values_round_trip_to_the_same_raw(raw: int, scale: float, offset: float) -> None:
    codec = RegisterCodec("int16", scale=scale, offset=offset)
    value = codec.decode([raw & 0xFFFF])
    assert isinstance(value, float)
    assert codec.encode(value) == [raw & 0xFFFF]


@given(registers=st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4), order=orders)
def test_any_registers_decode_or_report_none(registers: list[int], order: tuple[str, str]) -> None:
    for dtype in ("float32", "float64", "int32", "uint64"):
        value = RegisterCodec(dtype, *order).decode(registers)
        assert value is None or (isinstance(value, int | float) and math.isfinite(value))


@given(st.one_of(st.floats(), st.integers(min_value=-(10**20), max_value=10**20)))
def test_decimals_match_decimal(number: float) -> None:
    # _decimals used decimal.Decimal; it now reads repr() to keep decimal off the heap.
    from decimal import Decimal

    from fieldtwin.agent.codec import _decimals

    exponent = Decimal(repr(number)).as_tuple().exponent
    assert _decimals(number) == (max(0, -exponent) if isinstance(exponent, int) else 0)


@pytest.mark.parametrize(
    ("number", "digits"), [(0.01, 2), (1.0, 1), (10, 0), (1.5e-07, 8), (1e16, 0), (math.inf, 0)]
)
def test_decimals_examples(number: float, digits: int) -> None:
    from fieldtwin.agent.codec import _decimals

    assert _decimals(number) == digits
