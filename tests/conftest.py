"""Fixtures shared by every test package.

``broker`` is a real Mosquitto on a free loopback port, configured with the project's
ACL (examples/mosquitto/fieldtwin.acl) and a password file; one per test module, so a
test that stops or restarts it cannot disturb another module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.broker import MosquittoBroker


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    instance = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"))
    instance.add_user("hub")
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """An empty folder for a component's durable state (keys, DuckDB files)."""
    path = tmp_path / "state"
    path.mkdir()
    return path
