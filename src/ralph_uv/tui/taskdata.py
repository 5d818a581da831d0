"""What the detail screen shows of a task: its stories with their progress, read from
``prd.json``, and the entries ``progress.txt`` has about each story.

For a task on this machine :func:`read_task` reads the files (plain file work: run it in a
thread); for one on another machine :func:`task_from_documents` builds the same snapshot from
what that machine's ralphd sent (``get_prd``, ``get_progress``). Neither raises: the problem is
carried in :attr:`TaskSnapshot.error` so the screen can say what is wrong and go on. Notes are
written back with :func:`ralph_uv.prd.set_story_notes` (atomic, every other key kept), here or
through the loop's ralphd.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ralph_uv.errors import RalphError
from ralph_uv.prd import Prd, Story, load_prd, parse_prd, set_story_notes
from ralph_uv.progress import LOG_READ_LIMIT, PATTERNS_HEADING, read_log
from ralph_uv.tasks import PRD_FILE

__all__ = [
    "StoryState",
    "StoryView",
    "TaskSnapshot",
    "progress_entries",
    "read_task",
    "save_notes",
    "task_from_documents",
]

MAX_PROGRESS = LOG_READ_LIMIT  # characters of the progress log shown at most (the newest)
_SUMMARY = re.compile(r"^\[[^\]]+\] Iteration \d+")


class StoryState(StrEnum):
    DONE = "done"
    CURRENT = "current"
    BLOCKED = "blocked"
    PENDING = "pending"


@dataclass(frozen=True, slots=True)
class StoryView:
    """One story and where it stands; ``blockers`` are the failing stories it waits for."""

    story: Story
    state: StoryState
    blockers: tuple[str, ...] = ()

    @property
    def criteria_done(self) -> int:
        return sum(1 for c in self.story.acceptance_criteria if c.passes)

    @property
    def criteria_total(self) -> int:
        return len(self.story.acceptance_criteria)


@dataclass(frozen=True, slots=True)
class TaskSnapshot:
    """A task folder as read at one moment."""

    task_dir: Path
    prd: Prd | None
    stories: tuple[StoryView, ...]
    progress: str
    error: str | None = None

    def story(self, story_id: str) -> StoryView | None:
        return next((s for s in self.stories if s.story.id == story_id), None)


def _story_views(prd: Prd, current: str | None) -> tuple[StoryView, ...]:
    waiting = prd.waiting()
    if current is None or prd.get_story(current) is None:
        try:
            upcoming = prd.next_story()
        except RalphError:
            upcoming = None
        current = upcoming.id if upcoming is not None else None
    views: list[StoryView] = []
    for story in prd.stories:
        if story.passes:
            state = StoryState.DONE
        elif story.id == current:
            state = StoryState.CURRENT
        elif story.id in waiting:
            state = StoryState.BLOCKED
        else:
            state = StoryState.PENDING
        views.append(StoryView(story, state, waiting.get(story.id, ())))
    return tuple(views)


def _read_progress(task_dir: Path) -> str:
    return read_log(task_dir, MAX_PROGRESS)[0]


def read_task(task_dir: Path, current: str | None = None) -> TaskSnapshot:
    """Read the task in ``task_dir``; ``current`` is the story the loop works on (when it
    runs), else the next story the loop would pick is marked current."""
    try:
        prd = load_prd(task_dir / PRD_FILE)
    except RalphError as exc:
        return TaskSnapshot(task_dir, None, (), _read_progress(task_dir), error=exc.message)
    except OSError as exc:
        return TaskSnapshot(task_dir, None, (), "", error=f"{task_dir / PRD_FILE}: {exc}")
    return TaskSnapshot(task_dir, prd, _story_views(prd, current), _read_progress(task_dir))


def task_from_documents(
    task_dir: str, prd: Any, progress: str, current: str | None = None,
    *, error: str | None = None,
) -> TaskSnapshot:
    """The snapshot of a task on another machine: ``prd`` is its prd.json as parsed JSON
    (``None`` with ``error`` saying why it could not be had), ``progress`` its progress log.
    ``task_dir`` is the folder's path over there."""
    folder = Path(task_dir)
    if error is not None or prd is None:
        return TaskSnapshot(folder, None, (), progress, error=error or "prd.json was not sent")
    try:
        parsed = parse_prd(prd, folder / PRD_FILE)
    except RalphError as exc:
        return TaskSnapshot(folder, None, (), progress, error=exc.message)
    return TaskSnapshot(folder, parsed, _story_views(parsed, current), progress)


def progress_entries(text: str, story_id: str) -> list[str]:
    """The entries of a progress log about ``story_id``: the agent's ``## <date> - <story>``
    sections and the loop's summary lines that name it, oldest first."""
    mention = re.compile(rf"(?<![\w-]){re.escape(story_id)}(?![\w-])")
    entries: list[str] = []
    section: list[str] | None = None

    def close() -> None:
        nonlocal section
        if section is not None:
            entries.append("\n".join(section).strip())
            section = None

    for line in text.splitlines():
        if line.startswith("## "):
            close()
            heading = line[3:]
            if not line.startswith(PATTERNS_HEADING) and mention.search(heading):
                section = [line]
            continue
        if line.strip() == "---" or line.startswith("# "):
            close()
            continue
        if section is not None:
            section.append(line)
        elif _SUMMARY.match(line) and mention.search(line):
            entries.append(line)
    close()
    return entries


def save_notes(task_dir: Path, story_id: str, notes: str) -> None:
    """Write a story's notes into the task's prd.json (atomically, all else kept)."""
    set_story_notes(task_dir / PRD_FILE, story_id, notes)
