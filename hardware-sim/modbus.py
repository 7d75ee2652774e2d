"""Modbus application protocol and its TCP and RTU framings, sans-I/O.

The simulator serves Modbus itself instead of through pymodbus's server: its faults need
byte-level control that pymodbus 3.16's request handler does not expose (a response with
a wrong CRC, a silent unit on a shared RTU bus, a late answer, an exception for one
point), and its datastore API is mid-migration (``ModbusServerContext`` is deprecated in
3.16). The tests use the pymodbus *client* as the reference implementation.

Supported function codes: 1, 2, 3, 4 (reads), 5, 6, 15, 16 (writes). Anything else gets
exception 1 (illegal function); out-of-range quantities get exception 3.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

READ_COILS = 1
READ_DISCRETE_INPUTS = 2
READ_HOLDING_REGISTERS = 3
READ_INPUT_REGISTERS = 4
WRITE_SINGLE_COIL = 5
WRITE_SINGLE_REGISTER = 6
WRITE_MULTIPLE_COILS = 15
WRITE_MULTIPLE_REGISTERS = 16

TABLE_OF_FUNCTION = {
    READ_COILS: "coils",
    READ_DISCRETE_INPUTS: "discrete_inputs",
    READ_HOLDING_REGISTERS: "holding_registers",
    READ_INPUT_REGISTERS: "input_registers",
    WRITE_SINGLE_COIL: "coils",
    WRITE_SINGLE_REGISTER: "holding_registers",
    WRITE_MULTIPLE_COILS: "coils",
    WRITE_MULTIPLE_REGISTERS: "holding_registers",
}
TABLES = ("coils", "discrete_inputs", "holding_registers", "input_registers")
BIT_TABLES = ("coils", "discrete_inputs")

MAX_PDU = 253


class ExceptionCode(IntEnum):
    ILLEGAL_FUNCTION = 1
    ILLEGAL_DATA_ADDRESS = 2
    ILLEGAL_DATA_VALUE = 3
    SERVER_DEVICE_FAILURE = 4
    ACKNOWLEDGE = 5
    SERVER_DEVICE_BUSY = 6
    MEMORY_PARITY_ERROR = 8
    GATEWAY_PATH_UNAVAILABLE = 10
    GATEWAY_TARGET_FAILED = 11


class ModbusException(Exception):
    """Raised by a register map to answer a request with a Modbus exception response."""

    def __init__(self, code: ExceptionCode | int, detail: str = "") -> None:
        self.code = ExceptionCode(code)
        super().__init__(
            f"exception {int(code)} ({self.code.name}){': ' + detail if detail else ''}"
        )


class FrameError(Exception):
    """Bytes that are not a Modbus frame; the connection or buffer must resynchronise."""


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded request PDU; ``values`` is set for writes."""

    function: int
    address: int
    count: int
    values: tuple[int, ...] | tuple[bool, ...] | None = None

    @property
    def table(self) -> str:
        return TABLE_OF_FUNCTION[self.function]

    @property
    def is_write(self) -> bool:
        return self.values is not None


def parse_request(pdu: bytes) -> Request:
    """Decode a request PDU or raise ``ModbusException`` with the code to answer."""
    if not pdu:
        raise FrameError("empty PDU")
    function = pdu[0]
    body = pdu[1:]
    if function in (READ_COILS, READ_DISCRETE_INPUTS, READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS):
        if len(body) != 4:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE, "bad read request length")
        address, count = struct.unpack(">HH", body)
        limit = 2000 if function in (READ_COILS, READ_DISCRETE_INPUTS) else 125
        if not 1 <= count <= limit:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE, f"quantity {count}")
        if address + count > 0x10000:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_ADDRESS, "range past 65535")
        return Request(function, address, count)
    if function == WRITE_SINGLE_COIL:
        if len(body) != 4:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE, "bad write length")
        address, raw = struct.unpack(">HH", body)
        if raw not in (0x0000, 0xFF00):
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE, f"coil value {raw:#06x}")
        return Request(function, address, 1, (raw == 0xFF00,))
    if function == WRITE_SINGLE_REGISTER:
        if len(body) != 4:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE, "bad write length")
        address, raw = struct.unpack(">HH", body)
        return Request(function, address, 1, (raw,))
    if function in (WRITE_MULTIPLE_COILS, WRITE_MULTIPLE_REGISTERS):
        if len(body) < 5:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE, "bad write length")
        address, count, byte_count = struct.unpack(">HHB", body[:5])
        data = body[5:]
        if function == WRITE_MULTIPLE_COILS:
            if not 1 <= count <= 1968 or byte_count != (count + 7) // 8:
                raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE, f"quantity {count}")
        elif not 1 <= count <= 123 or byte_count != 2 * count:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE, f"quantity {count}")
        if len(data) != byte_count:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE, "byte count mismatch")
        if address + count > 0x10000:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_ADDRESS, "range past 65535")
        if function == WRITE_MULTIPLE_COILS:
            bits = tuple(bool(data[i // 8] >> (i % 8) & 1) for i in range(count))
            return Request(function, address, count, bits)
        words = struct.unpack(f">{count}H", data)
        return Request(function, address, count, tuple(words))
    raise ModbusException(ExceptionCode.ILLEGAL_FUNCTION, f"function {function}")


def encode_request(request: Request) -> bytes:
    """Build a request PDU (used by tests and the load generator's self-checks)."""
    f = request.function
    if f in (READ_COILS, READ_DISCRETE_INPUTS, READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS):
        return struct.pack(">BHH", f, request.address, request.count)
    values = request.values or ()
    if f == WRITE_SINGLE_COIL:
        return struct.pack(">BHH", f, request.address, 0xFF00 if values[0] else 0)
    if f == WRITE_SINGLE_REGISTER:
        return struct.pack(">BHH", f, request.address, int(values[0]))
    if f == WRITE_MULTIPLE_COILS:
        packed = pack_bits([bool(v) for v in values])
        return struct.pack(">BHHB", f, request.address, len(values), len(packed)) + packed
    if f == WRITE_MULTIPLE_REGISTERS:
        n = len(values)
        return struct.pack(f">BHHB{n}H", f, request.address, n, 2 * n, *(int(v) for v in values))
    raise ValueError(f"cannot encode function {f}")


def pack_bits(bits: list[bool]) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def encode_read_response(request: Request, data: list[int] | list[bool]) -> bytes:
    if request.table in BIT_TABLES:
        packed = pack_bits([bool(v) for v in data])
        return bytes((request.function, len(packed))) + packed
    words = [int(v) for v in data]
    return struct.pack(f">BB{len(words)}H", request.function, 2 * len(words), *words)


def encode_write_response(request: Request) -> bytes:
    values = request.values or ()
    if request.function == WRITE_SINGLE_COIL:
        return struct.pack(">BHH", request.function, request.address, 0xFF00 if values[0] else 0)
    if request.function == WRITE_SINGLE_REGISTER:
        return struct.pack(">BHH", request.function, request.address, int(values[0]))
    return struct.pack(">BHH", request.function, request.address, request.count)


def encode_exception(function: int, code: ExceptionCode | int) -> bytes:
    return bytes(((function | 0x80) & 0xFF, int(code)))


# -- Modbus TCP (MBAP) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TcpFrame:
    transaction: int
    unit: int
    pdu: bytes


class MbapDecoder:
    """Splits a TCP byte stream into MBAP frames; a bad header raises ``FrameError``."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[TcpFrame]:
        self._buffer += data
        frames: list[TcpFrame] = []
        while len(self._buffer) >= 7:
            transaction, protocol, length, unit = struct.unpack(">HHHB", self._buffer[:7])
            if protocol != 0:
                raise FrameError(f"protocol id {protocol} is not Modbus (0)")
            if not 2 <= length <= MAX_PDU + 1:
                raise FrameError(f"MBAP length {length} out of range")
            end = 6 + length
            if len(self._buffer) < end:
                break
            frames.append(TcpFrame(transaction, unit, bytes(self._buffer[7:end])))
            del self._buffer[:end]
        return frames


def mbap_frame(transaction: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", transaction, 0, len(pdu) + 1, unit) + pdu


# -- Modbus RTU --------------------------------------------------------------------------


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """Modbus CRC-16 (poly 0xA001, init 0xFFFF); sent low byte first."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def rtu_frame(unit: int, pdu: bytes, *, corrupt: bool = False) -> bytes:
    """An RTU ADU; ``corrupt`` flips the CRC so every receiver must discard it."""
    body = bytes((unit,)) + pdu
    crc = crc16(body)
    if corrupt:
        crc ^= 0xFFFF
    return body + struct.pack("<H", crc)


@dataclass(frozen=True, slots=True)
class RtuFrame:
    unit: int
    pdu: bytes


def _request_length(buffer: bytes | bytearray) -> int | None:
    """Full ADU length of the request at the start of ``buffer``; None if not yet known."""
    if len(buffer) < 2:
        return None
    function = buffer[1]
    if function in (1, 2, 3, 4, 5, 6):
        return 8
    if function in (15, 16):
        if len(buffer) < 7:
            return None
        return 9 + buffer[6]
    return -1


class RtuDecoder:
    """Cuts requests out of a serial byte stream.

    A request's length follows from its function code. A frame whose CRC does not match
    is counted and the buffer is dropped: on a real line the slave would wait for the
    next silent gap; the server calls ``flush()`` after such a gap (or at once here).
    Unknown function codes are accepted when the whole buffer carries a valid CRC, so
    they can be answered with exception 1.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.crc_errors = 0

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def flush(self) -> int:
        dropped = len(self._buffer)
        self._buffer.clear()
        return dropped

    def feed(self, data: bytes) -> list[RtuFrame]:
        self._buffer += data
        frames: list[RtuFrame] = []
        while True:
            length = _request_length(self._buffer)
            if length is None:
                break
            if length == -1:
                if len(self._buffer) >= 4 and crc16(bytes(self._buffer)) == 0:
                    frames.append(RtuFrame(self._buffer[0], bytes(self._buffer[1:-2])))
                    self._buffer.clear()
                break
            if length > MAX_PDU + 3:
                self.crc_errors += 1
                self._buffer.clear()
                break
            if len(self._buffer) < length:
                break
            adu = bytes(self._buffer[:length])
            if crc16(adu) != 0:
                self.crc_errors += 1
                self._buffer.clear()
                break
            frames.append(RtuFrame(adu[0], adu[1:-2]))
            del self._buffer[:length]
        return frames
