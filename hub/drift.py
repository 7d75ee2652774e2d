"""The drift engine: how far the twin is from what the schema says it should be.

Pure: it reads the schema, the twin's state and ``now`` and returns findings and
entity health; it never touches the network or the database, so every rule is unit
tested with plain values. State it keeps between evaluations (threshold levels with
their on/off delays, the time each finding was first seen) lives in plain objects.

Checks (rule ids, also used by reconciliation rules in the config):

- ``threshold``: warning/critical limits on the high and low side, with a deadband
  (hysteresis for leaving a level) and on/off delays (a level must hold that long
  before it is entered or left), so a noisy value at a limit never flaps.
- ``temporal.gateway_silent``: no frames and no heartbeats from the gateway for
  ``gateway_silent_s``, its death (MQTT will) was received, or it never connected. One
  finding per gateway; its entities become ``stale`` and no per-sensor staleness is
  reported for them. A heartbeat of the live connection keeps a gateway alive when its
  devices send nothing.
- ``temporal.device_down``: the gateway is alive (heartbeats), but its latest heartbeat
  reports the device serving an entity's points as down. One finding per entity (the
  points' device comes from the birth); those points get no separate staleness finding.
- ``temporal.sensor_stale``: the gateway is alive, but this attribute was not updated
  within its stale limit (``stale_after_s``, else expected interval x ``stale_factor``)
  or its last sample carries a BAD or STALE quality.
- ``structural.missing``: declared but never reported (entity, or attribute of a
  reported entity), after ``missing_after_s`` or once its gateway sent a birth.
- ``structural.undeclared``: reported but not declared (entity or attribute).
- ``structural.wrong_gateway``: a declared entity reported by another gateway.
- ``structural.relationship``: a structural rule's relationship count is out of bounds.
- ``semantic.rate``: a change faster than ``max_rate`` per second (held ``rate_hold_s``).
- ``semantic.model``: the attribute does not behave as its learned model predicts
  (hub/models.py): run over the last ``residual_window_s`` with the inputs that really
  happened, the model misses the reported value by more than ``residual_k`` σ for
  ``residual_hold_s`` (a leak: the level falls faster than pump and valve explain). The
  service measures the misses off the drift loop and hands them in (``model_misses``).
- ``semantic.frozen``: no change beyond ``frozen_min_change`` for ``frozen_after_s``
  (counted from the source time of the first sample carrying the value, inclusive)
  while fresh good samples keep arriving (and ``frozen_while`` holds, if given).
- ``semantic.implausible``: a reading the physics forbids. Either a fresh good/uncertain
  number outside its physical range (``physical_min``/``physical_max`` ± ``physical_margin``,
  ``static.KEY`` bounds resolved per entity: a 7.9 m level in a 5 m tank), or a
  ``[[plausibility]]`` cross-check whose ``when`` holds while its ``require`` does not, both
  readings fresh and good (level 4.8 m while the high-level switch reads false). The
  finding sits on the checked attribute (a cross-check's ``when`` attribute); one finding
  per attribute, its description and ``detail`` listing every violation. Stale, bad or
  missing inputs are not judged: they have their own findings.

Health of an entity (as exported and shown by ``fieldtwin twin``):

- ``unknown``: declared but nothing was ever reported for it.
- ``stale``: its gateway is silent, or every attribute it reported is stale.
- ``degraded``: reported, but some attribute is stale, bad or missing, or a threshold,
  semantic or structural finding is active on it.
- ``healthy``: everything declared is reported, fresh, good, and within limits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from fieldtwin.hub.config import (
    DEFAULT_SEVERITY,
    AttributeSpec,
    Condition,
    DriftConfig,
    Limits,
    ReconciliationConfig,
    TwinSchema,
)
from fieldtwin.hub.policy import compare
from fieldtwin.hub.state import CurrentValue, GatewayLink, Key, TwinState, numeric
from fieldtwin.protocol.messages import Quality, Value

HEALTH_STATES = ("healthy", "degraded", "stale", "unknown")
LEVEL_NAMES = {
    2: "high critical",
    1: "high warning",
    0: "normal",
    -1: "low warning",
    -2: "low critical",
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One active drift condition. ``entity`` is the gateway id for gateway findings."""

    rule: str
    entity: str
    attribute: str
    severity: str
    description: str
    since_ms: int
    value: Value = None
    gateway: str = ""
    strategy: str = "alert"
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.rule.split(".", 1)[0]

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.rule, self.entity, self.attribute)


@dataclass(frozen=True, slots=True)
class ModelMiss:
    """A learned model's sustained miss on one attribute (measured by hub/predict.py)."""

    expected: float
    observed: float
    sigma: float
    window_s: float
    since_ms: int
    model: str
    inputs: str

    @property
    def score(self) -> float:
        return abs(self.observed - self.expected) / self.sigma if self.sigma > 0 else 0.0


@dataclass(slots=True)
class DriftReport:
    checked_ms: int
    findings: list[Finding]
    health: dict[str, str]
    silent_gateways: set[str]
    stale_attributes: int = 0

    def by_entity(self) -> dict[str, list[Finding]]:
        out: dict[str, list[Finding]] = {}
        for finding in self.findings:
            out.setdefault(finding.entity, []).append(finding)
        return out


# -- thresholds ----------------------------------------------------------------------------


class ThresholdMonitor:
    """Threshold level of one attribute: -2 low critical … 0 normal … +2 high critical.

    A level is entered when the value reaches its limit and left only when the value
    is back beyond the limit by more than ``deadband``; any change of level must be
    pending for ``on_delay_ms`` (more severe) or ``off_delay_ms`` (less severe) first.
    """

    __slots__ = (
        "active",
        "changed_ms",
        "deadband",
        "high",
        "low",
        "off_delay_ms",
        "on_delay_ms",
        "pending",
        "pending_since",
    )

    def __init__(
        self,
        high: Limits,
        low: Limits,
        deadband: float = 0.0,
        on_delay_ms: int = 0,
        off_delay_ms: int = 0,
    ) -> None:
        self.high = high
        self.low = low
        self.deadband = deadband
        self.on_delay_ms = on_delay_ms
        self.off_delay_ms = off_delay_ms
        self.active = 0
        self.changed_ms = 0
        self.pending: int | None = None
        self.pending_since = 0

    @classmethod
    def for_spec(cls, spec: AttributeSpec) -> ThresholdMonitor:
        return cls(
            spec.high,
            spec.low,
            spec.deadband,
            round(spec.on_delay_s * 1000),
            round(spec.off_delay_s * 1000),
        )

    def _limit(self, level: int) -> float | None:
        side = self.high if level > 0 else self.low
        return side.warning if abs(level) == 1 else side.critical

    def entry_level(self, value: float) -> int:
        """The level the value reaches with no hysteresis."""
        high, low = self.high, self.low
        if high.critical is not None and value >= high.critical:
            return 2
        if high.warning is not None and value >= high.warning:
            return 1
        if low.critical is not None and value <= low.critical:
            return -2
        if low.warning is not None and value <= low.warning:
            return -1
        return 0

    def target_level(self, value: float) -> int:
        """The level the value calls for, given the active level and the deadband."""
        enter = self.entry_level(value)
        active = self.active
        if active > 0 and enter < active:
            for level in range(active, max(enter, 0), -1):
                limit = self._limit(level)
                if limit is not None and value > limit - self.deadband:
                    return level
        elif active < 0 and enter > active:
            for level in range(active, min(enter, 0)):
                limit = self._limit(level)
                if limit is not None and value < limit + self.deadband:
                    return level
        return enter

    def observe(self, value: float, now_ms: int) -> int:
        target = self.target_level(value)
        if target == self.active:
            self.pending = None
            return self.active
        if self.pending != target:
            self.pending = target
            self.pending_since = now_ms
        more_severe = abs(target) > abs(self.active) or target * self.active < 0
        delay = self.on_delay_ms if more_severe else self.off_delay_ms
        if now_ms - self.pending_since >= delay:
            self.active = target
            self.changed_ms = now_ms
            self.pending = None
        return self.active


# -- the engine ----------------------------------------------------------------------------


class DriftEngine:
    """Evaluates every drift check over a ``TwinState``; keeps threshold and timing state."""

    def __init__(
        self,
        schema: TwinSchema,
        drift: DriftConfig,
        reconciliation: ReconciliationConfig,
        gateways: Iterable[str],
        started_ms: int,
    ) -> None:
        self.schema = schema
        self.config = drift
        self.reconciliation = reconciliation
        self.gateways = sorted(gateways)
        self.started_ms = started_ms
        self.monitors: dict[Key, ThresholdMonitor] = {}
        self.model_misses: dict[Key, ModelMiss] = {}
        """Set by the service from hub/predict.py: sustained misses of learned models."""
        self.since: dict[tuple[str, str, str], int] = {}
        self.last_report: DriftReport | None = None
        self._reporters: dict[str, set[str]] = {}
        self.listening_since: dict[str, int] = {}
        """Per gateway, when a worker adopted it (its heartbeats came to another worker
        before): silence is measured from then at the earliest, as from the start."""

    # -- helpers ---------------------------------------------------------------------

    def stale_after_ms(self, spec: AttributeSpec | None, interval_ms: int | None) -> int:
        """``stale_after_s``, else expected interval x ``stale_factor``. Without an
        ``interval_s`` in the schema the interval is ``default_interval_s`` (the agents'
        report-by-exception heartbeat), or the birth's polling interval if that is longer:
        a point polled every second may still be reported only once a minute."""
        if spec is not None and spec.stale_after_s is not None:
            return round(spec.stale_after_s * 1000)
        if spec is not None and spec.interval_s is not None:
            interval = spec.interval_s * 1000
        else:
            interval = max(float(interval_ms or 0), self.config.default_interval_s * 1000)
        return round(interval * self.config.stale_factor)

    def gateway_of(self, entity: str) -> str:
        """The declared gateway of an entity, else the one that reports it."""
        declared = self.schema.entities.get(entity)
        if declared is not None and declared.gateway is not None:
            return declared.gateway
        reporters = self._reporters.get(entity)
        return min(reporters) if reporters else ""

    def _finding(
        self,
        rule: str,
        entity: str,
        attribute: str,
        description: str,
        now_ms: int,
        *,
        severity: str | None = None,
        value: Value = None,
        gateway: str = "",
        detail: Mapping[str, Any] | None = None,
        strategy: str | None = None,
    ) -> Finding:
        key = (rule, entity, attribute)
        since = self.since.setdefault(key, now_ms)
        configured, override = self.reconciliation.resolve(
            rule, self.schema.type_of(entity), entity, attribute
        )
        strategy = strategy or configured
        return Finding(
            rule=rule,
            entity=entity,
            attribute=attribute,
            severity=override or severity or DEFAULT_SEVERITY[rule],
            description=description,
            since_ms=since,
            value=value,
            gateway=gateway,
            strategy=strategy,
            detail=dict(detail or {}),
        )

    # -- evaluation ------------------------------------------------------------------

    def evaluate(self, state: TwinState, now_ms: int) -> DriftReport:
        reporters: dict[str, set[str]] = {}
        for (entity, _), point in state.points.items():
            reporters.setdefault(entity, set()).add(point.gateway)
        for (entity, _), current in state.current.items():
            reporters.setdefault(entity, set()).add(current.gateway)
        self._reporters = reporters
        findings: list[Finding] = []
        silent = self._gateways(state, now_ms, findings)
        down = self._devices(state, now_ms, silent, findings)
        fresh: dict[Key, CurrentValue] = {}
        stale_count = self._attributes(state, now_ms, silent, findings, down, fresh)
        self._plausibility(fresh, now_ms, findings)
        self._model_misses(state, now_ms, silent, findings)
        self._structure(state, now_ms, findings)
        active = {f.key for f in findings}
        for key in list(self.since):
            if key not in active:
                del self.since[key]
        health = self._health(state, now_ms, silent, findings)
        findings.sort(key=lambda f: (f.entity, f.attribute, f.rule))
        report = DriftReport(now_ms, findings, health, silent, stale_count)
        self.last_report = report
        return report

    def _model_misses(
        self, state: TwinState, now_ms: int, silent: set[str], out: list[Finding]
    ) -> None:
        """``semantic.model`` for each sustained miss, unless the reading is not live."""
        for (entity, attribute), miss in sorted(self.model_misses.items()):
            current = state.current.get((entity, attribute))
            if current is None or current.gateway in silent:
                continue
            if current.quality not in (Quality.GOOD, Quality.UNCERTAIN):
                continue
            spec = self.schema.spec(entity, attribute)
            unit = f" {spec.unit}" if spec is not None and spec.unit else ""
            residual = miss.observed - miss.expected
            self.since.setdefault(("semantic.model", entity, attribute), miss.since_ms)
            out.append(
                self._finding(
                    "semantic.model",
                    entity,
                    attribute,
                    f"{entity}.{attribute} does not behave as its model predicts: expected "
                    f"{miss.expected:.4g}{unit}, observed {miss.observed:.4g}{unit} after "
                    f"{miss.window_s:g} s (residual {residual:+.3g}{unit}, {miss.score:.1f} σ; "
                    f"inputs {miss.inputs})",
                    now_ms,
                    value=current.value,
                    gateway=current.gateway,
                    detail={
                        "expected": miss.expected,
                        "observed": miss.observed,
                        "residual": residual,
                        "sigma": miss.sigma,
                        "score": round(miss.score, 2),
                        "window_s": miss.window_s,
                        "model": miss.model,
                        "inputs": miss.inputs,
                    },
                )
            )

    def _gateways(self, state: TwinState, now_ms: int, out: list[Finding]) -> set[str]:
        silent: set[str] = set()
        limit_ms = round(self.config.gateway_silent_s * 1000)
        names = set(self.gateways) | set(state.gateways)
        for gateway in sorted(names):
            link = state.gateways.get(gateway)
            reason = ""
            severity: str | None = None
            strategy: str | None = None
            # Silence is measured from the hub's start at the earliest: a hub restarted on
            # an old store has not yet had the chance to hear from anyone.
            listening_ms = max(self.started_ms, self.listening_since.get(gateway, 0))
            heard_ms = max(link.last_frame_ms if link else 0, listening_ms)
            if link is None or link.last_frame_ms == 0:
                if now_ms - listening_ms >= limit_ms:
                    reason = "never connected since the hub started"
            elif not link.online:
                if link.death_reason == "shutdown":
                    # The agent said goodbye: a planned stop is recorded (drift event,
                    # audit, health "stale"), not alarmed (ISA-18.2: no alarm for a
                    # condition the operator caused on purpose).
                    reason = "stopped (planned shutdown of its agent)"
                    severity = "warning"
                    strategy = "ignore"
                else:
                    why = f" ({link.death_reason})" if link.death_reason else ""
                    reason = f"disconnected: death received{why}"
            elif now_ms - max(heard_ms, _last_sign_of_life(state, link)) > limit_ms:
                age = (now_ms - _last_sign_of_life(state, link)) / 1000
                reason = (
                    f"no frames or heartbeats for {age:.1f} s "
                    f"(limit {self.config.gateway_silent_s:g} s)"
                )
            if reason:
                silent.add(gateway)
                out.append(
                    self._finding(
                        "temporal.gateway_silent",
                        gateway,
                        "",
                        f"gateway {gateway} is silent: {reason}",
                        now_ms,
                        severity=severity,
                        gateway=gateway,
                        detail={"last_frame_ms": link.last_frame_ms if link else 0},
                        strategy=strategy,
                    )
                )
        return silent

    def _devices(
        self, state: TwinState, now_ms: int, silent: set[str], out: list[Finding]
    ) -> set[Key]:
        """``temporal.device_down`` per entity of a device an alive gateway reports down.

        Returns the points concerned, so that they get no ``sensor_stale`` of their own
        (the device is the cause)."""
        down_points: dict[tuple[str, str], list[str]] = {}
        devices: dict[tuple[str, str], Any] = {}
        limit_ms = round(self.config.gateway_silent_s * 1000)
        for gateway, beat in state.heartbeats.items():
            link = state.gateways.get(gateway)
            if gateway in silent or link is None or beat.session != link.session:
                continue
            if now_ms - beat.received_ms > limit_ms:
                continue  # an old heartbeat says nothing about the devices now
            for device_id, device in beat.down().items():
                devices[(gateway, device_id)] = device
        if not devices:
            return set()
        for (entity, attribute), point in state.points.items():
            if (point.gateway, point.device) in devices:
                down_points.setdefault((point.gateway, entity), []).append(attribute)
        concerned: set[Key] = set()
        for (gateway, entity), attributes in sorted(down_points.items()):
            device_ids = sorted({state.points[(entity, a)].device for a in attributes})
            device = devices[(gateway, device_ids[0])]
            why = f": {device.error}" if device.error else ""
            out.append(
                self._finding(
                    "temporal.device_down",
                    entity,
                    "",
                    f"{entity}: device {', '.join(device_ids)} of gateway {gateway} is down"
                    f"{why}; the gateway is alive ({len(attributes)} attributes without data)",
                    now_ms,
                    gateway=gateway,
                    detail={
                        "devices": device_ids,
                        "down_since_ms": device.since_ms,
                        "error": device.error,
                        "attributes": sorted(attributes),
                    },
                )
            )
            concerned.update((entity, attribute) for attribute in attributes)
        return concerned

    def _attributes(
        self,
        state: TwinState,
        now_ms: int,
        silent: set[str],
        out: list[Finding],
        device_down: AbstractSet[Key] = frozenset(),
        fresh: dict[Key, CurrentValue] | None = None,
    ) -> int:
        """Per-attribute checks; ``fresh`` collects the readings that are neither stale,
        bad nor behind a silent gateway or a down device (the plausibility inputs)."""
        stale_count = 0
        schema = self.schema
        keys = set(state.current) | set(state.points)
        for key in sorted(keys):
            entity, attribute = key
            current = state.current.get(key)
            point = state.points.get(key)
            spec = schema.spec(entity, attribute)
            gateway = current.gateway if current is not None else (point.gateway if point else "")
            if gateway in silent or key in device_down:
                continue
            interval_ms = point.interval_ms if point is not None else None
            stale_ms = self.stale_after_ms(spec, interval_ms)
            stale = self._stale(key, current, point, stale_ms, now_ms, gateway, out)
            if stale:
                stale_count += 1
            if spec is None or current is None:
                continue
            if not stale and fresh is not None:
                fresh[key] = current
            if spec.has_thresholds:
                self._threshold(key, spec, current, now_ms, out)
            if spec.max_rate is not None:
                event = state.rate_events.get(key)
                hold_ms = round(self.config.rate_hold_s * 1000)
                if event is not None and now_ms - max(event.ts_ms, 0) <= hold_ms:
                    out.append(
                        self._finding(
                            "semantic.rate",
                            entity,
                            attribute,
                            f"{entity}.{attribute} changed at {event.rate:.3g} {spec.unit}/s "
                            f"({event.previous:.6g} → {event.value:.6g}); at most "
                            f"{spec.max_rate:g} {spec.unit}/s is physically possible",
                            now_ms,
                            value=current.value,
                            gateway=gateway,
                            detail={"rate": event.rate, "max_rate": spec.max_rate},
                        )
                    )
            if spec.frozen_after_s is not None and not stale:
                self._frozen(key, spec, current, state, now_ms, gateway, out)
        return stale_count

    def _stale(
        self,
        key: Key,
        current: CurrentValue | None,
        point: Any,
        stale_ms: int,
        now_ms: int,
        gateway: str,
        out: list[Finding],
    ) -> bool:
        entity, attribute = key
        if current is None:
            born = point.updated_ms if point is not None else now_ms
            if now_ms - born <= stale_ms:
                return False
            reason = f"announced by its gateway but no value for {(now_ms - born) / 1000:.1f} s"
        elif current.quality in (Quality.BAD, Quality.STALE):
            quality = "bad" if current.quality == Quality.BAD else "stale"
            reason = f"the gateway reports it with {quality} quality"
        elif now_ms - max(current.ts_ms, self.started_ms) > stale_ms:
            # (a hub restarted on an old store gives every sensor a full stale limit first)
            age = (now_ms - current.ts_ms) / 1000
            reason = f"not updated for {age:.1f} s (limit {stale_ms / 1000:g} s)"
        else:
            return False
        out.append(
            self._finding(
                "temporal.sensor_stale",
                entity,
                attribute,
                f"{entity}.{attribute} is stale while gateway {gateway} is alive: {reason}",
                now_ms,
                value=current.value if current is not None else None,
                gateway=gateway,
                detail={"ts_ms": current.ts_ms if current else None, "limit_ms": stale_ms},
            )
        )
        return True

    def _threshold(
        self, key: Key, spec: AttributeSpec, current: CurrentValue, now_ms: int, out: list[Finding]
    ) -> None:
        monitor = self.monitors.get(key)
        if monitor is None:
            monitor = self.monitors[key] = ThresholdMonitor.for_spec(spec)
        number = numeric(current.value)
        if number is not None and current.quality in (Quality.GOOD, Quality.UNCERTAIN):
            monitor.observe(number, now_ms)
        level = monitor.active
        if level == 0:
            return
        entity, attribute = key
        limit = monitor._limit(level)
        side = "above" if level > 0 else "below"
        out.append(
            self._finding(
                "threshold",
                entity,
                attribute,
                f"{entity}.{attribute} = {_show(current.value)} {spec.unit} is {side} its "
                f"{LEVEL_NAMES[level]} limit {limit:g} {spec.unit}".replace("  ", " "),
                now_ms,
                severity="critical" if abs(level) == 2 else "warning",
                value=current.value,
                gateway=current.gateway,
                detail={"level": LEVEL_NAMES[level], "limit": limit},
            )
        )

    def _frozen(
        self,
        key: Key,
        spec: AttributeSpec,
        current: CurrentValue,
        state: TwinState,
        now_ms: int,
        gateway: str,
        out: list[Finding],
    ) -> None:
        assert spec.frozen_after_s is not None
        if current.quality != Quality.GOOD:
            return
        entity, attribute = key
        # Frozen since the source time of the FIRST sample that carried the value (the last
        # change), not since the first repeat: the repeats only confirm it, and counting
        # from them would add a sample interval (up to ``max_silence_s`` with report by
        # exception) to the latency. At the limit it is frozen (>=), so the finding comes
        # on the first drift cycle at or after last change + ``frozen_after_s``.
        frozen_ms = now_ms - max(current.last_change_ms, self.started_ms)
        if frozen_ms < round(spec.frozen_after_s * 1000):
            return
        if spec.frozen_while is not None:
            ref_entity, _, ref_attr = spec.frozen_while.rpartition(".")
            condition = state.current.get((ref_entity or entity, ref_attr))
            if condition is None or not numeric(condition.value):
                return
        why = f" while {spec.frozen_while} is on" if spec.frozen_while else ""
        out.append(
            self._finding(
                "semantic.frozen",
                entity,
                attribute,
                f"{entity}.{attribute} has not moved by more than {spec.frozen_min_change:g} "
                f"{spec.unit} for {frozen_ms / 1000:.0f} s{why} (limit {spec.frozen_after_s:g} s)",
                now_ms,
                value=current.value,
                gateway=gateway,
                detail={"last_change_ms": current.last_change_ms},
            )
        )

    def _plausibility(
        self, fresh: Mapping[Key, CurrentValue], now_ms: int, out: list[Finding]
    ) -> None:
        """``semantic.implausible``: physical ranges and cross-checks, one finding per
        attribute (findings are keyed by rule, entity and attribute)."""
        reasons: dict[Key, list[str]] = {}
        details: dict[Key, dict[str, Any]] = {}
        for key, current in fresh.items():
            span = self.schema.physical.get(key)
            number = numeric(current.value)
            if span is None or number is None or isinstance(current.value, bool):
                continue
            side = span.violation(number)
            if side is None:
                continue
            entity, attribute = key
            spec = self.schema.spec(entity, attribute)
            unit = f" {spec.unit}" if spec is not None and spec.unit else ""
            bound = span.high if side == "max" else span.low
            source = span.high_source if side == "max" else span.low_source
            assert bound is not None
            why = (
                f"physical_{side} {source} = {bound:g}" if source else f"physical_{side} {bound:g}"
            )
            if span.margin:
                why += f", margin {span.margin:g}"
            relation = "above" if side == "max" else "below"
            reasons.setdefault(key, []).append(
                f"{entity}.{attribute} = {_show(current.value)}{unit} is physically impossible: "
                f"it is {relation} {bound:g}{unit} ({why})"
            )
            details.setdefault(key, {})["range"] = {
                "min": span.low,
                "max": span.high,
                "margin": span.margin,
                "value": number,
                "min_source": span.low_source,
                "max_source": span.high_source,
            }
        for check in self.schema.plausibility:
            when, require = check.when, check.require
            subject = (when.entity, when.attribute)
            left = fresh.get(subject)
            right = fresh.get((require.entity, require.attribute))
            # interlock semantics: only fresh readings of GOOD quality are judged
            if left is None or right is None or left.quality != 0 or right.quality != 0:
                continue
            if not compare(when.op, left.value, when.value):
                continue
            if compare(require.op, right.value, require.value):
                continue
            about = f" ({check.description})" if check.description else ""
            reasons.setdefault(subject, []).append(
                f"{_reading(when, left)} while {_reading(require, right)}: check {check.id} "
                f"expects {require} whenever {when}{about}"
            )
            details.setdefault(subject, {}).setdefault("checks", []).append(
                {
                    "id": check.id,
                    "when": str(when),
                    "require": str(require),
                    "when_value": left.value,
                    "require_value": right.value,
                }
            )
        for key in sorted(reasons):
            entity, attribute = key
            current = fresh[key]
            out.append(
                self._finding(
                    "semantic.implausible",
                    entity,
                    attribute,
                    "; ".join(reasons[key]),
                    now_ms,
                    value=current.value,
                    gateway=current.gateway,
                    detail=details[key],
                )
            )

    def _structure(self, state: TwinState, now_ms: int, out: list[Finding]) -> None:
        schema = self.schema
        reported: dict[str, set[str]] = {}
        for entity, attribute in set(state.current) | set(state.points):
            reported.setdefault(entity, set()).add(attribute)
        grace_over = now_ms - self.started_ms >= self.config.missing_after_s * 1000
        for entity_id, declared in schema.entities.items():
            attributes = schema.types[declared.type].attributes
            seen = reported.get(entity_id)
            link = state.gateways.get(declared.gateway) if declared.gateway else None
            born = link is not None and link.last_birth_ms > 0
            if not seen:
                if grace_over or born:
                    where = f" by gateway {declared.gateway}" if declared.gateway else ""
                    out.append(
                        self._finding(
                            "structural.missing",
                            entity_id,
                            "",
                            f"{entity_id} ({declared.type}) is declared but was never "
                            f"reported{where}",
                            now_ms,
                            gateway=declared.gateway or "",
                        )
                    )
                continue
            if grace_over or born:
                for name in attributes:
                    if name not in seen:
                        out.append(
                            self._finding(
                                "structural.missing",
                                entity_id,
                                name,
                                f"{entity_id}.{name} is declared but was never reported",
                                now_ms,
                                gateway=declared.gateway or "",
                            )
                        )
            for name in sorted(seen - set(attributes)):
                out.append(
                    self._finding(
                        "structural.undeclared",
                        entity_id,
                        name,
                        f"{entity_id}.{name} is reported but type {declared.type} declares no "
                        "such attribute",
                        now_ms,
                    )
                )
            if declared.gateway is not None:
                others = sorted(self._reporters.get(entity_id, set()) - {declared.gateway, ""})
                if others:
                    out.append(
                        self._finding(
                            "structural.wrong_gateway",
                            entity_id,
                            "",
                            f"{entity_id} is declared on gateway {declared.gateway} but reported "
                            f"by {', '.join(others)}",
                            now_ms,
                            gateway=others[0],
                        )
                    )
        for entity_id in sorted(set(reported) - set(schema.entities)):
            gateways = sorted(self._reporters.get(entity_id, set()) - {""})
            out.append(
                self._finding(
                    "structural.undeclared",
                    entity_id,
                    "",
                    f"{entity_id} is reported by {', '.join(gateways) or 'a gateway'} but is not "
                    f"declared in the twin schema (attributes: "
                    f"{', '.join(sorted(reported[entity_id]))})",
                    now_ms,
                    gateway=gateways[0] if gateways else "",
                )
            )
        for rule in schema.structural:
            for entity_id, declared in schema.entities.items():
                if declared.type != rule.entity_type:
                    continue
                count = 0
                for rel in schema.relationships:
                    if rel.type != rule.relationship:
                        continue
                    near, far = (
                        (rel.source, rel.target)
                        if rule.direction == "out"
                        else (
                            rel.target,
                            rel.source,
                        )
                    )
                    if near == entity_id and schema.type_of(far) == rule.target_type:
                        count += 1
                if count < rule.min or (rule.max is not None and count > rule.max):
                    bound = f"{rule.min}..{rule.max}" if rule.max is not None else f">= {rule.min}"
                    arrow = "to" if rule.direction == "out" else "from"
                    out.append(
                        self._finding(
                            "structural.relationship",
                            entity_id,
                            "",
                            f"rule {rule.id}: {entity_id} has {count} '{rule.relationship}' "
                            f"links {arrow} a {rule.target_type}, expected {bound}"
                            + (f" ({rule.description})" if rule.description else ""),
                            now_ms,
                            detail={"rule": rule.id, "count": count},
                        )
                    )

    def _health(
        self, state: TwinState, now_ms: int, silent: set[str], findings: list[Finding]
    ) -> dict[str, str]:
        per_entity: dict[str, list[Finding]] = {}
        for finding in findings:
            per_entity.setdefault(finding.entity, []).append(finding)
        reported: dict[str, list[CurrentValue]] = {}
        for (entity, _), current in state.current.items():
            reported.setdefault(entity, []).append(current)
        health: dict[str, str] = {}
        for entity in sorted(set(self.schema.entities) | set(reported) | set(self._reporters)):
            values = reported.get(entity, [])
            gateway = self.gateway_of(entity)
            mine = per_entity.get(entity, [])
            if not values:
                health[entity] = "unknown"
                continue
            if gateway in silent:
                health[entity] = "stale"
                continue
            stale = [f for f in mine if f.rule == "temporal.sensor_stale"]
            down = [f for f in mine if f.rule == "temporal.device_down"]
            gone = {f.attribute for f in stale}.union(
                *(f.detail.get("attributes", ()) for f in down)
            )
            if gone and len(gone) >= len(values):
                health[entity] = "stale"
            elif mine:
                health[entity] = "degraded"
            else:
                health[entity] = "healthy"
        return health


def _last_sign_of_life(state: TwinState, link: GatewayLink) -> int:
    """The last frame, or heartbeat of the live connection, from a gateway (ms)."""
    beat = state.heartbeats.get(link.gateway)
    if beat is not None and beat.epoch == link.epoch and beat.session == link.session:
        return max(link.last_frame_ms, beat.received_ms)
    return link.last_frame_ms


def _show(value: Value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _reading(condition: Condition, current: CurrentValue) -> str:
    """``tank-1.high_level = false`` (bools as true/false, numbers compact)."""
    value = current.value
    shown = ("true" if value else "false") if isinstance(value, bool) else _show(value)
    return f"{condition.entity}.{condition.attribute} = {shown}"
