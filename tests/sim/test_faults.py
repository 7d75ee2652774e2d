"""The fault book as a state machine: windows open and close exactly at tick boundaries,
and an actuator fault decides exactly the writes that take effect inside its window."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from support.sim import WATER_PLANT

from fieldtwin.sim.engine import Simulation
from fieldtwin.sim.faults import FaultBook, FaultRequest, LinkFaults
from fieldtwin.sim.scenario import load_scenario

_WATER_PLANT = load_scenario(WATER_PLANT)

windows = st.lists(
    st.tuples(
        st.integers(1, 40),  # start tick
        st.one_of(st.none(), st.integers(0, 30)),  # length (None: until cleared)
        st.one_of(st.none(), st.integers(1, 60)),  # tick at which it is cleared
    ),
    max_size=8,
)


@given(windows=windows)
def test_each_fault_is_active_exactly_on_its_window(
    windows: list[tuple[int, int | None, int | None]],
) -> None:
    book = FaultBook(seed=1)
    faults = [
        book.add(
            FaultRequest("dropout", "plc"),
            start,
            None if length is None else start + length,
            "runtime",
        )
        for start, length, _ in windows
    ]
    seen: dict[int, list[int]] = {f.id: [] for f in faults}
    started: dict[int, int] = {}
    ended: dict[int, int] = {}
    for tick in range(1, 80):
        for fault, (_, _, clear_at) in zip(faults, windows, strict=True):
            if clear_at == tick:
                book.end(fault.id, tick)
        now_started, now_ended = book.advance(tick)
        for fault in now_started:
            started[fault.id] = tick
        for fault in now_ended:
            ended[fault.id] = tick
        for fault in book.active:
            seen[fault.id].append(tick)
        assert (book.link("plc").dropout) == bool(book.active)
    for fault, (start, length, clear_at) in zip(faults, windows, strict=True):
        end = None if length is None else start + length
        if clear_at is not None:
            end = max(clear_at, start) if end is None else max(min(end, clear_at), start)
        expected = list(range(start, min(end, 80) if end is not None else 80))
        assert seen[fault.id] == expected
        if expected:
            assert started[fault.id] == start
            assert fault.status == ("ended" if end is not None and end < 80 else "active")
        else:
            assert fault.status == "cancelled"
        if fault.status == "ended":
            assert ended[fault.id] == end


def test_link_view_scopes_and_combines() -> None:
    book = FaultBook(seed=1)
    book.add(FaultRequest("slow", "bus", unit_id=2, params={"delay_ms": 500.0}), 1, None, "runtime")
    book.add(FaultRequest("slow", "bus", params={"delay_ms": 200.0}), 1, None, "runtime")
    book.add(
        FaultRequest("exception", "bus", point="pt-1.pressure", params={"code": 4}),
        1,
        None,
        "runtime",
    )
    book.add(
        FaultRequest("bad_status", "boiler", params={"status": "BadNoCommunication"}),
        1,
        None,
        "runtime",
    )
    book.advance(1)
    assert book.link("bus", 2) == LinkFaults(delay_ms=500.0)
    assert book.link("bus", 1) == LinkFaults(delay_ms=200.0)
    assert book.link("bus") == LinkFaults(delay_ms=200.0)
    assert book.link("other").healthy
    assert book.point_exception("pt-1.pressure") == 4
    assert book.point_status("boiler", "boiler-1.pressure") == "BadNoCommunication"
    assert book.point_status("bus", "pt-1.pressure") is None


def test_actuator_and_process_faults_stay_out_of_the_link_and_value_views() -> None:
    book = FaultBook(seed=1)
    ignore = book.add(
        FaultRequest("ignore_writes", "plc", point="pump-1.speed_sp"), 3, 6, "runtime"
    )
    leak = book.add(
        FaultRequest("leak", params={"cv": 1.0}, component="tank-1"), 1, None, "runtime"
    )
    # An actuator fault decides writes taking effect in its window, even before it opens.
    assert book.actuator_fault("pump-1.speed_sp", 2) is None
    assert book.actuator_fault("pump-1.speed_sp", 3) is ignore
    assert book.actuator_fault("pump-1.speed_sp", 6) is None
    assert book.actuator_fault("valve-1.position", 3) is None
    for tick in range(1, 5):
        book.advance(tick)
    assert book.link("plc").healthy
    assert book.value_faults("pump-1.speed_sp") == []
    assert book.process_faults() == [leak]
    assert ignore.to_json(0.1)["writes_affected"] == 0
    assert leak.to_json(0.1)["component"] == "tank-1"


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(1, 20),
    length=st.one_of(st.none(), st.integers(1, 20)),
    count=st.one_of(st.none(), st.integers(1, 4)),
    write_ticks=st.lists(st.integers(1, 45), max_size=12),
)
def test_an_actuator_fault_decides_exactly_the_writes_in_its_window(
    start: int, length: int | None, count: int | None, write_ticks: list[int]
) -> None:
    sim = Simulation(_WATER_PLANT)
    params = {"offset": 7.0} if count is None else {"offset": 7.0, "count": count}
    end = None if length is None else start + length
    fault = sim.inject(
        FaultRequest("wrong_value", point="valve-1.position", params=params),
        start_tick=start,
        end_tick=end,
    )
    affected: list[int] = []
    for tick in range(1, 50):
        for _ in range(write_ticks.count(tick)):  # writes taking effect at this tick
            write = sim.request_write("valve-1.position", 40.0)
            in_window = start <= tick and (end is None or tick < end)
            expect = in_window and (count is None or len(affected) < count)
            assert write.outcome == ("altered" if expect else "applied")
            assert write.result == (47.0 if expect else 40.0)
            if expect:
                affected.append(tick)
        sim.step()
    assert fault.writes_affected == len(affected)
    if count is not None and len(affected) == count:
        # used up: the window closed right after its last write
        assert fault.end_tick == min(affected[-1] + 1, end or affected[-1] + 1)
        assert fault.status == "ended"
