"""A loopback TCP relay in front of a server, for link faults the server cannot show.

The OPC-UA stack (asyncua) has no hook to stall, delay or drop its own connections, so
the simulator puts this relay on the public port and lets the stack listen on a private
loopback port. The relay passes bytes through untouched unless a fault says otherwise:

- ``dropout``: bytes in both directions are swallowed, so requests time out; when the
  dropout ends, connections that lost bytes are closed (their message streams are out of
  step) and clients reconnect.
- ``slow``: server-to-client bytes are held back ``delay_ms`` (order preserved).
- ``disconnect``: open connections are closed and the public port stops listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fieldtwin.protocol.aio import within
from fieldtwin.protocol.logfmt import fields
from fieldtwin.sim.errors import EndpointError

log = logging.getLogger("fieldtwin.sim.relay")

CONNECT_TIMEOUT_S = 5.0


class _Link:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tainted = False


class TcpRelay:
    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.target: tuple[str, int] | None = None
        self.dropout = False
        self.delay_ms = 0.0
        self._server: asyncio.Server | None = None
        self._links: dict[asyncio.Task[None], _Link] = {}
        self.bytes_relayed = 0
        self.bytes_swallowed = 0

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as exc:
            raise EndpointError(
                f"{self.name}: cannot listen on {self.host}:{self.port}: {exc.strerror or exc} "
                "(is another simulator running? use --ephemeral for free ports)"
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._close_links(list(self._links))
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def set_dropout(self, dropout: bool) -> None:
        ending = self.dropout and not dropout
        self.dropout = dropout
        if ending:
            await self._close_links([task for task, link in self._links.items() if link.tainted])

    async def _close_links(self, tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            link = self._links.get(task)
            if link is not None:
                link.client.close()
                if link.upstream is not None:
                    link.upstream.close()
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        await self.stop_listening()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio's stream server (Python 3.11) logs an error when a handler task ends
        # cancelled, and close() must cancel handlers waiting in a delay: end quietly.
        with contextlib.suppress(asyncio.CancelledError):
            await self._session(reader, writer)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self.target is None:  # the server behind is still starting: like a refused call
            writer.close()
            return
        link = _Link(writer)
        self._links[task] = link
        try:
            try:
                up_reader, up_writer = await within(
                    CONNECT_TIMEOUT_S, asyncio.open_connection(*self.target)
                )
            except (OSError, TimeoutError) as exc:
                log.warning("relay upstream unreachable", extra=fields(relay=self.name, error=exc))
                return
            link.upstream = up_writer
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    self._pump(reader, up_writer, link, delayed=False), name=f"{self.name}-c2s"
                )
                group.create_task(
                    self._pump(up_reader, writer, link, delayed=True), name=f"{self.name}-s2c"
                )
        except* (ConnectionError, OSError):
            pass
        finally:
            self._links.pop(task, None)
            for w in (writer, link.upstream):
                if w is not None:
                    w.close()
                    with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                        await w.wait_closed()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        *,
        delayed: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = loop.create_task(deliver(), name=f"{self.name}-deliver")
        try:
            while data := await reader.read(65536):
                if self.dropout:
                    link.tainted = True
                    self.bytes_swallowed += len(data)
                    continue
                self.bytes_relayed += len(data)
                delay = self.delay_ms / 1000.0 if delayed else 0.0
                queue.put_nowait((loop.time() + delay, data))
            queue.put_nowait(None)  # deliver what is still held back, then stop
            with contextlib.suppress(ConnectionError, OSError):
                await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await sender
        # One direction ended: close both so the other pump ends too.
        writer.close()
        link.client.close()
