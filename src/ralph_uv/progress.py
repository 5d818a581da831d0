"""The task's ``progress.txt``: a log the agent and the loop both append to.

The agent writes dated entries (what it did, what it learned) and keeps reusable knowledge in a
``## Codebase Patterns`` section near the top. The loop adds a summary line when it ends::

    [2025-06-01 14:03:12+02:00] Iteration 3/10 | Stories 2/5 | claude | story US-002 passed

When the file grows past ``max_lines`` its content moves to ``progress-N.txt`` (the next number
after the highest one there) and the new ``progress.txt`` keeps the header and the Codebase
Patterns section, with a line pointing to the archive. At most ``max_archives`` archives are
kept; the oldest go first. Every write is atomic.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ralph_uv.errors import UserError
from ralph_uv.prd import write_text_atomic
from ralph_uv.tasks import PROGRESS_FILE

__all__ = [
    "LOG_READ_LIMIT",
    "PATTERNS_HEADING",
    "PROGRESS_HEADER",
    "append_summary",
    "archives",
    "ensure_progress_file",
    "format_summary",
    "read_log",
]

log = logging.getLogger("ralph_uv.progress")

PATTERNS_HEADING = "## Codebase Patterns"
# Characters of a progress log shown to a client at most (the newest): even as 6-byte JSON
# escapes they fit in one message of the default 4 MiB limit.
LOG_READ_LIMIT = 512 * 1024
_TITLE = "# Ralph progress log"
_EMPTY_PATTERNS = (
    f"{PATTERNS_HEADING}\n"
    "<!-- Reusable knowledge for every story goes here: conventions, commands, gotchas. -->"
)
PROGRESS_HEADER = f"{_TITLE}\n\n{_EMPTY_PATTERNS}\n\n---\n"

_SUMMARY = re.compile(r"^\[\d{4}-\d\d-\d\d[ T][\d:.]+(?:Z|[+-]\d\d:?\d\d)?\] Iteration \d+")
_ARCHIVE = re.compile(r"progress-(\d+)\.txt")
_MAX_HEADER_LINES = 10


@dataclass(frozen=True, slots=True)
class _Parts:
    header: list[str]
    patterns: list[str]
    body: list[str]


def format_summary(
    iteration: int,
    max_iterations: int,
    done: int,
    total: int,
    agent: str,
    reason: str,
    now: datetime | None = None,
) -> str:
    """One summary line (without its newline)."""
    stamp = (now or datetime.now().astimezone()).isoformat(sep=" ", timespec="seconds")
    reason = " ".join(reason.split())  # one line, whatever the reason text held
    return (
        f"[{stamp}] Iteration {iteration}/{max_iterations} | Stories {done}/{total} "
        f"| {agent} | {reason}"
    )


def ensure_progress_file(path: Path) -> None:
    """Create ``path`` with the standard header when it does not exist."""
    if not path.exists():
        _write(path, PROGRESS_HEADER)


def append_summary(
    path: Path,
    iteration: int,
    max_iterations: int,
    done: int,
    total: int,
    agent: str,
    reason: str,
    *,
    max_lines: int = 300,
    max_archives: int = 5,
    now: datetime | None = None,
) -> Path | None:
    """Append one iteration's summary line, rotating the file first when the line would take
    it past ``max_lines``. Returns the archive created, if any."""
    line = format_summary(iteration, max_iterations, done, total, agent, reason, now) + "\n"
    text = _read(path) if path.exists() else PROGRESS_HEADER
    if text and not text.endswith("\n"):
        text += "\n"
    archive: Path | None = None
    lines = text.splitlines(keepends=True)
    if len(lines) + 1 > max_lines:
        parts = _split(lines)
        if parts.body:
            archive = _rotate(path, text, max_archives)
            text = _fresh(parts, archive)
    _write(path, text + line)
    return archive


def archives(folder: Path) -> list[Path]:
    """The ``progress-N.txt`` archives in ``folder``, oldest (lowest N) first."""
    found: list[tuple[int, Path]] = []
    for entry in folder.glob("progress-*.txt"):
        match = _ARCHIVE.fullmatch(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return [p for _, p in sorted(found)]


def read_log(folder: Path, limit: int) -> tuple[str, bool]:
    """The whole progress log of the task in ``folder``: its archives (oldest first), then
    ``progress.txt``, at most the last ``limit`` characters; and whether older text was left
    out. Files that cannot be read are skipped."""
    parts: list[str] = []
    for path in [*archives(folder), folder / PROGRESS_FILE]:
        try:
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
    text = "\n".join(parts)
    return text[-limit:], len(text) > limit


def _split(lines: list[str]) -> _Parts:
    """Header (lines before the first section, entry or rule), the Codebase Patterns section
    (up to the next section, rule or summary line) and everything else."""
    header: list[str] = []
    for line in lines[:_MAX_HEADER_LINES]:
        if line.startswith("## ") or line.strip() == "---" or _SUMMARY.match(line):
            break
        header.append(line)
    rest = lines[len(header) :]
    start = next(
        (i for i, line in enumerate(rest) if line.strip().lower() == PATTERNS_HEADING.lower()),
        None,
    )
    if start is None:
        return _Parts(header, [], rest)
    end = start + 1
    while end < len(rest):
        line = rest[end]
        if line.startswith("## ") or line.strip() == "---" or _SUMMARY.match(line):
            break
        end += 1
    return _Parts(header, rest[start:end], rest[:start] + rest[end:])


def _rotate(path: Path, text: str, max_archives: int) -> Path | None:
    """Move ``text`` to the next archive and prune old ones; None when no archive is kept."""
    if max_archives <= 0:
        return None
    existing = archives(path.parent)
    number = 1 + max((_archive_number(p) for p in existing), default=0)
    archive = path.with_name(f"progress-{number}.txt")
    _write(archive, text)
    kept = [*existing, archive]
    for old in kept[: max(0, len(kept) - max_archives)]:
        old.unlink(missing_ok=True)
        log.info("removed old progress archive %s", old)
    log.info("progress file rotated to %s", archive)
    return archive


def _archive_number(path: Path) -> int:
    match = _ARCHIVE.fullmatch(path.name)
    return int(match.group(1)) if match else 0


def _fresh(parts: _Parts, archive: Path | None) -> str:
    """The new file's start: header, Codebase Patterns, a rule and the pointer."""
    header = "".join(parts.header).rstrip("\n") or _TITLE
    patterns = "".join(parts.patterns).rstrip("\n") or _EMPTY_PATTERNS
    text = f"{header}\n\n{patterns}\n\n---\n"
    if archive is not None:
        text += f"Earlier progress: {archive.name}\n"
    return text


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"{path}: cannot read the progress file: {exc.strerror}") from exc


def _write(path: Path, text: str) -> None:
    try:
        write_text_atomic(path, text)
    except OSError as exc:
        raise UserError(
            f"{path}: cannot write the progress file: {exc.strerror} — check the folder's "
            "permissions and free space"
        ) from exc
