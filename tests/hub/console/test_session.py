"""The console's session against a played hub: snapshot, gap → resnapshot, link loss."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fieldtwin.hub.console.model import LiveModel
from fieldtwin.hub.console.session import Session
from fieldtwin.hub.console.synthetic import SyntheticHub
from fieldtwin.hub.views import ATTR_COLS, table

NOW = 1_714_564_800_000


async def until(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.02)


def level(value: float) -> dict[str, object]:
    return {"attrs": table(ATTR_COLS, [["tank-1", "level", value, NOW, "good", NOW]])}


async def test_gap_takes_a_fresh_snapshot_and_a_lost_link_reconnects() -> None:
    hub = SyntheticHub.water_plant(NOW)
    model = LiveModel()
    session = Session(lambda: hub, model, clock=lambda: NOW)
    task = asyncio.create_task(session.run())
    try:
        await until(lambda: model.synced)
        snapshots = [op for op, _ in hub.requests if op == "view.snapshot"]
        assert len(snapshots) == 1
        hub.publish("twin", level(3.0))
        await until(lambda: model.entities["tank-1"].attrs["level"].value == 3.0)
        # a frame lost on the way: the next one shows a gap, and a snapshot follows
        hub.frame("twin", level(3.5))
        hub.publish("twin", level(4.0))
        await until(lambda: model.gaps == 1)
        await until(lambda: model.synced and model.snapshots == 2)
        # the broker connection drops: the session says so and reconnects
        hub.up = False
        await until(lambda: not session.link.broker)
        assert "broker unreachable" in session.why_down()
        hub.up = True
        await until(lambda: session.link.broker and model.synced and model.snapshots == 3)
        assert session.whoami["operator"] == "alice"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
