"""Command policy: may this value be written to this attribute now? (pure)

Every check runs, pass or fail, so a dry run shows the whole verdict, in this order:

1. ``declared``: the entity is declared and the attribute belongs to its type;
2. ``writable``: the schema marks the attribute writable;
3. ``type``: the value fits the point (true/false for a bool, a number for a number);
4. ``limits``: within the attribute's ``min``/``max``;
5. ``step``: the change from the reported value is at most ``max_step``;
6. ``checkpoint``: a good reported value exists to restore to if the command fails;
7. ``interlock <id>``: for each interlock whose ``when`` matches the commanded value, its
   input must be fresh and of good quality, and its ``require`` condition must hold;
8. ``gateway``: the gateway that serves the point is online;
9. ``in flight``: no other command is in flight on the attribute.

The refusal texts are written for an operator: "interlock pump-needs-water: input
tank-1.level is stale, last sample 42 s ago".
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from fieldtwin.hub.config import Condition, Interlock, TwinSchema
from fieldtwin.hub.state import QUALITY_NAMES, CurrentValue, Key, numeric
from fieldtwin.protocol.messages import Value


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    text: str

    def row(self) -> dict[str, object]:
        return {"check": self.name, "ok": self.ok, "text": self.text}


@dataclass(frozen=True, slots=True)
class Verdict:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def refusals(self) -> list[str]:
        return [check.text for check in self.checks if not check.ok]

    def summary(self) -> str:
        refusals = self.refusals
        return (
            "allowed: " + "; ".join(c.name for c in self.checks)
            if not refusals
            else ("refused: " + "; ".join(refusals))
        )

    def rows(self) -> list[dict[str, object]]:
        return [check.row() for check in self.checks]


@dataclass(frozen=True, slots=True)
class GatewayStatus:
    id: str
    online: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class PolicyInput:
    """What the policy needs to know about the twin, as plain values."""

    schema: TwinSchema
    current: Mapping[Key, CurrentValue]
    dtypes: Mapping[Key, str]
    """Point data types from births (``bool``, ``float32``, ``string`` ...)."""
    stale_after_ms: Callable[[str, str], int]
    gateway: GatewayStatus | None
    in_flight: Mapping[Key, str]
    """Attribute → "C-000012 (awaiting approval)" for commands not yet settled."""
    now_ms: int


def compare(op: str, left: Value, right: Value) -> bool:
    """``left OP right`` with numbers compared as numbers (bools as 0/1) and text as text."""
    a, b = numeric(left), numeric(right)
    if a is not None and b is not None:
        pair: tuple[object, object] = (a, b)
    elif isinstance(left, str) and isinstance(right, str):
        pair = (left, right)
    else:
        return op == "!=" if left is not None else False
    x, y = pair
    if op == "==":
        return x == y
    if op == "!=":
        return x != y
    if not isinstance(x, float | str) or type(x) is not type(y):
        return False
    if op == ">":
        return x > y  # type: ignore[operator]
    if op == ">=":
        return x >= y  # type: ignore[operator]
    if op == "<":
        return x < y  # type: ignore[operator]
    if op == "<=":
        return x <= y  # type: ignore[operator]
    return False


def show(value: Value, unit: str = "") -> str:
    if value is None:
        return "no value"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f"{text} {unit}".rstrip()


def _age(ms: int) -> str:
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def check_command(
    entity: str, attribute: str, value: Value, facts: PolicyInput, *, rollback_of: str = ""
) -> Verdict:
    """The verdict on writing ``value`` to ``entity.attribute`` (pure)."""
    schema = facts.schema
    checks: list[Check] = []
    declared = schema.entities.get(entity)
    spec = schema.spec(entity, attribute)
    if declared is None:
        close = difflib.get_close_matches(entity, sorted(schema.entities), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        checks.append(Check("declared", False, f"{entity} is not a declared entity{hint}"))
    elif spec is None:
        names = sorted(schema.types[declared.type].attributes)
        close = difflib.get_close_matches(attribute, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        checks.append(
            Check(
                "declared",
                False,
                f"{attribute} is not an attribute of {entity} (type {declared.type}){hint}",
            )
        )
    else:
        checks.append(Check("declared", True, f"{entity}.{attribute} is declared"))
    key = (entity, attribute)
    unit = spec.unit if spec is not None else ""
    current = facts.current.get(key)
    if spec is None:
        return Verdict(tuple(checks))
    if not spec.writable:
        checks.append(Check("writable", False, f"{entity}.{attribute} is read-only in the schema"))
        return Verdict(tuple(checks))
    checks.append(Check("writable", True, f"{entity}.{attribute} is writable"))

    # type: the point's dtype from its birth, else the reported value's type
    dtype = facts.dtypes.get(key)
    kind = (
        "bool"
        if dtype == "bool"
        else "string"
        if dtype == "string"
        else "number"
        if dtype is not None
        else _kind_of(current.value if current is not None else None, spec.min, spec.max)
    )
    type_ok = (
        (kind == "bool" and isinstance(value, bool))
        or (kind == "string" and isinstance(value, str))
        or (
            kind == "number"
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
        )
        or (kind == "any" and value is not None)
    )
    wanted = {"bool": "true or false", "string": "text", "number": "a number"}.get(kind, "a value")
    checks.append(
        Check(
            "type",
            type_ok,
            f"{show(value)} is {wanted}"
            if type_ok
            else f"{entity}.{attribute} takes {wanted}, got {show(value)}",
        )
    )
    number = numeric(value) if not isinstance(value, bool) else None
    if number is not None and (spec.min is not None or spec.max is not None):
        low_ok = spec.min is None or number >= spec.min
        high_ok = spec.max is None or number <= spec.max
        bounds = f"[{show(spec.min)}, {show(spec.max)}] {unit}".rstrip()
        if low_ok and high_ok:
            checks.append(Check("limits", True, f"{show(value, unit)} is within {bounds}"))
        else:
            side = "below the minimum" if not low_ok else "above the maximum"
            checks.append(
                Check(
                    "limits",
                    False,
                    f"{show(value, unit)} is {side} of {entity}.{attribute} ({bounds})",
                )
            )
    rule = spec.command
    reported = numeric(current.value) if current is not None else None
    if rule is not None and rule.max_step is not None and number is not None:
        if reported is None:
            checks.append(
                Check(
                    "step",
                    False,
                    f"no reported value of {entity}.{attribute} to measure the "
                    f"step from (max step {show(rule.max_step, unit)})",
                )
            )
        else:
            step = abs(number - reported)
            checks.append(
                Check(
                    "step",
                    step <= rule.max_step + 1e-9,
                    f"step {show(step, unit)} from {show(current.value if current else None, unit)}"
                    f" {'is within' if step <= rule.max_step + 1e-9 else 'exceeds'} the maximum "
                    f"step {show(rule.max_step, unit)}",
                )
            )
    if current is None:
        checks.append(
            Check(
                "checkpoint",
                False,
                f"{entity}.{attribute} has never been reported: nothing to "
                "restore to if the command fails",
            )
        )
    elif current.quality != 0:
        checks.append(
            Check(
                "checkpoint",
                False,
                f"{entity}.{attribute} reads {show(current.value, unit)} with quality "
                f"{QUALITY_NAMES[current.quality]}: no good value to restore to",
            )
        )
    else:
        checks.append(
            Check(
                "checkpoint",
                True,
                f"restore point {show(current.value, unit)} (reported "
                f"{_age(max(0, facts.now_ms - current.received_ms))} ago)",
            )
        )
    for interlock in schema.interlocks_for(entity, attribute):
        checks.append(_interlock(interlock, value, facts))
    gateway = facts.gateway
    if gateway is None:
        checks.append(Check("gateway", False, f"no gateway serves {entity}"))
    else:
        detail = f": {gateway.detail}" if gateway.detail else ""
        checks.append(
            Check(
                "gateway",
                gateway.online,
                f"gateway {gateway.id} is online"
                if gateway.online
                else f"gateway {gateway.id} is offline{detail}",
            )
        )
    busy = facts.in_flight.get(key)
    if busy is not None and not (rollback_of and busy.startswith(rollback_of + " ")):
        checks.append(Check("in flight", False, f"{busy} is in flight on {entity}.{attribute}"))
    else:
        checks.append(Check("in flight", True, f"no other command on {entity}.{attribute}"))
    return Verdict(tuple(checks))


def _kind_of(value: Value, low: float | None, high: float | None) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int | float) or low is not None or high is not None:
        return "number"
    return "any"


def _interlock(interlock: Interlock, value: Value, facts: PolicyInput) -> Check:
    name = f"interlock {interlock.id}"
    why = f" ({interlock.description})" if interlock.description else ""
    when = interlock.when
    if when is not None and not compare(when.op, value, when.value):
        return Check(name, True, f"{name} does not apply to {show(value)} (only {when})")
    require = interlock.require
    reading = facts.current.get((require.entity, require.attribute))
    subject = f"{require.entity}.{require.attribute}"
    spec = facts.schema.spec(require.entity, require.attribute)
    unit = spec.unit if spec is not None else ""
    if reading is None:
        return Check(name, False, f"{name}: input {subject} has never been reported{why}")
    age_ms = max(0, facts.now_ms - reading.ts_ms)
    limit = facts.stale_after_ms(require.entity, require.attribute)
    if reading.quality != 0:
        return Check(
            name,
            False,
            f"{name}: input {subject} has quality {QUALITY_NAMES[reading.quality]}, last sample "
            f"{_age(age_ms)} ago{why}",
        )
    if age_ms > limit:
        return Check(
            name, False, f"{name}: input {subject} is stale, last sample {_age(age_ms)} ago{why}"
        )
    if not compare(require.op, reading.value, require.value):
        return Check(
            name,
            False,
            f"{name} refused: {subject} is {show(reading.value, unit)}, needs {_condition(require)}"
            f"{why}",
        )
    return Check(name, True, f"{name}: {subject} is {show(reading.value, unit)} ({require} holds)")


def _condition(condition: Condition) -> str:
    text = str(condition)
    return text.split(" ", 1)[1] if condition.entity else text


def within_tolerance(value: Value, target: Value, tolerance: float) -> bool:
    """Has a reported ``value`` reached ``target``? Numbers within ``tolerance``, else equal."""
    if isinstance(target, bool) or isinstance(value, bool):
        return type(value) is type(target) and value == target
    a, b = numeric(value), numeric(target)
    if a is not None and b is not None:
        return abs(a - b) <= tolerance + 1e-12
    return value == target


def describe_checks(checks: Sequence[Check]) -> list[str]:
    return [("ok   " if c.ok else "FAIL ") + f"{c.name}: {c.text}" for c in checks]
