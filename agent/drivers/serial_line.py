"""Line-oriented serial sensors (pyserial + the event loop's reader callbacks).

The port is opened non-blocking and watched with ``loop.add_reader``, so no thread is
needed. Each complete line is checked (framing, checksum, sentence tag, field count);
a bad line is counted and dropped, never half-used. A reading is stamped with the
agent's clock when its line arrived (the sensor has no clock of its own).

If ``request`` is set (e.g. ``"?\\r\\n"``) it is written every ``interval_ms``; sensors
that talk by themselves need none. A sensor that falls silent keeps its port open: its
values turn STALE in the sampler after ``max_silence`` (with their original time). A
port that fails (unplugged adapter, pty gone) reports BAD once and is reopened with
backoff. With ``seq_field`` set, gaps in the sensor's line counter are counted as
``lines_lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any

from fieldtwin.agent.commands import WriteOutcome
from fieldtwin.agent.config import DeviceConfig, PointConfig
from fieldtwin.agent.drivers.base import CheckRow, Driver, Sink, serial_port_problem
from fieldtwin.agent.errors import DeviceRejected, DeviceTimeout, DeviceUnavailable, LineError
from fieldtwin.agent.lineproto import LineSplitter, Sentence, parse_sentence
from fieldtwin.agent.plausible import plausible
from fieldtwin.agent.util import Backoff, now_ms, within
from fieldtwin.protocol.logfmt import fields
from fieldtwin.protocol.messages import Quality, Value

log = logging.getLogger("fieldtwin.agent.serial")


def field_value(point: PointConfig, sentence: Sentence) -> Value:
    """The point's field as its configured type, or None if absent or not parseable."""
    if point.field_index >= len(sentence.fields):
        return None
    text = sentence.fields[point.field_index].strip()
    try:
        if point.dtype in ("float32", "float64"):
            return float(text)
        if point.dtype == "string":
            return text
        if point.dtype == "bool":
            return text.lower() in ("1", "true", "on", "yes")
        return int(text)
    except ValueError:
        return None


class SerialLineDriver(Driver):
    def __init__(self, device: DeviceConfig, points: Sequence[tuple[int, PointConfig]]) -> None:
        super().__init__(device, points)
        self._serial: Any = None
        self._last_seq: int | None = None
        for key in ("lines", "bad_lines", "lines_lost", "other_sentences"):
            self.stats.extra[key] = 0
        self.stats.extra["last_line"] = ""

    def _open(self) -> Any:
        import serial

        try:
            port = serial.Serial(
                self.device.path,
                baudrate=self.device.baudrate,
                bytesize=self.device.bytesize,
                parity=self.device.parity,
                stopbits=self.device.stopbits,
                timeout=0,
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            problem = serial_port_problem(self.device.path)
            raise DeviceUnavailable(problem or f"cannot open {self.device.path}: {exc}") from None
        self._serial = port
        self.stats.connected = True
        self.stats.reconnects += 1
        return port

    def _close(self) -> None:
        port, self._serial = self._serial, None
        self.stats.connected = False
        if port is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(port.fileno())
            with contextlib.suppress(Exception):
                port.close()

    async def _lines(self, port: Any, queue: asyncio.Queue[bytes | Exception]) -> None:
        """Feed the queue from the port's file descriptor."""
        loop = asyncio.get_running_loop()
        fd = port.fileno()

        def readable() -> None:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            except OSError as exc:
                loop.remove_reader(fd)
                queue.put_nowait(exc)
                return
            if not data:
                loop.remove_reader(fd)
                queue.put_nowait(OSError(f"{self.device.path} closed"))
                return
            queue.put_nowait(data)

        loop.add_reader(fd, readable)

    def _parse(self, line: bytes) -> Sentence | None:
        self.stats.extra["lines"] += 1
        try:
            sentence = parse_sentence(line, verify_checksum=self.device.checksum)
        except LineError as exc:
            self.stats.extra["bad_lines"] += 1
            self.stats.failure(str(exc))
            return None
        if sentence.tag != self.device.sentence:
            self.stats.extra["other_sentences"] += 1
            return None
        self.stats.extra["last_line"] = line.decode("ascii", "replace").strip()[:120]
        if self.device.seq_field >= 0 and self.device.seq_field < len(sentence.fields):
            with contextlib.suppress(ValueError):
                seq = int(sentence.fields[self.device.seq_field])
                if self._last_seq is not None:
                    lost = (seq - self._last_seq - 1) % 65536
                    if 0 < lost < 1000:
                        self.stats.extra["lines_lost"] += lost
                self._last_seq = seq
        return sentence

    async def run(self, sink: Sink) -> None:
        backoff = Backoff(0.5, 30.0)
        failed = False
        while True:
            try:
                port = self._open()
                queue: asyncio.Queue[bytes | Exception] = asyncio.Queue()
                await self._lines(port, queue)
                splitter = LineSplitter()
                request_task = None
                if self.device.request:
                    request_task = asyncio.create_task(
                        self._requests(port), name=f"serial-request:{self.id}"
                    )
                try:
                    while True:
                        item = await queue.get()
                        if isinstance(item, Exception):
                            raise DeviceUnavailable(f"{self.device.path}: {item}")
                        for line in splitter.feed(item):
                            sentence = self._parse(line)
                            if sentence is None:
                                continue
                            if failed:
                                log.info("sensor talking again", extra=fields(device=self.id))
                            failed = False
                            backoff.reset()
                            self.stats.success(0.0)
                            stamp = now_ms()
                            for index, point in self.points:
                                value = field_value(point, sentence)
                                quality = Quality.GOOD if value is not None else Quality.BAD
                                sink.offer(index, value, stamp, quality)
                finally:
                    if request_task is not None:
                        request_task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await request_task
            except DeviceUnavailable as exc:
                self.stats.failure(str(exc))
                if not failed:
                    failed = True
                    log.warning(
                        "serial port failed: points reported BAD",
                        extra=fields(device=self.id, path=self.device.path, error=str(exc)),
                    )
                    for index, _ in self.points:
                        sink.fail(index)
            finally:
                self._close()
            await asyncio.sleep(backoff.next_delay())

    async def _requests(self, port: Any) -> None:
        interval = min(p.interval_ms for _, p in self.points) / 1000
        payload = self.device.request.encode("ascii", "replace")
        while True:
            with contextlib.suppress(OSError):
                os.write(port.fileno(), payload)
            await asyncio.sleep(interval)

    async def write(self, point: PointConfig, value: Value) -> WriteOutcome:
        raise DeviceRejected(f"{self.device.id} is a read-only serial sensor")

    async def check(self) -> list[CheckRow]:
        """Wait for one valid sentence (asking for it if ``request`` is set)."""
        try:
            port = self._open()
        except DeviceUnavailable as exc:
            return [CheckRow(point, False, error=str(exc)) for _, point in self.points]
        try:
            queue: asyncio.Queue[bytes | Exception] = asyncio.Queue()
            await self._lines(port, queue)
            if self.device.request:
                os.write(port.fileno(), self.device.request.encode("ascii", "replace"))
            splitter = LineSplitter()
            wait_s = max(
                self.device.timeout_s, 2 * min(p.interval_ms for _, p in self.points) / 1000, 3.0
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_s
            last_error = "no line received"
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise DeviceTimeout(f"{self.device.path}: {last_error} within {wait_s:.0f}s")
                try:
                    item = await within(remaining, queue.get())
                except TimeoutError:
                    continue
                if isinstance(item, Exception):
                    raise DeviceUnavailable(f"{self.device.path}: {item}")
                for line in splitter.feed(item):
                    try:
                        sentence = parse_sentence(line, verify_checksum=self.device.checksum)
                    except LineError as exc:
                        last_error = f"bad line ({exc})"
                        continue
                    if sentence.tag != self.device.sentence:
                        last_error = f"only {sentence.tag!r} sentences"
                        continue
                    stamp = now_ms()
                    rows = []
                    text = line.decode("ascii", "replace").strip()
                    for _, point in self.points:
                        value = field_value(point, sentence)
                        ok = value is not None and plausible(point, value)
                        rows.append(
                            CheckRow(
                                point,
                                ok,
                                value,
                                Quality.GOOD if value is not None else Quality.BAD,
                                raw=text,
                                error="" if ok else f"field {point.field_index} is {value!r}",
                                ts_ms=stamp,
                            )
                        )
                    return rows
        except (DeviceUnavailable, DeviceTimeout) as exc:
            return [CheckRow(point, False, error=str(exc)) for _, point in self.points]
        finally:
            self._close()
