"""Telling "another agent has our gateway id" from the uplink's counters."""

from __future__ import annotations

from fieldtwin.agent.takeover import TakeoverDetector


def test_repeated_short_sessions_raise_one_suspicion_per_log_interval() -> None:
    detector = TakeoverDetector(short_s=60, count=3, window_s=600, log_interval_s=300)
    now = 0.0
    results = []
    for connects in range(1, 5):  # connected for 5 s, kicked off, reconnected 2 s later
        results.append(detector.observe(now, connects=connects, connected=True, foreign_acks=0))
        now += 5
        results.append(detector.observe(now, connects=connects, connected=False, foreign_acks=0))
        now += 2
    raised = [r for r in results if r is not None]
    assert len(raised) == 1
    assert raised[0].short_sessions == 3
    assert detector.suspected_at_s is not None


def test_long_sessions_and_sessions_too_far_apart_are_not_suspicious() -> None:
    detector = TakeoverDetector(short_s=60, count=3, window_s=600)
    now = 0.0
    for connects in range(1, 6):
        assert detector.observe(now, connects=connects, connected=True, foreign_acks=0) is None
        now += 120  # a working connection that then drops (network trouble)
        assert detector.observe(now, connects=connects, connected=False, foreign_acks=0) is None
        now += 1
    short = TakeoverDetector(short_s=60, count=3, window_s=600)
    now = 0.0
    for connects in range(1, 6):
        assert short.observe(now, connects=connects, connected=True, foreign_acks=0) is None
        now += 10
        assert short.observe(now, connects=connects, connected=False, foreign_acks=0) is None
        now += 400  # one short session every ~7 minutes: never three in ten minutes


def test_sessions_between_two_observations_count_as_short() -> None:
    detector = TakeoverDetector(short_s=60, count=3, window_s=600)
    assert detector.observe(0, connects=1, connected=True, foreign_acks=0) is None
    # Three sessions ended between two calls one second apart.
    found = detector.observe(1, connects=4, connected=True, foreign_acks=0)
    assert found is not None
    assert found.short_sessions == 3


def test_an_ack_for_another_epoch_is_suspicious_at_once() -> None:
    detector = TakeoverDetector()
    assert detector.observe(0, connects=1, connected=True, foreign_acks=0) is None
    found = detector.observe(1, connects=1, connected=True, foreign_acks=2)
    assert found is not None
    assert found.foreign_acks == 2
