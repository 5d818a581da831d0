"""``ralph-uv tui``: one live dashboard for the loops of this machine and of every remote.

The app owns the :class:`~ralph_uv.tui.source.LoopSource` and the actions that work from any
screen on "the current loop" (the one selected in the table, or the one a detail or log screen
is about): attach, stop, stop now, checkpoint, inject a prompt, edit the selected story's notes,
pull the loop's branch, open its log. Each action that fails says why in a notification.

Changes from the source are coalesced: the visible screen is redrawn at most
:data:`REFRESH_INTERVAL` apart, however many events arrive.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from textual.app import App, SuspendNotSupported
from textual.binding import Binding
from textual.timer import Timer

from ralph_uv.client.attach import attach
from ralph_uv.client.keys import DEFAULT_PREFIX, parse_prefix
from ralph_uv.client.loops import client_name
from ralph_uv.config import Config, load_config
from ralph_uv.errors import ErrorCode, RalphError, UserError
from ralph_uv.tasks import git_root
from ralph_uv.transports.base import Stream
from ralph_uv.tui.locations import Location, default_locations
from ralph_uv.tui.screens.base import LoopScreen
from ralph_uv.tui.screens.detail import DetailScreen
from ralph_uv.tui.screens.dialogs import ConfirmScreen, TextScreen
from ralph_uv.tui.screens.help import HelpScreen
from ralph_uv.tui.screens.log import LogScreen
from ralph_uv.tui.screens.loops import LoopsScreen
from ralph_uv.tui.screens.new_loop import NewLoopScreen
from ralph_uv.tui.source import LoopKey, LoopRow, LoopSource
from ralph_uv.tui.widgets.loops_table import LoopsTable
from ralph_uv.tui.widgets.terminal import TerminalView

__all__ = ["REFRESH_INTERVAL", "Notice", "RalphTui", "Severity"]

log = logging.getLogger("ralph_uv.tui")

REFRESH_INTERVAL = 0.1
Severity = Literal["information", "warning", "error"]


@dataclass(frozen=True, slots=True)
class Notice:
    """A notification the app showed."""

    severity: Severity
    message: str


class RalphTui(App[None]):
    """The dashboard. ``locations`` defaults to this machine's ralphd and every registered
    remote; ``tasks_root`` is the repository whose ``tasks/`` the new-loop form lists."""

    TITLE = "ralph-uv"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "Quit", tooltip="Quit the dashboard (the loops go on)"),
        Binding("ctrl+q", "quit", "Quit", show=False, tooltip="Quit the dashboard"),
        Binding("question_mark", "help", "Keys", tooltip="Every key, by screen"),
        Binding("n", "new_loop", "New", tooltip="Start a loop: task, where, agent, iterations"),
        Binding("a", "attach", "Attach",
                tooltip="Full-screen terminal of the loop; back here after detaching"),
        Binding("s", "stop", "Stop", tooltip="Stop the loop after its current iteration"),
        Binding("S", "stop_now", "Stop now", show=False,
                tooltip="Stop the loop at once (asks first)"),
        Binding("c", "checkpoint", "Checkpoint",
                tooltip="Let the iteration finish, then stop as checkpointed"),
        Binding("p", "inject", "Inject", tooltip="Add text to the next iteration's prompt"),
        Binding("e", "edit_notes", "Notes", show=False,
                tooltip="Edit the selected story's notes (saved to prd.json)"),
        Binding("b", "pull_branch", "Pull branch", show=False,
                tooltip="Bring a remote loop's branch into this repository"),
        Binding("l", "log", "Log", tooltip="The loop's output as text, scrollable"),
    ]

    def __init__(
        self,
        locations: Sequence[Location] | None = None,
        *,
        client: str | None = None,
        tasks_root: Path | None = None,
        open_loop: str | None = None,
        config: Config | None = None,
    ) -> None:
        super().__init__()
        self.client = client or client_name("tui")
        self.config = config
        self.tasks_root = tasks_root
        self.notices: deque[Notice] = deque(maxlen=200)
        self.source = LoopSource(
            list(locations) if locations is not None else default_locations(self.client),
            client=self.client,
            on_change=self._source_changed,
            on_notice=lambda message: self.say(message, "warning"),
        )
        self._open_loop = open_loop
        self._pulling: set[Path] = set()  # repositories a pull is writing into now
        self._refresh_timer: Timer | None = None
        self._source_closed = False

    # ------------------------------------------------------------------------- lifecycle

    async def on_mount(self) -> None:
        if self.config is None:
            try:
                self.config = load_config()
            except UserError as exc:
                self.say(f"config not read, using defaults: {exc.message}", "warning")
                self.config = Config()
        await self.push_screen(LoopsScreen())
        # The modules, widgets and styles loaded so far live as long as the app: out of the
        # collector's way, its full collections (which pause the UI) have far less to walk.
        gc.freeze()
        self.run_worker(self._start(), name="source", exit_on_error=False)

    async def _start(self) -> None:
        await self.source.start()
        self._refresh_views()
        if self._open_loop:
            row = self._find(self._open_loop)
            if row is None:
                self.say(f"no loop {self._open_loop!r} (loop id or task name)", "error")
            else:
                self.open_detail(row.key)

    def _find(self, ref: str) -> LoopRow | None:
        rows = self.source.rows()  # newest first: a task name means its latest loop
        return next(
            (r for r in rows if ref in (r.loop_id, str(r.key))), None
        ) or next((r for r in rows if r.task_name == ref), None)

    async def action_quit(self) -> None:
        await self._close_source()
        self.exit()

    async def on_unmount(self) -> None:
        await self._close_source()

    async def _close_source(self) -> None:
        if not self._source_closed:
            self._source_closed = True
            for screen in self.screen_stack:
                if isinstance(screen, DetailScreen):
                    await screen._release()
            await self.source.close()

    # ------------------------------------------------------------------------- refreshing

    def _source_changed(self) -> None:
        if self._refresh_timer is None and not self._source_closed:
            self._refresh_timer = self.set_timer(REFRESH_INTERVAL, self._refresh_views)

    def _refresh_views(self) -> None:
        self._refresh_timer = None
        if self._source_closed or not self.screen_stack:
            return
        screen = self.screen
        if isinstance(screen, LoopScreen) and screen.is_mounted:
            screen.refresh_loops(self.source.rows(), self.source.location_infos())

    # ------------------------------------------------------------------------- helpers

    def say(self, message: str, severity: Severity = "information") -> None:
        """Show a notification (and keep it in :attr:`notices`)."""
        self.notices.append(Notice(severity, message))
        if severity == "error":
            log.info("%s", message)
        self.notify(message, severity=severity, markup=False,
                    timeout=8.0 if severity == "error" else 4.0)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self.run_worker(self._guard(coro), name=name, exit_on_error=False)

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except RalphError as exc:
            self.say(exc.message, "error")
        except Exception as exc:
            log.exception("a TUI action failed")
            self.say(f"internal error: {exc!r}; please report it", "error")

    def _current(self) -> LoopKey | None:
        screen = self.screen
        key = screen.current_loop() if isinstance(screen, LoopScreen) else None
        if key is None:
            self.say("no loop selected: pick one in the table first", "warning")
        return key

    def _row(self, key: LoopKey) -> LoopRow:
        row = self.source.row(key)
        if row is None:
            raise UserError(f"loop {key} is not known", code=ErrorCode.LOOP_NOT_FOUND)
        return row

    def open_detail(self, key: LoopKey) -> None:
        """Show the loop ``key`` in detail."""
        self.push_screen(DetailScreen(key))

    # ------------------------------------------------------------------------- actions

    def action_help(self) -> None:
        """Every key, by screen."""
        sections: list[tuple[str, Any]] = [("Everywhere (on the current loop)", self.BINDINGS)]
        for title, kind in (("Loops", LoopsScreen), ("Loop detail", DetailScreen),
                            ("Log", LogScreen)):
            sections.append((title, kind.BINDINGS))
        sections.append(("Loops table", LoopsTable.BINDINGS))
        sections.append(("Agent terminal", TerminalView.BINDINGS))
        self.push_screen(HelpScreen(sections))

    def action_new_loop(self) -> None:
        """Start a loop: task, where, agent, iterations, base branch."""
        root = self.tasks_root or git_root()
        config = self.config or Config()
        location = self.source.locations[0].name
        key = self.screen.current_loop() if isinstance(self.screen, LoopScreen) else None
        if key is not None:
            location = key.location

        def started(key: LoopKey | None) -> None:
            if key is not None:
                self.open_detail(key)

        self.push_screen(
            NewLoopScreen(root, max_iterations=config.max_iterations, location=location),
            started,
        )

    def action_stop(self) -> None:
        """Stop the loop after its current iteration."""
        key = self._current()
        if key is not None:
            self._spawn(self._stop(key, now=False), "stop")

    def action_stop_now(self) -> None:
        """Stop the loop at once (asks first)."""
        key = self._current()
        if key is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._spawn(self._stop(key, now=True), "stop")

        self.push_screen(ConfirmScreen(f"Stop {key} now? Its agent is stopped at once."),
                         answered)

    async def _stop(self, key: LoopKey, *, now: bool) -> None:
        before = self.source.row(key)
        if before is not None and before.status.is_terminal:
            raise UserError(f"{key} has already ended: {before.status.value}",
                            code=ErrorCode.BAD_STATE)
        record = await self.source.stop(key, now=now)
        if record.status.is_terminal and not now:
            self.say(f"{key} had already ended: {record.status.value}", "warning")
        else:
            self.say(f"{key}: " + ("stopping now" if now else "stops after this iteration"))

    def action_checkpoint(self) -> None:
        """Let the iteration finish, then stop as checkpointed."""
        key = self._current()
        if key is not None:
            self._spawn(self._checkpoint(key), "checkpoint")

    async def _checkpoint(self, key: LoopKey) -> None:
        before = self.source.row(key)
        if before is not None and before.status.is_terminal:
            raise UserError(f"{key} has already ended: {before.status.value}",
                            code=ErrorCode.BAD_STATE)
        record = await self.source.checkpoint(key)
        if record.status.is_terminal:
            self.say(f"{key} has already ended: {record.status.value}", "warning")
        else:
            self.say(f"{key}: checkpoints after this iteration")

    def action_inject(self) -> None:
        """Add text to the prompt of the loop's next iteration."""
        key = self._current()
        if key is None:
            return

        def typed(text: str | None) -> None:
            if text is not None:
                self._spawn(self._inject(key, text), "inject")

        self.push_screen(TextScreen(f"Prompt for the next iteration of {key}"), typed)

    async def _inject(self, key: LoopKey, text: str) -> None:
        await self.source.inject(key, text)
        self.say(f"{key}: prompt queued for the next iteration")

    def action_edit_notes(self) -> None:
        """Edit the notes of the selected story (written back to prd.json)."""
        key = self._current()
        if key is not None:
            self._spawn(self._edit_notes(key), "notes")

    async def _edit_notes(self, key: LoopKey) -> None:
        row = self._row(key)
        screen = self.screen
        story_id = screen.current_story() if isinstance(screen, LoopScreen) else row.story
        snapshot = await self.source.read_task(key, row.story)
        if snapshot.prd is None:
            raise UserError(f"prd.json of {key} cannot be read: {snapshot.error}")
        view = snapshot.story(story_id) if story_id else None
        if view is None:
            raise UserError(f"{key}: no story selected (the loop has no current story)")

        self._notes_editor(key, view.story.id, f"Notes of {view.story.id} ({view.story.title})",
                           view.story.notes)

    def _notes_editor(self, key: LoopKey, story_id: str, title: str, text: str) -> None:
        def edited(typed: str | None) -> None:
            if typed is not None:
                self._spawn(self._save_notes(key, story_id, typed), "notes")

        self.push_screen(TextScreen(title, text, send_label="Save"), edited)

    async def _save_notes(self, key: LoopKey, story_id: str, text: str) -> None:
        try:
            await self.source.save_notes(key, story_id, text)
        except RalphError as exc:
            # The text typed is not lost: the editor comes back with it, saying why.
            self.say(f"{story_id}: notes not saved: {exc.message}", "error")
            self._notes_editor(key, story_id, f"Notes of {story_id}: NOT SAVED "
                               f"({exc.message}); copy them, or try again", text)
            return
        where = "" if self.source.location(key.location).local_files else f" on {key.location}"
        self.say(f"{story_id}: notes saved to prd.json{where}")
        for screen in self.screen_stack:
            if isinstance(screen, DetailScreen) and screen.key == key:
                screen.reload_task()

    def action_pull_branch(self) -> None:
        """Bring a remote loop's branch into this repository."""
        key = self._current()
        if key is not None:
            self._spawn(self._pull_branch(key), "pull")

    async def _pull_branch(self, key: LoopKey) -> None:
        row = self._row(key)
        if self.source.location(key.location).local_files:
            branch = row.branch or "its branch"
            self.say(f"{key} runs on this machine: {branch} is already in {row.task_dir}'s "
                     "repository; nothing to pull")
            return
        repo = self.tasks_root
        if repo is None:
            repo = await asyncio.to_thread(git_root, None)
        if repo in self._pulling:
            raise UserError(f"a pull into {repo} is under way; wait for it to finish",
                            code=ErrorCode.BAD_STATE)
        self._pulling.add(repo)
        try:
            self.say(f"pulling the branch of {key} into {repo}…")
            branch, sha = await self.source.pull_branch(
                key, repo, on_notice=lambda text: self.say(text))
        finally:
            self._pulling.discard(repo)
        self.say(f"pulled {branch} at {sha[:12]} from {key.location}")

    def action_log(self) -> None:
        """The loop's output as text, scrollable."""
        key = self._current()
        if key is not None:
            self.push_screen(LogScreen(key))

    def action_attach(self) -> None:
        """Leave the dashboard for the loop's full-screen terminal; back after detaching."""
        key = self._current()
        if key is not None:
            self._spawn(self._attach_loop(key), "attach")

    async def _attach_loop(self, key: LoopKey) -> None:
        row = self._row(key)
        if row.status.is_terminal:
            raise UserError(f"{key} has ended ({row.status.value}); l shows its log",
                            code=ErrorCode.BAD_STATE)
        self.source.daemon(key.location)  # says so now when the location is unreachable
        config = self.config or Config()
        try:
            prefix = parse_prefix(config.attach_prefix)
        except UserError:
            prefix = DEFAULT_PREFIX

        async def connect(loop_id: str | None) -> Stream:
            return await self.source.daemon(key.location).connect_loop(loop_id or key.loop_id)

        if self.is_headless:
            raise UserError("attach needs a terminal; this dashboard runs without one")
        try:
            with self.batch_update(), self.suspend():
                result = await attach(connect, client=client_name("attach"), prefix=prefix)
        except SuspendNotSupported as exc:
            raise UserError(f"attach is not possible here: {exc}") from exc
        if result.detached:
            self.say(f"detached from {key}; the loop goes on")
        else:
            status = result.status.value if result.status else "gone"
            self.say(f"{key} {status}" + (f": {result.reason}" if result.reason else ""))

