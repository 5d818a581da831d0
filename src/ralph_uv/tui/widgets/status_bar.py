"""The line above the footer: where things stand (locations, the loop's mode) on the left,
a short message on the right."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ralph_uv.tui.locations import LocationInfo, LocationState

__all__ = ["StatusBar", "locations_text"]

_STATE = {
    LocationState.ONLINE: ("●", "green"),
    LocationState.CONNECTING: ("◌", "yellow"),
    LocationState.UNREACHABLE: ("✗", "red"),
}


def locations_text(infos: list[LocationInfo]) -> Text:
    """``● local 2 · ✗ east unreachable``."""
    text = Text()
    for index, info in enumerate(infos):
        if index:
            text.append(" · ", style="dim")
        mark, style = _STATE[info.state]
        text.append(f"{mark} ", style=style)
        text.append(info.name, style="bold")
        if info.state is LocationState.ONLINE:
            text.append(f" {info.loops_active} running", style="dim")
        else:
            text.append(f" {info.state.value}", style=style)
    return text


class StatusBar(Widget):
    """One line: ``left`` (what stands) and ``right`` (the latest message)."""

    DEFAULT_CSS = """
    StatusBar {
        height: 1;
        background: $panel;
        color: $foreground;
        padding: 0 1;
    }
    """

    left: reactive[Text] = reactive(Text)
    right: reactive[Text] = reactive(Text)

    def render(self) -> Text:
        width = max(self.size.width - 2, 1)
        right = self.right.copy()
        right.truncate(max(width // 2, 1))
        left = self.left.copy()
        left.truncate(max(width - right.cell_len - 1, 1), overflow="ellipsis")
        line = left
        line.append(" " * max(1, width - left.cell_len - right.cell_len))
        line.append_text(right)
        return line

    @property
    def plain(self) -> str:
        """What the bar says, as plain text (for tests and logs)."""
        return f"{self.left.plain} {self.right.plain}"
