"""A fresh PostgreSQL database per test, for the store's PostgreSQL adapter.

Tests run against the PostgreSQL the machine (and CI) runs on 127.0.0.1:5432, or the
server ``FIELDTWIN_TEST_PG`` names (a URL of its maintenance database). Each test gets
its own database, dropped afterwards (``WITH (FORCE)``: a failed test may leave a pool
connected). A test skips, saying why, only when no PostgreSQL answers.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from fieldtwin.hub.storage import TwinStorePort
from fieldtwin.hub.store import TwinStore
from fieldtwin.hub.store_pg import PgTwinStore

ADMIN_URL = os.environ.get("FIELDTWIN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = ("duckdb", "postgresql")


@cache
def pg_unavailable() -> str | None:
    """Why no PostgreSQL can be used for tests, or None when one answers."""
    try:
        psycopg.connect(ADMIN_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0]
    return None


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@contextmanager
def pg_database() -> Iterator[str]:
    """The URL of a new, empty database, dropped on exit."""
    reason = pg_unavailable()
    if reason is not None:
        parts = urlsplit(ADMIN_URL)
        pytest.skip(f"no PostgreSQL on {parts.hostname}:{parts.port or 5432}: {reason}")
    name = f"ft_test_{secrets.token_hex(6)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(ADMIN_URL, name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


Opener = Callable[[], TwinStorePort]


@contextmanager
def store_opener(backend: str, directory: Path) -> Iterator[tuple[Opener, str]]:
    """(open a store, its location): a DuckDB file in ``directory`` or a fresh database;
    every call opens the same store again (a restart)."""
    if backend == "duckdb":
        path = directory / "twin.duckdb"
        yield (lambda: TwinStore.open(path, memory_limit="256MB", threads=1)), str(path)
        return
    with pg_database() as url:
        yield (lambda: PgTwinStore.open(url)), url
