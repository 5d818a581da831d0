"""The keys of the screen and of the focused widget, on one line at the bottom.

Textual's own Footer rebuilds a widget per key whenever the focus moves, which costs more
than a key press should; this bar redraws one line of text, and only when the keys shown
change. A click on a key runs it.
"""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.reactive import reactive
from textual.screen import Screen
from textual.widget import Widget

__all__ = ["KeyBar", "key_display"]

_NAMES = {
    "question_mark": "?",
    "slash": "/",
    "escape": "esc",
    "enter": "enter",
    "ctrl+s": "^s",
    "ctrl+q": "^q",
}


def key_display(key: str) -> str:
    """How a binding's (first) key is shown: ``question_mark`` -> ``?``."""
    first = key.split(",")[0]
    return _NAMES.get(first, first)


class KeyBar(Widget):
    """One line: ``key description`` for every binding shown in the focused chain."""

    DEFAULT_CSS = """
    KeyBar {
        height: 1;
        background: $footer-background;
        color: $footer-description-foreground;
    }
    """

    keys: reactive[tuple[tuple[str, str, str], ...]] = reactive(())
    """``(key, description, action)`` for each key shown."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._spans: list[tuple[int, int, str]] = []  # start, end, key
        self._colour: str | None = None

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)
        self._bindings_changed(self.screen)

    def on_unmount(self) -> None:
        self.screen.bindings_updated_signal.unsubscribe(self)

    def _bindings_changed(self, screen: Screen[object]) -> None:
        if screen is not self.screen:
            return
        shown: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        for key, (_node, binding, enabled, _tooltip) in screen.active_bindings.items():
            if not binding.show or not enabled or binding.action in seen:
                continue
            seen.add(binding.action)
            shown.append((key, binding.description, binding.action))
        self.keys = tuple(shown)

    def render(self) -> Text:
        if self._colour is None:
            self._colour = self.app.get_css_variables().get("footer-key-foreground", "yellow")
        colour = self._colour
        text = Text(no_wrap=True, overflow="ellipsis")
        self._spans = []
        for key, description, _action in self.keys:
            start = text.cell_len
            text.append(f" {key_display(key)} ", style=f"bold {colour}")
            text.append(f"{description} ")
            self._spans.append((start, text.cell_len, key))
        return text

    async def on_click(self, event: events.Click) -> None:
        for start, end, key in self._spans:
            if start <= event.x < end:
                found = self.screen.active_bindings.get(key)
                if found is not None:
                    node, binding, _enabled, _tooltip = found
                    await self.app.run_action(binding.action, node)
                return
