"""Widgets shared by the console's screens: the header and the live table."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.widgets import DataTable, Static

from fieldtwin.hub.console import fmt

if TYPE_CHECKING:
    from fieldtwin.hub.console.app import ConsoleApp


class ConsoleHeader(Static):
    """One line: hub link, operator and role, alarm and approval counts, pause."""

    DEFAULT_CSS = """
    ConsoleHeader { height: 1; background: $panel; color: $text; }
    """

    def on_mount(self) -> None:
        self.update_from(self.app)  # type: ignore[arg-type]

    def update_from(self, app: ConsoleApp) -> None:
        self.update(header_text(app))


def header_text(app: ConsoleApp) -> Text:
    session = app.session
    model = app.model
    now = app.clock()
    text = Text(no_wrap=True, overflow="ellipsis")
    since = session.down_since(now)
    if not since:
        text.append(" ● hub online ", style="bold green")
    else:
        seconds = max(0, (now - since) // 1000)
        text.append(
            f" ✖ hub unreachable since {fmt.clock(since)} ({seconds}s) ", style="bold white on red"
        )
    who = session.whoami
    if who:
        roles = ",".join(who.get("roles", [])) or "no role"
        text.append(f" {who.get('operator')}", style="bold")
        text.append(f" {roles}")
    counts = model.alarm_counts()
    flood = model.flood(now)
    if flood:
        text.append(f"  ⚠ FLOOD {flood}/10min", style="bold white on red")
    if counts["total"]:
        style = "bold red" if counts["critical"] else "bold yellow"
        text.append(f"  ▲ {counts['total']} alarms", style=style)
        detail = []
        if counts["critical"]:
            detail.append(f"{counts['critical']} crit")
        if counts["unacked"]:
            detail.append(f"{counts['unacked']} unacked")
        if detail:
            text.append(f" ({', '.join(detail)})", style=style)
    else:
        text.append("  ✔ no alarms", style="green")
    pending = len(model.pending_approvals())
    if pending:
        text.append(f"  ◇ {pending} to approve", style="bold cyan")
    if app.paused:
        text.append("  ⏸ PAUSED", style="bold black on yellow")
    twin = model.hub.get("twin_id")
    if twin:
        text.append(f"  {twin}", style="dim")
    if since:
        text.append(f"  {session.why_down()}", style="dim")
    return text


class LiveTable(DataTable[Any]):
    """A DataTable that tells which rows are on screen and when that changes, so the
    screens compute cells only for visible rows (the rest are marked and done when they
    scroll into view)."""

    def __init__(self, *args: Any, on_scroll: Callable[[], None] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self._on_scroll = on_scroll

    def visible_range(self) -> tuple[int, int]:
        start = int(self.scroll_y)
        height = max(0, self.size.height - (self.header_height if self.show_header else 0))
        return start, min(self.row_count, start + height + 1)

    def watch_scroll_y(self, old: float, new: float) -> None:
        super().watch_scroll_y(old, new)
        if self._on_scroll is not None and int(old) != int(new):
            self._on_scroll()

    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:
            return None
        return None if key.value is None else str(key.value)

    def select_key(self, key: str | None) -> None:
        if key is not None and key in self.rows:
            self.move_cursor(row=self.get_row_index(key), animate=False, scroll=True)
