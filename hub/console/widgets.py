"""Widgets shared by the console's screens: the header and the live table."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from rich.style import Style
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import DataTable, Static

from fieldtwin.hub.console import fmt

if TYPE_CHECKING:
    from fieldtwin.hub.console.app import ConsoleApp


class ConsoleHeader(Static):
    """One line: hub link, pause, alarms, approvals, then operator and role, fitted to
    the width it has (see ``header_text``); a second line while the hub is down."""

    DEFAULT_CSS = """
    ConsoleHeader { height: auto; max-height: 2; background: $panel; color: $text; }
    """

    _lines = 1

    def render(self) -> Text:
        return header_text(self.app, self.size.width or None)  # type: ignore[arg-type]

    def update_from(self, app: ConsoleApp) -> None:
        lines = 2 if app.session.down_since(app.clock()) else 1
        self.refresh(layout=lines != self._lines)  # the second line takes a table row
        self._lines = lines


ROLE_SHORT = {"operator": "op", "approver": "appr", "viewer": "view", "admin": "adm"}


@dataclass
class HeaderPart:
    """One fact of the header, as variants from the fullest to the shortest; the last
    one is shown even when it does not fit, unless it is empty (dropped)."""

    variants: list[Text]
    chosen: int = 0

    def text(self) -> Text:
        return self.variants[self.chosen]

    def width(self) -> int:
        return self.text().cell_len


def _variants(style: str, *words: str) -> list[Text]:
    return [Text(word, style=style) for word in words]


def header_parts(app: ConsoleApp) -> list[HeaderPart]:
    """The header's facts, most important first: hub link, pause, flood, alarms,
    approvals, operator and role, twin id."""
    session = app.session
    model = app.model
    now = app.clock()
    parts: list[HeaderPart] = []
    since = session.down_since(now)
    if not since:
        parts.append(HeaderPart(_variants("bold green", " ● hub online", " ● online")))
    else:
        age = fmt.age(since, now) if now > since else "0s"
        at = fmt.clock(since)
        parts.append(
            HeaderPart(
                _variants(
                    "bold white on red",
                    f" ✖ hub unreachable since {at} ({age}) ",
                    f" ✖ hub down since {at} ({age}) ",
                    f" ✖ hub down {age} ",
                )
            )
        )
    if app.paused:
        parts.append(HeaderPart(_variants("bold black on yellow", "⏸ PAUSED")))
    flood = model.flood(now)
    if flood:
        parts.append(
            HeaderPart(_variants("bold white on red", f"⚠ FLOOD {flood}/10min", f"⚠ FLOOD {flood}"))
        )
    counts = model.alarm_counts()
    total, critical, unacked = counts["total"], counts["critical"], counts["unacked"]
    if total:
        style = "bold red" if critical else "bold yellow"
        words: list[str] = []
        terse: list[str] = []
        if critical:
            words.append(f"{critical} crit")
            terse.append(f"{critical}crit")
        if unacked:
            words.append(f"{unacked} unacked")
            terse.append(f"{unacked}unack")
        detail = f" ({', '.join(words)})" if words else ""
        parts.append(
            HeaderPart(
                _variants(
                    style,
                    f"▲ {total} alarms{detail}",
                    f"▲ {total}{detail}",
                    " ".join([f"▲{total}", *terse]),
                )
            )
        )
    else:
        parts.append(HeaderPart(_variants("green", "✔ no alarms", "✔ 0 alarms")))
    pending = len(model.pending_approvals())
    if pending:
        parts.append(
            HeaderPart(_variants("bold cyan", f"◇ {pending} to approve", f"◇{pending} approve"))
        )
    who = session.whoami
    if who:
        operator = str(who.get("operator"))
        roles = list(who.get("roles", []))
        full = ",".join(roles) or "no role"
        abbreviated = ",".join(ROLE_SHORT.get(r, r[:4]) for r in roles) or "-"
        parts.append(
            HeaderPart(
                [
                    Text.assemble((operator, "bold"), f" {full}"),
                    Text.assemble((operator, "bold"), f" {abbreviated}"),
                    Text(operator, style="bold"),
                    Text(""),
                ]
            )
        )
    twin = model.hub.get("twin_id")
    if twin:
        parts.append(HeaderPart(_variants("dim", str(twin), "")))
    return parts


SEPARATOR = "  "


def fit_parts(parts: list[HeaderPart], width: int) -> None:
    """Shorten the least important parts first until the line fits in ``width``: each
    part takes its next shorter variant until it is at its shortest, then the next more
    important part is shortened."""

    def total() -> int:
        shown = [p.width() for p in parts if p.width()]
        return sum(shown) + len(SEPARATOR) * max(0, len(shown) - 1)

    for part in reversed(parts):
        while total() > width and part.chosen + 1 < len(part.variants):
            part.chosen += 1
        if total() <= width:
            return


def header_text(app: ConsoleApp, width: int | None = None) -> Text:
    """The header: one line, with ``width`` fitted so the important facts (hub link,
    pause, alarms, approvals) always show and operator and role are shortened or
    dropped; while the hub is unreachable, a second line says why."""
    parts = header_parts(app)
    if width is not None:
        fit_parts(parts, width)
    text = Text(no_wrap=True, overflow="ellipsis")
    for part in parts:
        piece = part.text()
        if not piece.cell_len:
            continue
        if text.cell_len:
            text.append(SEPARATOR)
        text.append_text(piece)
    if app.session.down_since(app.clock()):
        why = Text(f" why: {app.session.why_down()}", style="dim")
        if width is not None:
            why.truncate(width, overflow="ellipsis")
        text.append("\n")
        text.append_text(why)
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


class VirtualTable(ScrollView, can_focus=True):
    """A table that draws only the rows on screen, straight from the model.

    Rows are keys; their cells come from ``cells(key)`` when a row is drawn, so a value
    that changes costs nothing until its row is on screen; a change on screen redraws
    that row only (``refresh_keys``), and ages tick by redrawing the visible rows (about
    50 of 5,000) once a second. The DataTable keeps every cell and measures
    each new row, which at 5,000 rows takes seconds (see docs/console.md).
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "edge(0)", "Top", show=False),
        Binding("end", "edge(1)", "Bottom", show=False),
    ]
    DEFAULT_CSS = """
    VirtualTable { height: 1fr; }
    VirtualTable > .virtual-table--header { text-style: bold; background: $panel; }
    VirtualTable > .virtual-table--cursor { background: $block-cursor-background;
        color: $block-cursor-foreground; text-style: bold; }
    VirtualTable:blur > .virtual-table--cursor { background: $block-cursor-blurred-background;
        text-style: none; }
    """
    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "virtual-table--header",
        "virtual-table--cursor",
    }

    def __init__(
        self,
        columns: Sequence[tuple[str, str, int]],
        cells: Callable[[str], Sequence[Any]],
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.columns = list(columns)
        self.cells = cells
        self.keys: list[str] = []
        self._index: dict[str, int] = {}
        self.cursor = 0
        self.rows_drawn = 0
        self._width = sum(width + 2 for _, _, width in self.columns)

    @property
    def row_count(self) -> int:
        return len(self.keys)

    def set_rows(self, keys: list[str]) -> None:
        """A structural change (filter, sort, rows added or removed): all rows are drawn."""
        selected = self.selected_key()
        self.keys = keys
        self._index = {key: index for index, key in enumerate(keys)}
        self.virtual_size = Size(self._width, len(keys) + 1)
        self.select_key(selected)
        if self.cursor >= len(keys):
            self.cursor = max(0, len(keys) - 1)
        self.refresh()

    def refresh_keys(self, keys: Iterable[str]) -> int:
        """Redraw only the rows of these keys that are on screen (their cells changed);
        the other rows keep what Textual drew last. Returns how many rows."""
        start, end = self.visible_range()
        index_of = self._index
        lines = 0
        for key in keys:
            index = index_of.get(key)
            if index is not None and start <= index < end:
                self.refresh_line(index + 1)  # virtual line: the header is line 0
                lines += 1
        return lines

    def selected_key(self) -> str | None:
        return self.keys[self.cursor] if 0 <= self.cursor < len(self.keys) else None

    def select_key(self, key: str | None) -> None:
        if key is None or key not in self._index:
            return
        self.cursor = self._index[key]
        self._show_cursor()

    def visible_range(self) -> tuple[int, int]:
        start = int(self.scroll_y)
        return start, min(len(self.keys), start + max(0, self.size.height - 1))

    def _show_cursor(self) -> None:
        start, _ = self.visible_range()
        height = max(1, self.size.height - 1)
        if self.cursor < start:
            self.scroll_to(y=self.cursor, animate=False)
        elif self.cursor >= start + height:
            self.scroll_to(y=self.cursor - height + 1, animate=False)
        self.refresh()

    def action_cursor(self, step: int) -> None:
        if self.keys:
            self.cursor = min(len(self.keys) - 1, max(0, self.cursor + step))
            self._show_cursor()

    def action_page(self, direction: int) -> None:
        self.action_cursor(direction * max(1, self.size.height - 2))

    def action_edge(self, end: int) -> None:
        self.action_cursor(len(self.keys) if end else -len(self.keys))

    def on_click(self, event: Any) -> None:
        if event.y >= 1:
            index = int(self.scroll_y) + event.y - 1
            if 0 <= index < len(self.keys):
                self.cursor = index
                self.refresh()

    def _line(self, cells: Sequence[Any], style: Style | None) -> Strip:
        line = Text(no_wrap=True)
        for (_, _, width), value in zip(self.columns, cells, strict=False):
            text = value.copy() if isinstance(value, Text) else Text(str(value))
            text.truncate(width, overflow="ellipsis", pad=True)
            line.append(" ")
            line.append_text(text)
            line.append(" ")
        if style is not None:
            line.stylize(style)
        return Strip(line.render(self.app.console), line.cell_len)

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.size.width
        base = self.rich_style
        if y == 0:
            header = self.get_component_rich_style("virtual-table--header")
            strip = self._line([label for _, label, _ in self.columns], base + header)
        else:
            index = scroll_y + y - 1
            if index >= len(self.keys):
                return Strip.blank(width, base)
            style = base
            if index == self.cursor:
                style = base + self.get_component_rich_style("virtual-table--cursor")
            strip = self._line(self.cells(self.keys[index]), style)
            self.rows_drawn += 1
        return strip.crop_extend(scroll_x, scroll_x + width, base)
