"""The sync report (``shared/contracts/sync_report.yaml``): every field derived from records.

``sync_report`` takes the twin export (``digital_twin`` shape), the commands of the run
(command rows with their timelines), the hub config and what the caller observed
(``RunFacts``: components, ground truth comparison, audit tail) and builds one report.
Nothing in it is a constant: where a field describes something that did not happen
(no command sent, no rollback), it says so from the records (``executed: false``,
``restore_point`` of the newest checkpoint or ``null`` when there is none).

Field by field (docs/hub.md repeats this for users):

- ``status``: ``failed`` if the pipeline broke; ``rolled_back`` if a command of the run
  was rolled back; ``action_taken`` if a command was sent or a reconciliation action ran;
  ``drift_detected`` if drift is open; else ``synced``.
- ``actions``: every command of the run (proposed, refused, verified, rolled back) and
  every reconciliation action; ``executed`` when at least one command reached a gateway;
  ``safety_gates_passed`` is whether every command sent passed every policy check and
  carried its required distinct approvals (the proposer excluded under the two-person
  rule) — re-checked here from the records, not copied from the hub's verdict.
- ``verification``: PASS when nothing broke, the twin matches the simulator's truth and
  every command sent ended verified or rolled back; FAIL otherwise; SKIPPED when there
  was nothing to check against.
- ``rollback``: ``available`` when a command of the run has a checkpoint to restore;
  ``executed`` when a rollback command was sent; ``restore_point`` and ``command`` from
  that command (or the newest checkpoint, and the CLI line that restores it).
- ``next_sync``: the configured drift interval and the triggers the config defines.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldtwin.hub.config import HubConfig
from fieldtwin.hub.export import snapshot_hash
from fieldtwin.hub.queries import iso

SENT_STATES = (
    "sent",
    "executed",
    "verified",
    "failed",
    "failed_final",
    "rolling_back",
    "rolled_back",
    "rollback_failed",
)


@dataclass
class RunFacts:
    """What the caller observed during the run, for the report."""

    broker_url: str
    embedded_broker: bool
    started_ms: int
    duration_s: float
    dead: list[str]
    silent_gateways: list[str]
    missing_entities: list[str]
    truth_matches: list[str]
    truth_mismatches: list[str]
    truth_file: str | None
    status: dict[str, Any]
    audit: list[dict[str, Any]]
    risk: dict[str, Any] | None = None
    """The hub's ``/api/risk``: the models' probability of a critical crossing."""


def pipeline_problems(facts: RunFacts) -> list[str]:
    problems = [f"component {name} died" for name in facts.dead]
    problems += [f"no data from gateway {gw} reached the twin" for gw in facts.silent_gateways]
    problems += [f"entity {e} never reached the twin" for e in facts.missing_entities]
    problems += [f"twin differs from the truth: {m}" for m in facts.truth_mismatches]
    return problems


def _was_sent(command: Mapping[str, Any]) -> bool:
    return command.get("sent_ms") is not None


def gates_passed(command: Mapping[str, Any]) -> bool:
    """Did this command pass every policy check and carry its approvals when it was sent?"""
    if not all(check.get("ok") for check in command.get("policy", [])):
        return False
    approvers = {a["operator"] for a in command.get("approvals", [])}
    if command.get("rollback_of"):
        return True  # authorised by its parent's approvals (checked on the parent)
    if command.get("two_person"):
        approvers.discard(command.get("proposed_by"))
    return len(approvers) >= int(command.get("approvals_required", 1))


def _describe(command: Mapping[str, Any]) -> str:
    point = f"{command['entity']}.{command['attribute']}"
    checkpoint = command.get("checkpoint")
    approvers = ", ".join(a["operator"] for a in command.get("approvals", [])) or "none"
    start = f"{checkpoint['value']!r} " if checkpoint else ""
    head = f"{command['id']} {point} {start}→ {command['value']!r}"
    return (
        f"{head}: {command['state'].replace('_', ' ')} (proposed by {command['proposed_by']}, "
        f"approved by {approvers})" + (f" — {command['outcome']}" if command.get("outcome") else "")
    )


def _restore_point(command: Mapping[str, Any]) -> str:
    restore = command["checkpoint"]
    return (
        f"{restore['ts']} {command['entity']}.{command['attribute']}={restore['value']!r} "
        f"(twin {restore['twin_hash']})"
    )


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:g}s"
    return f"{seconds / 60:g}m"


def sync_report(
    document: Mapping[str, Any],
    facts: RunFacts,
    commands: Sequence[Mapping[str, Any]],
    config: HubConfig,
    state_dir: Path,
) -> dict[str, Any]:
    """One sync cycle's report in the sync_report shape (see the module docstring)."""
    twin = document["digital_twin"]
    drift = document["current_drift"]
    issues = drift["issues"]
    since = iso(facts.started_ms) or ""
    actions = [a for a in document["reconciliation"]["recent_actions"] if a["timestamp"] >= since]
    run = [c for c in commands if c["proposed_ms"] >= facts.started_ms]
    run.sort(key=lambda c: (c["proposed_ms"], c["id"]))
    sent = [c for c in run if _was_sent(c)]
    rolled_back = [c for c in run if c["state"] == "rolled_back"]
    rollbacks_sent = [c for c in sent if c.get("rollback_of")]
    state = {e["twin_id"]: e["dynamic_state"] for e in twin["entities"]}
    digest = snapshot_hash(state)
    problems = pipeline_problems(facts)
    critical = [i for i in issues if i["severity"] == "critical"]
    warnings = [i for i in issues if i["severity"] == "warning"]
    if problems:
        status = "failed"
    elif rolled_back:
        status = "rolled_back"
    elif sent or actions:
        status = "action_taken"
    elif issues:
        status = "drift_detected"
    else:
        status = "synced"
    if problems or any(i["type"] == "temporal" and i["severity"] == "critical" for i in issues):
        severity = "critical"
    elif critical:
        severity = "high"
    elif warnings:
        severity = "medium"
    else:
        severity = "low"
    entity_count = max(1, len(twin["entities"]))
    unhealthy = [e for e in twin["entities"] if e["health"] != "healthy"]
    current_risk = min(1.0, 0.25 * len(critical) + 0.1 * len(warnings) + 0.5 * len(problems))
    current_risk = round(max(current_risk, len(unhealthy) / entity_count * 0.5), 3)
    # forecasted risk: the learned models' probability that some attribute crosses a
    # critical limit before the next sync (hub/predict.py risk, sync_horizon_s); left
    # out, with the reason, when no model could be fitted yet (a young twin)
    forecast: dict[str, Any] = {}
    horizon_factors: list[str] = []
    risk = facts.risk or {}
    if risk.get("probability") is not None:
        forecast["forecasted_risk"] = round(float(risk["probability"]), 3)
        forecast["forecast_horizon"] = _duration(float(risk["horizon_s"]))
        horizon_factors.append(
            f"forecasted risk over {forecast['forecast_horizon']}: "
            f"{risk.get('horizon_basis') or 'the hub did not say why'}"
        )
        forecast["forecast_factors"] = [
            f"{f['point']}: {f['text']}" for f in risk.get("factors", [])
        ]
        weak = list(risk.get("weak_models") or [])
        forecast["forecast_basis"] = (
            f"{risk['points_considered']} attribute(s) with critical limits forecast by "
            "their learned models"
            + (
                f"; {len(weak)} of them by a model below min_r2 (a young twin: treat with care)"
                if weak
                else ""
            )
        )
    else:
        forecast["forecast_unavailable"] = list(risk.get("unavailable") or []) or [
            "the hub gave no risk forecast"
        ]
    audit_head = facts.status.get("audit_head") or [0, ""]
    anchors_audit = [
        f"audit:seq={a['seq']}:{a['action']}:{a['hash'][:16]}" for a in facts.audit[-10:]
    ]
    # -- verification
    criteria = [f"within tolerance: {m}" for m in facts.truth_matches]
    if not facts.dead:
        criteria.append("every component ran for the whole run")
    if not facts.silent_gateways:
        criteria.append("every gateway delivered data to the twin")
    if not facts.missing_entities:
        criteria.append("every declared entity reached the twin")
    settled_badly: list[str] = []
    for command in sent:
        if command.get("rollback_of"):
            continue
        if command["state"] == "verified":
            criteria.append(f"{command['id']} verified: {command.get('outcome', '')}")
        elif command["state"] == "rolled_back":
            criteria.append(
                f"{command['id']} failed and was rolled back: {command.get('outcome', '')}"
            )
        else:
            state = command["state"].replace("_", " ")
            settled_badly.append(f"{command['id']} {state}: {command.get('outcome', '')}")
    checked = bool(facts.truth_matches or facts.truth_mismatches or sent)
    if not checked:
        verification = "SKIPPED"
    elif problems or settled_badly:
        verification = "FAIL"
    else:
        verification = "PASS"
    # -- rollback
    with_checkpoint = [c for c in run if c.get("checkpoint") and not c.get("rollback_of")]
    if rolled_back:
        subject = rolled_back[-1]
        rollback_command = (
            f"{subject['rollback_id']}: {subject['entity']}.{subject['attribute']} := "
            f"{subject['checkpoint']['value']!r} (rolled back {subject['id']})"
        )
        restore = subject["checkpoint"]
        restore_point = _restore_point(subject)
    elif with_checkpoint:
        subject = with_checkpoint[-1]
        restore = subject["checkpoint"]
        restore_point = _restore_point(subject)
        rollback_command = (
            f"fieldtwin cmd propose {subject['entity']}.{subject['attribute']} "
            f"{restore['value']!r} --reason 'roll back {subject['id']}'"
        )
    else:
        restore_point = None
        rollback_command = None
    database = state_dir / "hub.duckdb"
    refused = [c for c in run if c["state"] == "refused"]
    plan = []
    if run:
        counts: dict[str, int] = {}
        for command in run:
            if command.get("rollback_of"):
                continue
            counts[command["state"]] = counts.get(command["state"], 0) + 1
        plan.append(
            f"{sum(counts.values())} operator command(s): "
            + ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(counts.items()))
        )
    if rollbacks_sent:
        plan.append(f"{len(rollbacks_sent)} rollback(s) to a checkpoint")
    if actions:
        plan.append(f"{len(actions)} reconciliation action(s)")
    drift_config = config.drift
    report: dict[str, Any] = {
        "workflow_id": f"demo-{uuid.uuid4().hex[:12]}",
        "world_id": twin["id"],
        "sync_timestamp": iso(int(time.time() * 1000)),
        "status": status,
        "twin_snapshot": {
            "version": f"{twin['id']}@audit-{audit_head[0]}",
            "state": state,
            "hash": digest,
            "evidence_anchors": [f"duckdb:{database}", f"last_sync:{twin['last_sync']}"],
        },
        "drift_report": {
            "anomalies_detected": len(issues),
            "severity": severity,
            "triggers": [f"{i['type']}: {i['description']}" for i in issues] + problems,
            "evidence_anchors": [
                f"drift:{i['entity_id']}:{i['type']}:{i['detected_at']}" for i in issues
            ],
        },
        "risk_assessment": {
            "current_risk": current_risk,
            **forecast,
            "risk_factors": (
                [f"{e['twin_id']} is {e['health']}" for e in unhealthy]
                + [f"{i['severity']} {i['type']} drift on {i['entity_id']}" for i in issues]
                + problems
                + horizon_factors
            ),
            "evidence_anchors": [f"health:{e['twin_id']}={e['health']}" for e in twin["entities"]],
        },
        "actions": {
            "executed": bool(sent),
            "plan_summary": "; ".join(plan)
            if plan
            else "no command proposed, no reconciliation needed",
            "changes": [_describe(c) for c in run]
            + [
                f"{a['timestamp']} {a['entity_id']}: {a['action']} ({a['result']})" for a in actions
            ],
            "safety_gates_passed": all(gates_passed(c) for c in sent),
            "evidence_anchors": [f"command:{c['id']}:{c['state']}:{c['digest'][:16]}" for c in run]
            + [f"refused:{c['id']}:{c.get('outcome', '')[:80]}" for c in refused]
            + [f"action:{a['timestamp']}:{a['entity_id']}" for a in actions],
        },
        "verification": {
            "result": verification,
            "criteria_met": criteria,
            "evidence_anchors": ([f"ground_truth:{facts.truth_file}"] if facts.truth_file else [])
            + [f"mismatch: {m}" for m in facts.truth_mismatches]
            + [f"unsettled: {m}" for m in settled_badly],
        },
        "audit": {
            "log_path": f"{database}#audit",
            "provenance_chain": [
                f"simulator ground truth: {facts.truth_file or 'not recorded'}",
                *(
                    f"gateway {g['id']}: epoch {g.get('epoch')}, {g.get('frames', 0)} frames, "
                    f"signed Ed25519, verified by the hub"
                    for g in facts.status.get("gateways", [])
                ),
                *(
                    f"command {c['id']}: proposed by {c['proposed_by']}, approved by "
                    f"{', '.join(a['operator'] for a in c.get('approvals', [])) or 'nobody'} "
                    f"(digest {c['digest'][:16]}), {c['state'].replace('_', ' ')}"
                    for c in sent
                ),
                f"broker {facts.broker_url} "
                f"({'embedded amqtt' if facts.embedded_broker else 'external'})",
                f"hub {facts.status.get('instance', '?')}: twin store {database}",
                f"audit chain head seq {audit_head[0]} sha256 {audit_head[1]}",
            ],
            "evidence_anchors": anchors_audit,
        },
        "rollback": {
            "available": bool(with_checkpoint),
            "executed": bool(rollbacks_sent),
            "restore_point": restore_point,
            "command": rollback_command,
        },
        "next_sync": {
            "recommended_interval": _duration(drift_config.interval_s),
            "triggers": [
                f"a gateway silent for {drift_config.gateway_silent_s:g}s or its death",
                f"a sequence gap older than {config.ingest.gap_timeout_s:g}s (rebirth)",
                *(
                    f"{e.id}.{name} crossing its critical limit"
                    for e in config.schema.entities.values()
                    for name, spec in config.schema.types[e.type].attributes.items()
                    if spec.high.critical is not None or spec.low.critical is not None
                ),
                "a command's verification deadline",
                "a hub restart (new instance: agents re-birth)",
            ],
        },
        "confidence": document["confidence"],
        "evidence_anchors": document["evidence_anchors"],
        "assumptions": [
            *document["assumptions"],
            f"the run lasted {facts.duration_s:.0f} s from {iso(facts.started_ms)}",
            "twin values are compared with the simulator's true values at report time, "
            "with tolerance max(0.05, 3 %, 4 sigma of the sensor's noise)",
        ],
    }
    return report
