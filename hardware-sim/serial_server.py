"""A serial line sensor on a pseudo-terminal (protocol: fieldtwin.sim.lineproto).

The sensor prints one line every ``interval`` seconds of *wall-clock* time — its output
rate is a property of its firmware, while ``--speed`` only makes the process evolve
faster — and answers ``?`` (with or without CR/LF) at once with a fresh line. Both
share one sequence counter. If whole lines are still unread when the next one is due
(nobody has the port open), they are discarded first, like bytes on a wire with no
listener, so a client that opens the port late gets at most one stale line. A client in
the middle of reading a line is never cut off: the backlog is only discarded when it
is exactly a run of whole lines.

Faults: ``dropout`` (silent), ``slow`` (every line and answer ``delay_ms`` late),
``corrupt`` (lines carry a wrong checksum), ``disconnect`` (the pty hangs up and the
symlink disappears until the fault ends), and value faults through the simulation.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from fieldtwin.sim.context import DisconnectFollower, SimContext
from fieldtwin.sim.lineproto import SEQ_MODULUS, format_line
from fieldtwin.sim.ptys import PtyPort
from fieldtwin.sim.scenario import DeviceSpec

log = logging.getLogger("fieldtwin.sim.serial")

MAX_INPUT = 256


class SerialLineServer:
    def __init__(self, device: DeviceSpec, ctx: SimContext) -> None:
        assert device.link is not None
        self.device = device
        self.device_id = device.id
        self.ctx = ctx
        self.port = PtyPort(device.link, self._received)
        self.seq = 0
        self._input = bytearray()
        self._queries: asyncio.Queue[None] = asyncio.Queue(maxsize=16)
        self.link = DisconnectFollower(ctx, device.id, self._hang_up, self.start)
        self._written: deque[int] = deque(maxlen=256)  # lengths of recent lines
        self._send_lock = asyncio.Lock()

    async def start(self) -> None:
        self.port.open()

    def faults_changed(self) -> None:
        self.link.notify()

    async def _hang_up(self) -> None:
        self.port.hangup()
        self._input.clear()
        self._written.clear()

    def _received(self, data: bytes) -> None:
        self._input += data
        while True:
            mark = self._input.find(b"?")
            if mark < 0:
                break
            del self._input[: mark + 1]
            while bytes(self._input[:1]) in (b"\r", b"\n"):
                del self._input[:1]
            try:
                self._queries.put_nowait(None)
            except asyncio.QueueFull:
                self.ctx.count("serial_queries_dropped")
        if len(self._input) > MAX_INPUT:
            self._input.clear()

    def _line(self) -> tuple[bytes, list[tuple[str, float]], bool]:
        sim = self.ctx.sim
        values = [sim.value(p.name) for p in self.device.points]
        decimals = [p.decimals for p in self.device.points]
        corrupt = sim.faults.corrupt_now(self.device.id) if sim.faults.active else False
        line = format_line(self.device.talker, self.seq, values, decimals, corrupt=corrupt)
        self.seq = (self.seq + 1) % SEQ_MODULUS
        served = [
            (p.name, round(v, p.decimals)) for p, v in zip(self.device.points, values, strict=True)
        ]
        return line, served, corrupt

    async def _send(self, via: str) -> None:
        async with self._send_lock:
            link = self.ctx.sim.faults.link(self.device.id)
            if link.dropout or link.disconnected or not self.port.is_open:
                self.ctx.count("serial_lines_suppressed")
                return
            if link.delay_ms:
                await asyncio.sleep(link.delay_ms / 1000.0)
            line, served, corrupt = self._line()
            if via == "line" and self._only_whole_lines_unread():
                self.port.discard_unread()
                self._written.clear()
                self.ctx.count("serial_backlog_discarded")
            if corrupt:
                self.ctx.count("serial_lines_corrupted")
            if self.port.write(line):
                self._written.append(len(line))
                self.ctx.count("serial_lines")
                for point, value in served:
                    self.ctx.served(
                        self.device.id,
                        "serial-line",
                        point,
                        value,
                        "corrupt" if corrupt else "good",
                        via,
                    )

    def _only_whole_lines_unread(self) -> bool:
        """Whether the unread bytes are exactly the last few lines written (no partial)."""
        pending = self.port.unread()
        if not pending:
            return False
        total = 0
        for length in reversed(self._written):
            total += length
            if total >= pending:
                return total == pending
        return False

    async def periodic(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.device.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if loop.time() - next_at > self.device.interval:
                next_at = loop.time()  # fell behind (machine busy): do not burst
            await self._send("line")

    async def answer_queries(self) -> None:
        while True:
            await self._queries.get()
            await self._send("answer")

    async def supervise(self) -> None:
        """Follow ``disconnect`` faults: the pty hangs up while one is active."""
        await self.link.run()

    async def close(self) -> None:
        self.port.hangup()
