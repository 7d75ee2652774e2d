"""Backoff, token bucket and throttle (sans-I/O timing helpers)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from fieldtwin.agent.util import Backoff, Throttle, TokenBucket


@given(seed=st.integers(0, 2**32), attempts=st.integers(1, 40))
def test_backoff_is_jittered_grows_and_is_capped(seed: int, attempts: int) -> None:
    backoff = Backoff(0.5, 30.0, rng=random.Random(seed))
    delays = [backoff.next_delay() for _ in range(attempts)]
    for attempt, delay in enumerate(delays):
        assert 0.25 <= delay <= min(30.0, 0.5 * 2**attempt)
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_two_gateways_do_not_reconnect_in_lockstep() -> None:
    a, b = Backoff(rng=random.Random(1)), Backoff(rng=random.Random(2))
    assert [a.next_delay() for _ in range(5)] != [b.next_delay() for _ in range(5)]


def test_token_bucket_bounds_the_rate() -> None:
    bucket = TokenBucket(rate=1000.0, burst=1000.0, stamp=0.0)
    assert bucket.delay_for(1000, 0.0) == 0.0  # the burst
    assert bucket.delay_for(500, 0.0) == 0.5  # then 1000/s
    assert bucket.delay_for(500, 1.0) == 0.0


def test_throttle_counts_what_it_suppressed() -> None:
    throttle = Throttle(10.0)
    assert throttle.ready(0.0)
    assert not throttle.ready(5.0)
    assert not throttle.ready(9.0)
    assert throttle.take_suppressed() == 2
    assert throttle.ready(10.0)
