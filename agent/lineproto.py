"""Line-oriented serial sensors (sans-I/O): framing, checksum and field parsing.

Sentences look like NMEA 0183: ``$TAG,field0,field1,...*XX\\r\\n`` where ``XX`` is the
XOR of every byte between ``$`` and ``*`` as two hex digits. ``LineSplitter`` turns a
byte stream into lines (bounded: a sensor spewing garbage without newlines cannot
grow memory), ``parse_sentence`` validates one line and returns its fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from operator import xor

from fieldtwin.agent.errors import LineError

MAX_LINE_BYTES = 512


def checksum(payload: bytes) -> int:
    """XOR of the bytes between ``$`` and ``*`` (exclusive)."""
    return reduce(xor, payload, 0)


def make_sentence(tag: str, fields: list[str]) -> bytes:
    """Build a valid sentence (tests and the ``?`` poll use the same framing)."""
    payload = ",".join([tag, *fields]).encode("ascii")
    return b"$" + payload + b"*" + f"{checksum(payload):02X}".encode() + b"\r\n"


@dataclass(frozen=True, slots=True)
class Sentence:
    tag: str
    fields: tuple[str, ...]


def parse_sentence(line: bytes, *, verify_checksum: bool = True) -> Sentence:
    """Validate and split one line (without or with its line ending) or raise LineError."""
    text = line.rstrip(b"\r\n")
    if not text.startswith(b"$"):
        raise LineError(f"line does not start with '$': {_show(text)}")
    star = text.rfind(b"*")
    if star < 0:
        if verify_checksum:
            raise LineError(f"line has no '*XX' checksum: {_show(text)}")
        payload = text[1:]
    else:
        payload = text[1:star]
        if verify_checksum:
            given = text[star + 1 :]
            try:
                expected = int(given, 16) if len(given) == 2 else -1
            except ValueError:
                expected = -1
            if expected < 0:
                raise LineError(f"checksum {_show(given)} is not two hex digits")
            actual = checksum(payload)
            if actual != expected:
                raise LineError(
                    f"checksum mismatch: line says {expected:02X}, bytes give {actual:02X}"
                )
    try:
        decoded = payload.decode("ascii")
    except UnicodeDecodeError:
        raise LineError(f"line is not ASCII: {_show(text)}") from None
    tag, *fields = decoded.split(",")
    if not tag:
        raise LineError(f"line has an empty sentence tag: {_show(text)}")
    return Sentence(tag, tuple(fields))


def _show(data: bytes) -> str:
    shown = data[:60].decode("ascii", "backslashreplace")
    return repr(shown + ("..." if len(data) > 60 else ""))


class LineSplitter:
    """Accumulate bytes and hand out complete lines; overlong garbage is dropped."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_line
        self.overflows = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        lines: list[bytes] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if len(line) > self._max:
                self.overflows += 1
                continue
            if line.strip():
                lines.append(line)
        if len(self._buffer) > self._max:
            # No newline in sight: keep only what could still start a valid line.
            self.overflows += 1
            start = self._buffer.rfind(b"$")
            del self._buffer[: start if start >= 0 else len(self._buffer)]
            if len(self._buffer) > self._max:
                self._buffer.clear()
        return lines
