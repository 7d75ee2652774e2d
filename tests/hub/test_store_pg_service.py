"""A hub service on the PostgreSQL store: signed frames in, restarts (clean and
crash-like), history exactly once and the current state equal to the newest sample.

The same property tests/hub/test_exactly_once.py checks at length on DuckDB, in a
smaller, deterministic form: resent frames, a restart after a flush, a crash (store
closed with no flush: the journal carries what came after the last one), resends of
everything after each restart.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.hub_env import GatewaySigner, HubFiles, point, sample, write_hub_config
from support.pg import pg_database
from support.service_rig import Clock, Rig

from fieldtwin.hub.config import load_hub_config
from fieldtwin.hub.errors import StoreError
from fieldtwin.hub.metrics import HubMetrics
from fieldtwin.hub.reader import open_reader
from fieldtwin.hub.service import HubService
from fieldtwin.hub.storage import open_store
from fieldtwin.hub.store_pg import PgTwinStore
from fieldtwin.protocol.config import ConfigError
from fieldtwin.protocol.keys import KeyRegistry


def _use_store(files: HubFiles, store: str) -> None:
    text = files.config.read_text()
    files.config.write_text(text.replace("[hub]\n", f'[hub]\nstore = "{store}"\n', 1))


def _service(files: HubFiles, clock: Clock) -> HubService:
    config = load_hub_config(files.config)
    store = open_store(config)
    assert isinstance(store, PgTwinStore)
    return HubService(config, store, instance="test", metrics=HubMetrics(), clock=clock)


def test_history_is_exactly_once_across_restarts_on_postgresql(tmp_path: Path) -> None:
    files = write_hub_config(tmp_path)
    with pg_database() as url:
        _use_store(files, url)
        clock = Clock()
        gw = GatewaySigner("gw-01", files.gateway_keys["gw-01"])
        rig = Rig(files, clock, _service(files, clock), gw, KeyRegistry.of({}))
        sent: list[tuple[str, bytes]] = []
        expected: dict[tuple[str, int], float] = {}

        def data(count: int) -> None:
            for _ in range(count):
                clock.advance(1000)
                level = float(clock.now_ms % 1000 + len(expected))
                frame = gw.data([sample("tank-1", "level", level, clock.now_ms)])
                expected[("level", clock.now_ms)] = level
                sent.append(frame)
                rig.feed(frame)

        rig.feed(gw.birth([point("tank-1", "level", unit="m")]))
        data(5)
        rig.feed(*sent[1:3])  # resends while running
        rig.service.flush()
        data(3)
        rig.service.close()  # a clean stop: flushes

        rig.service = _service(files, clock)
        rig.feed(*sent)  # the agent resends all it was not sure of
        data(4)
        rig.service.store.close()  # a crash: no flush, the journal holds these frames

        rig.service = _service(files, clock)
        rig.feed(*sent)
        data(2)
        store = rig.service.store
        rows = store.query(
            "SELECT attribute, ts_ms, num, count(*) FROM history "
            "GROUP BY attribute, ts_ms, num ORDER BY ts_ms"
        )
        assert [(a, ts) for a, ts, _, _ in rows] == sorted(expected)
        assert all(n == 1 for *_, n in rows), [r for r in rows if r[3] != 1]
        assert {(a, ts): v for a, ts, v, _ in rows} == expected
        newest = max(expected)
        entity = rig.service.entities(ids=["tank-1"])[0]
        assert entity["attributes"]["level"]["value"] == expected[newest]
        assert rig.service.audit_verify()["ok"]
        assert rig.service.status()["database"] == url
        rig.service.close()


def test_twin_reads_a_postgresql_store_while_no_hub_runs(tmp_path: Path) -> None:
    files = write_hub_config(tmp_path)
    with pg_database() as url:
        _use_store(files, url)
        clock = Clock()
        gw = GatewaySigner("gw-01", files.gateway_keys["gw-01"])
        rig = Rig(files, clock, _service(files, clock), gw, KeyRegistry.of({}))
        rig.feed(gw.birth([point("tank-1", "level", unit="m")]))
        rig.feed(gw.data([sample("tank-1", "level", 3.5, clock.now_ms)]))
        rig.service.close()
        reader = open_reader(load_hub_config(files.config))
        try:
            assert not reader.live
            tank = reader.entities(ids=["tank-1"])[0]
            assert tank["attributes"]["level"]["value"] == 3.5
            assert reader.status()["database"] == url
            assert reader.status()["gateways"][0]["id"] == "gw-01"
            with pytest.raises(StoreError, match="read-only"):
                reader.store.query("DELETE FROM history")  # type: ignore[attr-defined]
        finally:
            reader.close()


@pytest.mark.parametrize(
    ("store", "problem"),
    [
        ("mysql://db/twin", "not a store this hub knows"),
        ("postgresql:///twin", "needs a host and a database name"),
        ("postgresql://127.0.0.1:5432/", "needs a host and a database name"),
        ("postgresql://127.0.0.1:99999/twin", "not a valid URL"),
    ],
)
def test_a_bad_store_url_is_a_config_error(tmp_path: Path, store: str, problem: str) -> None:
    files = write_hub_config(tmp_path)
    _use_store(files, store)
    with pytest.raises(ConfigError, match=problem) as caught:
        load_hub_config(files.config)
    assert "hub.store" in str(caught.value)


def test_a_store_path_is_the_duckdb_file(tmp_path: Path) -> None:
    files = write_hub_config(tmp_path)
    text = files.config.read_text()
    files.config.write_text(text.replace(f'database = "{files.database}"\n', ""))
    _use_store(files, "state/other.duckdb")
    config = load_hub_config(files.config)
    assert config.store_url == ""
    assert config.database == tmp_path / "state" / "other.duckdb"
