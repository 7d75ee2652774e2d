"""The twin store's schema: created, versioned, migrated in place."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from fieldtwin.hub.errors import StoreSchemaError
from fieldtwin.hub.state import GatewayLink
from fieldtwin.hub.store import SCHEMA_VERSION, TwinStore


def test_a_version_1_store_is_migrated_and_keeps_its_gateways(tmp_path: Path) -> None:
    path = tmp_path / "twin.duckdb"
    TwinStore.open(path, threads=1).close()
    # Make it what a version 1 hub left behind: no session column, one gateway row.
    con = duckdb.connect(str(path))
    con.execute("ALTER TABLE gateways DROP COLUMN session")
    con.execute(
        "INSERT INTO gateways VALUES ('gw-01', 7, 12, true, 1, 1, 0, '', 3, 30, '{}', 0, 4)"
    )
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.close()

    store = TwinStore.open(path, threads=1)
    try:
        assert store.meta("schema_version") == str(SCHEMA_VERSION)
        state, _ = store.load_state()
        link = state.gateways["gw-01"]
        assert (link.epoch, link.birth_seq, link.death_birth_seq) == (7, 12, 4)
        assert link.session == 0  # unknown: deaths fall back to the seq-window rule
        with store.transaction() as tx:
            store._write_gateways(tx, [GatewayLink("gw-01", 7, 13, True, session=13)])
        state, _ = store.load_state()
        assert state.gateways["gw-01"].session == 13
    finally:
        store.close()


def test_a_store_from_a_newer_hub_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "twin.duckdb"
    TwinStore.open(path, threads=1).close()
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(StoreSchemaError, match="schema version 99"):
        TwinStore.open(path, threads=1)
