"""Is a decoded value believable? (sans-I/O; used by ``fieldtwin agent check``).

A wrong byte or word order rarely fails loudly: it turns 2.5 m into 4.6e-41 or 1.3e+27.
The check decodes the raw registers under every order and flags values that no plant
would report, so a technician sees at a glance which order the device really uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fieldtwin.agent.config import PointConfig
from fieldtwin.protocol.messages import Value

HUGE = 1e9
TINY = 1e-6
FLOAT32_HUGE = 1e7
"""float32 carries 7 significant digits; a reading beyond 1e7 is almost always a
wrong order (or the wrong type for a counter)."""


def plausible(point: PointConfig, value: Value) -> bool:
    if value is None:
        return False
    if isinstance(value, (bool, str)):
        return True
    if isinstance(value, float) and (not math.isfinite(value)):
        return False
    magnitude = abs(value)
    huge = FLOAT32_HUGE if point.dtype == "float32" else HUGE
    if isinstance(value, float) and (magnitude > huge or 0 < magnitude < TINY):
        return False
    if point.min is not None and value < point.min:
        return False
    if point.max is not None and value > point.max:
        return False
    return in_valid_range(point, value)


TINY_SHARE_OF_RANGE = 1e-6


def tiny_threshold(point: PointConfig) -> float:
    """Magnitude below which a non-zero reading of a float *register* point with both
    range bounds is implausible: a millionth of the range, far below any instrument's
    resolution, and where a wrong byte order lands (2.5 m read as BADC is 4.1e-20 m)."""
    if (
        point.valid_min is None
        or point.valid_max is None
        or point.table not in ("holding", "input")
        or point.dtype not in ("float32", "float64")
    ):
        return 0.0
    return (point.valid_max - point.valid_min) * TINY_SHARE_OF_RANGE


def in_valid_range(point: PointConfig, value: Value) -> bool:
    """Inside the point's configured valid range (or it has none, or it is no number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return True
    if point.valid_min is not None and value < point.valid_min:
        return False
    if point.valid_max is not None and value > point.valid_max:
        return False
    return not (value and abs(value) < tiny_threshold(point))


def byte_order_alternatives(point: PointConfig, registers: list[int]) -> dict[str, Value]:
    """A one-register number under both byte orders, keyed like the four-order columns.

    A swapped uint16 (898 rpm read as 33,283) is a believable number on its own, so
    ``check`` compares both orders only when the point has a range to judge them by
    (``valid_min``/``valid_max`` or the write limits ``min``/``max``)."""
    ranged = point.has_valid_range or point.min is not None or point.max is not None
    if not ranged or len(registers) != 1 or point.dtype not in ("int16", "uint16"):
        return {}
    codec = point.codec()
    out: dict[str, Value] = {}
    for byte_order in ("big", "little"):
        alternative = codec.with_order(byte_order, codec.word_order)
        out[alternative.order_name] = alternative.decode(registers)
    return out


def implausible_orders(
    point: PointConfig, configured: str, value: Value, alternatives: Mapping[str, Value]
) -> list[str]:
    """Names of the orders (configured one included) whose value looks implausible."""
    bad = [name for name, candidate in alternatives.items() if not plausible(point, candidate)]
    if configured not in alternatives and not plausible(point, value):
        bad.append(configured)
    return bad
