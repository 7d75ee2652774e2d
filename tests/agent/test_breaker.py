"""The per-unit circuit breaker (sans-I/O, clock passed in)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fieldtwin.agent.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


def test_one_failure_skips_the_rest_of_the_cycle_then_probes() -> None:
    breaker = Breaker(threshold=3, cooldown_s=1.0)
    assert breaker.allow(0.0)
    assert not breaker.failure(0.0)  # not yet declared down
    assert breaker.state == OPEN
    assert not breaker.allow(0.5)  # the unit's other blocks this cycle: skipped
    assert breaker.allow(1.0)  # the probe
    assert breaker.state == HALF_OPEN
    assert not breaker.allow(1.0)  # only one probe at a time
    assert not breaker.success()  # it was never declared down
    assert breaker.state == CLOSED
    assert breaker.allow(1.1)


def test_declared_down_once_and_back_up() -> None:
    breaker = Breaker(threshold=3, cooldown_s=1.0, max_cooldown_s=4.0)
    now = 0.0
    declared = []
    for _ in range(6):
        while not breaker.allow(now):
            now += 0.25
        declared.append(breaker.failure(now))
    assert declared == [False, False, True, False, False, False]
    assert breaker.down
    assert breaker.retry_at() - now == 4.0  # capped cooldown
    while not breaker.allow(now):
        now += 0.25
    assert breaker.success() is True
    assert not breaker.down


@given(st.lists(st.tuples(st.booleans(), st.floats(0, 5)), max_size=200))
def test_at_most_one_request_in_flight_while_not_closed(events: list[tuple[bool, float]]) -> None:
    breaker = Breaker(threshold=2, cooldown_s=0.5, max_cooldown_s=8.0)
    now = 0.0
    for succeeded, step in events:
        now += step
        allowed = breaker.allow(now)
        if breaker.state != CLOSED and allowed:
            # a second caller in the same instant must be refused
            assert not breaker.allow(now)
        if allowed:
            if succeeded:
                breaker.success()
            else:
                breaker.failure(now)
        assert breaker.down == (breaker.failures >= 2)
        if breaker.state == OPEN:
            assert breaker.open_until > now
