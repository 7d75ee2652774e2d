"""The console's screens: plant overview, entity detail, alarms, approvals, commands, audit.

Each screen reads the live model (model.py) and is told what changed a few times a
second (``apply_changes``); a screen that is not showing keeps the changes and applies
them when it shows again. Actions the operator's role does not allow are hidden
(``check_action``): the hub would refuse them anyway, and audits the refusal.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static
from textual_plotext import PlotextPlot

from fieldtwin.hub.console import fmt
from fieldtwin.hub.console.modals import ApproveModal, ProposeModal, ReasonModal, policy_text
from fieldtwin.hub.console.model import (
    AWAITING,
    SORTS,
    Entity,
    matches,
    sort_alarms,
    sort_key,
)
from fieldtwin.hub.console.widgets import ConsoleHeader, LiveTable, VirtualTable
from fieldtwin.hub.opclient import OperatorError
from fieldtwin.hub.render import cell

if TYPE_CHECKING:
    from fieldtwin.hub.console.app import ConsoleApp

TABS = (
    ("overview", "Plant"),
    ("alarms", "Alarms"),
    ("approvals", "Approve"),
    ("commands", "Cmds"),
    ("audit", "Audit"),
)
ACTION_OPS = {
    "ack": "alarm.ack",
    "shelve": "alarm.shelve",
    "unshelve": "alarm.unshelve",
    "approve": "cmd.approve",
    "reject": "cmd.reject",
    "propose": "cmd.propose",
    "cancel_command": "cmd.cancel",
    "verify": "audit.verify",
}


class LiveScreen(Screen[None]):
    """A screen fed by the live model, with the console header and the footer."""

    @property
    def console(self) -> ConsoleApp:
        return self.app  # type: ignore[return-value]

    def header(self) -> ComposeResult:
        yield ConsoleHeader()

    def title_bar(self, text: str = "") -> Static:
        return Static(text, classes="title-bar", id="title-bar")

    def set_title_bar(self, text: str | Text) -> None:
        """The screen tabs (the current one highlighted), then what the screen says."""
        bar = Text(no_wrap=True, overflow="ellipsis")
        current = self.console.current_mode
        for number, (mode, label) in enumerate(TABS, start=1):
            style = "bold reverse" if mode == current else "dim"
            bar.append(f" {number} {label} ", style=style)
        bar.append(" ")
        bar.append_text(Text(text) if isinstance(text, str) else text)
        self.query_one("#title-bar", Static).update(bar)

    ready = False
    """Composed and mounted: the app feeds only ready screens."""

    def on_mount(self) -> None:
        self._held_entities: set[str] = set()
        self._held_parts: set[str] = set()
        self.console.live_screens.add(self)
        self.call_after_refresh(setattr, self, "ready", True)

    def on_unmount(self) -> None:
        self.ready = False
        self.console.live_screens.discard(self)

    def on_screen_resume(self) -> None:
        if not self.ready:
            return
        entities, parts = self._held_entities, self._held_parts
        self._held_entities, self._held_parts = set(), set()
        self.refresh_view(entities, parts | {"resume"})
        self.refresh_bindings()

    def take_changes(self, entities: set[str], parts: set[str]) -> None:
        if self.ready and self.is_current:
            if self._held_entities or self._held_parts:
                entities = entities | self._held_entities
                parts = parts | self._held_parts
                self._held_entities, self._held_parts = set(), set()
            self.refresh_view(entities, parts)
        else:
            self._held_entities |= entities
            self._held_parts |= parts

    def refresh_view(self, entities: set[str], parts: set[str]) -> None:
        """Show what changed (``parts`` holds ``resume`` after the screen was away)."""

    def tick(self) -> None:
        """Once a second: ages and other clocks."""

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        op = ACTION_OPS.get(action)
        return not (op is not None and not self.console.session.allowed(op))

    def now(self) -> int:
        return self.console.model.hub_now(self.console.clock())

    @staticmethod
    def then(action: Callable[..., Any], *args: Any) -> Callable[[Any], None]:
        """A modal's callback: ``action(*args, result)`` (a worker) when it closes."""

        def done(result: Any) -> None:
            action(*args, result)

        return done

    async def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        """A request to the hub; a refusal becomes a notification, not an exception."""
        try:
            return await self.console.session.request(op, args)
        except OperatorError as exc:
            self.notify(f"{op}: {exc}", title=f"hub refused ({exc.code})", severity="error")
            return None


# -- plant overview ------------------------------------------------------------------------

OVERVIEW_COLUMNS = (
    ("health", "health", 10),
    ("entity", "entity", 13),
    ("reading", "reading", 22),
    ("quality", "qualty", 6),
    ("age", "age", 4),
    ("link", "link", 8),
    ("alarms", "⚑", 1),
    ("type", "type", 14),
    ("gateway", "gateway", 10),
    ("name", "name", 24),
)


class OverviewScreen(LiveScreen):
    """One row per entity (keyed by twin id), drawn from the model when on screen."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("s", "sort", "Sort"),
        Binding("enter", "open", "Open", key_display="⏎", priority=True),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.filter = ""
        self.sort = SORTS[0]
        self._ids: dict[str, str] = {}
        """twin id (row key) → entity id, for the rows shown"""

    def compose(self) -> ComposeResult:
        yield from self.header()
        yield self.title_bar()
        yield Input(
            placeholder="filter: words · type:pump · health:stale · gw:gw-pumps   (Esc clears)",
            id="filter",
            classes="hidden",
        )
        yield VirtualTable(OVERVIEW_COLUMNS, self._row_cells, id="entities")
        yield Footer()

    @property
    def table(self) -> VirtualTable:
        return self.query_one("#entities", VirtualTable)

    def on_mount(self) -> None:
        super().on_mount()
        self.rebuild()
        self.table.focus()

    def refresh_view(self, entities: set[str], parts: set[str]) -> None:
        if "entities" in parts or self._needs_rebuild(entities):
            self.rebuild()
            return
        if "resume" in parts:
            self.table.refresh()  # back on show: whatever changed meanwhile
        else:
            # values, health, links, alarms: only the rows of the entities that changed
            # (those on screen) are drawn again from the model
            model = self.console.model
            self.table.refresh_keys(
                model.entities[entity_id].twin_id
                for entity_id in entities
                if entity_id in model.entities
            )
        self._update_title()

    def _needs_rebuild(self, entities: set[str]) -> bool:
        """A change moved an entity in or out of the filter (e.g. ``health:stale``)."""
        model = self.console.model
        if not self.filter:
            return len(self._ids) != len(model.entities)
        for entity_id in entities:
            entity = model.entities.get(entity_id)
            if entity is None:
                return True
            if (entity.twin_id in self._ids) != matches(entity, self.filter):
                return True
        return False

    def _row_cells(self, key: str) -> tuple[Any, ...]:
        entity = self.console.model.entities.get(self._ids.get(key, ""))
        if entity is None:
            return (Text("gone", style="dim"),)
        return self.cells(entity, self.now())

    def cells(self, entity: Entity, now: int) -> tuple[Any, ...]:
        model = self.console.model
        primary = model.primary(entity)
        attr = entity.attrs.get(primary) if primary else None
        if attr is not None and primary is not None:
            reading = f"{primary} {fmt.value(attr.value, model.unit(entity, primary))}"
            quality = fmt.quality(attr.quality)
            age = fmt.age(attr.ts_ms, now)
        else:
            reading, quality, age = "-", Text("-", style="dim"), "-"
        alarms = model.alarms_on(entity.id)
        return (
            fmt.health(entity.health),
            entity.id,
            reading,
            quality,
            age,
            fmt.link_state(model.link(entity.gateway), entity.gateway),
            Text(str(alarms), style="bold red") if alarms else "",
            entity.type,
            entity.gateway,
            entity.name,
        )

    def rebuild(self) -> None:
        model = self.console.model
        shown = [e for e in model.entities.values() if matches(e, self.filter)]
        shown.sort(key=sort_key(self.sort, model, self.now()))
        self._ids = {e.twin_id: e.id for e in shown}
        self.table.set_rows([e.twin_id for e in shown])
        self._update_title()

    def tick(self) -> None:
        self.table.refresh()  # ages tick on the rows on screen

    def _update_title(self) -> None:
        model = self.console.model
        count = len(self._ids)
        total = len(model.entities)
        health: dict[str, int] = {}
        for entity in model.entities.values():
            health[entity.health] = health.get(entity.health, 0) + 1
        text = Text()
        text.append(f" {count} of {total} entities" if self.filter else f" {total} entities")
        for word in ("stale", "degraded", "unknown"):
            if health.get(word):
                text.append("  ")
                text.append_text(fmt.health(word))
                text.append(f" {health[word]}")
        if self.filter:
            text.append(f"  filter: {self.filter}", style="bold cyan")
        text.append(f"  sort: {self.sort}", style="dim")
        self.set_title_bar(text)

    # actions

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.remove_class("hidden")
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.add_class("hidden")
        self.filter = ""
        self.rebuild()
        self.table.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter = event.value.strip()
        self.rebuild()

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        if not self.filter:
            self.query_one("#filter", Input).add_class("hidden")
        self.table.focus()

    def on_key(self, event: Any) -> None:
        if event.key == "escape" and self.query_one("#filter", Input).has_focus:
            self.action_clear_filter()
            event.stop()

    def action_sort(self) -> None:
        self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        self.rebuild()  # the selected row stays selected
        self.notify(f"sorted by {self.sort}", timeout=1.5)

    def action_open(self) -> None:
        if self.query_one("#filter", Input).has_focus:
            self._filter_done()
            return
        key = self.table.selected_key()
        if key is not None and key in self._ids:
            self.console.open_entity(self._ids[key])


# -- entity detail -----------------------------------------------------------------------

RANGES = (("15m", 15 * 60_000), ("1h", 3600_000), ("24h", 24 * 3600_000))


class EntityScreen(LiveScreen):
    """Static attributes, relationships, every attribute, a history plot, the alarms."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("c", "propose", "Propose change"),
        Binding("t", "range", "Plot range"),
    ]

    def __init__(self, entity_id: str) -> None:
        super().__init__()
        self.entity_id = entity_id
        self.range_index = 0
        self.attribute: str | None = None
        self._plot_key: tuple[Any, ...] = ()
        self._series: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield from self.header()
        yield self.title_bar()
        yield Static(id="info")
        table = LiveTable(id="attrs", cursor_type="row")
        for key, label, width in (
            ("attribute", "attribute", 16),
            ("value", "value", 14),
            ("quality", "quality", 7),
            ("age", "age", 4),
            ("thresholds", "thresholds", 19),
            ("source", "source", 20),
            ("updated", "updated", 9),
            ("w", "✎", 1),
        ):
            table.add_column(label, key=key, width=width)
        yield table
        yield PlotextPlot(id="plot")
        yield Static(id="entity-alarms")
        yield Footer()

    @property
    def entity(self) -> Entity | None:
        return self.console.model.entities.get(self.entity_id)

    def on_mount(self) -> None:
        super().on_mount()
        self.refresh_view({self.entity_id}, {"resume"})
        self.query_one("#attrs", LiveTable).focus()
        self.set_interval(10, self._reload_plot)

    def refresh_view(self, entities: set[str], parts: set[str]) -> None:
        if self.entity_id in entities or parts & {"resume", "alarms", "links", "entities"}:
            self._show()

    def tick(self) -> None:
        self._show()

    def _show(self) -> None:
        model = self.console.model
        entity = self.entity
        if entity is None:
            self.set_title_bar(Text(f" {self.entity_id} is not in the twin (any more)", "bold"))
            return
        now = self.now()
        title = Text()
        title.append(f" {entity.id}", style="bold")
        title.append(f"  {entity.twin_id}  {entity.type}")
        if entity.name:
            title.append(f"  “{entity.name}”")
        title.append("  ")
        title.append_text(fmt.health(entity.health))
        self.set_title_bar(title)
        info = Text()
        link_row = model.link(entity.gateway)
        info.append(f"gateway {entity.gateway or '-'} ")
        info.append_text(fmt.link_state(link_row, entity.gateway))
        if link_row is not None and link_row.get("last_frame_ms"):
            info.append(f", last frame {fmt.age(link_row['last_frame_ms'], now)} ago")
        if link_row is not None and link_row.get("death_reason") and not link_row["online"]:
            info.append(f" ({link_row['death_reason']})")
        if not entity.declared:
            info.append("  undeclared (reported, not in the schema)", style="yellow")
        static = "  ".join(f"{k}={cell(v)}" for k, v in sorted(entity.static.items()))
        info.append(f"\nstatic  {static or '-'}")
        relations = [
            f"→ {r['type']} {r['target']}" for r in model.relationships if r["source"] == entity.id
        ] + [
            f"← {r['source']} {r['type']}" for r in model.relationships if r["target"] == entity.id
        ]
        info.append(f"\nrelated {'  '.join(relations) or '-'}")
        self.query_one("#info", Static).update(info)
        table = self.query_one("#attrs", LiveTable)
        names = model.attribute_names(entity)
        selected = table.selected_key()
        rows = []
        for name in names:
            attr = entity.attrs.get(name)
            spec = model.spec(entity, name)
            point = model.points.get((entity.id, name)) or {}
            unit = model.unit(entity, name)
            writable = bool(spec.writable if spec else point.get("writable"))
            rows.append(
                (
                    name,
                    (fmt.value(attr.value, unit) if attr else Text("never reported", style="dim")),
                    fmt.quality(attr.quality) if attr else "-",
                    fmt.age(attr.ts_ms, now) if attr else "-",
                    fmt.thresholds(spec),
                    str(point.get("source") or point.get("gateway") or "-"),
                    fmt.clock(attr.ts_ms) if attr else "-",
                    "✎" if writable else "",
                )
            )
        if [r[0] for r in rows] != [str(k.value) for k in table.rows]:
            table.clear()
            for row in rows:
                table.add_row(*row, key=row[0])
            table.select_key(selected or self.attribute)
        else:
            keys = ("attribute", "value", "quality", "age", "thresholds", "source", "updated", "w")
            for row in rows:
                for column, value in zip(keys[1:], row[1:], strict=True):
                    if table.get_cell(row[0], column) != value:
                        table.update_cell(row[0], column, value)
        alarms = model.entity_alarms(entity.id)
        text = Text()
        if alarms:
            for alarm in alarms[:3]:
                text.append_text(fmt.severity(alarm["severity"]))
                text.append(" ")
                text.append_text(fmt.alarm_state(alarm["state"]))
                text.append(f" {alarm['id']} {alarm['description']}\n")
            if len(alarms) > 3:
                text.append(f"… {len(alarms) - 3} more (2: alarms)")
        else:
            text.append("no open alarms on this entity", style="dim")
        self.query_one("#entity-alarms", Static).update(text)
        if self.attribute is None and rows:
            self.attribute = table.selected_key() or rows[0][0]
            self._reload_plot()

    @on(DataTable.RowHighlighted, "#attrs")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value
        if key is not None and key != self.attribute:
            self.attribute = str(key)
            self._reload_plot()
        self.refresh_bindings()

    def _reload_plot(self) -> None:
        if self.attribute is not None:
            self.load_history(self.attribute, RANGES[self.range_index])

    @work(exclusive=True, group="history")
    async def load_history(self, attribute: str, span: tuple[str, int]) -> None:
        now = self.now()
        series = await self.call(
            "view.history",
            {
                "entity": self.entity_id,
                "attribute": attribute,
                "from": str(now - span[1]),
                "to": str(now),
                "buckets": 120,
            },
        )
        if series is None:
            return
        self._series = series
        with contextlib.suppress(NoMatches):  # the screen closed meanwhile
            self._draw(attribute, span, series, now)

    def _draw(
        self, attribute: str, span: tuple[str, int], series: Mapping[str, Any], now: int
    ) -> None:
        plot = self.query_one("#plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        entity = self.entity
        unit = self.console.model.unit(entity, attribute) if entity else ""
        hours = span[1] >= 3 * 3600_000
        scale = 3600_000 if hours else 60_000
        label = "hours ago" if hours else "minutes ago"
        xs = [(t - now) / scale for t in series["ts_ms"]]
        title = f"{self.entity_id}.{attribute} ({unit or 'no unit'}) — last {span[0]}"
        if xs:
            plt.plot(xs, series["mean"], marker="braille", label="mean")
            if any(lo != hi for lo, hi in zip(series["min"], series["max"], strict=True)):
                plt.plot(xs, series["min"], marker="dot", color="gray")
                plt.plot(xs, series["max"], marker="dot", color="gray")
            spec = self.console.model.spec(entity, attribute) if entity else None
            if spec is not None:
                for limit, color in (
                    (spec.high_critical, "red"),
                    (spec.high_warning, "orange"),
                    (spec.low_warning, "orange"),
                    (spec.low_critical, "red"),
                ):
                    lo, hi = min(series["min"]), max(series["max"])
                    margin = max(1e-9, (hi - lo) * 0.5)
                    if limit is not None and lo - margin <= limit <= hi + margin:
                        plt.hline(limit, color)
            plt.xlim(-span[1] / scale, 0)
            title += f", {series['samples']} samples"
        else:
            title += ": no numeric samples"
        plt.title(title)
        plt.xlabel(label)
        plot.refresh()

    def action_range(self) -> None:
        self.range_index = (self.range_index + 1) % len(RANGES)
        self.notify(f"plot: last {RANGES[self.range_index][0]}", timeout=1.5)
        self._reload_plot()

    def action_back(self) -> None:
        self.app.pop_screen()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        allowed = super().check_action(action, parameters)
        if action == "propose" and allowed:
            entity = self.entity
            if entity is None or self.attribute is None:
                return None
            spec = self.console.model.spec(entity, self.attribute)
            point = self.console.model.points.get((entity.id, self.attribute)) or {}
            if not (spec.writable if spec else point.get("writable")):
                return None
        return allowed

    def action_propose(self) -> None:
        entity = self.entity
        attribute = self.attribute
        if entity is None or attribute is None:
            return
        model = self.console.model

        async def dry_run(entity_id: str, name: str, value: Any) -> Any:
            return await self.console.session.request(
                "cmd.dry_run", {"target": f"{entity_id}.{name}", "value": value}
            )

        modal = ProposeModal(
            entity.id,
            attribute,
            model.spec(entity, attribute),
            entity.attrs.get(attribute),
            model.unit(entity, attribute),
            dry_run,
        )
        self.app.push_screen(modal, self.then(self._proposed))

    @work
    async def _proposed(self, result: Any) -> None:
        if not result or self.attribute is None:
            return
        answer = await self.call(
            "cmd.propose",
            {
                "target": f"{self.entity_id}.{self.attribute}",
                "value": result["value"],
                "reason": result["reason"],
            },
        )
        if answer is not None:
            self.notify(
                f"{answer['id']}: {answer['entity']}.{answer['attribute']} := "
                f"{cell(answer['value'])} is {answer.get('state_label') or answer['state']}",
                title="proposed",
            )


# -- alarms --------------------------------------------------------------------------------

ALARM_COLUMNS = (
    ("severity", "severity", 10),
    ("state", "state", 9),
    ("subject", "subject", 20),
    ("raised", "raised", 9),
    ("acked", "acked", 16),
    ("shelved", "shelved until", 13),
    ("id", "id", 8),
    ("description", "description", 60),
)


class AlarmsScreen(LiveScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "ack", "Ack"),
        Binding("s", "shelve", "Shelve"),
        Binding("u", "unshelve", "Unshelve"),
        Binding("enter", "open", "Entity"),
    ]

    def compose(self) -> ComposeResult:
        yield from self.header()
        yield self.title_bar()
        table = LiveTable(id="alarms", cursor_type="row")
        for key, label, width in ALARM_COLUMNS:
            table.add_column(label, key=key, width=width)
        yield table
        yield Static(id="alarm-detail", classes="detail")
        yield Footer()

    def on_mount(self) -> None:
        super().on_mount()
        self.refresh_view(set(), {"alarms"})
        self.query_one("#alarms", LiveTable).focus()

    def selected(self) -> dict[str, Any] | None:
        key = self.query_one("#alarms", LiveTable).selected_key()
        return self.console.model.alarms.get(key) if key else None

    def refresh_view(self, entities: set[str], parts: set[str]) -> None:
        if not parts & {"alarms", "resume"}:
            return
        model = self.console.model
        table = self.query_one("#alarms", LiveTable)
        selected = table.selected_key()
        table.clear()
        for alarm in sort_alarms(model.alarms.values()):
            subject = alarm["entity"] + (f".{alarm['attribute']}" if alarm["attribute"] else "")
            acked = (
                f"{fmt.clock(alarm['acked_ms'])} {alarm.get('acked_by') or ''}".strip()
                if alarm.get("acked_ms")
                else "-"
            )
            state = "RETURNED" if alarm["state"] == "returned" else None
            table.add_row(
                fmt.severity(alarm["severity"]),
                Text(state, style="bold") if state else fmt.alarm_state(alarm["state"]),
                subject,
                fmt.clock(alarm["raised_ms"]),
                acked,
                fmt.clock(alarm.get("shelved_until_ms")) if alarm["state"] == "shelved" else "-",
                alarm["id"],
                alarm["description"],
                key=alarm["id"],
            )
        table.select_key(selected)
        counts = model.alarm_counts()
        title = Text()
        title.append(
            f" {counts['total']} open: {counts['critical']} critical, {counts['warning']} "
            f"warning; {counts['unacked']} unacknowledged, {counts['shelved']} shelved"
        )
        flood = model.flood(self.console.clock())
        if flood:
            title.append(f"  ⚠ ALARM FLOOD: {flood} raised in 10 min", style="bold white on red")
        self.set_title_bar(title)
        self._detail()
        self.refresh_bindings()

    def _detail(self) -> None:
        alarm = self.selected()
        text = Text()
        if alarm is not None:
            text.append(f"{alarm['id']} ", style="bold")
            text.append_text(fmt.severity(alarm["severity"]))
            text.append(f"  {alarm['rule']} ({alarm['strategy']})  value {alarm['value'] or '-'}\n")
            text.append(f"{alarm['description']}\n")
            text.append(f"raised {fmt.stamp(alarm['raised_ms'])}")
            if alarm["state"] == "returned":
                text.append("  returned to normal, NOT acknowledged", style="bold yellow")
            if alarm.get("acked_ms"):
                text.append(f"  acked {fmt.clock(alarm['acked_ms'])} by {alarm.get('acked_by')}")
            if alarm["state"] == "shelved":
                text.append(
                    f"  shelved by {alarm.get('shelved_by')} until "
                    f"{fmt.stamp(alarm.get('shelved_until_ms'))}: {alarm.get('shelve_reason')}"
                )
        else:
            text.append("no open alarms", style="dim")
        self.query_one("#alarm-detail", Static).update(text)

    @on(DataTable.RowHighlighted, "#alarms")
    def _highlighted(self) -> None:
        self._detail()
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        allowed = super().check_action(action, parameters)
        if not allowed or action not in ("ack", "shelve", "unshelve", "open"):
            return allowed
        alarm = self.selected()
        if alarm is None:
            return None
        state = alarm["state"]
        if action == "ack" and state not in ("active", "returned"):
            return None
        if action == "shelve" and state == "shelved":
            return None
        if action == "unshelve" and state != "shelved":
            return None
        return True

    def _subject(self, alarm: Mapping[str, Any]) -> Text:
        text = Text()
        text.append_text(fmt.severity(alarm["severity"]))
        text.append(f" {alarm['id']} {alarm['entity']}")
        if alarm["attribute"]:
            text.append(f".{alarm['attribute']}")
        text.append(f"\n{alarm['description']}\nraised {fmt.stamp(alarm['raised_ms'])}\n")
        return text

    def action_ack(self) -> None:
        alarm = self.selected()
        if alarm is None:
            return
        modal = ReasonModal(
            f"Acknowledge {alarm['id']}?",
            self._subject(alarm),
            "Acknowledge",
            reason="seen at the console",
            focus_cancel=False,
            variant="primary",
        )
        self.app.push_screen(modal, self.then(self._alarm_op, "alarm.ack", alarm))

    def action_shelve(self) -> None:
        alarm = self.selected()
        if alarm is None:
            return
        modal = ReasonModal(f"Shelve {alarm['id']}?", self._subject(alarm), "Shelve", duration="1h")
        self.app.push_screen(modal, self.then(self._alarm_op, "alarm.shelve", alarm))

    def action_unshelve(self) -> None:
        alarm = self.selected()
        if alarm is None:
            return
        modal = ReasonModal(f"Unshelve {alarm['id']}?", self._subject(alarm), "Unshelve")
        self.app.push_screen(modal, self.then(self._alarm_op, "alarm.unshelve", alarm))

    @work(group="alarm-op")
    async def _alarm_op(self, op: str, alarm: Mapping[str, Any], result: Any) -> None:
        if not result:
            return
        answer = await self.call(op, {"alarm_id": alarm["id"], **result})
        if answer is not None:
            self.notify(f"{alarm['id']} is {answer['state']}", title=op)

    def action_open(self) -> None:
        alarm = self.selected()
        if alarm is not None and alarm["entity"] in self.console.model.entities:
            self.console.open_entity(alarm["entity"])


# -- approvals ----------------------------------------------------------------------------


class ApprovalsScreen(LiveScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "approve", "Approve"),
        Binding("r", "reject", "Reject"),
    ]

    def compose(self) -> ComposeResult:
        yield from self.header()
        yield self.title_bar()
        table = LiveTable(id="approvals", cursor_type="row")
        for key, label, width in (
            ("id", "command", 8),
            ("point", "point", 18),
            ("current", "now", 9),
            ("target", "target", 8),
            ("by", "by", 8),
            ("verdict", "policy", 6),
            ("checkpoint", "restore", 8),
            ("approvals", "appr", 4),
            ("reason", "reason", 40),
        ):
            table.add_column(label, key=key, width=width)
        yield table
        yield Static(id="approval-detail", classes="detail")
        yield Footer()

    def on_mount(self) -> None:
        super().on_mount()
        self.refresh_view(set(), {"commands"})
        self.query_one("#approvals", LiveTable).focus()

    def selected(self) -> dict[str, Any] | None:
        key = self.query_one("#approvals", LiveTable).selected_key()
        command = self.console.model.commands.get(key) if key else None
        return command if command and command["state"] == AWAITING else None

    def refresh_view(self, entities: set[str], parts: set[str]) -> None:
        model = self.console.model
        pending = model.pending_approvals()
        points = {(c["entity"], c["attribute"]) for c in pending}
        if not (parts & {"commands", "resume"} or any(e in entities for e, _ in points)):
            return
        table = self.query_one("#approvals", LiveTable)
        selected = table.selected_key()
        table.clear()
        for command in pending:
            live = model.current_value(command["entity"], command["attribute"])
            ok = all(check.get("ok") for check in command.get("policy") or [])
            table.add_row(
                command["id"],
                f"{command['entity']}.{command['attribute']}",
                cell(live.value) if live else "-",
                Text(cell(command["value"]), style="bold cyan"),
                command["proposed_by"],
                Text("✔ ok", style="green") if ok else Text("✖ FAIL", style="bold red"),
                cell((command.get("checkpoint") or {}).get("value")),
                f"{len(command.get('approvals') or [])}/{command['approvals_required']}",
                command.get("reason") or "",
                key=command["id"],
            )
        table.select_key(selected)
        title = Text()
        title.append(f" {len(pending)} awaiting approval")
        self.set_title_bar(title)
        self._detail()
        self.refresh_bindings()

    def _detail(self) -> None:
        command = self.selected()
        text = Text()
        if command is None:
            text.append("nothing awaits approval", style="dim")
        else:
            text.append(f"{command['id']} ", style="bold")
            text.append(
                f"{command['entity']}.{command['attribute']} := {cell(command['value'])} "
                f"proposed {fmt.clock(command['proposed_ms'])} by {command['proposed_by']} "
                f"({command['source']}): {command['reason']}\n"
            )
            names = ", ".join(a["operator"] for a in command.get("approvals") or []) or "none"
            text.append(
                f"approvals {len(command.get('approvals') or [])}/{command['approvals_required']}"
                f" ({names})"
                + ("; two-person rule" if command.get("two_person") else "")
                + f"; expires unapproved {fmt.clock(command.get('approval_deadline_ms'))}\n"
            )
            text.append_text(policy_text(command.get("policy") or []))
        self.query_one("#approval-detail", Static).update(text)

    @on(DataTable.RowHighlighted, "#approvals")
    def _highlighted(self) -> None:
        self._detail()
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        allowed = super().check_action(action, parameters)
        if allowed and action in ("approve", "reject") and self.selected() is None:
            return None
        return allowed

    @work(exclusive=True, group="approve")
    async def action_approve(self) -> None:
        command = self.selected()
        if command is None:
            return
        # the modal shows the hub's row as it is now (with its full policy and
        # checkpoint), frozen; the approval signs the digest of exactly that row
        frozen = await self.call("cmd.show", {"cmd_id": command["id"]})
        if frozen is None:
            return
        live = self.console.model.current_value(frozen["entity"], frozen["attribute"])
        # cmd.show carries the predicted effect of sending it now (display only: the
        # approval signs the digest of the command, which the prediction is not part of)
        shown = dict(frozen)
        modal = ApproveModal(shown, live, self.console.session.operator)
        if not await self.app.push_screen_wait(modal):
            return
        try:
            approval = self.console.session.approval_for(frozen)
        except OperatorError as exc:
            self.notify(str(exc), title="not signed", severity="error")
            return
        answer = await self.call("cmd.approve", approval)
        if answer is not None:
            self.notify(
                f"{answer['id']} is {answer.get('state_label') or answer['state']}",
                title="approved",
            )

    def action_reject(self) -> None:
        command = self.selected()
        if command is None:
            return
        body = Text(
            f"{command['id']} {command['entity']}.{command['attribute']} := "
            f"{cell(command['value'])} proposed by {command['proposed_by']}\n"
        )
        modal = ReasonModal(f"Reject {command['id']}?", body, "Reject", variant="error")
        self.app.push_screen(modal, self.then(self._reject, command))

    @work(group="reject")
    async def _reject(self, command: Mapping[str, Any], result: Any) -> None:
        if not result:
            return
        answer = await self.call("cmd.reject", {"cmd_id": command["id"], **result})
        if answer is not None:
            self.notify(f"{command['id']} rejected", title="rejected")


# -- commands -------------------------------------------------------------------------------


class CommandsScreen(LiveScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("x", "cancel_command", "Cancel cmd"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._shown: str | None = None
        self._shown_key: tuple[Any, ...] = ()

    def compose(self) -> ComposeResult:
        yield from self.header()
        yield self.title_bar()
        table = LiveTable(id="commands", cursor_type="row")
        for key, label, width in (
            ("id", "command", 8),
            ("state", "state", 19),
            ("point", "point", 18),
            ("target", "target", 8),
            ("by", "by", 8),
            ("approvals", "appr", 4),
            ("proposed", "proposed", 9),
            ("outcome", "outcome", 50),
        ):
            table.add_column(label, key=key, width=width)
        yield table
        yield Static(id="timeline", classes="detail")
        yield Footer()

    def on_mount(self) -> None:
        super().on_mount()
        self.refresh_view(set(), {"commands"})
        self.query_one("#commands", LiveTable).focus()

    def selected(self) -> dict[str, Any] | None:
        key = self.query_one("#commands", LiveTable).selected_key()
        return self.console.model.commands.get(key) if key else None

    def refresh_view(self, entities: set[str], parts: set[str]) -> None:
        if not parts & {"commands", "resume"}:
            return
        model = self.console.model
        commands = model.commands_sorted()
        table = self.query_one("#commands", LiveTable)
        selected = table.selected_key()
        table.clear()
        in_flight = 0
        for command in commands:
            settled = command["state"] in (
                "refused",
                "rejected",
                "cancelled",
                "expired",
                "verified",
                "failed_final",
                "rolled_back",
                "rollback_failed",
            )
            in_flight += not settled
            table.add_row(
                command["id"],
                fmt.command_state(command["state"], command.get("state_label")),
                f"{command['entity']}.{command['attribute']}",
                cell(command["value"]),
                command["proposed_by"],
                f"{len(command.get('approvals') or [])}/{command['approvals_required']}",
                fmt.clock(command["proposed_ms"]),
                command.get("outcome") or command.get("result_detail") or "",
                key=command["id"],
            )
        table.select_key(selected)
        title = Text()
        title.append(f" {in_flight} in flight, {len(commands) - in_flight} recent")
        self.set_title_bar(title)
        self._load_timeline()
        self.refresh_bindings()

    @on(DataTable.RowHighlighted, "#commands")
    def _highlighted(self) -> None:
        self._load_timeline()
        self.refresh_bindings()

    def _load_timeline(self) -> None:
        command = self.selected()
        if command is None:
            self.query_one("#timeline", Static).update(Text("no commands yet", style="dim"))
            return
        key = (command["id"], command["state"], command.get("updated_ms"))
        if key != self._shown_key:
            self._shown_key = key
            self.fetch_timeline(command["id"])

    @work(exclusive=True, group="timeline")
    async def fetch_timeline(self, command_id: str) -> None:
        row = await self.call("cmd.show", {"cmd_id": command_id})
        if row is None or not self.is_attached:
            return
        text = Text()
        text.append(f"{row['id']} ", style="bold")
        text.append_text(fmt.command_state(row["state"], row.get("state_label")))
        text.append(
            f"  {row['entity']}.{row['attribute']} := {cell(row['value'])}, restore "
            f"{cell((row.get('checkpoint') or {}).get('value'))}; {row.get('reason')}\n"
        )
        for event in row.get("timeline") or []:
            mark = f" ({event['command']})" if event["command"] != row["id"] else ""
            extra = event["detail"].get("reason") or event["detail"].get("detail") or ""
            text.append(f"  {fmt.clock(event['at_ms'])} ", style="dim")
            text.append(f"{event['change']:<15}", style="bold")
            text.append(f" {event['before']} → {event['after']} by {event['actor']}{mark}")
            if extra:
                text.append(f": {extra}")
            text.append("\n")
        self.query_one("#timeline", Static).update(text)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        allowed = super().check_action(action, parameters)
        if allowed and action == "cancel_command":
            command = self.selected()
            if command is None or command["state"] not in ("awaiting_approval", "approved"):
                return None
            roles = self.console.session.whoami.get("roles", [])
            if command["proposed_by"] != self.console.session.operator and "admin" not in roles:
                return None
        return allowed

    def action_cancel_command(self) -> None:
        command = self.selected()
        if command is None:
            return
        body = Text(
            f"{command['id']} {command['entity']}.{command['attribute']} := "
            f"{cell(command['value'])} ({command.get('state_label') or command['state']})\n"
        )
        modal = ReasonModal(f"Cancel {command['id']}?", body, "Cancel command", variant="error")
        self.app.push_screen(modal, self.then(self._cancel, command))

    @work(group="cancel")
    async def _cancel(self, command: Mapping[str, Any], result: Any) -> None:
        if not result:
            return
        answer = await self.call("cmd.cancel", {"cmd_id": command["id"], **result})
        if answer is not None:
            self.notify(f"{command['id']} cancelled", title="cancelled")


# -- audit --------------------------------------------------------------------------------


class AuditScreen(LiveScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("v", "verify", "Verify chain"),
        Binding("r", "reload", "Reload"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._head: tuple[Any, ...] = ()
        self.verified: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield from self.header()
        yield self.title_bar()
        yield Static(id="audit-head", classes="detail")
        table = LiveTable(id="audit", cursor_type="row")
        for key, label, width in (
            ("seq", "seq", 7),
            ("ts", "time", 9),
            ("actor", "actor", 9),
            ("action", "action", 20),
            ("subject", "subject", 14),
            ("detail", "detail", 80),
        ):
            table.add_column(label, key=key, width=width)
        yield table
        yield Footer()

    def on_mount(self) -> None:
        super().on_mount()
        self.refresh_view(set(), {"hub"})
        self.query_one("#audit", LiveTable).focus()

    def refresh_view(self, entities: set[str], parts: set[str]) -> None:
        if not parts & {"hub", "resume"}:
            return
        hub = self.console.model.hub
        head = (hub.get("audit_seq"), hub.get("audit_hash"))
        text = Text()
        text.append("chain head ", style="bold")
        text.append(f"seq {head[0] or '-'}  sha256 {fmt.short_hash(head[1], 32)}…")
        if self.verified is not None:
            v = self.verified
            if v.get("ok"):
                text.append(
                    f"\n✔ verified: {v['records']} records, head {fmt.short_hash(v['head_hash'])}",
                    style="bold green",
                )
            else:
                text.append(
                    f"\n✖ BROKEN at seq {v.get('first_bad_seq')}: {v.get('problem')}",
                    style="bold white on red",
                )
        else:
            text.append("\nnot verified in this session (v verifies the whole chain)", style="dim")
        self.query_one("#audit-head", Static).update(text)
        self.set_title_bar(Text("hash-chained audit log"))
        if head != self._head and head[0] is not None:
            self._head = head
            self.load_tail()

    def action_reload(self) -> None:
        self.load_tail()

    @work(exclusive=True, group="audit-tail")
    async def load_tail(self) -> None:
        records = await self.call("audit.tail", {"limit": 200})
        if records is None or not self.is_attached:
            return
        table = self.query_one("#audit", LiveTable)
        table.clear()
        for record in reversed(records):
            detail = json.dumps(record.get("detail") or {}, sort_keys=True, default=str)
            table.add_row(
                str(record["seq"]),
                record["ts"][11:19] + "Z" if record.get("ts") else "-",
                record["actor"],
                record["action"],
                record["subject"],
                detail,
                key=str(record["seq"]),
            )

    @work(exclusive=True, group="audit-verify")
    async def action_verify(self) -> None:
        self.notify("verifying the audit chain …", timeout=2)
        result = await self.call("audit.verify")
        if result is not None:
            self.verified = result
            self.refresh_view(set(), {"hub"})
            self.notify(
                "audit chain intact" if result.get("ok") else "audit chain BROKEN",
                severity="information" if result.get("ok") else "error",
            )
