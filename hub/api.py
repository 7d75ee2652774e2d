"""The hub's loopback HTTP API: JSON queries for ``fieldtwin twin`` and ``/metrics``.

A DuckDB file has one writing process, so nothing else may open the hub's database
while it runs; readers ask the hub instead. The server (aiohttp, bound to 127.0.0.1,
with request size and header limits) serves read-only queries: every change to the
twin, its alarms or its commands is a signed operator request on the operator channel
(hub/runtime.py ``_operator_loop``, which calls ``HubService.handle_request``), never
an HTTP call, so nothing here accepts an identity it did not verify. When it listens,
the hub writes ``<database>.api.json`` (pid, port, instance) next to its database;
readers find the hub through that file and fall back to opening the database read-only
when no hub answers.

Routes (GET; JSON unless noted):

- ``/metrics`` (Prometheus text), ``/api/status``
- ``/api/twin?type=&health=&where=&entity=`` (repeatable parameters)
- ``/api/history?entity=&attribute=&from=&to=&limit=``
- ``/api/asof?at=``, ``/api/diff?from=&to=``, ``/api/export``
- ``/api/alarms?state=``, ``/api/drift``, ``/api/audit?limit=``, ``/api/audit/verify``
- ``/api/commands?state=&limit=``, ``/api/commands/{id}``

A bad parameter is a 400 with ``{"error": ...}``; an unknown route a 404; any other
method a 405.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from fieldtwin.hub.errors import HubError, HubUnreachable, QueryError
from fieldtwin.protocol.logfmt import fields

log = logging.getLogger("fieldtwin.hub.api")

MAX_REQUEST_BYTES = 16 * 1024
Params = Mapping[str, list[str]]
Call = Callable[..., Awaitable[Any]]
"""``await call(fn, *args)`` runs ``fn(*args)`` on the hub's database thread."""


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
    """Serves the read-only routes of ``service`` on 127.0.0.1 (aiohttp)."""

    def __init__(self, service: Any, call: Call, port: int = 0) -> None:
        self.service = service
        self.call = call
        self.port = port
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[_errors])
        routes = [
            ("/metrics", self._metrics),
            ("/api/status", self._status),
            ("/api/twin", self._twin),
            ("/api/history", self._history),
            ("/api/asof", self._asof),
            ("/api/diff", self._diff),
            ("/api/export", self._export),
            ("/api/alarms", self._alarms),
            ("/api/drift", self._drift),
            ("/api/audit", self._audit),
            ("/api/audit/verify", self._audit_verify),
            ("/api/commands", self._commands),
            ("/api/commands/{command_id}", self._command),
            ("/api/predict", self._predict),
            ("/api/simulate", self._simulate),
            ("/api/models", self._models),
            ("/api/risk", self._risk),
        ]
        for path, handler in routes:
            app.router.add_get(path, handler)
        return app

    async def start(self) -> int:
        runner = web.AppRunner(
            self.app(),
            access_log=None,
            handle_signals=False,
            max_line_size=8190,
            max_field_size=8190,
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise HubError(f"cannot listen on 127.0.0.1:{self.port} for the API: {exc}") from None
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else self.port
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- routes ------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        text = await self.call(self.service.metrics_text)
        return web.Response(
            text=text,
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Prometheus-Format": "0.0.4"},
        )

    async def _status(self, request: web.Request) -> web.Response:
        return _json(await self.call(self.service.status))

    async def _twin(self, request: web.Request) -> web.Response:
        q = request.query
        service = self.service
        return _json(
            await self.call(
                lambda: service.entities(
                    types=q.getall("type", []),
                    health=q.getall("health", []),
                    where=q.getall("where", []),
                    ids=q.getall("entity", []),
                )
            )
        )

    async def _history(self, request: web.Request) -> web.Response:
        q = request.query
        entity, attribute = q.get("entity"), q.get("attribute")
        if not entity or not attribute:
            raise QueryError("history needs entity= and attribute=")
        limit = _int_param(q, "limit", 1000)
        return _json(
            await self.call(
                self.service.history,
                entity,
                attribute,
                q.get("from", "1h"),
                q.get("to", "now"),
                limit,
            )
        )

    async def _asof(self, request: web.Request) -> web.Response:
        return _json(await self.call(self.service.as_of, request.query.get("at", "now")))

    async def _diff(self, request: web.Request) -> web.Response:
        q = request.query
        return _json(await self.call(self.service.diff, q.get("from", "5m"), q.get("to", "now")))

    async def _export(self, request: web.Request) -> web.Response:
        return _json(await self.call(self.service.export))

    async def _alarms(self, request: web.Request) -> web.Response:
        return _json(await self.call(self.service.alarms, request.query.getall("state", [])))

    async def _drift(self, request: web.Request) -> web.Response:
        return _json(await self.call(self.service.drift))

    async def _audit(self, request: web.Request) -> web.Response:
        limit = _int_param(request.query, "limit", 50)
        return _json(await self.call(self.service.audit_tail, limit))

    async def _audit_verify(self, request: web.Request) -> web.Response:
        return _json(await self.call(self.service.audit_verify))

    async def _commands(self, request: web.Request) -> web.Response:
        q = request.query
        limit = _int_param(q, "limit", 100)
        return _json(await self.call(self.service.command_list, q.getall("state", []), limit))

    async def _command(self, request: web.Request) -> web.Response:
        return _json(await self.call(self.service.command_show, request.match_info["command_id"]))

    async def _predict(self, request: web.Request) -> web.Response:
        q = request.query
        target = q.get("target")
        if not target:
            raise QueryError("predict needs target=ENTITY.ATTRIBUTE")
        return _json(
            await self.call(self.service.predict, target, q.get("horizon", ""), q.get("at", ""))
        )

    async def _simulate(self, request: web.Request) -> web.Response:
        q = request.query
        sets = parse_sets(q.getall("set", []))
        return _json(await self.call(self.service.simulate, sets, q.get("horizon", "")))

    async def _models(self, request: web.Request) -> web.Response:
        return _json(await self.call(self.service.model_list))

    async def _risk(self, request: web.Request) -> web.Response:
        return _json(await self.call(self.service.risk, request.query.get("horizon", "")))


def parse_sets(items: Sequence[str]) -> dict[str, float]:
    """``ENTITY.ATTRIBUTE=VALUE`` items (what-if inputs) as a mapping; QueryError if bad."""
    out: dict[str, float] = {}
    for item in items:
        point, eq, raw = item.partition("=")
        if not eq or "." not in point:
            raise QueryError(
                f"{item!r}: expected ENTITY.ATTRIBUTE=VALUE, e.g. pump-1.speed_sp=1200"
            )
        text = raw.strip().lower()
        try:
            value = {"true": 1.0, "false": 0.0}.get(text)
            out[point.strip()] = value if value is not None else float(text)
        except ValueError:
            raise QueryError(f"{item!r}: {raw!r} is not a number (or true/false)") from None
    if not out:
        raise QueryError("give at least one set=ENTITY.ATTRIBUTE=VALUE")
    return out


def _int_param(query: Mapping[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise QueryError(f"{name}={raw!r} is not a whole number") from None
    if not 1 <= value <= 1_000_000:
        raise QueryError(f"{name}={value} is out of range (1 to 1000000)")
    return value


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _json({"error": exc.reason}, exc.status)
        raise
    except QueryError as exc:
        return _json({"error": str(exc)}, 400)
    except HubError as exc:
        return _json({"error": str(exc)}, 409)
    except Exception as exc:  # one bad request never takes the server down
        log.exception("api request failed", extra=fields(path=request.path, error=str(exc)))
        return _json({"error": f"internal error: {exc}"}, 500)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(value, default=str).encode(), status=status, content_type="application/json"
    )


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
