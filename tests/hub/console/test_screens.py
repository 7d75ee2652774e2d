"""The plant overview driven with Pilot against a played hub: what a flush redraws."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from fieldtwin.hub.console.app import ConsoleApp
from fieldtwin.hub.console.model import SORTS
from fieldtwin.hub.console.screens import OverviewScreen
from fieldtwin.hub.console.synthetic import SyntheticHub
from fieldtwin.hub.views import ATTR_COLS, table

NOW = 1_714_564_800_000  # 2024-05-01T12:00:00Z


async def until(pilot: Any, check: Callable[[], Any], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {check}"
        await pilot.pause(0.02)


def quiet_console(hub: SyntheticHub) -> ConsoleApp:
    """Flushes and ticks only when the test calls them."""
    return ConsoleApp(lambda: hub, clock=lambda: NOW, flush_s=3600, tick_s=3600)


async def overview(pilot: Any) -> OverviewScreen:
    app: ConsoleApp = pilot.app
    await until(pilot, lambda: app.model.synced)
    await until(pilot, lambda: isinstance(app.screen, OverviewScreen) and app.screen.ready)
    app.flush()
    screen = app.screen
    assert isinstance(screen, OverviewScreen)
    await until(pilot, lambda: screen.table.row_count == len(app.model.entities))
    return screen


def record_drawn(screen: OverviewScreen) -> list[tuple[str, Sequence[Any]]]:
    """The rows the table draws from now on: (key, cells)."""
    drawn: list[tuple[str, Sequence[Any]]] = []
    cells = screen.table.cells

    def recording(key: str) -> Sequence[Any]:
        row = cells(key)
        drawn.append((key, row))
        return row

    screen.table.cells = recording
    return drawn


async def test_a_flush_redraws_only_the_rows_that_changed() -> None:
    hub = SyntheticHub.water_plant(NOW)
    app = quiet_console(hub)
    async with app.run_test(size=(160, 48)) as pilot:
        screen = await overview(pilot)
        await pilot.pause(0.2)  # the first full draw is done
        drawn = record_drawn(screen)
        tank = app.model.entities["tank-1"].twin_id

        hub.publish(
            "twin", {"attrs": table(ATTR_COLS, [["tank-1", "level", 3.25, NOW, "good", NOW]])}
        )
        await until(pilot, lambda: app.model.entities["tank-1"].attrs["level"].value == 3.25)
        app.flush()
        await until(pilot, lambda: drawn)
        await pilot.pause(0.2)  # anything else would be drawn by now
        assert {key for key, _ in drawn} == {tank}
        assert "level 3.25 m" in str(drawn[-1][1][2])

        # a structural change (sort) draws every row on screen
        drawn.clear()
        await pilot.press("s")
        everyone = {e.twin_id for e in app.model.entities.values()}
        await until(pilot, lambda: {key for key, _ in drawn} == everyone)


async def test_sorting_keeps_the_selected_row() -> None:
    app = quiet_console(SyntheticHub.water_plant(NOW))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await overview(pilot)
        table = screen.table
        await pilot.press("down", "down", "down", "down")
        chosen = table.selected_key()
        assert chosen == app.model.entities["pt-1"].twin_id  # 5th by entity id
        orders = {tuple(table.keys)}
        positions = {table.cursor}
        for expected in (*SORTS[1:], SORTS[0]):
            await pilot.press("s")
            assert screen.sort == expected
            assert table.selected_key() == chosen, f"sorted by {expected}"
            orders.add(tuple(table.keys))
            positions.add(table.cursor)
        # the sorts did move the rows, and the selected one with them
        assert len(orders) >= 3
        assert len(positions) >= 2


async def test_filter_by_health_through_the_filter_box() -> None:
    app = quiet_console(SyntheticHub.water_plant(NOW))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await overview(pilot)
        table = screen.table
        model = app.model
        twin = {entity_id: e.twin_id for entity_id, e in model.entities.items()}
        await pilot.press("down", "down", "down", "down")
        assert table.selected_key() == twin["pt-1"]

        await pilot.press("slash", *"health:stale", "enter")
        assert screen.filter == "health:stale"
        stale = {twin[i] for i in ("ambient-1", "flowmeter-1", "pt-1")}
        assert set(table.keys) == stale
        assert table.selected_key() == twin["pt-1"]  # still shown, still selected
        assert screen.query_one("#entities").has_focus

        # a filter that hides the selected row selects one of those shown (reopening the
        # box selects its text, so what is typed replaces it)
        await pilot.press("slash", *"health:degraded", "enter")
        assert screen.filter == "health:degraded"
        assert table.keys == [twin["tank-1"]]
        assert table.selected_key() == twin["tank-1"]

        # Esc clears the filter and shows every row again, the selection kept
        await pilot.press("slash", "escape")
        assert screen.filter == ""
        assert set(table.keys) == set(twin.values())
        assert table.selected_key() == twin["tank-1"]
