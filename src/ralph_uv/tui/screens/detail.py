"""One loop in detail: its stories (with per-criterion progress), the highlighted story's
description, notes and progress.txt entries, the loop's events, and the agent's live terminal
(scrollback, search, interactive mode).

The screen holds a feed of the loop for as long as it is open; the feed resumes by itself after
a dropped connection, so the terminal and the events go on without a gap or a repeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from rich.text import Text
from textual import work
from textual.actions import SkipAction
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.timer import Timer
from textual.widgets import Input, Static

from ralph_uv.client.loops import LoopEvent
from ralph_uv.errors import RalphError
from ralph_uv.tui.feed import FeedState, LoopFeed
from ralph_uv.tui.keymap import EXIT_KEY_LABEL
from ralph_uv.tui.locations import LocationInfo
from ralph_uv.tui.screens.base import LoopScreen
from ralph_uv.tui.source import LoopKey, LoopRow
from ralph_uv.tui.taskdata import TaskSnapshot, progress_entries
from ralph_uv.tui.widgets.events import EventsView
from ralph_uv.tui.widgets.key_bar import KeyBar
from ralph_uv.tui.widgets.loops_table import duration, status_text
from ralph_uv.tui.widgets.status_bar import StatusBar
from ralph_uv.tui.widgets.stories import StoriesView
from ralph_uv.tui.widgets.terminal import TerminalView

__all__ = ["REPLAY_BYTES", "DetailScreen"]

log = logging.getLogger("ralph_uv.tui.detail")

REPLAY_BYTES = 48 * 1024  # journal tail parsed to draw the first screen (pyte is slow)
_RELOAD_ON = frozenset(
    {"iteration_started", "iteration_finished", "story_passed", "loop_finished", "state_change"}
)


class DetailScreen(LoopScreen):
    """The loop ``key`` in detail."""

    DEFAULT_CSS = """
    DetailScreen #summary {
        background: $boost;
    }
    DetailScreen #left {
        width: 2fr;
        min-width: 30;
    }
    DetailScreen #right {
        width: 3fr;
    }
    DetailScreen #story {
        height: 1fr;
        border: round $panel-lighten-2;
        border-title-color: $text-accent;
        padding: 0 1;
    }
    DetailScreen #story:focus {
        border-title-style: bold reverse;
    }
    DetailScreen TerminalView {
        height: 1fr;
    }
    DetailScreen #search {
        height: 1;
        border: none;
        padding: 0 1;
        background: $boost;
    }
    DetailScreen #search:focus {
        background: $accent 30%;
    }
    """

    BINDINGS = [
        Binding("escape", "back", "Back", tooltip="Back to the loops"),
        Binding("i", "interactive", "Interactive",
                tooltip="Type into the agent's terminal (Ctrl-] gives it back)"),
        Binding("slash", "search", "Search", tooltip="Search the terminal's scrollback"),
        Binding("n", "search_next", "Next match", show=False,
                tooltip="Next (older) match of the search; without a search: new loop"),
        Binding("N", "search_previous", "Previous match", show=False,
                tooltip="Previous (newer) match of the search"),
        Binding("t", "focus_terminal", "Terminal", show=False,
                tooltip="Focus the terminal (to scroll it)"),
        Binding("r", "resume", "Resume", show=False, tooltip="Resume a stalled loop"),
    ]

    def __init__(self, key: LoopKey) -> None:
        super().__init__()
        self.key = key
        self.feed: LoopFeed | None = None
        self.snapshot: TaskSnapshot | None = None
        self._unwatch: list[Callable[[], None]] = []
        self._reload_pending = False
        self._released = False
        self._story_text = Text()
        self._ticker: Timer | None = None

    def compose(self) -> ComposeResult:
        yield StatusBar(id="summary")
        with Horizontal():
            with Vertical(id="left"):
                yield StoriesView(id="stories")
                with VerticalScroll(id="story"):
                    yield Static(id="story-text")
            with Vertical(id="right"):
                yield TerminalView(id="terminal")
                yield Input(placeholder="/ searches the terminal (Enter: find, Esc: back)",
                            id="search")
                yield EventsView(id="events")
        yield StatusBar(id="status-bar")
        yield KeyBar()

    @property
    def terminal(self) -> TerminalView:
        return self.query_one(TerminalView)

    @property
    def stories(self) -> StoriesView:
        return self.query_one(StoriesView)

    def on_mount(self) -> None:
        self.sub_title = str(self.key)
        self.query_one("#story").border_title = "Story"
        self.terminal.border_title = "Agent terminal"
        self.terminal.focus()
        self._show_summary()
        self._ticker = self.set_interval(1.0, self._show_summary)
        self._connect()
        self.reload_task()

    def on_screen_suspend(self) -> None:
        if self._ticker is not None:
            self._ticker.pause()

    def on_screen_resume(self) -> None:
        if self._ticker is not None:
            self._ticker.resume()
        super().on_screen_resume()

    def current_loop(self) -> LoopKey | None:
        return self.key

    def current_story(self) -> str | None:
        return self.stories.selected_story or super().current_story()

    async def on_unmount(self) -> None:
        await self._release()

    async def _release(self) -> None:
        if self._released:
            return
        self._released = True
        for stop in self._unwatch:
            stop()
        feed, self.feed = self.feed, None
        if feed is not None:
            if feed.interactive:
                try:
                    await feed.set_interactive(False)
                except RalphError as exc:
                    log.info("interactive mode not given back: %s", exc.message)
            await self.source.release_feed(self.key, feed)

    # ------------------------------------------------------------------------- feed

    @work(exclusive=True, group="connect")
    async def _connect(self) -> None:
        try:
            feed = await self.source.open_feed(self.key)
        except RalphError as exc:
            self.tui.say(f"{self.key}: {exc.message}", "error")
            self._show_mode()
            return
        if self._released:
            await self.source.release_feed(self.key, feed)
            return
        self.feed = feed
        events = self.query_one(EventsView)
        for event in list(feed.events):
            events.add(event)
        self._unwatch.append(feed.add_event_sink(self._on_loop_event))
        try:
            self._unwatch.append(await feed.watch_output(self.terminal.write, REPLAY_BYTES))
        except RalphError as exc:
            self.tui.say(f"{self.key}: output not replayed: {exc.message}", "warning")
            self._unwatch.append(feed.add_output_sink(self.terminal.write))
        self.terminal.flush_all()
        self._show_summary()
        self._show_mode()

    def _on_loop_event(self, event: LoopEvent) -> None:
        self.query_one(EventsView).add(event)
        if event.type in _RELOAD_ON:
            self.reload_task()

    def refresh_loops(self, rows: list[LoopRow], infos: list[LocationInfo]) -> None:
        self._show_summary()
        self._show_mode()

    # ------------------------------------------------------------------------- task files

    def reload_task(self) -> None:
        """Read prd.json and progress.txt again (after events, after a notes edit)."""
        if not self._reload_pending:
            self._reload_pending = True
            self._load_task()

    @work(exclusive=True, group="task")
    async def _load_task(self) -> None:
        await asyncio.sleep(0.05)  # a burst of events gives one read
        self._reload_pending = False
        row = self.source.row(self.key)
        if row is None:
            return
        text = self.query_one("#story-text", Static)
        current = row.story if row.status.is_active else None
        snapshot = await self.source.read_task(self.key, current)
        if snapshot.error is not None:
            if self.snapshot is not None and self.snapshot.prd is not None:
                # Keep showing what was read last; say why it is not newer.
                self.tui.say(f"{self.key}: prd.json not read again ({snapshot.error}); "
                             "showing the last one read", "warning")
                return
            self.snapshot = snapshot
            text.update(Text(f"prd.json cannot be read: {snapshot.error}", style="red"))
            return
        self.snapshot = snapshot
        self.stories.show(snapshot)
        self._show_story(self.stories.selected_story)

    def on_stories_view_highlighted(self, event: StoriesView.Highlighted) -> None:
        self._show_story(event.story_id)

    def _show_story(self, story_id: str | None) -> None:
        snapshot = self.snapshot
        view = snapshot.story(story_id) if snapshot and story_id else None
        text = self.query_one("#story-text", Static)
        panel = self.query_one("#story")
        if view is None or snapshot is None:
            self._story_text = Text()
            text.update("")
            return
        story = view.story
        panel.border_title = f"{story.id} · {view.state.value}"
        parts: list[Text] = [Text(story.title, style="bold")]
        if story.description:
            parts.append(Text(story.description))
        parts.append(Text("Notes", style="bold underline"))
        parts.append(Text(story.notes or "(none; press e to write some)",
                          style="" if story.notes else "dim"))
        entries = progress_entries(snapshot.progress, story.id)
        parts.append(Text(f"progress.txt ({len(entries)})", style="bold underline"))
        for entry in entries or ["(no entries about this story yet)"]:
            parts.append(Text(entry, style="" if entries else "dim"))
        self._story_text = Text("\n").join(parts)
        text.update(self._story_text)

    @property
    def story_text(self) -> str:
        """What the story panel says, as plain text."""
        return self._story_text.plain

    # ------------------------------------------------------------------------- display

    def _show_summary(self) -> None:
        row = self.source.row(self.key)
        summary = self.query_one("#summary", StatusBar)
        if row is None:
            summary.left = Text(f"{self.key}: not known (yet)", style="dim")
            return
        now = time.time()
        line = Text()
        line.append(row.task_name, style="bold")
        line.append(f"  {row.loop_id} @ {row.location}  ", style="dim")
        line.append_text(status_text(row))
        line.append(f"  iter {row.iteration}/{row.max_iterations}")
        line.append(f"  story {row.story or '-'}")
        line.append(f"  {row.stories_done}/{row.stories_total} done")
        line.append(f"  {row.agent}")
        times = Text(f"ran {duration(row.run_time(now))}", style="dim")
        idle = row.idle_time(now)
        if idle is not None:
            times.append(f" · output {duration(idle)} ago")
        summary.left = line
        summary.right = times

    def _show_mode(self) -> None:
        bar = self.query_one("#status-bar", StatusBar)
        feed = self.feed
        if feed is None:
            bar.left = Text("not connected", style="red")
            return
        left = Text()
        if feed.status is FeedState.LIVE:
            left.append("● live", style="green")
        elif feed.status is FeedState.ENDED:
            left.append("■ ended", style="dim")
        else:
            left.append(f"⟳ {feed.status.value}", style="yellow")
            if feed.error:
                left.append(f" ({feed.error})", style="dim")
        left.append("  │  ", style="dim")
        if feed.interactive:
            left.append("INTERACTIVE: you hold it", style="bold reverse yellow")
            left.append(f" · {EXIT_KEY_LABEL} gives it back")
        elif feed.holder:
            left.append(f"observe · {feed.holder} holds interactive mode", style="yellow")
        elif feed.state is not None and not feed.state.interactive:
            left.append("observe · this agent has no terminal (p injects a prompt)", style="dim")
        else:
            left.append("observe · i to type into the agent", style="dim")
        if self.terminal.emulator.skipping:
            left.append("  │  output faster than the view: showing the latest", style="yellow")
        bar.left = left
        self.terminal.interactive = feed.interactive

    # ------------------------------------------------------------------------- interactive

    def action_interactive(self) -> None:
        """Take interactive mode (keys go to the agent) or give it back."""
        self._toggle_interactive()

    @work(exclusive=True, group="interactive")
    async def _toggle_interactive(self) -> None:
        feed = self.feed
        if feed is None:
            self.tui.say(f"{self.key}: not connected to the loop yet", "error")
            return
        try:
            if feed.interactive:
                await feed.set_interactive(False)
                self.tui.say("observe mode: keys are not sent to the agent")
            else:
                await feed.set_interactive(True)
                cols, rows = self.terminal.fitting_size
                await feed.resize(cols, rows)
                self.terminal.resize_terminal(cols, rows)
                self.terminal.focus()
                self.tui.say(f"interactive mode: keys go to the agent; {EXIT_KEY_LABEL} leaves")
        except RalphError as exc:
            self.tui.say(exc.message, "error")
        self._show_mode()

    def on_terminal_view_typed(self, event: TerminalView.Typed) -> None:
        if self.feed is not None:
            self.feed.send_keys(event.data)

    def on_terminal_view_exit_interactive(self, event: TerminalView.ExitInteractive) -> None:
        if self.feed is not None and self.feed.interactive:
            self._toggle_interactive()

    def action_resume(self) -> None:
        """Resume a stalled loop."""
        self._resume()

    @work(group="resume")
    async def _resume(self) -> None:
        if self.feed is None:
            self.tui.say(f"{self.key}: not connected to the loop yet", "error")
            return
        try:
            await self.feed.resume()
            self.tui.say(f"{self.key}: resumed")
        except RalphError as exc:
            self.tui.say(exc.message, "error")

    # ------------------------------------------------------------------------- search

    def action_search(self) -> None:
        """Search the terminal's scrollback."""
        self.query_one("#search", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "search":
            return
        if not self.terminal.search(event.value, backwards=True):
            self.tui.say(f"not found: {event.value}", "warning")
        self.terminal.focus()

    def action_search_next(self) -> None:
        """The previous (older) match."""
        self._search_again(backwards=True)

    def action_search_previous(self) -> None:
        """The next (newer) match."""
        self._search_again(backwards=False)

    def _search_again(self, *, backwards: bool) -> None:
        text = self.terminal.search_text
        if not text:
            raise SkipAction()  # no search: n is the app's "new loop"
        if not self.terminal.search(text, backwards=backwards):
            self.tui.say(f"no more matches for {text}", "warning")

    def action_focus_terminal(self) -> None:
        self.terminal.focus()

    def action_back(self) -> None:
        """Back to the loops (interactive mode is given back)."""
        search = self.query_one("#search", Input)
        if search.has_focus:
            self.terminal.clear_search()
            self.terminal.focus()
            return
        self.dismiss()
