"""progress.txt: summary lines, the header, and rotation into numbered archives."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ralph_uv.progress import (
    PROGRESS_HEADER,
    append_summary,
    archives,
    ensure_progress_file,
    format_summary,
)

NOW = datetime(2025, 6, 1, 14, 3, 12, tzinfo=timezone(timedelta(hours=2)))

PATTERNS = "## Codebase Patterns\n- run tests with make test\n- models live in src/models\n"


def _entry(n: int) -> str:
    return f"## 2025-06-01 - US-{n:03d}\n- did thing {n}\n- learned {n}\n---\n"


def _seed(path: Path, entries: int) -> None:
    text = "# Ralph progress log\nStarted: today\n\n" + PATTERNS + "\n---\n"
    text += "".join(_entry(i) for i in range(entries))
    path.write_text(text, encoding="utf-8")


def _append(path: Path, i: int, **kwargs: int) -> Path | None:
    return append_summary(path, i, 50, 1, 4, "claude", f"iteration {i} done", now=NOW, **kwargs)


def test_summary_line_format() -> None:
    """A summary holds the time, iteration/max, stories done/total, agent and reason."""
    assert format_summary(3, 10, 2, 5, "claude", "story US-002\npassed", NOW) == (
        "[2025-06-01 14:03:12+02:00] Iteration 3/10 | Stories 2/5 | claude | story US-002 passed"
    )


def test_missing_file_is_created_with_the_header(tmp_path: Path) -> None:
    """The first summary creates progress.txt with its header, then the line."""
    path = tmp_path / "progress.txt"
    assert _append(path, 1) is None
    assert (
        path.read_text(encoding="utf-8")
        == PROGRESS_HEADER + format_summary(1, 50, 1, 4, "claude", "iteration 1 done", NOW) + "\n"
    )
    assert "## Codebase Patterns" in PROGRESS_HEADER


def test_ensure_progress_file_keeps_existing_content(tmp_path: Path) -> None:
    """ensure_progress_file creates a missing file and never touches an existing one."""
    path = tmp_path / "progress.txt"
    ensure_progress_file(path)
    assert path.read_text(encoding="utf-8") == PROGRESS_HEADER
    path.write_text("mine\n", encoding="utf-8")
    ensure_progress_file(path)
    assert path.read_text(encoding="utf-8") == "mine\n"


def test_append_keeps_what_is_there_and_the_mode(tmp_path: Path) -> None:
    """A summary is added at the end (after a missing final newline is supplied), the file
    keeps its permissions and no temporary file is left."""
    path = tmp_path / "progress.txt"
    path.write_text("agent wrote this without newline", encoding="utf-8")
    os.chmod(path, 0o600)
    _append(path, 2)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "agent wrote this without newline"
    assert lines[1].endswith("Iteration 2/50 | Stories 1/4 | claude | iteration 2 done")
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["progress.txt"]


def test_rotation_archives_and_keeps_header_and_patterns(tmp_path: Path) -> None:
    """Past max_lines the content moves to progress-1.txt; the new file keeps the header, the
    Codebase Patterns section and a pointer to the archive, then the new summary."""
    path = tmp_path / "progress.txt"
    _seed(path, entries=5)
    before = path.read_text(encoding="utf-8")
    line_count = len(before.splitlines())
    assert _append(path, 1, max_lines=line_count + 1) is None  # fits exactly
    full = path.read_text(encoding="utf-8")
    archive = _append(path, 2, max_lines=line_count + 1)
    assert archive == tmp_path / "progress-1.txt"
    assert archive.read_text(encoding="utf-8") == full
    fresh = path.read_text(encoding="utf-8")
    assert fresh == (
        "# Ralph progress log\nStarted: today\n\n"
        + PATTERNS
        + "\n---\nEarlier progress: progress-1.txt\n"
        + format_summary(2, 50, 1, 4, "claude", "iteration 2 done", NOW)
        + "\n"
    )


def test_next_free_number_and_archive_limit(tmp_path: Path) -> None:
    """Archives take the number after the highest one, and only the newest max_archives stay;
    the patterns survive every rotation and each pointer names the latest archive."""
    path = tmp_path / "progress.txt"
    (tmp_path / "progress-7.txt").write_text("old\n", encoding="utf-8")
    (tmp_path / "progress-notes.txt").write_text("not an archive\n", encoding="utf-8")
    _seed(path, entries=3)
    created = []
    for i in range(4):
        for _ in range(8):  # grow past the limit again
            path.write_text(path.read_text(encoding="utf-8") + _entry(99), encoding="utf-8")
        archive = _append(path, i, max_lines=20, max_archives=2)
        assert archive is not None
        created.append(archive.name)
        text = path.read_text(encoding="utf-8")
        assert PATTERNS in text
        assert f"Earlier progress: {archive.name}\n" in text
    assert created == ["progress-8.txt", "progress-9.txt", "progress-10.txt", "progress-11.txt"]
    assert [p.name for p in archives(tmp_path)] == ["progress-10.txt", "progress-11.txt"]
    assert (tmp_path / "progress-notes.txt").exists()


def test_rotation_without_patterns_section_adds_an_empty_one(tmp_path: Path) -> None:
    """A file the agent wrote without Codebase Patterns still rotates into a well-formed file."""
    path = tmp_path / "progress.txt"
    path.write_text("".join(_entry(i) for i in range(10)), encoding="utf-8")
    archive = _append(path, 1, max_lines=10)
    assert archive is not None
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Ralph progress log\n\n## Codebase Patterns\n")
    assert "US-000" not in text


def test_zero_archives_truncates_without_pointer(tmp_path: Path) -> None:
    """With max_archives 0 the old entries are dropped and no pointer is written."""
    path = tmp_path / "progress.txt"
    _seed(path, entries=10)
    assert _append(path, 1, max_lines=10, max_archives=0) is None
    text = path.read_text(encoding="utf-8")
    assert "Earlier progress" not in text
    assert "US-009" not in text
    assert PATTERNS in text
    assert archives(tmp_path) == []


def test_header_and_patterns_alone_never_rotate(tmp_path: Path) -> None:
    """A file with nothing but header and patterns is not archived, even past the limit."""
    path = tmp_path / "progress.txt"
    path.write_text("# Log\n\n" + PATTERNS, encoding="utf-8")
    assert _append(path, 1, max_lines=2) is None
    assert archives(tmp_path) == []
