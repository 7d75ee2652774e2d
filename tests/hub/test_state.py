"""Last-writer-wins merge and value encoding (pure, property-based)."""

from __future__ import annotations

import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support.strategies import values

from fieldtwin.hub.state import (
    SemanticSpec,
    TwinState,
    decode_value,
    encode_columns,
    encode_value,
    lww_fold,
)

keys = st.tuples(st.sampled_from(["tank-1", "pump-1"]), st.sampled_from(["level", "speed", "x"]))
samples = st.lists(
    st.tuples(keys, values, st.integers(0, 50), st.integers(0, 3)), min_size=1, max_size=40
)


def _merge_all(rows: list[tuple[tuple[str, str], object, int, int]], batches: int) -> TwinState:
    state = TwinState()
    chunk = max(1, len(rows) // batches)
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        result = state.merge(
            [k[0] for k, _, _, _ in part],
            [k[1] for k, _, _, _ in part],
            [v for _, v, _, _ in part],  # type: ignore[misc]
            [t for _, _, t, _ in part],
            [q for _, _, _, q in part],
            "gw",
            0,
            {},
        )
        state.apply(result)
    return state


@settings(max_examples=200, deadline=None)
@example([(("tank-1", "x"), 0.0, 5, 0), (("tank-1", "x"), -0.0, 5, 0)], random.Random(1), 1)
@given(samples, st.randoms(use_true_random=False), st.integers(1, 5))
def test_lww_is_order_and_batching_independent(
    rows: list[tuple[tuple[str, str], object, int, int]], rnd: random.Random, batches: int
) -> None:
    shuffled = list(rows)
    rnd.shuffle(shuffled)
    a = _merge_all(rows, 1)
    b = _merge_all(shuffled, batches)
    view_a = {k: (c.value, type(c.value), c.ts_ms, c.quality) for k, c in a.current.items()}
    view_b = {k: (c.value, type(c.value), c.ts_ms, c.quality) for k, c in b.current.items()}
    assert view_a == view_b
    reference = lww_fold((k[0], k[1], v, t, q) for k, v, t, q in rows)  # type: ignore[misc]
    assert {k: (v, type(v), t, q) for k, (v, t, q) in reference.items()} == view_a
    # the winner is always one of the newest samples of its key
    for key, current in a.current.items():
        assert current.ts_ms == max(t for k, _, t, _ in rows if k == key)


@given(st.lists(values, max_size=30))
def test_value_encoding_round_trips(items: list[object]) -> None:
    kinds, nums, txts = encode_columns(items)  # type: ignore[arg-type]
    decoded = [decode_value(k, n, t) for k, n, t in zip(kinds, nums, txts, strict=True)]
    assert decoded == items
    assert [type(v) for v in decoded] == [type(v) for v in items]
    assert [encode_value(v) for v in items] == list(zip(kinds, nums, txts, strict=True))  # type: ignore[arg-type]


def test_rate_and_change_tracking() -> None:
    state = TwinState()
    spec = {("tank-1", "level"): SemanticSpec(max_rate=1.0, min_change=0.01)}

    def feed(value: float, ts: int, quality: int = 0) -> None:
        state.apply(state.merge(["tank-1"], ["level"], [value], [ts], [quality], "gw", ts, spec))

    feed(2.0, 1000)
    feed(2.005, 2000)  # below min_change: not a change
    assert state.current[("tank-1", "level")].last_change_ms == 1000
    feed(2.5, 3000)  # 0.495 m/s: a change, within the rate
    assert state.current[("tank-1", "level")].last_change_ms == 3000
    assert ("tank-1", "level") not in state.rate_events
    feed(4.5, 4000)  # 2 m/s: faster than physically possible
    event = state.rate_events[("tank-1", "level")]
    assert event.rate == 2.0
    assert event.ts_ms == 4000
    feed(1.0, 3500)  # older: ignored, no rate computed against it
    assert state.current[("tank-1", "level")].value == 4.5
    # noise between two readings 2 ms apart is not a rate: measured over at least 1 s
    del state.rate_events[("tank-1", "level")]
    feed(4.58, 4002)
    assert ("tank-1", "level") not in state.rate_events
    feed(7.58, 4004)  # a 3 m jump is impossible however close in time
    assert state.rate_events[("tank-1", "level")].rate == pytest.approx(3.0)


def test_a_value_creeping_below_min_change_per_sample_still_changes() -> None:
    """A change is a move beyond ``min_change`` from the value at the last change, not
    from the previous sample: a level rising 4 mm per sample against a 10 mm
    ``min_change`` changes every third sample (sample to sample it would look frozen),
    while jitter around one value never does; in one merge batch as across batches."""
    spec = {("tank-1", "level"): SemanticSpec(min_change=0.01)}
    state = TwinState()
    changes = []
    for i in range(12):
        value = 2.0 + 0.004 * i
        state.apply(state.merge(["tank-1"], ["level"], [value], [1000 * i], [0], "gw", 0, spec))
        changes.append(state.current[("tank-1", "level")].last_change_ms)
    assert changes[-1] == 9000  # the last move past 10 mm from the previous change
    assert sorted(set(changes)) == [0, 3000, 6000, 9000]
    batch = TwinState()
    result = batch.merge(
        ["tank-1"] * 12,
        ["level"] * 12,
        [2.0 + 0.004 * i for i in range(12)],
        [1000 * i for i in range(12)],
        [0] * 12,
        "gw",
        0,
        spec,
    )
    batch.apply(result)
    assert batch.current[("tank-1", "level")].last_change_ms == 9000
    jitter = TwinState()
    for i in range(12):
        value = 2.0 + (0.004 if i % 2 else -0.004)
        jitter.apply(jitter.merge(["tank-1"], ["level"], [value], [1000 * i], [0], "gw", 0, spec))
    assert jitter.current[("tank-1", "level")].last_change_ms == 0


def test_a_stale_verdict_on_the_same_reading_wins_whatever_the_arrival_order() -> None:
    # An agent reports a reading GOOD, later re-sends it STALE with its original source
    # timestamp: the twin must show it stale, and must not flip back if the GOOD copy
    # arrives again later (a backlog resend).
    for order in ((0, 3), (3, 0)):
        state = TwinState()
        for quality in order:
            state.apply(
                state.merge(["pt-1"], ["pressure"], [1.0], [5000], [quality], "gw", 6000, {})
            )
        assert state.current[("pt-1", "pressure")].quality == 3
    # ...but a newer reading replaces it, whatever its quality
    state.apply(state.merge(["pt-1"], ["pressure"], [1.1], [5001], [0], "gw", 7000, {}))
    assert state.current[("pt-1", "pressure")].quality == 0
