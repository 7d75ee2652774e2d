"""The agent's own command policy (sans-I/O) and read-back comparison."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.strategies import values

from fieldtwin.agent.commands import Accept, Refuse, check_command, readback_matches
from fieldtwin.agent.config import PointConfig
from fieldtwin.protocol.messages import Command

NOW = 1_700_000_000_000
SPEED_SP = PointConfig(
    "pump-1", "speed_sp", "uint16", table="holding", writable=True, min=0, max=1800
)
VALVE = PointConfig(
    "valve-1", "position", "uint16", table="holding", scale=0.1, writable=True, min=0, max=100
)
RUNNING = PointConfig("pump-1", "running", "bool", table="coil", writable=True)
LEVEL = PointConfig("tank-1", "level", "float32", table="input")
HEATER = PointConfig(
    "boiler-1", "heater_power_sp", "float64", node="ns=2;s=x", writable=True, min=0, max=50
)
POINTS = {p.key: p for p in (SPEED_SP, VALVE, RUNNING, LEVEL, HEATER)}


def command(
    entity: str, attribute: str, value: object, *, to: str = "gw-pumps", expires: int = NOW + 30_000
) -> Command:
    return Command(to, "c-1", entity, attribute, value, expires)  # type: ignore[arg-type]


def decide(cmd: Command) -> Accept | Refuse:
    return check_command(cmd, gateway="gw-pumps", now_ms=NOW, points=POINTS)


def test_accepts_writable_points_within_limits() -> None:
    assert decide(command("pump-1", "speed_sp", 1500)) == Accept(SPEED_SP, 1500)
    assert decide(command("pump-1", "speed_sp", 1500.0)) == Accept(SPEED_SP, 1500)
    assert decide(command("valve-1", "position", 45.5)) == Accept(VALVE, 45.5)
    assert decide(command("pump-1", "running", False)) == Accept(RUNNING, False)
    assert decide(command("boiler-1", "heater_power_sp", 50)) == Accept(HEATER, 50)


@pytest.mark.parametrize(
    ("cmd", "status", "words"),
    [
        (command("pump-1", "speed_sp", 1500, to="gw-other"), "rejected", "addressed to"),
        (command("pump-1", "speed_sp", 1500, expires=NOW), "expired", "expired"),
        (command("pump-9", "speed_sp", 1), "rejected", "not a point"),
        (command("tank-1", "level", 1.0), "rejected", "not writable"),
        (command("pump-1", "speed_sp", 1801), "rejected", "above the limit"),
        (command("pump-1", "speed_sp", -1), "rejected", "below the limit"),
        (command("pump-1", "speed_sp", 1500.5), "rejected", "whole number"),
        (command("pump-1", "speed_sp", "1500"), "rejected", "takes a number"),
        (command("pump-1", "speed_sp", True), "rejected", "takes a number"),
        (command("pump-1", "running", 1), "rejected", "true or false"),
        (command("pump-1", "speed_sp", None), "rejected", "takes a number"),
    ],
)
def test_refusals_say_why(cmd: Command, status: str, words: str) -> None:
    decision = decide(cmd)
    assert isinstance(decision, Refuse)
    assert decision.status == status
    assert words in decision.detail


@given(value=values, attribute=st.sampled_from(["speed_sp", "running", "position", "level"]))
def test_accepted_values_always_respect_type_and_limits(value: object, attribute: str) -> None:
    entity = {"speed_sp": "pump-1", "running": "pump-1", "position": "valve-1", "level": "tank-1"}
    decision = decide(command(entity[attribute], attribute, value))
    if isinstance(decision, Refuse):
        assert decision.status == "rejected"
        return
    point = decision.point
    assert point.writable
    if point.dtype == "bool":
        assert isinstance(decision.value, bool)
    else:
        assert isinstance(decision.value, int | float)
        assert not isinstance(decision.value, bool)
        assert math.isfinite(decision.value)
        assert point.min is not None
        assert point.max is not None
        assert point.min <= decision.value <= point.max


@given(expires=st.integers(0, 2 * NOW))
def test_expiry_is_checked_before_anything_else_but_the_recipient(expires: int) -> None:
    decision = decide(command("pump-9", "nothing", 1, expires=expires))
    assert isinstance(decision, Refuse)
    assert decision.status == ("expired" if expires <= NOW else "rejected")


def test_readback_tolerance_follows_the_register_resolution() -> None:
    assert readback_matches(VALVE, 45.5, 45.5)
    assert readback_matches(VALVE, 45.53, 45.5)  # 0.1 resolution
    assert not readback_matches(VALVE, 45.5, 45.7)
    assert readback_matches(SPEED_SP, 1500, 1500)
    assert not readback_matches(SPEED_SP, 1500, 1499)
    assert readback_matches(RUNNING, True, True)
    assert not readback_matches(RUNNING, True, 1)
    assert readback_matches(HEATER, 25.0, 25.0)
    assert not readback_matches(HEATER, 25.0, 25.001)


# -- operator approvals (defence in depth) ----------------------------------------------------


def _approved(
    value: object,
    approvers: tuple[str, ...] = ("bob",),
    *,
    restore: object = 900,
    cmd_id: str = "C-000007",
) -> Command:
    from support.keys import operator_key, other_key

    from fieldtwin.protocol.approvals import command_digest, sign_approval

    keys = {"bob": operator_key, "eve": other_key}
    digest = command_digest(cmd_id, "gw-pumps", "pump-1", "speed_sp", value, restore)  # type: ignore[arg-type]
    approvals = tuple(sign_approval(name, keys[name], digest) for name in approvers)
    return Command(
        "gw-pumps",
        cmd_id,
        "pump-1",
        "speed_sp",
        value,
        NOW + 30_000,
        approvals,  # type: ignore[arg-type]
        restore_value=restore,  # type: ignore[arg-type]
    )


def _decide_with_approvers(
    cmd: Command, required: int = 1, unattended: frozenset[str] = frozenset()
) -> Accept | Refuse:
    from support.keys import operator_key

    from fieldtwin.agent.commands import Approvers

    approvers = Approvers({"bob": (operator_key.public,)}, required, unattended)
    return check_command(cmd, gateway="gw-pumps", now_ms=NOW, points=POINTS, approvers=approvers)


def test_with_approvers_configured_a_command_needs_a_valid_approval() -> None:
    assert _decide_with_approvers(_approved(1200)) == Accept(SPEED_SP, 1200)
    none = _decide_with_approvers(_approved(1200, ()))
    assert none == Refuse("rejected", "needs 1 valid operator approval(s), has 0: it carries none")
    stranger = _decide_with_approvers(_approved(1200, ("eve",)))
    assert isinstance(stranger, Refuse)
    assert "eve with key" in stranger.detail
    assert "is not a known approver" in stranger.detail
    # a hub that changes the value (or the restore value) after approval breaks the signature
    tampered = _approved(1200)
    from dataclasses import replace

    for changed in (replace(tampered, value=1800), replace(tampered, restore_value=0)):
        refused = _decide_with_approvers(changed)
        assert isinstance(refused, Refuse)
        assert "signature does not verify" in refused.detail
    # ... and so does replaying the approvals under another command id
    assert isinstance(_decide_with_approvers(replace(tampered, cmd_id="C-000008")), Refuse)
    assert isinstance(_decide_with_approvers(_approved(1200), required=2), Refuse)
    unattended = _decide_with_approvers(
        _approved(1200, ()), unattended=frozenset({"pump-1.speed_sp"})
    )
    assert unattended == Accept(SPEED_SP, 1200)


def test_a_rollback_carries_the_parents_approvals_and_restores_only_the_checkpoint() -> None:
    from dataclasses import replace

    parent = _approved(1200, restore=900)
    rollback = replace(
        parent,
        cmd_id="C-000007.rb",
        value=900,
        restore_value=None,
        rollback_of="C-000007",
        rollback_from=1200,
    )
    assert _decide_with_approvers(rollback) == Accept(SPEED_SP, 900)
    elsewhere = _decide_with_approvers(replace(rollback, value=1500))
    assert isinstance(elsewhere, Refuse)  # not the approved restore value
    renamed = _decide_with_approvers(replace(rollback, cmd_id="C-000007.rb2"))
    assert renamed == Refuse(
        "rejected", "a rollback of C-000007 must have id C-000007.rb, not C-000007.rb2"
    )
