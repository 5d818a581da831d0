"""The git helpers against real temporary repositories."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ralph_uv import git
from ralph_uv.errors import ErrorCode, GitError, UserError


@pytest.fixture(autouse=True)
def git_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits need an author; no global or system git config is read."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Ralph Test")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "ralph@example.invalid")


def sh(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def commit_file(root: Path, name: str, content: str, message: str | None = None) -> str:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    sh(root, "add", name)
    sh(root, "commit", "-q", "-m", message or f"add {name}")
    return sh(root, "rev-parse", "HEAD")


@pytest.fixture
def empty_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    return root


@pytest.fixture
def repo(empty_repo: Path) -> Path:
    commit_file(empty_repo, "README.md", "hello\n")
    return empty_repo


def test_repo_root_from_subfolder_and_file(repo: Path) -> None:
    """The repository's top folder is found from a folder or a file inside it."""
    sub = repo / "tasks" / "feature"
    sub.mkdir(parents=True)
    (sub / "prd.json").write_text("{}")
    assert git.repo_root(sub) == repo.resolve()
    assert git.repo_root(sub / "prd.json") == repo.resolve()


def test_repo_root_outside_a_repository(tmp_path: Path) -> None:
    """Outside any repository the error says to run git init."""
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(UserError, match="run git init"):
        git.repo_root(plain)


def test_branch_and_head(repo: Path) -> None:
    """current_branch and head report the branch and commit, None when detached / empty."""
    assert git.current_branch(repo) == "main"
    sha = git.head(repo)
    assert sha == sh(repo, "rev-parse", "HEAD")
    sh(repo, "switch", "-q", "--detach", "HEAD")
    assert git.current_branch(repo) is None


def test_empty_repository(tmp_path: Path) -> None:
    """A repository without commits has a branch name but no HEAD commit."""
    root = tmp_path / "fresh"
    subprocess.run(["git", "init", "-q", "-b", "trunk", str(root)], check=True)
    assert git.current_branch(root) == "trunk"
    assert git.head(root) is None


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("ralph/my-feature", True),
        ("feature_2", True),
        ("bad..name", False),
        ("has space", False),
        ("-leading-dash", False),
        ("ends.lock", False),
        ("@{-1}", False),
        ("", False),
    ],
)
def test_check_ref_format(name: str, valid: bool) -> None:
    """Branch names are checked by git's own rules."""
    assert git.check_ref_format(name) is valid


def test_dirty_files_and_is_clean(repo: Path) -> None:
    """Modified and untracked files are listed; untracked ones can be left out."""
    assert git.is_clean(repo)
    (repo / "README.md").write_text("changed\n")
    (repo / "new dir").mkdir()
    (repo / "new dir" / "notes.txt").write_text("x")
    assert sorted(git.dirty_files(repo)) == ["README.md", "new dir/notes.txt"]
    assert git.dirty_files(repo, include_untracked=False) == ["README.md"]
    assert not git.is_clean(repo)
    sh(repo, "checkout", "--", "README.md")
    assert git.is_clean(repo, include_untracked=False)
    assert not git.is_clean(repo)


def test_renamed_files_are_listed_once(repo: Path) -> None:
    """A staged rename shows its new path only (porcelain -z has two fields for it)."""
    sh(repo, "mv", "README.md", "READ.md")
    assert git.dirty_files(repo) == ["READ.md"]


def test_create_branch_checkout_and_errors(repo: Path) -> None:
    """Branches are created without switching; checkout switches; git's words are kept."""
    git.create_branch(repo, "ralph/one")
    assert git.branch_exists(repo, "ralph/one")
    assert git.current_branch(repo) == "main"
    git.checkout(repo, "ralph/one")
    assert git.current_branch(repo) == "ralph/one"
    with pytest.raises(GitError, match=r"invalid reference|did not match") as caught:
        git.checkout(repo, "no-such-branch")
    assert caught.value.code == ErrorCode.GIT_ERROR
    with pytest.raises(UserError, match="not a valid git branch name"):
        git.create_branch(repo, "bad..name")


def test_ensure_branch_creates_from_base(repo: Path) -> None:
    """On a clean tree the loop's branch is created from the base branch and checked out."""
    base_sha = git.head(repo)
    sh(repo, "switch", "-q", "-c", "elsewhere")
    commit_file(repo, "other.txt", "x")
    assert git.ensure_branch(repo, "ralph/feature", "main") is True
    assert git.current_branch(repo) == "ralph/feature"
    assert git.head(repo) == base_sha
    assert git.ensure_branch(repo, "ralph/feature", "main") is False


def test_ensure_branch_switches_to_an_existing_branch(repo: Path) -> None:
    """An existing branch is switched to, keeping its own commits."""
    sh(repo, "branch", "ralph/feature")
    git.checkout(repo, "ralph/feature")
    sha = commit_file(repo, "work.txt", "done")
    sh(repo, "switch", "-q", "main")
    assert git.ensure_branch(repo, "ralph/feature", "main") is True
    assert git.head(repo) == sha


def test_ensure_branch_refuses_to_switch_a_dirty_tree(repo: Path) -> None:
    """Uncommitted changes to tracked files block a switch, and nothing is touched."""
    (repo / "README.md").write_text("my unsaved work\n")
    sh(repo, "add", "README.md")
    (repo / "README.md").write_text("my unsaved work, edited again\n")
    with pytest.raises(UserError, match="commit or stash your changes first"):
        git.ensure_branch(repo, "ralph/feature", "main")
    assert git.current_branch(repo) == "main"
    assert not git.branch_exists(repo, "ralph/feature")
    assert (repo / "README.md").read_text() == "my unsaved work, edited again\n"
    assert sh(repo, "diff", "--cached", "--name-only") == "README.md"


def test_ensure_branch_leaves_a_dirty_tree_alone_when_already_there(repo: Path) -> None:
    """Already on the loop's branch: uncommitted work is not a problem and is not touched."""
    sh(repo, "switch", "-q", "-c", "ralph/feature")
    (repo / "README.md").write_text("in progress\n")
    assert git.ensure_branch(repo, "ralph/feature", "main") is False
    assert (repo / "README.md").read_text() == "in progress\n"


def test_ensure_branch_carries_untracked_files(repo: Path) -> None:
    """A new task's untracked prd.json does not block the switch and is still there after."""
    task = repo / "tasks" / "feature" / "prd.json"
    task.parent.mkdir(parents=True)
    task.write_text('{"stories": []}')
    assert git.ensure_branch(repo, "ralph/feature", None) is True
    assert git.current_branch(repo) == "ralph/feature"
    assert task.read_text() == '{"stories": []}'


def test_ensure_branch_missing_base(repo: Path) -> None:
    """A base branch that exists nowhere is reported as such."""
    with pytest.raises(UserError, match="base branch 'develop' does not exist") as caught:
        git.ensure_branch(repo, "ralph/feature", "develop")
    assert caught.value.code == ErrorCode.BRANCH_NOT_FOUND
    assert git.current_branch(repo) == "main"


def test_ensure_branch_in_an_empty_repository_keeps_staged_files(empty_repo: Path) -> None:
    """Without commits the unborn branch is renamed; staged files stay staged."""
    (empty_repo / "a.txt").write_text("a")
    sh(empty_repo, "add", "a.txt")
    assert git.ensure_branch(empty_repo, "ralph/feature", "main") is True
    assert git.current_branch(empty_repo) == "ralph/feature"
    assert sh(empty_repo, "diff", "--cached", "--name-only") == "a.txt"


def test_progress_snapshot(repo: Path) -> None:
    """Snapshots differ after a commit, after any content change (even to an already
    modified file) and after a watched file changes; they are equal when nothing changed."""
    prd = repo / "prd.json"
    prd.write_text('{"passes": false}')
    first = git.progress_snapshot(repo, [prd])
    assert git.progress_snapshot(repo, [prd]) == first

    os.utime(prd, (1, 1))  # a touch without a content change is no progress
    assert git.progress_snapshot(repo, [prd]) == first

    (repo / "README.md").write_text("edit 1\n")
    second = git.progress_snapshot(repo, [prd])
    assert second != first
    (repo / "README.md").write_text("edit 2\n")  # same `git status`, new content
    third = git.progress_snapshot(repo, [prd])
    assert third != second

    sh(repo, "add", "-A")
    sh(repo, "commit", "-q", "-m", "work")
    fourth = git.progress_snapshot(repo, [prd])
    assert fourth.head != third.head

    prd.write_text('{"passes": true}')
    fifth = git.progress_snapshot(repo, [prd])
    assert fifth.head == fourth.head
    assert fifth != fourth


def test_commits_between(repo: Path) -> None:
    """Commits after a base, oldest first, with their subjects."""
    base = git.head(repo)
    one = commit_file(repo, "a.txt", "a", "first change")
    two = commit_file(repo, "b.txt", "b", "second change")
    commits = git.commits_between(repo, base)
    assert [(c.sha, c.subject) for c in commits] == [(one, "first change"), (two, "second change")]
    assert len(git.commits_between(repo, None)) == 3
    assert git.commits_between(repo, two) == []


def test_push_to_a_local_remote(repo: Path, tmp_path: Path) -> None:
    """A branch is pushed to origin and tracked; a lease-protected push replaces history
    only when nobody else moved the remote branch."""
    assert not git.has_remote(repo, "origin")
    remote = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    sh(repo, "remote", "add", "origin", str(remote))
    assert git.has_remote(repo, "origin")

    git.ensure_branch(repo, "ralph/feature", "main")
    commit_file(repo, "a.txt", "a")
    git.push(repo, "ralph/feature")
    assert sh(remote, "rev-parse", "ralph/feature") == git.head(repo)
    upstream = sh(repo, "rev-parse", "--abbrev-ref", "ralph/feature@{upstream}")
    assert upstream == "origin/ralph/feature"

    sh(repo, "commit", "-q", "--amend", "-m", "amended")
    with pytest.raises(GitError, match="rejected"):
        git.push(repo, "ralph/feature")
    git.push(repo, "ralph/feature", force_with_lease=True)
    assert sh(remote, "rev-parse", "ralph/feature") == git.head(repo)


def test_pull_requests_need_gh(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the GitHub CLI, opening a pull request says to install it."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", f"{empty}:/nonexistent")
    assert not git.gh_available()
    with pytest.raises(UserError, match="install the GitHub CLI"):
        git.open_pull_request(repo, "ralph/feature", "main", "title", "body")


GH_STANDIN = """#!/bin/sh
# Records its arguments; answers like gh does.
printf '%s\\n' "$@" > "$GH_ARGS"
case "$1 $2" in
  "pr create")
    if [ -n "$GH_EXISTS" ]; then
      echo "a pull request for branch \\"ralph/feature\\" into \\"main\\" already exists:" >&2
      echo "https://github.example/o/r/pull/7" >&2
      exit 1
    fi
    echo "Creating pull request for ralph/feature into main"
    echo "https://github.example/o/r/pull/8" ;;
  "pr merge") exit 0 ;;
esac
"""


def test_pull_request_commands(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_pull_request passes branch, base, title and body to gh and returns the URL it
    prints (or the already-open one's); merge_pull_request asks gh to merge it.

    GitHub cannot be reached from the tests, so a stand-in ``gh`` script answers."""
    folder = tmp_path / "gh-bin"
    folder.mkdir()
    stand_in = folder / "gh"
    stand_in.write_text(GH_STANDIN)
    stand_in.chmod(0o755)
    args_file = tmp_path / "gh-args"
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    monkeypatch.setenv("GH_ARGS", str(args_file))
    assert git.gh_available()

    url = git.open_pull_request(repo, "ralph/feature", "main", "Add login", "All stories pass.")
    assert url == "https://github.example/o/r/pull/8"
    assert args_file.read_text().splitlines() == [
        "pr", "create", "--head", "ralph/feature", "--base", "main",
        "--title", "Add login", "--body", "All stories pass.",
    ]
    monkeypatch.setenv("GH_EXISTS", "1")
    assert git.open_pull_request(repo, "ralph/feature", "main", "t", "b").endswith("/pull/7")

    git.merge_pull_request(repo, url, method="squash", delete_branch=True)
    assert args_file.read_text().splitlines() == ["pr", "merge", url, "--squash", "--delete-branch"]
    with pytest.raises(UserError, match="unknown merge method"):
        git.merge_pull_request(repo, url, method="octopus")
