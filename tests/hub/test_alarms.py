"""Alarm lifecycle (pure, ISA-18.2 style) and what each strategy plans."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldtwin.hub.alarms import ALARM_STATES, AlarmBook, planned_actions
from fieldtwin.hub.drift import Finding
from fieldtwin.hub.errors import AlarmError


def finding(
    severity: str = "warning",
    strategy: str = "alert",
    rule: str = "threshold",
    text: str = "level high",
    entity: str = "tank-1",
) -> Finding:
    return Finding(rule, entity, "level", severity, text, 0, 4.2, "gw-01", strategy)


def test_raise_acknowledge_escalate_clear() -> None:
    book = AlarmBook()
    (raised,) = book.reconcile([finding()], 1000)
    assert raised.change == "raised"
    assert raised.alarm.state == "active"
    alarm_id = raised.alarm.id
    assert alarm_id == "A-000001"
    assert book.reconcile([finding()], 2000) == []  # unchanged condition: no transition
    acked = book.acknowledge(alarm_id, "olga", 3000, "seen")
    assert acked.alarm.state == "acknowledged"
    assert acked.alarm.acked_by == "olga"
    assert acked.detail["reason"] == "seen"
    with pytest.raises(AlarmError):
        book.acknowledge(alarm_id, "olga", 3100)
    (escalated,) = book.reconcile([finding("critical", text="level very high")], 4000)
    assert escalated.change == "escalated"
    assert escalated.alarm.state == "active"  # a rise needs a fresh acknowledgement
    assert escalated.alarm.description == "level very high"  # the text follows
    assert escalated.alarm.acked_ms is None
    (eased,) = book.reconcile([finding("warning", text="level high")], 5000)
    assert eased.change == "eased"
    assert eased.alarm.state == "active"
    assert eased.alarm.description == "level high"
    book.acknowledge(alarm_id, "olga", 5500, "ok")
    (cleared,) = book.reconcile([], 6000)  # acknowledged and gone: cleared
    assert cleared.change == "cleared"
    assert cleared.alarm.cleared_ms == 6000
    assert book.open == {}
    (again,) = book.reconcile([finding()], 7000)
    assert again.alarm.id == "A-000002"  # a recurrence is a new alarm


def test_an_alarm_that_returns_unacknowledged_stays_until_acknowledged() -> None:
    book = AlarmBook()
    (raised,) = book.reconcile([finding()], 1000)
    (returned,) = book.reconcile([], 2000)
    assert returned.change == "returned"
    assert returned.alarm.state == "returned"
    assert book.reconcile([], 3000) == []  # stays, quietly
    assert book.counts_by_severity() == {"warning": 1, "critical": 0}
    (back,) = book.reconcile([finding()], 4000)  # the condition came back: same alarm
    assert back.change == "reraised"
    assert back.alarm.id == raised.alarm.id
    assert back.alarm.state == "active"
    book.reconcile([], 5000)
    done = book.acknowledge(raised.alarm.id, "olga", 6000, "understood")
    assert done.alarm.state == "cleared"  # acknowledged after it returned: settled
    assert book.open == {}


def test_shelving_expires_back_to_where_it_was_or_clears() -> None:
    book = AlarmBook(next_number=7)
    (raised,) = book.reconcile([finding()], 0)
    shelved = book.shelve(raised.alarm.id, "olga", until_ms=10_000, now_ms=100, reason="work")
    assert shelved.alarm.state == "shelved"
    assert shelved.alarm.shelve_reason == "work"
    (escalated,) = book.reconcile([finding("critical", text="worse")], 5000)
    assert escalated.alarm.state == "shelved"  # a shelf hides it, but the text follows
    assert escalated.alarm.description == "worse"
    (back,) = book.reconcile([finding("critical", text="worse")], 10_000)
    assert back.change == "unshelved"
    assert back.alarm.state == "active"
    book.shelve(raised.alarm.id, "olga", until_ms=20_000, now_ms=11_000)
    (cleared,) = book.reconcile([], 12_000)  # condition gone while shelved
    assert cleared.change == "cleared"
    with pytest.raises(AlarmError):
        book.shelve("A-000007", "olga", 30_000, 13_000)
    with pytest.raises(AlarmError):
        book.unshelve("A-999999", "olga", 13_000)


def test_unshelve_keeps_an_earlier_acknowledgement() -> None:
    book = AlarmBook()
    (raised,) = book.reconcile([finding()], 0)
    book.acknowledge(raised.alarm.id, "olga", 100, "seen")
    book.shelve(raised.alarm.id, "olga", until_ms=60_000, now_ms=200, reason="maintenance")
    back = book.unshelve(raised.alarm.id, "piet", 300, "maintenance done")
    assert back.alarm.state == "acknowledged"
    assert back.alarm.acked_by == "olga"
    assert back.detail["reason"] == "maintenance done"


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


EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("findings"), st.sampled_from(["none", "warning", "critical"])),
        st.tuples(st.just("ack"), st.just("")),
        st.tuples(st.just("shelve"), st.integers(1, 5_000).map(str)),
        st.tuples(st.just("unshelve"), st.just("")),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(EVENTS)
def test_alarm_book_invariants(events: list[tuple[str, str]]) -> None:
    """Whatever happens: one open alarm per key, open alarms are never cleared, an
    alarm is cleared only once acknowledged or its condition is gone, and every
    transition leaves a known state."""
    book = AlarmBook()
    now = 0
    present = False
    for kind, arg in events:
        now += 1000
        try:
            if kind == "findings":
                present = arg != "none"
                transitions = book.reconcile([finding(arg)] if present else [], now)
            elif kind == "ack":
                transitions = [book.acknowledge(a.id, "o", now) for a in list(book.open.values())]
            elif kind == "shelve":
                transitions = [
                    book.shelve(a.id, "o", now + int(arg), now, "r")
                    for a in list(book.open.values())
                ]
            else:
                transitions = [book.unshelve(a.id, "o", now) for a in list(book.open.values())]
        except AlarmError:
            continue
        for transition in transitions:
            assert transition.alarm.state in ALARM_STATES
            if transition.alarm.state == "cleared":
                assert transition.alarm.acked_ms is not None or not transition.alarm.present
        assert len(book.open) <= 1
        for alarm in book.open.values():
            assert alarm.state != "cleared"
            if alarm.state == "returned":
                assert not alarm.present
                assert alarm.acked_ms is None
            if alarm.state in ("active", "acknowledged"):
                assert alarm.present


def test_a_worker_book_moves_only_the_alarms_of_entities_it_owns() -> None:
    """``owns`` limits reconcile to a worker's entities; ``adopt`` takes over the alarms
    another worker stored for entities it just gained, ids and states unchanged."""
    mine = {"tank-1"}

    def owns(entity: str) -> bool:
        return entity in mine

    book = AlarmBook()
    raised = book.reconcile([finding(entity="tank-1"), finding(entity="pump-1")], 0, owns)
    assert [t.alarm.entity for t in raised] == ["tank-1"]
    theirs = AlarmBook(next_number=500)
    (pump,) = theirs.reconcile([finding(entity="pump-1")], 0)
    theirs.acknowledge(pump.alarm.id, "ana", 10, "seen")
    # pump-1's finding is gone here, but pump-1 is not ours: its alarm is left alone
    book.adopt(list(theirs.open.values()), lambda e: e == "pump-1")
    assert book.reconcile([finding(entity="tank-1")], 20, owns) == []
    assert book.by_id[pump.alarm.id].state == "acknowledged"
    # once pump-1 is ours, the missing finding clears the adopted alarm (acknowledged)
    mine.add("pump-1")
    (cleared,) = book.reconcile([finding(entity="tank-1")], 30, owns)
    assert (cleared.change, cleared.alarm.id) == ("cleared", pump.alarm.id)
    assert book.counts_by_severity(owns) == book.counts_by_severity()
