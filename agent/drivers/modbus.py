"""Modbus TCP and RTU (pymodbus): coalesced block reads, one owner task per endpoint,
a circuit breaker per unit id, writes through the same codec as reads.

Scheduling: every block has its own due time on a monotonic clock and keeps its phase
(``next = due + interval``; missed slots are skipped, never burst). The owner task
serves pending writes first, then the block that is due earliest. A unit whose breaker
is open is skipped without touching the bus, so a dead slave costs the others at most
one timeout per cycle while it is being declared dead, and one timeout per probe after
that (see ``fieldtwin.agent.breaker``).

Timestamps: Modbus has no source time, so a reading is stamped with the wall clock at
the moment the reply arrived.

Failures: a missing reply counts against the unit's breaker; when the unit is declared
down its points are reported BAD once. A Modbus exception reply (illegal address...)
means the device is alive but refuses that block: those points are reported BAD and the
breaker is not touched. A lost TCP connection or serial port is reopened with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fieldtwin.agent.blocks import BIT_TABLES, Block, Span, plan_blocks
from fieldtwin.agent.breaker import Breaker
from fieldtwin.agent.codec import RegisterCodec, decode_all_orders, pack_registers
from fieldtwin.agent.commands import WriteOutcome
from fieldtwin.agent.config import DeviceConfig, PointConfig
from fieldtwin.agent.drivers.base import (
    CheckRow,
    Driver,
    Sink,
    Timer,
    serial_port_problem,
    sleep_or,
)
from fieldtwin.agent.errors import (
    CodecError,
    DeviceError,
    DeviceRejected,
    DeviceTimeout,
    DeviceUnavailable,
)
from fieldtwin.agent.plausible import (
    byte_order_alternatives,
    implausible_orders,
    in_valid_range,
)
from fieldtwin.agent.util import now_ms, within
from fieldtwin.protocol.logfmt import fields
from fieldtwin.protocol.messages import Quality, Value

log = logging.getLogger("fieldtwin.agent.modbus")

_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


@dataclass(frozen=True, slots=True)
class _Member:
    index: int
    point: PointConfig
    codec: RegisterCodec | None  # None for coils and discrete inputs


@dataclass(slots=True)
class _Write:
    point: PointConfig
    value: Value
    future: asyncio.Future[WriteOutcome]


class ModbusDriver(Driver):
    def __init__(self, device: DeviceConfig, points: Sequence[tuple[int, PointConfig]]) -> None:
        super().__init__(device, points)
        # pymodbus logs every missing reply at ERROR; the driver reports them itself.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        spans = [
            Span(
                point.unit_id,
                point.table,
                point.address,
                point.register_count,
                point.interval_ms,
                _Member(index, point, None if point.table in BIT_TABLES else point.codec()),
            )
            for index, point in self.points
        ]
        self.blocks: list[Block[_Member]] = plan_blocks(
            spans, max_gap=device.max_gap, max_registers=device.max_block
        )
        self.breakers: dict[int, Breaker] = {
            unit: Breaker(
                threshold=device.breaker_threshold,
                cooldown_s=device.breaker_cooldown_s,
                max_cooldown_s=device.breaker_max_cooldown_s,
            )
            for unit in sorted({p.unit_id for _, p in self.points})
        }
        self._unit_points: dict[int, list[int]] = {}
        for index, point in self.points:
            self._unit_points.setdefault(point.unit_id, []).append(index)
        self._writes: asyncio.Queue[_Write] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._client: Any = None
        self._running = False
        self.stats.extra["blocks"] = len(self.blocks)

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "units": {
                str(unit): {
                    "state": breaker.state,
                    "down": breaker.down,
                    "consecutive_failures": breaker.failures,
                    "times_opened": breaker.opened_count,
                }
                for unit, breaker in self.breakers.items()
            },
        }

    # -- client -----------------------------------------------------------------------

    def _new_client(self) -> Any:
        device = self.device
        if device.protocol == "modbus-tcp":
            from pymodbus.client import AsyncModbusTcpClient

            return AsyncModbusTcpClient(
                device.host,
                port=device.port,
                timeout=device.timeout_s,
                retries=0,
                reconnect_delay=0,
                name=device.id,
            )
        from pymodbus.client import AsyncModbusSerialClient

        return AsyncModbusSerialClient(
            device.path,
            baudrate=device.baudrate,
            bytesize=device.bytesize,
            parity=device.parity,
            stopbits=device.stopbits,
            timeout=device.timeout_s,
            retries=0,
            reconnect_delay=0,
            name=device.id,
        )

    async def _ensure_connected(self) -> Any:
        client = self._client
        if client is not None and client.connected:
            return client
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if self.device.protocol == "modbus-rtu":
            problem = serial_port_problem(self.device.path)
            if problem:
                raise DeviceUnavailable(problem)
        client = self._new_client()
        # A dead unit must not make pymodbus drop a bus the other units still answer on.
        client.set_max_no_responses(1_000_000_000)
        try:
            ok = await within(self.device.timeout_s * 3 + 1, client.connect())
        except (TimeoutError, OSError) as exc:
            ok = False
            error = str(exc) or type(exc).__name__
        else:
            error = (
                "the serial port could not be opened"
                if self.device.protocol == "modbus-rtu"
                else "connection refused"
            )
        if not ok:
            with contextlib.suppress(Exception):
                client.close()
            self._client = None
            raise DeviceUnavailable(f"cannot connect to {self.device.endpoint}: {error}")
        self._client = client
        self.stats.connected = True
        self.stats.reconnects += 1
        log.info("device connected", extra=fields(device=self.id, endpoint=self.device.endpoint))
        return client

    def _close(self) -> None:
        client, self._client = self._client, None
        self.stats.connected = False
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    # -- requests ---------------------------------------------------------------------

    async def _request(self, call: str, *args: Any, unit_id: int, **kwargs: Any) -> Any:
        """One request with the device timeout; errors become DeviceError subclasses."""
        from pymodbus.exceptions import ConnectionException, ModbusException

        client = await self._ensure_connected()
        method = getattr(client, call)
        try:
            async with asyncio.timeout(self.device.timeout_s * 2 + 1):
                response = await method(*args, device_id=unit_id, **kwargs)
        except TimeoutError:
            raise DeviceTimeout(f"unit {unit_id} did not answer within the timeout") from None
        except ConnectionException as exc:
            self._close()
            raise DeviceUnavailable(f"{self.device.endpoint}: {exc}") from None
        except ModbusException as exc:
            if self._client is not None and not self._client.connected:
                self._close()
                raise DeviceUnavailable(f"{self.device.endpoint}: connection lost") from None
            raise DeviceTimeout(
                f"unit {unit_id} did not answer within {self.device.timeout_s}s"
            ) from exc
        except OSError as exc:
            self._close()
            raise DeviceUnavailable(f"{self.device.endpoint}: {exc}") from None
        if response.isError():
            code = getattr(response, "exception_code", 0)
            name = _EXCEPTION_NAMES.get(code, f"exception {code}")
            raise DeviceRejected(f"unit {unit_id} answered {name} (code {code})")
        return response

    async def _read_block(self, block: Block[_Member]) -> tuple[bytes | list[bool], int]:
        call = {
            "holding": "read_holding_registers",
            "input": "read_input_registers",
            "coil": "read_coils",
            "discrete": "read_discrete_inputs",
        }[block.table]
        response = await self._request(
            call, block.address, count=block.count, unit_id=block.unit_id
        )
        stamp = now_ms()
        if block.table in BIT_TABLES:
            bits = list(response.bits)
            if len(bits) < block.count:
                raise DeviceRejected(f"unit {block.unit_id} returned {len(bits)} bits")
            return bits, stamp
        registers = list(response.registers)
        if len(registers) < block.count:
            raise DeviceRejected(
                f"unit {block.unit_id} returned {len(registers)} of {block.count} registers"
            )
        return pack_registers(registers), stamp

    # -- the owner loop ---------------------------------------------------------------

    async def run(self, sink: Sink) -> None:
        self._running = True
        start = time.monotonic()
        # Spread the first reads so blocks do not all fire in the same instant.
        heap: list[tuple[float, int]] = [
            (start + (i % 10) * 0.001, i) for i in range(len(self.blocks))
        ]
        heapq.heapify(heap)
        try:
            while True:
                await self._serve_writes(sink)
                due, block_index = heap[0]
                wait = due - time.monotonic()
                if wait > 0:
                    await sleep_or(self._wake, wait)
                    self._wake.clear()
                    continue
                heapq.heappop(heap)
                block = self.blocks[block_index]
                interval = block.interval_ms / 1000
                now = time.monotonic()
                next_due = due + interval
                if next_due <= now:  # fell behind: keep the phase, skip the missed slots
                    next_due += ((now - next_due) // interval + 1) * interval
                heapq.heappush(heap, (next_due, block_index))
                try:
                    await self._poll(block, sink)
                except DeviceUnavailable as exc:
                    # The endpoint itself is gone: every unit's breaker opens, and their
                    # growing cooldowns space out the reconnect attempts.
                    self._endpoint_down(sink, str(exc))
        finally:
            self._running = False
            self._close()
            while not self._writes.empty():
                pending = self._writes.get_nowait()
                if not pending.future.done():
                    pending.future.set_exception(DeviceUnavailable("the agent is stopping"))

    def _endpoint_down(self, sink: Sink, error: str) -> None:
        self.stats.failure(error)
        now = time.monotonic()
        for unit, breaker in self.breakers.items():
            if breaker.failure(now):
                self._unit_down(unit, sink, error)
        if self.stats.failures == 1 or self.stats.failures % 30 == 0:
            log.warning(
                "device unreachable",
                extra=fields(device=self.id, error=error, failures=self.stats.failures),
            )

    def _unit_down(self, unit: int, sink: Sink, error: str) -> None:
        log.warning(
            "unit not answering: points reported BAD",
            extra=fields(device=self.id, unit=unit, error=error),
        )
        for index in self._unit_points.get(unit, []):
            sink.fail(index)

    async def _poll(self, block: Block[_Member], sink: Sink) -> None:
        breaker = self.breakers[block.unit_id]
        if not breaker.allow(time.monotonic()):
            return
        timer = Timer()
        try:
            data, stamp = await self._read_block(block)
        except DeviceRejected as exc:
            breaker.success()  # it answered: the device is alive
            self.stats.failure(str(exc))
            log.warning(
                "device refused a read",
                extra=fields(
                    device=self.id,
                    unit=block.unit_id,
                    table=block.table,
                    address=block.address,
                    count=block.count,
                    error=str(exc),
                ),
            )
            stamp = now_ms()
            for _, member in block.members:
                sink.offer(member.index, None, stamp, Quality.BAD)
            return
        except DeviceTimeout as exc:
            self.stats.failure(str(exc))
            if breaker.failure(time.monotonic()):
                self._unit_down(block.unit_id, sink, str(exc))
            return
        except BaseException:
            breaker.probing = False
            raise
        if breaker.success():
            log.info("unit answering again", extra=fields(device=self.id, unit=block.unit_id))
        self.stats.success(timer.elapsed())
        good = Quality.GOOD
        if isinstance(data, bytes):
            for offset, member in block.members:
                assert member.codec is not None
                try:
                    value = member.codec.decode_from(data, offset)
                except CodecError:
                    value = None
                sink.offer(member.index, value, stamp, good if value is not None else Quality.BAD)
        else:
            for offset, member in block.members:
                sink.offer(member.index, bool(data[offset]), stamp, good)

    # -- writes -----------------------------------------------------------------------

    async def write(self, point: PointConfig, value: Value) -> WriteOutcome:
        if not self._running:
            return await self._do_write(point, value)
        future: asyncio.Future[WriteOutcome] = asyncio.get_running_loop().create_future()
        await self._writes.put(_Write(point, value, future))
        self._wake.set()
        return await future

    async def _serve_writes(self, sink: Sink) -> None:
        while not self._writes.empty():
            job = self._writes.get_nowait()
            if job.future.done():
                continue
            try:
                outcome = await self._do_write(job.point, job.value)
            except DeviceError as exc:
                job.future.set_exception(exc)
            except CodecError as exc:
                job.future.set_exception(exc)
            else:
                job.future.set_result(outcome)
                # The read-back is a fresh reading: let the sampler see it now.
                for index, point in self.points:
                    if point is job.point:
                        sink.offer(index, outcome.value, outcome.ts_ms, outcome.quality)

    async def _do_write(self, point: PointConfig, value: Value) -> WriteOutcome:
        breaker = self.breakers.get(point.unit_id)
        if breaker is not None and breaker.down and not breaker.allow(time.monotonic()):
            raise DeviceUnavailable(f"unit {point.unit_id} is not answering (circuit open)")
        try:
            return await self._write_and_read_back(point, value)
        except DeviceTimeout:
            if breaker is not None:
                breaker.failure(time.monotonic())
            raise
        finally:
            if breaker is not None:
                breaker.probing = False

    async def _write_and_read_back(self, point: PointConfig, value: Value) -> WriteOutcome:
        breaker = self.breakers.get(point.unit_id)
        if point.table == "coil":
            if not isinstance(value, bool):
                raise CodecError(f"a coil takes true or false, got {value!r}")
            await self._request("write_coil", point.address, value, unit_id=point.unit_id)
        elif point.table == "holding":
            registers = point.codec().encode(value)
            if len(registers) == 1:
                await self._request(
                    "write_register", point.address, registers[0], unit_id=point.unit_id
                )
            else:
                await self._request(
                    "write_registers", point.address, registers, unit_id=point.unit_id
                )
        else:
            raise DeviceRejected(f"{point.table} is read-only")
        if breaker is not None:
            breaker.success()
        member = _Member(-1, point, None if point.table in BIT_TABLES else point.codec())
        block: Block[_Member] = plan_blocks(
            [Span(point.unit_id, point.table, point.address, point.register_count, 1, member)]
        )[0]
        data, stamp = await self._read_block(block)
        if isinstance(data, bytes):
            assert member.codec is not None
            readback = member.codec.decode_from(data, 0)
        else:
            readback = bool(data[0])
        quality = Quality.GOOD if readback is not None else Quality.BAD
        return WriteOutcome(readback, stamp, quality)

    # -- commissioning ----------------------------------------------------------------

    async def check(self) -> list[CheckRow]:
        rows: list[CheckRow] = []
        try:
            for block in self.blocks:
                try:
                    timer = Timer()
                    data, stamp = await self._read_block(block)
                    self.stats.success(timer.elapsed())
                except DeviceError as exc:
                    self.stats.failure(str(exc))
                    rows.extend(
                        CheckRow(member.point, False, error=str(exc)) for _, member in block.members
                    )
                    if isinstance(exc, DeviceUnavailable):
                        # Nothing else on this endpoint can work either.
                        done = {id(r.point) for r in rows}
                        rows.extend(
                            CheckRow(p, False, error=str(exc))
                            for _, p in self.points
                            if id(p) not in done
                        )
                        return _in_config_order(rows, self.points)
                    continue
                for offset, member in block.members:
                    rows.append(_check_row(member, data, offset, stamp))
        finally:
            self._close()
        return _in_config_order(rows, self.points)


def _in_config_order(rows: list[CheckRow], points: list[tuple[int, PointConfig]]) -> list[CheckRow]:
    order = {id(point): position for position, (_, point) in enumerate(points)}
    return sorted(rows, key=lambda row: order.get(id(row.point), 0))


def _check_row(member: _Member, data: bytes | list[bool], offset: int, stamp: int) -> CheckRow:
    point = member.point
    if not isinstance(data, bytes):
        bit = bool(data[offset])
        return CheckRow(point, True, bit, Quality.GOOD, raw=str(int(bit)), ts_ms=stamp)
    codec = member.codec
    assert codec is not None
    registers = [
        int.from_bytes(data[2 * i : 2 * i + 2], "big") for i in range(offset, offset + codec.count)
    ]
    raw = " ".join(f"{r:04x}" for r in registers)
    value = codec.decode_from(data, offset)
    alternatives = (
        decode_all_orders(codec, registers)
        if codec.count > 1
        else byte_order_alternatives(point, registers)
    )
    bad = implausible_orders(point, codec.order_name, value, alternatives)
    configured_ok = value is not None and codec.order_name not in bad
    return CheckRow(
        point,
        configured_ok,
        value,
        Quality.GOOD if value is not None else Quality.BAD,
        raw=raw,
        alternatives=alternatives,
        implausible=bad,
        error="" if configured_ok else _implausible_reason(point, value),
        ts_ms=stamp,
    )


def _implausible_reason(point: PointConfig, value: Value) -> str:
    if value is not None and not in_valid_range(point, value):
        low = "" if point.valid_min is None else f"{point.valid_min:g}"
        high = "" if point.valid_max is None else f"{point.valid_max:g}"
        return f"{value} is outside the valid range {low}..{high}"
    return "implausible value under the configured byte/word order"
