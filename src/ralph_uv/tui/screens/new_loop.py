"""``n``: start a loop. Pick a task (with its stories done/total), where it runs (this machine
or a remote), the agent, the iteration limit and the base branch; the screen dismisses with
the new loop's key, and the app opens its detail.

On a remote, the loop runs on a copy of the code like ``ralph-uv run --on``: the base branch is
sent as a git bundle (or the remote fetches it from the origin), and the loop works in a
checkout there; ``b`` later brings its branch back."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, cast

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select

from ralph_uv.client.loops import RunOptions
from ralph_uv.client.remote_run import SyncMode, plan_remote_run
from ralph_uv.errors import RalphError, UserError
from ralph_uv.tasks import TaskInfo, TaskRef, list_tasks
from ralph_uv.tui.source import LoopKey

if TYPE_CHECKING:
    from ralph_uv.tui.app import RalphTui

__all__ = ["NewLoopScreen"]

log = logging.getLogger("ralph_uv.tui.new_loop")

_DEFAULT_AGENT = "(configured default)"


class NewLoopScreen(ModalScreen[LoopKey | None]):
    """The new-loop form; dismisses with the started loop's key, or ``None``."""

    DEFAULT_CSS = """
    NewLoopScreen {
        align: center middle;
    }
    NewLoopScreen > Vertical {
        width: 80;
        max-width: 95%;
        height: auto;
        border: thick $accent;
        background: $surface;
        padding: 1 2;
    }
    NewLoopScreen Label {
        margin-top: 1;
    }
    NewLoopScreen .buttons {
        height: auto;
        align-horizontal: right;
        margin-top: 1;
    }
    NewLoopScreen Button {
        margin-left: 2;
    }
    """

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "start", "Start"),
    ]

    def __init__(self, tasks_root: Path, *, max_iterations: int, location: str) -> None:
        super().__init__()
        self.tasks_root = tasks_root
        self._max_iterations = max_iterations
        self._location = location
        self.tasks: list[TaskInfo] = []
        self.agent_names: list[str] = [_DEFAULT_AGENT]  # as listed, default first
        self._starting = False

    @property
    def tui(self) -> RalphTui:
        return cast("RalphTui", self.app)

    def compose(self) -> ComposeResult:
        try:
            self.tasks = list_tasks(self.tasks_root)
        except (RalphError, OSError) as exc:
            self.tui.say(f"tasks not listed: {exc}", "error")
        locations = [loc.name for loc in self.tui.source.locations]
        with Vertical():
            yield Label(f"New loop · tasks under {self.tasks_root / 'tasks'}", id="title")
            yield Label("Task")
            yield Select(
                [(task.label, task.name) for task in self.tasks],
                prompt="pick a task" if self.tasks else "no tasks: create one with ralph-uv init",
                id="task",
            )
            yield Label("Where")
            yield Select([(name, name) for name in locations], value=self._location,
                         allow_blank=False, id="location")
            yield Label("Agent")
            yield Select([(_DEFAULT_AGENT, _DEFAULT_AGENT)], value=_DEFAULT_AGENT,
                         allow_blank=False, id="agent")
            yield Label("Max iterations")
            yield Input(str(self._max_iterations), type="integer", id="max-iterations")
            yield Label("Base branch")
            yield Input(placeholder="(default: the branch checked out now)", id="base-branch")
            yield Label("Code sent to a remote by")
            yield Select([("git bundle, over the connection", "bundle"),
                          ("push to origin; the remote fetches", "origin")],
                         value="bundle", allow_blank=False, id="sync")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Start (Ctrl-S)", id="start", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#task", Select).focus()
        self._location_chosen(self._location)

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "location" and isinstance(event.value, str):
            self._location_chosen(event.value)

    def _location_chosen(self, location: str) -> None:
        self.query_one("#sync", Select).disabled = self._local_files(location)
        self._load_agents(location)

    def _local_files(self, location: str) -> bool:
        try:
            return self.tui.source.location(location).local_files
        except UserError:
            return True

    @work(exclusive=True, group="agents")
    async def _load_agents(self, location: str) -> None:
        select: Select[str] = self.query_one("#agent", Select)
        try:
            agents = await self.tui.source.agents(location)
        except RalphError as exc:
            self.tui.say(f"agents of {location} not listed: {exc.message}", "warning")
            agents = []
        names = [_DEFAULT_AGENT, *(a.name for a in agents if a.installed)]
        select.set_options([(name, name) for name in names])
        self.agent_names = names
        select.value = _DEFAULT_AGENT

    # ------------------------------------------------------------------------- actions

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.action_start()
        else:
            self.action_cancel()

    def action_cancel(self) -> None:
        if self._starting:
            # Leaving now would cancel a start that may already be under way over there.
            self.tui.say("the loop is being started; this form closes when it has", "warning")
            return
        self.dismiss(None)

    def action_start(self) -> None:
        """Start the loop as filled in (once: a second press while starting is ignored)."""
        if self._starting:
            self.tui.say("the loop is being started already", "warning")
            return
        self._starting = True
        self.query_one("#start", Button).disabled = True
        self._start()

    def _form(self) -> tuple[TaskInfo, str, RunOptions, SyncMode]:
        task_name = self.query_one("#task", Select).value
        task = next((t for t in self.tasks if t.name == task_name), None)
        if task is None:
            raise UserError("pick a task first (the list shows tasks/ of this repository)")
        if task.error is not None:
            raise UserError(f"task {task.name}: its prd.json is not valid: {task.error}")
        location = str(self.query_one("#location", Select).value)
        agent = str(self.query_one("#agent", Select).value)
        text = self.query_one("#max-iterations", Input).value.strip()
        try:
            max_iterations = int(text) if text else None
        except ValueError:
            raise UserError(f"max iterations must be a whole number, not {text!r}") from None
        if max_iterations is not None and max_iterations < 1:
            raise UserError("max iterations must be at least 1")
        branch = self.query_one("#base-branch", Input).value.strip() or None
        options = RunOptions(
            agent=None if agent == _DEFAULT_AGENT else agent,
            max_iterations=max_iterations,
            base_branch=branch,
        )
        sync: SyncMode = "origin" if self.query_one("#sync", Select).value == "origin" \
            else "bundle"
        return task, location, options, sync

    @work(group="start", exit_on_error=False)
    async def _start(self) -> None:
        try:
            await self._start_loop()
        finally:
            self._starting = False
            if self.is_mounted:
                self.query_one("#start", Button).disabled = False

    async def _start_loop(self) -> None:
        source = self.tui.source
        try:
            task, location, options, sync = self._form()
            if source.location(location).local_files:
                key = await source.start_loop(
                    location, task.dir.resolve(), task_name=task.name, options=options
                )
            else:
                ref = TaskRef(task.name, task.dir.resolve(), self.tasks_root.resolve())
                plan = await asyncio.to_thread(plan_remote_run, location, ref, sync=sync,
                                               base_branch=options.base_branch)
                self.tui.say(f"sending {plan.branch} to {location} ({sync})…")
                key = await source.start_remote_loop(plan, options, on_notice=self.tui.say)
        except RalphError as exc:
            self.tui.say(f"not started: {exc.message}", "error")
            return
        except Exception as exc:  # a bug, not bad input: the dashboard goes on
            log.exception("starting a loop failed")
            self.tui.say(f"not started: internal error {exc!r}; please report it", "error")
            return
        self.tui.say(f"started {task.name} on {location}: {key.loop_id}")
        self.dismiss(key)
