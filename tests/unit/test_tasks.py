"""Task arguments: names, paths, the git root, and listing a repository's tasks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ralph_uv.errors import ErrorCode, UserError
from ralph_uv.tasks import TaskInfo, git_root, list_tasks, resolve_task, validate_task_name


def _git_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    return path.resolve()


def _task(root: Path, rel: str, *passes: bool, **top: Any) -> Path:
    folder = root / rel
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "schemaVersion": "2.5",
        "branchName": "ralph/x",
        **top,
        "userStories": [
            {"id": f"S{i}", "title": "t", "passes": p} for i, p in enumerate(passes or (False,))
        ],
    }
    (folder / "prd.json").write_text(json.dumps(doc), encoding="utf-8")
    return folder


@pytest.mark.parametrize("name", ["a", "add-login", "A_1.b-c", "x" * 64, "9lives", "group/feat"])
def test_valid_task_names(name: str) -> None:
    """Letters, digits, '-', '_' and '.', not leading '.' or '-', up to 64 chars, are accepted."""
    assert validate_task_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-flag", "x" * 65, "has space", "a/../b", "semi;colon", "ü", "a//b"]
)
def test_invalid_task_names(name: str) -> None:
    """Anything else is a UserError that says what a name may contain."""
    with pytest.raises(UserError) as info:
        validate_task_name(name)
    assert info.value.code == ErrorCode.INVALID_NAME
    assert "letters, digits" in info.value.message


def test_git_root_from_a_subfolder(tmp_path: Path) -> None:
    """Inside a repository the root is git's top-level folder, from any folder below it."""
    root = _git_repo(tmp_path / "repo")
    deep = root / "src" / "pkg"
    deep.mkdir(parents=True)
    assert git_root(deep) == root


def test_git_root_falls_back_to_the_folder(tmp_path: Path) -> None:
    """Outside any repository the folder itself is the root."""
    assert git_root(tmp_path) == tmp_path.resolve()


def test_bare_name_resolves_under_the_git_root(tmp_path: Path) -> None:
    """A bare name means tasks/NAME under the repository root, even from a subfolder."""
    root = _git_repo(tmp_path / "repo")
    folder = _task(root, "tasks/login")
    sub = root / "src"
    sub.mkdir()
    ref = resolve_task("login", cwd=sub)
    assert (ref.name, ref.dir, ref.root) == ("login", folder, root)
    assert ref.prd_file == folder / "prd.json"
    assert ref.progress_file == folder / "progress.txt"
    assert ref.prompt_file == folder / "prompt.md"


def test_nested_name_and_paths_resolve_to_the_same_task(tmp_path: Path) -> None:
    """A nested name, a folder path and a prd.json path all give the same task and name."""
    root = _git_repo(tmp_path / "repo")
    folder = _task(root, "tasks/group/feat")
    by_name = resolve_task("group/feat", cwd=root)
    by_dir = resolve_task("tasks/group/feat", cwd=root)
    by_file = resolve_task("./tasks/group/feat/prd.json", cwd=root)
    by_abs = resolve_task(folder)
    assert {by_name, by_dir, by_file, by_abs} == {by_name}
    assert by_name.name == "group/feat"
    assert by_name.dir == folder


def test_path_outside_tasks_uses_the_folder_name(tmp_path: Path) -> None:
    """A task folder outside tasks/ (and outside git) is named after its folder."""
    folder = _task(tmp_path, "elsewhere/job")
    ref = resolve_task("./elsewhere/job", cwd=tmp_path)
    assert (ref.name, ref.dir, ref.root) == ("job", folder, folder)


def test_bare_name_of_a_local_folder_is_found(tmp_path: Path) -> None:
    """When tasks/NAME does not exist but ./NAME holds a prd.json, that folder is used."""
    root = _git_repo(tmp_path / "repo")
    folder = _task(root, "work")
    assert resolve_task("work", cwd=root).dir == folder


def test_missing_task_says_how_to_create_it(tmp_path: Path) -> None:
    """A name with no prd.json is a UserError pointing to `ralph-uv init NAME`."""
    root = _git_repo(tmp_path / "repo")
    with pytest.raises(UserError, match="ralph-uv init nothing"):
        resolve_task("nothing", cwd=root)
    ref = resolve_task("nothing", cwd=root, must_exist=False)
    assert ref.dir == root / "tasks" / "nothing"


def test_wrong_file_name_is_refused(tmp_path: Path) -> None:
    """A .json path that is not a prd.json is refused with what to do."""
    (tmp_path / "stories.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match=r"must be named prd\.json"):
        resolve_task("./stories.json", cwd=tmp_path)


def test_invalid_name_is_refused(tmp_path: Path) -> None:
    """A bare TASK that is neither a valid name nor an existing path is a UserError."""
    with pytest.raises(UserError, match="invalid task name"):
        resolve_task("-oops", cwd=tmp_path)


def test_list_tasks_counts_and_skips_archives(tmp_path: Path) -> None:
    """Every tasks/**/prd.json is listed by name with its counts and type, archived ones not,
    and a broken prd.json is listed as invalid instead of stopping the listing."""
    root = _git_repo(tmp_path / "repo")
    _task(root, "tasks/login", True, False, type="feature")
    _task(root, "tasks/group/cleanup", False)
    _task(root, "tasks/archived/old", True)
    _task(root, "tasks/group/archived/older", True)
    broken = root / "tasks" / "broken"
    broken.mkdir()
    (broken / "prd.json").write_text("{nope", encoding="utf-8")
    tasks = list_tasks(root)
    assert [t.label for t in tasks] == [
        "[?/?] broken (invalid prd.json)",
        "[0/1] group/cleanup",
        "[1/2] login (feature)",
    ]
    assert tasks[0].error is not None
    assert "line 1" in tasks[0].error
    assert str(tasks[2]) == "[1/2] login (feature)"
    assert tasks[2] == TaskInfo("login", root / "tasks" / "login", 1, 2, "feature")


def test_list_tasks_without_a_tasks_folder(tmp_path: Path) -> None:
    """A repository without tasks/ has no tasks."""
    assert list_tasks(tmp_path) == []
