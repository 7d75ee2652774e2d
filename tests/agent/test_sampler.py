"""Report by exception: deadband, heartbeat, BAD once, STALE with the original timestamp."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from fieldtwin.agent.sampler import FilterSpec, Sampler
from fieldtwin.protocol.messages import Quality, Sample

GOOD, BAD, STALE, UNCERTAIN = Quality.GOOD, Quality.BAD, Quality.STALE, Quality.UNCERTAIN


def make(deadband: float = 0.0, silence_ms: int = 10_000) -> tuple[Sampler, list[Sample]]:
    out: list[Sample] = []
    return Sampler([FilterSpec("tank-1", "level", deadband, silence_ms)], out.append), out


def test_deadband_suppresses_small_changes() -> None:
    sampler, out = make(deadband=0.05)
    sampler.offer(0, 2.00, 1000, GOOD, 1000)
    sampler.offer(0, 2.03, 2000, GOOD, 2000)  # within the deadband of the last SENT value
    sampler.offer(0, 2.04, 3000, GOOD, 3000)
    sampler.offer(0, 2.06, 4000, GOOD, 4000)  # 0.06 from 2.00: reported
    assert [(s.value, s.ts_ms) for s in out] == [(2.00, 1000), (2.06, 4000)]


def test_zero_deadband_reports_any_change_and_types() -> None:
    sampler, out = make()
    for ts, value in enumerate([1, 1, 2, 2.0, True, "x", "x"]):
        sampler.offer(0, value, ts + 1, GOOD, ts + 1)
    assert [s.value for s in out] == [1, 2, True, "x"]


def test_heartbeat_after_max_silence_with_the_source_timestamp() -> None:
    sampler, out = make(silence_ms=10_000)
    sampler.offer(0, 5.0, 1_000, GOOD, 1_000)
    sampler.offer(0, 5.0, 9_000, GOOD, 9_000)
    sampler.offer(0, 5.0, 11_000, GOOD, 11_500)
    assert [(s.ts_ms, s.quality) for s in out] == [(1_000, GOOD), (11_000, GOOD)]
    assert sampler.counters.heartbeats == 1


def test_no_heartbeat_for_a_reading_that_is_not_newer() -> None:
    sampler, out = make(silence_ms=10_000)
    sampler.offer(0, 5.0, 1_000, GOOD, 1_000)
    sampler.offer(0, 5.0, 1_000, GOOD, 12_000)  # the same reading again, read later
    assert len(out) == 2
    assert out[1] == Sample("tank-1", "level", 5.0, 1_000, STALE)  # old source time: STALE


def test_failure_reports_bad_once_and_recovery_reports_at_once() -> None:
    sampler, out = make(deadband=1.0)
    sampler.offer(0, 5.0, 1_000, GOOD, 1_000)
    sampler.fail(0, 2_000)
    sampler.fail(0, 3_000)
    sampler.offer(0, None, 3_500, BAD, 3_500)
    sampler.offer(0, 5.0, 4_000, GOOD, 4_000)  # same value, but quality changed
    assert [(s.value, s.ts_ms, s.quality) for s in out] == [
        (5.0, 1_000, GOOD),
        (None, 2_000, BAD),
        (5.0, 4_000, GOOD),
    ]


def test_quiet_source_turns_stale_once_with_the_original_timestamp() -> None:
    sampler, out = make(silence_ms=10_000)
    sampler.offer(0, 21.5, 1_000, GOOD, 1_000)
    sampler.tick(10_000)
    assert len(out) == 1
    sampler.tick(11_001)
    sampler.tick(20_000)
    assert out[1] == Sample("tank-1", "level", 21.5, 1_000, STALE)
    assert len(out) == 2
    sampler.offer(0, 21.5, 25_000, GOOD, 25_000)
    assert out[2] == Sample("tank-1", "level", 21.5, 25_000, GOOD)


def test_uncertain_is_a_quality_change_too() -> None:
    sampler, out = make()
    sampler.offer(0, 1.0, 1, GOOD, 1)
    sampler.offer(0, 1.0, 2, UNCERTAIN, 2)
    assert [s.quality for s in out] == [GOOD, UNCERTAIN]


def test_silence_zero_disables_heartbeat_and_stale() -> None:
    sampler, out = make(silence_ms=0)
    sampler.offer(0, 1.0, 1, GOOD, 1)
    sampler.offer(0, 1.0, 10**9, GOOD, 10**9)
    sampler.tick(10**10)
    assert len(out) == 1


def test_state_is_the_last_sample_sent() -> None:
    out: list[Sample] = []
    sampler = Sampler([FilterSpec("a", "x"), FilterSpec("b", "y")], out.append)
    sampler.offer(1, 3, 5, GOOD, 5)
    assert sampler.state() == [Sample("b", "y", 3, 5, GOOD)]


events = st.lists(
    st.one_of(
        st.tuples(
            st.just("offer"),
            st.one_of(st.none(), st.floats(-10, 10), st.integers(-3, 3)),
            st.integers(0, 30_000),
            st.sampled_from([GOOD, UNCERTAIN, BAD]),
        ),
        st.tuples(st.just("fail"), st.none(), st.just(0), st.just(BAD)),
        st.tuples(st.just("tick"), st.none(), st.just(0), st.just(GOOD)),
    ),
    max_size=80,
)


@given(events=events, deadband=st.sampled_from([0.0, 0.5]), silence=st.sampled_from([0, 5_000]))
def test_never_restamps_and_never_repeats_a_sample(
    events: list[tuple[str, object, int, Quality]], deadband: float, silence: int
) -> None:
    """Every timestamp sent is a source timestamp or a failure time; BAD carries no value."""
    sampler, out = make(deadband, silence)
    now = 0
    allowed_ts: set[int] = set()
    for kind, value, ts_offset, quality in events:
        now += 700
        if kind == "offer":
            ts = max(0, now - ts_offset)
            allowed_ts.add(ts)
            sampler.offer(0, value, ts, quality, now)  # type: ignore[arg-type]
        elif kind == "fail":
            allowed_ts.add(now)
            sampler.fail(0, now)
        else:
            sampler.tick(now)
    for previous, sample in itertools.pairwise(out):
        assert sample != previous
    for sample in out:
        assert sample.ts_ms in allowed_ts
        assert (sample.value is None) == (sample.quality == BAD)
        if sample.quality == STALE:
            assert silence > 0


def test_readings_outside_the_valid_range_are_bad_and_counted() -> None:
    seen: list[tuple[str, str, object, int]] = []
    out: list[Sample] = []
    sampler = Sampler(
        [FilterSpec("pump-1", "speed", 0, 10_000, valid_min=0, valid_max=1800)],
        out.append,
        lambda *args: seen.append(args),
    )
    sampler.offer(0, 898, 1000, GOOD, 1000)
    sampler.offer(0, 34_051, 2000, GOOD, 2000)  # a byte-swapped uint16
    sampler.offer(0, 33_000, 3000, GOOD, 3000)  # still implausible: BAD is sent once
    sampler.offer(0, 901, 4000, GOOD, 4000)
    assert [(s.value, s.quality) for s in out] == [(898, GOOD), (None, BAD), (901, GOOD)]
    assert out[1].ts_ms == 2000  # the reading's own time
    assert sampler.counters.implausible == 2
    assert sampler.implausible_counts() == {0: 2}
    assert seen == [("pump-1", "speed", 34_051, 2000), ("pump-1", "speed", 33_000, 3000)]


def test_out_of_range_can_be_sent_uncertain_with_its_value() -> None:
    out: list[Sample] = []
    spec = FilterSpec("tank-1", "level", 0, 10_000, valid_max=5.0, out_of_range=UNCERTAIN)
    sampler = Sampler([spec], out.append)
    sampler.offer(0, 2.5, 1000, GOOD, 1000)
    sampler.offer(0, 7.5, 2000, GOOD, 2000)
    sampler.offer(0, 7.6, 3000, GOOD, 3000)  # a change within UNCERTAIN is still reported
    sampler.offer(0, 4.0, 4000, GOOD, 4000)
    assert [(s.value, s.quality) for s in out] == [
        (2.5, GOOD),
        (7.5, UNCERTAIN),
        (7.6, UNCERTAIN),
        (4.0, GOOD),
    ]


def test_tiny_floats_count_as_implausible_but_zero_does_not() -> None:
    out: list[Sample] = []
    spec = FilterSpec("tank-1", "level", 0, 10_000, 0.0, 5.0, BAD, tiny=5e-6)
    sampler = Sampler([spec], out.append)
    sampler.offer(0, 0.0, 1000, GOOD, 1000)
    sampler.offer(0, 4.07e-20, 2000, GOOD, 2000)  # 2.5 m under the BADC byte order
    sampler.offer(0, 2.5, 3000, GOOD, 3000)
    assert [(s.value, s.quality) for s in out] == [(0.0, GOOD), (None, BAD), (2.5, GOOD)]


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=40))
def test_no_value_outside_the_range_is_ever_sent_good(values: list[float]) -> None:
    out: list[Sample] = []
    sampler = Sampler([FilterSpec("x", "y", 0, 0, valid_min=-10, valid_max=10)], out.append)
    for ts, value in enumerate(values, start=1):
        sampler.offer(0, value, ts, GOOD, ts)
    assert all(-10 <= s.value <= 10 for s in out if s.quality == GOOD)  # type: ignore[operator]
    assert sampler.counters.implausible == sum(1 for v in values if not -10 <= v <= 10)
