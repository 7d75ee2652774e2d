"""The sans-I/O simulation: closed-loop physics, determinism, writes and value faults."""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest
from support.sim import WATER_PLANT

from fieldtwin.sim.engine import AppliedWrite, FaultEvent, Simulation, replay
from fieldtwin.sim.errors import FaultError, WriteRejected
from fieldtwin.sim.faults import FaultRequest
from fieldtwin.sim.physics import saturation_pressure_bar
from fieldtwin.sim.scenario import Scenario, load_scenario


@pytest.fixture(scope="module")
def plant() -> Scenario:
    return load_scenario(WATER_PLANT)


def run(sim: Simulation, seconds: float) -> None:
    for _ in range(round(seconds / sim.dt)):
        sim.step()


def test_initial_state_is_settled(plant: Scenario) -> None:
    sim = Simulation(plant)
    # Valve flow, tank outflow and the flow meter agree from tick 0 on.
    flow = sim.true_value("flowmeter-1.flow")
    assert flow == pytest.approx(25.0 * 0.5 * 2.5**0.5)
    assert sim.plant.state["tank-1.outflow"] == pytest.approx(flow)
    assert sim.true_value("pt-1.pressure") == pytest.approx(2.5 * 0.0981 + 3.0 * 0.25)
    assert sim.true_value("boiler-1.temperature") == pytest.approx(20.0 + 3.0 * 30.0)


def test_pump_speed_moves_the_tank_level(plant: Scenario) -> None:
    sim = Simulation(plant)
    start = sim.true_value("tank-1.level")
    sim.request_write("pump-1.speed_sp", 1800.0)
    run(sim, 3.0)
    assert 900 < sim.true_value("pump-1.speed") < 1800  # first-order lag, not a jump
    run(sim, 60.0)
    assert sim.true_value("pump-1.speed") == pytest.approx(1800.0, abs=1.0)
    risen = sim.true_value("tank-1.level")
    assert risen > start + 0.2
    # level integrates (inflow - outflow) / area
    assert sim.true_value("pump-1.motor_current") == pytest.approx(15.0, abs=0.1)
    sim.request_write("pump-1.running", 0.0)
    run(sim, 60.0)
    assert sim.true_value("pump-1.speed") == pytest.approx(0.0, abs=1.0)
    assert sim.true_value("pump-1.motor_current") == 0.0
    assert sim.true_value("tank-1.level") < risen - 0.2
    assert sim.true_value("flowmeter-1.total") > 0.0


def test_closing_the_valve_stops_the_outflow(plant: Scenario) -> None:
    sim = Simulation(plant)
    sim.request_write("valve-1.position", 0.0)
    run(sim, 1.0)
    assert sim.true_value("flowmeter-1.flow") == 0.0
    before = sim.true_value("tank-1.level")
    run(sim, 30.0)
    expected_rise = 20.0 / 3600.0 / 1.0 * 30.0  # 20 m3/h into 1 m2
    assert sim.true_value("tank-1.level") - before == pytest.approx(expected_rise, rel=0.05)


def test_tank_level_is_clamped(plant: Scenario) -> None:
    sim = Simulation(plant)
    sim.request_write("valve-1.position", 0.0)
    sim.request_write("pump-1.speed_sp", 1800.0)
    run(sim, 900.0)
    assert sim.true_value("tank-1.level") == 5.0
    assert sim.value("tank-1.high_level") == 1.0


def test_heater_drives_temperature_with_first_order_lag(plant: Scenario) -> None:
    sim = Simulation(plant)
    t0 = sim.true_value("boiler-1.temperature")
    sim.request_write("boiler-1.heater_power_sp", 50.0)
    run(sim, 120.0)  # one time constant (plus the 2 s heater lag)
    step = 3.0 * 20.0
    rise = sim.true_value("boiler-1.temperature") - t0
    assert 0.55 * step < rise < 0.64 * step
    assert sim.true_value("boiler-1.heater_power") == pytest.approx(50.0, abs=0.01)
    assert sim.true_value("boiler-1.pressure") == pytest.approx(
        saturation_pressure_bar(sim.true_value("boiler-1.temperature"))
    )
    assert saturation_pressure_bar(100.0) == pytest.approx(1.0133, abs=0.001)


def test_ambient_varies_and_stays_physical(plant: Scenario) -> None:
    sim = Simulation(replace(plant, tick=1.0))  # hours of weather; 1 s steps are plenty
    seen = []
    for _ in range(200):
        run(sim, 60.0)
        seen.append((sim.true_value("ambient-1.temperature"), sim.true_value("ambient-1.humidity")))
    temps = [t for t, _ in seen]
    assert max(temps) - min(temps) > 5.0  # the diurnal sine over 3+ hours
    assert all(0.0 <= h <= 100.0 for _, h in seen)


def test_same_seed_same_truth_and_other_seed_differs(plant: Scenario) -> None:
    writes = [AppliedWrite(50, "pump-1.speed_sp", "pump-1.speed_sp", 1500.0)]
    first = replay(plant, 600, writes=writes)
    second = replay(plant, 600, writes=writes)
    assert first == second
    other = replay(plant, 600, seed=2, writes=writes)
    assert other != first
    # Faults change what sensors report, never the process.
    drift = FaultEvent(
        FaultRequest("drift", "pump-station", "tank-1.level", None, {"rate": 1.0}), 10, None
    )
    assert replay(plant, 600, writes=writes, faults=[drift]) == first


def test_noise_is_seeded_per_point(plant: Scenario) -> None:
    a, b = Simulation(plant), Simulation(plant)
    run(a, 10.0)
    run(b, 10.0)
    assert a.value("tank-1.level") == b.value("tank-1.level")
    assert a.value("tank-1.level") != a.true_value("tank-1.level")
    # the mirror repeats the reading exactly
    assert a.value("tank-1.level_raw") == a.value("tank-1.level")


def test_writes_are_checked_and_applied_at_the_next_tick(plant: Scenario) -> None:
    sim = Simulation(plant)
    with pytest.raises(WriteRejected, match=r"outside 0\.\.1800"):
        sim.request_write("pump-1.speed_sp", 2000.0)
    with pytest.raises(WriteRejected, match="read-only"):
        sim.request_write("tank-1.level", 1.0)
    with pytest.raises(WriteRejected, match="finite"):
        sim.request_write("valve-1.position", float("nan"))
    write = sim.request_write("valve-1.position", 20.0)
    assert write.tick == 1
    assert sim.value("valve-1.position") == 20.0  # shows at once, like a PLC register
    assert sim.plant.state["valve-1.position"] == 50.0  # the process sees it next tick
    result = sim.step()
    assert [w.point for w in result.writes] == ["valve-1.position"]
    assert sim.plant.state["valve-1.position"] == 20.0


def test_value_faults_change_reports_only(plant: Scenario) -> None:
    sim = Simulation(plant)
    sim.request_write("pump-1.speed_sp", 1800.0)
    run(sim, 5.0)
    stuck = sim.inject(FaultRequest("stuck", point="tank-1.level"))
    frozen = sim.value("tank-1.level")
    run(sim, 30.0)
    assert sim.value("tank-1.level") == frozen
    assert sim.true_value("tank-1.level") > frozen + 0.05
    sim.clear(stuck.id)
    sim.step()
    assert sim.value("tank-1.level") != frozen

    drift = sim.inject(FaultRequest("drift", point="pt-1.pressure", params={"rate": 0.1}), 10.0)
    run(sim, 5.0)
    bias = sim.value("pt-1.pressure") - sim.true_value("pt-1.pressure")
    assert bias == pytest.approx(0.5 - 0.1 * 0.1, abs=0.03)
    run(sim, 10.0)
    assert drift.status == "ended"
    assert abs(sim.value("pt-1.pressure") - sim.true_value("pt-1.pressure")) < 0.03

    sim.inject(FaultRequest("spike", point="boiler-1.temperature", params={"magnitude": 40.0}))
    sim.step()
    assert sim.value("boiler-1.temperature") - sim.true_value("boiler-1.temperature") > 39.0
    sim.step()
    assert abs(sim.value("boiler-1.temperature") - sim.true_value("boiler-1.temperature")) < 1.0

    sim.inject(FaultRequest("noise", point="flowmeter-1.flow", params={"sigma": 5.0}), 20.0)
    errors = []
    for _ in range(100):
        sim.step()
        errors.append(sim.value("flowmeter-1.flow") - sim.true_value("flowmeter-1.flow"))
    assert statistics.pstdev(errors) > 2.0


def test_link_faults_are_scoped(plant: Scenario) -> None:
    sim = Simulation(plant)
    sim.inject(FaultRequest("dropout", device="field-bus", unit_id=2))
    sim.inject(FaultRequest("exception", point="pump-1.speed", params={"code": 6}))
    sim.step()
    book = sim.faults
    assert book.link("field-bus", 2).dropout
    assert not book.link("field-bus", 1).dropout
    assert book.point_exception("pump-1.speed") == 6
    assert book.link("pump-station", 1).exception is None
    with pytest.raises(FaultError, match="corrupt cannot happen on a opcua device"):
        sim.inject(FaultRequest("corrupt", device="boiler"))
    with pytest.raises(FaultError, match="status"):
        sim.inject(FaultRequest("bad_status", device="boiler", params={"status": "GoodEnough"}))


# -- actuator faults: what a write does -----------------------------------------------------


def test_ignore_writes_keeps_the_old_value_and_records_the_write(plant: Scenario) -> None:
    sim = Simulation(plant)
    flow = sim.true_value("flowmeter-1.flow")
    fault = sim.inject(FaultRequest("ignore_writes", point="valve-1.position"))
    write = sim.request_write("valve-1.position", 20.0, device="pump-station", protocol="x")
    assert (write.outcome, write.fault_id) == ("ignored", fault.id)
    assert sim.value("valve-1.position") == 50.0  # the register keeps its value at once
    [applied] = sim.step().writes
    assert (applied.value, applied.before, applied.result) == (20.0, 50.0, 50.0)
    assert (applied.outcome, applied.fault_id, applied.device) == (
        "ignored",
        fault.id,
        "pump-station",
    )
    run(sim, 30.0)
    assert sim.true_value("valve-1.position") == 50.0
    # the process did not move: the outflow only follows the (unchanged) level
    assert sim.true_value("flowmeter-1.flow") == pytest.approx(flow, rel=0.02)
    sim.clear(fault.id)
    sim.step()
    assert sim.request_write("valve-1.position", 20.0).outcome == "applied"
    [applied] = sim.step().writes
    assert (applied.before, applied.result, applied.fault_id) == (50.0, 20.0, None)
    assert sim.true_value("valve-1.position") == 20.0


def test_wrong_value_lands_on_the_other_value(plant: Scenario) -> None:
    sim = Simulation(plant)
    sim.inject(FaultRequest("wrong_value", point="pump-1.speed_sp", params={"offset": -300.0}))
    write = sim.request_write("pump-1.speed_sp", 1500.0)
    assert (write.outcome, write.result) == ("altered", 1200.0)
    assert sim.value("pump-1.speed_sp") == 1200.0  # a read-back straight away tells the truth
    [applied] = sim.step().writes
    assert (applied.value, applied.before, applied.result) == (1500.0, 900.0, 1200.0)
    run(sim, 60.0)
    assert sim.true_value("pump-1.speed") == pytest.approx(1200.0, abs=1.0)
    # The actuator's travel ends at its physical limits.
    assert sim.request_write("pump-1.speed_sp", 100.0).result == 0.0

    fixed = Simulation(plant)
    fixed.inject(FaultRequest("wrong_value", point="valve-1.position", params={"value": 10.0}))
    fixed.inject(FaultRequest("wrong_value", point="pump-1.running", params={"value": 0.0}))
    assert fixed.request_write("valve-1.position", 80.0).result == 10.0
    assert fixed.request_write("pump-1.running", 1.0).result == 0.0
    fixed.step()
    assert fixed.true_value("valve-1.position") == 10.0
    assert fixed.true_value("pump-1.running") == 0.0


def test_actuator_fault_with_a_count_lets_later_writes_through(plant: Scenario) -> None:
    sim = Simulation(plant)
    fault = sim.inject(
        FaultRequest("wrong_value", point="pump-1.speed_sp", params={"value": 600.0, "count": 1})
    )
    # The fault starts at the next tick; a write arriving now takes effect at that tick.
    assert sim.request_write("pump-1.speed_sp", 1200.0).outcome == "altered"
    assert sim.request_write("pump-1.speed_sp", 900.0).outcome == "applied"  # a rollback
    writes = sim.step().writes
    assert [(w.value, w.result, w.outcome) for w in writes] == [
        (1200.0, 600.0, "altered"),
        (900.0, 900.0, "applied"),
    ]
    assert sim.true_value("pump-1.speed_sp") == 900.0
    sim.step()
    assert (fault.status, fault.writes_affected) == ("ended", 1)
    assert fault.end_tick == fault.start_tick + 1
    assert fault.to_json(sim.dt)["writes_affected"] == 1


def test_newest_actuator_fault_decides(plant: Scenario) -> None:
    sim = Simulation(plant)
    sim.inject(FaultRequest("ignore_writes", point="valve-1.position"))
    newer = sim.inject(
        FaultRequest("wrong_value", point="valve-1.position", params={"offset": 5.0})
    )
    write = sim.request_write("valve-1.position", 30.0)
    assert (write.outcome, write.result, write.fault_id) == ("altered", 35.0, newer.id)
    sim.clear(newer.id)
    sim.step()
    assert sim.request_write("valve-1.position", 30.0).outcome == "ignored"


# -- process faults: the plant itself changes ---------------------------------------------


def _quiet_tank(plant: Scenario) -> Simulation:
    """Pump stopped, valve shut: nothing but a leak can move the level."""
    sim = Simulation(plant)
    sim.request_write("pump-1.running", 0.0)
    sim.request_write("valve-1.position", 0.0)
    run(sim, 120.0)  # the pump spins down (3 s time constant)
    return sim


def test_leak_drains_the_tank_by_torricelli(plant: Scenario) -> None:
    healthy, leaking = _quiet_tank(plant), _quiet_tank(plant)
    h0 = leaking.true_value("tank-1.level")
    cv = 3.0
    leaking.inject(FaultRequest("leak", component="tank-1", params={"cv": cv}))
    seconds = 600.0
    run(healthy, seconds)
    run(leaking, seconds)
    assert healthy.true_value("tank-1.level") == pytest.approx(h0, abs=1e-6)
    # dh/dt = -cv·sqrt(h)/3600/area  =>  sqrt(h) = sqrt(h0) - cv·t/7200/area
    expected = (h0**0.5 - cv * seconds / 7200.0 / 1.0) ** 2
    assert leaking.true_value("tank-1.level") == pytest.approx(expected, abs=2e-4)
    assert leaking.plant.state["tank-1.leak"] == pytest.approx(
        cv * leaking.true_value("tank-1.level") ** 0.5, rel=1e-3
    )
    # every sensor stays truthful: the flow meter sees no outflow, the level is reported
    assert leaking.true_value("flowmeter-1.flow") == 0.0
    assert abs(leaking.value("tank-1.level") - leaking.true_value("tank-1.level")) < 0.02


def test_leak_lowers_the_level_against_the_healthy_run(plant: Scenario) -> None:
    healthy, leaking = Simulation(plant), Simulation(plant)
    leak = leaking.inject(FaultRequest("leak", component="tank-1", params={"cv": 2.0}), 60.0)
    leaked_m = 0.0  # the leak's volume over the tank's area
    for _ in range(round(60.0 / leaking.dt)):
        healthy.step()
        before = leaking.true_value("tank-1.level")
        leaking.step()
        state = leaking.plant.state
        # exact water balance of the step: (in - out - leak) / area
        balance = (state["tank-1.inflow"] - state["tank-1.outflow"] - state["tank-1.leak"]) * (
            leaking.dt / 3600.0
        )
        assert leaking.true_value("tank-1.level") - before == pytest.approx(balance, abs=1e-12)
        leaked_m += state["tank-1.leak"] * leaking.dt / 3600.0
    drop = healthy.true_value("tank-1.level") - leaking.true_value("tank-1.level")
    assert leaked_m == pytest.approx(2.0 * 2.5**0.5 * 60.0 / 3600.0, rel=0.02)
    # a lower level also lets a little less out through the valve, so the drop is a few
    # per cent less than the leaked volume
    assert 0.95 * leaked_m < drop < leaked_m
    run(leaking, 1.0)
    assert leak.status == "ended"
    assert leaking.plant.state["tank-1.leak"] == 0.0
    # Process faults change the truth; the healthy run's sensors and pump are untouched.
    assert healthy.true_value("pump-1.speed") == leaking.true_value("pump-1.speed")


def test_fouled_heater_heats_slower_and_settles_lower(plant: Scenario) -> None:
    coarse = replace(plant, tick=1.0)  # minutes of heating; 1 s steps are exact for a lag
    healthy, fouled = Simulation(coarse), Simulation(coarse)
    efficiency = 0.6
    fouled.inject(FaultRequest("fouling", component="boiler-1", params={"efficiency": efficiency}))
    run(healthy, 3000.0)
    run(fouled, 3000.0)  # 25 time constants: both at their steady states
    assert healthy.true_value("boiler-1.temperature") == pytest.approx(110.0, abs=1e-6)
    assert fouled.true_value("boiler-1.temperature") == pytest.approx(20.0 + 3 * 18.0, abs=1e-6)
    assert fouled.plant.state["boiler-1.heat_input"] == pytest.approx(18.0)
    assert fouled.true_value("boiler-1.heater_power") == 30.0  # the power reading stays true
    starts = [sim.true_value("boiler-1.temperature") for sim in (healthy, fouled)]
    for sim in (healthy, fouled):
        sim.request_write("boiler-1.heater_power_sp", 50.0)
    for seconds in (30.0, 60.0, 60.0, 240.0):
        run(healthy, seconds)
        run(fouled, seconds)
        rises = [
            sim.true_value("boiler-1.temperature") - t0
            for sim, t0 in zip((healthy, fouled), starts, strict=True)
        ]
        # A linear plant: the fouled rise is the healthy rise scaled by the efficiency.
        assert rises[1] == pytest.approx(efficiency * rises[0], rel=1e-9)
        assert rises[1] < rises[0]


def test_process_and_actuator_faults_replay_from_recorded_results(plant: Scenario) -> None:
    sim = Simulation(plant)
    leak = sim.inject(FaultRequest("leak", component="tank-1", params={"cv": 4.0}), 20.0)
    foul = sim.inject(FaultRequest("fouling", component="boiler-1", params={"efficiency": 0.3}))
    wrong = sim.inject(
        FaultRequest("wrong_value", point="pump-1.speed_sp", params={"offset": 200.0})
    )
    rows = [(0, name, value) for name, value in sim.truth_rows()]
    recorded: list[AppliedWrite] = []
    for tick in range(1, 601):
        if tick == 100:
            sim.request_write("pump-1.speed_sp", 1500.0)  # altered: 1700
        if tick == 200:
            sim.clear(wrong.id)
            sim.inject(FaultRequest("ignore_writes", point="boiler-1.heater_power_sp"))
        if tick == 300:
            sim.request_write("boiler-1.heater_power_sp", 10.0)  # ignored
        result = sim.step()
        recorded += [
            AppliedWrite(w.tick, w.point, w.variable, w.target) for w in result.writes if w.moves
        ]
        rows.extend((sim.tick, name, value) for name, value in sim.truth_rows())
    assert [(w.point, w.value) for w in recorded] == [("pump-1.speed_sp", 1700.0)]
    events = [
        FaultEvent(f.request, f.start_tick, f.end_tick)
        for f in sim.faults.faults.values()
        if f.status != "cancelled"
    ]
    assert [e.request.kind for e in events] == ["leak", "fouling", "wrong_value", "ignore_writes"]
    assert replay(plant, 600, writes=recorded, faults=events) == rows
    # and the process faults did change the truth
    assert replay(plant, 600, writes=recorded) != rows
    assert leak.status == "ended"
    assert foul.status == "active"
