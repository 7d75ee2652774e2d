"""Exports in the shapes users know: ``digital_twin`` and the sync report.

``twin_document`` builds the whole ``digital_twin`` contract (see
``shared/contracts/digital_twin.yaml``) from the store and the config; ``sync_report``
builds one sync cycle's report (``sync_report.yaml``) from a twin document plus what
the caller verified. ``snapshot_hash`` is SHA-256 over the canonical JSON of the
entities' dynamic state (sorted keys, no whitespace), so two hubs holding the same
state produce the same hash.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fieldtwin.hub.audit import canonical_json
from fieldtwin.hub.config import DRIFT_RULES, HubConfig, describe_config_value
from fieldtwin.hub.queries import current_entities, iso, open_drift
from fieldtwin.hub.storage import TwinStorePort
from fieldtwin.protocol.tracker import DeliveryTracker


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "on_change"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:g}s"
    if seconds < 3600:
        return f"{seconds / 60:g}m"
    return f"{seconds / 3600:g}h"


def config_digest(config: HubConfig) -> str:
    try:
        data = config.file.read_bytes()
    except OSError:
        data = b""
    return hashlib.sha256(data).hexdigest()


def snapshot_state(entities: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Canonical world state: twin id → attribute → value."""
    return {
        entity["twin_id"]: {
            name: attr["value"] for name, attr in sorted(entity["attributes"].items())
        }
        for entity in sorted(entities, key=lambda e: e["twin_id"])
    }


def snapshot_hash(state: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(state).encode()).hexdigest()


def gateway_source_type(points: int, with_source: int) -> str | None:
    """What kind of data source a gateway is, from the points its birth announced:
    ``sensor`` when at least one names the device it is read from (every agent driver,
    Modbus, OPC-UA or serial, reads a device and says which); ``api`` when it announced
    points but none names a device (software publishing values through the protocol);
    ``None`` (the field is left out) before its first birth: nothing to derive it from."""
    if points == 0:
        return None
    return "sensor" if with_source else "api"


def _data_sources(
    store: TwinStorePort, config: HubConfig, tracker: DeliveryTracker
) -> list[dict[str, Any]]:
    links = {row[0]: row for row in store.gateway_rows()}
    intervals = store.point_intervals()
    announced = store.point_sources()
    latencies = store.frame_latencies(200)
    failures = store.failure_times()
    broker = config.broker
    sources: list[dict[str, Any]] = []
    for gateway_id in sorted(set(config.gateways) | set(links)):
        link = links.get(gateway_id)
        ranges = tracker.ranges(gateway_id)
        highest = ranges[-1][1] if ranges else 0
        delivered = sum(last - first + 1 for first, last in ranges)
        reliability = round(delivered / highest, 4) if highest else 0.0
        lat = latencies.get(gateway_id) or []
        death_ms = link[4] if link else 0
        failure = max(failures.get(gateway_id, 0) or 0, death_ms or 0)
        source_type = gateway_source_type(*announced.get(gateway_id, (0, 0)))
        sources.append(
            {
                "id": gateway_id,
                # people acting through the operator channel are the "manual" source below
                **({"type": source_type} if source_type is not None else {}),
                "endpoint": f"{broker.url}/ft/v1/{gateway_id}/up/+",
                "frequency": _duration(intervals[gateway_id] / 1000)
                if gateway_id in intervals
                else "on_change",
                "latency": f"{statistics.median(lat):.0f}ms" if lat else "unknown",
                "reliability": reliability,
                "last_success": iso(link[3]) if link and link[3] else None,
                "last_failure": iso(failure) if failure else None,
            }
        )
    if config.operators:
        sources.append(_operator_source(store, config))
    return sources


def _operator_source(store: TwinStorePort, config: HubConfig) -> dict[str, Any]:
    """The operator channel: people acting on the twin (manual input)."""
    accepted, refused = store.operator_activity()
    total = int(accepted[0] or 0) + int(refused[0] or 0)
    return {
        "id": "operators",
        "type": "manual",
        "endpoint": f"{config.broker.url}/ft/v1/op/+/req",
        "frequency": "on_change",
        "latency": "unknown",
        "reliability": round(int(accepted[0] or 0) / total, 4) if total else 0.0,
        "last_success": iso(accepted[1]) if accepted[1] else None,
        "last_failure": iso(refused[1]) if refused[1] else None,
    }


def _strategy(config: HubConfig, issues: Sequence[Mapping[str, Any]]) -> str:
    """The strategy acting on the current drift: the one most open issues are handled by
    (the more active one on a tie); the configured default when nothing is open."""
    counts: dict[str, int] = {}
    for issue in issues:
        counts[issue["strategy"]] = counts.get(issue["strategy"], 0) + 1
    if not counts:
        return config.reconciliation.default
    order = ("auto_correct", "investigate", "alert", "ignore")
    return max(counts, key=lambda s: (counts[s], -order.index(s) if s in order else -9))


def _rules(config: HubConfig) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    schema = config.schema
    cross_checked = {
        (schema.type_of(check.when.entity), check.when.attribute) for check in schema.plausibility
    }
    for type_name, entity_type in sorted(schema.types.items()):
        gateways = sorted(
            {e.gateway or "any gateway" for e in schema.entities.values() if e.type == type_name}
        )
        for name, spec in sorted(entity_type.attributes.items()):
            triggers = []
            if spec.has_thresholds:
                triggers.append("threshold")
            if spec.max_rate is not None:
                triggers.append("semantic.rate")
            if spec.frozen_after_s is not None:
                triggers.append("semantic.frozen")
            if (
                spec.physical_min is not None
                or spec.physical_max is not None
                or (type_name, name) in cross_checked
            ):
                triggers.append("semantic.implausible")
            rules.append(
                {
                    "entity_type": type_name,
                    "attribute": name,
                    "source": ", ".join(gateways),
                    "frequency": _duration(spec.interval_s),
                    "on_change_triggers": triggers or None,
                }
            )
    return rules


def _drift_detection(config: HubConfig) -> dict[str, Any]:
    thresholds: list[dict[str, Any]] = []
    for type_name, entity_type in sorted(config.schema.types.items()):
        for name, spec in sorted(entity_type.attributes.items()):
            for side, limits in (("high", spec.high), ("low", spec.low)):
                if limits.empty:
                    continue
                unit = f" {spec.unit}" if spec.unit else ""
                thresholds.append(
                    {
                        "attribute": f"{type_name}.{name} ({side})",
                        "warning": (
                            f"{describe_config_value(limits.warning)}{unit}"
                            if limits.warning is not None
                            else "none"
                        ),
                        "critical": (
                            f"{describe_config_value(limits.critical)}{unit}"
                            if limits.critical is not None
                            else "none"
                        ),
                    }
                )
    drift = config.drift
    checks = [
        "every declared entity and attribute is reported (structural.missing)",
        "every reported entity and attribute is declared (structural.undeclared)",
        "each declared entity is reported by its declared gateway (structural.wrong_gateway)",
    ]
    for rule in config.schema.structural:
        bound = f"{rule.min}..{rule.max}" if rule.max is not None else f">= {rule.min}"
        checks.append(
            f"{rule.id}: each {rule.entity_type} has {bound} '{rule.relationship}' "
            f"{'to' if rule.direction == 'out' else 'from'} a {rule.target_type}"
            + (f" ({rule.description})" if rule.description else "")
        )
    return {
        "thresholds": thresholds,
        "staleness_limit": (
            f"{drift.stale_factor:g} x the attribute's expected update interval "
            f"(default interval {drift.default_interval_s:g}s); gateway silent after "
            f"{drift.gateway_silent_s:g}s without frames or heartbeats"
        ),
        "structural_checks": checks,
    }


UNTRUSTED_RULES = ("temporal.sensor_stale", "semantic.implausible", "semantic.model")
"""Open findings that make the attribute they name untrustworthy for ``confidence``: a
stale reading, a reading the physics forbids, a behaviour the model does not explain."""


def twin_confidence(
    entities: Sequence[Mapping[str, Any]],
    declared_points: Sequence[tuple[str, str]],
    issues: Sequence[Mapping[str, Any]],
) -> float:
    """Share of declared attributes the twin can vouch for: reported with good quality by
    an entity that is not stale, and not named by an open ``UNTRUSTED_RULES`` finding.

    Freshness alone kept a twin at 1.0 while its level read 7.9 m in a 5 m tank."""
    if not declared_points:
        return 0.0
    declared = set(declared_points)
    untrusted = {(i["entity"], i["attribute"]) for i in issues if i["rule"] in UNTRUSTED_RULES}
    trusted = sum(
        1
        for e in entities
        if e["health"] in ("healthy", "degraded")
        for name, attr in e["attributes"].items()
        if attr["quality"] == "good"
        and (e["physical_id"], name) in declared
        and (e["physical_id"], name) not in untrusted
    )
    return round(trusted / len(declared), 3)


def twin_document(
    store: TwinStorePort,
    config: HubConfig,
    *,
    last_query_ms: int | None = None,
    now_ms: int | None = None,
    query_endpoints: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``digital_twin`` export (every field of the contract, with live values).

    ``query_endpoints``: where a running hub answers queries (its HTTP API, the operator
    channel); none when the document is read from the database with no hub running."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    entities = current_entities(store, config)
    _, tracker = store.load_state()  # snapshot plus journal: delivered ranges as of now
    twin_ids = store.twin_ids()
    created = int(store.meta("created_ms") or 0)
    last_sync = max((e["last_updated_ms"] or 0 for e in entities), default=0)
    last_check = store.last_check_ms()
    issues = open_drift(store)
    drifted = {i["entity"] for i in issues if i["type"] != "temporal"}
    stale = [e for e in entities if e["health"] == "stale"]
    recent = store.recent_actions(20)
    confidence = twin_confidence(entities, config.schema.declared_points(), issues)
    head = store.audit_head()
    return {
        "digital_twin": {
            "id": config.twin_id,
            "domain": config.domain,
            "created": iso(created),
            "last_sync": iso(last_sync),
            "fidelity": config.fidelity,
            "schema_ref": f"{config.file.resolve()}#sha256={config_digest(config)[:16]}",
            "entities": [
                {
                    "physical_id": e["physical_id"],
                    "twin_id": e["twin_id"],
                    "type": e["type"],
                    "static_attributes": e["static_attributes"],
                    "dynamic_state": {
                        name: {
                            "value": a["value"],
                            "unit": a.get("unit", ""),
                            "quality": a["quality"],
                            "updated": a["ts"],
                        }
                        for name, a in e["attributes"].items()
                    },
                    "last_updated": e["last_updated"],
                    "source_attribution": {
                        name: a["source"] for name, a in e["attributes"].items()
                    },
                    "health": e["health"],
                }
                for e in entities
            ],
            "relationships": [
                {
                    "source_twin_id": twin_ids.get(source, source),
                    "target_twin_id": twin_ids.get(target, target),
                    "type": rel_type,
                    "attributes": _json_or_none(attributes) or {},
                }
                for source, target, rel_type, attributes in store.relationship_rows()
            ],
        },
        "sync_configuration": {
            "data_sources": _data_sources(store, config, tracker),
            "rules": _rules(config),
        },
        "drift_detection": _drift_detection(config),
        "current_drift": {
            "entities_stale": len(stale),
            "entities_drifted": len(drifted),
            "last_check": iso(last_check),
            "issues": [
                {
                    "entity_id": twin_ids.get(i["entity"], i["entity"]),
                    "type": i["type"],
                    "description": i["description"],
                    "severity": i["severity"],
                    "detected_at": i["detected_at"],
                }
                for i in issues
            ],
        },
        "reconciliation": {
            "strategy": _strategy(config, issues),
            "recent_actions": [
                {
                    "timestamp": iso(ts_ms),
                    "entity_id": twin_ids.get(entity, entity),
                    "action": action,
                    "result": result,
                }
                for ts_ms, entity, action, result in recent
            ],
        },
        "operations": {
            "query_enabled": bool(query_endpoints),
            "query_endpoints": list(query_endpoints),
            # what-if needs declared influences; forecasts also run on trend models
            "simulation_enabled": config.prediction.enabled and bool(config.prediction.influences),
            "prediction_enabled": config.prediction.enabled,
            "models_fitted": store.model_count(),
            "last_query": iso(last_query_ms),
        },
        "confidence": confidence,
        "evidence_anchors": [
            store.evidence_anchor(),
            f"audit:seq={head[0]}:sha256={head[1]}",
            f"config:{config.file.resolve()}#sha256={config_digest(config)}",
        ],
        "assumptions": [
            "gateway clocks are synchronised with the hub (freshness uses source timestamps)",
            "last-writer-wins by source timestamp decides current state",
            f"drift checks run every {config.drift.interval_s:g}s: " + ", ".join(DRIFT_RULES),
            "confidence = share of declared attributes reported fresh with good quality "
            "and not under an open " + ", ".join(UNTRUSTED_RULES) + f" finding "
            f"(physically implausible or inconsistent with the model; as of {iso(now_ms)})",
        ],
    }


def _json_or_none(text: str | None) -> Any:
    if not text:
        return None
    return json.loads(text)
