"""The console application: screens as modes, the live model, the session to the hub.

Keys: ``1`` to ``5`` switch screens (plant, alarms, approvals, commands, audit), ``/``
filters, ``?`` lists the keys that work where you are, Ctrl+P opens the command
palette, ``p`` pauses the display (the model keeps following the hub, so nothing is
lost; resuming shows the latest state at once), ``q`` quits.

Rendering: deltas update the model as they arrive; every ``FLUSH_S`` the screen that
shows takes what changed and updates only those cells (of visible rows); screens that
do not show keep the list and catch up when they show again.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import Any, ClassVar

from textual.app import App
from textual.binding import Binding, BindingType
from textual.command import Hit, Hits, Provider
from textual.css.query import NoMatches

from fieldtwin.hub.console.modals import HelpModal
from fieldtwin.hub.console.model import LiveModel, local_ms
from fieldtwin.hub.console.screens import (
    AlarmsScreen,
    ApprovalsScreen,
    AuditScreen,
    CommandsScreen,
    EntityScreen,
    LiveScreen,
    OverviewScreen,
)
from fieldtwin.hub.console.session import Session, Transport
from fieldtwin.hub.console.widgets import ConsoleHeader

FLUSH_S = 0.25
"""How often the showing screen takes the changes (updates are coalesced in between)."""
TICK_S = 1.0
"""How often ages and other clocks are redrawn (and the header's link state checked)."""
MODE_NAMES = {
    "overview": "Plant overview",
    "alarms": "Alarms",
    "approvals": "Approvals",
    "commands": "Commands",
    "audit": "Audit",
}


class ConsoleCommands(Provider):
    """Ctrl+P: screens, pause, filter, and every entity by name."""

    async def search(self, query: str) -> Hits:
        app = self.app
        assert isinstance(app, ConsoleApp)
        matcher = self.matcher(query)
        actions: list[tuple[str, Callable[[], Any], str]] = [
            (f"Go to {title}", partial(app.switch_mode, mode), f"screen {i + 1}")
            for i, (mode, title) in enumerate(MODE_NAMES.items())
        ]
        actions.append(
            ("Pause updates" if not app.paused else "Resume updates", app.action_toggle_pause, "p")
        )
        actions.append(("Filter entities", app.action_filter, "/"))
        for entity in sorted(app.model.entities.values(), key=lambda e: e.id):
            actions.append(
                (
                    f"Open entity {entity.id}",
                    partial(app.open_entity, entity.id),
                    f"{entity.type} {entity.name}".strip(),
                )
            )
        for text, callback, help_text in actions:
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), callback, help=help_text)

    async def discover(self) -> AsyncIterator[Hit]:
        app = self.app
        assert isinstance(app, ConsoleApp)
        for i, (mode, title) in enumerate(MODE_NAMES.items()):
            yield Hit(1.0, f"Go to {title}", partial(app.switch_mode, mode), help=str(i + 1))


class ConsoleApp(App[None]):
    """The operator console (``fieldtwin console``, and ``fieldtwin demo``)."""

    CSS_PATH = "console.tcss"
    TITLE = "fieldtwin console"
    MODES: ClassVar[dict[str, Any]] = {
        "overview": OverviewScreen,
        "alarms": AlarmsScreen,
        "approvals": ApprovalsScreen,
        "commands": CommandsScreen,
        "audit": AuditScreen,
    }
    DEFAULT_MODE = "overview"
    COMMANDS = App.COMMANDS | {ConsoleCommands}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("1", "switch_mode('overview')", "Plant overview", show=False),
        Binding("2", "switch_mode('alarms')", "Alarms", show=False),
        Binding("3", "switch_mode('approvals')", "Approvals (pending commands)", show=False),
        Binding("4", "switch_mode('commands')", "Commands and their timelines", show=False),
        Binding("5", "switch_mode('audit')", "Audit log", show=False),
        Binding("p", "toggle_pause", "Pause"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        connect: Callable[[], Transport],
        *,
        clock: Callable[[], int] = local_ms,
        hints: Sequence[str] = (),
        flush_s: float = FLUSH_S,
        tick_s: float = TICK_S,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.model = LiveModel()
        self.session = Session(connect, self.model, clock=clock, on_change=self._link_changed)
        self.hints = list(hints)
        self.flush_s = flush_s
        self.tick_s = tick_s
        self.paused = False
        self.live_screens: set[LiveScreen] = set()
        self.lags: deque[int] = deque(maxlen=200_000)
        """Milliseconds from a delta's hub stamp to the flush that showed it."""
        self.flushes = 0
        self._link_key: tuple[Any, ...] = ()

    def on_mount(self) -> None:
        self.run_worker(self.session.run(), name="hub-session", exclusive=True)
        self.set_interval(self.flush_s, self.flush)
        self.set_interval(self.tick_s, self.tick)

    # -- the loop between model and screens -------------------------------------------------

    def flush(self) -> None:
        if self.paused:
            return
        entities, parts, stamps = self.model.take_dirty()
        if not (entities or parts):
            return
        for screen in list(self.live_screens):
            with contextlib.suppress(NoMatches):  # a screen being torn down
                screen.take_changes(entities, parts)
        self.flushes += 1
        if stamps:
            now = self.clock()
            self.lags.extend(now - stamp for stamp in stamps)
        if parts & {"alarms", "commands", "hub"}:
            self.refresh_header()

    def tick(self) -> None:
        self.refresh_header()
        if self.paused:
            return
        screen = self.screen
        if isinstance(screen, LiveScreen) and screen.ready:
            with contextlib.suppress(NoMatches):
                screen.tick()

    def refresh_header(self) -> None:
        for header in self.screen.query(ConsoleHeader):
            header.update_from(self)

    def _link_changed(self) -> None:
        key = (self.session.hub_up(), tuple(self.session.whoami.get("operations", ())))
        if key != self._link_key:
            self._link_key = key
            if isinstance(self.screen, LiveScreen):
                self.screen.refresh_bindings()
        self.refresh_header()

    # -- actions ----------------------------------------------------------------------------

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused:
            self.flush()
        self.refresh_header()
        self.notify("updates paused (p resumes)" if self.paused else "updates resumed", timeout=2)

    def action_help(self) -> None:
        """Help from the live bindings: this screen's actions (those the role allows),
        the keys that work everywhere, the plant's hints, then how to move."""
        screen = self.screen
        here: list[tuple[str, str]] = []
        everywhere: list[tuple[str, str]] = []
        moving: list[str] = []
        seen: set[str] = set()
        ours = {b.action for b in getattr(type(screen), "BINDINGS", []) if isinstance(b, Binding)}
        mine = {b.action for b in self.BINDINGS if isinstance(b, Binding)}
        for active in screen.active_bindings.values():
            binding = active.binding
            if not active.enabled or not binding.description or binding.action in seen:
                continue
            seen.add(binding.action)
            key = binding.key_display or self.get_key_display(binding)
            if active.node is self and binding.action in mine:
                everywhere.append((key, binding.description))
            elif active.node is screen and binding.action in ours:
                here.append((key, binding.description))
            elif active.node is not self and active.node is not screen:
                moving.append(key)
        everywhere.append(("ctrl+p", "command palette: screens, actions, open an entity"))
        sections = [
            (f"This screen ({type(screen).__name__.removesuffix('Screen')})", here),
            ("Everywhere", everywhere),
        ]
        if moving:
            sections.append(("Moving", [(" ".join(moving[:8]), "move around the table")]))
        self.push_screen(HelpModal(sections, self.hints))

    def action_filter(self) -> None:
        self.switch_mode("overview")
        screen = self.screen
        if isinstance(screen, OverviewScreen):
            screen.action_filter()

    def open_entity(self, entity_id: str) -> None:
        if self.current_mode != "overview":
            self.switch_mode("overview")
        if isinstance(self.screen, EntityScreen):
            self.pop_screen()
        self.push_screen(EntityScreen(entity_id))


def run_console(connect: Callable[[], Transport], hints: Sequence[str] = ()) -> None:
    """Run the console in this terminal until the operator quits."""
    ConsoleApp(connect, hints=hints).run()
