"""`ralph-uv init` and `ralph-uv validate`: files created, output and exit statuses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ralph_uv.cli import cli
from ralph_uv.prd import load_prd, validate_prd
from ralph_uv.prompt import builtin_template


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    monkeypatch.chdir(root)
    return root.resolve()


def _run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_init_scaffolds_a_valid_task(repo: Path) -> None:
    """init creates prd.json (schema 2.5, two stories with criteria objects) and prompt.md (the
    built-in template), prints them and the next command, and exits 0."""
    result = _run("init", "add-login")
    assert result.exit_code == 0, result.output
    task = repo / "tasks" / "add-login"
    assert "Created tasks/add-login/prd.json" in result.stdout
    assert "Created tasks/add-login/prompt.md" in result.stdout
    assert "ralph-uv validate add-login" in result.stdout
    assert validate_prd(task / "prd.json") == []
    prd = load_prd(task / "prd.json")
    assert prd.schema_version == "2.5"
    assert prd.branch_name == "ralph/add-login"
    assert prd.type == "feature"
    assert prd.task_dir == "tasks/add-login"
    assert len(prd.stories) == 2
    assert all(len(s.acceptance_criteria) >= 1 for s in prd.stories)
    assert (task / "prompt.md").read_text(encoding="utf-8") == builtin_template()
    assert (task / "prd.json").read_text(encoding="utf-8").startswith('{\n  "schemaVersion"')


def test_init_from_a_subfolder_uses_the_git_root(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare name creates the task under the repository root, wherever the command runs."""
    sub = repo / "src" / "deep"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert _run("init", "fix").exit_code == 0
    assert (repo / "tasks" / "fix" / "prd.json").is_file()


def test_init_options_type_and_branch(repo: Path) -> None:
    """--type and --branch end up in the new prd.json."""
    result = _run("init", "bug-1", "--type", "bugfix", "--branch", "fix/bug-1")
    assert result.exit_code == 0, result.output
    prd = load_prd(repo / "tasks" / "bug-1" / "prd.json")
    assert (prd.type, prd.branch_name) == ("bugfix", "fix/bug-1")


def test_init_refuses_to_overwrite_without_force(repo: Path) -> None:
    """A second init fails with exit 2 and leaves the edited files alone; --force overwrites."""
    assert _run("init", "t").exit_code == 0
    prd_file = repo / "tasks" / "t" / "prd.json"
    prd_file.write_text("edited\n", encoding="utf-8")
    result = _run("init", "t")
    assert result.exit_code == 2
    assert "--force" in result.stderr
    assert prd_file.read_text(encoding="utf-8") == "edited\n"
    assert _run("init", "t", "--force").exit_code == 0
    assert validate_prd(prd_file) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["init", ".secret"], "invalid task name"),
        (["init", "ok", "--branch", "bad..name"], "not a valid branch name"),
        (["init", "ok", "--type", " "], "--type"),
    ],
)
def test_init_bad_input_exits_2_with_a_message(repo: Path, args: list[str], needle: str) -> None:
    """Bad names, branches and types are refused with exit 2, a message and no files."""
    result = _run(*args)
    assert result.exit_code == 2
    assert needle in result.stderr
    assert not (repo / "tasks").exists()


def test_validate_ok(repo: Path) -> None:
    """A valid task prints one OK line with the story counts and exits 0."""
    _run("init", "t")
    result = _run("validate", "t")
    assert result.exit_code == 0
    assert result.stdout == "OK: tasks/t/prd.json is valid (schema 2.5, 0/2 stories pass)\n"


def _break(repo: Path) -> Path:
    _run("init", "t")
    prd_file = repo / "tasks" / "t" / "prd.json"
    doc = json.loads(prd_file.read_text(encoding="utf-8"))
    doc["branchName"] = "-bad"
    doc["userStories"][1]["id"] = "US-001"
    prd_file.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return prd_file


def test_validate_prints_every_problem_and_exits_2(repo: Path) -> None:
    """Each problem is one line `file: $.path: message — what to do`; the status is 2."""
    prd_file = _break(repo)
    result = _run("validate", "tasks/t")
    assert result.exit_code == 2
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{prd_file}: $.branchName: ")
    assert lines[1].startswith(f"{prd_file}: $.userStories[1].id: duplicate id 'US-001'")
    assert all(" — " in line for line in lines)
    assert "2 problems found" in result.stderr


def test_validate_json(repo: Path) -> None:
    """--json gives {valid, problems} with file, path, message and fix for each problem."""
    prd_file = _break(repo)
    result = _run("validate", "t", "--json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["valid"] is False
    assert [p["path"] for p in report["problems"]] == ["$.branchName", "$.userStories[1].id"]
    assert report["problems"][0]["file"] == str(prd_file)
    assert report["problems"][0]["fix"]
    prd_file.write_text("{\n  oops\n}", encoding="utf-8")
    report = json.loads(_run("validate", "t", "--json").stdout)
    assert (report["problems"][0]["line"], report["problems"][0]["column"]) == (2, 3)


def test_validate_missing_task(repo: Path) -> None:
    """A task that does not exist is invalid (exit 2) and the message says how to create it."""
    result = _run("validate", "ghost")
    assert result.exit_code == 2
    assert "does not exist" in result.stdout
    assert "ralph-uv init" in result.stdout
    report = json.loads(_run("validate", "ghost", "--json").stdout)
    assert report["valid"] is False
