"""The loopback control interface of a running simulator: a tiny JSON-over-HTTP server.

HTTP so that ``curl`` works too; loopback only, because it has no authentication.
Routes (answered by the runner, see docs/simulator.md):

    GET    /status                       scenario, tick, endpoints, counters
    GET    /faults                       every fault (scheduled, active, ended)
    POST   /faults                       inject: {"kind", "device", "point", "unit_id",
                                                  "duration", "params": {...}}
    DELETE /faults/<id>                  end one fault at the next tick
    POST   /faults/clear                 end every scheduled or active fault
    GET    /truth[?point=P&point=Q]      current true and reported values
    GET    /truth/history?point=P[&since_tick=N][&limit=M]   recorded truth rows

Every answer is a JSON object; errors are ``{"error": "..."}`` with status 4xx/5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fieldtwin.protocol.logfmt import fields
from fieldtwin.sim.errors import ControlError, EndpointError

log = logging.getLogger("fieldtwin.sim.control")

MAX_BODY = 1 << 20
MAX_HEADER_LINES = 100
READ_TIMEOUT_S = 10.0

Query = dict[str, list[str]]
Handler = Callable[[str, str, Query, Any], Awaitable[tuple[int, Any]]]


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class ControlServer:
    def __init__(self, host: str, port: int, handler: Handler) -> None:
        self.host = host
        self.port = port
        self.handler = handler
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as exc:
            raise EndpointError(
                f"control interface cannot listen on {self.host}:{self.port}: "
                f"{exc.strerror or exc} "
                "(is another simulator running? use --ephemeral for free ports)"
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio's stream server (Python 3.11) logs an error when a handler task ends
        # cancelled, and close() must cancel handlers waiting in a delay: end quietly.
        with contextlib.suppress(asyncio.CancelledError):
            await self._session(reader, writer)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            status, payload = await self._dispatch(reader)
            body = json.dumps(payload).encode()
            head = (
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _dispatch(self, reader: asyncio.StreamReader) -> tuple[int, Any]:
        try:
            method, path, query, body = await asyncio.wait_for(
                self._read_request(reader), READ_TIMEOUT_S
            )
        except HttpError as exc:
            return exc.status, {"error": str(exc)}
        except (TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            return 400, {"error": f"bad request: {exc or 'timeout'}"}
        try:
            return await self.handler(method, path, query, body)
        except HttpError as exc:
            return exc.status, {"error": str(exc)}
        except Exception as exc:  # the control plane must never take the simulator down
            log.exception("control request failed", extra=fields(method=method, path=path))
            return 500, {"error": f"internal error: {exc}"}

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str, Query, Any]:
        line = await reader.readline()
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise HttpError(400, "expected an HTTP/1.1 request line")
        method, target = parts[0].upper(), parts[1]
        length = 0
        for _ in range(MAX_HEADER_LINES):
            header = await reader.readline()
            if header in (b"\r\n", b"\n", b""):
                break
            name, _, value = header.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        else:
            raise HttpError(431, "too many header lines")
        if not 0 <= length <= MAX_BODY:
            raise HttpError(413, f"body larger than {MAX_BODY} bytes")
        body: Any = None
        if length:
            raw = await reader.readexactly(length)
            try:
                body = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise HttpError(400, f"body is not JSON: {exc}") from None
        split = urlsplit(target)
        return method, split.path, parse_qs(split.query), body


def request(
    address: str, method: str, path: str, body: Any = None, *, timeout: float = 15.0
) -> Any:
    """Call a running simulator's control interface; raises ``ControlError`` with a fix."""
    url = f"http://{address}{path}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            detail = exc.reason
        raise ControlError(f"simulator at {address} refused {method} {path}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ControlError(
            f"no simulator answers at {address} ({reason}); is 'fieldtwin sim run' running? "
            "pass --control HOST:PORT (the 'control' field of its endpoints JSON)"
        ) from None
