"""Learned dynamics, pure: structure identification, intervals, what-if chains, limits,
model residuals. Synthetic plants with known parameters and seeded noise."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldtwin.hub import models
from fieldtwin.hub.models import Model, ModelError

STEP_MS = 1000


def steps(n: int, levels: list[float], every: int) -> np.ndarray:
    """A setpoint schedule cycling through ``levels`` every ``every`` steps."""
    return np.asarray([levels[(i // every) % len(levels)] for i in range(n)], dtype=float)


def integrating(
    n: int = 1500, gain: float = 2e-5, noise: float = 0.002, seed: int = 1, dead: int = 0
):
    """A tank: the level moves by ``gain`` per rpm above 900 each step, ``dead`` steps
    after the speed changes."""
    rng = np.random.default_rng(seed)
    u = steps(n, [900, 1200, 700, 1000, 800], 150)
    y = np.empty(n)
    y[0] = 2.0
    for t in range(n - 1):
        y[t + 1] = y[t] + gain * (u[max(t - dead, 0)] - 900)
    return y + rng.normal(0, noise, n), u


def first_order(
    n: int = 2000,
    tau: float = 40.0,
    gain: float = 3.0,
    dead: int = 0,
    seed: int = 2,
    noise: float = 0.05,
):
    """A boiler: ``T → 20 + gain·P`` with time constant ``tau`` s and ``dead`` s delay."""
    rng = np.random.default_rng(seed)
    u = steps(n, [30, 10, 40, 20], 200)
    a = math.exp(-1 / tau)
    y = np.empty(n)
    y[0] = 20 + gain * u[0]
    for t in range(n - 1):
        drive = u[max(t - dead, 0)]
        y[t + 1] = a * y[t] + (1 - a) * (20 + gain * drive)
    return y + rng.normal(0, noise, n), u


def fit(y: np.ndarray, u: np.ndarray, horizon: int = 120) -> Model:
    return models.fit(
        "x.y", ["x.u"], y, u[None, :], step_ms=STEP_MS, horizon_steps=horizon, now_ms=0
    )


IDENTIFIABLE_DEAD_TIMES = [d for d in models.DEAD_TIMES if d <= 13]
"""Dead times on the fit's grid, short beside the schedules' holds (150-200 steps)."""


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(
    gain=st.floats(5e-6, 1e-4),
    dead=st.sampled_from(IDENTIFIABLE_DEAD_TIMES),
    noise_share=st.floats(0.0, 0.05),
    seed=st.integers(0, 2**31),
)
def test_an_integrating_plant_is_identified_with_its_gain_and_dead_time(
    gain: float, dead: int, noise_share: float, seed: int
) -> None:
    """Any tank gain, dead time on the grid, and sensor noise up to 5 % of how far the
    level moves in one hold of the speed (150 steps at the smallest step, 100 rpm):
    the structure is integrating, the gain within 3 % plus a share that grows with the
    noise, the dead time exact while the noise is under 1 % (beyond, the noise exceeds
    what the level moves in a step or two, and the delay is found within one position
    of the fit's dead-time grid)."""
    noise = noise_share * gain * 100 * 150
    y, u = integrating(gain=gain, noise=noise, seed=seed, dead=dead)
    model = fit(y, u)
    assert model.structure == "integrating"
    grid = models.DEAD_TIMES
    assert abs(grid.index(model.dead_time) - grid.index(dead)) <= (noise_share > 0.01)
    tolerance = 0.03 + 2 * noise_share
    assert model.b[0][0] == pytest.approx(gain, rel=tolerance)
    # the outflow balances 900 rpm: c = -900·gain
    assert -model.c / model.b[0][0] == pytest.approx(900, rel=tolerance)
    assert model.steady_state_gains is None  # an integrating plant does not settle


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(
    tau=st.floats(3.0, 60.0),
    gain=st.floats(0.5, 5.0),
    dead=st.sampled_from(IDENTIFIABLE_DEAD_TIMES),
    noise_share=st.floats(0.0, 0.01),
    seed=st.integers(0, 2**31),
)
def test_a_first_order_plant_gets_its_gain_time_constant_and_dead_time(
    tau: float, gain: float, dead: int, noise_share: float, seed: int
) -> None:
    """Any time constant up to 60 s (the power holds 200 s: the response settles
    within each hold), gain, dead time on the grid and sensor noise up to 1 % of the
    response's span: the structure settles (first order, or ARX when its second pole
    filters the noise at the forecast's origin better), and the gain and time constant
    it implies are the plant's, within 3 % plus a share that grows with the noise."""
    span = gain * 30  # the power moves between 10 and 40
    y, u = first_order(tau=tau, gain=gain, dead=dead, seed=seed, noise=noise_share * span)
    model = fit(y, u)
    assert model.structure in ("first_order", "arx")
    tolerance = 0.03 + 10 * noise_share
    assert model.steady_state_gains is not None
    assert model.steady_state_gains[0] == pytest.approx(gain, rel=tolerance)
    assert model.time_constant_s == pytest.approx(tau, rel=tolerance)
    # ARX's second input lag can carry one step of the delay
    assert dead - 1 <= model.dead_time <= dead


def test_a_structure_that_fails_on_all_the_history_keeps_its_judged_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The structure chosen on the older part of a long history can fail when refitted
    on all of it (the instrumented first-order fit refuses a time constant longer than
    the history): the fit judged on the older part is kept, not "no model" (the
    prediction bench lost 6 of 240 forecasts to this). Which data make the instrument
    fail is not reproducible on purpose, so the full-history solve is made to fail."""
    y, u = first_order(n=2000)
    real = models._solve

    def fail_on_everything(y_, u_, cand, rows):  # type: ignore[no-untyped-def]
        return None if len(rows) > 1900 else real(y_, u_, cand, rows)

    monkeypatch.setattr(models, "_solve", fail_on_everything)
    model = fit(y, u)
    assert model.structure in ("first_order", "arx")
    assert model.time_constant_s == pytest.approx(40.0, rel=0.1)
    assert model.horizon_sigma  # calibrated as usual


def test_without_inputs_a_trend_or_mean_reversion_is_fitted() -> None:
    rng = np.random.default_rng(3)
    y = 10 + 0.001 * np.arange(600) + rng.normal(0, 0.01, 600)
    model = models.fit(
        "x.y", [], y, np.zeros((0, 600)), step_ms=STEP_MS, horizon_steps=60, now_ms=0
    )
    assert model.structure in ("trend", "first_order")
    assert model.inputs == ()
    trajectory = models.simulate({"x.y": model}, {"x.y": y}, 60, start_ms=0, step_ms=STEP_MS)["x.y"]
    assert trajectory.mean[-1] == pytest.approx(y[-20:].mean() + 0.06, abs=0.05)


def test_too_little_history_is_a_clear_error() -> None:
    y, u = integrating(n=20)
    with pytest.raises(ModelError, match="a model needs at least"):
        fit(y, u)


def test_gaps_are_skipped_not_bridged() -> None:
    y, u = integrating()
    y[400:460] = np.nan  # the gateway was away for a minute
    model = fit(y, u)
    assert model.structure == "integrating"
    assert model.samples == len(y) - 60
    assert model.b[0][0] == pytest.approx(2e-5, rel=0.05)


def test_intervals_cover_what_a_held_out_future_does() -> None:
    """Fit on one noise realisation, judge the 95 % band on another: about 95 % inside."""
    y, u = first_order(seed=5)
    model = fit(y, u, horizon=60)
    y2, _ = first_order(seed=6)
    origins = np.arange(100, len(y2) - 61, 7)
    forecast = models.free_run(model, y2, u[None, :], origins, 60)
    actual = np.stack([y2[origins + h + 1] for h in range(60)], axis=1)
    sigma = np.asarray([model.sigma_at(h + 1) for h in range(60)])
    inside = np.abs(forecast - actual) <= models.Z95 * sigma
    assert 0.9 <= inside.mean() <= 0.995


def random_steps(rng: np.random.Generator, n: int, holds: tuple[int, int]) -> np.ndarray:
    """An operator's setpoint: a new value in 10–40 every ``holds`` steps (uniform)."""
    u = np.empty(n)
    t = 0
    while t < n:
        hold = int(rng.integers(*holds))
        u[t : t + hold] = round(float(rng.uniform(10, 40)), 1)
        t += hold
    return u


def boiler(u: np.ndarray, tau: float = 40.0, gain: float = 3.0) -> np.ndarray:
    a = math.exp(-1 / tau)
    y = np.empty(len(u))
    y[0] = 20 + gain * u[0]
    for t in range(len(u) - 1):
        y[t + 1] = a * y[t] + (1 - a) * (20 + gain * u[t])
    return y


def test_how_an_input_changed_is_learned_from_its_history() -> None:
    u = steps(1000, [900, 1200, 700, 1000], 100)
    found = models.learn_changes(u)
    assert found.rate == pytest.approx(9 / 999)
    assert found.holds == (100,) * 8  # the first and the present hold are incomplete
    assert found.levels == (900, 1200, 700, 1000) * 2 + (900, 1200)
    assert found.age(u) == 99
    assert found.age(u[:-50]) == 49
    # a measured input: noise on every report (held between reports) is no change, a
    # step far beyond it is
    rng = np.random.default_rng(4)
    measured = np.repeat(50 + rng.normal(0, 0.2, 500), 2)
    assert models.learn_changes(measured).rate == 0
    measured[600:] += 10
    assert models.learn_changes(measured).rate == pytest.approx(1 / 999)
    switch = models.learn_changes(steps(600, [0, 1], 200))
    assert switch.bandwidth == 0  # an on/off input takes its two values, nothing between


def test_a_hold_across_unknown_history_is_not_counted() -> None:
    """History a finding flagged (or none at all) hides what the input did: a hold
    that spans it is not one, nor the values either side one level."""
    u = steps(1000, [900, 1200, 700, 1000], 100)
    u[430:470] = np.nan  # inside the 900 rpm hold from 400 to 500
    found = models.learn_changes(u)
    assert found.holds == (100,) * 7  # the hold 400–500 spans the gap: out
    assert found.levels[:6] == (900, 1200, 700, 1000, 900, 900)
    assert found.rate == pytest.approx(9 / (999 - 41))


def test_future_input_changes_follow_the_holds_seen() -> None:
    """Every value was held 100 steps: 30 steps into the present hold, the next change
    comes 70 steps ahead in most futures; new values are ones the input took."""
    u = steps(2000, [10, 20, 30, 40, 25], 100)
    record = models.learn_changes(u)
    futures = record.sample(25.0, 30, 150, np.random.default_rng(0), 400)
    assert futures.shape == (400, 150)
    first = np.argmax(futures != 25.0, axis=1)
    assert np.mean(first == 69) > 0.85  # step 70 ahead is column 69
    assert np.all(futures[:, :69][first == 69] == 25.0)
    assert futures.min() > 10 - 4 * record.bandwidth
    assert futures.max() < 40 + 4 * record.bandwidth
    clipped = record.sample(25.0, 30, 150, np.random.default_rng(0), 400, (15.0, 35.0))
    assert clipped.min() >= 15
    assert clipped.max() <= 35
    still = models.learn_changes(np.full(500, 3.0))
    assert np.all(still.sample(3.0, 499, 50, np.random.default_rng(0), 10) == 3.0)


def test_how_often_a_setpoint_goes_to_a_value_not_seen_before_is_learned() -> None:
    """Laplace's rule over the changes: (changes to a new value + 1) / (changes + 2)."""
    young = models.learn_changes(steps(700, [800, 850, 900, 820, 870, 900], 100))
    assert young.levels == (800, 850, 900, 820, 870, 900, 800)
    assert young.unseen_share == pytest.approx((4 + 1) / (6 + 2))  # 900, 800 seen before
    cycling = models.learn_changes(steps(20000, [800, 850, 900, 820, 870, 900], 100))
    assert cycling.unseen_share == pytest.approx((4 + 1) / (199 + 2))
    switch = models.learn_changes(steps(2000, [0, 1], 100))
    assert switch.unseen_share == pytest.approx(2 / 21)
    rng = np.random.default_rng(5)
    fresh = models.learn_changes(steps(2000, list(rng.uniform(600, 1200, 20).round()), 100))
    assert fresh.unseen_share == pytest.approx((19 + 1) / (19 + 2))
    assert models.learn_changes(np.full(100, 3.0)).unseen_share == 0.5


def test_setpoints_not_seen_before_are_drawn_from_the_declared_range() -> None:
    """Six values seen, all 800-900 rpm: without the schema's range the futures never
    leave them; with it (0-1800 rpm, 600 rpm per command) a change goes where one
    command can reach as often as the history's changes went to new values, never
    beyond; once the history shows the setpoint cycling through known values, hardly
    ever."""
    record = models.learn_changes(steps(700, [800, 850, 900, 820, 870, 900], 100))
    rng = np.random.default_rng(3)
    seen = record.sample(900.0, 10, 120, rng, 4000)[:, -1]
    setting = models.SettingRange(0.0, 1800.0, 600.0)
    ranged = record.sample(900.0, 10, 120, np.random.default_rng(3), 4000, (0, 1800), setting)
    ends = ranged[:, -1]
    margin = 4 * record.bandwidth
    assert seen.min() > 800 - margin
    assert seen.max() < 900 + margin
    once = np.count_nonzero(np.diff(ranged, axis=1), axis=1) == 1
    assert once.sum() > 1000
    outside = (ends[once] > 900 + margin) | (ends[once] < 800 - margin)
    # a uniform draw over 300-1500 rpm lands outside the seen values' kernel ~85 % of
    # the time
    share = record.unseen_share
    assert 0.7 * share < np.mean(outside) < 0.95 * share
    assert ends[once].min() >= 300 - 1e-9
    assert ends[once].max() <= 1500 + 1e-9
    assert ends.min() >= 0
    assert ends.max() <= 1800
    cycling = models.learn_changes(steps(20000, [800, 850, 900, 820, 870, 900], 100))
    far = cycling.sample(900.0, 10, 120, np.random.default_rng(3), 4000, (0, 1800), setting)
    assert np.mean((far[:, -1] > 900 + margin) | (far[:, -1] < 800 - margin)) < 0.03


def judge_moving_setpoint(seed: int, holds: tuple[int, int]) -> dict[str, float]:
    """A boiler whose operator moves the power setpoint at random: fitted on the first
    2500 s, forecast from origins in the next 1500 s (new random steps nobody could know
    at the origin), judged against the noiseless truth at 10, 60 and 120 s ahead."""
    rng = np.random.default_rng(seed)
    u = random_steps(rng, 4000, holds)
    truth = boiler(u)
    y = truth + rng.normal(0, 0.05, len(u))
    model = fit(y[:2500], u[:2500], horizon=120)
    inside95, inside80, held_inside, errors, held_errors = [], [], [], [], []
    for origin in range(2600, 3870, 20):
        history = {"x.y": y[origin - 400 : origin + 1], "x.u": u[origin - 400 : origin + 1]}
        trajectory = models.simulate({"x.y": model}, history, 120, start_ms=0, step_ms=STEP_MS)[
            "x.y"
        ]
        for h in (10, 60, 120):
            actual = truth[origin + h]
            low, high = trajectory.interval(h, 0.95)
            inside95.append(low <= actual <= high)
            low, high = trajectory.interval(h, 0.8)
            inside80.append(low <= actual <= high)
            held = trajectory.held[h - 1]
            held_inside.append(abs(held - actual) <= models.Z95 * model.sigma_at(h))
            errors.append(abs(trajectory.mean[h - 1] - actual))
            held_errors.append(abs(held - actual))
    return {
        "coverage_95": float(np.mean(inside95)),
        "coverage_80": float(np.mean(inside80)),
        "held_coverage_95": float(np.mean(held_inside)),
        "mae": float(np.mean(errors)),
        "held_mae": float(np.mean(held_errors)),
    }


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.integers(0, 2**31), st.sampled_from([(60, 240), (150, 300), (300, 900)]))
def test_intervals_cover_the_future_of_a_plant_whose_setpoint_moves(
    seed: int, holds: tuple[int, int]
) -> None:
    """The 95 % band holds most of the truth on any one plant (~190 judged forecasts
    from ~60 overlapping origins, so one plant's coverage varies: over 36 plants it
    ranged 0.75-1.0, lowest where the history held only a few slow setpoint changes to
    learn from; the average is checked below at 92-99 %); the band of the held-inputs
    forecast alone covers less. Derandomized: a statistical bound must not make the
    suite flaky."""
    found = judge_moving_setpoint(seed, holds)
    assert 0.7 <= found["coverage_95"] <= 1.0
    assert 0.55 <= found["coverage_80"] <= 0.99
    assert found["held_coverage_95"] <= found["coverage_95"]


def test_the_median_of_the_futures_misses_less_than_holding_the_inputs() -> None:
    """Over several plants with a moving setpoint, the 95 % band covers 92–99 % on
    average, and the forecast's median is nearer the truth than the held-inputs
    trajectory on average (it weighs the changes to come; on one plant it may not)."""
    runs = [judge_moving_setpoint(seed, (150, 300)) for seed in range(4)]
    assert 0.92 <= float(np.mean([r["coverage_95"] for r in runs])) <= 0.99
    assert sum(r["mae"] for r in runs) < sum(r["held_mae"] for r in runs)
    assert max(r["held_coverage_95"] for r in runs) < 0.85


def test_an_overridden_input_does_not_vary_and_the_band_is_calibrated() -> None:
    rng = np.random.default_rng(9)
    u = random_steps(rng, 3000, (150, 300))
    y = boiler(u) + rng.normal(0, 0.05, len(u))
    model = fit(y, u, horizon=60)
    assert len(model.horizon_sigma80) == len(model.horizon_sigma) == 60
    assert all(
        models.Z80 * s80 <= models.Z95 * s95 + 1e-12
        for s80, s95 in zip(model.horizon_sigma80, model.horizon_sigma, strict=True)
    )
    history = {"x.y": y[-400:], "x.u": u[-400:]}
    fixed = models.simulate(
        {"x.y": model}, history, 60, start_ms=0, step_ms=STEP_MS, overrides={"x.u": 25.0}
    )["x.y"]
    assert fixed.samples is None
    assert fixed.mean == fixed.held
    low, high = fixed.interval(60, 0.95)
    assert high - low == pytest.approx(2 * models.Z95 * model.sigma_at(60))
    moving = models.simulate({"x.y": model}, history, 60, start_ms=0, step_ms=STEP_MS)["x.y"]
    assert moving.samples is not None
    assert moving.samples.shape == (models.PATHS, 60)
    again = models.simulate({"x.y": model}, history, 60, start_ms=0, step_ms=STEP_MS)["x.y"]
    assert again == moving  # seeded: the same question, the same answer
    assert Model.from_dict(model.to_dict()) == model


def test_a_late_sample_is_carried_forward_to_the_forecast_times() -> None:
    """The level rises 1 cm a step; its last sample was taken 1.5 steps before the
    forecast's origin (polled, held on the grid): the forecast is of the level at each
    step's time, not of a reading 1.5 steps behind."""
    model = Model(
        target="x.y",
        inputs=("x.u",),
        structure="integrating",
        step_ms=STEP_MS,
        dead_time=0,
        a=(1.0,),
        b=((0.01,),),
        c=0.0,
        r2=1.0,
        sigma=0.001,
        samples=100,
        fitted_ms=0,
        horizon_sigma=(0.001,) * 10,
    )
    history = {"x.y": np.asarray([0.97, 0.98, 0.99, 1.0, 1.0]), "x.u": np.ones(5)}
    plain = models.simulate({"x.y": model}, history, 10, start_ms=0, step_ms=STEP_MS)["x.y"]
    late = models.simulate(
        {"x.y": model}, history, 10, start_ms=0, step_ms=STEP_MS, lag={"x.y": 1.5}
    )["x.y"]
    assert plain.mean == pytest.approx([1.0 + 0.01 * h for h in range(1, 11)])
    assert late.mean == pytest.approx([1.0 + 0.01 * (h + 1.5) for h in range(1, 11)])
    assert late.held == late.mean


def test_a_what_if_runs_through_a_chain_of_models() -> None:
    """speed follows its setpoint, the level integrates speed: set the setpoint, the
    level moves; without the change it does not."""
    n = 800
    sp = steps(n, [900, 1100], 100)
    speed = np.empty(n)
    speed[0] = 900
    for t in range(n - 1):
        speed[t + 1] = speed[t] + (sp[t] - speed[t]) * 0.3
    level = np.empty(n)
    level[0] = 2.0
    for t in range(n - 1):
        level[t + 1] = level[t] + 2e-5 * (speed[t] - 1000)
    speed_model = models.fit(
        "p.speed", ["p.sp"], speed, sp[None, :], step_ms=STEP_MS, horizon_steps=60, now_ms=0
    )
    level_model = models.fit(
        "t.level", ["p.speed"], level, speed[None, :], step_ms=STEP_MS, horizon_steps=60, now_ms=0
    )
    bank = {"p.speed": speed_model, "t.level": level_model}
    history = {"p.sp": sp, "p.speed": speed, "t.level": level}
    base = models.simulate(bank, history, 120, start_ms=0, step_ms=STEP_MS)
    changed = models.simulate(
        bank, history, 120, start_ms=0, step_ms=STEP_MS, overrides={"p.sp": 1400.0}
    )
    assert changed["p.speed"].mean[-1] == pytest.approx(1400, abs=5)
    # without the change, held: the setpoint stays (the forecast proper weighs the
    # history's 900 ↔ 1100 steps every 100 s)
    rise = changed["t.level"].mean[-1] - base["t.level"].held[-1]
    assert rise == pytest.approx(2e-5 * (1400 - sp[-1]) * 120, rel=0.1)
    assert changed["t.level"].modelled
    assert not changed["p.sp"].modelled
    assert changed["p.sp"].mean == (1400.0,) * 120


def test_crossing_times_bracket_the_expected_one() -> None:
    trajectory = models.Trajectory(
        "t.level", 0, 1000, tuple(2.0 + 0.01 * (h + 1) for h in range(600)), (0.05,) * 600, True
    )
    found = models.crossing(trajectory, 2.0, "warning high", 4.0, "high")
    assert found.eta_s == pytest.approx(200, abs=1)
    assert found.earliest_s is not None
    assert found.latest_s is not None
    assert found.earliest_s < found.eta_s < found.latest_s
    assert found.probability > 0.99
    low = models.crossing(trajectory, 2.0, "warning low", 1.0, "low")
    assert low.probability < 1e-6
    assert low.eta_s is None
    already = models.crossing(trajectory, 4.5, "warning high", 4.0, "high")
    assert already.already


def test_error_draws_have_the_calibrated_quantiles() -> None:
    z = np.random.default_rng(0).standard_normal(200_000)
    errors = models._fan(z, np.asarray(1.0), np.asarray(2.0))  # heavy tails: s95 > s80
    size = np.abs(errors)
    assert np.quantile(size, 0.80) == pytest.approx(models.Z80 * 1.0, rel=0.02)
    assert np.quantile(size, 0.95) == pytest.approx(models.Z95 * 2.0, rel=0.02)
    gaussian = models._fan(z, np.asarray(1.5), np.asarray(1.5))
    assert np.allclose(gaussian, 1.5 * z)


def test_a_crossing_in_simulated_futures_is_their_share_beyond_the_limit() -> None:
    """A fifth of the futures step up past the limit after 10 steps, the rest stay:
    the probability is that fifth, the expected value (median) never gets there."""
    futures = np.full((100, 30), 2.0)
    futures[:20, 10:] = 4.5
    low95, high95 = np.quantile(futures, [0.025, 0.975], axis=0)
    trajectory = models.Trajectory(
        "t.level",
        0,
        1000,
        (2.0,) * 30,
        tuple((high95 - low95) / (2 * models.Z95)),
        True,
        (2.0,) * 30,
        (2.0,) * 30,
        (2.0,) * 30,
        tuple(low95),
        tuple(high95),
        futures,
    )
    found = models.crossing(trajectory, 2.0, "warning high", 4.0, "high")
    assert found.probability == pytest.approx(0.2)
    assert found.eta_s is None
    assert found.earliest_s == 11.0  # the band's upper edge: step 11
    assert found.latest_s is None


def test_a_leak_is_a_model_residual_far_beyond_sigma() -> None:
    y, u = integrating()
    model = fit(y, u)
    healthy = models.window_residual(model, y, u[None, :], 60)
    assert healthy is not None
    assert healthy.score < 4
    leaking = y.copy()
    leaking[-60:] -= 0.004 * np.arange(1, 61)  # 4 mm/s nobody commanded
    residual = models.window_residual(model, leaking, u[None, :], 60)
    assert residual is not None
    assert residual.observed < residual.expected
    assert residual.score > 10


def test_a_model_of_a_steady_plant_does_not_call_its_noise_a_miss() -> None:
    """A model fitted while the plant stood still has a σ of micro-units; the residual
    is judged no finer than the steps the value is reported in over the window, so
    noise of a few mm (or one step carried over a restart's gap) is not thousands of σ,
    while a leak of 4 mm per step still is."""
    n = 600
    u = np.full(n, 900.0)
    steady = np.full(n, 2.5)
    steady[::7] += 1e-6  # what a held grid of a quiet plant looks like
    model = fit(steady, u)
    assert model.sigma_at(60) < 1e-4
    rng = np.random.default_rng(3)
    noisy = steady.copy()
    noisy[-60:] = 2.5 + rng.normal(0, 0.003, 60)
    quiet = models.window_residual(model, noisy, u[None, :], 60)
    assert quiet is not None
    assert quiet.score < 4
    leaking = steady.copy()
    leaking[-60:] = 2.5 - 0.004 * np.arange(1, 61) + rng.normal(0, 0.001, 60)
    leak = models.window_residual(model, leaking, u[None, :], 60)
    assert leak is not None
    assert leak.score > 10


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.floats(-1e6, 1e6)), min_size=1, max_size=40),
    st.integers(-100, 10_100),
    st.integers(1, 500),
)
def test_resample_is_the_last_sample_at_or_before_each_grid_time(
    samples: list[tuple[int, float]], start: int, step: int
) -> None:
    samples.sort(key=lambda s: s[0])
    ts = [s[0] for s in samples]
    values = [s[1] for s in samples]
    grid = np.asarray([start + step * i for i in range(30)], dtype=float)
    out = models.resample(ts, values, grid)
    for time, got in zip(grid, out, strict=True):
        before = [v for t, v in samples if t <= time]
        if before:
            # ties on one timestamp: the later sample in the list wins, like ingest
            assert got == before[-1]
        else:
            assert math.isnan(got)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(models.STRUCTURES),
    st.lists(st.floats(-2, 2, allow_nan=False), min_size=1, max_size=2),
    st.lists(st.floats(-2, 2, allow_nan=False), min_size=0, max_size=2),
    st.integers(0, 21),
)
def test_a_model_survives_its_storage_round_trip(
    structure: str, a: list[float], b: list[float], dead: int
) -> None:
    model = Model(
        target="t.level",
        inputs=("p.speed",) if b else (),
        structure=structure,
        step_ms=500,
        dead_time=dead,
        a=tuple(a),
        b=(tuple(b),) if b else (),
        c=0.5,
        r2=0.9,
        sigma=0.01,
        samples=100,
        fitted_ms=1,
        horizon_sigma=(0.01, 0.02),
    )
    assert Model.from_dict(model.to_dict()) == model
    screened = dataclasses.replace(model, screened_ms=7)
    assert Model.from_dict(screened.to_dict()) == screened
    assert model.sigma_at(2) == 0.02
    assert model.sigma_at(8) == pytest.approx(0.02 * 2)
