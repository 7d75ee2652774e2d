"""The ASCII line protocol of the simulated serial sensors (sans-I/O).

One line per reading::

    $<TALKER>,<seq>,<field 1>,...,<field n>*<XX>\\r\\n

``<XX>`` is two upper-case hex digits: the XOR of every byte between ``$`` and ``*``
(exclusive), as in NMEA 0183. ``<seq>`` counts lines from 0 and wraps after 65535.
Fields are decimal numbers with a fixed number of decimals per field. A host sends
``?\\r\\n`` to get one line at once. The water-plant ambient sensor uses talker ``AMB``
with fields temperature (°C) and humidity (%RH), one decimal each.
"""

from __future__ import annotations

from dataclasses import dataclass

SEQ_MODULUS = 65536
QUERY = b"?"


class LineError(ValueError):
    """A line that is not a valid sensor line (framing, checksum or field error)."""


def checksum(payload: str) -> str:
    value = 0
    for byte in payload.encode("ascii"):
        value ^= byte
    return f"{value:02X}"


def format_number(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    # "-0.0" would read back as a negative zero; a sensor prints 0.0.
    if text.lstrip("-").strip("0.") == "" and text.startswith("-"):
        text = text[1:]
    return text


def format_line(
    talker: str, seq: int, values: list[float], decimals: list[int], *, corrupt: bool = False
) -> bytes:
    """One line with a valid checksum, or with a wrong one when ``corrupt``."""
    fields = [format_number(v, d) for v, d in zip(values, decimals, strict=True)]
    payload = ",".join([talker, str(seq % SEQ_MODULUS), *fields])
    check = checksum(payload)
    if corrupt:
        check = f"{int(check, 16) ^ 0x5A:02X}"
    return f"${payload}*{check}\r\n".encode("ascii")


@dataclass(frozen=True, slots=True)
class Line:
    talker: str
    seq: int
    values: tuple[float, ...]


def parse_line(raw: bytes | str) -> Line:
    """Parse and verify one line (with or without its CRLF); raises ``LineError``."""
    try:
        text = raw.decode("ascii") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise LineError(f"not ASCII: {exc}") from None
    text = text.rstrip("\r\n")
    if not text.startswith("$") or len(text) < 4 or text[-3] != "*":
        raise LineError(f"bad framing: {text!r}")
    payload, given = text[1:-3], text[-2:]
    if checksum(payload) != given.upper():
        raise LineError(f"checksum mismatch: expected {checksum(payload)}, got {given}")
    parts = payload.split(",")
    if len(parts) < 2:
        raise LineError("missing sequence number")
    try:
        seq = int(parts[1])
        values = tuple(float(p) for p in parts[2:])
    except ValueError as exc:
        raise LineError(f"bad field: {exc}") from None
    return Line(parts[0], seq, values)
