"""Command policy (pure): every check, pass and fail, with the operator's wording."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fieldtwin.hub.config import load_hub_config
from fieldtwin.hub.policy import (
    GatewayStatus,
    PolicyInput,
    Verdict,
    check_command,
    compare,
    within_tolerance,
)
from fieldtwin.hub.state import CurrentValue

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hub.toml"
SCHEMA = load_hub_config(EXAMPLE).schema
NOW = 1_000_000


def value(v: Any, age_s: float = 1.0, quality: int = 0) -> CurrentValue:
    ts = NOW - int(age_s * 1000)
    return CurrentValue(v, ts, quality, "gw-pumps", ts, ts)


def facts(
    current: dict[tuple[str, str], CurrentValue] | None = None,
    *,
    online: bool = True,
    in_flight: dict[tuple[str, str], str] | None = None,
    stale_after_s: float = 10.0,
) -> PolicyInput:
    base = {
        ("pump-1", "speed_sp"): value(900),
        ("pump-1", "running"): value(True),
        ("tank-1", "level"): value(2.5),
        ("valve-1", "position"): value(50.0),
    }
    base.update(current or {})
    return PolicyInput(
        schema=SCHEMA,
        current=base,
        dtypes={("pump-1", "speed_sp"): "uint16", ("pump-1", "running"): "bool"},
        stale_after_ms=lambda e, a: int(stale_after_s * 1000),
        gateway=GatewayStatus("gw-pumps", online, "" if online else "disconnected since 14:02:11"),
        in_flight=in_flight or {},
        now_ms=NOW,
    )


def failing(verdict: Verdict) -> dict[str, str]:
    return {c.name: c.text for c in verdict.checks if not c.ok}


def test_an_allowed_command_passes_every_check() -> None:
    verdict = check_command("pump-1", "speed_sp", 1200, facts())
    assert verdict.ok, verdict.summary()
    names = [c.name for c in verdict.checks]
    assert names == [
        "declared",
        "writable",
        "type",
        "limits",
        "step",
        "checkpoint",
        "interlock pump-needs-water",
        "gateway",
        "in flight",
    ]
    assert "restore point 900 rpm" in verdict.checks[5].text


def test_unknown_entity_or_attribute_is_refused_with_a_suggestion() -> None:
    assert failing(check_command("pump-9", "speed_sp", 1, facts())) == {
        "declared": "pump-9 is not a declared entity (did you mean pump-1?)"
    }
    assert failing(check_command("pump-1", "sped_sp", 1, facts())) == {
        "declared": "sped_sp is not an attribute of pump-1 (type pump) (did you mean speed_sp?)"
    }


def test_read_only_wrong_type_limits_and_step() -> None:
    assert failing(check_command("pump-1", "speed", 1, facts())) == {
        "writable": "pump-1.speed is read-only in the schema"
    }
    assert "takes a number" in failing(check_command("pump-1", "speed_sp", "fast", facts()))["type"]
    assert "takes true or false" in failing(check_command("pump-1", "running", 1, facts()))["type"]
    refused = failing(check_command("pump-1", "speed_sp", 1900, facts()))
    assert refused["limits"] == "1900 rpm is above the maximum of pump-1.speed_sp ([0, 1800] rpm)"
    assert refused["step"] == "step 1000 rpm from 900 rpm exceeds the maximum step 600 rpm"
    assert (
        "below the minimum" in failing(check_command("pump-1", "speed_sp", -5, facts()))["limits"]
    )


def test_checkpoint_needs_a_good_reported_value() -> None:
    never = facts()
    del never.current[("pump-1", "speed_sp")]  # type: ignore[attr-defined]
    assert (
        "has never been reported"
        in failing(check_command("pump-1", "speed_sp", 1000, never))["checkpoint"]
    )
    bad = facts({("pump-1", "speed_sp"): value(900, quality=2)})
    assert (
        "quality bad: no good value to restore to"
        in failing(check_command("pump-1", "speed_sp", 1000, bad))["checkpoint"]
    )


def test_interlock_inputs_must_be_fresh_good_and_satisfy_the_condition() -> None:
    name = "interlock pump-needs-water"
    low = facts({("tank-1", "level"): value(0.21)})
    assert failing(check_command("pump-1", "speed_sp", 1200, low))[name] == (
        "interlock pump-needs-water refused: tank-1.level is 0.21 m, needs > 0.3 (pump speed "
        "above 0 requires tank level above 0.3 m)"
    )
    stale = facts({("tank-1", "level"): value(2.5, age_s=42)})
    assert failing(check_command("pump-1", "speed_sp", 1200, stale))[name] == (
        "interlock pump-needs-water: input tank-1.level is stale, last sample 42 s ago "
        "(pump speed above 0 requires tank level above 0.3 m)"
    )
    bad = facts({("tank-1", "level"): value(2.5, quality=3)})
    assert "has quality stale" in failing(check_command("pump-1", "speed_sp", 1200, bad))[name]
    missing = facts()
    del missing.current[("tank-1", "level")]  # type: ignore[attr-defined]
    assert (
        "has never been reported"
        in failing(check_command("pump-1", "speed_sp", 1200, missing))[name]
    )
    # stopping the pump (0) is not what this interlock guards: allowed even with a low tank
    stop = check_command(
        "pump-1",
        "speed_sp",
        0,
        facts({("tank-1", "level"): value(0.1), ("pump-1", "speed_sp"): value(500)}),
    )
    assert stop.ok, stop.summary()
    assert "does not apply to 0 (only > 0)" in {c.name: c.text for c in stop.checks}[name]


def test_the_second_example_interlock_forbids_closing_the_outlet_while_pumping() -> None:
    name = "interlock outlet-open-while-pumping"
    refused = failing(check_command("valve-1", "position", 3.0, facts()))
    assert refused[name].startswith(
        "interlock outlet-open-while-pumping refused: pump-1.running is true, needs == false"
    )
    stopped = facts({("pump-1", "running"): value(False)})
    assert check_command("valve-1", "position", 3.0, stopped).ok


def test_gateway_offline_and_a_command_in_flight_refuse() -> None:
    refused = failing(check_command("pump-1", "speed_sp", 1000, facts(online=False)))
    assert refused == {"gateway": "gateway gw-pumps is offline: disconnected since 14:02:11"}
    busy = facts(in_flight={("pump-1", "speed_sp"): "C-000012 (awaiting approval)"})
    assert failing(check_command("pump-1", "speed_sp", 1000, busy)) == {
        "in flight": "C-000012 (awaiting approval) is in flight on pump-1.speed_sp"
    }
    # ... except for that command's own rollback
    assert check_command("pump-1", "speed_sp", 1000, busy, rollback_of="C-000012").ok


@given(st.floats(min_value=-5000, max_value=5000, allow_nan=False))
def test_the_verdict_is_the_conjunction_of_its_checks(target: float) -> None:
    verdict = check_command("pump-1", "speed_sp", target, facts())
    assert verdict.ok == all(c.ok for c in verdict.checks)
    in_limits = 0 <= target <= 1800
    assert {c.name: c.ok for c in verdict.checks}["limits"] == in_limits
    assert verdict.ok == (in_limits and abs(target - 900) <= 600 + 1e-9)


@pytest.mark.parametrize(
    ("op", "left", "right", "expected"),
    [
        (">", 0.5, 0.3, True),
        (">", 0.3, 0.3, False),
        (">=", 0.3, 0.3, True),
        ("==", True, False, False),
        ("==", False, False, True),
        ("!=", True, False, True),
        ("<", 4, 5.0, True),
        ("==", "auto", "auto", True),
        (">", "b", "a", True),
        (">", None, 1, False),
        ("!=", None, 1, False),  # no value satisfies no condition (an interlock refuses)
        (">", "x", 1, False),
    ],
)
def test_compare(op: str, left: Any, right: Any, expected: bool) -> None:
    assert compare(op, left, right) is expected


def test_within_tolerance() -> None:
    assert within_tolerance(1203.0, 1200, 5.0)
    assert not within_tolerance(1206.0, 1200, 5.0)
    assert within_tolerance(True, True, 0.0)
    assert not within_tolerance(1, True, 0.0)
    assert within_tolerance("auto", "auto", 0.0)
