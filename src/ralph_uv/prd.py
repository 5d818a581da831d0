"""The prd.json model: loading, validation, story selection and safe rewrites.

A task's ``prd.json`` lists user stories, each with ``passes: true|false``. Schema versions 1.0
to 2.5 are understood; a file without ``schemaVersion`` is read as 1.0. In 1.x acceptance
criteria are plain strings, from 2.0 on they are ``{"description": ..., "passes": ...}`` objects.

The file belongs to the person (and the agent) editing it: ralph-uv changes only the values it
is asked to change and keeps every other key, known or not, exactly as it was. Every write goes
to a temporary file in the same folder, is flushed to disk and then renamed over the original,
so a crash never leaves half a file behind.

Stories run in order of ``priority`` (lowest first; stories without one come after all numbered
ones, in file order), skipping those that pass and those still waiting for a blocker. Blockers
come from a story's own ``blockedBy`` and from other stories' ``blocks``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralph_uv.errors import ErrorCode, UserError

__all__ = [
    "CURRENT_SCHEMA",
    "MAX_SCHEMA",
    "MIN_SCHEMA",
    "Criterion",
    "Prd",
    "PrdError",
    "Problem",
    "Story",
    "check_branch_name",
    "load_prd",
    "parse_prd",
    "set_story_notes",
    "set_story_passes",
    "validate_prd",
    "write_json_atomic",
    "write_text_atomic",
]

log = logging.getLogger("ralph_uv.prd")

MIN_SCHEMA = (1, 0)
MAX_SCHEMA = (2, 5)
CURRENT_SCHEMA = "2.5"
_KNOWN = f"{MIN_SCHEMA[0]}.{MIN_SCHEMA[1]} to {MAX_SCHEMA[0]}.{MAX_SCHEMA[1]}"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a prd.json: where (file and JSON path), what, and what to do."""

    file: Path
    path: str  # JSONPath-like location, e.g. ``$.userStories[2].id``
    message: str
    fix: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message} — {self.fix}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, for ``validate --json`` and RPC replies."""
        return {name: getattr(self, name) for name in self.__slots__} | {"file": str(self.file)}


class PrdError(UserError):
    """A prd.json that cannot be used; ``problems`` says everything that is wrong with it."""

    code = ErrorCode.INVALID_PRD

    def __init__(self, problems: Sequence[Problem], summary: str | None = None) -> None:
        self.problems = tuple(problems)
        lines = [summary] if summary else []
        lines.extend(str(p) for p in self.problems)
        super().__init__("\n".join(lines) or "invalid prd.json")


@dataclass(frozen=True, slots=True)
class Criterion:
    """One acceptance criterion; plain-string criteria (schema 1.x) have ``passes=False``."""

    description: str
    passes: bool = False


@dataclass(frozen=True, slots=True)
class Story:
    """One user story as read from the file; ``index`` is its position in ``userStories``."""

    id: str
    title: str
    index: int
    description: str = ""
    acceptance_criteria: tuple[Criterion, ...] = ()
    priority: int | None = None
    passes: bool = False
    notes: str = ""
    agent: str | None = None
    model: str | None = None
    phase: str | None = None
    blocked_by: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()

    @property
    def order_key(self) -> tuple[bool, int, int]:
        """Sort key: numbered priorities first (lowest first), then file order."""
        return (self.priority is None, self.priority or 0, self.index)


@dataclass(frozen=True, slots=True, eq=False)
class Prd:
    """A loaded prd.json. ``raw`` is the parsed document exactly as it was in the file."""

    path: Path
    raw: Mapping[str, Any]
    schema_version: str
    branch_name: str
    stories: tuple[Story, ...]
    project: str | None = None
    task_dir: str | None = None
    merge_target: str | None = None
    auto_merge: bool = False
    pause_between_stories: bool = False
    type: str | None = None
    description: str = ""
    agent: str | None = None
    notes: str = ""
    phases: tuple[Any, ...] = ()

    def counts(self) -> tuple[int, int]:
        """``(stories that pass, all stories)``."""
        return sum(1 for s in self.stories if s.passes), len(self.stories)

    @property
    def all_passing(self) -> bool:
        """True when there is at least one story and every story passes."""
        return bool(self.stories) and all(s.passes for s in self.stories)

    def get_story(self, story_id: str) -> Story | None:
        """The story with this id, or None."""
        return next((s for s in self.stories if s.id == story_id), None)

    def blockers(self, story: Story) -> tuple[str, ...]:
        """Ids that must pass before ``story`` may run: its ``blockedBy`` plus every story that
        lists it in ``blocks``."""
        found = list(story.blocked_by)
        for other in self.stories:
            if story.id in other.blocks and other.id not in found:
                found.append(other.id)
        return tuple(found)

    def waiting(self) -> dict[str, tuple[str, ...]]:
        """Failing stories that wait for failing blockers, with those blockers."""
        passing = {s.id for s in self.stories if s.passes}
        pending = {
            s.id: tuple(b for b in self.blockers(s) if b not in passing)
            for s in self.stories
            if not s.passes
        }
        return {k: v for k, v in pending.items() if v}

    def next_story(self) -> Story | None:
        """The story to work on next, or None when every story passes.

        Raises :class:`PrdError` for an unknown blocker id or a dependency cycle, naming the
        stories that can therefore never run.
        """
        problems = _dependency_problems(self)
        if problems:
            waiting = self.waiting()
            summary = "the stories' dependencies cannot be resolved"
            if waiting:
                listed = "; ".join(f"{k} waits for {', '.join(v)}" for k, v in waiting.items())
                summary += f" ({listed})"
            raise PrdError(problems, summary)
        passing = {s.id for s in self.stories if s.passes}
        ready = [
            s for s in self.stories if not s.passes and all(b in passing for b in self.blockers(s))
        ]
        if ready:
            return min(ready, key=lambda s: s.order_key)
        return None


def load_prd(path: Path) -> Prd:
    """Read and check ``path``; raise :class:`PrdError` listing every problem found.

    Dependency problems (cycles, unknown blockers) are reported by :meth:`Prd.next_story` and
    :func:`validate_prd`, not here, so a file with a broken dependency can still be listed.
    """
    raw, problems = _read_json(path)
    if raw is None:
        raise PrdError(problems)
    return parse_prd(raw, path)


def parse_prd(raw: Any, path: Path) -> Prd:
    """Check a document already parsed from JSON (``path`` names where it came from, e.g. a
    file on another machine); raise :class:`PrdError` listing every problem found."""
    prd, problems = _build(raw, path)
    if problems:
        raise PrdError(problems, f"{path} is not a valid prd.json")
    return prd


def validate_prd(path: Path) -> list[Problem]:
    """Every problem with the prd.json at ``path``; an empty list means it is valid."""
    raw, problems = _read_json(path)
    if raw is None:
        return problems
    prd, problems = _build(raw, path)
    return problems + _dependency_problems(prd)


def set_story_passes(path: Path, story_id: str, passes: bool) -> None:
    """Set one story's ``passes`` in place, keeping everything else in the file."""
    _update_story(path, story_id, "passes", passes)


def set_story_notes(path: Path, story_id: str, notes: str) -> None:
    """Set one story's ``notes`` in place, keeping everything else in the file."""
    _update_story(path, story_id, "notes", notes)


# -- branch names ------------------------------------------------------------------------------

_BAD_CHARS = set(" ~^:?*[\\")


def check_branch_name(name: str) -> str | None:
    """Why git would refuse ``name`` as a branch (the rules of ``git check-ref-format
    --branch``), or None when it is acceptable."""
    if not name:
        return "the branch name is empty"
    if name.startswith("-"):
        return "a branch name cannot start with '-'"
    if name == "HEAD":
        return "'HEAD' cannot be a branch name"
    for ch in name:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return "a branch name cannot contain control characters"
        if ch in _BAD_CHARS:
            return f"a branch name cannot contain {ch!r}"
    if ".." in name:
        return "a branch name cannot contain '..'"
    if "@{" in name:
        return "a branch name cannot contain '@{'"
    if name.endswith("."):
        return "a branch name cannot end with '.'"
    for part in name.split("/"):
        if not part:
            return "a branch name cannot start or end with '/' or contain '//'"
        if part.startswith("."):
            return "no part of a branch name between slashes may start with '.'"
        if part.endswith(".lock"):
            return "no part of a branch name between slashes may end with '.lock'"
    return None


# -- atomic writes -----------------------------------------------------------------------------


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (temporary file in the same folder, fsync,
    rename), keeping the file's permission bits; a symlink's target is replaced, not the link."""
    target = path.resolve() if path.is_symlink() else path
    try:
        mode: int | None = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = None
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)  # the umask may have narrowed it
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as 2-space-indented JSON with a trailing newline, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; some file systems refuse, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        log.debug("cannot fsync %s", folder)


# -- reading and checking ------------------------------------------------------------------------

_LIST_FIX = "write it as [...]"
_FLAG_FIX = "use true or false"


def _read_json(path: Path) -> tuple[Any, list[Problem]]:
    """The parsed document, or None with the problem that stopped it."""

    def fail(message: str, fix: str, **where: int) -> tuple[Any, list[Problem]]:
        return None, [Problem(path, "$", message, fix, **where)]

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return fail("the file does not exist", "create it with `ralph-uv init TASK`")
    except IsADirectoryError:
        return fail("this is a folder", "point to the prd.json inside it")
    except UnicodeDecodeError as exc:
        return fail(f"the file is not UTF-8 text ({exc.reason})", "save it as UTF-8")
    except OSError as exc:
        return fail(f"cannot read the file: {exc.strerror}", "check its permissions")
    try:
        return json.loads(text), []
    except json.JSONDecodeError as exc:
        return fail(
            f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            "fix the syntax there (a missing comma or quote, or a trailing comma, is the usual "
            "cause)",
            line=exc.lineno,
            column=exc.colno,
        )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str | list):
        return "a string" if isinstance(value, str) else "a list"
    return "an object"


class _Checker:
    """Collects problems while reading values of the expected types."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def add(self, path: str, message: str, fix: str) -> None:
        self.problems.append(Problem(self.file, path, message, fix))

    def wrong(self, path: str, expected: str, value: Any, fix: str) -> None:
        self.add(path, f"must be {expected}, not {_kind(value)}", fix)

    def string(self, obj: Mapping[str, Any], key: str, where: str) -> str | None:
        value = obj.get(key)
        if value is None or isinstance(value, str):
            return value
        self.wrong(f"{where}.{key}", "a string", value, "put it in quotes")
        return None

    def flag(self, obj: Mapping[str, Any], key: str, where: str) -> bool:
        value = obj.get(key, False)
        if isinstance(value, bool):
            return value
        self.wrong(f"{where}.{key}", "true or false", value, _FLAG_FIX)
        return False

    def text(self, obj: Mapping[str, Any], key: str, where: str) -> str:
        """A string, or a list of strings joined by newlines (notes are often written so)."""
        value = obj.get(key)
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return "\n".join(value)
        self.wrong(f"{where}.{key}", "a string", value, "write it as text")
        return ""

    def ids(self, obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
        value = obj.get(key)
        if value is None:
            return ()
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        self.wrong(f"{where}.{key}", "a list of story ids", value, 'write ["US-001", ...]')
        return ()


def _build(raw: Any, file: Path) -> tuple[Prd, list[Problem]]:
    """A :class:`Prd` built from whatever is usable, and every problem found on the way."""
    check = _Checker(file)
    if not isinstance(raw, dict):
        example = '{"schemaVersion": "2.5", "branchName": ..., "userStories": [...]}'
        check.wrong("$", "a JSON object", raw, f"start from {example}")
        raw = {}
    version = _schema_version(raw, check)
    branch = check.string(raw, "branchName", "$")
    if branch is None and "branchName" not in raw:
        check.add("$.branchName", "missing", 'add "branchName": "ralph/TASK-NAME"')
    elif branch is not None and (reason := check_branch_name(branch)):
        message = f"{branch!r} is not a valid git branch name: {reason}"
        check.add("$.branchName", message, "choose a name such as ralph/my-feature")
    phases = raw.get("phases", [])
    if not isinstance(phases, list):
        check.wrong("$.phases", "a list", phases, _LIST_FIX)
        phases = []
    prd = Prd(
        path=file,
        raw=raw,
        schema_version=f"{version[0]}.{version[1]}",
        branch_name=branch or "",
        stories=tuple(_stories(raw, version, check)),
        project=check.string(raw, "project", "$"),
        task_dir=check.string(raw, "taskDir", "$"),
        merge_target=check.string(raw, "mergeTarget", "$"),
        auto_merge=check.flag(raw, "autoMerge", "$"),
        pause_between_stories=check.flag(raw, "pauseBetweenStories", "$"),
        type=check.string(raw, "type", "$"),
        description=check.text(raw, "description", "$"),
        agent=check.string(raw, "agent", "$"),
        notes=check.text(raw, "notes", "$"),
        phases=tuple(phases),
    )
    return prd, check.problems


def _schema_version(raw: Mapping[str, Any], check: _Checker) -> tuple[int, int]:
    if "schemaVersion" not in raw:
        return MIN_SCHEMA
    value = raw["schemaVersion"]
    where, use = "$.schemaVersion", f'set "schemaVersion": "{CURRENT_SCHEMA}"'
    version = _parse_version(value)
    if version is None:
        check.add(where, f"{value!r} is not a version number (known: {_KNOWN})", use)
        return MAX_SCHEMA
    if version < MIN_SCHEMA:
        check.add(where, f"schema {value} is older than any known version ({_KNOWN})", use)
    elif version > MAX_SCHEMA:
        message = f"schema {value} is newer than this ralph-uv understands ({_KNOWN})"
        check.add(where, message, "upgrade ralph-uv, or write the file for a known version")
    return version


def _parse_version(value: Any) -> tuple[int, int] | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    match = re.fullmatch(r"(\d+)(?:\.(\d+))?", str(value).strip())
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


def _stories(raw: Mapping[str, Any], version: tuple[int, int], check: _Checker) -> list[Story]:
    items = raw.get("userStories")
    if items is None:
        check.add("$.userStories", "missing", 'add "userStories": [{"id": "US-001", ...}]')
        return []
    if not isinstance(items, list):
        check.wrong("$.userStories", "a list", items, _LIST_FIX)
        return []
    if not items:
        check.add("$.userStories", "there are no stories", "add at least one story to work on")
    stories: list[Story] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        where = f"$.userStories[{index}]"
        story = _story(item, index, where, version, check)
        if story is None:
            continue
        if story.id in seen:
            message = f"duplicate id {story.id!r} (also $.userStories[{seen[story.id]}])"
            check.add(f"{where}.id", message, "give every story its own id")
            continue
        seen[story.id] = index
        stories.append(story)
    return stories


def _story(
    item: Any, index: int, where: str, version: tuple[int, int], check: _Checker
) -> Story | None:
    if not isinstance(item, dict):
        check.wrong(where, "an object", item, 'write {"id": "US-001", "title": ..., ...}')
        return None
    story_id = item.get("id")
    if not isinstance(story_id, str) or not story_id.strip():
        what = "missing" if story_id is None else f"must be a non-empty string, not {story_id!r}"
        check.add(f"{where}.id", what, 'give the story an id such as "US-001"')
        return None
    title = check.string(item, "title", where)
    if title is None and "title" not in item:
        check.add(f"{where}.title", "missing", "add a short title")
    priority = item.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        check.wrong(f"{where}.priority", "a whole number", priority, "use 1, 2, 3, ...")
        priority = None
    phase = item.get("phase")
    if phase is not None and (isinstance(phase, bool) or not isinstance(phase, str | int)):
        check.wrong(f"{where}.phase", "a string or number", phase, "name a phase of $.phases")
        phase = None
    return Story(
        id=story_id,
        title=title or "",
        index=index,
        description=check.text(item, "description", where),
        acceptance_criteria=_criteria(item, where, version, check),
        priority=priority,
        passes=check.flag(item, "passes", where),
        notes=check.text(item, "notes", where),
        agent=check.string(item, "agent", where),
        model=check.string(item, "model", where),
        phase=None if phase is None else str(phase),
        blocked_by=check.ids(item, "blockedBy", where),
        blocks=check.ids(item, "blocks", where),
    )


def _criteria(
    item: Mapping[str, Any], where: str, version: tuple[int, int], check: _Checker
) -> tuple[Criterion, ...]:
    value = item.get("acceptanceCriteria")
    where = f"{where}.acceptanceCriteria"
    if value is None:
        return ()
    if not isinstance(value, list):
        check.wrong(where, "a list", value, _LIST_FIX)
        return ()
    result: list[Criterion] = []
    for i, entry in enumerate(value):
        at = f"{where}[{i}]"
        if version < (2, 0):
            if isinstance(entry, str):
                result.append(Criterion(entry))
            else:
                fix = f'write a string, or set "schemaVersion": "{CURRENT_SCHEMA}" to use objects'
                check.wrong(at, "a string in schema 1.x", entry, fix)
        elif not isinstance(entry, dict):
            fix = 'write {"description": "...", "passes": false}'
            check.wrong(at, "an object in schema 2.0+ (criteria are objects)", entry, fix)
        elif not isinstance(desc := entry.get("description"), str):
            check.wrong(f"{at}.description", "a string", desc, "describe what must be true")
        elif not isinstance(passes := entry.get("passes", False), bool):
            check.wrong(f"{at}.passes", "true or false", passes, _FLAG_FIX)
        else:
            result.append(Criterion(desc, passes))
    return tuple(result)


def _dependency_problems(prd: Prd) -> list[Problem]:
    check = _Checker(prd.path)
    known = {s.id for s in prd.stories}
    for story in prd.stories:
        for key, ids in (("blockedBy", story.blocked_by), ("blocks", story.blocks)):
            for i, other in enumerate(ids):
                where = f"$.userStories[{story.index}].{key}[{i}]"
                if other not in known:
                    message = f"{story.id} names unknown story {other!r}"
                    check.add(where, message, "use the id of a story in this file, or remove it")
                elif other == story.id:
                    check.add(where, f"{story.id} names itself", "remove it")
    graph = {s.id: [b for b in prd.blockers(s) if b in known and b != s.id] for s in prd.stories}
    by_id = {s.id: s for s in prd.stories}
    for cycle in _cycles(graph):
        chain = " → ".join([*cycle, cycle[0]])
        message = f"dependency cycle: {chain} (each waits for the next, so none can ever run)"
        where = f"$.userStories[{by_id[cycle[0]].index}].blockedBy"
        check.add(where, message, "remove one of these blockedBy/blocks entries")
    return check.problems


def _cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Each cycle met by an iterative depth-first search (no recursion limit on long chains)."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    found: list[list[str]] = []
    for start in graph:
        if colour[start] != white:
            continue
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(graph[start]))]
        trail = [start]
        colour[start] = grey
        while stack:
            node, edges = stack[-1]
            nxt = next(edges, None)
            if nxt is None:
                stack.pop()
                trail.pop()
                colour[node] = black
            elif colour[nxt] == grey:
                found.append(trail[trail.index(nxt) :])
            elif colour[nxt] == white:
                colour[nxt] = grey
                trail.append(nxt)
                stack.append((nxt, iter(graph[nxt])))
    return found


# -- read-modify-write ---------------------------------------------------------------------------


def _update_story(path: Path, story_id: str, key: str, value: Any) -> None:
    raw, problems = _read_json(path)
    if raw is None:
        raise PrdError(problems)
    stories = raw.get("userStories") if isinstance(raw, dict) else None
    matches = [
        s
        for s in (stories if isinstance(stories, list) else [])
        if isinstance(s, dict) and s.get("id") == story_id
    ]
    if not matches:
        fix = "check the id against the file"
        raise PrdError([Problem(path, "$.userStories", f"no story with id {story_id!r}", fix)])
    for story in matches:
        story[key] = value
    try:
        write_json_atomic(path, raw)
    except OSError as exc:
        raise UserError(
            f"{path}: cannot write the file: {exc.strerror} — check the folder's permissions "
            "and free space"
        ) from exc
    log.debug("%s: set %s of %s to %r", path, key, story_id, value)
