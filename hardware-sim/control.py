"""The loopback control interface of a running simulator: JSON over HTTP (aiohttp).

HTTP so that ``curl`` works too; loopback only, because it has no authentication.
Parsing HTTP is left to aiohttp (request line, headers, chunked bodies) with tight
limits; this module only routes, checks every parameter and maps errors to statuses.
Routes (answered by a ``ControlService``, the runner; see docs/simulator.md):

    GET    /status                       scenario, tick, endpoints, counters
    GET    /faults                       every fault (scheduled, active, ended)
    POST   /faults                       inject: {"kind", "device", "point", "unit_id",
                                                  "component", "duration", "params": {...}}
    DELETE /faults/<id>                  end one fault at the next tick
    POST   /faults/clear                 end every scheduled or active fault
    GET    /truth[?point=P&point=Q]      current true and reported values
    GET    /truth/history?point=P[&since_tick=N][&limit=M]   recorded truth rows
    GET    /truth/writes[?point=P...][&since_tick=N][&limit=M]  recorded client writes

Every answer is a JSON object; every refusal is ``{"error": "..."}`` with 400 (a bad
parameter or body: the message names it), 404 (no such route or fault), 405, 408 (body
not sent in time), 409 (no ground truth in this run) or 413 (body too large). Only a
request that is not HTTP at all (or breaks the line and header limits) gets aiohttp's
own plain-text 400; aiohttp would log each of those with a traceback at error level, so
they are logged as one warning line at most every ``PROTOCOL_LOG_EVERY_S`` and counted.
Every response closes its connection.

The client (``request``) stays on the standard library's urllib: the CLI makes one
synchronous call per command, and the parsing that needs hardening is the server's.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Collection
from typing import Any, NoReturn, Protocol

from aiohttp import web

from fieldtwin.protocol.aio import within
from fieldtwin.protocol.logfmt import fields
from fieldtwin.sim.errors import (
    ControlError,
    EndpointError,
    FaultError,
    NoGroundTruth,
    SimError,
    UnknownFault,
)
from fieldtwin.sim.faults import FaultRequest, suggest

log = logging.getLogger("fieldtwin.sim.control")

MAX_BODY = 64 * 1024  # a fault request is a few hundred bytes
MAX_LINE = 4096  # request line
MAX_HEADER = 4096  # one header field
MAX_HEADERS = 32
BODY_TIMEOUT_S = 10.0
HISTORY_LIMIT = 100_000
MAX_TICK = 2**62
MAX_RESPONSE = 256 * 1024 * 1024  # the client reads at most this much
FAULT_FIELDS = ("component", "device", "duration", "kind", "params", "point", "unit_id")
PROTOCOL_LOG_EVERY_S = 10.0


class ControlService(Protocol):
    """What the control interface asks of a running simulator (the runner)."""

    def point_names(self) -> Collection[str]: ...

    def status(self) -> dict[str, Any]: ...

    def faults(self) -> list[dict[str, Any]]: ...

    def inject(self, request: FaultRequest, duration: float | None) -> dict[str, Any]: ...

    def clear(self, fault_id: int) -> dict[str, Any]: ...

    def clear_all(self) -> list[dict[str, Any]]: ...

    def truth_now(self, points: list[str]) -> dict[str, Any]: ...

    async def truth_history(self, point: str, since_tick: int, limit: int) -> list[list[Any]]: ...

    async def truth_writes(
        self, points: list[str], since_tick: int, limit: int
    ) -> list[dict[str, Any]]: ...


class BadRequest(Exception):
    """A parameter or body the control interface refuses (HTTP 400)."""


def _bad(message: str) -> NoReturn:
    raise BadRequest(message)


class Params:
    """The query string of one request, checked: unknown names, bad integers, unknown
    points all give a 400 that names the parameter."""

    def __init__(self, request: web.Request, allowed: Collection[str]) -> None:
        self.query = request.query
        for name in self.query:
            if name not in allowed:
                valid = ", ".join(sorted(allowed)) or "none"
                _bad(
                    f"unknown parameter {_short(name)!r}{suggest(name, allowed)} "
                    f"(parameters: {valid})"
                )

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        values = self.query.getall(name, [])
        if not values:
            return default
        if len(values) > 1:
            _bad(f"{name}: give it once")
        text = values[0].strip()
        try:
            value = int(text)
        except ValueError:
            _bad(f"{name}: expected an integer, got {_short(values[0])!r}")
        if not low <= value <= high:
            _bad(f"{name}: {_short(text)} is outside {low}..{high}")
        return value

    def points(self, known: Collection[str], *, exactly_one: bool = False) -> list[str]:
        names = list(self.query.getall("point", []))
        if exactly_one and len(names) != 1:
            _bad("name exactly one point: ?point=tank-1.level")
        for name in names:
            if name not in known:
                _bad(f"unknown point {_short(name)!r}{suggest(name, known)}")
        return names


def _short(text: str, width: int = 40) -> str:
    """Echo at most ``width`` characters of what a client sent."""
    return text if len(text) <= width else text[: width - 3] + "..."


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


async def _json_body(request: web.Request) -> Any:
    """The decoded JSON body, or ``None`` when there is none."""
    length = request.content_length
    if length is not None and length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=length)
    try:
        raw = await within(BODY_TIMEOUT_S, request.read())
    except TimeoutError:
        raise web.HTTPRequestTimeout() from None
    if not raw.strip():
        return None
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except ValueError as exc:
        _bad(f"body is not JSON: {exc}")


def parse_fault_body(body: Any) -> tuple[FaultRequest, float | None]:
    """Check the shape of a ``POST /faults`` body; the fault's own checks come later."""
    if not isinstance(body, dict):
        _bad('expected a JSON object like {"kind": "stuck", "point": "tank-1.level"}')
    unknown = sorted(set(body) - set(FAULT_FIELDS))
    if unknown:
        _bad(f"unknown field {unknown[0]!r} (fields: {', '.join(FAULT_FIELDS)})")
    kind = body.get("kind")
    if not isinstance(kind, str):
        _bad("kind: expected a string")
    for key in ("device", "point", "component"):
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            _bad(f"{key}: expected a string")
    unit_id = body.get("unit_id")
    if unit_id is not None and (isinstance(unit_id, bool) or not isinstance(unit_id, int)):
        _bad("unit_id: expected an integer")
    duration = body.get("duration")
    if duration is not None and (
        isinstance(duration, bool)
        or not isinstance(duration, int | float)
        or not (math.isfinite(duration) and 0 < duration <= 1e9)
    ):
        _bad("duration: expected a positive number of simulated seconds")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        _bad("params: expected an object")
    request = FaultRequest(
        kind, body.get("device"), body.get("point"), unit_id, params, body.get("component")
    )
    return request, None if duration is None else float(duration)


Route = Callable[[web.Request], Awaitable[tuple[int, Any]]]


class _ProtocolErrors(logging.Filter):
    """Turns aiohttp's log of an unparsable request (error level, with a traceback) into
    one warning line, at most every ``PROTOCOL_LOG_EVERY_S``; counts every one."""

    def __init__(self, count: Callable[[], None]) -> None:
        super().__init__()
        self.count = count
        self.last = -PROTOCOL_LOG_EVERY_S
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.count()
        now = time.monotonic()
        if now - self.last < PROTOCOL_LOG_EVERY_S:
            self.suppressed += 1
            return False
        self.last = now
        problem = record.exc_info[1] if record.exc_info else record.getMessage()
        record.msg, record.args = "bad HTTP request on the control interface", ()
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.ft_fields = {"problem": str(problem)[:200], "suppressed": self.suppressed}
        self.suppressed = 0
        return True


class ControlServer:
    def __init__(
        self,
        host: str,
        port: int,
        service: ControlService,
        *,
        on_refused: Callable[[], None] = lambda: None,
    ) -> None:
        self.host = host
        self.port = port
        self.service = service
        self.on_refused = on_refused
        self.routes: list[str] = []
        self._runner: web.AppRunner | None = None
        self._http_log = logging.getLogger("fieldtwin.sim.control.http")
        self._quiet = _ProtocolErrors(on_refused)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=MAX_BODY)
        routes: list[tuple[str, str, Route]] = [
            ("GET", "/status", self._status),
            ("GET", "/faults", self._faults),
            ("POST", "/faults", self._inject),
            ("POST", "/faults/clear", self._clear_all),
            ("DELETE", "/faults/{id}", self._clear),
            ("GET", "/truth", self._truth),
            ("GET", "/truth/history", self._history),
            ("GET", "/truth/writes", self._writes),
        ]
        for method, path, route in routes:
            app.router.add_route(method, path, self._json(route))
        self.routes = [f"{method} {path}" for method, path, _ in routes]
        return app

    async def start(self) -> None:
        self._http_log.addFilter(self._quiet)
        runner = web.AppRunner(
            self.app(),
            access_log=None,
            logger=self._http_log,
            handle_signals=False,
            shutdown_timeout=2.0,
            keepalive_timeout=5.0,
            lingering_time=1.0,  # a refused body is not read for long
            max_line_size=MAX_LINE,
            max_field_size=MAX_HEADER,
            max_headers=MAX_HEADERS,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            self._http_log.removeFilter(self._quiet)
            raise EndpointError(
                f"control interface cannot listen on {self.host}:{self.port}: "
                f"{exc.strerror or exc} "
                "(is another simulator running? use --ephemeral for free ports)"
            ) from None
        self._runner = runner
        for address in runner.addresses:
            self.port = int(address[1])
            break

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        self._http_log.removeFilter(self._quiet)

    # -- plumbing ------------------------------------------------------------------------

    @staticmethod
    def _json(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            status, payload = await route(request)
            return web.json_response(payload, status=status)

        return handler

    @web.middleware
    async def _errors(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = _error(exc.status, self._library_error(request, exc))
        except BadRequest as exc:
            response = _error(400, str(exc))
        except UnknownFault as exc:
            response = _error(404, str(exc))
        except NoGroundTruth as exc:
            response = _error(409, str(exc))
        except (FaultError, SimError) as exc:
            response = _error(400, str(exc))
        except Exception as exc:  # the control plane must never take the simulator down
            log.exception(
                "control request failed", extra=fields(method=request.method, path=request.path)
            )
            response = _error(500, f"internal error: {type(exc).__name__}")
        if response.status >= 400:
            self.on_refused()
        response.force_close()
        return response

    def _library_error(self, request: web.Request, exc: web.HTTPException) -> str:
        path = request.path[:200]
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            return f"{request.method} is not allowed on {path} (allowed: {allowed})"
        if isinstance(exc, web.HTTPNotFound):
            return f"no route {path} (routes: {', '.join(self.routes)})"
        if isinstance(exc, web.HTTPRequestEntityTooLarge):
            return f"body larger than {MAX_BODY} bytes"
        if isinstance(exc, web.HTTPRequestTimeout):
            return f"body not received within {BODY_TIMEOUT_S:g} s"
        return exc.reason

    # -- routes --------------------------------------------------------------------------

    async def _status(self, request: web.Request) -> tuple[int, Any]:
        Params(request, ())
        return 200, self.service.status()

    async def _faults(self, request: web.Request) -> tuple[int, Any]:
        Params(request, ())
        return 200, {"faults": self.service.faults()}

    async def _inject(self, request: web.Request) -> tuple[int, Any]:
        Params(request, ())
        fault, duration = parse_fault_body(await _json_body(request))
        return 201, self.service.inject(fault, duration)

    async def _clear_all(self, request: web.Request) -> tuple[int, Any]:
        Params(request, ())
        body = await _json_body(request)
        if body is not None and body != {}:
            _bad("POST /faults/clear takes no fields: send {} or nothing")
        return 200, {"faults": self.service.clear_all()}

    async def _clear(self, request: web.Request) -> tuple[int, Any]:
        Params(request, ())
        ident = request.match_info["id"]
        if not ident.isascii() or not ident.isdigit() or len(ident) > 18:
            _bad(f"fault id: expected an integer, got {_short(ident)!r}")
        return 200, self.service.clear(int(ident))

    async def _truth(self, request: web.Request) -> tuple[int, Any]:
        known = self.service.point_names()
        points = Params(request, ("point",)).points(known)
        return 200, self.service.truth_now(points or list(known))

    async def _history(self, request: web.Request) -> tuple[int, Any]:
        params = Params(request, ("point", "since_tick", "limit"))
        point = params.points(self.service.point_names(), exactly_one=True)[0]
        since = params.integer("since_tick", 0, 0, MAX_TICK)
        limit = params.integer("limit", 10_000, 1, HISTORY_LIMIT)
        return 200, {"point": point, "rows": await self.service.truth_history(point, since, limit)}

    async def _writes(self, request: web.Request) -> tuple[int, Any]:
        params = Params(request, ("point", "since_tick", "limit"))
        points = params.points(self.service.point_names())
        since = params.integer("since_tick", 0, 0, MAX_TICK)
        limit = params.integer("limit", 10_000, 1, HISTORY_LIMIT)
        return 200, {"writes": await self.service.truth_writes(points, since, limit)}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


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
            raw = response.read(MAX_RESPONSE + 1)
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read(MAX_BODY)).get("error", exc.reason)
        except (ValueError, AttributeError):
            detail = exc.reason
        raise ControlError(f"simulator at {address} refused {method} {path}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ControlError(
            f"no simulator answers at {address} ({reason}); is 'fieldtwin sim run' running? "
            "pass --control HOST:PORT (the 'control' field of its endpoints JSON)"
        ) from None
    if len(raw) > MAX_RESPONSE:
        raise ControlError(f"the answer to {method} {path} is larger than {MAX_RESPONSE} bytes")
    try:
        return json.loads(raw or b"{}")
    except ValueError as exc:
        raise ControlError(
            f"simulator at {address} sent no JSON for {method} {path}: {exc}"
        ) from None
