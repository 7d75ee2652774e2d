"""Learned plant dynamics: fit, forecast, simulate, check (pure numpy, no I/O).

The hub learns one discrete-time model per influenced attribute from the twin's own
history, resampled on a fixed grid (zero-order hold: devices report on change, so a
value holds until the next sample). Candidate structures, one step ``t → t+1``:

- ``integrating``: ``y[t+1] = y[t] + Σ b_j·u_j[t-d] + c`` (a tank level: the net
  inflow moves it, nothing pulls it back);
- ``first_order``: ``y[t+1] = a·y[t] + Σ b_j·u_j[t-d] + c`` (first order plus dead
  time ``d``: a boiler's temperature, a drive's speed following its setpoint);
- ``arx``: two past outputs and two lags of each input (anything less simple);
- ``trend`` (no declared inputs): ``y[t+1] = y[t] + c``, a drift with intervals.

Each candidate (and each dead time) is fitted by least squares on the older 75 % of
the window and scored by its free-run (simulation) error on the newer 25 % over the
forecast horizon, because a model is used to predict many steps ahead, where a good
one-step fit proves little. The winner is refitted on the whole window. Its forecast
intervals come from a backtest: the model is run from many origins in the history
with the inputs that really happened, and the spread of its h-step errors gives
``horizon_sigma[h]``. So the intervals include model error, not only sensor noise.

Everything here takes arrays and returns plain values: the hub service decides what
history to load and when to refit (hub/predict.py does the queries).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]

STRUCTURES = ("integrating", "first_order", "arx", "trend")
DEAD_TIMES = (0, 1, 2, 3, 5, 8, 13, 21)
MIN_SAMPLES = 30
"""Grid steps of complete data a fit needs (fewer: no model, said so)."""
HOLDOUT_MIN = 400
"""From this many grid steps on, structures are judged on data they were not fitted on."""
Z80 = 1.2815515655446004
Z95 = 1.959963984540054


class ModelError(ValueError):
    """A model cannot be fitted or used (too little data, unknown input)."""


@dataclass(frozen=True, slots=True)
class Model:
    """One fitted model of ``target`` (``entity.attribute``) on a grid of ``step_ms``."""

    target: str
    inputs: tuple[str, ...]
    structure: str
    step_ms: int
    dead_time: int
    a: tuple[float, ...]
    b: tuple[tuple[float, ...], ...]
    c: float
    r2: float
    sigma: float
    samples: int
    fitted_ms: int
    horizon_sigma: tuple[float, ...]

    @property
    def lags(self) -> int:
        """Past grid values a step needs (of the target and of each input)."""
        input_lags = self.dead_time + max((len(b) for b in self.b), default=0)
        return max(len(self.a), input_lags, 1)

    def step(self, y: Sequence[float], u: Sequence[Sequence[float]], t: int) -> float:
        """``y[t+1]`` from the values up to ``t`` (``u[j]`` is input j's series)."""
        value = self.c
        for k, coefficient in enumerate(self.a):
            value += coefficient * y[t - k]
        for j, coefficients in enumerate(self.b):
            series = u[j]
            for k, coefficient in enumerate(coefficients):
                value += coefficient * series[t - self.dead_time - k]
        return value

    def sigma_at(self, steps: int) -> float:
        """σ of the forecast error ``steps`` ahead (beyond the backtest: √h growth)."""
        table = self.horizon_sigma
        if steps <= 0:
            return 0.0
        if not table:
            return self.sigma * math.sqrt(steps)
        if steps <= len(table):
            return table[steps - 1]
        return table[-1] * math.sqrt(steps / len(table))

    @property
    def time_constant_s(self) -> float | None:
        """First-order models: the time constant it learned (τ = -Δt / ln a)."""
        if self.structure != "first_order" or not 0 < self.a[0] < 1:
            return None
        return -self.step_ms / 1000 / math.log(self.a[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "inputs": list(self.inputs),
            "structure": self.structure,
            "step_ms": self.step_ms,
            "dead_time": self.dead_time,
            "a": list(self.a),
            "b": [list(b) for b in self.b],
            "c": self.c,
            "r2": self.r2,
            "sigma": self.sigma,
            "samples": self.samples,
            "fitted_ms": self.fitted_ms,
            "horizon_sigma": list(self.horizon_sigma),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Model:
        return cls(
            target=str(data["target"]),
            inputs=tuple(str(i) for i in data["inputs"]),
            structure=str(data["structure"]),
            step_ms=int(data["step_ms"]),
            dead_time=int(data["dead_time"]),
            a=tuple(float(x) for x in data["a"]),
            b=tuple(tuple(float(x) for x in b) for b in data["b"]),
            c=float(data["c"]),
            r2=float(data["r2"]),
            sigma=float(data["sigma"]),
            samples=int(data["samples"]),
            fitted_ms=int(data["fitted_ms"]),
            horizon_sigma=tuple(float(x) for x in data["horizon_sigma"]),
        )

    def describe(self) -> str:
        """One line an engineer reads: structure, dead time, τ, fit quality."""
        parts = [self.structure]
        if self.dead_time:
            parts.append(f"dead time {self.dead_time * self.step_ms / 1000:g} s")
        tau = self.time_constant_s
        if tau is not None:
            parts.append(f"τ {tau:.3g} s")
        parts.append(f"R² {self.r2:.3f}, σ {self.sigma:.3g}, {self.samples} samples")
        return ", ".join(parts)


# -- data ---------------------------------------------------------------------------------


def resample(ts_ms: Sequence[int], values: Sequence[float], grid_ms: Array) -> Array:
    """Zero-order hold of irregular samples (sorted by time) onto ``grid_ms``; NaN
    before the first sample."""
    if len(ts_ms) == 0:
        return np.full(len(grid_ms), np.nan)
    times = np.asarray(ts_ms, dtype=np.float64)
    vals = np.asarray(values, dtype=np.float64)
    index = np.searchsorted(times, grid_ms, side="right") - 1
    out = vals[np.clip(index, 0, None)]
    out[index < 0] = np.nan
    return out


def grid(start_ms: int, end_ms: int, step_ms: int) -> Array:
    """Grid times from ``start_ms`` to ``end_ms`` (inclusive, aligned to the end)."""
    count = max(0, (end_ms - start_ms) // step_ms) + 1
    return np.asarray(end_ms - step_ms * np.arange(count)[::-1], dtype=np.float64)


# -- fitting ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Candidate:
    structure: str
    dead_time: int
    ar: int  # fitted AR terms (0: integrating/trend, a fixed at 1)
    input_lags: int


def _candidates(has_inputs: bool) -> list[_Candidate]:
    if not has_inputs:
        return [_Candidate("trend", 0, 0, 0), _Candidate("first_order", 0, 1, 0)]
    out: list[_Candidate] = []
    for d in DEAD_TIMES:
        out.append(_Candidate("integrating", d, 0, 1))
        out.append(_Candidate("first_order", d, 1, 1))
        out.append(_Candidate("arx", d, 2, 2))
    return out


def _design(
    y: Array, u: Array, cand: _Candidate, rows: npt.NDArray[np.int64]
) -> tuple[Array, Array]:
    """Regressors and target for predicting ``y[t+1]`` at each ``t`` in ``rows``."""
    columns: list[Array] = []
    for k in range(cand.ar):
        columns.append(y[rows - k])
    for j in range(u.shape[0]):
        for k in range(cand.input_lags):
            columns.append(u[j, rows - cand.dead_time - k])
    columns.append(np.ones(len(rows)))
    x = np.column_stack(columns)
    target = y[rows + 1] - (y[rows] if cand.ar == 0 else 0.0)
    return x, target


def _solve(
    y: Array, u: Array, cand: _Candidate, rows: npt.NDArray[np.int64]
) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...], float] | None:
    x, target = _design(y, u, cand, rows)
    if len(rows) < x.shape[1] * 3:
        return None
    coef, *_ = np.linalg.lstsq(x, target, rcond=None)
    if not np.all(np.isfinite(coef)):
        return None
    a = tuple(float(v) for v in coef[: cand.ar]) if cand.ar else (1.0,)
    if cand.ar and not _stable(a):
        return None
    b: list[tuple[float, ...]] = []
    position = cand.ar
    for _ in range(u.shape[0]):
        b.append(tuple(float(v) for v in coef[position : position + cand.input_lags]))
        position += cand.input_lags
    return a, tuple(b), float(coef[-1])


def _stable(a: tuple[float, ...]) -> bool:
    """Every root of the AR part inside the unit circle (a drifting fit extrapolates wildly)."""
    roots = np.roots([1.0, *(-x for x in a)])
    return bool(np.all(np.abs(roots) < 0.9999))


def _model(
    target: str,
    inputs: Sequence[str],
    cand: _Candidate,
    params: tuple[tuple[float, ...], tuple[tuple[float, ...], ...], float],
    step_ms: int,
) -> Model:
    a, b, c = params
    return Model(
        target=target,
        inputs=tuple(inputs),
        structure=cand.structure,
        step_ms=step_ms,
        dead_time=cand.dead_time,
        a=a,
        b=b,
        c=c,
        r2=0.0,
        sigma=0.0,
        samples=0,
        fitted_ms=0,
        horizon_sigma=(),
    )


def free_run(model: Model, y: Array, u: Array, origins: npt.NDArray[np.int64], steps: int) -> Array:
    """Forecasts from each origin (its value known, later ones not) ``steps`` ahead,
    driven by the inputs that really happened: shape (origins, steps)."""
    p = len(model.a)
    buffer = np.stack([y[origins - k] for k in range(p)], axis=1)
    a = np.asarray(model.a)
    out = np.empty((len(origins), steps))
    for h in range(steps):
        t = origins + h
        value = buffer @ a + model.c
        for j, coefficients in enumerate(model.b):
            for k, coefficient in enumerate(coefficients):
                value = value + coefficient * u[j, t - model.dead_time - k]
        out[:, h] = value
        buffer = np.concatenate([value[:, None], buffer[:, :-1]], axis=1)
    return out


def _origins(
    complete: npt.NDArray[np.bool_], start: int, stop: int, lags: int, steps: int, most: int
) -> npt.NDArray[np.int64]:
    """Origins t0 in [start, stop) whose lags and next ``steps`` values are all known."""
    candidates = np.arange(max(start, lags), stop - steps)
    if len(candidates) == 0:
        return candidates
    # a window is usable when no gap falls inside it (cumulative count of gaps)
    gaps = np.concatenate([[0], np.cumsum(~complete)])
    ok = gaps[candidates + steps + 1] - gaps[candidates - lags] == 0
    usable = candidates[ok]
    if len(usable) > most:
        usable = usable[np.linspace(0, len(usable) - 1, most).astype(np.int64)]
    return np.asarray(usable, dtype=np.int64)


def fit(
    target: str,
    inputs: Sequence[str],
    y: Array,
    u: Array,
    *,
    step_ms: int,
    horizon_steps: int,
    now_ms: int,
) -> Model:
    """Choose and fit a model of ``y`` driven by ``u`` (inputs × grid); raise ModelError."""
    u = np.asarray(u, dtype=np.float64).reshape(len(inputs), len(y))
    complete = np.isfinite(y) & np.all(np.isfinite(u), axis=0)
    if complete.any():  # a young twin: the window starts before its history does
        first = int(np.argmax(complete))
        y, u, complete = y[first:], u[:, first:], complete[first:]
    n = len(y)
    if int(complete.sum()) < MIN_SAMPLES:
        raise ModelError(
            f"{target}: {int(complete.sum())} grid steps of history with every input known; "
            f"a model needs at least {MIN_SAMPLES}"
        )
    max_lag = max(DEAD_TIMES) + 2
    # Long histories: fit on the older 75 %, judge on the newer 25 %. Short ones (a
    # young twin): the newest quarter may hold no input change at all and would favour
    # a model that ignores its inputs, so fit and judge on everything.
    holdout = n >= HOLDOUT_MIN
    split = int(n * 0.75) if holdout else n
    validate_steps = max(1, min(horizon_steps, (n - split) // 2 if holdout else n // 3))
    best: tuple[float, _Candidate, Model] | None = None
    for cand in _candidates(len(inputs) > 0):
        lags = cand.dead_time + max(cand.input_lags, 1) + 1
        rows = _rows(complete, lags, 0, split)
        params = _solve(y, u, cand, rows)
        if params is None:
            continue
        model = _model(target, inputs, cand, params, step_ms)
        origins = _origins(complete, split if holdout else 0, n, model.lags, validate_steps, 60)
        if len(origins) == 0:
            origins = _origins(complete, 0, n, model.lags, validate_steps, 60)
        if len(origins) == 0:
            continue
        forecast = free_run(model, y, u, origins, validate_steps)
        actual = np.stack([y[origins + h + 1] for h in range(validate_steps)], axis=1)
        score = float(np.sqrt(np.mean((forecast - actual) ** 2)))
        if not math.isfinite(score):
            continue
        # a simpler structure wins ties (within 1 %): fewer ways to extrapolate badly
        if best is None or score < best[0] * 0.99:
            best = (score, cand, model)
    if best is None:
        raise ModelError(f"{target}: no candidate structure could be fitted to the history")
    _, cand, trained = best
    rows = _rows(complete, cand.dead_time + max(cand.input_lags, 1) + 1, 0, n)
    params = _solve(y, u, cand, rows)
    if params is None:
        raise ModelError(f"{target}: the chosen structure {cand.structure} failed on all data")
    model = _model(target, inputs, cand, params, step_ms)
    x, step_target = _design(y, u, cand, rows)
    coef = np.asarray([*(model.a if cand.ar else ()), *(v for b in model.b for v in b), model.c])
    residual = step_target - x @ coef
    sigma = float(np.sqrt(np.mean(residual**2)))
    origins = _origins(complete, 0, n, max(model.lags, max_lag), min(horizon_steps, n // 3), 200)
    table: tuple[float, ...] = ()
    r2 = 0.0
    if len(origins) and min(horizon_steps, n // 3) > 0:
        steps = min(horizon_steps, n // 3)
        forecast = free_run(model, y, u, origins, steps)
        actual = np.stack([y[origins + h + 1] for h in range(steps)], axis=1)
        errors = forecast - actual
        rms = np.sqrt(np.mean(errors**2, axis=0))
        if holdout:
            rms = _with_holdout(rms, trained, y, u, complete, split, max_lag)
        table = tuple(float(v) for v in np.maximum.accumulate(rms))
        variance = float(np.var(y[complete]))
        r2 = 1.0 - float(np.mean(errors[:, -1] ** 2)) / variance if variance > 0 else 0.0
    return Model(
        target=target,
        inputs=tuple(inputs),
        structure=cand.structure,
        step_ms=step_ms,
        dead_time=cand.dead_time,
        a=model.a,
        b=model.b,
        c=model.c,
        r2=round(r2, 4),
        sigma=sigma,
        samples=int(complete.sum()),
        fitted_ms=now_ms,
        horizon_sigma=table,
    )


def _with_holdout(
    rms: Array,
    trained: Model,
    y: Array,
    u: Array,
    complete: npt.NDArray[np.bool_],
    split: int,
    max_lag: int,
) -> Array:
    """The h-step error table widened by what the model fitted on the older data missed
    on the newer data it never saw. A backtest on the data a model was fitted on flatters
    it; its intervals then cover too little (bench/predict.py measured it)."""
    steps = min(len(rms), (len(y) - split) // 2)
    if steps <= 0:
        return rms
    origins = _origins(complete, split, len(y), max(trained.lags, max_lag), steps, 200)
    if len(origins) == 0:
        return rms
    forecast = free_run(trained, y, u, origins, steps)
    actual = np.stack([y[origins + h + 1] for h in range(steps)], axis=1)
    unseen = np.sqrt(np.mean((forecast - actual) ** 2, axis=0))
    out = rms.copy()
    out[:steps] = np.maximum(rms[:steps], unseen)
    if steps < len(rms) and rms[steps - 1] > 0:  # beyond: keep the shape, scaled
        out[steps:] = rms[steps:] * max(1.0, float(unseen[-1] / rms[steps - 1]))
    return out


def _rows(
    complete: npt.NDArray[np.bool_], lags: int, start: int, stop: int
) -> npt.NDArray[np.int64]:
    """Rows t in [start, stop-1) whose regressors (t-lags..t) and y[t+1] are all known."""
    t = np.arange(max(start, lags), stop - 1)
    if len(t) == 0:
        return t
    gaps = np.concatenate([[0], np.cumsum(~complete)])
    ok = gaps[t + 2] - gaps[t - lags] == 0
    return np.asarray(t[ok], dtype=np.int64)


# -- forecasting and what-if --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Trajectory:
    """A forecast of one point: the mean and σ per step after ``start_ms``."""

    point: str
    start_ms: int
    step_ms: int
    mean: tuple[float, ...]
    sigma: tuple[float, ...]
    modelled: bool

    def at(self, steps: int) -> tuple[float, float]:
        index = min(max(steps, 1), len(self.mean)) - 1
        return self.mean[index], self.sigma[index]

    def band(self, steps: int, z: float) -> tuple[float, float]:
        mean, sigma = self.at(steps)
        return mean - z * sigma, mean + z * sigma


def simulate(
    models: Mapping[str, Model],
    history: Mapping[str, Array],
    steps: int,
    *,
    start_ms: int,
    step_ms: int,
    overrides: Mapping[str, float] | None = None,
) -> dict[str, Trajectory]:
    """Run every model forward together from the end of ``history`` (one grid per point,
    common times). A point in ``overrides`` holds that value from the first step (a
    setpoint change); a point with no model holds its last value; a modelled point
    follows its model, whose inputs may themselves be modelled (speed ← setpoint,
    level ← speed)."""
    overrides = dict(overrides or {})
    points = set(history) | set(overrides)
    for model in models.values():
        points.add(model.target)
        points.update(model.inputs)
    series: dict[str, list[float]] = {}
    length = max((len(h) for h in history.values()), default=0)
    for point in points:
        past = history.get(point)
        if past is None or len(past) == 0 or not np.isfinite(past[-1]):
            if point in overrides:
                past = np.full(max(length, 1), overrides[point])
            else:
                raise ModelError(f"no history for {point}")
        values = [float(v) for v in past]
        if len(values) < length:  # pad older steps with the first known value
            values = [values[0]] * (length - len(values)) + values
        series[point] = _fill_back(values)
    running = {
        point: model
        for point, model in models.items()
        if point not in overrides and all(i in series for i in model.inputs)
    }
    t = length - 1
    for _ in range(steps):
        nxt: dict[str, float] = {}
        for point, values in series.items():
            stepper = running.get(point)
            if point in overrides:
                nxt[point] = overrides[point]
            elif stepper is not None:
                nxt[point] = stepper.step(values, [series[i] for i in stepper.inputs], t)
            else:
                nxt[point] = values[t]
        for point, value in nxt.items():
            series[point].append(value)
        t += 1
    out: dict[str, Trajectory] = {}
    for point, values in series.items():
        found = running.get(point)
        sigma = tuple(found.sigma_at(h + 1) if found is not None else 0.0 for h in range(steps))
        out[point] = Trajectory(
            point, start_ms, step_ms, tuple(values[length:]), sigma, found is not None
        )
    return out


def _fill_back(values: list[float]) -> list[float]:
    """Replace leading NaNs (before the first sample) with the first known value."""
    first = next((v for v in values if math.isfinite(v)), 0.0)
    out: list[float] = []
    last = first
    for value in values:
        last = value if math.isfinite(value) else last
        out.append(last)
    return out


# -- thresholds and risk ------------------------------------------------------------------


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


@dataclass(frozen=True, slots=True)
class Crossing:
    """When a forecast reaches one limit: most likely, earliest and latest (95 % band)."""

    name: str
    limit: float
    side: str  # "high" or "low"
    probability: float
    eta_s: float | None
    earliest_s: float | None
    latest_s: float | None
    already: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "limit_name": self.name,
            "limit": self.limit,
            "side": self.side,
            "probability": round(self.probability, 4),
            "eta_s": self.eta_s,
            "earliest_s": self.earliest_s,
            "latest_s": self.latest_s,
            "already": self.already,
        }


def crossing(
    trajectory: Trajectory, current: float, name: str, limit: float, side: str
) -> Crossing:
    """Probability that the point reaches ``limit`` within the forecast, and when."""
    mean = np.asarray(trajectory.mean)
    sigma = np.maximum(np.asarray(trajectory.sigma), 1e-12)
    sign = 1.0 if side == "high" else -1.0
    if sign * (current - limit) >= 0:
        return Crossing(name, limit, side, 1.0, 0.0, 0.0, 0.0, True)
    step_s = trajectory.step_ms / 1000
    beyond = sign * (mean - limit)
    probability = float(np.max([normal_cdf(float(v)) for v in beyond / sigma]))

    def first(mask: npt.NDArray[np.bool_]) -> float | None:
        hits = np.flatnonzero(mask)
        return float((hits[0] + 1) * step_s) if len(hits) else None

    return Crossing(
        name,
        limit,
        side,
        probability,
        first(beyond >= 0),
        first(beyond + Z95 * sigma >= 0),
        first(beyond - Z95 * sigma >= 0),
        False,
    )


def combined_probability(probabilities: Sequence[float]) -> float:
    """P(at least one) treating the crossings as independent (an upper-leaning estimate
    when they are correlated, which is the safe side for a risk figure)."""
    remaining = 1.0
    for p in probabilities:
        remaining *= 1.0 - min(max(p, 0.0), 1.0)
    return 1.0 - remaining


# -- model-based drift --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Residual:
    """What the model expected over the last window against what devices reported."""

    point: str
    expected: float
    observed: float
    sigma: float
    window_steps: int

    @property
    def residual(self) -> float:
        return self.observed - self.expected

    @property
    def score(self) -> float:
        """|residual| in units of the model's σ at this window."""
        return abs(self.residual) / self.sigma if self.sigma > 0 else math.inf


def window_residual(model: Model, y: Array, u: Array, window_steps: int) -> Residual | None:
    """Run the model from ``window_steps`` before the end with the inputs that happened
    and compare its end value with the last reported one (None: not enough data)."""
    u = np.asarray(u, dtype=np.float64).reshape(len(model.inputs), len(y))
    n = len(y)
    origin = n - 1 - window_steps
    if origin < model.lags:
        return None
    span = slice(origin - model.lags, n)
    if not (np.all(np.isfinite(y[span])) and np.all(np.isfinite(u[:, span]))):
        return None
    forecast = free_run(model, y, u, np.asarray([origin], dtype=np.int64), window_steps)
    sigma = max(model.sigma_at(window_steps), 1e-9)
    return Residual(model.target, float(forecast[0, -1]), float(y[-1]), sigma, window_steps)
