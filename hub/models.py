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

Each candidate (and each dead time) is fitted by least squares (first order also by
instrumental variables, which least squares' noise bias does not touch) on the older 75 % of
the window and scored by its free-run (simulation) error on the newer 25 % over the
forecast horizon, because a model is used to predict many steps ahead, where a good
one-step fit proves little (ARX pays σ²/2 of the sensor's noise for the averaging of the
origin its two past outputs give it on any plant). The winner is refitted on the whole
window. Its error
tables come from a backtest: the model is run from many origins in the history with
the inputs that really happened (and, with a holdout, on data it never saw), and the
80 % and 95 % quantiles of its h-step errors give ``horizon_sigma80[h]`` and
``horizon_sigma[h]``. So the intervals include model error, not only sensor noise.
With each model go the inputs' change records (``InputChanges``): a forecast
(``simulate``) draws futures in which the inputs nobody models change as often and as
far as they did, runs the models over all of them at once, and reports their median
and quantiles (docs/prediction.md).

Everything here takes arrays and returns plain values: the hub service decides what
history to load and when to refit (hub/predict.py does the queries).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
PATHS = 400
"""Simulated futures per forecast (input changes drawn from the history, seeded)."""
CHANGE_K = 5.0
"""A grid-to-grid move of an input beyond this many times its noise is a change."""
MOVING_SHARE = 0.25
"""An input that moves on more than this share of grid steps is measured (noisy), not set."""
KEPT = 200
"""Newest holds and levels an input's change record keeps."""


class ModelError(ValueError):
    """A model cannot be fitted or used (too little data, unknown input)."""


@dataclass(frozen=True, slots=True)
class SettingRange:
    """Where an operator may put an input: the writable range the schema declares
    (``min``/``max``) and how far one command may move it (``max_step``). The prior
    for values the history has not shown yet."""

    low: float
    high: float
    max_step: float | None = None

    def around(self, current: Array) -> tuple[Array, Array]:
        """Per future, the values one change from ``current`` can reach."""
        low = np.full(len(current), self.low)
        high = np.full(len(current), self.high)
        if self.max_step is not None:
            low = np.maximum(low, current - self.max_step)
            high = np.minimum(high, current + self.max_step)
        return low, np.maximum(high, low)


@dataclass(frozen=True, slots=True)
class InputChanges:
    """How an input moved in the history a model was fitted on: how often it changed
    (``rate`` per grid step over ``observed`` steps), how long each value was held
    (``holds``, complete holds only, in grid steps) and which values it took
    (``levels``). A forecast draws the future changes of inputs nobody models (the
    setpoints an operator moves) from it."""

    rate: float
    holds: tuple[int, ...]
    levels: tuple[float, ...]
    tolerance: float
    observed: int

    def age(self, series: Array) -> int:
        """Grid steps since the last change at the end of ``series`` (its length - 1 if
        none is in it: a lower bound)."""
        moves = np.abs(np.diff(series))
        changed = np.flatnonzero(np.nan_to_num(moves, nan=0.0) > self.tolerance)
        return int(len(series) - 2 - changed[-1]) if len(changed) else max(len(series) - 1, 0)

    @property
    def bandwidth(self) -> float:
        """Kernel width for new values (Silverman's rule on the levels held; 0 for an
        input that took at most two values: a switch)."""
        levels = np.asarray(self.levels)
        if len(np.unique(levels)) < 3:
            return 0.0
        spread = float(np.std(levels))
        q75, q25 = np.percentile(levels, [75, 25])
        robust = float(q75 - q25) / 1.34
        if robust > 0:
            spread = min(spread, robust)
        return float(0.9 * spread * len(levels) ** -0.2)

    @property
    def near(self) -> float:
        """Half the smallest step between successive values: closer is the same value."""
        steps = np.abs(np.diff(np.asarray(self.levels)))
        steps = steps[steps > self.tolerance]
        return 0.5 * float(steps.min()) if len(steps) else self.tolerance

    @property
    def unseen_share(self) -> float:
        """The chance that the next change goes to a value not held before: Laplace's
        rule of succession over the changes in the record, (new + 1) / (changes + 2),
        a value within ``near`` of an earlier one counting as that one. An operator who
        toggles between two settings soon scores near 0; one who picks a fresh value
        each time stays near 1; a record with no change says 1/2."""
        levels = np.asarray(self.levels)
        if len(levels) < 2:
            return 0.5
        apart = np.abs(levels[:, None] - levels[None, :]) > self.near
        earlier = np.tril(np.ones((len(levels), len(levels)), dtype=np.bool_), k=-1)
        new = int(np.sum(np.all(apart | ~earlier, axis=1)[1:]))
        return (new + 1) / (len(levels) - 1 + 2)

    def sample(
        self,
        current: float,
        age: int,
        steps: int,
        rng: np.random.Generator,
        count: int,
        bounds: tuple[float | None, float | None] = (None, None),
        setting: SettingRange | None = None,
    ) -> Array:
        """``count`` possible futures of the input over ``steps`` (shape count × steps).

        When the next change comes: a complete hold of the history longer than the
        present one's ``age`` (a renewal: an operator who just moved a setpoint is less
        likely to move it again at once), or, with the weight of one more hold, a
        memoryless wait at the history's rate (the present hold may outlast all seen
        ones). Later holds likewise. Each new value is one the input held, smoothed by
        ``bandwidth``, kept within ``bounds``, and away from the value it replaces; with
        a declared ``setting`` range, a new value is, as often as the history's changes
        went to values not seen before (``unseen_share``), one the history has not
        shown: uniform over what one command can reach within that range."""
        if self.rate <= 0 or steps <= 0 or not self.levels:
            return np.full((count, steps), current)
        holds = np.asarray(self.holds, dtype=np.float64)
        most = max(2, min(32, math.ceil(steps * self.rate * 4) + 2))
        if len(holds):
            most = max(most, min(32, math.ceil(steps / max(1.0, float(holds.min()))) + 1))
        waits = np.ceil(rng.exponential(1.0 / self.rate, (count, most)))
        longer = holds[holds > age]
        if len(longer):
            take = rng.random(count) < len(longer) / (len(longer) + 1)
            waits[take, 0] = longer[rng.integers(len(longer), size=int(take.sum()))] - age
        if len(holds):
            take = rng.random((count, most - 1)) < len(holds) / (len(holds) + 1)
            drawn = holds[rng.integers(len(holds), size=(count, most - 1))]
            waits[:, 1:] = np.where(take, drawn, waits[:, 1:])
        times = np.cumsum(np.maximum(waits, 1.0), axis=1)
        values = self._new_values(current, rng, count, most, bounds, setting)
        ahead = np.arange(1, steps + 1, dtype=np.float64)
        done = (times[:, None, :] <= ahead[None, :, None]).sum(axis=2)
        picked = np.take_along_axis(values, np.maximum(done - 1, 0), axis=1)
        return np.where(done > 0, picked, current)

    def _new_values(
        self,
        current: float,
        rng: np.random.Generator,
        count: int,
        most: int,
        bounds: tuple[float | None, float | None],
        setting: SettingRange | None = None,
    ) -> Array:
        """Values after each of ``most`` changes (count × most). A change moves the
        input: a draw nearer the value it leaves than half the smallest step seen is
        drawn again (a few times), so a switch goes to its other state. With a
        ``setting`` range a share of the draws (``unseen_share``) comes from that range,
        not from the values seen: a twin that has seen six values of a setpoint has not
        seen where an operator may put it next."""
        levels = np.asarray(self.levels)
        near = self.near
        width = self.bandwidth
        low = -np.inf if bounds[0] is None else bounds[0]
        high = np.inf if bounds[1] is None else bounds[1]
        unseen = self.unseen_share if setting else 0.0
        out = np.empty((count, most))
        previous = np.full(count, current)
        for k in range(most):
            drawn = np.empty(count)
            redo = np.ones(count, dtype=np.bool_)
            for _ in range(5):
                fresh = levels[rng.integers(len(levels), size=int(redo.sum()))]
                if width > 0:
                    fresh = fresh + rng.normal(0.0, width, len(fresh))
                if setting is not None:
                    new = rng.random(len(fresh)) < unseen
                    reach_low, reach_high = setting.around(previous[redo][new])
                    fresh[new] = rng.uniform(reach_low, reach_high)
                drawn[redo] = np.clip(fresh, low, high)
                redo = np.abs(drawn - previous) < near
                if not redo.any():
                    break
            out[:, k] = drawn
            previous = drawn
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "holds": list(self.holds),
            "levels": list(self.levels),
            "tolerance": self.tolerance,
            "observed": self.observed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputChanges:
        return cls(
            rate=float(data["rate"]),
            holds=tuple(int(x) for x in data["holds"]),
            levels=tuple(float(x) for x in data["levels"]),
            tolerance=float(data["tolerance"]),
            observed=int(data["observed"]),
        )


def learn_changes(series: Array) -> InputChanges:
    """The change record of one input's grid history (NaN: unknown, skipped)."""
    values = np.asarray(series, dtype=np.float64)
    known = values[np.isfinite(values)]
    moves = np.diff(values)
    finite = np.isfinite(moves)
    if not len(known) or not finite.any():
        return InputChanges(0.0, (), tuple(float(v) for v in known[-1:]), 0.0, 0)
    # A setpoint moves on a few grid steps (each move a change); a measured input moves
    # on most (noise, and a held sample between reports): then only a move far beyond
    # its usual size is a change.
    size = np.abs(moves[finite])
    moving = size[size > 0]
    noise = 1.4826 * float(np.median(moving)) if len(moving) > MOVING_SHARE * len(size) else 0.0
    tolerance = max(CHANGE_K * noise, 1e-9 * (1.0 + abs(float(np.median(known)))))
    changed = np.flatnonzero(finite & (np.abs(np.nan_to_num(moves)) > tolerance)) + 1
    # An unknown stretch (before the first sample, or history a drift finding flagged)
    # ends a level and a hold: what the input did there is not known, so a hold across
    # it is not counted as one, nor the values either side of it as one level.
    unknown = ~np.isfinite(values)
    edges = np.flatnonzero(np.diff(unknown.astype(np.int8))) + 1
    starts = np.unique(np.concatenate([[0], changed, edges, [len(values)]]))
    levels = [
        float(np.median(segment))
        for a, b in itertools.pairwise(starts)
        if len(segment := values[a:b][np.isfinite(values[a:b])])
    ]
    gaps = np.concatenate([[0], np.cumsum(unknown)])
    holds = np.asarray(
        [b - a for a, b in itertools.pairwise(changed) if gaps[b] == gaps[a]], dtype=np.int64
    )
    observed = int(finite.sum())
    return InputChanges(
        rate=len(changed) / observed,
        holds=tuple(int(h) for h in holds[-KEPT:]),
        levels=tuple(levels[-KEPT:]),
        tolerance=tolerance,
        observed=observed,
    )


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
    """σ of the h-step error such that ±1.96 σ held 95 % of the backtest's errors
    (out of sample where there was a holdout)."""
    horizon_sigma80: tuple[float, ...] = ()
    """The same for 80 % (±1.28 σ): errors are rarely Gaussian, so both are kept."""
    changes: tuple[InputChanges | None, ...] = ()
    """Per input, how it changed in the fitted history (used for inputs nobody models)."""
    fit_s: float | None = None
    """Wall time the fit took (every candidate structure and dead time, the backtests),
    as measured by whoever fitted it; None for models stored before it was kept."""
    screened_ms: int | None = None
    """The history it was fitted on left out what the drift findings known at this time
    flagged (hub/predict.py); None: fitted before the hub did, on everything."""

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
        """σ of the forecast error ``steps`` ahead for a 95 % band (beyond the backtest:
        √h growth)."""
        return self._table_at(self.horizon_sigma, steps)

    def sigma80_at(self, steps: int) -> float:
        """σ of the forecast error ``steps`` ahead for an 80 % band."""
        return self._table_at(self.horizon_sigma80 or self.horizon_sigma, steps)

    def _table_at(self, table: tuple[float, ...], steps: int) -> float:
        if steps <= 0:
            return 0.0
        if not table:
            return self.sigma * math.sqrt(steps)
        if steps <= len(table):
            return table[steps - 1]
        return table[-1] * math.sqrt(steps / len(table))

    @property
    def time_constant_s(self) -> float | None:
        """The time constant it learned: τ = -Δt / ln p of its slowest pole p (first
        order: p = a; ARX: the root of largest modulus of its AR part, when that root is
        real and in (0, 1), i.e. a first-order-like settling; None otherwise, and for
        models that do not settle: integrating, trend)."""
        if self.structure not in ("first_order", "arx") or not self.a:
            return None
        roots = np.roots([1.0, *(-x for x in self.a)])
        slowest = roots[int(np.argmax(np.abs(roots)))]
        if abs(slowest.imag) > 1e-9 or not 0 < slowest.real < 1:
            return None
        return -self.step_ms / 1000 / math.log(float(slowest.real))

    @property
    def steady_state_gains(self) -> tuple[float, ...] | None:
        """Per input, how far the target settles per unit change of that input
        (Σb / (1 - Σa)); None for a model that does not settle (integrating, trend:
        its b is a rate per grid step instead)."""
        if self.structure not in ("first_order", "arx"):
            return None
        rest = 1.0 - sum(self.a)
        if abs(rest) < 1e-12:
            return None
        return tuple(sum(b) / rest for b in self.b)

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
            "horizon_sigma80": list(self.horizon_sigma80),
            "changes": [c.to_dict() if c is not None else None for c in self.changes],
            **({"fit_s": self.fit_s} if self.fit_s is not None else {}),
            **({"screened_ms": self.screened_ms} if self.screened_ms is not None else {}),
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
            fit_s=float(data["fit_s"]) if data.get("fit_s") is not None else None,
            screened_ms=(int(data["screened_ms"]) if data.get("screened_ms") is not None else None),
            horizon_sigma80=tuple(float(x) for x in data.get("horizon_sigma80", ())),
            changes=tuple(
                InputChanges.from_dict(c) if c is not None else None
                for c in data.get("changes", ())
            ),
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
    instrumented: bool = False  # refined by instrumental variables (first order)


def _candidates(has_inputs: bool) -> list[_Candidate]:
    if not has_inputs:
        return [_Candidate("trend", 0, 0, 0), _Candidate("first_order", 0, 1, 0)]
    out: list[_Candidate] = []
    for d in DEAD_TIMES:
        out.append(_Candidate("integrating", d, 0, 1))
        out.append(_Candidate("first_order", d, 1, 1))
        out.append(_Candidate("first_order", d, 1, 1, instrumented=True))
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
    if cand.instrumented and np.all(np.isfinite(coef)):
        coef = _instrumented(y, u, cand, rows, x, target, np.asarray(coef, dtype=np.float64))
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


def _instrumented(
    y: Array,
    u: Array,
    cand: _Candidate,
    rows: npt.NDArray[np.int64],
    x: Array,
    target: Array,
    coef: Array,
) -> Array:
    """A first-order fit with the noise-free output as instrument (Young's auxiliary
    model, two rounds). Least squares with the noisy ``y[t]`` among its regressors
    pulls ``a`` towards 0 (the noise attenuates it): the time constant and the gain
    come out short, the more so the slower the plant. The output the previous fit
    simulates from the inputs alone is correlated with ``y[t]`` but not with its noise.
    NaN coefficients when the instrument fails (an input that never moved) or finds a
    time constant longer than the history."""
    drive_inputs = [_fill_back(row) for row in u]
    start = int(rows[0])
    for _ in range(2):
        a, c = float(coef[0]), float(coef[-1])
        gains = [float(v) for v in coef[1:-1]]
        drive = np.full(len(y), c)
        for gain, series in zip(gains, drive_inputs, strict=True):
            drive[cand.dead_time :] += gain * series[: len(y) - cand.dead_time]
        simulated = _first_order_run(a, drive, float(y[start]), start)
        instruments = x.copy()
        instruments[:, 0] = simulated[rows]
        try:
            coef = np.asarray(
                np.linalg.solve(instruments.T @ x, instruments.T @ target), dtype=np.float64
            )
        except np.linalg.LinAlgError:
            return np.full_like(coef, np.nan)
        if not np.all(np.isfinite(coef)) or not 0 < coef[0] < 1:
            return np.full_like(coef, np.nan)
    # a time constant longer than the history is a settling never seen: an integrator
    # with a slight lean, which the integrating candidate says more plainly
    if -1.0 / math.log(float(coef[0])) > len(y):
        return np.full_like(coef, np.nan)
    return np.asarray(coef, dtype=np.float64)


def _first_order_run(a: float, drive: Array, value: float, start: int, block: int = 256) -> Array:
    """``out[t+1] = a·out[t] + drive[t]`` from ``out[start] = value`` (before it: value),
    a block of steps at a time: within a block each value is ``a^(i+1)·value`` plus a
    lower-triangular matrix of powers of ``a`` times the block's drives (numpy, not a
    Python loop over a 6 h history)."""
    n = len(drive)
    out = np.full(n, value)
    powers = a ** np.arange(block + 1, dtype=np.float64)
    index = np.arange(block)
    gap = index[:, None] - index[None, :]
    lower = np.where(gap >= 0, powers[np.clip(gap, 0, block)], 0.0)
    t = start
    while t < n - 1:
        m = min(block, n - 1 - t)
        out[t + 1 : t + 1 + m] = powers[1 : m + 1] * value + lower[:m, :m] @ drive[t : t + m]
        value = float(out[t + m])
        t += m
    return out


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
    noise = sensor_noise(y)
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
        # Two past outputs average the sensor's noise at the forecast's origin, which
        # is worth up to σ²/2 of free-run error on any plant: ARX must beat a one-pole
        # structure by more than that to be chosen over it (else it wins noisy tanks
        # and boilers for the wrong reason, and its parameters mean nothing).
        penalty = 0.5 * noise**2 if cand.ar >= 2 else 0.0
        score = float(np.sqrt(np.mean((forecast - actual) ** 2) + penalty))
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
    # The structure chosen on the older part can fail on all of it (the instrumented
    # first-order fit refuses a time constant longer than the history, or a singular
    # instrument): keep the one fitted on the older part then, judged and working.
    model = _model(target, inputs, cand, params, step_ms) if params is not None else trained
    x, step_target = _design(y, u, cand, rows)
    coef = np.asarray([*(model.a if cand.ar else ()), *(v for b in model.b for v in b), model.c])
    residual = step_target - x @ coef
    sigma = float(np.sqrt(np.mean(residual**2)))
    origins = _origins(complete, 0, n, max(model.lags, max_lag), min(horizon_steps, n // 3), 200)
    table95: tuple[float, ...] = ()
    table80: tuple[float, ...] = ()
    r2 = 0.0
    if len(origins) and min(horizon_steps, n // 3) > 0:
        steps = min(horizon_steps, n // 3)
        forecast = free_run(model, y, u, origins, steps)
        actual = np.stack([y[origins + h + 1] for h in range(steps)], axis=1)
        errors = forecast - actual
        s80, s95 = _calibrated(errors)
        if holdout:
            unseen = _holdout_errors(trained, y, u, complete, split, max_lag, steps)
            if unseen is not None:
                unseen80, unseen95 = _calibrated(unseen)
                s80 = _widened(s80, unseen80)
                s95 = _widened(s95, unseen95)
        s95 = np.maximum.accumulate(s95)
        s80 = np.minimum(np.maximum.accumulate(s80), s95 * Z95 / Z80)
        table95 = tuple(float(v) for v in s95)
        table80 = tuple(float(v) for v in s80)
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
        horizon_sigma=table95,
        horizon_sigma80=table80,
        changes=tuple(learn_changes(u[j]) for j in range(u.shape[0])),
    )


def sensor_noise(y: Array) -> float:
    """σ of the noise on ``y`` from its second differences (robust: a plant that moves
    smoothly has second differences near 0 but for its input steps; white noise of σ
    gives them σ·√6). 0 for a series held between reports on change."""
    second = np.diff(np.asarray(y, dtype=np.float64), 2)
    second = second[np.isfinite(second)]
    if not len(second):
        return 0.0
    return float(1.4826 * np.median(np.abs(second)) / math.sqrt(6))


def _calibrated(errors: Array) -> tuple[Array, Array]:
    """Per step ahead, the σ whose ±1.28 σ and ±1.96 σ bands held 80 % and 95 % of
    ``errors`` (origins × steps): quantiles of what happened, not a Gaussian guess (a
    model's misses after an input step are heavy-tailed)."""
    size = np.abs(errors)
    return np.quantile(size, 0.80, axis=0) / Z80, np.quantile(size, 0.95, axis=0) / Z95


def _holdout_errors(
    trained: Model,
    y: Array,
    u: Array,
    complete: npt.NDArray[np.bool_],
    split: int,
    max_lag: int,
    steps: int,
) -> Array | None:
    """What the model fitted on the older data missed on the newer data it never saw
    (origins × steps, fewer steps when the holdout is short). A backtest on the data a
    model was fitted on flatters it; its intervals then cover too little
    (bench/predict.py measured it)."""
    steps = min(steps, (len(y) - split) // 2)
    if steps <= 0:
        return None
    origins = _origins(complete, split, len(y), max(trained.lags, max_lag), steps, 200)
    if len(origins) == 0:
        return None
    forecast = free_run(trained, y, u, origins, steps)
    actual = np.stack([y[origins + h + 1] for h in range(steps)], axis=1)
    return np.asarray(forecast - actual)


def _widened(table: Array, unseen: Array) -> Array:
    """``table`` (in sample) raised to the out-of-sample one where that is larger; beyond
    the holdout's reach the in-sample shape, scaled by the last ratio."""
    steps = len(unseen)
    out = table.copy()
    out[:steps] = np.maximum(table[:steps], unseen)
    if steps < len(table) and table[steps - 1] > 0:
        out[steps:] = table[steps:] * max(1.0, float(unseen[-1] / table[steps - 1]))
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
    """A forecast of one point per step after ``start_ms``: the central value, the
    80 % and 95 % bands (``low80``… ; empty: Gaussian ``mean ± z·sigma``), σ (half the
    95 % band / 1.96), the trajectory with every input held at its present value
    (``held``) and, when the forecast simulated input changes, its samples."""

    point: str
    start_ms: int
    step_ms: int
    mean: tuple[float, ...]
    sigma: tuple[float, ...]
    modelled: bool
    held: tuple[float, ...] = ()
    low80: tuple[float, ...] = ()
    high80: tuple[float, ...] = ()
    low95: tuple[float, ...] = ()
    high95: tuple[float, ...] = ()
    samples: Array | None = field(default=None, compare=False, repr=False)
    """Simulated futures (paths × steps), noise included; None: the band is analytic."""

    def at(self, steps: int) -> tuple[float, float]:
        index = min(max(steps, 1), len(self.mean)) - 1
        return self.mean[index], self.sigma[index]

    def interval(self, steps: int, level: float) -> tuple[float, float]:
        """The ``level`` (0.8 or 0.95) band ``steps`` ahead."""
        index = min(max(steps, 1), len(self.mean)) - 1
        low, high = self.bands(level)
        return float(low[index]), float(high[index])

    def bands(self, level: float) -> tuple[Array, Array]:
        """The ``level`` band at every step (lower, upper arrays)."""
        if level not in (0.8, 0.95):
            raise ValueError(f"bands are kept for 80 % and 95 %, not {level}")
        low, high = (self.low80, self.high80) if level == 0.8 else (self.low95, self.high95)
        if low and high:
            return np.asarray(low), np.asarray(high)
        z = Z80 if level == 0.8 else Z95
        mean, sigma = np.asarray(self.mean), np.asarray(self.sigma)
        return mean - z * sigma, mean + z * sigma

    def band(self, steps: int, z: float) -> tuple[float, float]:
        mean, sigma = self.at(steps)
        return mean - z * sigma, mean + z * sigma


def _fan(z: Array, s80: Array, s95: Array) -> Array:
    """Standard normal draws mapped to errors whose 80 % and 95 % quantiles of |e| are
    ``Z80·s80`` and ``Z95·s95`` (piecewise linear in |z|; Gaussian when s80 = s95)."""
    size = np.abs(z)
    q80, q95 = Z80 * s80, Z95 * s95
    middle = q80 + (size - Z80) / (Z95 - Z80) * (q95 - q80)
    out = np.where(size <= Z80, size * s80, np.where(size <= Z95, middle, size * s95))
    return np.asarray(np.sign(z) * out)


def simulate(
    models: Mapping[str, Model],
    history: Mapping[str, Array],
    steps: int,
    *,
    start_ms: int,
    step_ms: int,
    overrides: Mapping[str, float] | None = None,
    paths: int = PATHS,
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
    seed: int = 0,
    lag: Mapping[str, float] | None = None,
    settings: Mapping[str, SettingRange] | None = None,
) -> dict[str, Trajectory]:
    """Run every model forward together from the end of ``history`` (series aligned at
    their ends, one grid). A point in ``overrides`` holds that value from the first step
    (a setpoint change); a modelled point follows its model, whose inputs may
    themselves be modelled (speed ← setpoint, level ← speed).

    An input nobody models holds its last value in the ``held`` trajectory. In the
    forecast proper, such an input that changed in the history a model was fitted on
    (``Model.changes``) changes in ``paths`` simulated futures as often and as far as it
    did then (``InputChanges.sample``, seeded; its history here should reach back over
    its longest hold, so the present hold's age is known); each modelled point adds its
    calibrated error per step. The forecast's central value is the median of those
    futures, its bands their quantiles. Without input changes to draw (none seen, or
    all overridden) the bands are the calibrated ``held ± z·σ``.

    ``lag``: per modelled point, how many grid steps before the end of its history its
    last sample was taken. The held grid value is that sample, so the model runs from
    then, and each forecast step is read that much further along its run (interpolated):
    the forecast is of the value at the step's time, not of a reading that lags it."""
    overrides = dict(overrides or {})
    bounds = dict(bounds or {})
    points = set(history) | set(overrides)
    for model in models.values():
        points.add(model.target)
        points.update(model.inputs)
    last: dict[str, Array] = {}
    for point in points:
        past = history.get(point)
        if past is None or len(past) == 0 or not np.isfinite(past[-1]):
            if point in overrides:
                past = np.asarray([overrides[point]], dtype=np.float64)
            else:
                raise ModelError(f"no history for {point}")
        last[point] = _fill_back(np.asarray(past, dtype=np.float64))
    running = {
        point: model
        for point, model in models.items()
        if point not in overrides and all(i in last for i in model.inputs)
    }
    keep = max((m.lags for m in running.values()), default=1) + 1
    shift = {p: max(0.0, float((lag or {}).get(p, 0.0))) for p in running}
    extra = math.ceil(max(shift.values(), default=0.0))
    rng = np.random.default_rng(seed)
    varied: dict[str, Array] = {}
    for point in sorted(last):
        if point in running or point in overrides:
            continue
        record = next(
            (
                m.changes[k]
                for m in running.values()
                for k, name in enumerate(m.inputs)
                if name == point and k < len(m.changes) and m.changes[k] is not None
            ),
            None,
        )
        if record is None or record.rate <= 0 or paths <= 0:
            continue
        series = last[point]
        varied[point] = record.sample(
            float(series[-1]),
            record.age(series),
            steps + extra,
            rng,
            paths,
            bounds.get(point, (None, None)),
            (settings or {}).get(point),
        )
    rows = 1 + (paths if varied else 0)  # row 0: every input held
    width = keep + steps + extra
    arrays: dict[str, Array] = {}
    for point, series in last.items():
        recent = series[-keep:]
        if len(recent) < keep:  # pad older steps with the first known value
            recent = np.concatenate([np.full(keep - len(recent), recent[0]), recent])
        block = np.empty((rows, width))
        block[:, :keep] = recent
        block[:, keep:] = overrides.get(point, recent[-1])
        if point in varied:
            block[1:, keep:] = varied[point]
        arrays[point] = block
    for t in range(keep - 1, width - 1):
        for point, model in running.items():
            value = np.full(rows, model.c)
            y = arrays[point]
            for k, coefficient in enumerate(model.a):
                value += coefficient * y[:, t - k]
            for j, coefficients in enumerate(model.b):
                u = arrays[model.inputs[j]]
                for k, coefficient in enumerate(coefficients):
                    value += coefficient * u[:, t - model.dead_time - k]
            arrays[point][:, t + 1] = value
    out: dict[str, Trajectory] = {}
    for point, block in arrays.items():
        found = running.get(point)
        if found is not None and shift[point] > 0:
            block = _advance(block[:, keep - 1 :], shift[point], steps)
        else:
            block = block[:, keep - 1 : keep + steps]
        held = block[0, 1:]
        if found is None:
            flat = _tuple(held)
            out[point] = Trajectory(point, start_ms, step_ms, flat, (0.0,) * steps, False, flat)
            continue
        ahead = np.arange(1, steps + 1)
        s95 = np.asarray([found.sigma_at(int(h)) for h in ahead])
        s80 = np.asarray([found.sigma80_at(int(h)) for h in ahead])
        futures = block[1:, 1:]
        if len(futures) == 0 or np.ptp(futures, axis=0).max(initial=0.0) == 0:
            out[point] = Trajectory(
                point,
                start_ms,
                step_ms,
                _tuple(held),
                _tuple(s95),
                True,
                _tuple(held),
                _tuple(held - Z80 * s80),
                _tuple(held + Z80 * s80),
                _tuple(held - Z95 * s95),
                _tuple(held + Z95 * s95),
            )
            continue
        # one draw per future, scaled by each step's σ: a smooth band over the horizon
        samples = futures + _fan(rng.standard_normal((len(futures), 1)), s80, s95)
        q = np.quantile(samples, [0.025, 0.10, 0.5, 0.90, 0.975], axis=0)
        out[point] = Trajectory(
            point,
            start_ms,
            step_ms,
            _tuple(q[2]),
            _tuple((q[4] - q[0]) / (2 * Z95)),
            True,
            _tuple(held),
            _tuple(q[1]),
            _tuple(q[3]),
            _tuple(q[0]),
            _tuple(q[4]),
            samples,
        )
    return out


def _advance(run: Array, shift: float, steps: int) -> Array:
    """``run`` (rows × origin and later steps) read ``shift`` steps further along:
    column h is the value at position h + shift (linear between steps)."""
    position = np.arange(steps + 1) + shift
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, run.shape[1] - 1)
    weight = position - below
    return np.asarray(run[:, below] * (1 - weight) + run[:, above] * weight)


def _tuple(values: Array) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _fill_back(values: Array) -> Array:
    """Carry the last known value over NaNs; leading NaNs take the first known value."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(len(values))
    index = np.where(finite, np.arange(len(values)), 0)
    index = np.maximum.accumulate(index)
    index[: int(np.argmax(finite))] = int(np.argmax(finite))
    return np.asarray(values[index], dtype=np.float64)


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
    """Probability that the point reaches ``limit`` within the forecast (the largest
    per-step share of simulated futures beyond it, or of the Gaussian band), and when:
    the central value, and the near and far edges of the 95 % band."""
    mean = np.asarray(trajectory.mean)
    sign = 1.0 if side == "high" else -1.0
    if sign * (current - limit) >= 0:
        return Crossing(name, limit, side, 1.0, 0.0, 0.0, 0.0, True)
    step_s = trajectory.step_ms / 1000
    if trajectory.samples is not None and len(trajectory.samples):
        beyond_share = np.mean(sign * (trajectory.samples - limit) >= 0, axis=0)
        probability = float(np.max(beyond_share))
    else:
        sigma = np.maximum(np.asarray(trajectory.sigma), 1e-12)
        scores = sign * (mean - limit) / sigma
        probability = float(max(normal_cdf(float(v)) for v in scores))
    low, high = trajectory.bands(0.95)
    near, far = (high, low) if side == "high" else (low, high)

    def first(mask: npt.NDArray[np.bool_]) -> float | None:
        hits = np.flatnonzero(mask)
        return float((hits[0] + 1) * step_s) if len(hits) else None

    return Crossing(
        name,
        limit,
        side,
        probability,
        first(sign * (mean - limit) >= 0),
        first(sign * (near - limit) >= 0),
        first(sign * (far - limit) >= 0),
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
    # Never finer than the steps in which the value is reported over the window: a model
    # fitted on a steady plant has a σ of micro-units, and ordinary noise (or a value
    # carried over a restart's gap) would be thousands of σ (the demo raised "model"
    # alarms on every drifting-by-noise point after a restart).
    moves = np.abs(np.diff(y[span]))
    moves = moves[moves > 0]
    resolution = float(np.median(moves)) if len(moves) else 0.0
    sigma = max(model.sigma_at(window_steps), resolution, 1e-9)
    return Residual(model.target, float(forecast[0, -1]), float(y[-1]), sigma, window_steps)
