from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fieldtwin.protocol import NotMsgpack, Replay, SchemaViolation, StaleEpoch
from fieldtwin.protocol.tracker import DeliveryTracker

seqs = st.lists(st.integers(1, 300), max_size=120)


def _tracker(items: list[int], sender: str = "gw", epoch: int = 1) -> DeliveryTracker:
    tracker = DeliveryTracker()
    for seq in items:
        tracker.record(sender, epoch, seq)
    return tracker


def _expected_ranges(items: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for seq in sorted(items):
        if out and out[-1][1] == seq - 1:
            out[-1] = (out[-1][0], seq)
        else:
            out.append((seq, seq))
    return out


@given(seqs)
def test_ranges_are_the_merged_set(items: list[int]) -> None:
    assert _tracker(items).ranges("gw") == _expected_ranges(set(items))


@given(seqs)
def test_recording_is_idempotent(items: list[int]) -> None:
    assert _tracker(items + items).snapshot() == _tracker(items).snapshot()


@given(seqs, st.randoms(use_true_random=False))
def test_order_does_not_matter(items: list[int], rnd: object) -> None:
    shuffled = list(items)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert _tracker(shuffled).snapshot() == _tracker(items).snapshot()


@given(seqs)
def test_survives_save_and_restore(items: list[int]) -> None:
    tracker = _tracker(items)
    tracker.record("other", 7, 3)
    restored = DeliveryTracker.loads(tracker.dumps())
    assert restored.snapshot() == tracker.snapshot()
    assert DeliveryTracker.from_dict(tracker.to_dict()).snapshot() == tracker.snapshot()
    for seq in set(items):
        with pytest.raises(Replay):
            restored.check("gw", 1, seq)


@given(seqs)
def test_gaps_are_the_missing_seqs_below_the_highest(items: list[int]) -> None:
    tracker = _tracker(items)
    delivered = set(items)
    top = max(delivered, default=0)
    missing = {s for s in range(1, top + 1) if s not in delivered}
    from_gaps = {s for lo, hi in tracker.gaps("gw") for s in range(lo, hi + 1)}
    assert from_gaps == missing
    assert tracker.highest("gw") == top


@given(seqs, st.integers(1, 300))
def test_check_refuses_exactly_the_delivered(items: list[int], probe: int) -> None:
    tracker = _tracker(items)
    if probe in items:
        with pytest.raises(Replay):
            tracker.check("gw", 1, probe)
    else:
        tracker.check("gw", 1, probe)


def test_out_of_order_delivery_is_accepted_once() -> None:
    tracker = DeliveryTracker()
    for seq in (5, 1, 3, 2, 4, 100, 50):
        tracker.accept("gw", 1, seq)
    assert tracker.ranges("gw") == [(1, 5), (50, 50), (100, 100)]
    with pytest.raises(Replay, match="seq 3"):
        tracker.accept("gw", 1, 3)


def test_new_epoch_replaces_the_old_and_old_epoch_is_stale() -> None:
    tracker = _tracker([1, 2, 3], epoch=10)
    tracker.check("gw", 11, 1)  # new epoch: seq 1 is fresh again
    tracker.accept("gw", 11, 1)
    assert tracker.epoch_of("gw") == 11
    assert tracker.ranges("gw") == [(1, 1)]
    with pytest.raises(StaleEpoch, match="older"):
        tracker.check("gw", 10, 4)
    with pytest.raises(StaleEpoch):
        tracker.record("gw", 9, 4)


def test_close_below_settles_lost_seqs() -> None:
    tracker = _tracker([10, 11])
    assert tracker.gaps("gw") == [(1, 9)]
    tracker.close_below("gw", 1, 8)
    assert tracker.gaps("gw") == [(8, 9)]
    assert tracker.ranges("gw") == [(1, 7), (10, 11)]


def test_record_reports_whether_it_was_new() -> None:
    tracker = DeliveryTracker()
    assert tracker.record("gw", 1, 4) is True
    assert tracker.record("gw", 1, 4) is False
    assert tracker.record_range("gw", 1, 3, 5) is True
    assert tracker.record_range("gw", 1, 4, 5) is False


def test_seq_zero_is_not_tracked() -> None:
    with pytest.raises(SchemaViolation):
        DeliveryTracker().check("gw", 1, 0)
    with pytest.raises(SchemaViolation):
        DeliveryTracker().record("gw", 1, 0)


@pytest.mark.parametrize(
    "state",
    [b"\xc1", b"\x01", b"\x81\xa6format\x02", b"\x82\xa6format\x01\xa7senders\x81\xa1g\x80"],
)
def test_corrupt_saved_state_is_a_protocol_error(state: bytes) -> None:
    with pytest.raises((NotMsgpack, SchemaViolation)):
        DeliveryTracker.loads(state)


class TrackerMachine(RuleBasedStateMachine):
    """Model: per sender, the current epoch and the set of delivered seqs."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker = DeliveryTracker()
        self.model: dict[str, tuple[int, set[int]]] = {}

    @rule(sender=st.sampled_from(["a", "b"]), epoch=st.integers(1, 4), seq=st.integers(1, 40))
    def deliver(self, sender: str, epoch: int, seq: int) -> None:
        current = self.model.get(sender)
        if current is not None and epoch < current[0]:
            with pytest.raises(StaleEpoch):
                self.tracker.accept(sender, epoch, seq)
            return
        if current is None or epoch > current[0]:
            current = (epoch, set())
        if seq in current[1]:
            with pytest.raises(Replay):
                self.tracker.accept(sender, epoch, seq)
            return
        self.tracker.accept(sender, epoch, seq)
        current[1].add(seq)
        self.model[sender] = current

    @rule()
    def save_and_restore(self) -> None:
        self.tracker = DeliveryTracker.loads(self.tracker.dumps())

    @invariant()
    def matches_model(self) -> None:
        for sender, (epoch, delivered) in self.model.items():
            assert self.tracker.epoch_of(sender) == epoch
            assert self.tracker.ranges(sender) == _expected_ranges(delivered)


TestTrackerMachine = TrackerMachine.TestCase
TestTrackerMachine.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)
