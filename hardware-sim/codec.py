"""Engineering values to Modbus registers and back (sans-I/O).

``raw = (value - offset) / scale`` on the way out and ``value = raw * scale + offset`` on
the way in, the same convention the agent uses. ``byte_order`` is the order of the two
bytes inside each 16-bit register, ``word_order`` says which register carries the most
significant word (ABCD = big/big, CDAB = big/little, BADC = little/big,
DCBA = little/little). Integer types saturate at their range, the way a transmitter
pins its output at the rail instead of wrapping around.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Literal

Order = Literal["big", "little"]

# type -> (struct code, registers, is_integer, minimum, maximum)
_TYPES: dict[str, tuple[str, int, bool, float, float]] = {
    "int16": ("h", 1, True, -(2**15), 2**15 - 1),
    "uint16": ("H", 1, True, 0, 2**16 - 1),
    "int32": ("i", 2, True, -(2**31), 2**31 - 1),
    "uint32": ("I", 2, True, 0, 2**32 - 1),
    "int64": ("q", 4, True, -(2**63), 2**63 - 1),
    "uint64": ("Q", 4, True, 0, 2**64 - 1),
    "float32": ("f", 2, False, -3.4028234663852886e38, 3.4028234663852886e38),
    "float64": ("d", 4, False, -math.inf, math.inf),
}

REGISTER_TYPES: tuple[str, ...] = tuple(_TYPES)
"""Types a register point may have (``bool`` is for coils and discrete inputs only)."""


def register_count(dtype: str) -> int:
    """How many 16-bit registers one value of ``dtype`` occupies."""
    return _TYPES[dtype][1]


@dataclass(frozen=True, slots=True)
class RegisterCodec:
    """How one point's value maps onto consecutive registers."""

    dtype: str = "uint16"
    byte_order: Order = "big"
    word_order: Order = "big"
    scale: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.dtype not in _TYPES:
            raise ValueError(f"unknown register type {self.dtype!r}")
        if self.scale == 0 or not math.isfinite(self.scale):
            raise ValueError("scale must be a finite, non-zero number")

    @property
    def count(self) -> int:
        return _TYPES[self.dtype][1]

    def to_raw(self, value: float) -> int | float:
        """The number the registers hold for ``value``, after scaling and saturation."""
        code, _, is_int, lo, hi = _TYPES[self.dtype]
        if is_int and isinstance(value, int) and self._identity:
            return int(min(max(value, lo), hi))  # exact, even past 2**53
        raw = (value - self.offset) / self.scale
        if is_int:
            if math.isnan(raw):
                return 0
            return (
                int(min(max(round(raw), lo), hi))
                if math.isfinite(raw)
                else int(lo if raw < 0 else hi)
            )
        if code == "f" and math.isfinite(raw):
            return min(max(raw, lo), hi)
        return raw

    @property
    def _identity(self) -> bool:
        return self.scale == 1 and self.offset == 0

    def from_raw(self, raw: int | float) -> float:
        if isinstance(raw, int) and self._identity:
            return raw
        return raw * self.scale + self.offset

    def encode(self, value: float) -> list[int]:
        """Registers for an engineering value, in wire order."""
        code = _TYPES[self.dtype][0]
        data = struct.pack(">" + code, self.to_raw(value))
        return self._words(data)

    def decode(self, registers: list[int]) -> float:
        """The engineering value a client reading ``registers`` should see."""
        if len(registers) != self.count:
            raise ValueError(f"{self.dtype} needs {self.count} registers, got {len(registers)}")
        words = list(registers)
        if self.word_order == "little":
            words.reverse()
        data = b"".join(
            w.to_bytes(2, "big" if self.byte_order == "big" else "little") for w in words
        )
        (raw,) = struct.unpack(">" + _TYPES[self.dtype][0], data)
        return self.from_raw(raw)

    def quantize(self, value: float) -> float:
        """What a client decodes after ``value`` went through the registers."""
        return self.decode(self.encode(value))

    def _words(self, data: bytes) -> list[int]:
        words = [
            int.from_bytes(data[i : i + 2], "big" if self.byte_order == "big" else "little")
            for i in range(0, len(data), 2)
        ]
        if self.word_order == "little":
            words.reverse()
        return words
