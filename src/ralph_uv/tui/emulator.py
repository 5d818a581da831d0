"""A terminal emulator for the agent's output: pyte, with scrollback, search and a time budget.

The agent may write far faster than a pure-Python emulator can parse (pyte manages a few
hundred KB/s; an agent can write 10 MB/s), so bytes are not parsed as they arrive:
:meth:`TerminalEmulator.write` only queues them, and :meth:`TerminalEmulator.flush` (called at
most ~30 times a second by the widget) parses as much as fits in a time budget.

Invariants:
- Bytes are parsed in the order written. When the queue holds more than can be parsed soon
  (``max_backlog``), the oldest part is skipped: parsing resumes at a line start (or the last
  full-screen clear) near the end, the skipped amount is counted, and one marker line goes into
  the scrollback for each run of skipping. So the screen always shows the latest output, at a
  bounded cost per frame and in bounded memory.
- Lines that scroll off the top of the screen (when no scroll region is set) go to a bounded
  scrollback, the oldest dropped first. They are kept compact and immutable (runs of text with
  their attributes), so a long scrollback costs little memory and the garbage collector has
  few containers to walk (pyte's own per-cell form made its full collections pause the UI).
- Line ``0`` is the oldest scrollback line, line ``len(history) + rows - 1`` the screen's last.
"""

from __future__ import annotations

import codecs
import itertools
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import pyte
from pyte.screens import Margins

from ralph_uv.client.terminal import replay_start

__all__ = [
    "BLANK",
    "DEFAULT_COLS",
    "DEFAULT_ROWS",
    "Attrs",
    "Run",
    "Runs",
    "TerminalEmulator",
    "line_runs",
]

DEFAULT_COLS = 120  # the runner's PTY size until someone resizes it
DEFAULT_ROWS = 40
DEFAULT_HISTORY = 5000
DEFAULT_BACKLOG = 256 * 1024
_SLICE = 2048
_MIN_BUDGET_BYTES = 1024
Attrs = tuple[Any, ...]
"""A cell's pyte attributes: fg, bg, bold, italics, underscore, strikethrough, reverse (and a
trailing ``True`` for a cell shown reversed on top: the cursor or a search match)."""
Run = tuple[str, Attrs]
Runs = tuple[Run, ...]
BLANK: Attrs = ("default", "default", False, False, False, False, False)
_PyteLine = dict[int, Any]  # pyte's line: column -> Char


def line_runs(line: _PyteLine, marks: tuple[int, int] | None = None) -> Runs:
    """A pyte line as runs of text sharing attributes (up to its last written cell);
    ``marks`` (columns ``[start, end)``) are shown reversed."""
    end = max(line) + 1 if line else 0
    if marks is not None:
        end = max(end, marks[1])
    runs: list[Run] = []
    text: list[str] = []
    current: Attrs = ()
    for x in range(end):
        char = line.get(x)
        if char is None:
            attrs, data = BLANK, " "
        else:
            attrs, data = char[1:8], char.data
        if marks is not None and marks[0] <= x < marks[1]:
            attrs = (*attrs, True)
        if attrs != current:
            if text:
                runs.append(("".join(text), current))
                text = []
            current = attrs
        text.append(data)
    if text:
        runs.append(("".join(text), current))
    return tuple(runs)


def _mark(runs: Runs, start: int, end: int) -> Runs:
    """``runs`` with the characters ``[start, end)`` shown reversed."""
    marked: list[Run] = []
    position = 0
    for text, attrs in runs:
        stop = position + len(text)
        cuts = sorted({0, len(text), *(max(0, min(len(text), c - position)) for c in (start, end))})
        for a, b in itertools.pairwise(cuts):
            inside = start <= position + a < end
            marked.append((text[a:b], (*attrs, True) if inside else attrs))
        position = stop
    return tuple(marked)
_SKIP_MARK = "\x1b[7m[ralph-uv: {} skipped here: output faster than the view can draw]\x1b[0m"


def _size(count: int) -> str:
    for unit, size in (("MB", 1 << 20), ("KB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


class _Screen(pyte.Screen):
    """pyte's screen, keeping the lines that scroll off the top (cheaper than HistoryScreen,
    which does work on every event)."""

    def __init__(self, cols: int, rows: int, history: deque[Runs]) -> None:
        super().__init__(cols, rows)
        self.history = history

    def index(self) -> None:
        top, bottom = self.margins or Margins(0, self.lines - 1)
        if self.cursor.y == bottom and top == 0:
            self.history.append(line_runs(self.buffer[0]))
        super().index()


class TerminalEmulator:
    """The screen and scrollback an agent's output draws. Not thread-safe; no I/O."""

    def __init__(
        self,
        cols: int = DEFAULT_COLS,
        rows: int = DEFAULT_ROWS,
        *,
        history: int = DEFAULT_HISTORY,
        max_backlog: int = DEFAULT_BACKLOG,
        budget: float = 0.008,
    ) -> None:
        self.history: deque[Runs] = deque(maxlen=history)
        self.screen = _Screen(cols, rows, self.history)
        self._stream = pyte.Stream(self.screen)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = bytearray()
        self.max_backlog = max_backlog
        self.budget = budget
        self._rate = 200_000.0  # bytes parsed per second, learnt as we go
        self.written = 0  # bytes given to write()
        self.parsed = 0  # bytes parsed
        self.skipped = 0  # bytes skipped because they came too fast
        self._skipping = False
        self.version = 0  # changes whenever what is shown may have changed

    # ------------------------------------------------------------------------- size

    @property
    def cols(self) -> int:
        return int(self.screen.columns)

    @property
    def rows(self) -> int:
        return int(self.screen.lines)

    def resize(self, cols: int, rows: int) -> None:
        """Change the emulated terminal's size (the agent redraws after its SIGWINCH).

        Fewer rows drop blank rows below the output first, then move the top lines into the
        scrollback, as a terminal does (pyte alone would drop the top lines)."""
        if (cols, rows) == (self.cols, self.rows):
            return
        screen = self.screen
        if rows < screen.lines:
            diff = screen.lines - rows
            used = [y for y in range(screen.lines) if self._row_text(y)]
            last = max([*used, screen.cursor.y])
            from_bottom = min(diff, screen.lines - 1 - last)
            from_top = diff - from_bottom
            buffer = screen.buffer
            for y in range(from_top):
                self.history.append(line_runs(buffer[y]))
            if from_bottom:  # pyte drops rows from the top: put the blank ones there
                for y in range(screen.lines - 1, from_bottom - 1, -1):
                    buffer[y] = buffer[y - from_bottom]
                for y in range(from_bottom):
                    buffer.pop(y, None)
            cursor_y = screen.cursor.y - from_top
            screen.resize(rows, cols)
            screen.cursor.y = max(0, min(rows - 1, cursor_y))
        else:
            screen.resize(rows, cols)
        self.version += 1

    def _row_text(self, row: int) -> str:
        line = self.screen.buffer.get(row)
        if not line:
            return ""
        return "".join(char.data for char in line.values()).strip()

    # ------------------------------------------------------------------------- input

    @property
    def pending(self) -> int:
        """Bytes written and not parsed yet."""
        return len(self._pending)

    def write(self, data: bytes) -> None:
        """Queue output bytes (cheap: parsing happens in :meth:`flush`)."""
        self.written += len(data)
        self._pending += data
        if len(self._pending) > 4 * self.max_backlog:
            # Even between two flushes the queue stays bounded.
            self._skip(len(self._pending) - self.max_backlog)

    def flush(self) -> bool:
        """Parse what fits in the time budget; whether anything shown may have changed."""
        if not self._pending:
            return False
        budget_bytes = max(_MIN_BUDGET_BYTES, int(self._rate * self.budget))
        if len(self._pending) > max(self.max_backlog, budget_bytes * 4):
            self._skip(len(self._pending) - budget_bytes)
        elif self._skipping and len(self._pending) <= budget_bytes:
            self._skipping = False
        started = time.perf_counter()
        deadline = started + self.budget
        done = 0
        while self._pending:
            piece = bytes(self._pending[:_SLICE])
            del self._pending[:_SLICE]
            self._stream.feed(self._decoder.decode(piece))
            done += len(piece)
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - started
        if elapsed > 0.0005 and done > 0:
            self._rate = 0.7 * self._rate + 0.3 * (done / elapsed)
        self.parsed += done
        self.version += 1
        return True

    def _skip(self, count: int) -> None:
        """Drop the oldest ``count`` pending bytes, resuming at a clean place after them."""
        tail = bytes(self._pending[count:])
        start = replay_start(tail, 1)  # a line start, or the last full-screen clear
        if start >= len(tail):
            start = 0
        dropped = count + start
        del self._pending[:dropped]
        self.skipped += dropped
        self._decoder.reset()
        if not self._skipping:
            self._skipping = True
            self._stream.feed("\r\n" + _SKIP_MARK.format(_size(dropped)) + "\r\n")

    def feed_now(self, data: bytes) -> None:
        """Parse ``data`` at once, whatever it costs (replays, tests)."""
        self.write(data)
        while self._pending:
            piece = bytes(self._pending[:_SLICE])
            del self._pending[:_SLICE]
            self._stream.feed(self._decoder.decode(piece))
            self.parsed += len(piece)
        self.version += 1

    def reset(self) -> None:
        """Forget the screen and the scrollback (a new replay follows)."""
        self.history.clear()
        self.screen.reset()
        self._pending.clear()
        self._decoder.reset()
        self._skipping = False
        self.version += 1

    # ------------------------------------------------------------------------- reading

    @property
    def line_count(self) -> int:
        """Scrollback lines plus screen rows."""
        return len(self.history) + self.rows

    @property
    def skipping(self) -> bool:
        """True while output comes faster than it can be shown."""
        return self._skipping

    def runs(self, index: int, marks: tuple[int, int] | None = None) -> Runs:
        """Line ``index`` (0 = oldest scrollback line) as runs; ``marks`` as in
        :func:`line_runs`."""
        count = len(self.history)
        if index < count:
            runs = self.history[index]
            return runs if marks is None else _mark(runs, *marks)
        return line_runs(self.screen.buffer[index - count], marks)

    def text(self, index: int) -> str:
        """Line ``index`` as plain text, trailing blanks removed."""
        count = len(self.history)
        if index < count:
            return "".join(text for text, _ in self.history[index]).rstrip()
        line = self.screen.buffer[index - count]
        if not line:
            return ""
        width = max(line) + 1
        return "".join(line[x].data if x in line else " " for x in range(width)).rstrip()

    def lines_text(self) -> Iterator[str]:
        """Every line's text, oldest first."""
        for index in range(self.line_count):
            yield self.text(index)

    def screen_text(self) -> str:
        """The screen (without scrollback) as text, one line per row."""
        start = len(self.history)
        return "\n".join(self.text(start + row) for row in range(self.rows))

    @property
    def cursor(self) -> tuple[int, int]:
        """``(x, line index)`` of the cursor."""
        return int(self.screen.cursor.x), len(self.history) + int(self.screen.cursor.y)

    def search(self, query: str, start: int, *, backwards: bool = True) -> int | None:
        """The index of the nearest line before (or after) ``start`` whose text contains
        ``query`` (case-insensitive), or ``None``."""
        needle = query.lower()
        if not needle:
            return None
        if backwards:
            indexes: range = range(min(start, self.line_count) - 1, -1, -1)
        else:
            indexes = range(max(start + 1, 0), self.line_count)
        for index in indexes:
            if needle in self.text(index).lower():
                return index
        return None

