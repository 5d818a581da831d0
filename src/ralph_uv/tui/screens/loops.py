"""The home screen: every loop, local and remote, live; a filter, a status filter and the
table (sorted by any column: ``o`` or a click on its header)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.timer import Timer
from textual.widgets import Input, Select, Static

from ralph_uv.tui.locations import LocationInfo
from ralph_uv.tui.screens.base import LoopScreen
from ralph_uv.tui.source import LoopKey, LoopRow
from ralph_uv.tui.widgets.key_bar import KeyBar
from ralph_uv.tui.widgets.loops_table import STATUS_FILTERS, LoopsTable
from ralph_uv.tui.widgets.status_bar import StatusBar, locations_text

__all__ = ["LoopsScreen"]

_EMPTY = "No loops yet. Press n to start one (or run `ralph-uv run TASK --detach`)."


class LoopsScreen(LoopScreen):
    """Every loop, refreshed by events."""

    DEFAULT_CSS = """
    LoopsScreen #filters {
        height: 3;
    }
    LoopsScreen #filter {
        width: 1fr;
    }
    LoopsScreen #status-filter {
        width: 24;
    }
    LoopsScreen LoopsTable {
        height: 1fr;
    }
    LoopsScreen #empty {
        height: auto;
        padding: 1 2;
        color: $text-muted;
    }
    """

    BINDINGS = [
        Binding("slash", "filter", "Filter", tooltip="Keep the loops that contain some words"),
        Binding("f", "next_status", "Status filter",
                tooltip="Cycle the status filter: all, active, finished, each status"),
        Binding("escape", "clear_filter", "Clear filter", show=False,
                tooltip="Clear the filter"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._ticker: Timer | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="filters"):
            yield Input(placeholder="filter: words in task, location, loop, story, agent",
                        id="filter")
            yield Select(
                [(name, name) for name in STATUS_FILTERS], value="all", allow_blank=False,
                id="status-filter",
            )
        yield LoopsTable(id="loops")
        yield Static(_EMPTY, id="empty")
        yield StatusBar(id="status-bar")
        yield KeyBar()

    @property
    def table(self) -> LoopsTable:
        return self.query_one(LoopsTable)

    def on_mount(self) -> None:
        self.sub_title = "loops"
        self.table.focus()
        self._ticker = self.set_interval(1.0, self.table.tick)

    def on_screen_suspend(self) -> None:
        # Under another screen the table is not seen: its times need not tick.
        if self._ticker is not None:
            self._ticker.pause()

    def on_screen_resume(self) -> None:
        if self._ticker is not None:
            self._ticker.resume()
        super().on_screen_resume()

    def current_loop(self) -> LoopKey | None:
        return self.table.selected

    def refresh_loops(self, rows: list[LoopRow], infos: list[LocationInfo]) -> None:
        self.table.show(rows)
        self.query_one("#empty").display = not rows
        bar = self.query_one(StatusBar)
        bar.left = locations_text(infos)
        shown, total = len(self.table.shown), len(rows)
        noun = "loop" if total == 1 else "loops"
        bar.right = Text(f"{shown} of {total} {noun}" if shown != total else f"{total} {noun}",
                         style="dim")

    # ------------------------------------------------------------------------- filters

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.table.filter_text = event.value.strip()
            self._count()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            self.table.focus()

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "status-filter" and isinstance(event.value, str):
            self.table.status_filter = event.value
            self._count()

    def _count(self) -> None:
        self.refresh_loops(self.source.rows(), self.source.location_infos())

    def action_filter(self) -> None:
        """Type words to keep only the loops that contain them."""
        self.query_one("#filter", Input).focus()

    def action_clear_filter(self) -> None:
        self.query_one("#filter", Input).value = ""
        self.table.focus()

    def action_next_status(self) -> None:
        """Cycle the status filter: all, active, finished, then each status."""
        select: Select[str] = self.query_one("#status-filter", Select)
        current = select.value if isinstance(select.value, str) else "all"
        select.value = STATUS_FILTERS[(STATUS_FILTERS.index(current) + 1) % len(STATUS_FILTERS)]

    def on_loops_table_opened(self, event: LoopsTable.Opened) -> None:
        self.tui.open_detail(event.key)
