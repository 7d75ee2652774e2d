"""The console against the real thing: Mosquitto (project ACL), simulator, agents, hub.

One plant for the module (``fieldtwin.hub.demo.Plant`` with the test broker); each test
drives a ``ConsoleApp`` with Pilot, logged in as one of the example operators (alice
operator, bob operator+approver, vic viewer) through its own broker login and key.
Every wait is for a condition, never a fixed sleep.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from support.broker import MosquittoBroker
from support.plant import plant_logins
from textual.widgets import Static

from fieldtwin.hub.console.app import ConsoleApp
from fieldtwin.hub.console.modals import ApproveModal, HelpModal, ProposeModal, ReasonModal
from fieldtwin.hub.console.screens import (
    AlarmsScreen,
    ApprovalsScreen,
    EntityScreen,
    OverviewScreen,
)
from fieldtwin.hub.console.widgets import header_text
from fieldtwin.hub.demo import Plant, PlantOptions, demo_hints
from fieldtwin.hub.opclient import OperatorClient, OperatorProfile, call
from fieldtwin.protocol.cli import build_parser

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

SIZE = (120, 40)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plant(
    broker: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Plant]:
    state = tmp_path_factory.mktemp("plant")
    plant_logins(broker, state)
    plant = Plant(
        PlantOptions(
            state_dir=state,
            broker_url=broker.url,
            speed=2.0,
            hub_overrides={"drift": {"interval_s": 0.5}},
        )
    )
    try:
        await plant.start()
        yield plant
    finally:
        codes = await plant.stop()
        assert codes.get("hub") == 0, (plant.layout.logs / "hub.log").read_text()[-3000:]


def profile(plant: Plant, operator: str) -> OperatorProfile:
    return OperatorProfile.load(plant.layout.operator_profile(operator))


def console(plant: Plant, operator: str) -> ConsoleApp:
    chosen = profile(plant, operator)
    return ConsoleApp(lambda: OperatorClient(chosen))


async def until(pilot: Any, check: Callable[[], Any], within: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what or check}")
        await pilot.pause(0.1)


def synced(app: ConsoleApp, entities: int = 7) -> bool:
    model = app.model
    return (
        app.session.hub_up()
        and len(model.entities) >= entities
        and all(e.attrs for e in model.entities.values())
    )


def unacked_ids(app: ConsoleApp) -> set[str]:
    """The open alarms nobody acknowledged yet (active, or returned to normal)."""
    return {str(a["id"]) for a in app.model.alarms.values() if a["state"] in ("active", "returned")}


def header_unacked(app: ConsoleApp) -> int:
    """The unacked count the header shows at this console's width (0 when none)."""
    found = re.search(r"(\d+) ?unack", header_text(app, SIZE[0]).plain)
    return int(found.group(1)) if found else 0


async def test_filter_drill_into_an_entity_and_acknowledge_an_alarm(plant: Plant) -> None:
    app = console(plant, "alice")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: synced(app), 90, "every entity in the console")
        assert isinstance(app.screen, OverviewScreen)
        assert app.session.whoami["roles"] == ["operator"]
        # filter
        await pilot.press("slash", *"type:pump")
        table = app.screen.query_one("#entities")
        await until(pilot, lambda: table.row_count == 1, 10, "the filter to leave pump-1")
        assert app.screen._ids[table.keys[0]] == "pump-1"
        await pilot.press("enter", "enter")  # leave the filter box, open the row
        screen = await until(
            pilot,
            lambda: isinstance(app.screen, EntityScreen) and app.screen.ready and app.screen,
            10,
            "detail",
        )
        assert screen.entity_id == "pump-1"
        attrs = screen.query_one("#attrs")
        names = [str(key.value) for key in attrs.rows]
        assert {"speed", "speed_sp", "running", "motor_current"} <= set(names)
        # the history plot of the selected attribute arrives signed from the hub
        await until(pilot, lambda: screen._series is not None, 20, "the history plot")
        assert screen._series["attribute"] == screen.attribute
        await pilot.press("escape")
        assert isinstance(app.screen, OverviewScreen)

        # a fault in the simulator raises an alarm; the operator acknowledges it
        control = plant.endpoints["control"]
        assert control
        await plant.sim_call(
            "POST",
            "/faults",
            {"kind": "stuck", "point": "tank-1.level", "params": {"value": 4.9}},
        )
        try:

            def level_alarm() -> Any:
                for alarm in app.model.alarms.values():
                    if (alarm["entity"], alarm["attribute"], alarm["rule"]) == (
                        "tank-1",
                        "level",
                        "threshold",
                    ) and alarm["state"] == "active":
                        return alarm
                return None

            alarm = await until(pilot, level_alarm, 60, "the level alarm in the console")
            await pilot.press("2")
            assert isinstance(app.screen, AlarmsScreen)
            alarms = app.screen.query_one("#alarms")
            await until(pilot, lambda: alarm["id"] in [str(k.value) for k in alarms.rows])
            alarms.move_cursor(row=alarms.get_row_index(alarm["id"]))
            assert alarm["id"] in unacked_ids(app)
            await until(
                pilot,
                lambda: header_unacked(app) == len(unacked_ids(app)),
                10,
                "the header to count the unacknowledged alarms",
            )
            await pilot.press("a")
            await until(pilot, lambda: isinstance(app.screen, ReasonModal), 5, "ack modal")
            await pilot.press("enter")  # the reason is filled in; Enter confirms
            await until(
                pilot,
                lambda: app.model.alarms.get(alarm["id"], {}).get("state") == "acknowledged",
                20,
                "the acknowledgement to come back from the hub",
            )
            assert app.model.alarms[alarm["id"]]["acked_by"] == "alice"
            # the header counts what is still unacknowledged, without this alarm
            await until(
                pilot,
                lambda: header_unacked(app) == len(unacked_ids(app)),
                10,
                "the header's unacked count to follow the acknowledgement",
            )
            assert alarm["id"] not in unacked_ids(app)
        finally:
            await plant.sim_call("POST", "/faults/clear", {})


async def _propose(plant: Plant, value: int, reason: str) -> dict[str, Any]:
    """A proposal by alice through the console's propose modal (dry run first)."""
    app = console(plant, "alice")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: synced(app), 90, "the plant in alice's console")
        app.open_entity("pump-1")
        screen = await until(
            pilot, lambda: isinstance(app.screen, EntityScreen) and app.screen.ready and app.screen
        )
        attrs = screen.query_one("#attrs")
        await until(pilot, lambda: "speed_sp" in [str(k.value) for k in attrs.rows])
        attrs.move_cursor(row=attrs.get_row_index("speed_sp"))
        await until(pilot, lambda: screen.attribute == "speed_sp")
        before = set(app.model.commands)
        await pilot.press("c")
        modal = await until(pilot, lambda: isinstance(app.screen, ProposeModal) and app.screen)
        assert modal.current is not None  # current value and limits are shown
        await pilot.press(*str(value))
        await until(
            pilot,
            lambda: modal.verdict is not None and modal.checked_value == value,
            20,
            "the dry-run verdict",
        )
        assert modal.verdict["allowed"], modal.verdict
        await pilot.press("tab", *reason, "enter")
        command = await until(
            pilot,
            lambda: next((c for i, c in app.model.commands.items() if i not in before), None),
            20,
            "the proposal in the console",
        )
        assert command["state"] == "awaiting_approval"
        assert command["proposed_by"] == "alice"
        return dict(command)


async def test_a_viewer_is_not_offered_approve(plant: Plant) -> None:
    answer = await call(
        profile(plant, "alice"),
        "cmd.propose",
        {"target": "pump-1.speed_sp", "value": 950, "reason": "for the viewer to see"},
    )
    try:
        app = console(plant, "vic")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: synced(app), 90, "the plant in vic's console")
            await pilot.press("3")
            assert isinstance(app.screen, ApprovalsScreen)
            table = app.screen.query_one("#approvals")
            await until(pilot, lambda: answer["id"] in [str(k.value) for k in table.rows])
            table.move_cursor(row=table.get_row_index(answer["id"]))
            await pilot.pause()
            offered = {b.binding.action for b in app.screen.active_bindings.values()}
            assert "approve" not in offered
            assert "reject" not in offered
            await pilot.press("a")
            await pilot.pause(0.3)
            assert not isinstance(app.screen, ApproveModal)
            assert app.session.whoami["roles"] == ["viewer"]
    finally:
        await call(
            profile(plant, "alice"), "cmd.cancel", {"cmd_id": answer["id"], "reason": "done"}
        )


async def test_propose_then_approve_and_the_device_follows(plant: Plant) -> None:
    truth = await plant.truth()
    start = int(truth["pump-1.speed_sp"]["true"])
    target = start + 100 if start <= 1600 else start - 100
    command = await _propose(plant, target, "evening demand")
    app = console(plant, "bob")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: synced(app), 90, "the plant in bob's console")
        await pilot.press("3")
        table = app.screen.query_one("#approvals")
        await until(pilot, lambda: command["id"] in [str(k.value) for k in table.rows])
        table.move_cursor(row=table.get_row_index(command["id"]))
        await pilot.pause()
        await pilot.press("a")
        modal = await until(pilot, lambda: isinstance(app.screen, ApproveModal) and app.screen)
        assert modal.command["id"] == command["id"]
        assert modal.command["value"] == target
        # the approver sees what the learned models expect the change to do (or why not)
        assert "prediction" in modal.command or "prediction_unavailable" in modal.command
        # dangerous: focus starts on Cancel
        await until(pilot, lambda: app.focused is not None and app.focused.id == "cancel", 5)
        await pilot.click("#approve")
        await until(
            pilot,
            lambda: app.model.commands.get(command["id"], {}).get("state") == "verified",
            60,
            "the command to be verified",
        )

    async def follows() -> bool:
        point = (await plant.truth())["pump-1.speed_sp"]
        return abs(float(point["true"]) - target) < 1

    deadline = time.monotonic() + 30
    while not await follows():
        assert time.monotonic() < deadline, "the simulated pump did not take the setpoint"
        await asyncio.sleep(0.5)


async def test_the_demo_hints_inject_a_fault_into_this_plant_and_the_help_shows_them(
    plant: Plant,
) -> None:
    """The lines the interactive demo prints parse with the real ``fieldtwin`` parser,
    name this simulator's control address, and inject and clear a fault in it."""
    hints = demo_hints(plant)
    control = plant.endpoints["control"]
    assert control
    assert f"simulator control address: {control}" in hints

    def command(words: str) -> argparse.Namespace:
        line = next(hint.strip() for hint in hints if words in hint)
        argv = shlex.split(line)
        assert argv[0] == "fieldtwin"
        args = build_parser().parse_args(argv[1:])
        assert args.control == control
        return args

    inject, clear = command("fieldtwin sim fault inject"), command("fieldtwin sim fault clear")
    try:
        assert await asyncio.to_thread(inject.func, inject) == 0
        faults = (await plant.sim_call("GET", "/faults"))["faults"]
        open_faults = [(f["kind"], f["point"]) for f in faults if f["end_tick"] is None]
        assert open_faults == [(inject.kind, inject.point)]
    finally:
        assert await asyncio.to_thread(clear.func, clear) == 0
    faults = (await plant.sim_call("GET", "/faults"))["faults"]
    assert all(f["end_tick"] is not None for f in faults)  # cleared: it has an end

    # the console's help (?) shows the same lines
    app = ConsoleApp(lambda: OperatorClient(profile(plant, "alice")), hints=hints)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        modal = await until(pilot, lambda: isinstance(app.screen, HelpModal) and app.screen, 10)
        shown = "\n".join(str(static.content) for static in modal.query(Static))
        for hint in hints:
            assert hint in shown


async def test_the_console_says_when_the_hub_is_gone_and_recovers(plant: Plant) -> None:
    app = console(plant, "alice")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: synced(app), 90, "the plant in the console")
        first = app.model.instance
        assert plant.hub is not None
        await plant.hub.stop()
        await until(
            pilot,
            lambda: "hub unreachable since" in header_text(app).plain,
            30,
            "the header to say the hub is unreachable",
        )
        plant.hub.stopping = False
        await plant.hub.start()
        await plant.wait_for_hub()
        await until(
            pilot,
            lambda: app.session.hub_up() and app.model.instance != first,
            60,
            "the console to follow the restarted hub",
        )
        assert "hub online" in header_text(app).plain
        await until(pilot, lambda: synced(app), 60, "values again")
