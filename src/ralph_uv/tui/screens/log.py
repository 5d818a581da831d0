"""A loop's log: the text of its output journal (escape sequences removed), scrollable, with
the newest at the bottom. ``r`` reads it again."""

from __future__ import annotations

import codecs
import re

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Log, Static

from ralph_uv.errors import RalphError
from ralph_uv.tui.screens.base import LoopScreen
from ralph_uv.tui.source import LoopKey
from ralph_uv.tui.widgets.key_bar import KeyBar

__all__ = ["LOG_BYTES", "LogScreen", "journal_text"]

LOG_BYTES = 4 * 1024 * 1024  # the log view reads at most the journal's last 4 MiB
_CONTROL = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC
    r"|\x1b[PX^_][^\x1b]*\x1b\\"  # DCS, SOS, PM, APC
    r"|\x1b[ -/]*[0-~]"  # other escapes
    r"|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"  # other controls (tab, newline, return stay)
)


def journal_text(data: bytes) -> str:
    """Terminal output as plain lines: escapes removed; a carriage return inside a line
    keeps what was written after it (as a terminal would show)."""
    text = codecs.decode(data, "utf-8", errors="replace")
    text = _CONTROL.sub("", text).replace("\r\n", "\n")
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


class LogScreen(LoopScreen):
    """The journal text of loop ``key``."""

    DEFAULT_CSS = """
    LogScreen #log-title {
        height: 1;
        padding: 0 1;
        background: $boost;
    }
    LogScreen Log {
        height: 1fr;
    }
    """

    BINDINGS = [
        Binding("escape,q", "back", "Back", tooltip="Back to where you were"),
        Binding("r", "reload", "Reload", tooltip="Read the journal again"),
        Binding("end", "bottom", "Bottom", show=False, tooltip="To the newest line"),
    ]

    def __init__(self, key: LoopKey) -> None:
        super().__init__()
        self.key = key
        self.loaded = 0  # bytes shown

    def compose(self) -> ComposeResult:
        yield Static(f"log of {self.key}", id="log-title")
        yield Log(id="log", max_lines=200_000)
        yield KeyBar()

    def on_mount(self) -> None:
        self.sub_title = f"log of {self.key}"
        self.query_one(Log).focus()
        self.action_reload()

    def current_loop(self) -> LoopKey | None:
        return self.key

    def action_back(self) -> None:
        self.dismiss()

    def action_bottom(self) -> None:
        self.query_one(Log).scroll_end(animate=False)

    def action_reload(self) -> None:
        """Read the journal again."""
        self._load()

    @work(exclusive=True, group="log")
    async def _load(self) -> None:
        title = self.query_one("#log-title", Static)
        title.update(f"log of {self.key}: reading…")
        try:
            data, start, end = await self._read()
        except RalphError as exc:
            title.update(f"log of {self.key}: {exc.message}")
            self.tui.say(f"log of {self.key}: {exc.message}", "error")
            return
        log = self.query_one(Log)
        log.clear()
        log.write(journal_text(data))
        log.scroll_end(animate=False)
        self.loaded = len(data)
        shown = "all" if start == 0 else f"the last {len(data) // 1024} KiB"
        title.update(f"log of {self.key}: {shown} of {end} bytes (r reloads)")

    async def _read(self) -> tuple[bytes, int, int]:
        feed = await self.source.open_feed(self.key)
        try:
            end = feed.output_next or 0
            start = position = max(0, end - LOG_BYTES)
            data = bytearray()
            while position < end:
                chunk = await feed.read_output(position)
                data += chunk.data
                if chunk.next <= position:
                    break
                position = chunk.next
            return bytes(data[: end - start]), start, end
        finally:
            await self.source.release_feed(self.key, feed)
