"""Queries and exports over a store filled through ingest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.hub_env import GatewaySigner, point, sample, write_hub_config
from support.pg import BACKENDS, store_opener

from fieldtwin.hub.audit import AuditChain
from fieldtwin.hub.config import HubConfig, load_hub_config
from fieldtwin.hub.errors import QueryError
from fieldtwin.hub.export import snapshot_hash, snapshot_state, twin_document
from fieldtwin.hub.ingest import Inbound, IngestCore
from fieldtwin.hub.metrics import HubMetrics
from fieldtwin.hub.queries import Predicate, as_of, current_entities, diff, history, parse_time
from fieldtwin.hub.storage import TwinStorePort as TwinStore

T0 = 1_700_000_000_000
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=BACKENDS)
def filled(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[TwinStore, HubConfig]]:
    with store_opener(request.param, tmp_path) as (opener, _):
        yield from _filled(opener(), tmp_path)


def _filled(store: TwinStore, tmp_path: Path) -> Iterator[tuple[TwinStore, HubConfig]]:
    files = write_hub_config(tmp_path)
    config = load_hub_config(files.config)
    state, tracker = store.load_state()
    core = IngestCore(config, store, state, tracker, config.registry(), AuditChain(), HubMetrics())
    gw = GatewaySigner("gw-01", files.gateway_keys["gw-01"])
    declared = [
        (e.id, e.twin_id, e.type, e.gateway, e.name, "{}") for e in config.schema.entities.values()
    ]
    store.sync_declared(declared, [("pump-1", "tank-1", "feeds", None)], {}, [])

    def feed(message: tuple[str, bytes]) -> None:
        core.process([Inbound(*message, T0 + 100_000)])

    feed(gw.birth([point("tank-1", "level", unit="m", source="modbus ir 0")], []))
    feed(gw.data([sample("tank-1", "level", 2.0, T0), sample("pump-1", "running", True, T0)]))
    feed(
        gw.data(
            [
                sample("tank-1", "level", 2.5, T0 + 10_000),
                sample("pump-1", "speed", 900, T0 + 10_000),
            ]
        )
    )
    feed(
        gw.data(
            [
                sample("tank-1", "level", 4.8, T0 + 20_000),
                sample("pump-1", "running", False, T0 + 20_000),
            ]
        )
    )
    yield store, config
    store.close()


def test_current_state_filters(filled: tuple[TwinStore, HubConfig]) -> None:
    store, config = filled
    everything = current_entities(store, config)
    assert [e["physical_id"] for e in everything] == ["pump-1", "tank-1"]
    tank = everything[1]
    assert tank["twin_id"] == "test-plant/tank-1"
    assert tank["static_attributes"] == {}
    assert tank["attributes"]["level"]["value"] == 4.8
    assert tank["attributes"]["level"]["source"] == "modbus ir 0"
    assert [e["physical_id"] for e in current_entities(store, config, types=["pump"])] == ["pump-1"]
    high = current_entities(store, config, where=[Predicate.parse("level>4.5")])
    assert [e["physical_id"] for e in high] == ["tank-1"]
    stopped = current_entities(store, config, where=[Predicate.parse("running=false")])
    assert [e["physical_id"] for e in stopped] == ["pump-1"]
    assert current_entities(store, config, where=[Predicate.parse("level<1")]) == []
    assert current_entities(store, config, health=["healthy"]) == []  # never checked yet
    with pytest.raises(QueryError):
        current_entities(store, config, entities=["nope"])
    with pytest.raises(QueryError):
        Predicate.parse("level >> 3")


def test_history_as_of_and_diff(filled: tuple[TwinStore, HubConfig]) -> None:
    store, _ = filled
    window = history(store, "tank-1", "level", T0, T0 + 15_000)
    assert [h["value"] for h in window] == [2.0, 2.5]
    assert window[0]["ts"] == "2023-11-14T22:13:20.000Z"
    assert window[0]["frame"].startswith("gw-01/")
    assert history(store, "tank-1", "level", T0, T0 + 30_000, limit=1)[0]["value"] == 4.8
    past = as_of(store, T0 + 15_000)
    assert past["tank-1"]["level"]["value"] == 2.5
    assert past["pump-1"]["running"]["value"] is True
    assert as_of(store, T0 - 1) == {}
    changes = {(c["entity"], c["attribute"]): c for c in diff(store, T0 + 5000, T0 + 25_000)}
    assert changes[("tank-1", "level")]["before"] == 2.0
    assert changes[("tank-1", "level")]["after"] == 4.8
    assert changes[("pump-1", "speed")]["change"] == "added"
    assert changes[("pump-1", "running")]["after"] is False
    with pytest.raises(QueryError):
        history(store, "tank-1", "level", 10, 5)
    # an empty window of a known point is an empty answer; a typo is an error
    assert history(store, "tank-1", "level", T0 - 10_000, T0 - 5000) == []
    with pytest.raises(QueryError, match="no entity 'tank-9' in the twin; did you mean tank-1"):
        history(store, "tank-9", "level", T0, T0 + 15_000)
    with pytest.raises(QueryError, match="no reported attribute 'levle'; did you mean level"):
        history(store, "tank-1", "levle", T0, T0 + 15_000)


def test_time_parsing() -> None:
    now = T0
    assert parse_time("now", now) == now
    assert parse_time("5m", now) == now - 300_000
    assert parse_time("-2h", now) == now - 7_200_000
    assert parse_time("30s ago", now) == now - 30_000
    assert parse_time("1700000000000", now) == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20Z", now) == T0
    assert parse_time("2023-11-14T23:13:20+01:00", now) == T0
    with pytest.raises(QueryError):
        parse_time("yesterday-ish", now)


def _shape(contract: Any, value: Any, path: str = "") -> None:
    """Every field the contract names is present (lists: checked on their first item)."""
    if isinstance(contract, dict):
        assert isinstance(value, dict), path
        for key, sub in contract.items():
            if key == "attribute_name":  # a placeholder for "one key per attribute"
                continue
            assert key in value, f"{path}.{key} missing"
            _shape(sub, value[key], f"{path}.{key}")
    elif isinstance(contract, list) and value:
        _shape(contract[0], value[0], path + "[0]")


DIGITAL_TWIN_CONTRACT = yaml.safe_load(
    """
digital_twin:
  id: s
  domain: s
  created: s
  last_sync: s
  fidelity: s
  schema_ref: s
  entities:
    - {physical_id: s, twin_id: s, type: s, static_attributes: o, dynamic_state: o,
       last_updated: s, source_attribution: {attribute_name: s}, health: s}
  relationships:
    - {source_twin_id: s, target_twin_id: s, type: s, attributes: o}
sync_configuration:
  data_sources:
    - {id: s, type: s, endpoint: s, frequency: s, latency: s, reliability: n,
       last_success: s, last_failure: s}
  rules:
    - {entity_type: s, attribute: s, source: s, frequency: s, on_change_triggers: a}
drift_detection:
  thresholds:
    - {attribute: s, warning: n, critical: n}
  staleness_limit: s
  structural_checks: a
current_drift:
  entities_stale: i
  entities_drifted: i
  last_check: s
  issues:
    - {entity_id: s, type: s, description: s, severity: s, detected_at: s}
reconciliation:
  strategy: s
  recent_actions:
    - {timestamp: s, entity_id: s, action: s, result: s}
operations:
  query_enabled: b
  simulation_enabled: b
  prediction_enabled: b
  last_query: s
confidence: n
evidence_anchors: a
assumptions: a
"""
)


def test_export_has_every_contract_field(filled: tuple[TwinStore, HubConfig]) -> None:
    store, config = filled
    # open drift handled mostly by "investigate", while the configured default is "alert"
    assert config.reconciliation.default == "alert"
    store.query(
        "INSERT INTO drift_events VALUES "
        "(1, 'threshold', 'threshold', 'tank-1', 'level', 'critical', 'alert', 'level high', "
        "?, NULL), "
        "(2, 'semantic.rate', 'semantic', 'tank-1', 'level', 'warning', 'investigate', "
        "'level rises too fast', ?, NULL), "
        "(3, 'semantic.frozen', 'semantic', 'tank-1', 'level', 'warning', 'investigate', "
        "'level frozen', ?, NULL)",
        [T0, T0, T0],
    )
    store.query(
        "INSERT INTO actions VALUES (?, 'tank-1', 'rebirth requested', 'success', '')", [T0]
    )
    # gw-02 announced one point without naming a device: software, not a device reader
    store.query(
        "INSERT INTO points VALUES ('tank-1', 'temp', 'gw-02', 'float64', 'degC', false, "
        "NULL, NULL, 1000, '', ?)",
        [T0],
    )
    document = twin_document(store, config, last_query_ms=T0)
    _shape(DIGITAL_TWIN_CONTRACT, document)
    twin = document["digital_twin"]
    assert twin["id"] == "test-plant"
    assert twin["relationships"] == [
        {
            "source_twin_id": "test-plant/pump-1",
            "target_twin_id": "test-plant/tank-1",
            "type": "feeds",
            "attributes": {},
        }
    ]
    tank = next(e for e in twin["entities"] if e["physical_id"] == "tank-1")
    level = tank["dynamic_state"]["level"]
    assert (level["value"], level["unit"], level["quality"]) == (4.8, "m", "good")
    assert level["updated"].endswith("Z")
    assert tank["source_attribution"] == {"level": "modbus ir 0"}
    assert document["current_drift"]["issues"][0]["entity_id"] == "test-plant/tank-1"
    assert document["current_drift"]["entities_drifted"] == 1
    sources = {s["id"]: s for s in document["sync_configuration"]["data_sources"]}
    assert sources["gw-01"]["reliability"] == 1.0
    # the type comes from what each gateway announced
    assert sources["gw-01"]["type"] == "sensor"  # its point names the device it reads
    assert sources["gw-02"]["type"] == "api"
    assert document["reconciliation"]["recent_actions"][0]["result"] == "success"
    # the strategy acting on the open drift (two of three issues), not the default
    assert document["reconciliation"]["strategy"] == "investigate"
    operators = document["sync_configuration"]["data_sources"][-1]
    assert (operators["id"], operators["type"]) == ("operators", "manual")
    # read from the database, no hub answering: no query endpoint
    assert document["operations"]["query_enabled"] is False
    assert document["operations"]["query_endpoints"] == []
    yaml.safe_load(yaml.safe_dump(document))  # plain data, YAML-safe


def test_a_gateway_that_never_announced_its_points_has_no_source_type(
    filled: tuple[TwinStore, HubConfig],
) -> None:
    store, config = filled
    document = twin_document(store, config)
    sources = {s["id"]: s for s in document["sync_configuration"]["data_sources"]}
    assert "gw-02" in config.gateways
    assert "type" not in sources["gw-02"]  # configured, never born: nothing to derive it from
    assert sources["gw-01"]["type"] == "sensor"


def test_snapshot_hash_is_canonical() -> None:
    a = [
        {"twin_id": "b", "attributes": {"x": {"value": 1}, "y": {"value": 2.5}}},
        {"twin_id": "a", "attributes": {}},
    ]
    b = [
        {"twin_id": "a", "attributes": {}},
        {"twin_id": "b", "attributes": {"y": {"value": 2.5}, "x": {"value": 1}}},
    ]
    assert snapshot_hash(snapshot_state(a)) == snapshot_hash(snapshot_state(b))
    b[1]["attributes"]["x"]["value"] = 2  # type: ignore[index]
    assert snapshot_hash(snapshot_state(a)) != snapshot_hash(snapshot_state(b))
