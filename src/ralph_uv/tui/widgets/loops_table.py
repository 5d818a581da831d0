"""The loops table: one row per loop, filtered by text and status, sorted by any column.

:meth:`LoopsTable.show` takes every row the source has; the table keeps the ones that match
:attr:`LoopsTable.filter_text` and :attr:`LoopsTable.status_filter`, in the order of
:attr:`LoopsTable.sort_column`. The cursor stays on the loop it was on whatever happens.

The table draws its own lines (a header that stays put, then the rows), each row's strip kept
until its cells change: with 50 live loops whose times tick every second, redrawing costs a
few rows, not a re-render of every cell (as Textual's DataTable does on any change).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.color import Color, ColorParseError
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from ralph_uv.status import STATUS_STYLE, LoopStatus
from ralph_uv.tui.source import LoopKey, LoopRow

__all__ = [
    "COLUMNS",
    "STATUS_FILTERS",
    "LoopsTable",
    "duration",
    "status_text",
]


# (key, label); the key is also the sort key's name.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("task", "Task"),
    ("where", "Where"),
    ("status", "Status"),
    ("iter", "Iter"),
    ("story", "Story"),
    ("done", "Stories"),
    ("agent", "Agent"),
    ("time", "Run time"),
    ("idle", "Last output"),
    ("loop", "Loop"),
)
STATUS_FILTERS: tuple[str, ...] = ("all", "active", "finished", *(s.value for s in LoopStatus))
_STATUS_ORDER = {status: index for index, status in enumerate(LoopStatus)}


def duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``3d04h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    total = int(seconds)
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


def status_text(row: LoopRow) -> Text:
    """The status, coloured; marked when its location is unreachable or it is reconnecting."""
    text = Text(row.status.value, style=STATUS_STYLE.get(row.status, ""))
    if not row.reachable:
        text.stylize("dim")
        text.append(" (unreachable)", style="red")
    elif row.connection == "reconnecting":
        text.append(" ⟳", style="yellow")
    return text


def _matches(row: LoopRow, text: str, status: str) -> bool:
    if status == "active" and not row.status.is_active:
        return False
    if status == "finished" and row.status.is_active:
        return False
    if status not in ("all", "active", "finished") and row.status.value != status:
        return False
    if not text:
        return True
    needle = text.lower()
    haystack = " ".join(
        (row.task_name, row.location, row.loop_id, row.status.value, row.story or "", row.agent)
    ).lower()
    return all(part in haystack for part in needle.split())


def _sort_key(column: str, now: float) -> Callable[[LoopRow], Any]:
    keys: dict[str, Callable[[LoopRow], Any]] = {
        "task": lambda r: r.task_name.lower(),
        "where": lambda r: r.location,
        "status": lambda r: _STATUS_ORDER.get(r.status, 99),
        "iter": lambda r: (r.iteration, r.max_iterations),
        "story": lambda r: r.story or "",
        "done": lambda r: (r.stories_done / r.stories_total if r.stories_total else 0.0),
        "agent": lambda r: r.agent,
        "time": lambda r: r.run_time(now),
        "idle": lambda r: (r.idle_time(now) is None, r.idle_time(now) or 0.0),
        "loop": lambda r: r.loop_id,
        "started": lambda r: r.started_at,
    }
    return keys.get(column, keys["started"])


def _cells(row: LoopRow, now: float) -> tuple[Text, ...]:
    where = Text(row.location, style="" if row.reachable else "red")
    idle = row.idle_time(now)
    return (
        Text(row.task_name),
        where,
        status_text(row),
        Text(f"{row.iteration}/{row.max_iterations}"),
        Text(row.story or "-"),
        Text(f"{row.stories_done}/{row.stories_total}"),
        Text(row.agent),
        Text(duration(row.run_time(now))),
        Text("-" if idle is None else f"{duration(idle)} ago"),
        Text(row.loop_id, style="dim"),
    )


_GAP = 2  # blank cells between two columns
_MAX_WIDTH = 40


class LoopsTable(ScrollView, can_focus=True):
    """Every loop, one per row, under a header. Enter (or a click on the selected row) posts
    :class:`LoopsTable.Opened`; a click on a header sorts by that column."""

    DEFAULT_CSS = """
    LoopsTable {
        background: $surface;
        overflow: auto auto;
        scrollbar-size: 1 1;
    }
    """

    BINDINGS = [
        Binding("enter", "open", "Open", show=False,
                tooltip="Open the loop's detail (or click its row twice)"),
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "first", "First", show=False),
        Binding("end", "last", "Last", show=False),
        Binding("o", "next_sort", "Sort", tooltip="Sort by the next column (or click a header)"),
        Binding("O", "reverse_sort", "Reverse", show=False, tooltip="Reverse the order"),
    ]

    filter_text: reactive[str] = reactive("")
    """Only loops whose task, location, id, status, story or agent contain every word."""
    status_filter: reactive[str] = reactive("all")
    """One of :data:`STATUS_FILTERS`."""
    sort_column: reactive[str] = reactive("started")
    """A column key of :data:`COLUMNS` (or ``started``, the default: newest first)."""
    sort_reverse: reactive[bool] = reactive(True)
    cursor_row: reactive[int] = reactive(0)
    """The index of the selected row among those shown."""

    class Opened(Message):
        """The user asked to open a loop (Enter, or a click on the selected row)."""

        def __init__(self, table: LoopsTable, key: LoopKey) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> LoopsTable:
            return self.table

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._rows: list[LoopRow] = []
        self._shown: list[LoopKey] = []
        self._cells: list[tuple[Text, ...]] = []
        self._widths: list[int] = [len(label) + 2 for _, label in COLUMNS]
        # A row's strip by (loop, look): 0 plain, 1 striped, 2 cursor, 3 cursor unfocused.
        self._strips: dict[tuple[LoopKey, int], tuple[tuple[Text, ...], Strip]] = {}
        self._header: Strip | None = None
        self._looks: list[Style] = []

    # ------------------------------------------------------------------------- data

    @property
    def shown(self) -> list[LoopKey]:
        """The loops in the table, in display order."""
        return list(self._shown)

    @property
    def row_count(self) -> int:
        return len(self._shown)

    def row_text(self, index: int) -> list[str]:
        """The cells of row ``index`` as plain text."""
        return [cell.plain for cell in self._cells[index]]

    @property
    def selected(self) -> LoopKey | None:
        """The loop under the cursor."""
        if not 0 <= self.cursor_row < len(self._shown):
            return None
        return self._shown[self.cursor_row]

    def select(self, key: LoopKey) -> bool:
        """Put the cursor on ``key``'s row; whether it is shown."""
        if key not in self._shown:
            return False
        self.cursor_row = self._shown.index(key)
        return True

    def show(self, rows: Sequence[LoopRow], now: float | None = None) -> None:
        """Show these loops (every one the source has; the table filters and sorts)."""
        self._rows = list(rows)
        self._redraw(time.time() if now is None else now)

    def tick(self) -> None:
        """Redraw the times (run time, last output): called every second."""
        self._redraw(time.time())

    def _redraw(self, now: float) -> None:
        selected = self.selected
        visible = [r for r in self._rows if _matches(r, self.filter_text, self.status_filter)]
        visible.sort(key=_sort_key(self.sort_column, now), reverse=self.sort_reverse)
        self._shown = [r.key for r in visible]
        self._cells = [_cells(r, now) for r in visible]
        widths = [len(label) + 2 for _, label in COLUMNS]
        for cells in self._cells:
            for index, cell in enumerate(cells):
                widths[index] = max(widths[index], min(cell.cell_len, _MAX_WIDTH))
        if widths != self._widths:
            self._widths = widths
            self._strips.clear()
            self._header = None
        shown = set(self._shown)
        for stale in [k for k in self._strips if k[0] not in shown]:
            del self._strips[stale]
        self.virtual_size = Size(sum(widths) + _GAP * len(widths), len(self._shown) + 1)
        if selected is not None and selected in self._shown:
            self.cursor_row = self._shown.index(selected)
        else:
            self.cursor_row = min(self.cursor_row, max(0, len(self._shown) - 1))
        self.refresh()

    # ------------------------------------------------------------------------- drawing

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        base = self.rich_style
        if y == 0:
            strip, look = self._header_strip(), 4
        else:
            index = scroll_y + y - 1
            if not 0 <= index < len(self._shown):
                return Strip.blank(width, base)
            strip = self._row_strip(index)
            look = (2 if self.has_focus else 3) if index == self.cursor_row else index % 2
        return strip.crop_extend(scroll_x, scroll_x + width, base + self._style_of(look))

    def _style_of(self, look: int) -> Style:
        """The background of a row look (header last), from the theme's colours."""
        if not self._looks:
            variables = self.app.get_css_variables()

            def parse(name: str, fallback: str) -> Color:
                try:
                    return Color.parse(variables.get(name, fallback))
                except ColorParseError:
                    return Color.parse(fallback)

            surface = parse("surface", "#1e1e1e")

            def over(name: str, fallback: str) -> Color:
                return surface + parse(name, fallback)

            self._looks = [
                Style(),
                Style(bgcolor=over("boost", "#ffffff0a").rich_color),
                Style(bgcolor=over("block-cursor-background", "#0178d4").rich_color,
                      color=over("block-cursor-foreground", "#ffffff").rich_color, bold=True),
                Style(bgcolor=over("block-cursor-blurred-background", "#0178d44d").rich_color),
                Style(bgcolor=over("panel", "#2b2b2b").rich_color, bold=True),
            ]
        return self._looks[look]

    def _header_strip(self) -> Strip:
        if self._header is None:
            arrow = " ▼" if self.sort_reverse else " ▲"
            cells = [
                Text(label + (arrow if key == self.sort_column else ""))
                for key, label in COLUMNS
            ]
            self._header = self._strip(cells, self._style_of(4))
        return self._header

    def _row_strip(self, index: int) -> Strip:
        key = self._shown[index]
        cells = self._cells[index]
        look = (2 if self.has_focus else 3) if index == self.cursor_row else index % 2
        cached = self._strips.get((key, look))
        if cached is not None and cached[0] == cells:
            return cached[1]
        strip = self._strip(list(cells), self._style_of(look))
        self._strips[(key, look)] = (cells, strip)
        return strip

    def _strip(self, cells: list[Text], background: Style) -> Strip:
        console = self.app.console
        segments: list[Segment] = []
        for cell, width in zip(cells, self._widths, strict=True):
            text = cell.copy()
            text.truncate(width, overflow="ellipsis", pad=True)
            text.append(" " * _GAP)
            # Text.render leaves out the text's own style (its spans only): add it here.
            base = background + console.get_style(text.style)
            for segment in text.render(console):
                style = base + segment.style if segment.style else base
                if background.color is not None:  # the cursor's colour wins over the cell's
                    style += Style(color=background.color)
                segments.append(Segment(segment.text, style))
        return Strip(segments)

    # ------------------------------------------------------------------------- reactives

    def watch_filter_text(self) -> None:
        self._redraw(time.time())

    def watch_status_filter(self) -> None:
        self._redraw(time.time())

    def watch_sort_column(self) -> None:
        self._header = None
        self._redraw(time.time())

    def watch_sort_reverse(self) -> None:
        self._header = None
        self._redraw(time.time())

    def watch_cursor_row(self, old: int, new: int) -> None:
        height = self.scrollable_content_region.height - 1
        if new < self.scroll_y:
            self.scroll_to(y=new, animate=False, immediate=True)
        elif height > 0 and new >= self.scroll_y + height:
            self.scroll_to(y=new - height + 1, animate=False, immediate=True)
        self.refresh()

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    # ------------------------------------------------------------------------- actions

    def sort_by(self, column: str) -> None:
        """Sort by ``column``; sorting by the same column again reverses the order."""
        if column == self.sort_column:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_column = column
            self.sort_reverse = column in ("time", "idle", "done", "iter")

    def column_at(self, x: int) -> str | None:
        """The key of the column under ``x`` (in the widget's content)."""
        position = x + int(self.scroll_x)
        for (key, _), width in zip(COLUMNS, self._widths, strict=True):
            if position < width + _GAP:
                return key
            position -= width + _GAP
        return None

    def column_x(self, key: str) -> int:
        """Where column ``key`` starts (in the unscrolled content)."""
        x = 0
        for (name, _), width in zip(COLUMNS, self._widths, strict=True):
            if name == key:
                return x
            x += width + _GAP
        raise KeyError(key)

    def action_next_sort(self) -> None:
        """Sort by the next column."""
        names = [key for key, _ in COLUMNS]
        index = names.index(self.sort_column) + 1 if self.sort_column in names else 0
        self.sort_by(names[index % len(names)])

    def action_reverse_sort(self) -> None:
        self.sort_reverse = not self.sort_reverse

    def action_cursor(self, step: int) -> None:
        if self._shown:
            self.cursor_row = max(0, min(len(self._shown) - 1, self.cursor_row + step))

    def action_page(self, direction: int) -> None:
        self.action_cursor(direction * max(1, self.scrollable_content_region.height - 2))

    def action_first(self) -> None:
        self.cursor_row = 0

    def action_last(self) -> None:
        self.cursor_row = max(0, len(self._shown) - 1)

    def action_open(self) -> None:
        key = self.selected
        if key is not None:
            self.post_message(self.Opened(self, key))

    def on_click(self, event: events.Click) -> None:
        if event.y == 0:
            column = self.column_at(event.x)
            if column is not None:
                self.sort_by(column)
            return
        index = int(self.scroll_y) + event.y - 1
        if 0 <= index < len(self._shown):
            if index == self.cursor_row:
                self.action_open()
            self.cursor_row = index
