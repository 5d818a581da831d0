"""The task's stories, each with its state (done, current, blocked, pending) and the progress
of its acceptance criteria; highlighting one posts :class:`StoriesView.Highlighted`."""

from __future__ import annotations

from rich.text import Text
from textual.message import Message
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from ralph_uv.tui.taskdata import StoryState, StoryView, TaskSnapshot

__all__ = ["STATE_MARK", "StoriesView"]

STATE_MARK: dict[StoryState, tuple[str, str]] = {
    StoryState.DONE: ("✓", "green"),
    StoryState.CURRENT: ("▶", "bold yellow"),
    StoryState.BLOCKED: ("⊘", "red"),
    StoryState.PENDING: ("·", "dim"),
}


def _prompt(view: StoryView) -> Text:
    mark, style = STATE_MARK[view.state]
    story = view.story
    text = Text()
    text.append(f"{mark} ", style=style)
    text.append(story.id, style="bold" if view.state is StoryState.CURRENT else "")
    text.append(f" {story.title}")
    if view.criteria_total:
        text.append(f"  [{view.criteria_done}/{view.criteria_total}]", style="cyan")
    if view.state is StoryState.BLOCKED and view.blockers:
        text.append(f"  waits for {', '.join(view.blockers)}", style="red")
    for criterion in story.acceptance_criteria:
        done = criterion.passes or view.state is StoryState.DONE
        text.append("\n    ")
        text.append("✓ " if done else "○ ", style="green" if done else "dim")
        text.append(criterion.description, style="" if done else "dim")
    return text


class StoriesView(OptionList):
    """One option per story (its criteria below it)."""

    DEFAULT_CSS = """
    StoriesView {
        height: 1fr;
        border: round $panel-lighten-2;
        border-title-color: $text-accent;
    }
    StoriesView:focus {
        border: round $panel-lighten-2;  /* the same border: a new one means a new layout */
        border-title-style: bold reverse;
        background-tint: $foreground 3%;
    }
    """

    class Highlighted(Message):
        """A story was highlighted (by the cursor or the mouse)."""

        def __init__(self, view: StoriesView, story_id: str) -> None:
            super().__init__()
            self.view = view
            self.story_id = story_id

        @property
        def control(self) -> StoriesView:
            return self.view

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = "Stories"
        self._ids: list[str] = []

    @property
    def story_ids(self) -> list[str]:
        return list(self._ids)

    @property
    def selected_story(self) -> str | None:
        index = self.highlighted
        if index is None or not 0 <= index < len(self._ids):
            return None
        return self._ids[index]

    def show(self, snapshot: TaskSnapshot) -> None:
        """Show the task's stories, keeping the highlighted one (else the current one)."""
        keep = self.selected_story
        self.clear_options()
        self._ids = [view.story.id for view in snapshot.stories]
        self.add_options(Option(_prompt(view), id=view.story.id) for view in snapshot.stories)
        done = sum(1 for v in snapshot.stories if v.state is StoryState.DONE)
        self.border_title = f"Stories {done}/{len(snapshot.stories)}"
        target = keep if keep in self._ids else next(
            (v.story.id for v in snapshot.stories if v.state is StoryState.CURRENT), None
        )
        if target is not None:
            self.highlighted = self._ids.index(target)
        elif self._ids:
            self.highlighted = 0

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        event.stop()
        if event.option_id is not None:
            self.post_message(self.Highlighted(self, event.option_id))
