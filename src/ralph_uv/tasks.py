"""Finding tasks: what a TASK argument means, and which tasks a repository holds.

A TASK on the command line is either a path (a folder holding ``prd.json``, or the ``prd.json``
itself) or a bare name, which means ``tasks/NAME`` under the repository's root (the git
top-level folder, or the current folder outside a git repository). Names may be nested
(``backend/login``); each part uses letters, digits, ``-``, ``_`` and ``.``, does not start with
a dot or a dash and is at most 64 characters long.

A TASK that starts with ``/``, ``./``, ``../``, ``~`` or ``tasks/``, or ends with ``.json``, is
always a path. Tasks under an ``archived/`` folder are finished work and are not listed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ralph_uv.errors import ErrorCode, UserError
from ralph_uv.prd import CURRENT_SCHEMA, PrdError, check_branch_name, load_prd, write_text_atomic

__all__ = [
    "ARCHIVE_DIR",
    "PRD_FILE",
    "PROGRESS_FILE",
    "PROMPT_FILE",
    "TASKS_DIR",
    "TaskInfo",
    "TaskRef",
    "git_root",
    "list_tasks",
    "resolve_task",
    "scaffold_task",
    "validate_task_name",
]

log = logging.getLogger("ralph_uv.tasks")

TASKS_DIR = "tasks"
ARCHIVE_DIR = "archived"
PRD_FILE = "prd.json"
PROMPT_FILE = "prompt.md"
PROGRESS_FILE = "progress.txt"

_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class TaskRef:
    """A resolved task: its name, folder and the files the loop uses inside it."""

    name: str
    dir: Path
    root: Path  # the repository root the task belongs to

    @property
    def prd_file(self) -> Path:
        return self.dir / PRD_FILE

    @property
    def prompt_file(self) -> Path:
        return self.dir / PROMPT_FILE

    @property
    def progress_file(self) -> Path:
        return self.dir / PROGRESS_FILE


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """One line of a task listing. ``error`` is set (and the counts are 0) when the task's
    prd.json cannot be read."""

    name: str
    dir: Path
    done: int
    total: int
    type: str | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        """``[done/total] name (type)``, the form listings show."""
        if self.error is not None:
            return f"[?/?] {self.name} (invalid prd.json)"
        suffix = f" ({self.type})" if self.type else ""
        return f"[{self.done}/{self.total}] {self.name}{suffix}"

    def __str__(self) -> str:
        return self.label


def validate_task_name(name: str) -> str:
    """Return ``name`` when it is a valid task name (parts separated by ``/``), else raise
    :class:`UserError` saying what a name may contain."""
    parts = name.split("/")
    for part in parts:
        if not _NAME_PART.fullmatch(part):
            raise UserError(
                f"invalid task name {name!r}: use letters, digits, '-', '_' and '.', not "
                "starting with '.' or '-', at most 64 characters (e.g. add-login-page)",
                code=ErrorCode.INVALID_NAME,
            )
    return name


def git_root(start: Path | None = None) -> Path:
    """The top-level folder of the git repository containing ``start`` (default: the current
    folder), or ``start`` itself when it is not inside a repository or git is missing."""
    here = (start or Path.cwd()).resolve()
    folder = here if here.is_dir() else here.parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("git rev-parse failed in %s: %s", folder, exc)
        return folder
    top = result.stdout.strip()
    if result.returncode != 0 or not top:
        return folder
    return Path(top).resolve()


def resolve_task(task: str | Path, cwd: Path | None = None, *, must_exist: bool = True) -> TaskRef:
    """What a TASK argument means (see the module docstring).

    With ``must_exist`` (the default) the task's prd.json must be there; ``init`` passes False
    to get the folder it should create.
    """
    here = (cwd or Path.cwd()).resolve()
    text = str(task)
    if isinstance(task, Path) or _looks_like_path(text):
        return _from_path(Path(text).expanduser(), here, must_exist)
    root = git_root(here)
    try:
        name = validate_task_name(text)
    except UserError:
        if (here / text).exists():
            return _from_path(Path(text), here, must_exist)
        raise
    ref = TaskRef(name, root / TASKS_DIR / name, root)
    if ref.prd_file.is_file() or not must_exist:
        return ref
    local = here / text
    if (local / PRD_FILE).is_file():
        return _from_path(local, here, must_exist)
    raise UserError(
        f"no task {name!r}: {ref.prd_file} does not exist — create it with "
        f"`ralph-uv init {name}`, or pass the path of a folder holding a prd.json"
    )


def list_tasks(root: Path) -> list[TaskInfo]:
    """Every task under ``root/tasks`` (any depth, except inside ``archived/``), by name."""
    base = root / TASKS_DIR
    if not base.is_dir():
        return []
    found: list[TaskInfo] = []
    for prd_file in sorted(base.rglob(PRD_FILE)):
        rel = prd_file.parent.relative_to(base)
        if ARCHIVE_DIR in rel.parts or not prd_file.is_file():
            continue
        name = rel.as_posix() if rel.parts else base.name
        try:
            prd = load_prd(prd_file)
        except PrdError as exc:
            first = exc.problems[0] if exc.problems else None
            found.append(TaskInfo(name, prd_file.parent, 0, 0, error=str(first or exc)))
            continue
        done, total = prd.counts()
        found.append(TaskInfo(name, prd_file.parent, done, total, prd.type))
    return sorted(found, key=lambda t: t.name)


def scaffold_task(
    ref: TaskRef,
    *,
    template: str,
    task_type: str = "feature",
    branch: str | None = None,
    force: bool = False,
) -> list[Path]:
    """Create ``prd.json`` (two example stories to edit) and ``prompt.md`` (``template``) in
    the task's folder; refuse to overwrite either unless ``force``. Returns the files written."""
    branch = branch if branch is not None else f"ralph/{ref.name}"
    reason = check_branch_name(branch)
    if reason:
        raise UserError(f"{branch!r} is not a valid branch name: {reason} — pass --branch NAME")
    if not task_type.strip():
        raise UserError("the task type is empty — pass --type feature (or bugfix, refactor, ...)")
    targets = [ref.prd_file, ref.prompt_file]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        listed = ", ".join(str(p) for p in existing)
        raise UserError(f"{listed} already exist(s) — pass --force to overwrite")
    try:
        task_dir = ref.dir.relative_to(ref.root).as_posix()
    except ValueError:
        task_dir = str(ref.dir)
    document = _example_prd(ref.root.name, task_dir, branch, task_type)
    try:
        ref.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(ref.prd_file, json.dumps(document, indent=2) + "\n")
        write_text_atomic(ref.prompt_file, template)
    except OSError as exc:
        raise UserError(
            f"cannot create the task in {ref.dir}: {os.strerror(exc.errno or 0)} — check the "
            "folder's permissions"
        ) from exc
    log.info("created task %s in %s", ref.name, ref.dir)
    return targets


def _example_prd(project: str, task_dir: str, branch: str, task_type: str) -> dict[str, object]:
    def criteria(*texts: str) -> list[dict[str, object]]:
        return [{"description": text, "passes": False} for text in texts]

    return {
        "schemaVersion": CURRENT_SCHEMA,
        "project": project,
        "taskDir": task_dir,
        "branchName": branch,
        "type": task_type,
        "description": "What this task should achieve, in a sentence or two.",
        "notes": "",
        "userStories": [
            {
                "id": "US-001",
                "title": "First small change that can be checked on its own",
                "description": "As a <user>, I want <something> so that <benefit>.",
                "acceptanceCriteria": criteria(
                    "A concrete, checkable outcome", "The project's checks pass"
                ),
                "priority": 1,
                "passes": False,
                "notes": "",
            },
            {
                "id": "US-002",
                "title": "Next change, building on US-001",
                "description": "As a <user>, I want <something> so that <benefit>.",
                "acceptanceCriteria": criteria(
                    "A concrete, checkable outcome", "The project's checks pass"
                ),
                "priority": 2,
                "passes": False,
                "notes": "",
                "blockedBy": ["US-001"],
            },
        ],
    }


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", "./", "../", "~", f"{TASKS_DIR}/"))
        or text in {".", ".."}
        or text.endswith(".json")
    )


def _from_path(path: Path, here: Path, must_exist: bool) -> TaskRef:
    full = (here / path).resolve()
    is_file = full.name.endswith(".json") or full.is_file()
    folder = full.parent if is_file else full
    if is_file and full.name != PRD_FILE:
        raise UserError(
            f"{full}: a task's file must be named {PRD_FILE} — rename it or pass its folder"
        )
    if must_exist and not (folder / PRD_FILE).is_file():
        raise UserError(
            f"{folder / PRD_FILE} does not exist — pass a folder holding a prd.json, "
            "or create one with `ralph-uv init`"
        )
    root = git_root(folder if folder.is_dir() else folder.parent)
    try:
        name = folder.relative_to(root / TASKS_DIR).as_posix()
    except ValueError:
        name = folder.name
    return TaskRef(name or folder.name, folder, root)
