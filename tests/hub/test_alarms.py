"""Alarm lifecycle (pure) and what each strategy plans."""

from __future__ import annotations

import pytest

from fieldtwin.hub.alarms import AlarmBook, planned_actions
from fieldtwin.hub.drift import Finding
from fieldtwin.hub.errors import AlarmError


def finding(severity: str = "warning", strategy: str = "alert", rule: str = "threshold") -> Finding:
    return Finding(rule, "tank-1", "level", severity, "level high", 0, 4.2, "gw-01", strategy)


def test_raise_acknowledge_escalate_clear() -> None:
    book = AlarmBook()
    (raised,) = book.reconcile([finding()], 1000)
    assert raised.change == "raised"
    assert raised.alarm.state == "active"
    alarm_id = raised.alarm.id
    assert alarm_id == "A-000001"
    assert book.reconcile([finding()], 2000) == []  # unchanged condition: no transition
    acked = book.acknowledge(alarm_id, "olga", 3000)
    assert acked.alarm.state == "acknowledged"
    assert acked.alarm.acked_by == "olga"
    with pytest.raises(AlarmError):
        book.acknowledge(alarm_id, "olga", 3100)
    (escalated,) = book.reconcile([finding("critical")], 4000)
    assert escalated.change == "escalated"
    assert escalated.alarm.state == "active"
    (eased,) = book.reconcile([finding("warning")], 5000)
    assert eased.change == "eased"
    assert eased.alarm.state == "active"
    (cleared,) = book.reconcile([], 6000)
    assert cleared.change == "cleared"
    assert cleared.alarm.cleared_ms == 6000
    assert book.open == {}
    (again,) = book.reconcile([finding()], 7000)
    assert again.alarm.id == "A-000002"  # a recurrence is a new alarm


def test_shelving_expires_back_to_active_or_clears() -> None:
    book = AlarmBook(next_number=7)
    (raised,) = book.reconcile([finding()], 0)
    shelved = book.shelve(raised.alarm.id, "olga", until_ms=10_000, now_ms=100)
    assert shelved.alarm.state == "shelved"
    assert book.reconcile([finding("critical")], 5000) == []  # shelved: quiet
    (back,) = book.reconcile([finding()], 10_000)
    assert back.change == "unshelved"
    assert back.alarm.state == "active"
    book.shelve(raised.alarm.id, "olga", until_ms=20_000, now_ms=11_000)
    (cleared,) = book.reconcile([], 12_000)  # condition gone while shelved
    assert cleared.change == "cleared"
    with pytest.raises(AlarmError):
        book.shelve("A-000007", "olga", 30_000, 13_000)
    with pytest.raises(AlarmError):
        book.unshelve("A-999999", "olga", 13_000)


def test_ignore_strategy_raises_no_alarm_and_strategies_plan_actions() -> None:
    book = AlarmBook()
    assert book.reconcile([finding(strategy="ignore")], 0) == []
    plans = {}
    for strategy in ("alert", "auto_correct", "investigate"):
        book = AlarmBook()
        (raised,) = book.reconcile([finding(strategy=strategy)], 0)
        plans[strategy] = planned_actions(raised)
    assert plans == {
        "alert": ["publish"],
        "auto_correct": ["rebirth", "propose"],
        "investigate": ["publish", "investigate"],
    }
    assert book.counts_by_severity() == {"warning": 1, "critical": 0}
