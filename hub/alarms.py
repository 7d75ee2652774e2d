"""Alarm lifecycle and the reconciliation each strategy calls for.

Pure: ``AlarmBook.reconcile`` takes the drift engine's findings and ``now`` and returns
the transitions it made; operators' acknowledge/shelve calls do the same. The runtime
persists transitions, audits them and carries out the planned actions.

Lifecycle (one alarm per (rule, entity, attribute) while it is open), after ISA-18.2:

- ``active``: the condition is present and nobody has acknowledged it. A rise in
  severity re-activates an acknowledged alarm (its text and value follow the finding).
- ``acknowledged``: an operator has seen it; it clears when the condition clears.
- ``returned``: the condition went away before anyone acknowledged it ("returned,
  unacknowledged"): it stays until acknowledged (then it clears) or the condition
  comes back (then it is active again, the same alarm).
- ``shelved``: hidden by an operator, with a reason, until ``shelved_until_ms``; on
  expiry (or unshelve) it returns to where it was — acknowledged if it had been and
  did not escalate since, else active — or clears if the condition is gone.
- ``cleared``: settled (final; a recurrence raises a new alarm).

Strategies, per finding (from ``[reconciliation]`` in the config):

- ``alert``: raise the alarm and publish it on ``ft/v1/hub/alarms``.
- ``auto_correct``: raise the alarm, ask the gateway for a rebirth (resynchronise),
  and, for entities with ``desired`` values that differ from the reported ones,
  record a corrective command proposal for the approval flow.
- ``investigate``: raise and publish the alarm and open an investigation record
  holding a snapshot of the context (entity, related entities, gateway, history).
- ``ignore``: record the drift event only; no alarm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fieldtwin.hub.drift import Finding
from fieldtwin.hub.errors import AlarmError

ALARM_STATES = ("active", "acknowledged", "returned", "shelved", "cleared")
_SEVERITY_RANK = {"warning": 1, "critical": 2}


@dataclass(slots=True)
class Alarm:
    id: str
    rule: str
    drift_type: str
    entity: str
    attribute: str
    severity: str
    state: str
    strategy: str
    description: str
    value: str
    gateway: str
    raised_ms: int
    updated_ms: int
    cleared_ms: int | None = None
    acked_by: str | None = None
    acked_ms: int | None = None
    shelved_by: str | None = None
    shelved_until_ms: int | None = None
    present: bool = True
    shelve_reason: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.rule, self.entity, self.attribute)

    def row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Alarm:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__ if name in row})


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of an alarm, with a copy of the alarm after it."""

    change: str
    alarm: Alarm
    at_ms: int
    actor: str = "hub"
    finding: Finding | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


def _value_text(value: object) -> str:
    return "" if value is None else str(value)


class AlarmBook:
    """Open alarms by key, with the operations that move them through their lifecycle."""

    def __init__(self, open_alarms: Iterable[Alarm] = (), next_number: int = 1) -> None:
        self.open: dict[tuple[str, str, str], Alarm] = {a.key: a for a in open_alarms}
        self.by_id: dict[str, Alarm] = {a.id: a for a in self.open.values()}
        self.next_number = next_number

    def _new_id(self) -> str:
        number = self.next_number
        self.next_number += 1
        return f"A-{number:06d}"

    def _transition(self, change: str, alarm: Alarm, at_ms: int, **kw: Any) -> Transition:
        alarm.updated_ms = at_ms
        return Transition(change, replace(alarm), at_ms, **kw)

    def reconcile(
        self,
        findings: Iterable[Finding],
        now_ms: int,
        owns: Callable[[str], bool] | None = None,
    ) -> list[Transition]:
        """Raise, escalate, return and clear alarms so they match the findings.

        ``owns`` (an entity → bool test) limits the book to the entities this hub
        evaluates: a worker sharing the store leaves other workers' alarms alone."""
        out: list[Transition] = []
        wanted = {
            f.key: f
            for f in findings
            if f.strategy != "ignore" and (owns is None or owns(f.entity))
        }
        for key, alarm in list(self.open.items()):
            if owns is not None and not owns(alarm.entity):
                continue
            finding = wanted.get(key)
            alarm.present = finding is not None
            if finding is not None:
                self._follow(alarm, finding, now_ms, out)
            if alarm.state == "shelved":
                if alarm.shelved_until_ms is not None and now_ms >= alarm.shelved_until_ms:
                    if finding is not None:
                        alarm.state = self._unshelved_state(alarm)
                        alarm.shelved_until_ms = None
                        out.append(
                            self._transition(
                                "unshelved",
                                alarm,
                                now_ms,
                                finding=finding,
                                detail={"why": "shelf expired"},
                            )
                        )
                    else:
                        out.append(self._clear(alarm, now_ms))
                    continue
                if finding is None:
                    out.append(self._clear(alarm, now_ms))
                continue
            if finding is None:
                if alarm.state == "acknowledged":
                    out.append(self._clear(alarm, now_ms))
                elif alarm.state == "active":
                    alarm.state = "returned"
                    out.append(self._transition("returned", alarm, now_ms))
                continue
            if alarm.state == "returned":
                alarm.state = "active"
                out.append(self._transition("reraised", alarm, now_ms, finding=finding))
        for key, finding in wanted.items():
            if key in self.open:
                continue
            alarm = Alarm(
                id=self._new_id(),
                rule=finding.rule,
                drift_type=finding.type,
                entity=finding.entity,
                attribute=finding.attribute,
                severity=finding.severity,
                state="active",
                strategy=finding.strategy,
                description=finding.description,
                value=_value_text(finding.value),
                gateway=finding.gateway,
                raised_ms=now_ms,
                updated_ms=now_ms,
            )
            self.open[key] = alarm
            self.by_id[alarm.id] = alarm
            out.append(self._transition("raised", alarm, now_ms, finding=finding))
        return out

    def adopt(self, alarms: Iterable[Alarm], owned: Callable[[str], bool]) -> None:
        """Replace the open alarms of the entities ``owned`` selects with ``alarms`` (as
        stored by whoever evaluated them before): a worker taking partitions over goes
        on with their alarms instead of raising them again."""
        for key, alarm in list(self.open.items()):
            if owned(alarm.entity):
                del self.open[key]
                self.by_id.pop(alarm.id, None)
        for alarm in alarms:
            self.open[alarm.key] = alarm
            self.by_id[alarm.id] = alarm

    def _follow(self, alarm: Alarm, finding: Finding, now_ms: int, out: list[Transition]) -> None:
        """Severity, text and value follow the finding when its severity changes; a rise
        needs a fresh acknowledgement (also under a shelf, which stays until it expires)."""
        rank_now = _SEVERITY_RANK[finding.severity]
        rank_was = _SEVERITY_RANK[alarm.severity]
        if rank_now == rank_was:
            return
        alarm.severity = finding.severity
        alarm.description = finding.description
        alarm.value = _value_text(finding.value)
        if rank_now > rank_was:
            alarm.acked_by = None
            alarm.acked_ms = None
            if alarm.state in ("acknowledged", "returned"):
                alarm.state = "active"
            out.append(self._transition("escalated", alarm, now_ms, finding=finding))
        else:
            out.append(self._transition("eased", alarm, now_ms, finding=finding))

    @staticmethod
    def _unshelved_state(alarm: Alarm) -> str:
        if alarm.present:
            return "acknowledged" if alarm.acked_ms is not None else "active"
        return "cleared" if alarm.acked_ms is not None else "returned"

    def _clear(self, alarm: Alarm, now_ms: int) -> Transition:
        alarm.state = "cleared"
        alarm.cleared_ms = now_ms
        alarm.present = False
        self.open.pop(alarm.key, None)
        self.by_id.pop(alarm.id, None)
        return self._transition("cleared", alarm, now_ms)

    def _get(self, alarm_id: str) -> Alarm:
        alarm = self.by_id.get(alarm_id)
        if alarm is None:
            raise AlarmError(f"alarm {alarm_id} is not open (unknown, or already cleared)")
        return alarm

    def acknowledge(self, alarm_id: str, by: str, now_ms: int, reason: str = "") -> Transition:
        alarm = self._get(alarm_id)
        if alarm.state not in ("active", "returned"):
            raise AlarmError(
                f"alarm {alarm_id} is {alarm.state}; only active or returned alarms are "
                "acknowledged"
            )
        alarm.acked_by = by
        alarm.acked_ms = now_ms
        if alarm.state == "returned":
            # acknowledged after it returned to normal: settled
            transition = self._clear(alarm, now_ms)
            return Transition(
                "acknowledged",
                transition.alarm,
                now_ms,
                actor=by,
                detail={"reason": reason, "cleared": True},
            )
        alarm.state = "acknowledged"
        return self._transition("acknowledged", alarm, now_ms, actor=by, detail={"reason": reason})

    def shelve(
        self, alarm_id: str, by: str, until_ms: int, now_ms: int, reason: str = ""
    ) -> Transition:
        alarm = self._get(alarm_id)
        if until_ms <= now_ms:
            raise AlarmError("a shelf must expire in the future")
        if alarm.state == "shelved":
            raise AlarmError(f"alarm {alarm_id} is already shelved; unshelve it first")
        alarm.state = "shelved"
        alarm.shelved_by = by
        alarm.shelved_until_ms = until_ms
        alarm.shelve_reason = reason
        return self._transition(
            "shelved", alarm, now_ms, actor=by, detail={"until_ms": until_ms, "reason": reason}
        )

    def unshelve(self, alarm_id: str, by: str, now_ms: int, reason: str = "") -> Transition:
        alarm = self._get(alarm_id)
        if alarm.state != "shelved":
            raise AlarmError(f"alarm {alarm_id} is {alarm.state}, not shelved")
        alarm.shelved_until_ms = None
        state = self._unshelved_state(alarm)
        if state == "cleared":
            transition = self._clear(alarm, now_ms)
            return Transition(
                "unshelved", transition.alarm, now_ms, actor=by, detail={"reason": reason}
            )
        alarm.state = state
        return self._transition("unshelved", alarm, now_ms, actor=by, detail={"reason": reason})

    def counts_by_severity(self, owns: Callable[[str], bool] | None = None) -> dict[str, int]:
        counts = {"warning": 0, "critical": 0}
        for alarm in self.open.values():
            if owns is None or owns(alarm.entity):
                counts[alarm.severity] = counts.get(alarm.severity, 0) + 1
        return counts


def planned_actions(transition: Transition) -> list[str]:
    """What a raised alarm's strategy asks for: publish, rebirth, propose, investigate."""
    if transition.change != "raised":
        return ["publish"] if transition.alarm.strategy in ("alert", "investigate") else []
    strategy = transition.alarm.strategy
    if strategy == "alert":
        return ["publish"]
    if strategy == "auto_correct":
        return ["rebirth", "propose"]
    if strategy == "investigate":
        return ["publish", "investigate"]
    return []
