"""The hub's loopback HTTP API: JSON queries for ``fieldtwin twin`` and ``/metrics``.

A DuckDB file has one writing process, so nothing else may open the hub's database
while it runs; readers ask the hub instead. The server binds 127.0.0.1 only and
speaks just enough HTTP/1.1 (one request per connection, bounded request size).
When it listens, the hub writes ``<database>.api.json`` (pid, port, instance) next to
its database; readers find the hub through that file and fall back to opening the
database read-only when no hub answers.

Routes (GET unless noted; JSON unless noted):

- ``/metrics`` (Prometheus text), ``/api/status``
- ``/api/twin?type=&health=&where=&entity=`` (repeatable parameters)
- ``/api/history?entity=&attribute=&from=&to=&limit=``
- ``/api/asof?at=``, ``/api/diff?from=&to=``, ``/api/export``
- ``/api/alarms?state=``, ``/api/drift``, ``/api/audit?limit=``
- POST ``/api/alarms/ID/ack?by=``, ``/api/alarms/ID/shelve?by=&for=``,
  ``/api/alarms/ID/unshelve?by=``
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldtwin.hub.errors import HubError, HubUnreachable, QueryError
from fieldtwin.protocol.logfmt import fields

log = logging.getLogger("fieldtwin.hub.api")

MAX_REQUEST_BYTES = 16 * 1024
Params = Mapping[str, list[str]]
Handler = Callable[[str, str, Params], Awaitable[tuple[int, str, bytes]]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Contents of the endpoint file a running hub writes."""

    pid: int
    port: int
    instance: str
    database: str
    started_ms: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def read(cls, path: Path) -> Endpoint | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                pid=int(data["pid"]),
                port=int(data["port"]),
                instance=str(data["instance"]),
                database=str(data["database"]),
                started_ms=int(data["started_ms"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "pid": self.pid,
                    "port": self.port,
                    "instance": self.instance,
                    "database": self.database,
                    "started_ms": self.started_ms,
                    "api": self.base_url,
                }
            ),
            encoding="utf-8",
        )
        os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ApiServer:
    """Serves ``handler(method, path, params)`` on 127.0.0.1."""

    def __init__(self, handler: Handler, port: int = 0) -> None:
        self.handler = handler
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        try:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        except OSError as exc:
            raise HubError(f"cannot listen on 127.0.0.1:{self.port} for the API: {exc}") from None
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, content_type, body = await asyncio.wait_for(self._request(reader), 30)
        except TimeoutError:
            status, content_type, body = 408, "text/plain", b"request timeout\n"
        except Exception as exc:  # one bad request never takes the server down
            log.exception("api request failed", extra=fields(error=str(exc)))
            status, content_type, body = 500, "application/json", _json({"error": str(exc)})
        reason = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            408: "Request Timeout",
            409: "Conflict",
            413: "Payload Too Large",
            500: "Internal Server Error",
            503: "Service Unavailable",
        }.get(status, "OK")
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode() + body)
            await asyncio.wait_for(writer.drain(), 30)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def _request(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return 413, "text/plain", b"request too large\n"
        except asyncio.IncompleteReadError:
            return 400, "text/plain", b"incomplete request\n"
        if len(raw) > MAX_REQUEST_BYTES:
            return 413, "text/plain", b"request too large\n"
        line = raw.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        if len(parts) != 3:
            return 400, "text/plain", b"bad request line\n"
        method, target, _ = parts
        if method not in ("GET", "POST"):
            return 405, "text/plain", b"only GET and POST\n"
        url = urllib.parse.urlsplit(target)
        params = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        try:
            return await self.handler(method, url.path, params)
        except QueryError as exc:
            return 400, "application/json", _json({"error": str(exc)})
        except HubError as exc:
            return 409, "application/json", _json({"error": str(exc)})


def _json(value: Any) -> bytes:
    return json.dumps(value, default=str).encode()


def json_response(value: Any, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json", _json(value)


# -- client --------------------------------------------------------------------------------


class ApiClient:
    """Blocking client for the CLI (urllib; loopback only; every call has a timeout)."""

    def __init__(self, endpoint: Endpoint, timeout: float = 30.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout

    def call(self, path: str, params: Mapping[str, Any] | None = None, method: str = "GET") -> Any:
        query = urllib.parse.urlencode(
            [
                (key, str(item))
                for key, value in (params or {}).items()
                if value is not None
                for item in (value if isinstance(value, list | tuple) else [value])
            ]
        )
        url = f"{self.endpoint.base_url}{path}" + (f"?{query}" if query else "")
        request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
                kind = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            try:
                message = json.loads(detail)["error"]
            except (ValueError, KeyError, TypeError):
                message = detail.strip() or exc.reason
            if exc.code == 400:
                raise QueryError(message) from None
            raise HubError(f"the hub refused: {message}") from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise HubUnreachable(
                f"the hub API at {self.endpoint.base_url} did not answer: {exc}"
            ) from None
        if kind.startswith("application/json"):
            return json.loads(body)
        return body.decode("utf-8")
