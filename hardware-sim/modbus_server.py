"""Modbus TCP and Modbus RTU (on a pseudo-terminal) device servers.

Both answer requests one at a time in arrival order — per TCP connection, and per bus
for RTU, where only one slave talks at a time — so a ``slow`` fault delays everything
queued behind it, as on real hardware. Link faults per device (or per unit id):

- ``dropout``: requests are read and never answered (the client times out);
- ``slow``: each answer is sent ``delay_ms`` wall-clock milliseconds late;
- ``exception``: the request is answered with the fault's exception code;
- ``corrupt`` (RTU): the answer goes out with a wrong CRC;
- ``disconnect``: TCP connections are closed and the port stops listening (clients get
  "connection refused"); an RTU bus's pty hangs up and its symlink disappears. Both come
  back when the fault ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from fieldtwin.protocol.logfmt import fields
from fieldtwin.sim.context import DisconnectFollower, SimContext
from fieldtwin.sim.errors import EndpointError
from fieldtwin.sim.faults import LinkFaults
from fieldtwin.sim.modbus import (
    ExceptionCode,
    FrameError,
    MbapDecoder,
    ModbusException,
    RtuDecoder,
    encode_exception,
    encode_read_response,
    encode_write_response,
    mbap_frame,
    parse_request,
    rtu_frame,
)
from fieldtwin.sim.ptys import PtyPort
from fieldtwin.sim.registers import RegisterMap, Served

log = logging.getLogger("fieldtwin.sim.modbus")

RTU_GAP_S = 0.02
"""Idle time after which a partial RTU frame is discarded (3.5 characters at 19200 baud
are ~2 ms; a pty delivers a client's write in one piece, so 20 ms is generous)."""


def answer(regmap: RegisterMap, unit: int, pdu: bytes, link: LinkFaults) -> tuple[bytes, Served]:
    """The response PDU for a request PDU, and the point values it delivers."""
    function = pdu[0] if pdu else 0
    try:
        if link.exception is not None:
            raise ModbusException(link.exception, "fault")
        request = parse_request(pdu)
        if request.values is not None:
            regmap.write(unit, request.table, request.address, request.values)
            return encode_write_response(request), []
        data, served = regmap.read(unit, request.table, request.address, request.count)
        return encode_read_response(request, data), served
    except ModbusException as exc:
        return encode_exception(function, exc.code), []
    except FrameError:
        return encode_exception(function, ExceptionCode.ILLEGAL_FUNCTION), []


class ModbusTcpServer:
    def __init__(
        self,
        device_id: str,
        host: str,
        port: int,
        regmap: RegisterMap,
        ctx: SimContext,
        *,
        protocol: str = "modbus-tcp",
    ) -> None:
        self.device_id = device_id
        self.protocol = protocol
        self.host = host
        self.port = port
        self.regmap = regmap
        self.ctx = ctx
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.link = DisconnectFollower(ctx, device_id, self._stop_listening, self.start)

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as exc:
            raise EndpointError(
                f"{self.device_id}: cannot listen on {self.host}:{self.port}: "
                f"{exc.strerror or exc} "
                "(is another simulator running? use --ephemeral for free ports)"
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "modbus tcp listening",
            extra=fields(device=self.device_id, host=self.host, port=self.port),
        )

    def faults_changed(self) -> None:
        self.link.notify()

    async def supervise(self) -> None:
        """Follow ``disconnect`` faults: stop listening while one is active."""
        await self.link.run()

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
        for task, writer in list(self._connections.items()):
            writer.close()
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def close(self) -> None:
        await self._stop_listening()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio's stream server (Python 3.11) logs an error when a handler task ends
        # cancelled, and close() must cancel handlers waiting in a delay: end quietly.
        with contextlib.suppress(asyncio.CancelledError):
            await self._session(reader, writer)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        peer = writer.get_extra_info("peername")
        self.ctx.count("modbus_connections")
        decoder = MbapDecoder()
        try:
            while True:
                data = await reader.read(4096)
                if not data:
                    break
                try:
                    frames = decoder.feed(data)
                except FrameError as exc:
                    self.ctx.count("modbus_bad_frames")
                    log.warning(
                        "bad modbus tcp frame",
                        extra=fields(device=self.device_id, peer=peer, error=exc),
                    )
                    break
                for frame in frames:
                    await self._handle(frame.transaction, frame.unit, frame.pdu, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _handle(
        self, transaction: int, unit: int, pdu: bytes, writer: asyncio.StreamWriter
    ) -> None:
        ctx = self.ctx
        ctx.count("modbus_requests")
        if unit not in self.regmap.unit_ids:
            ctx.count("modbus_unknown_unit")
            response = encode_exception(pdu[0] if pdu else 0, ExceptionCode.GATEWAY_TARGET_FAILED)
            writer.write(mbap_frame(transaction, unit, response))
            await writer.drain()
            return
        link = ctx.sim.faults.link(self.device_id, unit)
        if link.dropout or link.disconnected:
            ctx.count("modbus_dropped")
            return
        response, served = answer(self.regmap, unit, pdu, link)
        if link.delay_ms:
            await asyncio.sleep(link.delay_ms / 1000.0)
        writer.write(mbap_frame(transaction, unit, response))
        await writer.drain()
        for point, value in served:
            ctx.served(self.device_id, self.protocol, point, value)


class ModbusRtuServer:
    """All unit ids of one RS-485 bus, behind one pseudo-terminal."""

    def __init__(self, device_id: str, link: Path, regmap: RegisterMap, ctx: SimContext) -> None:
        self.device_id = device_id
        self.protocol = "modbus-rtu"
        self.regmap = regmap
        self.ctx = ctx
        self.port = PtyPort(link, self._received)
        self._decoder = RtuDecoder()
        self._queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(maxsize=64)
        self._gap_timer: asyncio.TimerHandle | None = None
        self.link = DisconnectFollower(ctx, device_id, self._hang_up, self.start)

    async def start(self) -> None:
        self.port.open()

    def faults_changed(self) -> None:
        self.link.notify()

    async def _hang_up(self) -> None:
        self.port.hangup()
        self._decoder.flush()

    def _received(self, data: bytes) -> None:
        before = self._decoder.crc_errors
        frames = self._decoder.feed(data)
        if self._decoder.crc_errors > before:
            self.ctx.count("rtu_bad_crc_requests", self._decoder.crc_errors - before)
        for frame in frames:
            try:
                self._queue.put_nowait((frame.unit, frame.pdu))
            except asyncio.QueueFull:
                self.ctx.count("rtu_overruns")
        if self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None
        if self._decoder.pending:
            self._gap_timer = asyncio.get_running_loop().call_later(RTU_GAP_S, self._gap)

    def _gap(self) -> None:
        self._gap_timer = None
        dropped = self._decoder.flush()
        if dropped:
            self.ctx.count("rtu_partial_frames")
            log.debug(
                "rtu partial frame dropped", extra=fields(device=self.device_id, bytes=dropped)
            )

    async def serve(self) -> None:
        """The bus owner: answers queued requests one at a time."""
        ctx = self.ctx
        while True:
            unit, pdu = await self._queue.get()
            ctx.count("modbus_requests")
            if unit == 0:  # broadcast: writes apply to every unit, nobody answers
                for unit_id in self.regmap.unit_ids:
                    answer(self.regmap, unit_id, pdu, LinkFaults())
                continue
            if unit not in self.regmap.unit_ids:
                continue  # another slave's address: stay silent, as on a real bus
            link = ctx.sim.faults.link(self.device_id, unit)
            if link.dropout or link.disconnected or not self.port.is_open:
                ctx.count("modbus_dropped")
                continue
            response, served = answer(self.regmap, unit, pdu, link)
            if link.delay_ms:
                await asyncio.sleep(link.delay_ms / 1000.0)
            corrupt = link.corrupt > 0 and ctx.sim.faults.corrupt_now(self.device_id, unit)
            if corrupt:
                ctx.count("rtu_corrupted_responses")
            if self.port.write(rtu_frame(unit, response, corrupt=corrupt)):
                status = "corrupt" if corrupt else "good"
                for point, value in served:
                    ctx.served(self.device_id, self.protocol, point, value, status)

    async def supervise(self) -> None:
        """Follow ``disconnect`` faults: the pty hangs up while one is active."""
        await self.link.run()

    async def close(self) -> None:
        if self._gap_timer is not None:
            self._gap_timer.cancel()
        self.port.hangup()
