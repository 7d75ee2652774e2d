"""The chaos test's judge, on hand-made cases: it must catch what it is there to catch."""

from __future__ import annotations

from chaos.ledger import GOOD, Life, Read, Stored, reconcile

GW = {"t.level": "gw", "t.temp": "gw"}
BAD = 2


def reads(point: str, values: list[float], start: int = 1000, step: int = 250) -> list[Read]:
    return [Read(point, start + i * step, v) for i, v in enumerate(values)]


def stored_for(rs: list[Read], indices: list[int], lag: int = 3) -> list[Stored]:
    return [Stored(rs[i].point, "gw", rs[i].wall_ms + lag, rs[i].value, GOOD) for i in indices]


def test_every_change_stored_once_is_clean() -> None:
    rs = reads("t.level", [1.0, 1.0, 2.0, 3.0, 3.0, 1.0])
    verdict = reconcile(rs, stored_for(rs, [0, 2, 3, 5]), [Life("gw", 0, 5000, False)], GW)
    assert (verdict.changes, verdict.matched) == (4, 4)
    assert verdict.duplicates == verdict.unmatched == verdict.lost == []
    assert verdict.lost_in_window == []


def test_a_sample_stored_twice_is_a_duplicate() -> None:
    rs = reads("t.level", [1.0, 2.0, 3.0])
    twice = stored_for(rs, [0, 1, 1, 2])
    verdict = reconcile(rs, twice, [Life("gw", 0, 5000, False)], GW)
    assert len(verdict.duplicates) == 2  # the identical row, and two samples for one read


def test_the_same_value_with_another_stamp_is_not_a_second_read() -> None:
    rs = reads("t.level", [1.0, 2.0, 3.0])
    extra = [*stored_for(rs, [0, 1, 2]), Stored("t.level", "gw", rs[1].wall_ms + 7, 2.0, GOOD)]
    verdict = reconcile(rs, extra, [Life("gw", 0, 5000, False)], GW)
    assert verdict.duplicates


def test_a_value_nobody_served_is_unmatched() -> None:
    rs = reads("t.level", [1.0, 2.0])
    made_up = [*stored_for(rs, [0, 1]), Stored("t.level", "gw", rs[1].wall_ms + 5, 9.0, GOOD)]
    verdict = reconcile(rs, made_up, [Life("gw", 0, 5000, False)], GW)
    assert len(verdict.unmatched) == 1


def test_a_loss_in_a_clean_life_is_a_loss() -> None:
    rs = reads("t.level", [1.0, 2.0, 3.0])
    verdict = reconcile(rs, stored_for(rs, [0, 2]), [Life("gw", 0, 5000, False)], GW)
    assert len(verdict.lost) == 1
    assert "ended cleanly" in verdict.lost[0]


def test_the_last_reads_before_a_sigkill_are_in_the_window() -> None:
    level = reads("t.level", [1.0, 2.0, 3.0, 4.0])
    temp = reads("t.temp", [10.0, 11.0, 12.0, 13.0], start=1010)
    kill = level[-1].wall_ms + 40
    stored = stored_for(level, [0, 1]) + stored_for(temp, [0, 1])
    lives = [Life("gw", 0, kill, True), Life("gw", kill + 2000, 9000, False)]
    verdict = reconcile(level + temp, stored, lives, GW)
    assert verdict.lost == []
    assert len(verdict.lost_in_window) == 4
    assert verdict.window_ms == kill - level[2].wall_ms


def test_a_loss_followed_by_a_stored_later_read_is_outside_the_window() -> None:
    level = reads("t.level", [1.0, 2.0, 3.0, 4.0])
    temp = reads("t.temp", [10.0, 11.0, 12.0, 13.0], start=1010)
    kill = level[-1].wall_ms + 40
    # level's read 1 is missing, but temp's read 3, read after it, was stored
    stored = stored_for(level, [0]) + stored_for(temp, [0, 1, 2, 3])
    verdict = reconcile(level + temp, stored, [Life("gw", 0, kill, True)], GW)
    assert any("after it and before the SIGKILL" in text for text in verdict.lost)


def test_bad_samples_and_restarts_are_not_reads() -> None:
    rs = reads("t.level", [1.0, 1.0, 1.0, 2.0])
    restart = rs[2].wall_ms - 100
    stored = [
        *stored_for(rs, [0, 2, 3]),  # read 2 reported again: first read after a restart
        Stored("t.level", "gw", rs[1].wall_ms + 50, None, BAD),
    ]
    lives = [Life("gw", 0, restart - 1000, True), Life("gw", restart, 9000, False)]
    verdict = reconcile(rs, stored, lives, GW)
    assert (verdict.matched, verdict.stored_not_good) == (3, 1)
    assert verdict.duplicates == verdict.unmatched == verdict.lost == []


def test_a_point_the_simulator_never_served_is_unmatched() -> None:
    rs = reads("t.level", [1.0])
    other = Stored("t.temp", "gw", 1010, 20.0, GOOD)
    verdict = reconcile(rs, [*stored_for(rs, [0]), other], [Life("gw", 0, 5000, False)], GW)
    assert len(verdict.unmatched) == 1
    assert verdict.unmatched[0].startswith("t.temp")
