"""The console header fitted to 80 columns: the important facts always show."""

from __future__ import annotations

import re

import pytest

from fieldtwin.hub.console.app import ConsoleApp
from fieldtwin.hub.console.synthetic import SyntheticHub
from fieldtwin.hub.console.widgets import header_text

NOW = 1_714_564_800_000  # 2024-05-01T12:00:00Z


async def fitted_headers(*, paused: bool, down_after_ms: int) -> tuple[str, str]:
    """The water plant's header unfitted and fitted to 80 columns (bob, operator and
    approver: 4 alarms, 2 critical, 2 unacknowledged, 1 command to approve)."""
    hub = SyntheticHub.water_plant(NOW, roles=("operator", "approver"), operator="bob")
    now = [NOW]
    app = ConsoleApp(lambda: hub, clock=lambda: now[0])
    async with app.run_test(size=(80, 24)) as pilot:
        for _ in range(200):
            if app.model.synced and app.model.pending_approvals():
                break
            await pilot.pause(0.02)
        app.paused = paused
        now[0] = NOW + down_after_ms
        return header_text(app).plain, header_text(app, 80).plain


def assert_counts(line: str) -> None:
    """4 alarms, 2 critical, 2 unacknowledged, 1 to approve: in full or shortened."""
    assert re.search(r"▲ ?4\b", line), line
    assert re.search(r"\b2 ?crit\b", line), line
    assert re.search(r"\b2 ?unack", line), line
    assert re.search(r"◇ ?1 .*approve", line), line


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
async def test_header_at_80_columns_hub_online(paused: bool) -> None:
    full, fitted = await fitted_headers(paused=paused, down_after_ms=0)
    assert "bob operator,approver" in full
    assert "water-plant" in full
    assert len(fitted) <= 80
    assert fitted.startswith(" ● hub online")
    assert ("⏸ PAUSED" in fitted) == paused
    assert_counts(fitted)
    assert "bob" in fitted  # the operator, its roles shortened or dropped


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
async def test_header_at_80_columns_hub_down(paused: bool) -> None:
    full, fitted = await fitted_headers(paused=paused, down_after_ms=35_000)
    line, why = fitted.split("\n")
    assert len(line) <= 80
    assert len(why) <= 80
    assert line.startswith(" ✖ hub unreachable since 12:00:00Z (35s)")
    assert ("⏸ PAUSED" in line) == paused
    assert_counts(line)
    assert why == " why: no frames from the hub"
    assert full.split("\n")[1] == why
