"""The twin's predictions wired to its history: fit, forecast, what-if, compare, risk
and model drift. The maths is in hub/models.py (pure numpy); this module reads the
history it needs from the store and shapes answers for the API, the CLI, the
operator channel and the sync report. See docs/prediction.md.

Who calls what:

- the hub's model loop (hub/runtime.py) loads history on the database thread, with the
  spans of it drift findings flagged as wrong readings (``ModelBank.load``), fits off it
  with those spans left out (``ModelBank.fit_all``, numpy, another thread) and installs
  the models (``ModelBank.install``: memory and the ``models`` table); every few
  seconds it marks the models fitted on flagged history they did not leave out
  (``ModelBank.screen``: refitted at once, not judging until then) and measures the
  others' misses (``ModelBank.misses``), which the drift engine turns into
  ``semantic.model`` findings;
- ``forecast``, ``simulate``, ``risk``: the service (live hub) and the read-only file
  reader (hub not running) call the same functions.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fieldtwin.hub import models
from fieldtwin.hub.config import HubConfig, PredictionConfig
from fieldtwin.hub.drift import ModelMiss
from fieldtwin.hub.errors import QueryError
from fieldtwin.hub.models import Array, Model, ModelError, Trajectory
from fieldtwin.hub.queries import iso
from fieldtwin.hub.storage import TwinStorePort
from fieldtwin.protocol.logfmt import fields

log = logging.getLogger("fieldtwin.hub.predict")

Point = tuple[str, str]
FORECAST_ROWS = 10
"""Rows a forecast table shows (evenly spaced to the horizon)."""
ON_DEMAND_KEPT = 256
"""Trend models fitted on request (attributes with no declared influence and no
limits) that the bank keeps; beyond it the least recently fitted is dropped."""
BASIS = (
    "expected: the median of simulated futures in which the setpoints nobody models "
    "change as often and as far as they did in the history; 80/95 % bands: their "
    "quantiles with the model's calibrated error; held: every input kept at its present value"
)
WHAT_IF_BASIS = (
    "the set values are held; other setpoints nobody models may change as they did in "
    "the history (expected: the median of those futures; 95 %: their quantiles); "
    "without_change: the same with the set points held at their present values"
)


class PredictionError(QueryError):
    """A prediction cannot be made: unknown point, no history, not numeric."""


def label(point: Point) -> str:
    return f"{point[0]}.{point[1]}"


def parse_point(text: str) -> Point:
    entity, dot, attribute = text.strip().rpartition(".")
    if not dot or not entity or not attribute:
        raise PredictionError(f"{text!r}: expected ENTITY.ATTRIBUTE, e.g. tank-1.level")
    return entity, attribute


FLAGGING_RULES = ("semantic.frozen", "semantic.implausible", "semantic.rate")
"""Drift findings that say an attribute's readings were wrong while they were open: a
fit leaves that history out (docs/prediction.md, "History the twin flagged"). Not
``semantic.model`` (the model's own verdict: counting it would keep a model from ever
learning a real change of the plant), nor thresholds (true states of the plant), nor
temporal or structural findings (missing data, the schema)."""


@dataclass(frozen=True, slots=True)
class Flagged:
    """History of one point (``entity.attribute``) a drift finding flagged: from
    ``start_ms`` (its detection less the drift interval it may have waited for, and for
    a frozen reading less ``frozen_after_s``, the stillness that made it one) to
    ``end_ms`` (cleared, or when it was read while still open). ``still``: for a frozen
    reading, how far the value may move and still be the stuck one (the span reaches
    further back over the readings that held it, to where the value last changed)."""

    point: str
    rule: str
    start_ms: int
    end_ms: int
    detected_ms: int
    still: float | None = None


@dataclass(frozen=True, slots=True)
class FitHistory:
    """What a refit reads on the database thread: the grid times, each point's history
    on the grid, and the spans drift findings flagged (left out on the worker thread)."""

    times: Array
    grids: dict[str, Array]
    flagged: tuple[Flagged, ...] = ()


def load_flagged(
    store: TwinStorePort,
    config: HubConfig,
    points: Iterable[Point],
    start_ms: int,
    end_ms: int,
) -> tuple[Flagged, ...]:
    """The spans of ``points``' history in [start, end] that ``FLAGGING_RULES`` findings
    flagged, as known at ``end_ms`` (a fit as of a past time does not see later ones)."""
    wanted = set(points)
    if not wanted:
        return ()
    rows = store.finding_spans(
        FLAGGING_RULES,
        sorted({e for e, _ in wanted}),
        sorted({a for _, a in wanted}),
        start_ms,
        end_ms,
    )
    interval = round(config.drift.interval_s * 1000)  # a finding waits up to one cycle
    out: list[Flagged] = []
    for rule, entity, attribute, detected, cleared in rows:
        point = (str(entity), str(attribute))
        if point not in wanted:
            continue
        lead, still = interval, None
        if rule == "semantic.frozen":
            # frozen is found ``frozen_after_s`` after the value stopped (at least)
            spec = config.schema.spec(*point)
            if spec is not None:
                lead += round((spec.frozen_after_s or 0.0) * 1000)
            still = spec.frozen_min_change if spec is not None else 0.0
        end = min(int(cleared), end_ms) if cleared is not None else end_ms
        out.append(
            Flagged(label(point), str(rule), int(detected) - lead, end, int(detected), still)
        )
    return tuple(out)


def exclude(
    times: Array, grids: Mapping[str, Array], flagged: Iterable[Flagged]
) -> dict[str, Array]:
    """``grids`` with every flagged span set to NaN (unknown): a model's regression
    rows, backtest origins and input change records then skip it, as they skip any
    gap, instead of the zero-order hold carrying a wrong value (or the last good one)
    over it. A frozen span reaches back over the readings that held the stuck value."""
    out = dict(grids)
    for span in flagged:
        original = grids.get(span.point)
        if original is None or not len(original):
            continue
        first = int(np.searchsorted(times, span.start_ms, side="left"))
        last = int(np.searchsorted(times, span.end_ms, side="right"))
        if span.still is not None and first < len(original):
            # (on the readings as reported: another span may already hide some of them)
            stuck = original[min(int(np.searchsorted(times, span.detected_ms)), len(original) - 1)]
            moved = np.flatnonzero(~(np.abs(original[:first] - stuck) <= span.still))
            first = int(moved[-1]) + 1 if len(moved) else 0
        if last <= first:
            continue
        series = out[span.point]
        if series is original:  # copy once, before the first change
            series = original.copy()
            out[span.point] = series
        series[first:last] = np.nan
    return out


def load_grids(
    store: TwinStorePort, points: Iterable[Point], start_ms: int, end_ms: int, step_ms: int
) -> tuple[Array, dict[str, Array]]:
    """Each point's good/uncertain numeric history on one grid (zero-order hold), with the
    last sample before the window as its starting value."""
    times, out, _ = load_sampled(store, points, start_ms, end_ms, step_ms, gap_steps=0)
    return times, out


GAP_STEPS = 60
"""Grid steps before a forecast's origin over which each point's usual gap between
samples is judged (``load_sampled``), however few steps its models need: a forecast
reads only a model's lags plus two (four steps for a first-order model), which holds
two samples of a point polled every two steps, too few to know it is polled."""


def load_sampled(
    store: TwinStorePort,
    points: Iterable[Point],
    start_ms: int,
    end_ms: int,
    step_ms: int,
    *,
    gap_steps: int = GAP_STEPS,
) -> tuple[Array, dict[str, Array], dict[str, float]]:
    """``load_grids``, and per point how many grid steps before ``end_ms`` its last
    sample was taken, at most its usual gap between samples (a point reported on change
    that did not change is not late; 0 with fewer than 3 samples). The gap is judged
    over the window, or over the last ``gap_steps`` grid steps when that reaches
    further back."""
    times = models.grid(start_ms, end_ms, step_ms)
    out: dict[str, Array] = {}
    late: dict[str, float] = {}
    wanted = sorted(set(points))
    if not wanted:
        return times, out, late
    entities = sorted({e for e, _ in wanted})
    attributes = sorted({a for _, a in wanted})
    gap_from = min(start_ms, end_ms - gap_steps * step_ms)
    rows = store.numeric_samples(entities, attributes, gap_from, end_ms)
    before = store.numeric_before(entities, attributes, gap_from)
    series: dict[Point, tuple[list[int], list[float]]] = {p: ([], []) for p in wanted}
    for entity, attribute, ts_ms, v in before:
        if (entity, attribute) in series and v is not None:
            series[(entity, attribute)][0].append(int(ts_ms))
            series[(entity, attribute)][1].append(float(v))
    for entity, attribute, ts_ms, v in rows:
        target = series.get((entity, attribute))
        if target is not None and v is not None and math.isfinite(v):
            target[0].append(int(ts_ms))
            target[1].append(float(v))
    for point, (ts, vals) in series.items():
        out[label(point)] = models.resample(ts, vals, times)
        inside = [t for t in ts if gap_from <= t <= end_ms]
        if len(inside) >= 3:
            usual = float(np.median(np.diff(inside)))
            late[label(point)] = min(end_ms - inside[-1], usual) / step_ms
        else:
            late[label(point)] = 0.0
    return times, out, late


@dataclass(slots=True)
class ModelBank:
    """The hub's fitted models, when they were fitted, and what could not be fitted."""

    config: HubConfig
    models: dict[str, Model] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    refitted_ms: int = 0
    _over: dict[str, int] = field(default_factory=dict)
    on_demand: dict[str, int] = field(default_factory=dict)
    """Targets of trend models fitted on request (not on the refit schedule), oldest
    fit first, with when each was fitted."""
    suspect: dict[str, str] = field(default_factory=dict)
    """Models fitted on history a drift finding flags that their fit did not leave out
    (a finding detected after the fit, or a model stored before fits left any out), with
    why: model drift does not judge with them, and they are refitted at once."""

    @property
    def settings(self) -> PredictionConfig:
        return self.config.prediction

    @property
    def step_ms(self) -> int:
        return max(1, round(self.settings.step_s * 1000))  # ms

    def horizon_steps(self, horizon_ms: int | None = None) -> int:
        horizon = horizon_ms if horizon_ms is not None else self.settings.horizon_s * 1000
        return max(1, math.ceil(horizon / self.step_ms))

    # -- which points are modelled --------------------------------------------------------

    def influenced(self) -> dict[Point, tuple[Point, ...]]:
        return {i.target: i.inputs for i in self.settings.influences}

    def trend_points(self) -> list[Point]:
        """Numeric attributes with thresholds and no declared influence: a trend model
        each on the refit schedule, so the forecasted risk covers every limit the schema
        declares. Other attributes with no influence get theirs on request (``remember``):
        the schedule's cost stays bounded by what the schema declares."""
        schema = self.config.schema
        influenced = self.influenced()
        out: list[Point] = []
        for entity, spec_entity in schema.entities.items():
            for name, spec in schema.types[spec_entity.type].attributes.items():
                point = (entity, name)
                if point in influenced or spec.writable or not spec.has_thresholds:
                    continue
                if spec.unit == "" and spec.high.warning == 1:  # a switch, not a quantity
                    continue
                out.append(point)
        return out

    def not_trended(self, point: Point) -> str | None:
        """Why ``point`` gets no trend model (None: it may have one). A writable
        attribute (a setpoint) moves when an operator moves it: a trend fitted to its
        history would extrapolate their past steps; its future is a decision, which
        ``twin simulate`` asks about."""
        spec = self.config.schema.spec(*point)
        if spec is not None and spec.writable and point not in self.influenced():
            return (
                f"{label(point)} is a setpoint (writable): it changes when an operator "
                "changes it, so it gets no trend model; ask what setting it does with "
                f"twin simulate --set {label(point)}=VALUE"
            )
        return None

    def remember(self, fitted: Mapping[str, Model], now_ms: int) -> None:
        """Keep trend models fitted on request (memory only: refitted on the next
        request after ``refit_s``), at most ``ON_DEMAND_KEPT`` of them."""
        for target, model in fitted.items():
            self.models[target] = model
            self.on_demand.pop(target, None)
            self.on_demand[target] = now_ms
        while len(self.on_demand) > ON_DEMAND_KEPT:
            oldest = next(iter(self.on_demand))
            del self.on_demand[oldest]
            self.models.pop(oldest, None)

    def fresh(self, target: str, now_ms: int) -> bool:
        """A model of ``target`` the bank holds and may use now: a scheduled one always
        (the schedule refits it), one fitted on request for ``refit_s``."""
        if target not in self.models:
            return False
        fitted = self.on_demand.get(target)
        return fitted is None or now_ms - fitted < self.settings.refit_s * 1000

    def all_points(self) -> list[Point]:
        points: set[Point] = set(self.trend_points())
        for target, inputs in self.influenced().items():
            points.add(target)
            points.update(inputs)
        return sorted(points)

    def chain(self, point: Point) -> set[Point]:
        """The point and everything its model (transitively) depends on."""
        influenced = self.influenced()
        seen: set[Point] = set()
        todo = [point]
        while todo:
            item = todo.pop()
            if item in seen:
                continue
            seen.add(item)
            todo.extend(influenced.get(item, ()))
        return seen

    def downstream(self, points: Iterable[Point]) -> list[Point]:
        """Every modelled point that (transitively) depends on one of ``points``."""
        influenced = self.influenced()
        found: set[Point] = set()
        frontier = set(points)
        while frontier:
            nxt = {t for t, inputs in influenced.items() if frontier & set(inputs)} - found
            found |= nxt
            frontier = nxt
        return sorted(found)

    # -- fitting ------------------------------------------------------------------------

    def due(self, now_ms: int) -> bool:
        """Refit every ``refit_s``; every 30 s while some model is missing (the first
        fit needs 30 grid steps), every minute while one is young (fitted on less than
        half the history window and under an hour of steps): a young twin's models
        improve quickly as history grows."""
        every = self.settings.refit_s
        young = any(
            m.samples * m.step_ms < 0.5 * self.settings.history_s * 1000 and m.samples < 3600
            for target, m in self.models.items()
            if target not in self.on_demand  # refitted on request, not on the schedule
        )
        if self.errors or not self.models or self.suspect:
            every = min(every, 30.0)
        elif young:
            every = min(every, 60.0)
        return bool(now_ms - self.refitted_ms >= every * 1000)

    def load(self, store: TwinStorePort, now_ms: int) -> FitHistory:
        """The history a refit needs (database thread): grids and flagged spans."""
        start = now_ms - round(self.settings.history_s * 1000)
        points = self.all_points()
        times, grids = load_grids(store, points, start, now_ms, self.step_ms)
        return FitHistory(times, grids, load_flagged(store, self.config, points, start, now_ms))

    def fit_all(self, history: FitHistory, now_ms: int) -> tuple[dict[str, Model], dict[str, str]]:
        """Fit every declared influence and trend point on ``history`` less what drift
        findings flagged (pure: no store, no state; the worker thread's part)."""
        return fit_points(
            self.influenced(),
            self.trend_points(),
            history,
            step_ms=self.step_ms,
            horizon_steps=self.horizon_steps(),
            now_ms=now_ms,
        )

    def install(
        self,
        store: TwinStorePort | None,
        fitted: Mapping[str, Model],
        errors: Mapping[str, str],
        now_ms: int,
    ) -> None:
        self.models.update(fitted)
        for target in fitted:
            self.errors.pop(target, None)
            self.suspect.pop(target, None)
        for target, error in errors.items():
            if target not in fitted:
                self.errors[target] = error
        self.refitted_ms = now_ms
        if store is not None and fitted:
            store.save_models([(m.target, m.fitted_ms, m.to_dict()) for m in fitted.values()])
        for model in fitted.values():
            log.info("model fitted", extra=fields(target=model.target, model=model.describe()))

    def restore(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Models saved by an earlier run, kept while their inputs still match the config."""
        influenced = {
            label(t): tuple(label(i) for i in ins) for t, ins in self.influenced().items()
        }
        trends = {label(p) for p in self.trend_points()}
        for row in rows:
            try:
                model = Model.from_dict(row)
            except (KeyError, TypeError, ValueError):
                continue
            if influenced.get(model.target) == model.inputs or (
                model.target in trends and not model.inputs
            ):
                self.models[model.target] = model
                self.refitted_ms = max(self.refitted_ms, model.fitted_ms)

    def screen(self, flagged: Iterable[Flagged]) -> dict[str, str]:
        """Mark the models whose fit window [fitted - history_s, fitted] overlaps a
        flagged span on their target or inputs that their fit did not leave out: one
        detected after the fit (``screened_ms``), or any, for a model stored before fits
        left flagged history out. Returns the suspects (also kept in ``suspect``)."""
        history_ms = round(self.settings.history_s * 1000)
        spans: dict[str, list[Flagged]] = {}
        for span in flagged:
            spans.setdefault(span.point, []).append(span)
        found: dict[str, str] = {}
        for target, model in self.models.items():
            if target in self.on_demand:  # refitted on request, not on the schedule
                continue
            known = model.screened_ms if model.screened_ms is not None else -math.inf
            start = model.fitted_ms - history_ms
            for point in (target, *model.inputs):
                hit = next(
                    (
                        f
                        for f in spans.get(point, ())
                        if f.detected_ms > known
                        and f.start_ms <= model.fitted_ms
                        and f.end_ms >= start
                    ),
                    None,
                )
                if hit is not None:
                    found[target] = (
                        f"fitted {iso(model.fitted_ms)} on history of {point} that "
                        f"{hit.rule} flags (detected {iso(hit.detected_ms)})"
                    )
                    break
        for target in set(found) - set(self.suspect):
            log.info("model refit due", extra=fields(target=target, reason=found[target]))
        self.suspect = found
        return found

    def screen_window_ms(self, now_ms: int) -> int:
        """From when ``screen`` needs the flagged spans: the oldest model's fit window."""
        oldest = min((m.fitted_ms for m in self.models.values()), default=now_ms)
        return min(oldest, now_ms) - round(self.settings.history_s * 1000)

    # -- model drift --------------------------------------------------------------------

    def recent_window_ms(self) -> int:
        lags = max((m.lags for m in self.models.values()), default=1)
        window = round(self.settings.residual_window_s * 1000)
        return window + (lags + 2) * self.step_ms

    def misses(
        self,
        grids: Mapping[str, Array],
        now_ms: int,
        watched_from: Mapping[str, int] | None = None,
    ) -> dict[Point, ModelMiss]:
        """Sustained misses of the influence models over the recent window (``grids``
        holds the last ``recent_window_ms``, flagged spans unknown: a window that
        reaches into one is not judged). Suspect models do not judge.

        ``watched_from``: per point, since when the hub has watched it without a break
        (this hub run's start, its gateway's last birth). A window that starts earlier
        reaches over a time nobody watched: after a restart of the plant's processes
        the values before and after the gap are not one run of the plant, and a model
        run across it would report the jump as a mismatch."""
        settings = self.settings
        window_steps = max(1, round(settings.residual_window_s * 1000 / self.step_ms))
        watched = watched_from or {}
        out: dict[Point, ModelMiss] = {}
        for target in self.influenced():
            name = label(target)
            model = self.models.get(name)
            y = grids.get(name)
            # No R² gate here: on a plant that sits still R² is near 0 whatever the model,
            # yet its σ is small and a leak stands far out of it. The threshold is in
            # units of the model's own backtest σ, so a poor model judges loosely.
            if model is None or y is None or name in self.suspect:
                self._over.pop(name, None)
                continue
            begins = now_ms - (window_steps + model.lags) * self.step_ms
            if any(watched.get(point, 0) > begins for point in (name, *model.inputs)):
                self._over.pop(name, None)
                continue
            inputs = [grids.get(i) for i in model.inputs]
            if any(series is None for series in inputs):
                continue
            u = np.vstack([s for s in inputs if s is not None])
            residual = models.window_residual(model, y, u, window_steps)
            if residual is None or residual.score <= settings.residual_k:
                self._over.pop(name, None)
                continue
            since = self._over.setdefault(name, now_ms)
            if now_ms - since < settings.residual_hold_s * 1000:
                continue
            shown = ", ".join(
                f"{i}={series[-1]:.4g}"
                for i, series in zip(model.inputs, inputs, strict=True)
                if series is not None
            )
            out[target] = ModelMiss(
                expected=residual.expected,
                observed=residual.observed,
                sigma=residual.sigma,
                window_s=settings.residual_window_s,
                since_ms=since,
                model=model.describe(),
                inputs=shown,
            )
        return out


def fit_points(
    influenced: Mapping[Point, Sequence[Point]],
    trends: Sequence[Point],
    history: FitHistory,
    *,
    step_ms: int,
    horizon_steps: int,
    now_ms: int,
) -> tuple[dict[str, Model], dict[str, str]]:
    """Fit each influence and trend on ``history`` with its flagged spans left out (a
    span on an input leaves out the target's rows too: a row needs every value known)."""
    grids = exclude(history.times, history.grids, history.flagged)
    fitted: dict[str, Model] = {}
    errors: dict[str, str] = {}
    jobs: list[tuple[str, list[str]]] = [
        (label(t), [label(i) for i in inputs]) for t, inputs in influenced.items()
    ]
    jobs += [(label(p), []) for p in trends]
    for target, inputs in jobs:
        y = grids.get(target)
        if y is None:
            errors[target] = f"{target}: no history"
            continue
        u = (
            np.vstack([grids[i] for i in inputs])
            if inputs and all(i in grids for i in inputs)
            else np.zeros((0, len(y)))
        )
        if inputs and u.shape[0] != len(inputs):
            errors[target] = (
                f"{target}: no history of {', '.join(i for i in inputs if i not in grids)}"
            )
            continue
        started = time.perf_counter()
        try:
            model = models.fit(
                target, inputs, y, u, step_ms=step_ms, horizon_steps=horizon_steps, now_ms=now_ms
            )
            fitted[target] = replace(model, fit_s=time.perf_counter() - started, screened_ms=now_ms)
        except ModelError as exc:
            errors[target] = str(exc)
    return fitted, errors


# -- answers ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Context:
    """What a prediction needs besides the bank: the store, the time, the config."""

    store: TwinStorePort
    config: HubConfig
    now_ms: int


def _spec(config: HubConfig, point: Point) -> Any:
    spec = config.schema.spec(*point)
    if spec is None:
        declared = config.schema.entities.get(point[0])
        if declared is None:
            close = difflib.get_close_matches(point[0], list(config.schema.entities), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise PredictionError(f"{point[0]!r} is not a declared entity{hint}")
        raise PredictionError(
            f"{point[1]!r} is not an attribute of {point[0]} (type {declared.type}); "
            f"it has {', '.join(sorted(config.schema.types[declared.type].attributes))}"
        )
    return spec


def _models_for(
    bank: ModelBank,
    ctx: Context,
    chain: set[Point],
    targets: set[Point],
    at_ms: int | None,
    fit_missing: bool = True,
) -> tuple[dict[str, Model], dict[str, str]]:
    """The models a forecast of ``targets`` runs: every influenced point of ``chain`` and
    a trend model for a target nobody declared an influence for. Inputs with neither
    (setpoints) hold their value. The bank's models (live), or models fitted now on
    history before ``at_ms`` only (a comparison must not see the future it is judged
    against)."""
    influenced = bank.influenced()
    wanted_influenced = {p: influenced[p] for p in chain if p in influenced}
    wanted_trends = [p for p in targets if p not in influenced]
    for point in wanted_trends:
        reason = bank.not_trended(point)
        if reason is not None:
            raise PredictionError(reason)
    if at_ms is None:
        wanted = [*wanted_influenced, *wanted_trends]
        have = {label(p): bank.models[label(p)] for p in wanted if bank.fresh(label(p), ctx.now_ms)}
        missing_influenced = {p: i for p, i in wanted_influenced.items() if label(p) not in have}
        missing_trends = [p for p in wanted_trends if label(p) not in have]
        if not missing_influenced and not missing_trends:
            return have, {}
        if not fit_missing:  # the model loop's job; a request does not wait for a fit
            missing = [label(p) for p in [*missing_influenced, *missing_trends]]
            when = iso(bank.refitted_ms) if bank.refitted_ms else "never"
            why = {
                m: f"no model of {m} yet (last fit {when}: "
                f"{bank.errors.get(m, 'not attempted')}; the hub retries every 30 s)"
                for m in missing
            }
            return have, why
        end = ctx.now_ms
    else:
        have = {}
        missing_influenced = wanted_influenced
        missing_trends = wanted_trends
        end = at_ms
    needed = set(missing_trends) | {x for t, i in missing_influenced.items() for x in (t, *i)}
    start = end - round(bank.settings.history_s * 1000)
    times, grids = load_grids(ctx.store, needed, start, end, bank.step_ms)
    flagged = load_flagged(ctx.store, ctx.config, needed, start, end)
    fitted, errors = fit_points(
        missing_influenced,
        missing_trends,
        FitHistory(times, grids, flagged),
        step_ms=bank.step_ms,
        horizon_steps=bank.horizon_steps(),
        now_ms=end,
    )
    have.update(fitted)
    if at_ms is None:
        # trends of attributes off the refit schedule: fitted on this request, kept for
        # the next ones (a site's many points cost a fit only when someone asks)
        scheduled = set(bank.trend_points())
        bank.remember(
            {
                label(p): fitted[label(p)]
                for p in missing_trends
                if p not in scheduled and label(p) in fitted
            },
            ctx.now_ms,
        )
    return have, errors


def _trajectories(
    bank: ModelBank,
    ctx: Context,
    points: set[Point],
    origin_ms: int,
    steps: int,
    overrides: Mapping[str, float],
    at_ms: int | None,
    fit_missing: bool = True,
) -> tuple[dict[str, Trajectory], dict[str, Model], dict[str, str]]:
    chain: set[Point] = set()
    for point in points:
        chain |= bank.chain(point)
    fitted, errors = _models_for(bank, ctx, chain, points, at_ms, fit_missing)
    lags = max((m.lags for m in fitted.values()), default=1) + 2
    start = origin_ms - lags * bank.step_ms
    _, history, late = load_sampled(ctx.store, chain, start, origin_ms, bank.step_ms)
    # inputs nobody models change in the forecast as they did in the history; how long
    # the present value has been held matters (a renewal), so read back over the
    # longest hold seen (capped by the history window)
    exogenous = {p for p in chain if label(p) not in fitted}
    reach = max(
        (
            max(c.holds, default=0)
            for m in fitted.values()
            for c in m.changes
            if c is not None and c.rate > 0
        ),
        default=0,
    )
    reach = min(reach + 2, bank.horizon_steps(round(bank.settings.history_s * 1000)))
    if exogenous and reach > lags:
        _, longer = load_grids(
            ctx.store, exogenous, origin_ms - reach * bank.step_ms, origin_ms, bank.step_ms
        )
        history.update(longer)
    usable = {k: v for k, v in history.items() if len(v) and np.isfinite(v[-1])}
    missing = sorted(
        label(p) for p in points if label(p) not in usable and label(p) not in overrides
    )
    if missing:
        raise PredictionError(
            f"no good numeric value of {', '.join(missing)} before {iso(origin_ms)}: "
            "nothing to predict from"
        )
    runnable = {
        name: m
        for name, m in fitted.items()
        if all(i in usable or i in overrides for i in m.inputs)
    }
    physical = ctx.config.schema.physical
    bounds = {
        label(p): (r.low, r.high)
        for p in chain
        if (r := physical.get(p)) is not None and label(p) not in fitted
    }
    settings = {label(p): s for p in chain if (s := setting_range(ctx, p)) is not None}
    trajectories = models.simulate(
        runnable,
        usable,
        steps,
        start_ms=origin_ms,
        step_ms=bank.step_ms,
        overrides=overrides,
        bounds=bounds,
        lag={name: late.get(name, 0.0) for name in runnable},
        settings=settings,
    )
    for name, trajectory in list(trajectories.items()):
        found = physical.get(parse_point(name))
        if found is not None and trajectory.modelled:
            trajectories[name] = clamp(trajectory, found.low, found.high)
    return trajectories, runnable, errors


def setting_range(ctx: Context, point: Point) -> models.SettingRange | None:
    """The range an operator may set ``point`` to: a writable attribute's declared
    ``min``/``max`` and one command's ``max_step`` (None when not both declared)."""
    spec = ctx.config.schema.spec(*point)
    if spec is None or not spec.writable or spec.min is None or spec.max is None:
        return None
    step = spec.command.max_step if spec.command is not None else None
    return models.SettingRange(spec.min, spec.max, step)


def clamp(trajectory: Trajectory, low: float | None, high: float | None) -> Trajectory:
    """A linear model knows no walls: a level forecast stops at the tank's height (the
    schema's physical range), and its bands (and simulated futures) are cut there too."""
    lo = -np.inf if low is None else low
    hi = np.inf if high is None else high
    parts = {
        "mean": trajectory.mean,
        "held": trajectory.held,
        "low80": trajectory.low80,
        "high80": trajectory.high80,
        "low95": trajectory.low95,
        "high95": trajectory.high95,
    }
    clipped = {k: tuple(float(x) for x in np.clip(v, lo, hi)) for k, v in parts.items()}
    if clipped == parts:
        return trajectory
    low95, high95 = (np.clip(b, lo, hi) for b in trajectory.bands(0.95))
    low80, high80 = (np.clip(b, lo, hi) for b in trajectory.bands(0.8))
    samples = trajectory.samples
    return dataclasses.replace(
        trajectory,
        mean=clipped["mean"],
        held=clipped["held"],
        sigma=tuple(float(v) for v in (high95 - low95) / (2 * models.Z95)),
        low80=tuple(float(v) for v in low80),
        high80=tuple(float(v) for v in high80),
        low95=tuple(float(v) for v in low95),
        high95=tuple(float(v) for v in high95),
        samples=np.clip(samples, lo, hi) if samples is not None else None,
    )


def _limits(spec: Any) -> list[tuple[str, float, str]]:
    out: list[tuple[str, float, str]] = []
    for side, limits in (("high", spec.high), ("low", spec.low)):
        for level in ("warning", "critical"):
            value = getattr(limits, level)
            if value is not None:
                out.append((f"{level} {side}", float(value), side))
    return out


def _crossings(trajectory: Trajectory, current: float, spec: Any) -> list[dict[str, Any]]:
    rows = []
    for name, limit, side in _limits(spec):
        found = models.crossing(trajectory, current, name, limit, side)
        if found.probability < 0.01:
            continue
        row = found.to_dict()
        row["text"] = crossing_text(found, spec.unit)
        rows.append(row)
    rows.sort(key=lambda r: (-r["probability"], r["eta_s"] if r["eta_s"] is not None else 1e18))
    return rows


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


def crossing_text(found: models.Crossing, unit: str) -> str:
    """ "warning high 4.2 m in about 6 min (4–9 min)", as an operator reads it."""
    limit = f"{found.name} {found.limit:g}{(' ' + unit) if unit else ''}"
    if found.already:
        return f"{limit}: already beyond"
    chance = f"{found.probability:.0%} chance"
    if found.eta_s is None:
        early = f"; possibly from {_minutes(found.earliest_s)}" if found.earliest_s else ""
        return f"{limit}: not expected within the horizon ({chance}{early})"
    latest = _minutes(found.latest_s) if found.latest_s is not None else "beyond the horizon"
    earliest = _minutes(found.earliest_s or found.eta_s)
    return f"{limit} in about {_minutes(found.eta_s)}, {earliest}–{latest} ({chance})"


def _rows(trajectory: Trajectory, steps: int) -> list[dict[str, Any]]:
    picks = sorted({max(1, round(steps * k / FORECAST_ROWS)) for k in range(1, FORECAST_ROWS + 1)})
    rows = []
    for h in picks:
        mean, _ = trajectory.at(h)
        held = trajectory.held[min(h, len(trajectory.held)) - 1] if trajectory.held else mean
        rows.append(
            {
                "in_s": h * trajectory.step_ms / 1000,
                "ts": iso(trajectory.start_ms + h * trajectory.step_ms),
                "ts_ms": trajectory.start_ms + h * trajectory.step_ms,
                "mean": mean,
                "held": held,
                "p80": list(trajectory.interval(h, 0.8)),
                "p95": list(trajectory.interval(h, 0.95)),
            }
        )
    return rows


def _model_row(model: Model | None, error: str | None) -> dict[str, Any] | None:
    if model is None:
        return {"error": error} if error else None
    row = model.to_dict()
    del row["horizon_sigma"]
    row["fitted"] = iso(model.fitted_ms)
    row["description"] = model.describe()
    return row


def forecast(
    bank: ModelBank, ctx: Context, target: str, horizon_ms: int, at_ms: int | None = None
) -> dict[str, Any]:
    """``twin predict``: the forecast of one attribute with 80/95 % intervals and the
    limits it may cross; with ``at_ms`` in the past, also what really happened."""
    if not bank.settings.enabled:
        raise PredictionError("prediction is disabled in this hub's config ([prediction])")
    point = parse_point(target)
    spec = _spec(ctx.config, point)
    if at_ms is not None and at_ms >= ctx.now_ms:
        at_ms = None
    origin = at_ms if at_ms is not None else ctx.now_ms
    steps = bank.horizon_steps(horizon_ms)
    trajectories, fitted, errors = _trajectories(bank, ctx, {point}, origin, steps, {}, at_ms)
    name = label(point)
    trajectory = trajectories[name]
    if not trajectory.modelled:  # a held value with no interval is not a forecast
        raise PredictionError(
            f"no model of {name} yet: {errors.get(name) or 'its inputs have no history'}"
        )
    _, now_grid = load_grids(ctx.store, [point], origin - bank.step_ms, origin, bank.step_ms)
    current = float(now_grid[name][-1])
    model = fitted.get(name)
    weak = _weakest(bank, fitted, point)
    result: dict[str, Any] = {
        **({"untrusted": weak} if weak else {}),
        "point": name,
        "unit": spec.unit,
        "from": iso(origin),
        "from_ms": origin,
        "horizon_s": steps * bank.step_ms / 1000,
        "current": current,
        "model": _model_row(model, errors.get(name)),
        "basis": BASIS,
        "forecast": _rows(trajectory, steps),
        "crossings": _crossings(trajectory, current, spec),
    }
    if at_ms is not None:
        result["comparison"] = _compare(bank, ctx, point, trajectory, steps, model)
    return result


def _compare(
    bank: ModelBank,
    ctx: Context,
    point: Point,
    trajectory: Trajectory,
    steps: int,
    model: Model | None,
) -> dict[str, Any]:
    """Forecast against what devices reported afterwards (and the naive last value)."""
    start = trajectory.start_ms
    end = min(start + steps * bank.step_ms, ctx.now_ms)
    _, grids = load_grids(ctx.store, [point], start, end, bank.step_ms)
    actual = grids[label(point)][1:]
    count = min(len(actual), len(trajectory.mean))
    if count == 0:
        return {"error": "nothing was reported after that time yet"}
    mean = np.asarray(trajectory.mean[:count])
    truth = actual[:count]
    known = np.isfinite(truth)
    errors = np.abs(mean - truth)[known]
    naive = np.abs(float(grids[label(point)][0]) - truth)[known]  # the value at T held
    low80, high80 = (b[:count] for b in trajectory.bands(0.8))
    low95, high95 = (b[:count] for b in trajectory.bands(0.95))
    inside80 = ((low80 <= truth) & (truth <= high80))[known]
    inside95 = ((low95 <= truth) & (truth <= high95))[known]
    replay = _replay(model, ctx, start, count, bank.step_ms)
    rows = []
    for row in _rows(trajectory, steps):
        index = round(row["in_s"] * 1000 / bank.step_ms) - 1
        if index < count and np.isfinite(truth[index]):
            row["actual"] = float(truth[index])
            if replay is not None:
                row["replay"] = float(replay[index])
            rows.append(row)
    replay_errors = np.abs(replay - truth)[known] if replay is not None else np.asarray([])
    return {
        "until": iso(start + count * bank.step_ms),
        "samples": int(known.sum()),
        "mae": float(errors.mean()) if len(errors) else None,
        "naive_mae": float(naive.mean()) if len(naive) else None,
        "replay_mae": float(replay_errors.mean()) if len(replay_errors) else None,
        "coverage_80": float(inside80.mean()) if len(inside80) else None,
        "coverage_95": float(inside95.mean()) if len(inside95) else None,
        "rows": rows,
    }


def _replay(model: Model | None, ctx: Context, start: int, count: int, step_ms: int) -> Any:
    """The model driven by the inputs that really happened after ``start`` (how good
    the model is, apart from what nobody could know then: later setpoint changes)."""
    if model is None or not model.inputs:
        return None
    points = [parse_point(model.target), *(parse_point(i) for i in model.inputs)]
    lags = model.lags + 2
    _, grids = load_grids(
        ctx.store, points, start - lags * step_ms, start + count * step_ms, step_ms
    )
    y = grids[model.target]
    u = np.vstack([grids[i] for i in model.inputs])
    origin = np.asarray([lags], dtype=np.int64)
    if not (np.all(np.isfinite(u)) and np.all(np.isfinite(y[: lags + 1]))):
        return None
    return models.free_run(model, y, u, origin, count)[0]


def simulate(
    bank: ModelBank,
    ctx: Context,
    sets: Mapping[str, float],
    horizon_ms: int,
    *,
    fit_missing: bool = True,
) -> dict[str, Any]:
    """``twin simulate``: hold the given values from now and predict what they do to
    every attribute they influence, against the same horizon without the change."""
    if not bank.settings.enabled:
        raise PredictionError("prediction is disabled in this hub's config ([prediction])")
    if not sets:
        raise PredictionError("give at least one --set ENTITY.ATTRIBUTE=VALUE")
    points = {parse_point(p): float(v) for p, v in sets.items()}
    for point in points:
        _spec(ctx.config, point)
    affected = [p for p in bank.downstream(points) if p not in points]
    if not affected:
        raise PredictionError(
            f"nothing in [[influences]] depends on {', '.join(label(p) for p in points)}: "
            "no model to simulate with"
        )
    steps = bank.horizon_steps(horizon_ms)
    overrides = {label(p): v for p, v in points.items()}
    now = ctx.now_ms
    # without the change: the set points held at their present values, the rest as in
    # the what-if, so the two differ by the operator's change only
    _, present = load_grids(ctx.store, list(points), now - bank.step_ms, now, bank.step_ms)
    unchanged = {
        label(p): float(present[label(p)][-1])
        for p in points
        if label(p) in present and np.isfinite(present[label(p)][-1])
    }
    baseline, _, _ = _trajectories(
        bank, ctx, set(affected), now, steps, unchanged, None, fit_missing
    )
    changed, fitted, errors = _trajectories(
        bank, ctx, set(affected), now, steps, overrides, None, fit_missing
    )
    _, current_grid = load_grids(ctx.store, affected, now - bank.step_ms, now, bank.step_ms)
    effects: list[dict[str, Any]] = []
    for point in affected:
        name = label(point)
        spec = _spec(ctx.config, point)
        trajectory = changed.get(name)
        if trajectory is None or not trajectory.modelled:
            effects.append({"point": name, "error": errors.get(name, "no model")})
            continue
        current = float(current_grid[name][-1])
        end_mean, _ = trajectory.at(steps)
        base_mean, _ = baseline[name].at(steps)
        effect: dict[str, Any] = {"point": name}
        effects.append(effect)
        weak = _weakest(bank, fitted, point)
        if weak is not None:
            effect["untrusted"] = weak
        effect.update(
            {
                "unit": spec.unit,
                "current": current,
                "without_change": base_mean,
                "expected": end_mean,
                "p95": list(trajectory.interval(steps, 0.95)),
                "forecast": _rows(trajectory, steps),
                "crossings": _crossings(trajectory, current, spec),
                "model": _model_row(fitted.get(name), errors.get(name)),
            }
        )
    return {
        "set": {label(p): v for p, v in points.items()},
        "basis": WHAT_IF_BASIS,
        "from": iso(now),
        "horizon_s": steps * bank.step_ms / 1000,
        "effects": effects,
    }


def _weakest(bank: ModelBank, fitted: Mapping[str, Model], point: Point) -> str | None:
    """Why a prediction of ``point`` is not to be trusted: some model on its chain
    explains less than ``min_r2`` (a young twin, a plant that never moved). None: all
    models in the chain pass."""
    floor = bank.settings.min_r2
    for member in sorted(bank.chain(point)):
        model = fitted.get(label(member))
        if model is not None and model.r2 < floor:
            return (
                f"the model of {model.target} explains too little yet (R² {model.r2:.2f} < "
                f"{floor:g}, {model.samples} samples)"
            )
    return None


def effect_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """The short form a command's dry run and approval show (the console renders a
    mapping of point → facts). Effects of models below ``min_r2`` are left out: an
    approver must not weigh a guess."""
    out: dict[str, Any] = {}
    horizon = _minutes(float(result["horizon_s"]))
    for effect in result.get("effects", []):
        if "error" in effect or "untrusted" in effect:
            continue
        unit = f" {effect['unit']}" if effect.get("unit") else ""
        low, high = effect["p95"]
        facts: dict[str, Any] = {
            "now": f"{effect['current']:.4g}{unit}",
            f"in {horizon}": f"{effect['expected']:.4g}{unit}",
            "95 %": f"{low:.4g}–{high:.4g}{unit}",
            "unchanged": f"{effect['without_change']:.4g}{unit}",
        }
        likely = [c["text"] for c in effect["crossings"] if c["probability"] >= 0.5]
        if likely:
            facts["crosses"] = "; ".join(likely)
        out[effect["point"]] = facts
    return out


def sync_horizon_s(config: HubConfig) -> tuple[float, str]:
    """The forecasted risk's horizon and why: until the next sync (the drift engine's
    interval, which the sync report recommends as ``next_sync``), but never under one
    model grid step, the finest the models say anything about (docs/prediction.md)."""
    interval = config.drift.interval_s
    step = config.prediction.step_s
    if interval >= step:
        return interval, f"until the next sync (drift interval {interval:g} s)"
    return step, (
        f"one model grid step ({step:g} s): the next sync (drift interval {interval:g} s) "
        "comes sooner than the models resolve"
    )


def risk(bank: ModelBank, ctx: Context, horizon_ms: int | None = None) -> dict[str, Any]:
    """Probability that some attribute crosses a critical limit within the horizon (by
    default until the next sync: ``sync_horizon_s``), from the models' forecasts, with
    the factors that make it up."""
    if horizon_ms is None:
        horizon_s, basis = sync_horizon_s(ctx.config)
        horizon_ms = round(horizon_s * 1000)
    else:
        basis = "as asked"
    steps = bank.horizon_steps(horizon_ms)
    factors: list[dict[str, Any]] = []
    considered = 0
    schema = ctx.config.schema
    points = [
        p
        for p in sorted(set(bank.influenced()) | set(bank.trend_points()))
        if (spec := schema.spec(*p)) is not None
        and (spec.high.critical is not None or spec.low.critical is not None)
    ]
    unavailable: list[str] = []
    weak_models: list[str] = []
    for point in points:
        try:
            trajectories, fitted, _ = _trajectories(bank, ctx, {point}, ctx.now_ms, steps, {}, None)
        except PredictionError as exc:
            unavailable.append(f"{label(point)}: {exc}")
            continue
        trajectory = trajectories[label(point)]
        if not trajectory.modelled:
            unavailable.append(f"{label(point)}: no model")
            continue
        considered += 1
        weak = _weakest(bank, fitted, point)
        if weak is not None:
            weak_models.append(f"{label(point)}: {weak}")
        spec = schema.spec(*point)
        if spec is None:
            continue
        _, grid_now = load_grids(
            ctx.store, [point], ctx.now_ms - bank.step_ms, ctx.now_ms, bank.step_ms
        )
        current = float(grid_now[label(point)][-1])
        for name, limit, side in _limits(spec):
            if not name.startswith("critical"):
                continue
            found = models.crossing(trajectory, current, name, limit, side)
            if found.probability >= 0.001:
                factors.append(
                    {
                        "point": label(point),
                        **found.to_dict(),
                        "text": crossing_text(found, spec.unit),
                    }
                )
    factors.sort(key=lambda f: -f["probability"])
    return {
        "probability": round(models.combined_probability([f["probability"] for f in factors]), 4)
        if considered
        else None,
        "horizon_s": steps * bank.step_ms / 1000,
        "horizon_basis": basis,
        "points_considered": considered,
        "factors": factors,
        "unavailable": unavailable,
        "weak_models": weak_models,
    }


def model_rows(bank: ModelBank) -> list[dict[str, Any]]:
    """Every model the hub holds, with its fit quality, and what could not be fitted."""
    rows = [_model_row(m, None) or {} for _, m in sorted(bank.models.items())]
    tried = iso(bank.refitted_ms) if bank.refitted_ms else None
    rows += [
        {"target": t, "error": f"{e} (last fit {tried})"} for t, e in sorted(bank.errors.items())
    ]
    return rows


def now_ms() -> int:
    return int(time.time() * 1000)
