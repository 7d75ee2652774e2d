"""Register codec: one description of a point's bytes serves reads and writes.

A point's value lives in ``count`` 16-bit registers. ``byte_order`` says how the two
bytes sit inside each register, ``word_order`` which register holds the most
significant word (ABCD = big/big, CDAB = big/little, BADC = little/big, DCBA =
little/little, as in docs/water-plant.md). The engineering value is
``raw * scale + offset``; a write runs the same steps backwards, so a value written
and read back through one codec comes back equal.

Reads decode from a block buffer (the registers of one coalesced Modbus read packed
big-endian), so a 125-register block is packed once and each point slices it.
A float register that holds NaN or infinity decodes to ``None``: the caller reports
it as a BAD sample, never as a number.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from fieldtwin.agent.errors import CodecError
from fieldtwin.protocol.messages import Value

REGISTER_COUNTS: dict[str, int] = {
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "int64": 4,
    "uint64": 4,
    "float32": 2,
    "float64": 4,
}
"""Registers per value; ``string`` takes the point's configured ``length``."""

REGISTER_DTYPES = frozenset({*REGISTER_COUNTS, "string"})
INTEGER_DTYPES = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64"})
FLOAT_DTYPES = frozenset({"float32", "float64"})
ORDERS = ("big", "little")
ORDER_NAMES: dict[tuple[str, str], str] = {
    ("big", "big"): "ABCD",
    ("big", "little"): "CDAB",
    ("little", "big"): "BADC",
    ("little", "little"): "DCBA",
}
"""(byte_order, word_order) → the name field technicians know from device manuals."""

_STRUCT = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}
_INT_RANGES = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


def _decimals(number: float) -> int:
    """Digits after the point in the shortest text of ``number`` (0.01 → 2)."""
    if not math.isfinite(number):
        return 0
    # What Decimal(repr(number)).as_tuple().exponent gives, without importing decimal.
    mantissa, _, exponent = repr(number).partition("e")
    fraction = mantissa.partition(".")[2]
    return max(0, len(fraction) - int(exponent or 0))


def shortest_float32(value: float) -> float:
    """The shortest decimal that is still exactly the same float32 (2.3, not 2.2999999523)."""
    exact = struct.pack(">f", value)
    for digits in (6, 7, 8):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack(">f", candidate) == exact:
            return candidate
    return float(f"{value:.9g}")


def _permutation(count: int, byte_order: str, word_order: str) -> tuple[int, ...]:
    """Byte indices that turn the device's byte layout into big-endian value bytes."""
    words = range(count) if word_order == "big" else range(count - 1, -1, -1)
    perm: list[int] = []
    for word in words:
        hi, lo = 2 * word, 2 * word + 1
        perm.extend((hi, lo) if byte_order == "big" else (lo, hi))
    return tuple(perm)


def pack_registers(registers: Sequence[int]) -> bytes:
    """Registers as the bytes they travel as on the wire (big-endian per register)."""
    try:
        return struct.pack(f">{len(registers)}H", *registers)
    except struct.error as exc:
        raise CodecError(f"registers must be integers 0..65535: {exc}") from None


@dataclass(frozen=True, slots=True)
class RegisterCodec:
    """How one point's value is laid out in 16-bit registers."""

    dtype: str
    byte_order: str = "big"
    word_order: str = "big"
    scale: float = 1.0
    offset: float = 0.0
    length: int = 1
    """Registers of a ``string`` point (two characters each); ignored for other types."""

    count: int = field(init=False)
    _perm: Any = field(init=False, repr=False, compare=False)
    _struct: struct.Struct | None = field(init=False, repr=False, compare=False)
    _as_int: bool = field(init=False, repr=False, compare=False)
    _round: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.dtype not in REGISTER_DTYPES:
            raise CodecError(
                f"type {self.dtype!r} cannot live in registers; use one of "
                + ", ".join(sorted(REGISTER_DTYPES))
            )
        if self.byte_order not in ORDERS or self.word_order not in ORDERS:
            raise CodecError("byte_order and word_order must each be 'big' or 'little'")
        if self.scale == 0 or not math.isfinite(self.scale) or not math.isfinite(self.offset):
            raise CodecError("scale must be a non-zero finite number and offset finite")
        count = self.length if self.dtype == "string" else REGISTER_COUNTS[self.dtype]
        if count < 1:
            raise CodecError("a string point needs length >= 1 register")
        setter = object.__setattr__
        setter(self, "count", count)
        perm = _permutation(count, self.byte_order, self.word_order)
        identity = perm == tuple(range(2 * count))
        setter(self, "_perm", None if identity else itemgetter(*perm))
        fmt = _STRUCT.get(self.dtype)
        setter(self, "_struct", struct.Struct(">" + fmt) if fmt else None)
        plain = self.scale == 1 and self.offset == 0
        setter(self, "_as_int", self.dtype in INTEGER_DTYPES and plain)
        scaled_int = self.dtype in INTEGER_DTYPES and not plain
        setter(
            self,
            "_round",
            max(_decimals(self.scale), _decimals(self.offset)) if scaled_int else None,
        )

    @property
    def order_name(self) -> str:
        return ORDER_NAMES[(self.byte_order, self.word_order)]

    def with_order(self, byte_order: str, word_order: str) -> RegisterCodec:
        return RegisterCodec(
            self.dtype, byte_order, word_order, self.scale, self.offset, self.length
        )

    # -- reads ----------------------------------------------------------------------

    def _value_bytes(self, data: bytes, start: int) -> bytes:
        raw = data[2 * start : 2 * (start + self.count)]
        if len(raw) != 2 * self.count:
            raise CodecError(
                f"{self.dtype} needs {self.count} registers, the read returned "
                f"{max(0, len(data) // 2 - start)}"
            )
        perm = self._perm
        if perm is None:
            return raw
        return bytes(perm(raw))

    def decode_from(self, data: bytes, start: int = 0) -> Value:
        """Decode the value whose first register is ``start`` in a packed block."""
        raw = self._value_bytes(data, start)
        if self.dtype == "string":
            return raw.split(b"\x00", 1)[0].decode("latin-1").rstrip()
        if self.dtype == "bool":
            return raw != b"\x00\x00"
        assert self._struct is not None
        number = self._struct.unpack(raw)[0]
        if self._as_int:
            return int(number)
        if self.dtype == "float32":
            if not math.isfinite(number):
                return None
            number = shortest_float32(number)
        elif not math.isfinite(number):
            return None
        if self.scale != 1 or self.offset != 0:
            number = number * self.scale + self.offset
            if self._round is not None:
                number = round(number, self._round)
            if not math.isfinite(number):
                return None
        return float(number)

    def decode(self, registers: Sequence[int]) -> Value:
        return self.decode_from(pack_registers(registers), 0)

    # -- writes ---------------------------------------------------------------------

    def encode(self, value: Value) -> list[int]:
        """The registers to write so that a read decodes ``value`` (or CodecError)."""
        data = self._encode_bytes(value)
        # The permutation maps device bytes → value bytes; invert it for writes.
        perm = _permutation(self.count, self.byte_order, self.word_order)
        device = bytearray(2 * self.count)
        for device_index, value_index in enumerate(perm):
            device[device_index] = data[value_index]
        return list(struct.unpack(f">{self.count}H", bytes(device)))

    def _encode_bytes(self, value: Value) -> bytes:
        size = 2 * self.count
        if self.dtype == "string":
            if not isinstance(value, str):
                raise CodecError(f"a string point takes text, got {type(value).__name__}")
            try:
                encoded = value.encode("latin-1")
            except UnicodeEncodeError:
                raise CodecError("text must be Latin-1 to fit in registers") from None
            if len(encoded) > size:
                raise CodecError(f"text of {len(encoded)} bytes exceeds {size} ({self.count} regs)")
            return encoded.ljust(size, b"\x00")
        if self.dtype == "bool":
            if not isinstance(value, bool):
                raise CodecError(f"a bool point takes true or false, got {value!r}")
            return b"\x00\x01" if value else b"\x00\x00"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CodecError(f"a {self.dtype} point takes a number, got {value!r}")
        if not math.isfinite(value):
            raise CodecError(f"{value!r} is not a finite number")
        assert self._struct is not None
        plain = self.scale == 1 and self.offset == 0
        raw: float = value if plain else (value - self.offset) / self.scale
        if self.dtype in INTEGER_DTYPES:
            lo, hi = _INT_RANGES[self.dtype]
            rounded = value if plain and isinstance(value, int) else round(raw)
            if not lo <= rounded <= hi:
                raise CodecError(
                    f"{value!r} becomes raw {rounded} after scale/offset, outside the "
                    f"{self.dtype} range {lo}..{hi}"
                )
            return self._struct.pack(rounded)
        try:
            packed = self._struct.pack(raw)
        except (OverflowError, struct.error):
            raise CodecError(f"{value!r} does not fit in a {self.dtype}") from None
        if not math.isfinite(self._struct.unpack(packed)[0]):
            raise CodecError(f"{value!r} does not fit in a {self.dtype}")
        return packed


@functools.cache
def shared_codec(
    dtype: str,
    byte_order: str = "big",
    word_order: str = "big",
    scale: float = 1.0,
    offset: float = 0.0,
    length: int = 1,
) -> RegisterCodec:
    """One codec object per distinct layout: a 5,000-point gateway of uint16 registers
    holds one codec instead of 5,000 (codecs are immutable, so sharing is safe)."""
    return RegisterCodec(dtype, byte_order, word_order, scale, offset, length)


def decode_all_orders(codec: RegisterCodec, registers: Sequence[int]) -> dict[str, Value]:
    """The value under each byte/word order, for the commissioning check."""
    data = pack_registers(registers)
    out: dict[str, Value] = {}
    for (byte_order, word_order), name in ORDER_NAMES.items():
        try:
            out[name] = codec.with_order(byte_order, word_order).decode_from(data, 0)
        except CodecError:
            out[name] = None
    return out
