"""``ralph-uv run --foreground`` as a person runs it: a real ``ralph-uv`` process in a real git
repository, with a configured agent command, bad input, and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import wait_until

AGENT_SCRIPT = Path(__file__).parent.parent / "fixtures" / "scripted_agent.py"
RALPH = [sys.executable, "-m", "ralph_uv.cli.__main__"]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def _prd(**top: object) -> dict[str, object]:
    prd: dict[str, object] = {
        "schemaVersion": "2.5",
        "branchName": "ralph/cli",
        "userStories": [
            {
                "id": f"US-{i}",
                "title": f"Story {i}",
                "priority": i,
                "passes": False,
                "acceptanceCriteria": [{"description": "ok", "passes": False}],
            }
            for i in (1, 2)
        ],
    }
    prd.update(top)
    return prd


@pytest.fixture
def repo(tmp_path: Path, ralph_home: Path) -> Path:
    root = tmp_path / "repo"
    (root / "tasks" / "cli").mkdir(parents=True)
    (root / "tasks" / "cli" / "prd.json").write_text(json.dumps(_prd(), indent=2) + "\n")
    _git(root, "init", "-q", "-b", "main")
    _git(root, "config", "user.email", "t@example.com")
    _git(root, "config", "user.name", "T")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "initial")
    config = ralph_home / "config"
    config.mkdir(parents=True)
    lines = []
    for mode in ("work", "sleepwork"):
        command = json.dumps([sys.executable, str(AGENT_SCRIPT), mode, "{prompt_file}"])
        lines.append(f"[agents.{mode}]\ncommand = {command}\n")
    (config / "config.toml").write_text("pause = 0\n" + "\n".join(lines))
    return root


def _run(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RALPH, *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def test_foreground_run_completes_and_reports(repo: Path) -> None:
    """A foreground run shows the agent's output, completes the task on its branch and exits 0
    with a summary line."""
    done = _run(repo, "run", "cli", "--foreground", "--agent", "work")
    assert done.returncode == 0, done.stderr
    assert "scripted agent (work) starting" in done.stdout
    assert "loop completed: every story passes (2/2 stories, 2 iterations" in done.stderr
    assert _git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "ralph/cli"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"schemaVersion": "2.5", "branchName": ', "line 1"),
        (json.dumps({k: v for k, v in _prd().items() if k != "branchName"}), "branchName"),
        (
            json.dumps(
                _prd(
                    userStories=[
                        {"id": "A", "title": "a", "passes": False, "blockedBy": ["B"]},
                        {"id": "B", "title": "b", "passes": False, "blockedBy": ["A"]},
                    ]
                )
            ),
            "cycle",
        ),
    ],
    ids=["invalid-json", "no-branch-name", "cycle"],
)
def test_broken_prd_is_refused_and_nothing_changes(repo: Path, content: str, message: str) -> None:
    """A broken prd.json (invalid JSON, no branchName, a dependency cycle) stops the run with
    exit status 2 and a message naming the problem; no branch, commit or file is changed."""
    prd_file = repo / "tasks" / "cli" / "prd.json"
    prd_file.write_text(content)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "broken prd")
    head = _git(repo, "rev-parse", "HEAD")
    done = _run(repo, "run", "cli", "--foreground", "--agent", "work")
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert prd_file.read_text() == content
    assert _git(repo, "rev-parse", "HEAD") == head
    assert _git(repo, "branch", "--list", "ralph/cli") == ""
    assert not (repo / "tasks" / "cli" / "progress.txt").exists()


def test_dirty_tree_on_wrong_branch_says_what_to_do(repo: Path) -> None:
    """Uncommitted changes on another branch: exit 2 and advice to commit or stash."""
    (repo / "tasks" / "cli" / "prd.json").write_text(json.dumps(_prd(), indent=4))
    done = _run(repo, "run", "cli", "--foreground", "--agent", "work")
    assert done.returncode == 2
    assert "commit or stash" in done.stderr
    assert _git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"


def test_ctrl_c_checkpoints_after_the_current_iteration(repo: Path, ralph_home: Path) -> None:
    """SIGINT during an iteration lets it finish (its commit lands), then the loop ends as
    checkpointed with exit status 0 and a progress.txt summary."""
    proc = subprocess.Popen(
        [*RALPH, "run", "cli", "--foreground", "--agent", "sleepwork"],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        # The custom agent's prompt file appears when the first iteration has started.
        wait_until(lambda: any(ralph_home.glob("state/loops/*/agent-prompt.md")), 20)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "checkpointing" in err
    assert "loop checkpointed" in err
    prd = json.loads((repo / "tasks" / "cli" / "prd.json").read_text())
    assert [s["passes"] for s in prd["userStories"]] == [True, False]
    progress = (repo / "tasks" / "cli" / "progress.txt").read_text()
    assert "Iteration 1/10 | Stories 1/2 | sleepwork | checkpointed" in progress


def test_without_a_task_and_no_terminal_the_tasks_are_listed(repo: Path) -> None:
    """With no TASK and no terminal to ask on, the run lists the tasks found and exits 2."""
    done = _run(repo, "run", "--foreground")
    assert done.returncode == 2
    assert "[0/2] cli" in done.stderr
