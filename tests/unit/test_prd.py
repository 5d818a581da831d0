"""prd.json: loading every schema version, story selection, validation and safe rewrites."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ralph_uv.errors import ErrorCode, UserError
from ralph_uv.prd import (
    Criterion,
    Prd,
    PrdError,
    check_branch_name,
    load_prd,
    set_story_notes,
    set_story_passes,
    validate_prd,
)


def _story(story_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": story_id, "title": f"Story {story_id}", "passes": False, **fields}


def _doc(*stories: dict[str, Any], **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"schemaVersion": "2.5", "branchName": "ralph/test"}
    doc.update(top)
    doc["userStories"] = list(stories)
    return doc


def _write(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "prd.json"
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


def _next_id(prd: Prd) -> str | None:
    story = prd.next_story()
    return None if story is None else story.id


def _paths(problems: list[Any]) -> list[str]:
    return [p.path for p in problems]


# -- schema versions ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.5"])
def test_schema_1x_reads_string_criteria(tmp_path: Path, version: str) -> None:
    """In schema 1.x acceptance criteria are plain strings, read as not-yet-passing criteria."""
    path = _write(
        tmp_path,
        _doc(_story("US-1", acceptanceCriteria=["it works", "tests pass"]), schemaVersion=version),
    )
    prd = load_prd(path)
    assert prd.schema_version == version
    assert prd.stories[0].acceptance_criteria == (Criterion("it works"), Criterion("tests pass"))


@pytest.mark.parametrize("version", ["2.0", "2.1", "2.2", "2.3", "2.4", "2.5"])
def test_schema_2x_reads_criteria_objects(tmp_path: Path, version: str) -> None:
    """From schema 2.0 criteria are {description, passes} objects and keep their passes flag."""
    criteria = [{"description": "a", "passes": True}, {"description": "b", "passes": False}]
    path = _write(
        tmp_path, _doc(_story("US-1", acceptanceCriteria=criteria), schemaVersion=version)
    )
    prd = load_prd(path)
    assert prd.schema_version == version
    assert prd.stories[0].acceptance_criteria == (Criterion("a", True), Criterion("b", False))


def test_missing_schema_version_is_read_as_1_0(tmp_path: Path) -> None:
    """A file without schemaVersion is a 1.0 file: string criteria are fine."""
    doc = _doc(_story("US-1", acceptanceCriteria=["x"]))
    del doc["schemaVersion"]
    prd = load_prd(_write(tmp_path, doc))
    assert prd.schema_version == "1.0"
    assert prd.stories[0].acceptance_criteria == (Criterion("x"),)


def test_numeric_schema_version_is_accepted(tmp_path: Path) -> None:
    """schemaVersion written as a JSON number (2.1) is understood like the string "2.1"."""
    prd = load_prd(_write(tmp_path, _doc(_story("US-1"), schemaVersion=2.1)))
    assert prd.schema_version == "2.1"


def test_criteria_form_must_match_the_schema(tmp_path: Path) -> None:
    """Strings in a 2.x file and objects in a 1.x file are reported at the criterion's path."""
    two = validate_prd(_write(tmp_path, _doc(_story("US-1", acceptanceCriteria=["x"]))))
    assert _paths(two) == ["$.userStories[0].acceptanceCriteria[0]"]
    assert "objects" in two[0].message
    one = validate_prd(
        _write(
            tmp_path,
            _doc(
                _story("US-1", acceptanceCriteria=[{"description": "x", "passes": False}]),
                schemaVersion="1.0",
            ),
        )
    )
    assert _paths(one) == ["$.userStories[0].acceptanceCriteria[0]"]
    assert "schemaVersion" in one[0].fix


@pytest.mark.parametrize(("version", "word"), [("0.9", "older"), ("2.6", "newer"), ("3", "newer")])
def test_unknown_schema_versions_name_the_known_range(
    tmp_path: Path, version: str, word: str
) -> None:
    """Versions outside 1.0 to 2.5 are refused with a message naming the versions understood."""
    problems = validate_prd(_write(tmp_path, _doc(_story("US-1"), schemaVersion=version)))
    assert _paths(problems) == ["$.schemaVersion"]
    assert word in problems[0].message
    assert "1.0 to 2.5" in problems[0].message


def test_top_level_fields_are_typed(tmp_path: Path) -> None:
    """Known top-level fields come out typed, with notes given as a list joined into text."""
    doc = _doc(
        _story("US-1", agent="opencode", model="m1", phase=2, notes="n"),
        project="demo",
        taskDir="tasks/demo",
        mergeTarget="main",
        autoMerge=True,
        pauseBetweenStories=True,
        type="feature",
        description="d",
        agent="claude",
        notes=["line one", "line two"],
        phases=[{"id": 1, "name": "setup"}],
    )
    prd = load_prd(_write(tmp_path, doc))
    assert (prd.project, prd.task_dir, prd.merge_target) == ("demo", "tasks/demo", "main")
    assert prd.auto_merge
    assert prd.pause_between_stories
    assert (prd.type, prd.description, prd.agent) == ("feature", "d", "claude")
    assert prd.notes == "line one\nline two"
    assert prd.phases == ({"id": 1, "name": "setup"},)
    story = prd.stories[0]
    assert (story.agent, story.model, story.phase, story.notes) == ("opencode", "m1", "2", "n")


# -- story selection ---------------------------------------------------------------------------


def test_lowest_priority_first_and_unnumbered_last_in_file_order(tmp_path: Path) -> None:
    """Stories run by ascending priority; those without one follow, in the order of the file."""
    path = _write(
        tmp_path,
        _doc(
            _story("A"),
            _story("B", priority=3),
            _story("C"),
            _story("D", priority=1),
            _story("E", priority=2),
        ),
    )
    order = []
    while (story_id := _next_id(load_prd(path))) is not None:
        order.append(story_id)
        set_story_passes(path, story_id, True)
    assert order == ["D", "E", "B", "A", "C"]
    prd = load_prd(path)
    assert prd.next_story() is None
    assert prd.all_passing
    assert prd.counts() == (5, 5)


def test_passing_stories_are_skipped(tmp_path: Path) -> None:
    """A story that already passes is never chosen, whatever its priority."""
    prd = load_prd(
        _write(tmp_path, _doc(_story("A", priority=1, passes=True), _story("B", priority=2)))
    )
    assert _next_id(prd) == "B"
    assert prd.counts() == (1, 2)
    assert not prd.all_passing


def test_blocked_story_waits_for_its_blocker(tmp_path: Path) -> None:
    """A story whose blockedBy stories fail is skipped until they pass."""
    path = _write(
        tmp_path,
        _doc(_story("A", priority=1, blockedBy=["C"]), _story("B", priority=2), _story("C")),
    )
    prd = load_prd(path)
    assert prd.waiting() == {"A": ("C",)}
    assert _next_id(prd) == "B"
    set_story_passes(path, "B", True)
    assert _next_id(load_prd(path)) == "C"
    set_story_passes(path, "C", True)
    assert _next_id(load_prd(path)) == "A"


def test_blocks_is_the_inverse_of_blocked_by(tmp_path: Path) -> None:
    """A "blocks" entry on story C holds A back exactly as "blockedBy" on A would."""
    prd = load_prd(
        _write(tmp_path, _doc(_story("A", priority=1), _story("C", priority=5, blocks=["A"])))
    )
    assert prd.blockers(prd.stories[0]) == ("C",)
    assert _next_id(prd) == "C"


@pytest.mark.timeout(10)
def test_cycle_is_an_error_naming_the_stories(tmp_path: Path) -> None:
    """A dependency cycle raises PrdError naming the cycle and who waits, instead of looping."""
    path = _write(
        tmp_path,
        _doc(
            _story("A", blockedBy=["B"]),
            _story("B", blockedBy=["C"]),
            _story("C", blockedBy=["A"]),
            _story("D", blockedBy=["A"]),
        ),
    )
    prd = load_prd(path)
    with pytest.raises(PrdError) as info:
        prd.next_story()
    assert isinstance(info.value, UserError)
    assert info.value.code == ErrorCode.INVALID_PRD
    [problem] = info.value.problems
    assert "cycle" in problem.message
    assert "A → B → C → A" in problem.message
    assert "D waits for A" in info.value.message
    assert _paths(validate_prd(path)) == ["$.userStories[0].blockedBy"]


@pytest.mark.timeout(10)
def test_long_dependency_chain_is_resolved_without_recursion_limits(tmp_path: Path) -> None:
    """A 3000-story chain is ordered by its dependencies, and closing it into a loop is caught."""
    n = 3000
    stories = [
        _story(f"S{i}", **({"blockedBy": [f"S{i + 1}"]} if i < n - 1 else {})) for i in range(n)
    ]
    path = _write(tmp_path, _doc(*stories))
    assert _next_id(load_prd(path)) == f"S{n - 1}"
    stories[-1]["blockedBy"] = ["S0"]
    path = _write(tmp_path, _doc(*stories))
    with pytest.raises(PrdError, match="cycle"):
        load_prd(path).next_story()


def test_unknown_blocker_is_an_error(tmp_path: Path) -> None:
    """A blockedBy or blocks id that names no story is reported at its exact path."""
    path = _write(
        tmp_path, _doc(_story("A"), _story("B", blockedBy=["A", "ZZ"]), _story("C", blocks=["Q"]))
    )
    with pytest.raises(PrdError) as info:
        load_prd(path).next_story()
    assert _paths(list(info.value.problems)) == [
        "$.userStories[1].blockedBy[1]",
        "$.userStories[2].blocks[0]",
    ]
    assert "'ZZ'" in info.value.problems[0].message


def test_self_blocking_story_is_an_error(tmp_path: Path) -> None:
    """A story naming itself as its blocker can never run and is reported."""
    problems = validate_prd(_write(tmp_path, _doc(_story("A", blockedBy=["A"]))))
    assert _paths(problems) == ["$.userStories[0].blockedBy[0]"]
    assert "itself" in problems[0].message


# -- validation --------------------------------------------------------------------------------


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    """A syntax error is reported with the line and column where the parser stopped."""
    path = tmp_path / "prd.json"
    path.write_text('{\n  "branchName": "x"\n  "userStories": []\n}\n', encoding="utf-8")
    [problem] = validate_prd(path)
    assert (problem.line, problem.column) == (3, 3)
    assert "line 3, column 3" in problem.message
    assert problem.path == "$"
    with pytest.raises(PrdError, match="line 3, column 3"):
        load_prd(path)


def test_missing_file_and_non_object_document(tmp_path: Path) -> None:
    """A missing file and a document that is not an object are problems, not exceptions."""
    assert "does not exist" in validate_prd(tmp_path / "nope.json")[0].message
    assert "JSON object" in validate_prd(_write(tmp_path, [1, 2]))[0].message


def test_structural_problems_each_at_their_path(tmp_path: Path) -> None:
    """Missing branchName, duplicate ids and wrongly typed fields are all reported together,
    each at its JSON path and with something to do."""
    doc = _doc(
        _story("A", passes="yes"),
        _story("B", priority="1"),
        _story("A"),
        {"title": "no id"},
        "not a story",
        autoMerge="no",
    )
    del doc["branchName"]
    path = _write(tmp_path, doc)
    problems = validate_prd(path)
    assert _paths(problems) == [
        "$.branchName",
        "$.userStories[0].passes",
        "$.userStories[1].priority",
        "$.userStories[2].id",
        "$.userStories[3].id",
        "$.userStories[4]",
        "$.autoMerge",
    ]
    assert "duplicate id 'A'" in problems[3].message
    assert all(p.fix and p.file == path for p in problems)
    assert str(problems[0]).startswith(f"{path}: $.branchName: missing — ")
    with pytest.raises(PrdError) as info:
        load_prd(path)
    assert len(info.value.problems) == len(problems)


def test_empty_user_stories_is_a_problem(tmp_path: Path) -> None:
    """A prd.json without any story is invalid: there is nothing for the agent to do."""
    problems = validate_prd(_write(tmp_path, _doc()))
    assert _paths(problems) == ["$.userStories"]
    assert "no stories" in problems[0].message


def test_invalid_branch_name_is_a_problem(tmp_path: Path) -> None:
    """A branchName git would refuse is reported with the rule it breaks."""
    problems = validate_prd(_write(tmp_path, _doc(_story("A"), branchName="feature..x")))
    assert _paths(problems) == ["$.branchName"]
    assert "'..'" in problems[0].message


@pytest.fixture(scope="module")
def outside_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("norepo")


def _git_accepts(name: str, cwd: Path) -> bool:
    result = subprocess.run(
        ["git", "check-ref-format", "--branch", name], cwd=cwd, capture_output=True, check=False
    )
    return result.returncode == 0


_CASES = [
    "main", "ralph/feature-x", "a/b/c", "é", "@", "v1.2", "-x", "HEAD", "a..b", "a//b", "/a",
    "a/", "a.", "a.lock", "x/a.lock/y", "a/.b", ".a", "a b", "a~b", "a^b", "a:b", "a?b", "a*b",
    "a[b", "a\\b", "a@{b", "a\x7fb", "a\tb", "", "a.lock.b", "foo@bar", "a/..", "...",
]  # fmt: skip


@pytest.mark.parametrize("name", _CASES)
def test_branch_rules_match_git(name: str, outside_repo: Path) -> None:
    """check_branch_name accepts exactly what `git check-ref-format --branch` accepts."""
    assert (check_branch_name(name) is None) == _git_accepts(name, outside_repo)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from([*"ab./-@{}~^:?*[\\ \t\x7fé", ".lock", "HEAD", "lock"]), max_size=10
    ).map("".join)
)
def test_branch_rules_match_git_on_random_names(outside_repo: Path, name: str) -> None:
    """On generated names built from the characters git cares about, the rules agree with git."""
    assert (check_branch_name(name) is None) == _git_accepts(name, outside_repo)


# -- rewrites ----------------------------------------------------------------------------------


def test_rewrite_keeps_unknown_fields_order_format_and_mode(tmp_path: Path) -> None:
    """set_story_passes changes only that value: unknown keys at the top and in stories, key
    order, the 2-space format with a final newline and the file mode all stay."""
    doc = {
        "x-custom": {"keep": [1, 2]},
        "schemaVersion": "2.5",
        "branchName": "ralph/t",
        "userStories": [
            {"id": "A", "title": "t", "passes": False, "estimate": 3, "labels": ["ui"]},
            {"id": "B", "title": "u", "passes": False, "owner": "kim"},
        ],
        "zz-last": None,
    }
    path = _write(tmp_path, doc)
    os.chmod(path, 0o640)
    set_story_passes(path, "A", True)
    text = path.read_text(encoding="utf-8")
    expected = json.loads(json.dumps(doc))
    expected["userStories"][0]["passes"] = True
    assert text == json.dumps(expected, indent=2) + "\n"
    assert list(json.loads(text)) == ["x-custom", "schemaVersion", "branchName", "userStories",
                                      "zz-last"]  # fmt: skip
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prd.json"]


def test_set_story_notes_and_non_ascii(tmp_path: Path) -> None:
    """set_story_notes writes the notes (non-ASCII kept as text) and nothing else changes."""
    path = _write(tmp_path, _doc(_story("A"), _story("B")))
    set_story_notes(path, "B", "touché — see progress.txt")
    prd = load_prd(path)
    assert prd.stories[1].notes == "touché — see progress.txt"
    assert prd.stories[0].notes == ""
    assert "touché" in path.read_text(encoding="utf-8")


def test_rewrite_through_symlink_keeps_the_link(tmp_path: Path) -> None:
    """Updating a prd.json that is a symlink rewrites its target and leaves the link in place."""
    real = tmp_path / "real"
    real.mkdir()
    target = _write(real, _doc(_story("A")))
    link = tmp_path / "prd.json"
    link.symlink_to(target)
    set_story_passes(link, "A", True)
    assert link.is_symlink()
    assert load_prd(target).stories[0].passes


def test_rewrite_of_unknown_story_is_an_error(tmp_path: Path) -> None:
    """Asking to update a story id that is not in the file raises PrdError and writes nothing."""
    path = _write(tmp_path, _doc(_story("A")))
    before = path.read_text(encoding="utf-8")
    with pytest.raises(PrdError, match="no story with id 'Q'"):
        set_story_passes(path, "Q", True)
    assert path.read_text(encoding="utf-8") == before
