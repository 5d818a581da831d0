"""The TUI's pure parts: the terminal emulator (scrollback, search, flood skipping), the key
translation of interactive mode, and what the detail screen reads from a task folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ralph_uv.tui.emulator import TerminalEmulator, line_runs
from ralph_uv.tui.keymap import key_bytes, paste_bytes
from ralph_uv.tui.taskdata import StoryState, progress_entries, read_task, save_notes
from ralph_uv.tui.widgets.loops_table import duration

# ------------------------------------------------------------------------------- emulator


def test_lines_scrolled_off_the_screen_go_to_the_scrollback_in_order() -> None:
    """Output longer than the screen keeps its first lines in the scrollback, oldest first,
    and the screen shows the last ones."""
    emulator = TerminalEmulator(40, 5)
    emulator.feed_now(b"".join(b"line %d\r\n" % i for i in range(12)))
    texts = list(emulator.lines_text())
    assert texts[:8] == [f"line {i}" for i in range(8)]
    assert emulator.screen_text().splitlines()[:4] == [f"line {i}" for i in range(8, 12)]
    assert emulator.line_count == len(emulator.history) + 5


def test_scrollback_is_bounded() -> None:
    """The scrollback keeps at most ``history`` lines, dropping the oldest."""
    emulator = TerminalEmulator(20, 3, history=10)
    emulator.feed_now(b"".join(b"n%d\r\n" % i for i in range(50)))
    assert len(emulator.history) == 10
    assert emulator.text(0) == "n38"


def test_colours_and_attributes_survive_into_runs() -> None:
    """SGR colours and bold reach the runs a line is drawn from, on screen and in history."""
    emulator = TerminalEmulator(30, 2)
    emulator.feed_now(b"\x1b[1;31mred\x1b[0m plain\r\n")
    [(red, attrs), (plain, rest)] = emulator.runs(0)[:2]
    assert (red, attrs[0], attrs[2]) == ("red", "red", True)
    assert plain.startswith(" plain")
    assert rest[0] == "default"
    emulator.feed_now(b"a\r\nb\r\nc\r\n")  # push it into the scrollback
    assert emulator.runs(0)[0][0] == "red"


def test_marks_reverse_the_marked_cells() -> None:
    """A mark (cursor, search match) splits runs and flags the marked cells."""
    runs = line_runs({}, (2, 4))
    assert runs == (("  ", ("default", "default", False, False, False, False, False)),
                    ("  ", ("default", "default", False, False, False, False, False, True)))


def test_search_goes_backwards_and_forwards_case_insensitively() -> None:
    """search finds the nearest line before (or after) a position containing the text."""
    emulator = TerminalEmulator(40, 4)
    emulator.feed_now(b"alpha\r\nBeta one\r\ngamma\r\nbeta two\r\ndelta\r\n")
    last = emulator.search("beta", emulator.line_count)
    assert last is not None
    assert emulator.text(last) == "beta two"
    earlier = emulator.search("BETA", last)
    assert earlier is not None
    assert emulator.text(earlier) == "Beta one"
    assert emulator.search("beta", earlier) is None
    assert emulator.search("beta", earlier, backwards=False) == last
    assert emulator.search("", 3) is None


def test_a_flood_is_skipped_to_its_latest_lines_within_budget() -> None:
    """More output than can be parsed is skipped, not queued: the queue stays bounded, the
    latest lines are what is shown, the skip is counted and marked once in the scrollback."""
    emulator = TerminalEmulator(80, 10, max_backlog=64 * 1024, budget=0.005)
    lines = b"".join(b"line %07d xxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n" % i for i in range(100_000))
    for start in range(0, len(lines), 256 * 1024):
        emulator.write(lines[start : start + 256 * 1024])
        assert emulator.pending <= 4 * 64 * 1024
        emulator.flush()
    while emulator.pending:
        emulator.flush()
    assert emulator.skipped > 0
    assert emulator.parsed + emulator.skipped == emulator.written
    assert "line 0099999" in emulator.screen_text()
    marks = [t for t in emulator.lines_text() if "skipped here" in t]
    assert 1 <= len(marks) <= 3


def test_resize_changes_the_screen_size() -> None:
    """resize gives the screen the new size."""
    emulator = TerminalEmulator(80, 24)
    emulator.resize(100, 30)
    assert (emulator.cols, emulator.rows) == (100, 30)


# ------------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    ("key", "character", "expected"),
    [
        ("a", "a", b"a"),
        ("A", "A", b"A"),
        ("enter", "\r", b"\r"),
        ("tab", "\t", b"\t"),
        ("backspace", None, b"\x7f"),
        ("escape", "\x1b", b"\x1b"),
        ("up", None, b"\x1b[A"),
        ("left", None, b"\x1b[D"),
        ("ctrl+c", None, b"\x03"),
        ("ctrl+z", None, b"\x1a"),
        ("ctrl+up", None, b"\x1b[1;5A"),
        ("alt+x", "x", b"\x1bx"),
        ("f5", None, b"\x1b[15~"),
        ("delete", None, b"\x1b[3~"),
        ("é", "é", "é".encode()),
        ("ctrl+right_square_bracket", None, b"\x1d"),
    ],
)
def test_keys_become_the_bytes_a_terminal_sends(
    key: str, character: str | None, expected: bytes
) -> None:
    """Each key is sent as xterm would send it."""
    assert key_bytes(key, character) == expected


def test_keys_without_a_terminal_meaning_send_nothing_and_paste_is_bracketed() -> None:
    """A key with no bytes gives None; pasted text goes in bracketed-paste markers with its
    line ends as carriage returns."""
    assert key_bytes("ctrl+shift+f13", None) is None
    assert paste_bytes("a\nb") == b"\x1b[200~a\rb\x1b[201~"


# ------------------------------------------------------------------------------- task data

PROGRESS = """# Ralph progress log

## Codebase Patterns
- US-001 is mentioned here but this is not an entry

---

## 2030-01-01 10:00 - US-001
- did the first part
---
## 2030-01-01 11:00 - US-010
- not story one
---
[2030-01-01 11:05:00+00:00] Iteration 2/10 | Stories 1/3 | claude | story US-001 passed
## 2030-01-02 09:00 - US-001
- finished it
"""


def test_progress_entries_of_one_story() -> None:
    """The agent's sections about a story and the loop's summary lines naming it, oldest
    first; another story whose id starts the same is not mixed in, nor the patterns."""
    entries = progress_entries(PROGRESS, "US-001")
    assert entries == [
        "## 2030-01-01 10:00 - US-001\n- did the first part",
        "[2030-01-01 11:05:00+00:00] Iteration 2/10 | Stories 1/3 | claude | story US-001 passed",
        "## 2030-01-02 09:00 - US-001\n- finished it",
    ]
    assert progress_entries(PROGRESS, "US-010") == ["## 2030-01-01 11:00 - US-010\n- not story one"]
    assert progress_entries(PROGRESS, "US-999") == []


def _task(tmp_path: Path) -> Path:
    stories = [
        {"id": "S-1", "title": "one", "passes": True, "priority": 1,
         "acceptanceCriteria": [{"description": "c", "passes": True}]},
        {"id": "S-2", "title": "two", "passes": False, "priority": 2,
         "acceptanceCriteria": [{"description": "c", "passes": True},
                                {"description": "d", "passes": False}]},
        {"id": "S-3", "title": "three", "passes": False, "priority": 3, "blockedBy": ["S-2"]},
        {"id": "S-4", "title": "four", "passes": False, "priority": 4},
    ]
    prd = {"schemaVersion": "2.5", "project": "p", "branchName": "ralph/p",
           "userStories": stories, "custom": {"kept": True}}
    (tmp_path / "prd.json").write_text(json.dumps(prd))
    (tmp_path / "progress.txt").write_text("## 2030-01-01 - S-2\n- started\n")
    return tmp_path


def test_read_task_gives_each_story_its_state(tmp_path: Path) -> None:
    """Passing stories are done; the loop's story is current; a story waiting for a failing
    blocker is blocked; the rest pending; criteria progress and progress.txt come along."""
    snapshot = read_task(_task(tmp_path), current="S-2")
    states = {view.story.id: view.state for view in snapshot.stories}
    assert states == {"S-1": StoryState.DONE, "S-2": StoryState.CURRENT,
                      "S-3": StoryState.BLOCKED, "S-4": StoryState.PENDING}
    two = snapshot.story("S-2")
    assert two is not None
    assert (two.criteria_done, two.criteria_total) == (1, 2)
    assert snapshot.story("S-3").blockers == ("S-2",)  # type: ignore[union-attr]
    assert "started" in snapshot.progress
    # Without a running loop, the story the loop would pick next is the current one.
    assert read_task(tmp_path).story("S-2").state is StoryState.CURRENT  # type: ignore[union-attr]


def test_read_task_reports_a_broken_prd_instead_of_raising(tmp_path: Path) -> None:
    """A prd.json that cannot be read gives a snapshot with the problem in ``error``."""
    (tmp_path / "prd.json").write_text("{ not json")
    snapshot = read_task(tmp_path)
    assert snapshot.prd is None
    assert snapshot.error


def test_save_notes_changes_only_that_storys_notes(tmp_path: Path) -> None:
    """Notes are written into prd.json; every other key, known or not, stays as it was."""
    task = _task(tmp_path)
    before = json.loads((task / "prd.json").read_text())
    save_notes(task, "S-3", "wait for the API")
    after = json.loads((task / "prd.json").read_text())
    assert after["userStories"][2]["notes"] == "wait for the API"
    del after["userStories"][2]["notes"]
    assert after == before


def test_durations_read_well() -> None:
    """Durations show the two largest units."""
    assert [duration(s) for s in (None, 5, 65, 3725, 90000)] == ["-", "5s", "1m05s", "1h02m",
                                                                  "1d01h"]


def test_fewer_rows_drop_blank_rows_first_then_move_top_lines_to_the_scrollback() -> None:
    """Shrinking the terminal keeps what was written: blank rows below the output go first,
    then the top lines move into the scrollback; the cursor stays on its line."""
    emulator = TerminalEmulator(40, 10)
    emulator.feed_now(b"one\r\ntwo\r\nthree")
    emulator.resize(40, 5)
    assert list(emulator.lines_text())[:3] == ["one", "two", "three"]
    assert not emulator.history
    emulator.feed_now(b"\r\nfour\r\nfive")
    emulator.resize(40, 2)
    texts = list(emulator.lines_text())
    assert texts == ["one", "two", "three", "four", "five"]
    assert len(emulator.history) == 3
    emulator.feed_now(b" more")
    assert emulator.text(emulator.line_count - 1) == "five more"
