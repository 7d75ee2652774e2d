"""The hub service in process: operator requests, the command lifecycle, audit.

A real DuckDB store, frames signed by the protocol package (gateways and operators),
a controllable clock; no broker: the service's answers and downlink frames are the
``Effects`` it returns, decoded and verified here as an operator or agent would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.hub_env import GatewaySigner, HubFiles, point, sample, write_hub_config
from support.service_rig import Clock, Rig

from fieldtwin.hub.audit import verify_chain
from fieldtwin.hub.config import load_hub_config
from fieldtwin.hub.metrics import HubMetrics
from fieldtwin.hub.service import HubService
from fieldtwin.hub.store import TwinStore
from fieldtwin.protocol.approvals import (
    approval_digest,
    check_approvals,
    command_digest,
)
from fieldtwin.protocol.frames import FrameSigner
from fieldtwin.protocol.keys import KeyRegistry
from fieldtwin.protocol.messages import OperatorRequest
from fieldtwin.protocol.topics import operator_request_topic


def _open(files: HubFiles, clock: Clock) -> HubService:
    config = load_hub_config(files.config)
    store = TwinStore.open(config.database, memory_limit="256MB", threads=1)
    return HubService(config, store, instance="test", metrics=HubMetrics(), clock=clock)


def _start(tmp_path: Path, *, edit: tuple[str, str] | None = None) -> Rig:
    """A hub with gw-01 born (pump-1.speed_sp 900, tank-1.level 2.5) and one sync done;
    ``edit`` replaces one piece of the test config's text first."""
    files = write_hub_config(tmp_path)
    if edit is not None:
        text = files.config.read_text()
        assert edit[0] in text
        files.config.write_text(text.replace(*edit))
    clock = Clock()
    service = _open(files, clock)
    gw = GatewaySigner("gw-01", files.gateway_keys["gw-01"])
    rig = Rig(files, clock, service, gw, KeyRegistry.of({"hub": files.hub_key.public}))
    rig.feed(
        gw.birth(
            [
                point("pump-1", "speed_sp", "uint16", unit="rpm", writable=True, min=0, max=1800),
                point("tank-1", "level", unit="m"),
            ]
        )
    )
    rig.feed(
        gw.data(
            [
                sample("pump-1", "speed_sp", 900, clock.now_ms),
                sample("tank-1", "level", 2.5, clock.now_ms),
            ]
        )
    )
    service.sync_cycle(clock.now_ms)
    return rig


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = _start(tmp_path)
    yield rig
    rig.service.close()


def samples(rig: Rig, points: dict[str, Any]) -> None:
    rig.clock.advance(100)
    rig.feed(
        rig.gw.data(
            [
                sample(*key.split("."), value, rig.clock.now_ms)  # type: ignore[call-arg]
                for key, value in points.items()
            ]
        )
    )


def test_propose_approve_send_verify_with_every_step_audited(rig: Rig) -> None:
    proposed = rig.ok(
        "olga",
        "cmd.propose",
        {"target": "pump-1.speed_sp", "value": 1200, "reason": "raise inflow"},
    )
    command_id = proposed["id"]
    assert proposed["state"] == "awaiting_approval"
    assert proposed["checkpoint"]["value"] == 900
    assert proposed["checkpoint"]["twin_hash"].startswith("sha256:")
    assert (
        proposed["digest"]
        == command_digest(command_id, "gw-01", "pump-1", "speed_sp", 1200, 900).hex()
    )
    own = rig.approve("olga", command_id)
    assert own.code == "forbidden"  # olga is an operator, not an approver
    assert rig.sent == []
    approved = rig.approve("piet", command_id)
    assert approved.ok, approved.error
    (cmd,) = rig.sent
    assert (cmd.cmd_id, cmd.entity, cmd.attribute, cmd.value, cmd.restore_value) == (
        command_id,
        "pump-1",
        "speed_sp",
        1200,
        900,
    )
    assert cmd.approved_by == ("piet",)
    keys = {"piet": [rig.files.operator_keys["piet"].public]}
    assert check_approvals(cmd.approvals, keys, approval_digest(cmd)).valid == ("piet",)
    rig.clock.advance(200)
    rig.result(cmd, "ok", 1200)
    assert rig.ok("vic", "cmd.show", {"cmd_id": command_id})["state"] == "executed"
    rig.clock.advance(300)
    samples(rig, {"pump-1.speed_sp": 1200})
    rig.tick()
    shown = rig.ok("vic", "cmd.show", {"cmd_id": command_id})
    assert shown["state"] == "verified"
    assert [e["change"] for e in shown["timeline"]] == [
        "proposed",
        "policy_passed",
        "approval_added",
        "approved",
        "sent",
        "result",
        "verified",
    ]
    assert shown["timeline"][2]["actor"] == "piet"
    assert shown["timeline"][2]["request"]  # the signed request that authorised it
    actions = rig.audit_actions()
    for change in (
        "proposed",
        "policy_passed",
        "approval_added",
        "approved",
        "sent",
        "result",
        "verified",
    ):
        assert f"command_{change}" in actions
    assert actions.count("operator_request") == 2  # the propose and piet's approval
    assert "operator_refused" in actions  # olga's attempt is audited too
    rows = rig.store.query(
        "SELECT seq, ts_ms, actor, action, subject, detail, prev_hash, hash FROM audit ORDER BY seq"
    )
    assert verify_chain(rows).ok


def test_interlock_limits_and_roles_refuse_with_reasons(rig: Rig) -> None:
    samples(rig, {"tank-1.level": 0.2})
    refused = rig.ok(
        "olga", "cmd.propose", {"target": "pump-1.speed_sp", "value": 1200, "reason": "r"}
    )
    assert refused["state"] == "refused"
    assert (
        "interlock pump-needs-water refused: tank-1.level is 0.2 m, needs > 0.3"
        in refused["outcome"]
    )
    dry = rig.ok("vic", "cmd.dry_run", {"target": "pump-1.speed_sp", "value": 2000})
    assert dry["allowed"] is False
    assert {c["check"] for c in dry["policy"] if not c["ok"]} == {
        "limits",
        "step",
        "interlock pump-needs-water",
    }
    viewer = rig.ask(
        "vic", "cmd.propose", {"target": "pump-1.speed_sp", "value": 1000, "reason": "r"}
    )
    assert (viewer.ok, viewer.code) == (False, "forbidden")
    typo = rig.ask(
        "olga", "cmd.propose", {"target": "pump-1.sped_sp", "value": 1000, "reason": "r"}
    )
    assert typo.ok
    assert "did you mean speed_sp" in typo.result["outcome"]
    missing = rig.ask("olga", "cmd.propose", {"target": "pump-1.speed_sp", "value": 1000})
    assert (missing.code, missing.error) == ("invalid", "reason is required (non-empty text)")


def test_failed_write_is_rolled_back_to_the_checkpoint_under_the_same_approvals(rig: Rig) -> None:
    command_id = rig.ok(
        "olga", "cmd.propose", {"target": "pump-1.speed_sp", "value": 1400, "reason": "r"}
    )["id"]
    assert rig.approve("piet", command_id).ok
    (cmd,) = rig.sent
    rig.result(cmd, "failed", 900)  # the actuator ignored the write
    rollback = rig.sent[-1]
    assert rollback.cmd_id == f"{command_id}.rb"
    assert (rollback.value, rollback.rollback_of, rollback.rollback_from) == (900, command_id, 1400)
    assert approval_digest(rollback) == approval_digest(cmd)
    assert rollback.approved_by == ("piet",)
    rig.result(rollback, "ok", 900)
    rig.clock.advance(100)
    samples(rig, {"pump-1.speed_sp": 900})
    rig.tick()
    shown = rig.ok("olga", "cmd.show", {"cmd_id": command_id})
    assert shown["state"] == "rolled_back"
    assert shown["rollback_id"] == rollback.cmd_id
    assert "rolled back to 900" in shown["outcome"]
    changes = [(e["command"], e["change"]) for e in shown["timeline"]]
    assert (command_id, "failed") in changes
    assert (rollback.cmd_id, "verified") in changes
    assert changes[-1] == (command_id, "rolled_back")


def test_no_result_and_no_convergence_fails_at_the_deadline(rig: Rig) -> None:
    command_id = rig.ok(
        "olga", "cmd.propose", {"target": "pump-1.speed_sp", "value": 1000, "reason": "r"}
    )["id"]
    rig.approve("piet", command_id)
    rig.tick(9_000)
    assert rig.ok("olga", "cmd.show", {"cmd_id": command_id})["state"] == "sent"
    samples(rig, {"tank-1.level": 2.5})  # the interlock input stays fresh for the rollback
    rig.tick(1_400)  # verify_timeout_s = 10 in the test config
    shown = rig.ok("olga", "cmd.show", {"cmd_id": command_id})
    assert shown["state"] == "rolling_back"
    assert (
        "did not converge within 10 s: reported 900, target 1000 (no result from the gateway)"
        in shown["outcome"]
    )


def test_an_approval_not_sent_within_its_select_window_expires(rig: Rig) -> None:
    command_id = rig.ok(
        "olga", "cmd.propose", {"target": "pump-1.speed_sp", "value": 1000, "reason": "r"}
    )["id"]
    rig.feed(rig.gw.death(reason="connection lost"))  # the gateway goes away
    rig.service.sync_cycle(rig.clock.now_ms)
    assert rig.approve("piet", command_id).ok
    assert rig.sent == []  # policy at send time: gateway offline, so it waits
    rig.tick(29_000)
    assert rig.ok("olga", "cmd.show", {"cmd_id": command_id})["state"] == "approved"
    rig.tick(1_500)
    shown = rig.ok("olga", "cmd.show", {"cmd_id": command_id})
    assert shown["state"] == "expired"
    assert "select window of 30 s" in shown["outcome"]
    assert rig.sent == []


def test_replays_unsigned_and_unknown_requests_are_refused_and_audited(rig: Rig) -> None:
    body = OperatorRequest("x" * 24, rig.clock.now_ms + 30_000, "alarm.list", {})
    payload = FrameSigner("olga", rig.files.operator_keys["olga"]).encode(
        1, 1, rig.clock.now_ms, body
    )
    topic = operator_request_topic("olga")
    rig.service.handle_request(topic, payload)
    effects = rig.service.handle_request(topic, payload)
    (answer,) = rig._collect(effects)
    assert (answer.ok, answer.code) == (False, "replay")
    forged = FrameSigner("olga", rig.files.operator_keys["vic"]).encode(
        1, 1, rig.clock.now_ms, body
    )
    (answer,) = rig._collect(rig.service.handle_request(topic, forged))
    assert answer.code == "unknown_operator"
    (answer,) = rig._collect(rig.service.handle_request(topic, b"\x92\xc4\x01x\xc4\x01y"))
    assert answer.code == "invalid"
    refusals = rig.store.query(
        "SELECT actor, json_extract_string(detail, '$.code') FROM audit "
        "WHERE action = 'operator_refused' ORDER BY seq"
    )
    assert refusals == [("olga", "replay"), ("olga", "unknown_operator"), ("olga", "invalid")]
    assert rig.service.metrics.operator_refused["replay"] == 1


def test_a_mutating_request_replayed_after_a_restart_is_refused(rig: Rig, tmp_path: Path) -> None:
    body = OperatorRequest(
        "y" * 24,
        rig.clock.now_ms + 60_000,
        "cmd.propose",
        {"target": "pump-1.speed_sp", "value": 1000, "reason": "r"},
    )
    payload = FrameSigner("olga", rig.files.operator_keys["olga"]).encode(
        1, 1, rig.clock.now_ms, body
    )
    topic = operator_request_topic("olga")
    (first,) = rig._collect(rig.service.handle_request(topic, payload))
    assert first.ok
    rig.service.close()
    rig.service = _open(rig.files, rig.clock)
    (again,) = rig._collect(rig.service.handle_request(topic, payload))
    assert (again.ok, again.code) == (False, "replay")
    # the command itself survived the restart, still awaiting approval
    assert rig.ok("olga", "cmd.list", {"states": ["open"]})[0]["id"] == first.result["id"]


def test_alarm_operations_are_signed_and_audited_with_the_verified_identity(rig: Rig) -> None:
    samples(rig, {"tank-1.level": 4.8})
    for _ in range(3):
        rig.clock.advance(1500)
        rig.service.sync_cycle(rig.clock.now_ms)
        samples(rig, {"tank-1.level": 4.8})
    alarms = rig.ok("vic", "alarm.list", {"states": ["active"]})
    (alarm,) = [a for a in alarms if a["rule"] == "threshold"]
    denied = rig.ask("vic", "alarm.ack", {"alarm_id": alarm["id"], "reason": "seen"})
    assert denied.code == "forbidden"
    acked = rig.ok("olga", "alarm.ack", {"alarm_id": alarm["id"], "reason": "seen it"})
    assert (acked["state"], acked["acked_by"]) == ("acknowledged", "olga")
    detail = rig.store.query(
        "SELECT actor, json_extract_string(detail, '$.reason'), "
        "json_extract_string(detail, '$.request') FROM audit WHERE action = 'alarm_acknowledged'"
    )
    assert detail[0][:2] == ("olga", "seen it")
    assert detail[0][2]


STALE_RULE = 'drift = "temporal.sensor_stale"\nstrategy = "auto_correct"\n'
"""The test config's auto_correct rule (no automatic execution)."""


def _drift_pump_setpoint(rig: Rig, value: int) -> list[dict[str, Any]]:
    """pump-1.speed_sp (desired 900) reported at ``value``, then not again for longer than
    its stale limit (30 s default interval × stale factor 3) while tank-1 keeps reporting:
    a ``temporal.sensor_stale`` finding on pump-1, whose rule is auto_correct. Returns
    the commands the sync cycle proposed."""
    samples(rig, {"pump-1.speed_sp": value})
    for _ in range(47):  # 94 s, the gateway alive and the interlock input fresh
        samples(rig, {"tank-1.level": 2.5})
        rig.clock.advance(1_900)
    samples(rig, {"tank-1.level": 2.5})
    report, effects = rig.service.sync_cycle(rig.clock.now_ms)
    rig._collect(effects)
    assert any(
        (f.rule, f.entity, f.attribute) == ("temporal.sensor_stale", "pump-1", "speed_sp")
        for f in report.findings
    )
    rows: list[dict[str, Any]] = rig.ok("vic", "cmd.list", {})
    return rows


def test_an_auto_correct_finding_proposes_a_command_awaiting_approval(rig: Rig) -> None:
    (proposed,) = _drift_pump_setpoint(rig, 1200)
    shown = rig.ok("vic", "cmd.show", {"cmd_id": proposed["id"]})
    assert (shown["entity"], shown["attribute"], shown["value"]) == ("pump-1", "speed_sp", 900)
    assert (shown["source"], shown["proposed_by"]) == ("reconciliation", "hub")
    assert shown["state"] == "awaiting_approval", shown["outcome"]
    assert shown["checkpoint"]["value"] == 1200
    assert rig.sent == []
    # the next cycle, the same alarm still open, proposes nothing more
    rig.clock.advance(100)
    rig.service.sync_cycle(rig.clock.now_ms)
    assert [c["id"] for c in rig.ok("vic", "cmd.list", {})] == [proposed["id"]]
    assert rig.approve("piet", proposed["id"]).ok
    (cmd,) = rig.sent
    assert (cmd.cmd_id, cmd.value, cmd.approved_by) == (proposed["id"], 900, ("piet",))


def test_an_auto_execute_rule_sends_the_correction_without_an_operator(tmp_path: Path) -> None:
    rig = _start(tmp_path, edit=(STALE_RULE, STALE_RULE + "auto_execute = true\n"))
    try:
        (proposed,) = _drift_pump_setpoint(rig, 1200)
        assert proposed["source"] == "reconciliation"
        (cmd,) = rig.sent
        assert (cmd.cmd_id, cmd.entity, cmd.attribute, cmd.value) == (
            proposed["id"],
            "pump-1",
            "speed_sp",
            900,
        )
        assert cmd.approved_by == ()
        shown = rig.ok("vic", "cmd.show", {"cmd_id": proposed["id"]})
        assert shown["state"] == "sent"
        assert "approval_added" not in [e["change"] for e in shown["timeline"]]
    finally:
        rig.service.close()


def test_an_auto_execute_correction_outside_the_limits_is_refused_not_sent(
    tmp_path: Path,
) -> None:
    rig = _start(tmp_path, edit=(STALE_RULE, STALE_RULE + "auto_execute = true\n"))
    try:
        # 100 → 900 is a step of 800 rpm; speed_sp allows 600 per command
        (proposed,) = _drift_pump_setpoint(rig, 100)
        assert proposed["state"] == "refused"
        assert "step" in proposed["outcome"]
        assert rig.sent == []
    finally:
        rig.service.close()


def _raise_level_alarm(rig: Rig) -> dict[str, Any]:
    """tank-1.level above its critical limit for a few cycles: one threshold alarm."""
    for _ in range(3):
        samples(rig, {"tank-1.level": 4.8})
        rig.clock.advance(1500)
        rig.service.sync_cycle(rig.clock.now_ms)
    (alarm,) = [a for a in rig.ok("vic", "alarm.list", {}) if a["rule"] == "threshold"]
    return alarm


def test_health_changed_records_say_what_the_health_was_and_became(rig: Rig) -> None:
    for level in (2.5, 4.8, 4.8, 4.8, 2.5):  # healthy, degraded by the alarm, healthy
        samples(rig, {"tank-1.level": level, "tank-1.temp": 20.0})
        rig.clock.advance(1500)
        rig.service.sync_cycle(rig.clock.now_ms)
    changes = rig.store.query(
        "SELECT json_extract_string(detail, '$.from'), json_extract_string(detail, '$.to') "
        "FROM audit WHERE action = 'health_changed' AND subject = 'tank-1' ORDER BY seq"
    )
    assert ("healthy", "degraded") in changes
    assert ("degraded", "healthy") in changes
    assert all(before != after for before, after in changes), changes
    # each record starts where the one before it ended
    assert all(changes[i][0] == changes[i - 1][1] for i in range(1, len(changes))), changes


def test_alarm_raises_and_clears_are_logged_once_each(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fieldtwin.hub"):
        alarm = _raise_level_alarm(rig)
        rig.ok("olga", "alarm.ack", {"alarm_id": alarm["id"], "reason": "draining it"})
        for _ in range(2):
            samples(rig, {"tank-1.level": 2.5})
            rig.clock.advance(100)
            rig.service.sync_cycle(rig.clock.now_ms)
    lines = [
        (r.getMessage(), r.levelno)
        for r in caplog.records
        if getattr(r, "ft_fields", {}).get("alarm") == alarm["id"]
    ]
    assert lines.count(("alarm raised", logging.WARNING)) == 1, lines
    assert lines.count(("alarm acknowledged", logging.INFO)) == 1, lines
    assert lines.count(("alarm cleared", logging.INFO)) == 1, lines
    (raised,) = [
        r
        for r in caplog.records
        if r.getMessage() == "alarm raised" and r.ft_fields["alarm"] == alarm["id"]
    ]  # type: ignore[attr-defined]
    assert raised.ft_fields["subject"] == "tank-1.level"  # type: ignore[attr-defined]
    assert raised.ft_fields["severity"] == "critical"  # type: ignore[attr-defined]
