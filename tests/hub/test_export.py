"""The twin's confidence: fresh, good, and neither implausible nor off the model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.hub_env import GatewaySigner, sample
from support.plausibility import write_plausible_config

from fieldtwin.hub.audit import AuditChain
from fieldtwin.hub.config import HubConfig, load_hub_config
from fieldtwin.hub.export import twin_confidence, twin_document
from fieldtwin.hub.ingest import Inbound, IngestCore
from fieldtwin.hub.metrics import HubMetrics
from fieldtwin.hub.store import TwinStore

T0 = 1_700_000_000_000


@pytest.fixture
def twin(tmp_path: Path) -> Iterator[tuple[TwinStore, HubConfig]]:
    """Every declared point (6) reported good; both entities healthy; no drift."""
    files = write_plausible_config(tmp_path)
    config = load_hub_config(files.config)
    store = TwinStore.open(config.database, memory_limit="256MB", threads=1)
    state, tracker = store.load_state()
    core = IngestCore(config, store, state, tracker, config.registry(), AuditChain(), HubMetrics())
    declared = [
        (e.id, e.twin_id, e.type, e.gateway, e.name, "{}") for e in config.schema.entities.values()
    ]
    store.sync_declared(declared, [("pump-1", "tank-1", "feeds", None)], {}, [])
    gw = GatewaySigner("gw-01", files.gateway_keys["gw-01"])
    samples = [
        sample("tank-1", "level", 4.8, T0),
        sample("tank-1", "high_level", False, T0),
        sample("tank-1", "temp", 20.0, T0),
        sample("pump-1", "speed", 900, T0),
        sample("pump-1", "speed_sp", 900, T0),
        sample("pump-1", "running", True, T0),
    ]
    core.process([Inbound(*gw.data(samples), T0 + 100)])
    store.con.execute("UPDATE entities SET health = 'healthy'")
    yield store, config
    store.close()


def open_finding(store: TwinStore, event_id: int, rule: str, entity: str, attribute: str) -> None:
    store.con.execute(
        "INSERT INTO drift_events VALUES (?, ?, ?, ?, ?, 'warning', 'investigate', 'x', ?, NULL)",
        [event_id, rule, rule.split(".")[0], entity, attribute, T0],
    )


def test_confidence_is_one_when_every_point_is_fresh_good_and_plausible(
    twin: tuple[TwinStore, HubConfig],
) -> None:
    store, config = twin
    assert len(config.schema.declared_points()) == 6
    assert twin_document(store, config, now_ms=T0 + 200)["confidence"] == 1.0


def test_an_implausible_attribute_lowers_confidence(twin: tuple[TwinStore, HubConfig]) -> None:
    store, config = twin
    open_finding(store, 1, "semantic.implausible", "tank-1", "level")
    document = twin_document(store, config, now_ms=T0 + 200)
    assert document["confidence"] == round(5 / 6, 3)
    # a model mismatch counts the same way; other drift (a threshold) does not
    open_finding(store, 2, "semantic.model", "pump-1", "speed")
    open_finding(store, 3, "threshold", "tank-1", "temp")
    assert twin_document(store, config, now_ms=T0 + 200)["confidence"] == round(4 / 6, 3)
    # a cleared finding no longer counts
    store.con.execute("UPDATE drift_events SET cleared_ms = ? WHERE id = 1", [T0 + 150])
    assert twin_document(store, config, now_ms=T0 + 200)["confidence"] == round(5 / 6, 3)
    (checks,) = [a for a in document["assumptions"] if a.startswith("drift checks run")]
    assert "semantic.implausible" in checks
    (meaning,) = [a for a in document["assumptions"] if a.startswith("confidence =")]
    assert "semantic.implausible" in meaning
    assert "semantic.model" in meaning


def test_the_rules_export_names_the_plausibility_trigger(
    twin: tuple[TwinStore, HubConfig],
) -> None:
    store, config = twin
    rules = twin_document(store, config, now_ms=T0 + 200)["sync_configuration"]["rules"]
    triggers = {(r["entity_type"], r["attribute"]): r["on_change_triggers"] or [] for r in rules}
    assert "semantic.implausible" in triggers[("tank", "level")]  # physical range
    assert "semantic.implausible" in triggers[("tank", "high_level")]  # a cross-check's `when`
    assert "semantic.implausible" not in triggers[("tank", "temp")]


def test_confidence_counts_only_declared_good_points_of_live_entities() -> None:
    declared = [("tank-1", "level"), ("tank-1", "temp"), ("pump-1", "speed"), ("pump-1", "x")]

    def entity(physical: str, health: str, **qualities: str) -> dict[str, object]:
        return {
            "physical_id": physical,
            "health": health,
            "attributes": {name: {"quality": q} for name, q in qualities.items()},
        }

    entities = [
        entity("tank-1", "degraded", level="good", temp="uncertain", extra="good"),
        entity("pump-1", "healthy", speed="good"),
    ]
    assert twin_confidence(entities, declared, []) == 0.5
    stale_pump = [entities[0], entity("pump-1", "stale", speed="good")]
    assert twin_confidence(stale_pump, declared, []) == 0.25
    issues = [
        {"rule": "temporal.sensor_stale", "entity": "tank-1", "attribute": "level"},
        {"rule": "semantic.rate", "entity": "pump-1", "attribute": "speed"},
    ]
    assert twin_confidence(entities, declared, issues) == 0.25
    assert twin_confidence(entities, [], []) == 0.0
