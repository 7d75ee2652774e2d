"""The drift engine, rule by rule, on plain state (no I/O)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.hub_env import write_hub_config
from support.plausibility import write_plausible_config

from fieldtwin.hub.config import HubConfig, Limits, load_hub_config
from fieldtwin.hub.drift import DriftEngine, Finding, ThresholdMonitor
from fieldtwin.hub.state import CurrentValue, GatewayLink, PointInfo, RateEvent, TwinState

T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> HubConfig:
    files = write_hub_config(tmp_path_factory.mktemp("drift"), silent_s=3, missing_s=2, stale_s=3)
    return load_hub_config(files.config)


def engine_for(config: HubConfig, started: int = T0) -> DriftEngine:
    return DriftEngine(config.schema, config.drift, config.reconciliation, config.gateways, started)


def healthy_state(now: int) -> TwinState:
    state = TwinState()
    state.gateways["gw-01"] = GatewayLink(
        "gw-01", epoch=1, birth_seq=1, online=True, last_frame_ms=now, last_birth_ms=now
    )
    state.gateways["gw-02"] = GatewayLink("gw-02", epoch=1, online=True, last_frame_ms=now)
    for key, value in {
        ("tank-1", "level"): 2.0,
        ("tank-1", "temp"): 20.0,
        ("pump-1", "speed"): 900,
        ("pump-1", "speed_sp"): 900,
        ("pump-1", "running"): True,
    }.items():
        state.current[key] = CurrentValue(value, now, 0, "gw-01", now, now)
    return state


def rules(report: object) -> set[tuple[str, str, str]]:
    return {(f.rule, f.entity, f.attribute) for f in report.findings}  # type: ignore[attr-defined]


# -- thresholds ----------------------------------------------------------------------------

HIGH = Limits(warning=10.0, critical=20.0)
LOW = Limits(warning=-10.0, critical=-20.0)


def test_threshold_levels_deadband_and_delays() -> None:
    monitor = ThresholdMonitor(HIGH, LOW, deadband=1.0, on_delay_ms=1000, off_delay_ms=2000)
    assert monitor.observe(12.0, 0) == 0  # pending
    assert monitor.observe(12.0, 999) == 0
    assert monitor.observe(12.0, 1000) == 1  # held for the on delay
    assert monitor.observe(9.5, 2000) == 1  # inside the deadband: still a warning
    assert monitor.observe(8.9, 3000) == 1  # below limit - deadband: pending clear
    assert monitor.observe(8.9, 4999) == 1
    assert monitor.observe(8.9, 5000) == 0  # held for the off delay
    assert monitor.observe(25.0, 6000) == 0
    assert monitor.observe(25.0, 7000) == 2  # critical
    assert monitor.observe(-25.0, 8000) == 2
    assert monitor.observe(-25.0, 9000) == -2  # to the other side with the on delay


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(-40, 40, allow_nan=False), min_size=1, max_size=60),
    st.floats(0.0, 5.0),
    st.integers(0, 3000),
    st.integers(0, 3000),
)
def test_threshold_never_flaps(
    values: list[float], deadband: float, on_delay: int, off_delay: int
) -> None:
    monitor = ThresholdMonitor(HIGH, LOW, deadband, on_delay, off_delay)
    changes: list[int] = []
    level = 0
    for i, value in enumerate(values):
        now = i * 500
        new = monitor.observe(value, now)
        if new != level:
            changes.append(now)
            # a level is only entered when its limit is reached ...
            if abs(new) > abs(level) and new > 0:
                assert value >= (HIGH.warning if new == 1 else HIGH.critical)  # type: ignore[operator]
            level = new
    # ... and consecutive changes are at least the shorter delay apart
    gaps = [b - a for a, b in itertools.pairwise(changes)]
    assert all(gap >= min(on_delay, off_delay) for gap in gaps)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-0.999, 10.0), min_size=1, max_size=50), st.floats(1.0, 5.0))
def test_values_within_deadband_never_clear_an_active_level(
    wobble: list[float], deadband: float
) -> None:
    monitor = ThresholdMonitor(HIGH, LOW, deadband)
    assert monitor.observe(10.0, 0) == 1
    for i, delta in enumerate(wobble):
        # anything above limit - deadband keeps the warning: no flapping at the limit
        value = 10.0 - deadband * (abs(delta) % 1.0) * 0.999
        assert monitor.observe(value, i + 1) >= 1


# -- the engine ----------------------------------------------------------------------------


def test_healthy_twin_has_no_findings(config: HubConfig) -> None:
    now = T0 + 1000
    report = engine_for(config).evaluate(healthy_state(now), now)
    assert report.findings == []
    assert report.health == {"pump-1": "healthy", "tank-1": "healthy"}


def test_threshold_finding_and_degraded_health(config: HubConfig) -> None:
    now = T0 + 1000
    state = healthy_state(now)
    state.current[("tank-1", "level")] = CurrentValue(4.6, now, 0, "gw-01", now, now)
    report = engine_for(config).evaluate(state, now)
    (finding,) = report.findings
    assert (finding.rule, finding.severity, finding.strategy) == ("threshold", "critical", "alert")
    assert "high critical limit 4.5" in finding.description
    assert report.health["tank-1"] == "degraded"


def test_gateway_silent_is_told_apart_from_sensor_stale(config: HubConfig) -> None:
    engine = engine_for(config)
    now = T0 + 10_000
    # gateway alive, one attribute not updated within stale_after_s (3 s)
    state = healthy_state(now)
    state.current[("tank-1", "level")] = CurrentValue(2.0, now - 4000, 0, "gw-01", now, now - 4000)
    report = engine.evaluate(state, now)
    assert rules(report) == {("temporal.sensor_stale", "tank-1", "level")}
    assert report.findings[0].strategy == "auto_correct"
    assert report.health["tank-1"] == "degraded"
    # BAD or STALE quality is stale too, even when recent
    state.current[("tank-1", "temp")] = CurrentValue(None, now, 2, "gw-01", now, now)
    report = engine.evaluate(state, now)
    assert ("temporal.sensor_stale", "tank-1", "temp") in rules(report)
    assert report.health["tank-1"] == "stale"  # every attribute stale
    # the gateway goes silent: one gateway finding, no per-sensor staleness
    state.gateways["gw-01"].last_frame_ms = now - 3500
    report = engine.evaluate(state, now)
    assert rules(report) == {("temporal.gateway_silent", "gw-01", "")}
    assert report.health == {"pump-1": "stale", "tank-1": "stale"}
    # a death is silence at once
    state = healthy_state(now)
    state.gateways["gw-01"].online = False
    state.gateways["gw-01"].death_reason = "killed"
    report = engine.evaluate(state, now)
    assert "death received (killed)" in report.findings[0].description


def test_never_connected_gateways_and_missing_entities(config: HubConfig) -> None:
    engine = engine_for(config)
    state = TwinState()
    report = engine.evaluate(state, T0 + 1000)  # within the grace periods
    assert report.findings == []
    assert report.health == {"pump-1": "unknown", "tank-1": "unknown"}
    report = engine.evaluate(state, T0 + 3500)
    assert rules(report) == {
        ("temporal.gateway_silent", "gw-01", ""),
        ("temporal.gateway_silent", "gw-02", ""),
        ("structural.missing", "tank-1", ""),
        ("structural.missing", "pump-1", ""),
    }


def test_structural_undeclared_missing_attribute_and_wrong_gateway(config: HubConfig) -> None:
    now = T0 + 10_000
    state = healthy_state(now)
    del state.current[("pump-1", "running")]
    state.current[("pump-1", "vibration")] = CurrentValue(1.0, now, 0, "gw-01", now, now)
    state.current[("mixer-7", "rpm")] = CurrentValue(10, now, 0, "gw-01", now, now)
    state.points[("tank-1", "temp")] = PointInfo(
        "tank-1", "temp", "gw-02", "float64", "", False, None, None, 1000, "", now
    )
    report = engine_for(config).evaluate(state, now)
    found = rules(report)
    assert ("structural.missing", "pump-1", "running") in found
    assert ("structural.undeclared", "pump-1", "vibration") in found
    assert ("structural.undeclared", "mixer-7", "") in found
    assert ("structural.wrong_gateway", "tank-1", "") in found
    undeclared = next(f for f in report.findings if f.entity == "mixer-7")
    assert undeclared.strategy == "investigate"
    assert report.health["mixer-7"] == "degraded"


def test_relationship_rule(tmp_path: Path) -> None:
    files = write_hub_config(tmp_path)
    text = files.config.read_text().replace(
        'source = "pump-1"\ntarget = "tank-1"', 'source = "tank-1"\ntarget = "pump-1"'
    )
    files.config.write_text(text)
    config = load_hub_config(files.config)
    now = T0 + 1000
    report = engine_for(config).evaluate(healthy_state(now), now)
    (finding,) = report.findings
    assert finding.rule == "structural.relationship"
    assert finding.entity == "pump-1"
    assert "pump-feeds-tank" in finding.description


def test_semantic_rate_and_frozen(config: HubConfig) -> None:
    engine = engine_for(config)
    now = T0 + 60_000
    state = healthy_state(now)
    state.rate_events[("tank-1", "level")] = RateEvent(now - 1000, 3.0, 2.0, 5.0)
    report = engine.evaluate(state, now)
    assert rules(report) == {("semantic.rate", "tank-1", "level")}
    assert "3 m/s" in report.findings[0].description
    for link in state.gateways.values():
        link.last_frame_ms = now + 6000
    # beyond rate_hold_s (5 s) the rate finding ends; the level has not moved for 7 s
    state.current[("tank-1", "level")] = CurrentValue(2.0, now + 6000, 0, "gw-01", now, now - 1000)
    report = engine.evaluate(state, now + 6000)
    assert rules(report) == {("semantic.frozen", "tank-1", "level")}
    # frozen only while fresh good samples arrive: a stale one is "stale", not "frozen"
    state.current[("tank-1", "level")] = CurrentValue(2.0, now, 0, "gw-01", now, now - 1000)
    report = engine.evaluate(state, now + 6000)
    assert {r for r, _, _ in rules(report)} == {"temporal.sensor_stale"}


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 10_000),
    st.sampled_from([100, 250, 500, 1000]),
    st.integers(0, 999),
)
def test_frozen_fires_at_its_limit_within_one_drift_interval(
    config: HubConfig, changed_after_ms: int, interval_ms: int, phase_ms: int
) -> None:
    """``frozen_after_s`` counts from the source time of the first sample carrying the
    value (the repeats only confirm it); the finding comes on the first drift cycle at or
    after that time plus the limit: latency = limit + less than one drift interval."""
    spec = config.schema.spec("tank-1", "level")
    assert spec is not None
    assert spec.frozen_after_s is not None
    limit_ms = round(spec.frozen_after_s * 1000)
    engine = engine_for(config)
    changed = T0 + 5_000 + changed_after_ms
    detected: int | None = None
    now = T0 + phase_ms % interval_ms
    while now <= changed + limit_ms + 2 * interval_ms:
        state = healthy_state(now)
        # a fresh repeat of the same value every second since the change
        latest = changed + max(0, now - changed) // 1000 * 1000
        state.current[("tank-1", "level")] = CurrentValue(2.0, latest, 0, "gw-01", now, changed)
        frozen = ("semantic.frozen", "tank-1", "level") in rules(engine.evaluate(state, now))
        if now - changed < limit_ms:
            assert not frozen, f"frozen after {now - changed} ms (limit {limit_ms} ms)"
        elif frozen and detected is None:
            detected = now
        now += interval_ms
    assert detected is not None
    assert limit_ms <= detected - changed < limit_ms + interval_ms
    # exactly at the limit counts as frozen
    state = healthy_state(changed + limit_ms)
    state.current[("tank-1", "level")] = CurrentValue(
        2.0, changed + limit_ms, 0, "gw-01", changed + limit_ms, changed
    )
    fresh = engine_for(config)
    assert ("semantic.frozen", "tank-1", "level") in rules(
        fresh.evaluate(state, changed + limit_ms)
    )


def test_findings_keep_their_first_detection_time(config: HubConfig) -> None:
    engine = engine_for(config)
    now = T0 + 1000
    state = healthy_state(now)
    state.current[("tank-1", "level")] = CurrentValue(4.2, now, 0, "gw-01", now, now)
    first = engine.evaluate(state, now).findings[0]
    later = engine.evaluate(state, now + 500).findings[0]
    assert first.since_ms == later.since_ms == now
    state.current[("tank-1", "level")] = CurrentValue(2.0, now, 0, "gw-01", now, now)
    assert engine.evaluate(state, now + 600).findings == []
    state.current[("tank-1", "level")] = CurrentValue(4.2, now, 0, "gw-01", now, now)
    assert engine.evaluate(state, now + 700).findings[0].since_ms == now + 700


def test_a_planned_shutdown_is_recorded_not_alarmed_and_a_restart_gives_a_grace(
    config: HubConfig,
) -> None:
    engine = engine_for(config)
    state = healthy_state(T0)
    link = state.gateways["gw-01"]
    link.online, link.death_reason = False, "shutdown"
    (finding,) = [f for f in engine.evaluate(state, T0 + 100).findings if f.entity == "gw-01"]
    assert finding.rule == "temporal.gateway_silent"
    assert (finding.severity, finding.strategy) == ("warning", "ignore")
    assert "planned shutdown" in finding.description
    link.death_reason = "connection lost"  # an unplanned loss is an alarm
    (lost,) = [f for f in engine.evaluate(state, T0 + 200).findings if f.entity == "gw-01"]
    assert (lost.severity, lost.strategy) == ("critical", "alert")
    # A hub restarted on this (old) state hears nothing for a while: it waits a full
    # silence / stale limit from its own start before it judges.
    old = healthy_state(T0)
    restarted = engine_for(config, started=T0 + 60_000)
    assert rules(restarted.evaluate(old, T0 + 61_000)) == set()
    later = rules(restarted.evaluate(old, T0 + 64_000))
    assert ("temporal.gateway_silent", "gw-01", "") in later


# -- physical plausibility -----------------------------------------------------------------


@pytest.fixture(scope="module")
def plausible(tmp_path_factory: pytest.TempPathFactory) -> HubConfig:
    files = write_plausible_config(tmp_path_factory.mktemp("plausible"), stale_s=3)
    return load_hub_config(files.config)


def tank_state(now: int, level: float, switch: object, quality: int = 0) -> TwinState:
    """The healthy twin with a level (``quality``) and a high-level switch reading."""
    state = healthy_state(now)
    state.current[("tank-1", "level")] = CurrentValue(level, now, quality, "gw-01", now, now)
    state.current[("tank-1", "high_level")] = CurrentValue(switch, now, 0, "gw-01", now, now)
    return state


def implausible(report: object) -> list[Finding]:
    return [f for f in report.findings if f.rule == "semantic.implausible"]  # type: ignore[attr-defined]


def test_a_plausible_tank_has_no_findings(plausible: HubConfig) -> None:
    now = T0 + 1000
    engine = engine_for(plausible)
    for level, switch in ((2.0, False), (4.55, False), (4.5, True), (4.45, True), (0.0, False)):
        report = engine.evaluate(tank_state(now, level, switch), now)
        assert implausible(report) == [], (level, switch)
    assert engine.evaluate(tank_state(now, 2.0, False), now).health["tank-1"] == "healthy"


def test_a_level_beyond_the_tanks_height_is_implausible(plausible: HubConfig) -> None:
    now = T0 + 1000
    report = engine_for(plausible).evaluate(tank_state(now, 5.3, True), now)
    (finding,) = implausible(report)
    assert (finding.entity, finding.attribute) == ("tank-1", "level")
    assert (finding.severity, finding.strategy) == ("warning", "investigate")
    assert finding.description.startswith("tank-1.level = 5.3 m is physically impossible")
    assert "physical_max static.height_m = 5" in finding.description
    assert finding.detail["range"] == {
        "min": 0.0,
        "max": 5.0,
        "margin": 0.05,
        "value": 5.3,
        "min_source": "",
        "max_source": "static.height_m",
    }
    assert finding.value == 5.3
    assert report.health["tank-1"] == "degraded"
    below = implausible(engine_for(plausible).evaluate(tank_state(now, -0.2, False), now))
    assert "below 0 m" in below[0].description


def test_the_physical_margin_tolerates_noise_at_the_bounds(plausible: HubConfig) -> None:
    now = T0 + 1000
    engine = engine_for(plausible)
    assert implausible(engine.evaluate(tank_state(now, 5.04, True), now)) == []
    assert implausible(engine.evaluate(tank_state(now, -0.04, False), now)) == []
    assert len(implausible(engine.evaluate(tank_state(now, 5.06, True), now))) == 1
    assert len(implausible(engine.evaluate(tank_state(now, -0.06, False), now))) == 1


def test_stale_or_bad_readings_are_not_judged(plausible: HubConfig) -> None:
    now = T0 + 10_000
    engine = engine_for(plausible)
    old = tank_state(now, 7.9, False)
    old.current[("tank-1", "level")] = CurrentValue(7.9, now - 4000, 0, "gw-01", now, now - 4000)
    report = engine.evaluate(old, now)
    assert implausible(report) == []
    assert ("temporal.sensor_stale", "tank-1", "level") in rules(report)
    bad = engine.evaluate(tank_state(now, 7.9, False, quality=2), now)
    assert implausible(bad) == []
    # an uncertain number is still a number the physics can rule out
    uncertain = implausible(engine.evaluate(tank_state(now, 7.9, False, quality=1), now))
    assert [f.detail.keys() for f in uncertain] == [{"range"}]  # no cross-check on it
    silent = tank_state(now, 7.9, False)
    silent.gateways["gw-01"].last_frame_ms = now - 3500
    assert implausible(engine.evaluate(silent, now)) == []


def test_a_level_high_while_the_switch_reads_off_contradicts(plausible: HubConfig) -> None:
    now = T0 + 1000
    report = engine_for(plausible).evaluate(tank_state(now, 4.8, False), now)
    (finding,) = implausible(report)
    assert (finding.entity, finding.attribute) == ("tank-1", "level")
    assert "tank-1.level = 4.8 while tank-1.high_level = false" in finding.description
    assert "level-vs-switch" in finding.description
    assert "a level above 4.6 m has the high-level switch on" in finding.description
    assert finding.detail == {
        "checks": [
            {
                "id": "level-vs-switch",
                "when": "tank-1.level > 4.6",
                "require": "tank-1.high_level == true",
                "when_value": 4.8,
                "require_value": False,
            }
        ]
    }
    assert report.health["tank-1"] == "degraded"
    # the switch on agrees with the level; reported as 0/1 it is judged the same way
    engine = engine_for(plausible)
    assert implausible(engine.evaluate(tank_state(now, 4.8, True), now)) == []
    assert implausible(engine.evaluate(tank_state(now, 4.8, 1), now)) == []
    assert len(implausible(engine.evaluate(tank_state(now, 4.8, 0), now))) == 1


def test_a_switch_on_while_the_level_is_low_contradicts(plausible: HubConfig) -> None:
    now = T0 + 1000
    (finding,) = implausible(engine_for(plausible).evaluate(tank_state(now, 2.0, True), now))
    assert (finding.entity, finding.attribute) == ("tank-1", "high_level")
    assert "switch-vs-level" in finding.description
    assert finding.detail["checks"][0]["require_value"] == 2.0


def test_a_cross_check_needs_fresh_good_readings_of_both_points(plausible: HubConfig) -> None:
    now = T0 + 200_000
    engine = engine_for(plausible)
    state = tank_state(now, 4.8, False)
    # the switch has no interval: stale after default_interval_s (30) x stale_factor (3)
    old = now - 91_000
    state.current[("tank-1", "high_level")] = CurrentValue(False, old, 0, "gw-01", now, old)
    report = engine.evaluate(state, now)
    assert ("temporal.sensor_stale", "tank-1", "high_level") in rules(report)
    assert implausible(report) == []
    state.current[("tank-1", "high_level")] = CurrentValue(False, now, 0, "gw-01", now, old)
    assert len(implausible(engine.evaluate(state, now))) == 1
    assert implausible(engine.evaluate(tank_state(now, 4.8, False, quality=1), now)) == []


def test_range_and_cross_check_on_one_attribute_make_one_finding(plausible: HubConfig) -> None:
    """The 5 m tank that read 7.9 m with its high-level switch off."""
    engine = engine_for(plausible)
    now = T0 + 1000
    (finding,) = implausible(engine.evaluate(tank_state(now, 7.9, False), now))
    assert set(finding.detail) == {"range", "checks"}
    assert "physically impossible" in finding.description
    assert "level-vs-switch" in finding.description
    # it keeps its first detection time and clears when the readings agree again
    (later,) = implausible(engine.evaluate(tank_state(now + 500, 7.9, False), now + 500))
    assert later.since_ms == now
    assert implausible(engine.evaluate(tank_state(now + 600, 2.0, False), now + 600)) == []
