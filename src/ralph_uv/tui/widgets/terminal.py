"""The agent's live terminal: a :class:`~ralph_uv.tui.emulator.TerminalEmulator` drawn in a
scrollable widget, with search, and interactive mode (keys go to the agent).

Bytes given to :meth:`TerminalView.write` are queued; the emulator parses them and the widget
redraws at most :data:`MAX_FPS` times a second, so a flood of output costs a bounded amount of
work per frame and key presses stay responsive. While the view is at the bottom it follows new
output; scrolled up, it stays put (the scrollback) until it is scrolled back down.

In interactive mode every key goes to the agent (posted as :class:`TerminalView.Typed`) except
the exit key, which posts :class:`TerminalView.ExitInteractive`.
"""

from __future__ import annotations

import time

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.cache import LRUCache
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.timer import Timer

from ralph_uv.tui.emulator import BLANK, Runs, TerminalEmulator
from ralph_uv.tui.keymap import EXIT_KEY, key_bytes, paste_bytes

__all__ = ["MAX_FPS", "TerminalView"]

MAX_FPS = 30
_COST_FACTOR = 4.0  # a frame at most every 4x what the last frames cost
_FLOOD_FPS = 5
_MIN_HEIGHT = 256
_NAMED = {
    "brown": "yellow",
    "brightbrown": "bright_yellow",
}


def _color(name: str) -> str | None:
    if name == "default":
        return None
    if name in _NAMED:
        return _NAMED[name]
    if name.startswith("bright"):
        return "bright_" + name[len("bright") :]
    if len(name) == 6 and all(c in "0123456789abcdefABCDEF" for c in name):
        return "#" + name
    return name


class TerminalView(ScrollView, can_focus=True):
    """A terminal emulator widget fed with bytes."""

    DEFAULT_CSS = """
    TerminalView {
        background: $background;
        color: $foreground;
        overflow: auto auto;
        scrollbar-size: 1 1;
        border: round $panel-lighten-2;
        border-title-color: $text-accent;
    }
    TerminalView:focus {
        border-title-style: bold reverse;
    }
    TerminalView.-interactive {
        border: double $warning;
    }
    """

    BINDINGS = [
        Binding("home", "scroll_home", "Top", show=False, tooltip="The oldest line kept"),
        Binding("end", "follow", "Follow", show=False,
                tooltip="Back to the bottom, following new output"),
        Binding("pageup", "page_up", "Page up", show=False,
                tooltip="Scroll back (also up, down, page down and the mouse wheel)"),
        Binding("pagedown", "page_down", "Page down", show=False),
        Binding("up", "scroll_up", "Up", show=False),
        Binding("down", "scroll_down", "Down", show=False),
    ]

    interactive: reactive[bool] = reactive(False)
    """Keys go to the agent."""
    follow: reactive[bool] = reactive(True)
    """Scroll along with new output."""
    search_text: reactive[str] = reactive("")
    """The search text; the current match is highlighted."""

    class Typed(Message):
        """Bytes typed in interactive mode, for the agent's terminal."""

        def __init__(self, view: TerminalView, data: bytes) -> None:
            super().__init__()
            self.view = view
            self.data = data

        @property
        def control(self) -> TerminalView:
            return self.view

    class ExitInteractive(Message):
        """The exit key was pressed in interactive mode."""

        def __init__(self, view: TerminalView) -> None:
            super().__init__()
            self.view = view

        @property
        def control(self) -> TerminalView:
            return self.view

    def __init__(
        self,
        emulator: TerminalEmulator | None = None,
        *,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.emulator = emulator or TerminalEmulator()
        self._timer: Timer | None = None
        self._last_flush = 0.0
        self._follow_y = 0  # the scroll position that shows the latest output
        self._pad = 0  # blank virtual lines above the first line
        self._frame_cost = 0.0  # seconds the last frames took to parse and draw
        self._render_cost = 0.0
        self._match: tuple[int, int, int] | None = None  # line, start, end
        self._styles: dict[tuple[object, ...], Style] = {}
        # History lines never change: their strips are kept, by line object.
        self._history_strips: LRUCache[int, tuple[Runs, Strip]] = LRUCache(256)
        self.frames = 0  # redraws caused by output (for the benchmark and tests)

    def on_mount(self) -> None:
        self._update_virtual_size()

    # ------------------------------------------------------------------------- output

    def write(self, data: bytes) -> None:
        """Queue output; it is drawn within 1/MAX_FPS s."""
        if not data:
            return
        self.emulator.write(data)
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            return
        # At most MAX_FPS frames a second, and fewer when frames are dear: parsing and
        # drawing take at most about a quarter of the time, so keys stay quick under a flood.
        interval = max(1 / MAX_FPS, _COST_FACTOR * self._frame_cost)
        if self.emulator.skipping:
            # Output faster than it can be drawn: nobody reads it at this pace anyway, and
            # every frame spent on it is a frame a key press waits behind.
            interval = max(interval, 1 / _FLOOD_FPS)
        # Never 0: a zero-interval Textual timer divides by its interval.
        delay = max(0.001, self._last_flush + interval - time.monotonic())
        self._timer = self.set_timer(delay, self._flush_output)

    def _flush_output(self) -> None:
        self._timer = None
        self._last_flush = time.monotonic()
        started = time.perf_counter()
        if self.emulator.flush():
            self.frames += 1
            self._after_change()
        self._frame_cost = 0.5 * self._frame_cost + 0.5 * (
            time.perf_counter() - started + self._render_cost
        )
        self._render_cost = 0.0
        if self.emulator.pending:
            self._schedule()

    def flush_all(self) -> None:
        """Parse and draw everything queued now (a replay, or a test that waits for it)."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        while self.emulator.pending:
            self.emulator.flush()
        self._after_change()

    def _after_change(self) -> None:
        self._update_virtual_size()
        self._follow_y = self._bottom_y()
        if self.follow:
            self.scroll_to(y=self._follow_y, animate=False, immediate=True)
        self.refresh()

    def _bottom_y(self) -> int:
        """The scroll position that shows the output's last line (or the cursor) at the
        bottom: a 40-row terminal with 10 lines of output shows them, not 30 blank rows."""
        emulator = self.emulator
        last = emulator.cursor[1]
        for index in range(emulator.line_count - 1, last, -1):
            if emulator.text(index):
                last = index
                break
        height = self.scrollable_content_region.height
        # From the first line when everything fits, else the last lines at the bottom.
        return max(0, min(self.max_scroll_y, max(self._pad, last + self._pad + 1 - height)))

    def _update_virtual_size(self) -> None:
        # The virtual height doubles when it must grow (a new height means a new layout of
        # the whole screen, which costs several frames), the lines at the bottom, blank ones
        # above them; it shrinks back only when the lines were cleared.
        emulator = self.emulator
        lines = emulator.line_count
        capacity = max((emulator.history.maxlen or 0) + emulator.rows, lines)
        height = self.virtual_size.height
        if not lines <= height <= capacity or lines < height // 4:
            height = min(max(_MIN_HEIGHT, 2 * lines), capacity)
        self._pad = height - lines
        size = Size(self.emulator.cols, height)
        if size != self.virtual_size:
            self.virtual_size = size

    def reset(self) -> None:
        """Forget everything shown."""
        self.emulator.reset()
        self._history_strips.clear()
        self._match = None
        self._after_change()

    def resize_terminal(self, cols: int, rows: int) -> None:
        """Emulate a terminal of this size (the agent's, after a resize)."""
        self.emulator.resize(cols, rows)
        self._history_strips.clear()
        self._after_change()

    @property
    def fitting_size(self) -> tuple[int, int]:
        """The terminal size that fills this widget: ``(cols, rows)``."""
        region = self.scrollable_content_region
        return max(region.width, 20), max(region.height, 5)

    # ------------------------------------------------------------------------- drawing

    def render_line(self, y: int) -> Strip:
        started = time.perf_counter()
        scroll_x, scroll_y = self.scroll_offset
        index = scroll_y + y - self._pad
        width = self.scrollable_content_region.width
        base = self.rich_style
        if not 0 <= index < self.emulator.line_count:
            return Strip.blank(width, base)
        strip = self._line_strip(index)
        if scroll_x or strip.cell_length != width:
            strip = strip.crop_extend(scroll_x, scroll_x + width, base)
        self._render_cost += time.perf_counter() - started
        return strip

    def _line_strip(self, index: int) -> Strip:
        emulator = self.emulator
        marks: tuple[int, int] | None = None
        cursor_x, cursor_line = emulator.cursor
        if self.interactive and index == cursor_line:
            marks = (cursor_x, cursor_x + 1)
        elif self._match is not None and self._match[0] == index:
            marks = (self._match[1], self._match[2])
        in_history = index < len(emulator.history)
        runs = emulator.runs(index, marks)
        if in_history and marks is None:
            cached = self._history_strips.get(id(runs))
            if cached is not None and cached[0] is runs:
                return cached[1]
        styles = self._styles
        segments = [Segment(text, styles.get(attrs) or self._style(attrs))
                    for text, attrs in runs]
        strip = Strip(segments)
        if strip.cell_length < emulator.cols:
            strip = Strip([*segments, Segment(" " * (emulator.cols - strip.cell_length))],
                          emulator.cols)
        strip = strip.apply_style(self.rich_style)
        if in_history and marks is None:
            self._history_strips[id(runs)] = (runs, strip)
        return strip

    def _style(self, key: tuple[object, ...]) -> Style:
        """The Rich style of a cell's pyte attributes (plus a trailing ``True``: reversed)."""
        if len(key) < 7 or key == BLANK:
            style = Style()
        else:
            fg, bg, bold, italic, underline, strike, reverse = key[:7]
            if len(key) > 7:
                reverse = not reverse
            style = Style(
                color=_color(str(fg)), bgcolor=_color(str(bg)), bold=bool(bold),
                italic=bool(italic), underline=bool(underline), strike=bool(strike),
                reverse=bool(reverse),
            )
        self._styles[key] = style
        return style

    # ------------------------------------------------------------------------- scrolling

    def validate_scroll_y(self, value: float) -> float:
        # Never into the blank lines above the first line (see _update_virtual_size).
        return max(super().validate_scroll_y(value), min(self._pad, self.max_scroll_y))

    def watch_scroll_y(self, old: float, new: float) -> None:
        super().watch_scroll_y(old, new)
        self.follow = round(new) >= min(self._follow_y, self.max_scroll_y)

    def action_follow(self) -> None:
        """Back to the bottom, following new output."""
        self.follow = True
        self._follow_y = self._bottom_y()
        self.scroll_to(y=self._follow_y, animate=False)

    # ------------------------------------------------------------------------- search

    def search(self, query: str, *, backwards: bool = True) -> bool:
        """Go to the next line (up from the current match, or from the bottom) containing
        ``query``; whether one was found."""
        self.search_text = query
        if not query:
            self._match = None
            self.refresh()
            return False
        if self._match is not None:
            start = self._match[0]
        else:
            start = self.emulator.line_count if backwards else -1
        found = self.emulator.search(query, start, backwards=backwards)
        if found is None:
            return False
        column = self.emulator.text(found).lower().find(query.lower())
        self._match = (found, column, column + len(query))
        self.follow = False
        height = self.scrollable_content_region.height
        self.scroll_to(y=max(0, found + self._pad - height // 2), animate=False, immediate=True)
        self.refresh()
        return True

    def clear_search(self) -> None:
        self.search_text = ""
        self._match = None
        self.refresh()

    @property
    def match_line(self) -> int | None:
        """The line of the highlighted match."""
        return self._match[0] if self._match is not None else None

    # ------------------------------------------------------------------------- keys

    def watch_interactive(self, interactive: bool) -> None:
        self.set_class(interactive, "-interactive")
        self.refresh()

    async def on_key(self, event: events.Key) -> None:
        if not self.interactive:
            return
        event.stop()
        event.prevent_default()
        if event.key == EXIT_KEY:
            self.post_message(self.ExitInteractive(self))
            return
        data = key_bytes(event.key, event.character)
        if data:
            self.post_message(self.Typed(self, data))

    def on_paste(self, event: events.Paste) -> None:
        if self.interactive:
            event.stop()
            self.post_message(self.Typed(self, paste_bytes(event.text)))
