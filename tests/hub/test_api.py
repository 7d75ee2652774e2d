"""The loopback HTTP API (aiohttp) over a real hub service: read-only, strict parameters."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from support.hub_env import write_hub_config

from fieldtwin.hub.api import ApiServer
from fieldtwin.hub.config import load_hub_config
from fieldtwin.hub.metrics import HubMetrics
from fieldtwin.hub.service import HubService
from fieldtwin.hub.store import TwinStore


@pytest_asyncio.fixture
async def api(tmp_path: Path) -> AsyncIterator[str]:
    files = write_hub_config(tmp_path)
    config = load_hub_config(files.config)
    executor = ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()

    def open_service() -> HubService:
        store = TwinStore.open(config.database, memory_limit="256MB", threads=1)
        return HubService(config, store, instance="api-test", metrics=HubMetrics())

    service = await loop.run_in_executor(executor, open_service)

    async def call(fn: Any, *args: Any) -> Any:
        return await loop.run_in_executor(executor, partial(fn, *args))

    server = ApiServer(service, call, 0)
    port = await server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.close()
        await loop.run_in_executor(executor, service.close)
        executor.shutdown()


def fetch(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
            return response.status, json.loads(body) if body.startswith(
                (b"{", b"[")
            ) else body.decode()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def get(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, Any]:
    return await asyncio.to_thread(fetch, url, method, data)


async def test_read_routes_answer_json_and_metrics(api: str) -> None:
    status, body = await get(f"{api}/api/status")
    assert status == 200
    assert body["instance"] == "api-test"
    assert (await get(f"{api}/api/commands"))[0] == 200
    status, verified = await get(f"{api}/api/audit/verify")
    assert (status, verified["ok"]) == (200, True)
    status, text = await get(f"{api}/metrics")
    assert status == 200
    assert "fieldtwin_hub_operator_refused_total" in text


@pytest.mark.parametrize(
    ("path", "code", "words"),
    [
        (
            "/api/history?entity=tank-1&attribute=level&limit=abc",
            400,
            "limit='abc' is not a whole number",
        ),
        ("/api/history?entity=tank-1&attribute=level&limit=0", 400, "out of range"),
        ("/api/history?entity=tank-1", 400, "history needs entity= and attribute="),
        ("/api/history?entity=tank-1&attribute=level&from=yesterday", 400, "cannot read time"),
        ("/api/audit?limit=-5", 400, "out of range"),
        ("/api/twin?where=level>>2", 400, "cannot read predicate"),
        ("/api/commands?state=bogus", 400, "not a command state"),
        ("/api/commands/C-999999", 400, "no command C-999999"),
        ("/api/nowhere", 404, "Not Found"),
    ],
)
async def test_bad_requests_get_a_clear_4xx(api: str, path: str, code: int, words: str) -> None:
    status, body = await get(f"{api}{path}")
    assert status == code
    assert words in body["error"]


async def test_nothing_mutates_over_http(api: str) -> None:
    # the old unauthenticated alarm routes are gone; the read routes take no POST
    status, _ = await get(f"{api}/api/alarms/A-000001/ack", method="POST", data=b"")
    assert status == 404
    for path in ("/api/commands", "/api/status", "/api/alarms"):
        status, body = await get(f"{api}{path}", method="POST", data=b"")
        assert status == 405, path
        assert "error" in body
    status, _ = await get(f"{api}/api/status", method="GET", data=None)
    assert status == 200
    big = b"x" * (64 * 1024)
    status, _ = await get(f"{api}/api/status", method="POST", data=big)
    assert status in (405, 413)
