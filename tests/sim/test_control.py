"""The control interface refuses every bad request with a clear answer and loses nothing.

Raw HTTP over a socket, so the tests see exactly what a client would: status line,
JSON error, closed connection. The shared water-plant simulator serves them; after the
barrage it still answers, nothing was injected, and its log holds no traceback.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from support.sim import SimulatorProcess

HOST = b"Host: 127.0.0.1\r\n"


def _http(address: str, raw: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``raw``, read until the server closes; returns (status, body)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may refuse before the whole body is sent
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _get(path: str) -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\n" + HOST + b"\r\n"


def _post(path: str, body: bytes, method: bytes = b"POST") -> bytes:
    head = method + b" " + path.encode() + b" HTTP/1.1\r\n" + HOST
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def _fault(body: dict[str, object]) -> bytes:
    return _post("/faults", json.dumps(body).encode())


CASES = [
    # routes and methods
    (_get("/nowhere"), 404, "no route /nowhere (routes: GET /status"),
    (_post("/faults", b"", b"PUT"), 405, "PUT is not allowed on /faults (allowed: GET, POST)"),
    (_get("/faults/clear"), 405, "GET is not allowed on /faults/clear"),
    # bodies
    (_post("/faults", b"{oops"), 400, "body is not JSON"),
    (_post("/faults", b"[]"), 400, "expected a JSON object"),
    (_post("/faults", b'{"kind": "drift", "point": "pt-1.pressure", "params": {"rate": NaN}}'),
     400, "NaN is not a JSON number"),
    (_fault({"kind": "stuck", "point": "tank-1.level", "colour": "red"}), 400,
     "unknown field 'colour' (fields: component, device, duration, kind, params, point, unit_id)"),
    (_fault({"kind": "melt", "point": "tank-1.level"}), 400, "unknown fault kind 'melt'"),
    (_fault({"kind": "leek", "component": "tank-1"}), 400, "did you mean 'leak'"),
    (_fault({"kind": "stuck", "point": "tank-1.lvl"}), 400,
     "unknown point 'tank-1.lvl'; did you mean 'tank-1.level'"),
    (_fault({"kind": "stuck", "point": 7}), 400, "point: expected a string"),
    (_fault({"kind": "dropout", "device": "field-bus", "unit_id": "2"}), 400,
     "unit_id: expected an integer"),
    (_fault({"kind": "dropout", "device": "field-bus", "duration": -1}), 400,
     "duration: expected a positive number"),
    (_fault({"kind": "drift", "point": "pt-1.pressure", "params": {"rate": "fast"}}), 400,
     "rate: expected a number"),
    (_fault({"kind": "leak", "component": "tank-1", "params": {"cv": -1}}), 400,
     "cv: -1.0 is out of range"),
    (_fault({"kind": "fouling", "component": "tank-1"}), 400,
     "tank-1 is a tank; fouling happens to a boiler (boilers: boiler-1)"),
    (_fault({"kind": "ignore_writes", "point": "tank-1.level"}), 400,
     "tank-1.level is read-only; ignore_writes needs a writable point"),
    (_fault({"kind": "wrong_value", "point": "valve-1.position"}), 400,
     "wrong_value needs exactly one of offset"),
    (_post("/faults/clear", b'{"all": true}'), 400, "takes no fields"),
    # query parameters and path segments
    (_get("/truth?point=nope"), 400, "unknown point 'nope'"),
    (_get("/status?verbose=1"), 400, "unknown parameter 'verbose' (parameters: none)"),
    (_get("/truth/history?point=tank-1.level&limit=abc"), 400,
     "limit: expected an integer, got 'abc'"),
    (_get("/truth/history?point=tank-1.level&limit=" + "9" * 3000), 400,
     "limit: 9999999999999999999999999999999999999... is outside 1..100000"),
    (_get("/truth/history?point=tank-1.level&limit=1e3"), 400,
     "limit: expected an integer, got '1e3'"),
    (_get("/truth/history?point=tank-1.level&since_tick=-1"), 400, "since_tick: -1 is outside"),
    (_get("/truth/history?point=tank-1.level&limit=0"), 400, "limit: 0 is outside 1..100000"),
    (_get("/truth/history?point=tank-1.level&limit=5&limit=6"), 400, "limit: give it once"),
    (_get("/truth/history"), 400, "name exactly one point"),
    (_get("/truth/writes?pont=valve-1.position"), 400,
     "unknown parameter 'pont'; did you mean 'point'?"),
    (_get("/truth/writes?point=valve-1.postion"), 400, "did you mean 'valve-1.position'"),
    (b"DELETE /faults/abc HTTP/1.1\r\n" + HOST + b"\r\n", 400,
     "fault id: expected an integer, got 'abc'"),
    (b"DELETE /faults/99999 HTTP/1.1\r\n" + HOST + b"\r\n", 404, "no fault with id 99999"),
    # sizes
    (b"POST /faults HTTP/1.1\r\n" + HOST + b"Content-Length: 99999999\r\n\r\n", 413,
     "body larger than 65536 bytes"),
    (_post("/faults", b" " * 70_000), 413, "body larger than 65536 bytes"),
    (b"POST /faults HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
     + b"8000\r\n" + b" " * 0x8000 + b"\r\n" + b"8000\r\n" + b" " * 0x8000 + b"\r\n"
     + b"8000\r\n" + b" " * 0x8000 + b"\r\n0\r\n\r\n", 413, "body larger than 65536 bytes"),
]  # fmt: skip


def test_every_bad_request_gets_a_json_error(plant: SimulatorProcess) -> None:
    address = plant.endpoints["control"]
    before = plant.control("GET", "/faults")["faults"]
    refused = plant.status()["counters"].get("control_refused", 0)
    for raw, status, text in CASES:
        code, body = _http(address, raw)
        assert code == status, (raw[:80], body)
        error = json.loads(body)["error"]
        assert text in error, (raw[:80], error)
    assert plant.control("GET", "/faults")["faults"] == before  # nothing was injected
    assert plant.status()["counters"]["control_refused"] == refused + len(CASES)
    assert "Traceback" not in plant.log
    assert "level=error" not in plant.log


def test_requests_that_are_not_http_are_refused_and_not_logged_each(
    plant: SimulatorProcess,
) -> None:
    address = plant.endpoints["control"]
    garbage = [
        b"hello\r\n\r\n",
        b"GET /status HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET /status?" + b"a" * 5000 + b" HTTP/1.1\r\n" + HOST + b"\r\n",
        b"GET /status HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 5000 + b"\r\n\r\n",
        b"GET /status HTTP/1.1\r\n" + HOST + b"".join(b"X-%d: 1\r\n" % i for i in range(40))
        + b"\r\n",
    ]  # fmt: skip
    lines_before = plant.log.count("bad HTTP request on the control interface")
    for raw in garbage * 3:
        code, _ = _http(address, raw)
        assert code == 400, raw[:80]
    # at most one warning per 10 s, no traceback; every refusal is counted
    assert plant.log.count("bad HTTP request on the control interface") <= lines_before + 2
    assert "Traceback" not in plant.log
    assert plant.status()["tick"] > 0  # still answering


def test_a_body_that_never_comes_is_answered_within_the_timeout(
    plant: SimulatorProcess,
) -> None:
    host, port = plant.endpoints["control"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /faults HTTP/1.1\r\n" + HOST + b"Content-Length: 100\r\n\r\n{")
        started = time.monotonic()
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert time.monotonic() - started < 25
    head, _, body = data.partition(b"\r\n\r\n")
    assert int(head.split()[1]) == 408
    assert "not received within 10 s" in json.loads(body)["error"]


def test_good_requests_still_work(plant: SimulatorProcess) -> None:
    address = plant.endpoints["control"]
    code, body = _http(address, _get("/truth?point=tank-1.level&point=pump-1.speed"))
    assert code == 200
    assert sorted(json.loads(body)["points"]) == ["pump-1.speed", "tank-1.level"]
    code, body = _http(address, _get("/truth/history?point=tank-1.level&limit=3"))
    assert code == 200
    assert len(json.loads(body)["rows"]) == 3
    code, body = _http(address, _fault({"kind": "leak", "component": "tank-1", "duration": 1}))
    assert code == 201
    fault = json.loads(body)
    assert (fault["kind"], fault["component"], fault["params"]) == ("leak", "tank-1", {"cv": 2.0})
    code, body = _http(address, b"DELETE /faults/%d HTTP/1.1\r\n" % fault["id"] + HOST + b"\r\n")
    assert code == 200
    assert json.loads(body)["id"] == fault["id"]


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PATCH"])
def test_other_methods_are_not_allowed(plant: SimulatorProcess, method: str) -> None:
    code, _ = _http(
        plant.endpoints["control"], method.encode() + b" /status HTTP/1.1\r\n" + HOST + b"\r\n"
    )
    assert code == 405
