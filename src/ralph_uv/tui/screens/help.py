"""``?``: every key the TUI knows, for the screen it was opened from and for all screens."""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from ralph_uv.tui.keymap import EXIT_KEY_LABEL

__all__ = ["HelpScreen", "key_label"]

_NAMES = {
    "question_mark": "?",
    "slash": "/",
    "escape": "Esc",
    "enter": "Enter",
    "ctrl+q": "Ctrl-Q",
    "ctrl+s": "Ctrl-S",
    "pageup": "PgUp",
    "pagedown": "PgDn",
}


def key_label(keys: str) -> str:
    """``question_mark`` -> ``?``; several keys joined with ``/``."""
    return " / ".join(_NAMES.get(key, key) for key in keys.split(","))


def _rows(bindings: Iterable[BindingType]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for item in bindings:
        # Bindings without a tooltip are the plain forms of one listed with it.
        if not isinstance(item, Binding) or not item.tooltip:
            continue
        found.append((key_label(item.key), item.tooltip))
    return found


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None,
                  padding=(0, 2), title_style="bold", expand=True)
    table.add_column(style="bold cyan", no_wrap=True, width=12)
    table.add_column(ratio=1)
    for key, what in rows:
        table.add_row(key, what)
    return table


class HelpScreen(ModalScreen[None]):
    """The keys, by screen. Any of Esc, q or ? closes it."""

    DEFAULT_CSS = """
    HelpScreen {
        align: center middle;
    }
    HelpScreen > VerticalScroll {
        width: 90;
        max-width: 95%;
        height: 90%;
        border: thick $accent;
        background: $surface;
        padding: 1 2;
    }
    """

    BINDINGS = [Binding("escape,q,question_mark", "close", "Close")]

    def __init__(self, sections: list[tuple[str, Iterable[BindingType]]]) -> None:
        super().__init__()
        self._sections = sections

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(Text("ralph-uv tui: keys", style="bold"))
            for title, bindings in self._sections:
                rows = _rows(bindings)
                if rows:
                    yield Static(_table(title, rows))
            yield Static(Text(
                f"Interactive mode (i in a loop's detail): every key goes to the agent's "
                f"terminal until {EXIT_KEY_LABEL}. The footer shows the keys of the screen "
                "you are on.", style="dim"))

    def action_close(self) -> None:
        self.dismiss(None)
