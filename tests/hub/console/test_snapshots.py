"""Screenshots of every console screen at 80x24 and 160x48 (pytest-textual-snapshot).

The console is fed by ``SyntheticHub.water_plant``: the demo's plant at a fixed moment
with alarms in every state, a command awaiting approval, settled commands and a silent
gateway, and a fixed clock, so the pictures only change when the console does.
Update them with ``pytest tests/hub/console/test_snapshots.py --snapshot-update`` and
look at the report before committing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from fieldtwin.hub.console.app import ConsoleApp
from fieldtwin.hub.console.screens import EntityScreen, LiveScreen
from fieldtwin.hub.console.synthetic import SyntheticHub

NOW = 1_714_564_800_000  # 2024-05-01T12:00:00Z
SIZES = [(80, 24), (160, 48)]


def app(
    roles: tuple[str, ...] = ("operator", "approver"),
    operator: str = "bob",
    clock: Callable[[], int] = lambda: NOW,
) -> ConsoleApp:
    hub = SyntheticHub.water_plant(NOW, roles=roles, operator=operator)
    return ConsoleApp(lambda: hub, clock=clock)


async def settled(pilot: Any) -> None:
    console: ConsoleApp = pilot.app
    for _ in range(200):
        screen = console.screen
        if console.model.synced and isinstance(screen, LiveScreen) and screen.ready:
            break
        await pilot.pause(0.02)
    await pilot.pause(0.3)  # one flush and one tick
    await pilot.wait_for_scheduled_animations()


def go(*keys: str, entity: str | None = None) -> Callable[[Any], Awaitable[None]]:
    async def run_before(pilot: Any) -> None:
        await settled(pilot)
        if entity is not None:
            pilot.app.open_entity(entity)
            await settled(pilot)
            screen = pilot.app.screen
            assert isinstance(screen, EntityScreen)
            for _ in range(100):
                if screen._series is not None:
                    break
                await pilot.pause(0.02)
        if keys:
            await pilot.press(*keys)
            await settled(pilot)

    return run_before


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    ("screen", "keys", "entity"),
    [
        ("overview", (), None),
        ("entity", (), "tank-1"),
        ("alarms", ("2",), None),
        ("approvals", ("3",), None),
        ("commands", ("4", "down"), None),
        ("audit", ("5",), None),
    ],
)
def test_screen(
    snap_compare: Any, size: tuple[int, int], screen: str, keys: tuple[str, ...], entity: Any
) -> None:
    assert snap_compare(app(), terminal_size=size, run_before=go(*keys, entity=entity))


def test_approve_modal_focuses_cancel(snap_compare: Any) -> None:
    assert snap_compare(app(), terminal_size=(80, 24), run_before=go("3", "a"))


def test_viewer_sees_no_approve(snap_compare: Any) -> None:
    assert snap_compare(
        app(roles=("viewer",), operator="vic"), terminal_size=(80, 24), run_before=go("3")
    )


def test_header_paused(snap_compare: Any) -> None:
    """80 columns: the header keeps PAUSED, the alarm counts and the approvals."""
    assert snap_compare(app(), terminal_size=(80, 24), run_before=go("p"))


def test_header_hub_down(snap_compare: Any) -> None:
    """35 s without a frame from the hub: since when and why, then the counts, at 80
    columns; the reason takes a second header line."""
    now = [NOW]

    async def run_before(pilot: Any) -> None:
        await settled(pilot)
        now[0] = NOW + 35_000
        pilot.app.tick()
        await pilot.pause(0.3)

    assert snap_compare(app(clock=lambda: now[0]), terminal_size=(80, 24), run_before=run_before)
