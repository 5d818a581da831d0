"""What every screen about loops has: the app's source, the loop it is about, a status bar
kept up to date, and a hook the app calls when the loops have changed."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.reactive import Reactive
from textual.screen import Screen
from textual.widget import Widget

from ralph_uv.tui.locations import LocationInfo
from ralph_uv.tui.source import LoopKey, LoopRow, LoopSource

if TYPE_CHECKING:
    from ralph_uv.tui.app import RalphTui

__all__ = ["LoopScreen"]


class LoopScreen(Screen[None]):
    """A screen that shows loops; the app refreshes it when they change."""

    # Textual repaints the whole screen whenever the focus moves; the widgets that gain and
    # lose it restyle themselves anyway, and a full repaint is the dearest frame there is
    # (it made focus changes miss the key-press target under load).
    focused: Reactive[Widget | None] = Reactive(None, repaint=False)

    @property
    def tui(self) -> RalphTui:
        return cast("RalphTui", self.app)

    @property
    def source(self) -> LoopSource:
        return self.tui.source

    def current_loop(self) -> LoopKey | None:
        """The loop the app's actions apply to."""
        return None

    def current_story(self) -> str | None:
        """The story the notes editor opens (the highlighted one, else the loop's current)."""
        key = self.current_loop()
        row = self.source.row(key) if key is not None else None
        return row.story if row is not None else None

    def refresh_loops(self, rows: list[LoopRow], infos: list[LocationInfo]) -> None:
        """The loops (or the locations) have changed."""

    def on_screen_resume(self) -> None:
        # A screen is resumed as it is pushed, before its widgets exist: they draw on mount.
        if self.is_mounted:
            self.refresh_loops(self.source.rows(), self.source.location_infos())
