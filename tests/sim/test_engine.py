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
